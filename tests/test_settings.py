"""Settings: file, environment and command-line overrides, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.settings import SettingsError, load_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "appliance.toml"
    path.write_text(text)
    return path


def test_defaults_are_safe(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, f'[models]\nrepository = "{tmp_path}"\n'), env={})
    assert s.server.bind == ["127.0.0.1:8000"]
    assert s.server.worker_class == "auto"
    assert s.limits.max_body_bytes == 8 * 1024 * 1024
    assert s.server.control_socket == ""
    assert s.effective_workers() >= 1
    assert s.effective_intra_op_threads() >= 1


def test_file_env_and_overrides_layer(tmp_path: Path) -> None:
    path = write(
        tmp_path, f'[models]\nrepository = "{tmp_path}"\n[server]\nworkers = 3\nthreads = 2\n'
    )
    env = {
        "ONNX_APPLIANCE_SERVER__WORKERS": "5",
        "ONNX_APPLIANCE_SERVER__BIND": '["127.0.0.1:9000", "unix:/run/x.sock"]',
        "ONNX_APPLIANCE_LOGGING__FORMAT": "console",
        "UNRELATED": "1",
    }
    s = load_settings(path, env=env, overrides={"server": {"threads": 8}})
    assert s.server.workers == 5
    assert s.server.threads == 8
    assert s.server.bind == ["127.0.0.1:9000", "unix:/run/x.sock"]
    assert s.logging.format == "console"


def test_intra_op_threads_default_is_cores_over_workers(tmp_path: Path) -> None:
    s = load_settings(
        write(tmp_path, f'[models]\nrepository = "{tmp_path}"\n[server]\nworkers = 64\n'), env={}
    )
    assert s.effective_intra_op_threads() == 1


@pytest.mark.parametrize(
    ("text", "env", "fragment"),
    [
        ("[server]\nwokers = 2\n", {}, "wokers"),
        ("[sever]\nworkers = 2\n", {}, "sever"),
        ('[server]\nworkers = "two"\n', {}, "server.workers"),
        ("[server]\nworkers = -1\n", {}, "server.workers"),
        ('[server]\nworker_class = "eventlet"\n', {}, "worker_class"),
        ("[server]\nworker_connections = 0\n", {}, "server.worker_connections"),
        ("[server]\ninline_run_us = -1\n", {}, "server.inline_run_us"),
        ('[server]\nbind = ["0.0.0.0"]\n', {}, "server.bind"),
        ("[limits]\nmax_body_bytes = 0\n", {}, "limits.max_body_bytes"),
        ("[server\n", {}, "not valid TOML"),
        ("", {"ONNX_APPLIANCE_SERVER__WORKERS": "many"}, "server.workers"),
        ("", {"ONNX_APPLIANCE_WORKERS": "2"}, "ONNX_APPLIANCE_WORKERS"),
        ("", {"ONNX_APPLIANCE_SERVER__NOPE": "2"}, "nope"),
    ],
)
def test_bad_settings_give_one_line(
    tmp_path: Path, text: str, env: dict[str, str], fragment: str
) -> None:
    path = write(
        tmp_path,
        f'[models]\nrepository = "{tmp_path}"\n' + text if not text.startswith("[models") else text,
    )
    with pytest.raises(SettingsError) as info:
        load_settings(path, env=env)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_missing_model_directory(tmp_path: Path) -> None:
    path = write(tmp_path, f'[models]\nrepository = "{tmp_path / "missing"}"\n')
    with pytest.raises(SettingsError, match=r"models\.repository .* does not exist"):
        load_settings(path, env={})


def test_explicit_config_must_exist(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", env={})


def test_documented_example_matches_the_defaults() -> None:
    from app.settings import Settings

    example = Path(__file__).resolve().parents[1] / "packaging" / "appliance.toml"
    documented = load_settings(example, env={}, check_repository=False)
    assert documented == Settings()
    text = example.read_text()
    for section in Settings.__struct_fields__:
        assert f"[{section}]" in text
        for field in getattr(Settings(), section).__struct_fields__:
            assert f"\n{field} = " in text, f"{section}.{field} is not documented"


def test_worker_model_follows_the_repository(tmp_path: Path) -> None:
    import shutil

    from app.gunicorn_conf import worker_model
    from app.wsgi import build_repository

    shutil.copytree(
        Path(__file__).resolve().parents[1] / "app" / "demo_models" / "mlp", tmp_path / "mlp"
    )
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
