"""Request bodies on the real server: chunked, compressed, oversized and slow ones, and the
errors gunicorn itself answers, for every worker class."""

from __future__ import annotations

import gzip
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.e2e.conftest import Server, json_lines, run_server

INFER = "/v2/models/regression/infer"
BODY = json.dumps(
    {"inputs": [{"name": "input", "shape": [1, 10], "datatype": "FP32", "data": [0.01] * 10}]}
).encode()
LIMIT = 4096
BODY_TIMEOUT_S = 1.0
BODY_TIMEOUT_MS = int(BODY_TIMEOUT_S * 1000)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool  # the server closed the connection after the reply

    def json(self) -> dict[str, str]:
        assert self.headers["content-type"] == "application/json", self
        doc: dict[str, str] = json.loads(self.body)
        assert set(doc) == {"error", "error_code", "request_id"} or "outputs" in doc, doc
        return doc


def read_reply(sock: socket.socket, timeout: float = 10) -> Reply:
    """One HTTP reply (Content-Length framed), and whether the connection closed after it."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a reply: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the body"
        rest += chunk
    try:
        sock.settimeout(2)
        closed = sock.recv(1) == b""
    except ConnectionResetError:  # closed with our unread bytes still in its buffer
        closed = True
    except TimeoutError:
        closed = False
    return Reply(int(lines[0].split()[1]), headers, rest[:length], closed)


def exchange(server: Server, data: bytes) -> Reply:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(data)
        return read_reply(sock)


def chunked(body: bytes, size: int = 1000) -> bytes:
    parts = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


def post(headers: str, body: bytes = b"") -> bytes:
    return (
        f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}\r\n"
    ).encode() + body


@pytest.fixture(scope="module", params=["gevent", "gthread", "sync"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One worker with a small body limit and a short body timeout."""
    with run_server(
        tmp_path_factory.mktemp(f"bodies-{request.param}"),
        "--worker-class",
        request.param,
        workers=1,
        config=f"[limits]\nmax_body_bytes = {LIMIT}\nbody_timeout_ms = {BODY_TIMEOUT_MS}\n",
    ) as running:
        running.extra["worker_class"] = request.param
        yield running


def test_a_chunked_body_is_read_like_a_sized_one(server: Server) -> None:
    sized = exchange(server, post(f"Content-Length: {len(BODY)}\r\n", BODY))
    reply = exchange(server, post("Transfer-Encoding: chunked\r\n", chunked(BODY, 50)))
    assert reply.status == 200, reply
    assert reply.json()["outputs"] == sized.json()["outputs"]


@pytest.mark.parametrize("framing", ["chunked", "sized"])
def test_an_oversized_body_gets_413_and_the_connection_closes(server: Server, framing: str) -> None:
    big = b'{"pad": "' + b"x" * (4 * LIMIT) + b'"}'
    if framing == "chunked":
        request = post("Transfer-Encoding: chunked\r\n", chunked(big))
    else:
        request = post(f"Content-Length: {len(big)}\r\n", big)
    reply = exchange(server, request)
    assert reply.status == 413, reply
    assert reply.json()["error_code"] == "PAYLOAD_TOO_LARGE"
    assert reply.headers["connection"] == "close"
    assert reply.closed  # not kept open to drain the rest of the body


def test_a_gzip_body_is_decoded_within_the_limit(server: Server) -> None:
    packed = gzip.compress(BODY)
    reply = exchange(
        server, post(f"Content-Encoding: gzip\r\nContent-Length: {len(packed)}\r\n", packed)
    )
    assert reply.status == 200, reply
    bomb = gzip.compress(b'{"pad": "' + b"0" * (100 * LIMIT) + b'"}')
    assert len(bomb) < LIMIT  # small on the wire, 100x the limit decoded
    reply = exchange(
        server, post(f"Content-Encoding: gzip\r\nContent-Length: {len(bomb)}\r\n", bomb)
    )
    assert reply.status == 413, reply
    assert "decoded" in reply.json()["error"]


