"""gunicorn's server hooks: the worker's runner, readiness markers, the listening line, the
master's objects frozen before a fork."""

from __future__ import annotations

import subprocess
import sys
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


#: A "master" holding many objects forks; the child runs a full collection and reports how
#: many bytes of its memory became private (copied from the master) while it did.
_FORK_PROBE = """
import gc, os, sys
from app.server import hooks

held = [{"n": i} for i in range(300_000)]
if sys.argv[1] == "1":
    hooks.pre_fork(None, None)
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    def private():
        for line in open("/proc/self/smaps_rollup"):
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1]) * 1024
    before = private()
    gc.collect()
    os.write(write, str(private() - before).encode())
    os._exit(0)
os.waitpid(pid, 0)
print(os.read(read, 64).decode())
"""


def test_a_worker_collecting_garbage_leaves_the_masters_objects_shared() -> None:
    def copied(freeze: bool) -> int:
        done = subprocess.run(
            [sys.executable, "-c", _FORK_PROBE, "1" if freeze else "0"],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        return int(done.stdout)

    # Unfrozen, the collection writes to every object's header: all their pages are copied.
    thawed, frozen = copied(False), copied(True)
    assert thawed > 5_000_000
    assert frozen < thawed / 10
