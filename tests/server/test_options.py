"""gunicorn's settings derived from ours: worker class, threads, hooks, logger."""

from __future__ import annotations

import shutil
from pathlib import Path

from app.server import hooks
from app.server.options import gunicorn_options, worker_model
from app.settings import load_settings
from app.wsgi import build_repository
from tests.conftest import DEMO_MODELS, make_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "appliance.toml"
    path.write_text(text)
    return path


def test_worker_model_follows_the_repository(tmp_path: Path) -> None:
    shutil.copytree(DEMO_MODELS / "mlp", tmp_path / "mlp")
    settings = load_settings(write(tmp_path, f'[models]\nrepository = "{tmp_path}"\n'), env={})
    assert worker_model(settings, build_repository(settings)) == ("gevent", 1)
    (tmp_path / "mlp" / "model.toml").write_text("[batching]\nmax_batch_size = 32\n")
    assert worker_model(settings, build_repository(settings)) == ("gevent", 1)
    gthread = f'[models]\nrepository = "{tmp_path}"\n[server]\nworker_class = "gthread"\n'
    threaded = load_settings(write(tmp_path, gthread), env={})
    assert worker_model(threaded, build_repository(threaded)) == ("gthread", 32)
    (tmp_path / "mlp" / "model.toml").unlink()
    assert worker_model(threaded, build_repository(threaded)) == ("gthread", 4)
    explicit = load_settings(write(tmp_path, gthread + "threads = 6\n"), env={})
    assert worker_model(explicit, build_repository(explicit)) == ("gthread", 6)
    sync = load_settings(
        write(tmp_path, f'[models]\nrepository = "{tmp_path}"\n[server]\nworker_class = "sync"\n'),
        env={},
    )
    assert worker_model(sync, build_repository(sync)) == ("sync", 1)


def test_options_carry_the_hooks_and_a_logger_bound_to_the_format() -> None:
    settings = make_settings(DEMO_MODELS, logging={"format": "console"})
    options = gunicorn_options(settings, build_repository(settings))
    assert options["worker_class"] == "app.server.gevent_worker.GeventWorker"
    assert options["post_fork"] is hooks.post_fork
    assert options["preload_app"] is False
    assert options["logger_class"].log_format == "console"
    json_options = gunicorn_options(make_settings(DEMO_MODELS), build_repository(settings))
    assert json_options["logger_class"].log_format == "json"


def test_the_request_parser_setting_reaches_gunicorn() -> None:
    settings = make_settings(DEMO_MODELS)
    assert gunicorn_options(settings, build_repository(settings))["http_parser"] == "auto"
    python = make_settings(DEMO_MODELS, server={"http_parser": "python"})
    assert gunicorn_options(python, build_repository(python))["http_parser"] == "python"
