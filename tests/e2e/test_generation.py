"""Generation on the real server (gunicorn's gevent worker) behind NGINX with TLS, and behind
the load balancer template in front of that: the official ``openai`` client, curl, a WebSocket
client, event streams that arrive token by token, clients that leave mid-stream, overload,
deadlines, and probes answered meanwhile."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
import simple_websocket
from prometheus_client.parser import text_string_to_metric_families

from loadtests.edge import Edge, run_edge, run_lb
from tests.e2e.conftest import Server, run_server

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
SEQUENCES = 2  # per worker, in this stack's model.toml
QUEUE = 1


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, generation_models_dir: Path
) -> Iterator[tuple[Server, Edge]]:
    tmp = tmp_path_factory.mktemp("generation")
    models = tmp / "models"
    shutil.copytree(generation_models_dir, models)
    toml = models / "smollm2" / "model.toml"
    toml.write_text(toml.read_text() + f"max_sequences = {SEQUENCES}\nmax_queue = {QUEUE}\n")
    with (
        run_server(tmp, models=models, workers=1) as app,
        run_edge(tmp, app.socket_path, nginx_site_server_name="localhost") as edge,
    ):
        yield app, edge


@pytest.fixture(scope="module")
def lb(tmp_path_factory: pytest.TempPathFactory, stack: tuple[Server, Edge]) -> Iterator[Edge]:
    """The load balancer template in front of the stack's NGINX (TLS both ways)."""
    with run_lb(tmp_path_factory.mktemp("generation-lb"), stack[1]) as balancer:
        yield balancer


@pytest.fixture(params=["site", "load balancer"])
def front(request: pytest.FixtureRequest, stack: tuple[Server, Edge]) -> Edge:
    """The NGINX a client talks to: the appliance's own site, or the load balancer before it."""
    if request.param == "site":
        return stack[1]
    edge: Edge = request.getfixturevalue("lb")
    return edge


def _openai(base_url: str, ca: Path | None = None) -> openai.OpenAI:
    http = openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=ca)) if ca else None
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, http_client=http)


def _generated(app: Server) -> float:
    return _metric(app, "onnx_appliance_generated_tokens", "_total")


def _metric(app: Server, family: str, suffix: str = "") -> float:
    text = requests.get(f"{app.url}/metrics", timeout=10).text
    for f in text_string_to_metric_families(text):
        if f.name == family:
            return sum(s.value for s in f.samples if s.name == family + suffix)
    return 0.0


def _stream(url: str, body: dict[str, Any], **extra: Any) -> requests.Response:
    resp = requests.post(url, json={**body, "stream": True}, stream=True, timeout=60, **extra)
    assert resp.status_code == 200, resp.text
    return resp


def test_the_openai_client_through_nginx_with_tls(front: Edge) -> None:
    edge = front
    client = _openai(f"https://localhost:{edge.https_port}/v1", edge.ca)
    chat = client.chat.completions.create(model="smollm2", messages=CHAT, temperature=0)  # type: ignore[arg-type]
    answer = chat.choices[0].message.content or ""
    assert "Paris" in answer
    assert chat.usage is not None and chat.usage.completion_tokens > 0
    chunks = client.chat.completions.create(
        model="smollm2",
        messages=CHAT,  # type: ignore[arg-type]
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    streamed, usage = [], None
    for chunk in chunks:
        if chunk.choices:
            streamed.append(chunk.choices[0].delta.content or "")
        usage = chunk.usage or usage
    assert "".join(streamed) == answer
    assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens
    whole = client.completions.create(
        model="smollm2", prompt="1, 2, 3,", max_tokens=12, temperature=0
    )
    pieces = client.completions.create(
        model="smollm2", prompt="1, 2, 3,", max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in pieces if c.choices) == whole.choices[0].text
    assert whole.choices[0].text.startswith(" 4, 5,")
    assert "smollm2" in {m.id for m in client.models.list()}
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="smollm2", prompt="x", max_tokens=100_000)


