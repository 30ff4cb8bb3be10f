"""The gevent worker under a real gunicorn: keep-alive connections are served in turn."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from tests.e2e.conftest import Server, run_server

BODY = json.dumps(
    {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [0.5] * 30}]}
).encode()


def request(request_id: str) -> bytes:
    return (
        f"POST /v2/models/tabular/infer HTTP/1.1\r\nHost: t\r\nX-Request-ID: {request_id}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY


def read_responses(sock: socket.socket, count: int, buffer: bytes = b"") -> bytes:
    """Read until ``count`` complete responses (each with a Content-Length body) arrived."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, rest = 0, buffer
        while (end := rest.find(b"\r\n\r\n")) >= 0:
            head = rest[:end].decode().lower()
            length = int(head.split("content-length:")[1].split("\r\n")[0])
            if len(rest) < end + 4 + length:
                break
            rest, done = rest[end + 4 + length :], done + 1
        if done >= count:
            return buffer
        buffer += sock.recv(1 << 20)
    raise AssertionError(f"only part of {count} responses in 60 s")


def request_order(server: Server, expected: int) -> list[str]:
    """Request ids in the order the worker logged them (waits for the batched log writer)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ids = [
            x["request_id"]
            for x in server.log_lines()
            if x.get("event") == "request" and x["request_id"].startswith(("a-", "b-"))
        ]
        if len(ids) >= expected:
            return ids
        time.sleep(0.05)
    raise AssertionError(f"{expected} request lines not logged")


def test_a_busy_keepalive_connection_does_not_starve_another(tmp_path: Path) -> None:
    # A's greenlet finds its next request already buffered after each answer, so without
    # taking turns it would answer all of them before it let B's greenlet run.
    pipelined = 300
    with run_server(tmp_path, workers=1) as server:
        a = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        b = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        with a, b:
            for sock, name in ((a, "a-warm"), (b, "b-warm")):
                sock.sendall(request(name))
                read_responses(sock, 1)
            a.sendall(b"".join(request(f"a-{i}") for i in range(pipelined)))
            first = a.recv(1 << 20)  # A is being served now
            b.sendall(request("b-late"))
            assert b" 200 OK" in read_responses(b, 1)
            answers = read_responses(a, pipelined, first)
        assert answers.count(b" 200 OK") == pipelined
        order = request_order(server, pipelined + 3)
        listening = next(x for x in server.log_lines() if x.get("event") == "listening")
    assert listening["worker_class"] == "gevent"  # the default
    served_after_b = len(order) - 1 - order.index("b-late")
    # Taking turns, B waits for about one of A's requests; without, for all of them.
    assert served_after_b > pipelined // 2, (served_after_b, order[:5])
