"""What every worker class shares: the runner it asks for, and gunicorn's refusals as JSON."""

from __future__ import annotations

import json
import socket

import pytest
from gunicorn.http import errors as http_errors
from structlog.testing import capture_logs

from app.models.runner import CooperativeRunner, Runner
from app.server.gevent_worker import GeventWorker
from app.server.workers import ApplianceWorker, SyncWorker, ThreadWorker, error_status


def test_each_worker_class_asks_for_its_runner() -> None:
    assert ThreadWorker.runner is Runner
    assert SyncWorker.runner is Runner
    assert GeventWorker.runner is CooperativeRunner


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (http_errors.InvalidRequestLine("x"), 400),
        (http_errors.LimitRequestLine(5000, 4094), 414),
        (http_errors.LimitRequestHeaders("too many"), 431),
        (http_errors.UnsupportedTransferCoding("gzip"), 501),
        (http_errors.InvalidHeader("CONTENT-LENGTH"), 400),
        (http_errors.InvalidHeader("Unsupported Transfer-Encoding"), 501),  # gunicorn_h1c's
        (http_errors.InvalidResponseHeader("x"), 500),
        (ValueError("app bug"), 500),
    ],
)
def test_statuses_follow_gunicorns(error: Exception, status: int) -> None:
    assert error_status(error)[0] == status


def _refusal(req: object, error: Exception) -> tuple[bytes, list[dict[str, object]]]:
    server, client = socket.socketpair()
    with server, client, capture_logs() as logs:
        ApplianceWorker().handle_error(req, server, ("10.0.0.1", 5), error)
        server.shutdown(socket.SHUT_WR)
        reply = b"".join(iter(lambda: client.recv(65536), b""))
    return reply, logs


def test_a_refusal_is_the_json_error_body_with_the_clients_request_id() -> None:
    req = type("Req", (), {"headers": [("X-REQUEST-ID", "abc-1")]})()
    reply, logs = _refusal(req, http_errors.LimitRequestLine(5000, 4094))
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 414 URI Too Long\r\n")
    assert b"Connection: close" in head and b"X-Request-ID: abc-1" in head
    doc = json.loads(body)
    assert doc["error_code"] == "URI_TOO_LONG" and doc["request_id"] == "abc-1"
    assert [(x["event"], x["status"], x["request_id"]) for x in logs] == [
        ("bad_request", 414, "abc-1")
    ]


def test_an_unexpected_failure_tells_the_client_nothing_of_it() -> None:
    reply, logs = _refusal(None, RuntimeError("secret /etc/path"))
    body = json.loads(reply.partition(b"\r\n\r\n")[2])
    assert body["error_code"] == "INTERNAL"
    assert "secret" not in reply.decode()
    assert logs[0]["event"] == "unhandled_error"
    assert len(body["request_id"]) == 32  # a fresh one, as no request was read
