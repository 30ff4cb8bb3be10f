"""gunicorn's server hooks: the worker's runner, readiness markers, the listening line."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from structlog.testing import capture_logs

from app.models.runner import CooperativeRunner, Runner
from app.server import hooks
from app.server.gevent_worker import GeventWorker
from app.server.state import ServingState
from tests.conftest import DEMO_MODELS, make_settings


def test_a_new_worker_brings_its_runner(tmp_path: Path) -> None:
    app = SimpleNamespace(state=SimpleNamespace(settings=make_settings(DEMO_MODELS)), runner=Runner)
    hooks.post_fork(SimpleNamespace(app=app), SimpleNamespace(runner=CooperativeRunner, age=1))
    assert app.runner is CooperativeRunner


def test_readiness_markers_come_and_go(tmp_path: Path) -> None:
    (tmp_path / "ready").mkdir()
    app = SimpleNamespace(runtime=tmp_path)
    hooks.post_worker_init(SimpleNamespace(app=app))
    (marker,) = (tmp_path / "ready").iterdir()
    hooks.child_exit(SimpleNamespace(app=app), SimpleNamespace(pid=int(marker.name)))
    assert not marker.exists()


def test_ready_says_where_it_listens_and_that_the_api_is_open() -> None:
    from app.keys import KeyStore
    from app.wsgi import build_repository

    settings = make_settings(DEMO_MODELS)
    state = ServingState(settings, build_repository(settings), KeyStore(), None, 0)
    cfg = SimpleNamespace(
        worker_class_str="app.server.gevent_worker.GeventWorker", threads=1, worker_connections=9
    )
    server = SimpleNamespace(app=SimpleNamespace(state=state), LISTENERS=["unix:/x"], cfg=cfg)
    with capture_logs() as logs:
        hooks.when_ready(server)
    listening, open_api = logs
    assert listening["event"] == "listening" and listening["worker_class"] == "gevent"
    assert open_api["event"] == "auth_open"
    assert hooks.WORKER_CLASSES["gevent"].endswith(GeventWorker.__name__)
