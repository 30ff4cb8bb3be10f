"""Image uploads through Falcon's test client on the real digits model: ``:classify`` with
``multipart/form-data``, every bad upload's answer, and the same model over OIP v2 with the
images as BYTES (binary tensor data, or base64 in JSON)."""

from __future__ import annotations

import base64
import io
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from falcon.testing import TestClient
from PIL import Image

from app.metrics import Metrics
from app.models.repository import Repository
from app.server.application import closing_connections
from app.wsgi import build_repository, create_app
from tests.conftest import DEMO_MODELS, ROOT, make_settings
from tests.models.test_image import png_header

SAMPLES = ROOT / "packaging" / "demo" / "digits"
BOUNDARY = "onnx-appliance-test-boundary"
MULTIPART = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def form(*parts: tuple[str, str | None, bytes]) -> bytes:
    """A multipart/form-data body of (field, file name or None, content) parts."""
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        kind = "Content-Type: application/octet-stream\r\n" if filename else ""
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n{kind}\r\n".encode()
        out += data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def sample(digit: int) -> tuple[str, str, bytes]:
    return ("file", f"{digit}.png", (SAMPLES / f"{digit}.png").read_bytes())


def classify(client: TestClient, body: bytes, path: str = "/v1/models/digits:classify") -> object:
    return client.simulate_post(path, body=body, headers=MULTIPART)


def test_classify_ranks_each_upload_in_order(client: TestClient) -> None:
    result = classify(client, form(sample(7), sample(2), ("top_k", None, b"2")))
    assert result.status_code == 200, result.text
    body = result.json
    assert (body["model_name"], body["model_version"]) == ("digits", "1")
    assert [r["file"] for r in body["results"]] == ["7.png", "2.png"]
    assert [r["predictions"][0]["label"] for r in body["results"]] == ["7", "2"]
    for r in body["results"]:
        scores = [p["score"] for p in r["predictions"]]
        assert len(scores) == 2 and scores == sorted(scores, reverse=True)


def test_versioned_route_and_default_top_k(client: TestClient) -> None:
    result = classify(client, form(sample(4)), "/v1/models/digits/versions/1:classify")
    assert result.status_code == 200, result.text
    assert len(result.json["results"][0]["predictions"]) == 3
    missing = classify(client, form(sample(4)), "/v1/models/digits/versions/2:classify")
    assert missing.status_code == 404


def test_a_file_name_is_never_a_path(client: TestClient) -> None:
    (_, _, data) = sample(1)
    result = classify(client, form(("file", "../../etc/passwd", data)))
    name = result.json["results"][0]["file"]
    assert "/" not in name and name.endswith("etc_passwd")


def _encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 255, 255)).save(buffer, format=fmt)
    return buffer.getvalue()


CODES = {400: "INVALID_INPUT", 413: "PAYLOAD_TOO_LARGE", 415: "UNSUPPORTED_MEDIA_TYPE"}
CUT = (SAMPLES / "1.png").read_bytes()[:100]
BAD_UPLOADS = {
    "text": (form(("file", "a.txt", b"hello")), 400, "a.txt is not an image"),
    "gif": (form(("file", "a.gif", _encoded("GIF"))), 415, "a.gif is GIF"),
    "bomb": (form(("file", "big.png", png_header(5000, 5000))), 413, "5000x5000"),
    "truncated": (form(("file", "cut.png", CUT)), 400, "cannot be decoded"),
    "too many": (form(*[sample(0)] * 17), 413, "more than 16 files"),
    "no file": (form(("top_k", None, b"3")), 400, "no image in the form"),
    "top_k 0": (form(sample(0), ("top_k", None, b"0")), 400, "top_k must be"),
    "top_k x": (form(sample(0), ("top_k", None, b"x")), 400, "top_k must be"),
    "other field": (form(sample(0), ("colour", None, b"x")), 400, "unexpected form field"),
    "garbage": (b"--nope\r\ngarbage", 400, "malformed multipart"),
}


@pytest.mark.parametrize(("body", "status", "fragment"), BAD_UPLOADS.values(), ids=BAD_UPLOADS)
def test_bad_uploads_get_clear_errors(
    client: TestClient, body: bytes, status: int, fragment: str
) -> None:
    _refused(client, body, MULTIPART, status, fragment)


