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
from gunicorn.http import wsgi
from gunicorn.http.parser import RequestParser
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
    # CoalescingResponse overrides these; create() must look the class up per request.
    Response.default_headers: "cb490cea5d6f5408",
    Response.send_headers: "7aff3b7d004fc17b",
    Response.write: "a13659ff072c00e1",
    Response._emit_body: "df723e865a1e5adc",
    Response.write_file: "dbbc6333931219cc",
    Response.close: "1e78fc7777ff09ae",
    wsgi.create: "2c35d4a2dc629ede",
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


class _CountingSocket(socket.socket):
    """A real socket that counts its writes."""

    writes = 0

    def sendall(self, data: Any, *args: Any) -> None:
        self.writes += 1
        super().sendall(data, *args)


def _answer(
    monkeypatch: pytest.MonkeyPatch, request: bytes, body: list[bytes]
) -> tuple[int, bytes]:
    """Serve ``request`` with gunicorn's parser and response over a socket pair, the way a
    worker does after ``coalesce_writes``; the number of writes and what the client got."""
    monkeypatch.setattr(wsgi, "Response", wsgi.Response)  # restored after the test
    compat.coalesce_writes()
    left, right = socket.socketpair()
    server = _CountingSocket(fileno=right.detach())
    with left, server:
        left.sendall(request)
        cfg = Config()
        req = next(iter(RequestParser(cfg, server, ("127.0.0.1", 1))))
        resp, _ = wsgi.create(req, server, ("127.0.0.1", 1), ("127.0.0.1", 80), cfg)
        assert isinstance(resp, compat.CoalescingResponse)
        length = [("Content-Length", str(sum(map(len, body))))] if len(body) == 1 else []
        resp.start_response("200 OK", [("Content-Type", "text/plain"), *length])
        for piece in body:
            resp.write(piece)
        resp.close()
        server.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := left.recv(65536):
            received += chunk
        return server.writes, received


def test_headers_go_out_with_the_first_body_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    get = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"
    writes, received = _answer(monkeypatch, get, [b"hello"])
    assert writes == 1
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: 5" in head
    assert body == b"hello"
    # Streamed (chunked): the first chunk rides with the headers, the others follow.
    writes, received = _answer(monkeypatch, get, [b"ab", b"cde"])
    assert writes == 3  # headers + first chunk, second chunk, the last (empty) chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert body == b"2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"
    # No body at all (HEAD): the headers still go out, once.
    writes, received = _answer(monkeypatch, b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n", [b""])
    assert writes == 1
    assert received.startswith(b"HTTP/1.1 200 OK\r\n") and received.endswith(b"\r\n\r\n")


@pytest.mark.parametrize("close", [False, True])
@pytest.mark.parametrize("chunked", [False, True])
def test_default_headers_are_gunicorns_with_a_cached_date(
    monkeypatch: pytest.MonkeyPatch, close: bool, chunked: bool
) -> None:
    monkeypatch.setattr(wsgi, "Response", wsgi.Response)  # restored after the test
    compat.coalesce_writes()
    left, right = socket.socketpair()
    with left, right:
        left.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        cfg = Config()
        req = next(iter(RequestParser(cfg, right, ("127.0.0.1", 1))))
        resp, _ = wsgi.create(req, right, ("127.0.0.1", 1), ("127.0.0.1", 80), cfg)
        resp.start_response("200 OK", [("Content-Type", "text/plain")])
        resp.chunked = chunked
        if close:
            resp.force_close()
        clock = [1_700_000_000.2]
        monkeypatch.setattr(compat.time, "time", lambda: clock[0])
        monkeypatch.setattr(gunicorn.util.time, "time", lambda: clock[0])
        assert resp.default_headers() == Response.default_headers(resp)
        first = compat.http_date()
        clock[0] += 0.5  # the same second: the same text, not formatted again
        assert compat.http_date() is first
        clock[0] += 1
        assert compat.http_date() == "Tue, 14 Nov 2023 22:13:21 GMT"
        assert resp.default_headers() == Response.default_headers(resp)
