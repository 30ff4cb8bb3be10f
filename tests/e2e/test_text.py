"""Text routes on the real server, with the official ``openai`` client and curl, directly and
through NGINX with TLS; concurrent requests batched by tokens get their own vectors."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from loadtests.edge import Edge, run_edge
from tests.e2e.conftest import Server, run_server

TEXTS = ["A man is eating food.", "A man is eating a piece of bread.", "The sky is blue today."]


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, text_models_dir: Path
) -> Iterator[tuple[Server, Edge]]:
    tmp = tmp_path_factory.mktemp("text")
    with (
        run_server(tmp, models=text_models_dir) as app,
        run_edge(tmp, app.socket_path, nginx_site_server_name="localhost") as edge,
    ):
        yield app, edge


def _client(base_url: str, ca: Path | None = None) -> openai.OpenAI:
    http = openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=ca)) if ca else None
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, http_client=http)


def _check_vectors(client: openai.OpenAI) -> np.ndarray:
    result = client.embeddings.create(model="minilm", input=TEXTS)
    assert result.model == "minilm"
    assert [d.index for d in result.data] == [0, 1, 2]
    assert result.usage.prompt_tokens > len(TEXTS)
    vectors = np.array([d.embedding for d in result.data])
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.4
    return vectors


def test_the_openai_client_directly(stack: tuple[Server, Edge]) -> None:
    app, _ = stack
    client = _client(f"{app.url}/v1")
    base64_vectors = _check_vectors(client)  # the client asks for base64 by default
    floats = client.embeddings.create(model="minilm", input=TEXTS, encoding_format="float")
    np.testing.assert_allclose([d.embedding for d in floats.data], base64_vectors, atol=1e-6)
    assert {m.id for m in client.models.list()} == {"minilm", "tabular"}
    with pytest.raises(openai.NotFoundError) as info:
        client.embeddings.create(model="nope", input="x")
    assert "nope" in str(info.value)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="minilm", input="")


def test_the_openai_client_through_nginx_with_tls(stack: tuple[Server, Edge]) -> None:
    _, edge = stack
    client = _client(f"https://localhost:{edge.https_port}/v1", edge.ca)
    _check_vectors(client)


def test_curl_through_nginx(stack: tuple[Server, Edge]) -> None:
    _, edge = stack
    headers = ["-H", "Content-Type: application/json"]
    embed = edge.curl("/embed", *headers, "-d", json.dumps({"inputs": TEXTS[0]}))
    assert embed.returncode == 0, embed.stderr
    assert np.array(json.loads(embed.stdout)).shape == (1, 384)
    tokens = edge.curl("/tokenize", *headers, "-d", '{"text": "Hello world"}')
    assert json.loads(tokens.stdout)["tokens"] == [101, 7592, 2088, 102]


def test_concurrent_requests_are_batched_and_each_gets_its_vectors(
    stack: tuple[Server, Edge],
) -> None:
    app, _ = stack
    requests_ = [
        [f"sentence number {i} about {topic}" for topic in TEXTS[: 1 + i % 3]] for i in range(48)
    ]
    session = requests.Session()

    def embed(texts: list[str]) -> np.ndarray:
        resp = requests.post(f"{app.url}/embed", json={"inputs": texts}, timeout=60)
        assert resp.status_code == 200, resp.text
        return np.array(resp.json())

    alone = [
        np.array(session.post(f"{app.url}/embed", json={"inputs": t}, timeout=60).json())
        for t in requests_
    ]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(embed, requests_))
    for got, expected in zip(together, alone, strict=True):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    metrics = requests.get(f"{app.url}/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    tokens = sum(
        s.value for s in families["onnx_appliance_tokens"].samples if s.name.endswith("_total")
    )
    assert tokens >= 2 * sum(len(t) for t in requests_) * 5  # every request counted, twice
    runs = next(
        s.value
        for s in families["onnx_appliance_batch_tokens"].samples
        if s.name.endswith("_count") and s.labels.get("model") == "minilm"
    )
    texts_sent = 2 * sum(len(t) for t in requests_)
    assert runs < texts_sent  # texts of several requests shared runs
