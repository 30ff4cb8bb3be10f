"""The gevent worker under a real gunicorn: keep-alive connections are served in turn, and a
stopping worker lets go of its idle ones at once."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import time
import urllib.request
from collections import Counter
from pathlib import Path

from tests.conftest import DEMO_MODELS
from tests.e2e.conftest import Server, children, run_server, wait_for_event
from tests.e2e.test_drills import stack, traffic

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


def unix_connection(server: Server) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(server.socket_path)
    return sock


def test_a_stopping_worker_closes_idle_unix_socket_connections_at_once(tmp_path: Path) -> None:
    # gunicorn's own gevent worker keeps an idle connection until `keepalive` (5 s) runs out
    # and answers one more request on it meanwhile, from the old workers after a reload.
    with run_server(tmp_path, workers=1) as server:
        idle, tcp = unix_connection(server), socket.create_connection(("127.0.0.1", server.port))
        with idle, tcp:
            for sock in (idle, tcp):
                sock.sendall(request("before"))
                assert b" 200 OK" in read_responses(sock, 1)
            server.process.send_signal(signal.SIGHUP)
            wait_for_event(server, "reload_complete")
            stopped = time.monotonic()
            idle.settimeout(4)
            assert idle.recv(1024) == b""  # closed without an answer, not timed out
            closed_after = time.monotonic() - stopped
            # On TCP the client may not retry: one more request is answered, then the close.
            tcp.sendall(request("after"))
            answer = read_responses(tcp, 1)
            assert b" 200 OK" in answer and b"connection: close" in answer.lower()
        fresh = unix_connection(server)
        with fresh:
            fresh.sendall(request("fresh"))
            assert b" 200 OK" in read_responses(fresh, 1)  # the new worker serves
    assert closed_after < 1.0, closed_after


def test_after_a_reload_pooled_nginx_connections_reach_the_new_version(tmp_path: Path) -> None:
    # NGINX keeps idle connections to the old workers; none may answer after the reload.
    models = tmp_path / "models"
    shutil.copytree(DEMO_MODELS / "tabular", models / "tabular")
    (models / "tabular" / "model.toml").unlink()  # the newest version serves
    with stack(tmp_path, models) as (app, edge):
        with traffic(edge, threads=16, max_seconds=1.0) as load:
            time.sleep(1.0)  # fills NGINX's pool of upstream connections
        before = load.stop()
        shutil.copytree(models / "tabular" / "1", models / "tabular" / "3")
        app.process.send_signal(signal.SIGHUP)
        wait_for_event(app, "reload_complete")
        time.sleep(0.2)
        with traffic(edge, threads=16, max_seconds=1.0) as load:
            time.sleep(1.0)
        after = load.stop()
    assert before.failed == 0 and {r.version for r in before.records} == {"2"}
    assert after.sent > 100 and after.failed == 0, after.failures()[:5]
    assert Counter(r.version for r in after.records) == {"3": after.sent}


def test_workers_load_onnxruntime_themselves_and_exit_cleanly(tmp_path: Path) -> None:
    """onnxruntime is imported after fork: a worker forked from a master that had imported it
    would abort at exit (onnxruntime's import starts a thread the fork does not copy)."""

    def predict() -> int:
        post = urllib.request.Request(
            f"{server.url}/v2/models/tabular/infer",
            data=BODY,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(post, timeout=30) as answer:
            return int(answer.status)

    def maps(pid: int) -> str:
        return Path(f"/proc/{pid}/maps").read_text()

    conf = "intra_op_threads = 2\nmax_requests = 15"
    with run_server(tmp_path, server_conf=conf) as server:
        wait_for_event(server, "worker_ready", 2)  # both, not just the first to answer
        master = server.process.pid
        workers = children(master)
        assert len(workers) == 2
        assert "onnxruntime" not in maps(master)
        assert all("onnxruntime_pybind11_state" in maps(pid) for pid in workers)
        # A worker recycled (max_requests), then a reload.
        assert [predict() for _ in range(60)] == [200] * 60
        deadline = time.monotonic() + 30
        while set(workers) == set(children(master)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert set(workers) != set(children(master))
        server.process.send_signal(signal.SIGHUP)
        wait_for_event(server, "reload_complete")
        assert [predict() for _ in range(10)] == [200] * 10
        assert "onnxruntime" not in maps(master)
        deadline = time.monotonic() + 30  # the old workers gone before the stop
        while len(children(master)) > 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    assert server.process.returncode == 0
    # Every line is JSON (no C++ abort text on stderr), and no worker aborted or failed. (An
    # old worker may be told SIGTERM again while it exits, which gunicorn notes at info.)
    events = [line["event"] for line in server.log_lines()]
    assert not [e for e in events if "exited with code" in e]
    assert not [e for e in events if "was sent" in e and not e.endswith("SIGTERM!")]
    assert sum(1 for e in events if e.startswith("Worker exiting")) >= 5