def test_curl_streams_events_through_nginx(front: Edge) -> None:
    edge = front
    body = json.dumps({"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0})
    out = edge.curl(
        "/generate", "-N", "-H", "Content-Type: application/json", "-H",
        "Accept: text/event-stream", "-H", "Accept-Encoding: gzip", "-d", body, "-D", "-",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    head, _, events = out.stdout.partition("\n\n")  # text mode: \r\n read as \n
    assert "content-type: text/event-stream" in head.lower()
    assert "content-encoding" not in head.lower()
    assert events.count("event: token\n") == 5
    done = events.split("event: done\ndata: ", 1)[1]
    assert json.loads(done)["text"].startswith(" Paris")


def test_tokens_arrive_one_by_one_through_nginx(front: Edge) -> None:
    edge = front
    resp = _stream(
        edge.url("/generate"),
        {"prompt": "Once upon a time", "max_tokens": 80, "temperature": 0},
        verify=str(edge.ca),
    )
    edge_name = edge.name
    assert edge_name == "localhost"
    arrivals = []
    for line in resp.iter_lines():
        if line.startswith(b"event: "):
            arrivals.append((line[7:].decode(), time.monotonic()))
    kinds = [k for k, _ in arrivals]
    assert kinds == ["token"] * 80 + ["done"]
    # Buffered, every event would land at once; streamed, they spread over the generation.
    span = arrivals[-1][1] - arrivals[0][1]
    assert span > 0.2
    assert arrivals[40][1] - arrivals[0][1] > span / 4


def test_a_websocket_client_through_nginx(front: Edge) -> None:
    edge = front
    context = ssl.create_default_context(cafile=edge.ca)
    ws = simple_websocket.Client.connect(
        f"wss://localhost:{edge.https_port}/ws", ssl_context=context
    )
    try:
        ws.send(
            json.dumps({"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0})
        )
        messages = [json.loads(ws.receive(timeout=30)) for _ in range(5)]
        assert [m["event"] for m in messages] == ["token"] * 4 + ["done"]
        assert messages[-1]["text"] == "".join(m["text"] for m in messages[:4])
        ws.send(json.dumps({"prompt": "x", "temperature": -1}))
        error = json.loads(ws.receive(timeout=30))
        assert error["event"] == "error"
        assert error["error_code"] == "INVALID_INPUT"
        ws.send(json.dumps({"prompt": "Hi", "max_tokens": 1}))  # the connection goes on
        assert json.loads(ws.receive(timeout=30))["event"] == "token"
        assert json.loads(ws.receive(timeout=30))["event"] == "done"
    finally:
        _close(ws)


def _close(ws: simple_websocket.Client) -> None:
    """Close as the protocol says, then wait for the client's reader thread to end.

    ``Client.close`` closes the socket while that thread may be about to read from its
    descriptor; the next connection this process opens can get the same number, and the
    thread then takes that connection's first bytes (seen as torn /metrics answers and failed
    TLS handshakes in the tests after this one). The server answers a close and hangs up, so
    the thread ends on its own.
    """
    simple_websocket.ws.Base.close(ws)
    ws.thread.join(timeout=10)
    ws.sock.close()


def _wait_idle(app: Server) -> float:
    """Wait until no sequence is generating; the generated-token count then."""
    deadline = time.monotonic() + 30
    while _metric(app, "onnx_appliance_active_sequences") > 0:
        assert time.monotonic() < deadline, "sequences still active"
        time.sleep(0.05)
    return _generated(app)


@pytest.mark.parametrize("route", ["direct", "nginx"])
def test_a_client_that_leaves_stops_its_generation(stack: tuple[Server, Edge], route: str) -> None:
    app, edge = stack
    before = _wait_idle(app)
    url, extra = (
        (f"{app.url}/generate", {})
        if route == "direct"
        else (edge.url("/generate"), {"verify": str(edge.ca)})
    )
    resp = _stream(
        url, {"prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0}, **extra
    )
    lines = resp.iter_lines()
    tokens = 0
    while tokens < 3:
        tokens += next(lines).startswith(b"event: token")
    resp.close()  # the client goes away mid-stream
    after = _wait_idle(app)
    assert after - before < 300  # of 1500 asked for
    time.sleep(0.5)
    assert _generated(app) == after  # nothing generates for it any more


def test_beyond_the_sequences_and_the_queue_requests_are_shed(stack: tuple[Server, Edge]) -> None:
    app, _ = stack
    _wait_idle(app)
    long = {"prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0}
    held = [_stream(f"{app.url}/generate", long) for _ in range(SEQUENCES + QUEUE)]
    try:
        refused = requests.post(f"{app.url}/generate", json=long, timeout=30)
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "1"
        assert refused.json()["error_code"] == "OVERLOADED"
    finally:
        for resp in held:
            resp.close()
    # The clients left: their sequences end at their next token, and there is room again.
    deadline = time.monotonic() + 10
    while True:
        ok = requests.post(f"{app.url}/generate", json={**long, "max_tokens": 2}, timeout=30)
        if ok.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert ok.status_code == 200, ok.text


def test_the_deadline_ends_streams_and_answers(stack: tuple[Server, Edge]) -> None:
    app, _ = stack
    long = {"prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0}
    headers = {"X-Request-Timeout-Ms": "400"}
    whole = requests.post(f"{app.url}/generate", json=long, headers=headers, timeout=30)
    assert whole.status_code == 504
    assert whole.json()["error_code"] == "TIMEOUT"
    stream = _stream(f"{app.url}/generate", long, headers=headers)
    text = stream.text
    assert "event: error" in text
    assert '"error_code":"TIMEOUT"' in text
    assert 0 < text.count("event: token") < 1500


def test_probes_are_answered_during_long_generations(stack: tuple[Server, Edge]) -> None:
    app, _ = stack
    _wait_idle(app)
    body = {"prompt": "Once upon a time", "max_tokens": 300, "temperature": 0}
    finished = threading.Event()

    def generate() -> None:
        requests.post(f"{app.url}/generate", json=body, timeout=60)
        finished.set()

    threads = [threading.Thread(target=generate) for _ in range(SEQUENCES)]
    for thread in threads:
        thread.start()
    waits = []
    try:
        time.sleep(0.3)
        while not finished.is_set() and len(waits) < 40:
            start = time.monotonic()
            with socket.create_connection(("127.0.0.1", app.port), timeout=5) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert sock.recv(64).startswith(b"HTTP/1.1 200")
            waits.append(time.monotonic() - start)
            time.sleep(0.02)
    finally:
        for thread in threads:
            thread.join(timeout=60)
    assert len(waits) >= 10
    # A decoding step takes milliseconds and runs in a helper thread: the worker's own
    # thread answers probes between (not after) the generations' steps.
    assert max(waits) < 0.5, waits


def test_generation_metrics_are_exported(stack: tuple[Server, Edge]) -> None:
    app, _ = stack
    requests.post(f"{app.url}/generate", json={"prompt": "Hi", "max_tokens": 3}, timeout=30)
    assert _metric(app, "onnx_appliance_time_to_first_token_seconds", "_count") > 0
    assert _metric(app, "onnx_appliance_inter_token_latency_seconds", "_count") > 0
    assert _metric(app, "onnx_appliance_prompt_tokens", "_total") > 0
    assert _generated(app) > 0
