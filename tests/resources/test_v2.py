"""Open Inference Protocol routes through Falcon's test client on real onnxruntime sessions."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
import pytest
from falcon.testing import TestClient

from tests.conftest import DEMO_MODELS

ROW = [float(i) / 10 for i in range(30)]


def infer_body(data: Any, shape: list[int] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "inputs": [{"name": "input", "shape": shape or [1, 30], "datatype": "FP32", "data": data}],
        **extra,
    }


def reference(model: str, version: int, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(DEMO_MODELS / model / str(version) / "model.onnx"))
    return session.run(None, feeds)  # type: ignore[no-any-return]


class TestServerRoutes:
    def test_server_metadata_lists_extensions(self, client: TestClient) -> None:
        doc = client.simulate_get("/v2").json
        assert doc["name"] == "onnx-appliance"
        assert "binary_tensor_data" in doc["extensions"]

    @pytest.mark.parametrize("path", ["/v2/health/live", "/healthz", "/health"])
    def test_live(self, client: TestClient, path: str) -> None:
        assert client.simulate_get(path).json == {"live": True}

    @pytest.mark.parametrize("path", ["/v2/health/ready", "/readyz"])
    def test_ready(self, client: TestClient, path: str) -> None:
        result = client.simulate_get(path)
        assert result.status_code == 200
        assert result.json == {"ready": True}


class TestModelMetadata:
    def test_default_version_metadata(self, client: TestClient) -> None:
        doc = client.simulate_get("/v2/models/tabular").json
        assert doc["name"] == "tabular"
        assert doc["versions"] == ["1", "2"]
        assert doc["platform"] == "onnxruntime_onnx"
        assert doc["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 30]}]
        assert [o["name"] for o in doc["outputs"]] == ["label", "probabilities"]
        assert doc["outputs"][0]["datatype"] == "INT64"

    def test_versioned_metadata(self, client: TestClient) -> None:
        doc = client.simulate_get("/v2/models/tabular/versions/1").json
        assert doc["versions"] == ["1"]

    def test_string_model_reports_bytes(self, client: TestClient) -> None:
        doc = client.simulate_get("/v2/models/sentiment").json
        assert doc["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1, 1]}]

    @pytest.mark.parametrize(
        "path", ["/v2/models/tabular/ready", "/v2/models/tabular/versions/1/ready"]
    )
    def test_model_ready(self, client: TestClient, path: str) -> None:
        result = client.simulate_get(path)
        assert result.status_code == 200
        assert result.json["ready"] is True

    @pytest.mark.parametrize(
        "path",
        [
            "/v2/models/nope",
            "/v2/models/nope/ready",
            "/v2/models/tabular/versions/9/ready",
            "/v2/models/tabular/versions/01",
        ],
    )
    def test_unknown_is_404(self, client: TestClient, path: str) -> None:
        result = client.simulate_get(path)
        assert result.status_code == 404
        assert result.json["error_code"] == "MODEL_NOT_FOUND"


class TestInferJson:
    def test_matches_onnxruntime(self, client: TestClient) -> None:
        result = client.simulate_post("/v2/models/tabular/infer", json=infer_body(ROW))
        assert result.status_code == 200
        doc = result.json
        assert doc["model_name"] == "tabular"
        assert doc["model_version"] == "2"
        assert result.headers["X-Model-Version"] == "2"
        label, probs = reference("tabular", 2, {"input": np.array([ROW], dtype=np.float32)})
        out = {o["name"]: o for o in doc["outputs"]}
        assert out["label"] == {
            "name": "label",
            "datatype": "INT64",
            "shape": [1],
            "data": label.tolist(),
        }
        assert out["probabilities"]["shape"] == [1, 2]
        np.testing.assert_allclose(out["probabilities"]["data"], probs.reshape(-1), rtol=1e-6)

    def test_pinned_version_serves_that_version(self, client: TestClient) -> None:
        rows = [ROW, [x * 3 for x in ROW]]
        result = client.simulate_post(
            "/v2/models/tabular/versions/1/infer", json=infer_body(rows, [2, 30])
        )
        assert result.json["model_version"] == "1"
        _, probs = reference("tabular", 1, {"input": np.array(rows, dtype=np.float32)})
        np.testing.assert_allclose(result.json["outputs"][1]["data"], probs.reshape(-1), rtol=1e-6)

    def test_id_is_echoed(self, client: TestClient) -> None:
        doc = client.simulate_post(
            "/v2/models/tabular/infer", json=infer_body(ROW, id="req-42")
        ).json
        assert doc["id"] == "req-42"

    def test_requested_outputs_only(self, client: TestClient) -> None:
        doc = client.simulate_post(
            "/v2/models/tabular/infer", json=infer_body(ROW, outputs=[{"name": "probabilities"}])
        ).json
        assert [o["name"] for o in doc["outputs"]] == ["probabilities"]

    def test_nested_data_equals_flat(self, client: TestClient) -> None:
        rows = [ROW, ROW[::-1]]
        flat = client.simulate_post(
            "/v2/models/tabular/infer", json=infer_body(ROW + ROW[::-1], [2, 30])
        ).json
        nested = client.simulate_post(
            "/v2/models/tabular/infer", json=infer_body(rows, [2, 30])
        ).json
        assert flat["outputs"] == nested["outputs"]

    def test_bytes_input(self, client: TestClient) -> None:
        texts = ["the food was delicious and fresh", "the service was slow and rude"]
        body = {"inputs": [{"name": "text", "shape": [2, 1], "datatype": "BYTES", "data": texts}]}
        doc = client.simulate_post("/v2/models/sentiment/infer", json=body).json
        label, _ = reference("sentiment", 1, {"text": np.array(texts, dtype=object).reshape(2, 1)})
        assert doc["outputs"][0] == {
            "name": "label",
            "datatype": "BYTES",
            "shape": [2],
            "data": label.tolist(),
        }
        assert label.tolist() == ["positive", "negative"]

    def test_every_datatype_round_trips(self, extra_client: TestClient) -> None:
        values: dict[str, list[Any]] = {
            "BOOL": [True, False, False, True],
            "UINT8": [0, 255, 7, 8],
            "UINT16": [0, 65535, 1, 2],
            "UINT32": [0, 2**32 - 1, 3, 4],
            "UINT64": [0, 2**64 - 1, 5, 6],
            "INT8": [-128, 127, 0, 1],
            "INT16": [-32768, 32767, 0, 1],
            "INT32": [-(2**31), 2**31 - 1, 0, 1],
            "INT64": [-(2**63), 2**63 - 1, 0, 1],
            "FP16": [0.5, -1.0, 2.0, 65504.0],
            "FP32": [0.25, -1.5, 3.0, 1e30],
            "FP64": [0.1, -1e300, 3.0, 4.5],
            "BYTES": ["a", "", "ünïcode", "d"],
        }
        body = {
            "inputs": [
                {"name": f"x_{dt.lower()}", "shape": [2, 2], "datatype": dt, "data": data}
                for dt, data in values.items()
            ]
        }
        result = extra_client.simulate_post("/v2/models/all_types/infer", json=body)
        assert result.status_code == 200, result.text
        outputs = {o["name"]: o for o in result.json["outputs"]}
        for dt, data in values.items():
            out = outputs[f"y_{dt.lower()}"]
            assert out["datatype"] == dt
            assert out["shape"] == [2, 2]
            assert out["data"] == data


def binary_request(
    inputs: list[tuple[str, str, list[int], bytes]], **params: Any
) -> tuple[bytes, dict[str, str]]:
    header = {
        "inputs": [
            {
                "name": n,
                "datatype": dt,
                "shape": shape,
                "parameters": {"binary_data_size": len(raw)},
            }
            for n, dt, shape, raw in inputs
        ],
        **params,
    }
    json_part = orjson.dumps(header)
    body = json_part + b"".join(raw for *_, raw in inputs)
    return body, {
        "Inference-Header-Content-Length": str(len(json_part)),
        "Content-Type": "application/octet-stream",
    }


def split_binary(result: Any) -> tuple[dict[str, Any], bytes]:
    length = int(result.headers["Inference-Header-Content-Length"])
    return orjson.loads(result.content[:length]), result.content[length:]


class TestInferBinary:
    def test_binary_in_and_out(self, client: TestClient) -> None:
        x = np.array([ROW, ROW[::-1]], dtype=np.float32)
        body, headers = binary_request(
            [("input", "FP32", [2, 30], x.tobytes())], parameters={"binary_data_output": True}
        )
        result = client.simulate_post("/v2/models/tabular/infer", body=body, headers=headers)
        assert result.status_code == 200, result.text
        assert result.headers["Content-Type"] == "application/octet-stream"
        doc, raw = split_binary(result)
        label, probs = reference("tabular", 2, {"input": x})
        sizes = [o["parameters"]["binary_data_size"] for o in doc["outputs"]]
        assert sizes == [label.nbytes, probs.nbytes]
        assert np.frombuffer(raw[: sizes[0]], dtype="<i8").tolist() == label.tolist()
        np.testing.assert_array_equal(
            np.frombuffer(raw[sizes[0] :], dtype="<f4"), probs.reshape(-1)
        )

    def test_binary_output_per_output(self, client: TestClient) -> None:
        body = infer_body(
            ROW,
            outputs=[
                {"name": "label"},
                {"name": "probabilities", "parameters": {"binary_data": True}},
            ],
        )
        result = client.simulate_post("/v2/models/tabular/infer", json=body)
        doc, raw = split_binary(result)
        assert "data" in doc["outputs"][0]
        assert doc["outputs"][1]["parameters"]["binary_data_size"] == len(raw) == 8

    def test_binary_bytes_input(self, client: TestClient) -> None:
        texts = [b"what a wonderful film", b"a horrible experience"]
        raw = b"".join(struct.pack("<I", len(t)) + t for t in texts)
        body, headers = binary_request(
            [("text", "BYTES", [2, 1], raw)], parameters={"binary_data_output": True}
        )
        result = client.simulate_post("/v2/models/sentiment/infer", body=body, headers=headers)
        assert result.status_code == 200, result.text
        doc, out = split_binary(result)
        size = doc["outputs"][0]["parameters"]["binary_data_size"]
        labels, pos = [], 0
        while pos < size:
            (n,) = struct.unpack_from("<I", out, pos)
            labels.append(out[pos + 4 : pos + 4 + n].decode())
            pos += 4 + n
        assert labels == ["positive", "negative"]

    def test_binary_mixed_with_json_input(self, extra_client: TestClient) -> None:
        a = np.ones((1, 3), dtype=np.float32)
        header = {
            "inputs": [
                {
                    "name": "a",
                    "datatype": "FP32",
                    "shape": [1, 3],
                    "parameters": {"binary_data_size": 12},
                },
                {"name": "b", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]},
            ]
        }
        json_part = orjson.dumps(header)
        result = extra_client.simulate_post(
            "/v2/models/two_inputs/infer",
            body=json_part + a.tobytes(),
            headers={"Inference-Header-Content-Length": str(len(json_part))},
        )
        assert result.status_code == 200, result.text
        assert result.json["outputs"][0]["data"] == [2.0, 3.0, 4.0]


class TestRepositoryIndex:
    def test_lists_every_version(self, client: TestClient) -> None:
        result = client.simulate_post("/v2/repository/index")
        assert result.status_code == 200
        assert {(m["name"], m["version"]) for m in result.json} == {
            ("digits", "1"),
            ("mlp", "1"),
            ("regression", "1"),
            ("sentiment", "1"),
            ("tabular", "1"),
            ("tabular", "2"),
        }
        assert {m["state"] for m in result.json} == {"READY"}

    def test_ready_filter(self, client: TestClient) -> None:
        result = client.simulate_post("/v2/repository/index", json={"ready": True})
        assert len(result.json) == 6

    def test_no_load_or_unload(self, client: TestClient) -> None:
        for action in ("load", "unload"):
            result = client.simulate_post(f"/v2/repository/models/tabular/{action}")
            assert result.status_code == 404