def test_a_body_sent_too_slowly_gets_408_within_the_body_timeout(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(post("Content-Length: 100\r\n", b"{"))  # then nothing more
        start = time.monotonic()
        reply = read_reply(sock, timeout=BODY_TIMEOUT_S + 5)
        took = time.monotonic() - start
    assert reply.status == 408, reply
    assert reply.json()["error_code"] == "REQUEST_TIMEOUT"
    assert reply.closed
    assert BODY_TIMEOUT_S * 0.9 <= took < BODY_TIMEOUT_S + 4


def test_a_trickled_body_is_cut_off_at_the_body_timeout(server: Server) -> None:
    """The bound is on the whole body, not on each wait for the next bytes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(post("Transfer-Encoding: chunked\r\n"))
        start = time.monotonic()
        deadline = start + BODY_TIMEOUT_S + 5
        while time.monotonic() < deadline:
            try:
                sock.sendall(b"1\r\n \r\n")  # one byte every 0.2 s: never idle for long
            except OSError:
                break
            time.sleep(0.2)
            sock.settimeout(0.01)
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    break
            except TimeoutError:
                continue
        reply = read_reply(sock)
        took = time.monotonic() - start
    assert reply.status == 408, reply
    assert took < BODY_TIMEOUT_S + 2


def test_slow_bodies_cannot_hold_every_connection(tmp_path: Path) -> None:
    """One worker of 8 connections: 8 clients stalling their bodies held it for ever."""
    with run_server(
        tmp_path,
        workers=1,
        server_conf="worker_connections = 8",
        config=f"[limits]\nbody_timeout_ms = {BODY_TIMEOUT_MS}\n",
    ) as server:
        stalled = [
            socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(8)
        ]
        try:
            for sock in stalled:
                sock.sendall(post("Content-Length: 100\r\n", b"{"))
            time.sleep(0.2)
            start = time.monotonic()
            reply = exchange(server, post(f"Content-Length: {len(BODY)}\r\n", BODY))
            took = time.monotonic() - start
            assert reply.status == 200
            assert took < BODY_TIMEOUT_S + 3
            assert all(read_reply(sock).status == 408 for sock in stalled)
        finally:
            for sock in stalled:
                sock.close()


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (b"GARBAGE\r\n\r\n", 400, "INVALID_INPUT"),
        (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "URI_TOO_LONG"),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-%d: y\r\n" % i for i in range(120))
            + b"\r\n",
            431,
            "HEADERS_TOO_LARGE",
        ),
        (
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
            b"Transfer-Encoding: chunked\r\nX-Request-ID: smuggler-1\r\n\r\n0\r\n\r\n",
            400,
            "INVALID_INPUT",
        ),
    ],
)
def test_gunicorns_own_errors_are_json_with_a_request_id(
    server: Server, request_bytes: bytes, status: int, code: str
) -> None:
    reply = exchange(server, request_bytes)
    assert reply.status == status, reply
    doc = reply.json()
    assert doc["error_code"] == code
    assert doc["request_id"] == reply.headers["x-request-id"] != ""
    assert "<html" not in reply.body.decode().lower()
    assert reply.closed

    def refusals() -> list[tuple[str, int]]:
        lines = json_lines(server.log_path)
        return [
            (x["event"], x["status"]) for x in lines if x.get("request_id") == doc["request_id"]
        ]

    wait_until(refusals, "the refusal's log line")
    assert refusals() == [("bad_request", status)]


@pytest.fixture(scope="module")
def parsers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    """The same server with gunicorn's C request parser (gunicorn_h1c) and its Python one."""
    with (
        run_server(tmp_path_factory.mktemp("parser-fast"), workers=1,
                   server_conf='http_parser = "fast"') as fast,
        run_server(tmp_path_factory.mktemp("parser-python"), workers=1,
                   server_conf='http_parser = "python"') as python,
    ):  # fmt: skip
        yield {"fast": fast, "python": python}


def answer(server: Server, data: bytes) -> tuple[int | None, str | None, bool]:
    """Status, error code and whether the connection closed; (None, None, True) for a close
    without any answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(data)
        try:
            reply = read_reply(sock)
        except AssertionError as exc:
            assert "closed before a reply" in str(exc), exc
            return None, None, True
    code = reply.json().get("error_code") if reply.status >= 400 else None
    return reply.status, code, reply.closed


HOSTILE = {
    "two different Content-Length": post("Content-Length: 5\r\nContent-Length: 6\r\n", BODY),
    "two equal Content-Length": post("Content-Length: 2\r\nContent-Length: 2\r\n", b"{}"),
    "Content-Length with a sign": post("Content-Length: +2\r\n", b"{}"),
    "Content-Length and Transfer-Encoding": post(
        "Content-Length: 2\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"
    ),
    "chunked twice": post("Transfer-Encoding: chunked, chunked\r\n", b"0\r\n\r\n"),
    "an unknown transfer coding": post("Transfer-Encoding: zstd\r\n", b"0\r\n\r\n"),
    "a bad chunk size": post("Transfer-Encoding: chunked\r\n", b"zz\r\n{}\r\n0\r\n\r\n"),
    "obsolete line folding": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
    "a space before the colon": b"GET /healthz HTTP/1.1\r\nHost : x\r\n\r\n",
    "a NUL in a header value": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "bare LF line ends": b"GET /healthz HTTP/1.1\nHost: x\n\n",
    "an over-long request line": b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "an over-long header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 9000 + b"\r\n\r\n",
    "too many headers": b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
    + b"".join(b"X-%d: y\r\n" % i for i in range(120))
    + b"\r\n",
    "an unknown HTTP version": b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n",
    "a lower-case method": b"get /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_both_parsers_give_hostile_requests_the_same_safe_answer(
    parsers: dict[str, Server], name: str
) -> None:
    fast, python = (answer(parsers[p], HOSTILE[name]) for p in ("fast", "python"))
    assert fast == python, f"fast {fast}, python {python}"
    status, _, closed = fast
    assert status in (400, 414, 431, 501), fast  # refused, and never a 500
    assert closed  # nothing after a refused request is read as a next request
    for server in parsers.values():  # and the worker still serves
        ok = post(f"Content-Length: {len(BODY)}\r\nConnection: close\r\n", BODY)
        assert answer(server, ok) == (200, None, True)
