"""Text routes on the real MiniLM: OpenAI, TEI and LLM-layer shapes, tokenization, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from falcon.testing import TestClient, create_environ

from app.metrics import Metrics
from app.server.application import closing_connections
from app.wsgi import build_repository, create_app
from tests.conftest import make_settings
from tests.resources.test_errors import assert_error

TEXTS = ["A man is eating food.", "A man is eating a piece of bread.", "The sky is blue."]


def vectors(doc: object) -> np.ndarray:
    return np.array(doc, dtype=np.float32)


def test_every_route_gives_the_same_vectors(text_client: TestClient) -> None:
    openai = text_client.simulate_post("/v1/embeddings", json={"input": TEXTS, "model": "minilm"})
    assert openai.status_code == 200, openai.text
    base = vectors([d["embedding"] for d in openai.json["data"]])
    assert base.shape == (3, 384)
    assert [d["index"] for d in openai.json["data"]] == [0, 1, 2]
    assert openai.json["usage"]["prompt_tokens"] == openai.json["usage"]["total_tokens"] > 10
    tei = text_client.simulate_post("/embed", json={"inputs": TEXTS})
    layer = text_client.simulate_post("/embeddings", json={"input": TEXTS})
    batch = text_client.simulate_post("/batch_embed", json={"texts": TEXTS})
    oip = text_client.simulate_post(
        "/v2/models/minilm/infer",
        json={"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": TEXTS}]},
    )
    for other in (
        vectors(tei.json),
        vectors(layer.json["embeddings"]),
        vectors(batch.json["embeddings"]),
        vectors(oip.json["outputs"][0]["data"]).reshape(3, 384),
    ):
        np.testing.assert_allclose(other, base, atol=1e-6)
    assert layer.json["dimensions"] == 384 and batch.json["count"] == 3
    # Meaning: the paraphrase is far closer than the unrelated sentence.
    assert base[0] @ base[1] > base[0] @ base[2] + 0.4


def test_token_ids_embed_like_the_text(text_client: TestClient) -> None:
    ids = text_client.simulate_post("/tokenize", json={"text": TEXTS[0]}).json["tokens"]
    by_ids = text_client.simulate_post("/v1/embeddings", json={"input": ids, "model": "minilm"})
    by_text = text_client.simulate_post(
        "/v1/embeddings", json={"input": TEXTS[0], "model": "minilm"}
    )
    np.testing.assert_allclose(
        by_ids.json["data"][0]["embedding"], by_text.json["data"][0]["embedding"], atol=1e-6
    )


def test_models_are_listed_the_openai_way(text_client: TestClient) -> None:
    doc = text_client.simulate_get("/v1/models").json
    assert doc["object"] == "list"
    assert {m["id"] for m in doc["data"]} == {"minilm", "tabular"}
    assert all(m["object"] == "model" for m in doc["data"])


def test_tokenize_and_back(text_client: TestClient) -> None:
    layer = text_client.simulate_post("/tokenize", json={"text": "Hello world"}).json
    assert layer == {"tokens": [101, 7592, 2088, 102], "token_count": 4, "text_length": 11}
    bare = text_client.simulate_post(
        "/tokenize", json={"text": "Hello world", "add_special_tokens": False}
    )
    assert bare.json["tokens"] == [7592, 2088]
    tei = text_client.simulate_post("/tokenize", json={"inputs": ["Hello world"]}).json
    assert [(t["text"], t["special"], t["start"]) for t in tei[0]] == [
        ("[CLS]", True, None),
        ("hello", False, 0),
        ("world", False, 6),
        ("[SEP]", True, None),
    ]
    back = text_client.simulate_post("/detokenize", json={"tokens": layer["tokens"]})
    assert back.json == {"text": "hello world"}
    decoded = text_client.simulate_post("/decode", json={"ids": [[7592], [2088]]})
    assert decoded.json == ["hello", "world"]


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/v1/embeddings", {"input": "", "model": "minilm"}, 400, "INVALID_INPUT"),
        ("/v1/embeddings", {"input": [], "model": "minilm"}, 400, "INVALID_INPUT"),
        ("/v1/embeddings", {"input": 5, "model": "minilm"}, 400, "INVALID_INPUT"),
        ("/v1/embeddings", {"input": "x", "model": "nope"}, 404, "MODEL_NOT_FOUND"),
        ("/v1/embeddings", {"input": "x", "model": "tabular"}, 404, "MODEL_NOT_FOUND"),
        ("/v1/embeddings", {"input": "x " * 400, "model": "minilm"}, 400, "INVALID_INPUT"),
        ("/v1/embeddings", {"input": [1, 99999], "model": "minilm"}, 400, "INVALID_INPUT"),
        (
            "/v1/embeddings",
            {"input": "x", "model": "minilm", "dimensions": 10},
            400,
            "INVALID_INPUT",
        ),
        ("/embed", {"inputs": "x " * 400}, 400, "INVALID_INPUT"),
        ("/embed", {"inputs": []}, 400, "INVALID_INPUT"),
        ("/embed", {"inputs": [1, 2]}, 400, "INVALID_INPUT"),
        ("/batch_embed", {"texts": []}, 400, "INVALID_INPUT"),
        ("/batch_embed", {"texts": ["ok"] * 3000}, 413, "PAYLOAD_TOO_LARGE"),
        ("/embeddings", {"input": None}, 400, "INVALID_INPUT"),
        ("/tokenize", {}, 400, "INVALID_INPUT"),
        ("/detokenize", {"tokens": [-1]}, 400, "INVALID_INPUT"),
    ],
)
def test_bad_text_requests(
    text_client: TestClient, path: str, body: object, status: int, code: str
) -> None:
    result = text_client.simulate_post(path, json=body)
    assert result.status_code == status, result.text
    if path.startswith("/v1/"):  # OpenAI's error shape, with the usual code and id
        error = result.json["error"]
        assert error["message"] and error["type"] and error["code"] == code.lower()
        assert result.json["error_code"] == code and result.json["request_id"]
    else:
        assert_error(result, status, code)


def test_a_long_text_is_truncated_where_asked(text_client: TestClient) -> None:
    result = text_client.simulate_post("/embed", json={"inputs": "x " * 400, "truncate": True})
    assert result.status_code == 200
    layer = text_client.simulate_post("/embeddings", json={"input": "x " * 400})
    assert layer.json["token_count"] == 256  # /embeddings truncates by default


def test_invalid_utf8_is_a_clear_400(text_client: TestClient) -> None:
    result = text_client.simulate_post(
        "/embed", body=b'{"inputs": "\xff\xfe"}', headers={"Content-Type": "application/json"}
    )
    assert_error(result, 400, "INVALID_INPUT")
    assert "UTF-8" in result.json["error"]


def test_tensor_only_repositories_answer_404(client: TestClient) -> None:
    result = client.simulate_post("/embed", json={"inputs": "x"})
    assert_error(result, 404, "MODEL_NOT_FOUND")
    assert "no text model" in result.json["error"]


def test_embeddings_are_replayed_on_the_shadow_after_the_answer(
    text_models_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    shutil.copytree(text_models_dir / "minilm", root / "minilm")
    shutil.copytree(root / "minilm" / "1", root / "minilm" / "2")
    toml = root / "minilm" / "model.toml"
    table = "[shadow]\nversion = 2\npercent = 100\n"
    toml.write_text(f"default_version = 1\n{toml.read_text()}\n{table}")
    metrics = Metrics()
    settings = make_settings(root)
    repository = build_repository(settings, metrics)
    repository.load()
    app = closing_connections(create_app(settings, repository, metrics))
    environ = create_environ(
        "/v1/embeddings",
        method="POST",
        body=json.dumps({"input": TEXTS, "model": "minilm"}),
        headers={"Content-Type": "application/json"},
    )
    body = app(environ, lambda status, headers, exc_info=None: None)
    assert json.loads(b"".join(body))["model"] == "minilm"
    shadow = repository.entry("minilm").shadow
    assert shadow is not None
    assert shadow.executor.wait_idle(10)
    compared = {"model": "minilm", "version": "1", "candidate": "2", "outcome": "compared"}
    sample = metrics.registry.get_sample_value
    assert sample("onnx_appliance_shadow_requests_total", compared) is None  # not sent yet
    body.close()  # the server has written the answer
    assert shadow.executor.wait_idle(10)
    assert sample("onnx_appliance_shadow_requests_total", compared) == 1
    # The same weights and tokenizer: every vector within float32 rounding of the primary's.
    pair = {"model": "minilm", "version": "1", "candidate": "2", "output": "embedding"}
    assert sample("onnx_appliance_shadow_cosine_distance_bucket", {**pair, "le": "1e-05"}) == len(
        TEXTS
    )
