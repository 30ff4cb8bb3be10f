"""The gunicorn internals the appliance relies on are still what they were written against.

A failure here means a gunicorn upgrade changed something `app/server` depends on: review
``app/server/compat.py``, ``GeventWorker.run`` (a copy of gunicorn's loop) and
``ApplianceWorker.handle_error`` (gunicorn's status mapping) against the new code, then
record the new fingerprints.
"""

from __future__ import annotations

import hashlib
import inspect
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gunicorn
import pytest
from gunicorn import sock, systemd, util
from gunicorn.arbiter import Arbiter
from gunicorn.config import Config
from gunicorn.glogging import Logger
from gunicorn.http.wsgi import Response
from gunicorn.workers import base, base_async, ggevent

from app.server import compat
from app.server.gevent_worker import GeventWorker
from app.server.workers import ApplianceWorker

# Source fingerprints of the gunicorn code that app/server copies or overrides.
FINGERPRINTS: dict[Callable[..., Any], str] = {
    ggevent.GeventWorker.run: "50119854ef8be38c",  # GeventWorker.run is our copy of it
    Arbiter.start: "92668bdb3e86b1af",  # uses listeners set before it runs
    base.Worker.handle_error: "75426448389bbac9",  # ApplianceWorker.handle_error replaces it
    base_async.AsyncWorker.handle_request: "913e17a9542aa70d",  # the fair wait wraps it
    base_async.AsyncWorker.handle: "6eb3b127e6ba7e84",  # its keep-alive wait is ours
}


def test_the_pinned_minor_version() -> None:
    assert gunicorn.__version__.startswith("27.0."), gunicorn.__version__


@pytest.mark.parametrize("function", list(FINGERPRINTS), ids=lambda f: f.__qualname__)
def test_the_code_app_server_copies_or_overrides_is_unchanged(function: Callable[..., Any]) -> None:
    digest = hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]
    assert digest == FINGERPRINTS[function], f"{function.__qualname__} changed upstream"


def test_listeners_are_made_by_address_type(tmp_path: Path) -> None:
    cfg = Config()
    logger = Logger(cfg)
    tcp = compat.listener(("127.0.0.1", 0), cfg, logger)
    unix = compat.listener(str(tmp_path / "s.sock"), cfg, logger)
    try:
        assert isinstance(tcp, sock.TCPSocket)
        assert tcp.sock.family == socket.AF_INET
        assert isinstance(unix, sock.UnixSocket)
        assert (tmp_path / "s.sock").is_socket()
    finally:
        tcp.close()
        unix.close()


def test_systemd_activation_is_read_without_clearing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "unset_environment" in inspect.signature(systemd.listen_fds).parameters
    monkeypatch.delenv("LISTEN_PID", raising=False)
    monkeypatch.delenv("GUNICORN_FD", raising=False)
    assert compat.inherited_listeners() is False
    monkeypatch.setenv("GUNICORN_FD", "3")
    assert compat.inherited_listeners() is True


def test_a_response_can_be_told_to_close_through_start_response() -> None:
    req = type(
        "Req", (), {"version": (1, 1), "method": "POST", "should_close": lambda self: False}
    )()
    resp = Response(req, None, type("Cfg", (), {"is_ssl": False})())
    compat.force_close(resp.start_response)
    assert resp.should_close()
    compat.force_close(lambda *a: None)  # anything else: nothing to do, no error


def test_error_writer_and_handler_signature() -> None:
    assert list(inspect.signature(util.write_nonblock).parameters)[:2] == ["sock", "data"]
    ours = inspect.signature(ApplianceWorker.handle_error).parameters
    theirs = inspect.signature(base.Worker.handle_error).parameters
    assert list(ours) == list(theirs)
    assert GeventWorker.__mro__.index(ApplianceWorker) < GeventWorker.__mro__.index(base.Worker)