def test_bad_content_types_get_clear_errors(client: TestClient) -> None:
    no_boundary = {"Content-Type": "multipart/form-data"}
    _refused(client, form(sample(0)), no_boundary, 400, "malformed multipart")
    json_type = {"Content-Type": "application/json"}
    _refused(client, b'{"instances": []}', json_type, 415, "multipart/form-data")


def _refused(
    client: TestClient, body: bytes, headers: dict[str, str], status: int, fragment: str
) -> None:
    result = client.simulate_post("/v1/models/digits:classify", body=body, headers=headers)
    assert result.status_code == status, result.text
    assert result.json["error_code"] == CODES[status]
    assert fragment in result.json["error"]
    # The model keeps serving.
    assert classify(client, form(sample(5))).json["results"][0]["predictions"][0]["label"] == "5"


def test_classify_is_for_image_models_only(client: TestClient) -> None:
    result = classify(client, form(sample(0)), "/v1/models/tabular:classify")
    assert result.status_code == 404
    assert "does not take images" in result.json["error"]


def test_the_body_cap_holds_for_uploads(demo_repository: Repository) -> None:
    settings = make_settings(DEMO_MODELS, limits={"max_body_bytes": 1024})
    client = TestClient(create_app(settings, demo_repository, Metrics()))
    result = classify(client, form(sample(0), sample(1), sample(2)))
    assert result.status_code == 413
    assert result.json["error_code"] == "PAYLOAD_TOO_LARGE"


def test_the_same_model_over_oip_with_binary_bytes(client: TestClient) -> None:
    files = [(SAMPLES / f"{d}.png").read_bytes() for d in (3, 9)]
    packed = b"".join(struct.pack("<I", len(f)) + f for f in files)
    header = json.dumps(
        {
            "inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                        "parameters": {"binary_data_size": len(packed)}}],
            "outputs": [{"name": "label"}],
        }
    ).encode()  # fmt: skip
    result = client.simulate_post(
        "/v2/models/digits/infer",
        body=header + packed,
        headers={"Inference-Header-Content-Length": str(len(header)),
                 "Content-Type": "application/octet-stream"},
    )  # fmt: skip
    assert result.status_code == 200, result.text
    (label,) = result.json["outputs"]
    assert label["data"] == [3, 9]


def test_the_same_model_over_oip_json_with_base64(client: TestClient) -> None:
    data = [base64.b64encode((SAMPLES / f"{d}.png").read_bytes()).decode() for d in (6, 0)]
    body = {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": data}]}
    result = client.simulate_post("/v2/models/digits/infer", json=body)
    assert result.status_code == 200, result.text
    outputs = {o["name"]: o for o in result.json["outputs"]}
    assert outputs["label"]["data"] == [6, 0]
    assert np.array(outputs["probabilities"]["data"]).reshape(2, 10).argmax(axis=1).tolist() == [
        6,
        0,
    ]
    metadata = client.simulate_get("/v2/models/digits").json
    assert metadata["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    bad = {
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["not base64!"]}]
    }
    assert client.simulate_post("/v2/models/digits/infer", json=bad).status_code == 400


def test_openapi_documents_the_upload(client: TestClient) -> None:
    document = client.simulate_get("/openapi.json").json
    operation = document["paths"]["/v1/models/{model}:classify"]["post"]
    schema = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert schema["properties"]["file"]["items"]["format"] == "binary"
    assert {"400", "413", "415"} <= set(operation["responses"])


def test_uploads_are_replayed_on_the_shadow_and_compared_by_class(tmp_path: Path) -> None:
    root = tmp_path / "models"
    shutil.copytree(DEMO_MODELS / "digits", root / "digits")
    shutil.copytree(root / "digits" / "1", root / "digits" / "2")
    toml = root / "digits" / "model.toml"
    text = toml.read_text().replace("[image]", "default_version = 1\n[image]")
    toml.write_text(text + "\n[shadow]\nversion = 2\npercent = 100\n")
    metrics = Metrics()
    settings = make_settings(root)
    repository = build_repository(settings, metrics)
    repository.load()
    client = TestClient(closing_connections(create_app(settings, repository, metrics)))
    result = classify(client, form(sample(7), sample(2), sample(4)))
    assert result.status_code == 200, result.text
    shadow = repository.entry("digits").shadow
    assert shadow is not None and shadow.executor.wait_idle(10)
    labels = {"model": "digits", "version": "1", "candidate": "2", "output": "probabilities"}
    same = metrics.registry.get_sample_value(
        "onnx_appliance_shadow_labels_total", {**labels, "result": "same"}
    )
    assert same == 3
