"""Every bad input gets a clear JSON error with the right status, and serving goes on."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest
from falcon.testing import TestClient

from tests import onnx_factory

PATH_RE = re.compile(r"/[\w.-]+/[\w.-]+|\.onnx|\.py\b")
GOOD = {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [0.5] * 30}]}


def tensor(**fields: Any) -> dict[str, Any]:
    base = {"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [0.5] * 30}
    base.update(fields)
    return {"inputs": [base]}


def raw(body: Any) -> bytes:
    return body if isinstance(body, bytes) else orjson.dumps(body)


# (case id, body, status, error_code)
JSON_CASES: list[tuple[str, Any, int, str]] = [
    ("malformed_json", b'{"inputs": [', 400, "INVALID_INPUT"),
    ("empty_body", b"", 400, "INVALID_INPUT"),
    ("json_array", [1, 2, 3], 400, "INVALID_INPUT"),
    ("json_string", "hello", 400, "INVALID_INPUT"),
    ("no_inputs", {"id": "x"}, 400, "INVALID_INPUT"),
    ("empty_inputs", {"inputs": []}, 400, "INVALID_INPUT"),
    ("input_not_object", {"inputs": [1]}, 400, "INVALID_INPUT"),
    ("missing_name", tensor(name=None), 400, "INVALID_INPUT"),
    ("unknown_name", tensor(name="nope"), 400, "INVALID_INPUT"),
    ("duplicate_name", {"inputs": GOOD["inputs"] * 2}, 400, "INVALID_INPUT"),
    ("wrong_datatype", tensor(datatype="FP64"), 400, "INVALID_INPUT"),
    ("unknown_datatype", tensor(datatype="COMPLEX"), 400, "INVALID_INPUT"),
    ("missing_datatype", tensor(datatype=None), 400, "INVALID_INPUT"),
    ("count_disagrees", tensor(data=[0.5] * 29), 400, "INVALID_INPUT"),
    ("rank_mismatch", tensor(shape=[30], data=[0.5] * 30), 400, "INVALID_INPUT"),
    ("fixed_dim_mismatch", tensor(shape=[2, 15], data=[0.5] * 30), 400, "INVALID_INPUT"),
    ("ragged", tensor(shape=[2, 30], data=[[0.5] * 30, [0.5] * 29]), 400, "INVALID_INPUT"),
    ("strings_to_float", tensor(data=["0.5"] * 30), 400, "INVALID_INPUT"),
    ("bools_to_float", tensor(data=[True] * 30), 400, "INVALID_INPUT"),
    ("null_in_data", tensor(data=[None] * 30), 400, "INVALID_INPUT"),
    ("objects_in_data", tensor(data=[{"a": 1}] * 30), 400, "INVALID_INPUT"),
    (
        "no_data",
        tensor(data=None) | {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32"}]},
        400,
        "INVALID_INPUT",
    ),
    ("float_dim", tensor(shape=[1e12]), 400, "INVALID_INPUT"),
    ("huge_int_dim", tensor(shape=[10**12, 30]), 413, "PAYLOAD_TOO_LARGE"),
    ("negative_dim", tensor(shape=[-1, 30]), 400, "INVALID_INPUT"),
    ("shape_not_list", tensor(shape="1,30"), 400, "INVALID_INPUT"),
    ("bool_dim", tensor(shape=[True, 30]), 400, "INVALID_INPUT"),
    ("deep_nesting_json", b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "INVALID_INPUT"),
    (
        "deep_nesting_data",
        tensor(data=orjson.loads(b"[" * 200 + b"0.5" + b"]" * 200)),
        400,
        "INVALID_INPUT",
    ),
    ("id_not_string", {**GOOD, "id": 7}, 400, "INVALID_INPUT"),
    ("unknown_output", {**GOOD, "outputs": [{"name": "nope"}]}, 400, "INVALID_INPUT"),
    ("outputs_not_list", {**GOOD, "outputs": "label"}, 400, "INVALID_INPUT"),
    ("parameters_not_object", {**GOOD, "parameters": [1]}, 400, "INVALID_INPUT"),
    (
        "binary_size_without_header",
        tensor(data=None, parameters={"binary_data_size": 120}),
        400,
        "INVALID_INPUT",
    ),
    ("too_many_rows", tensor(shape=[1025, 30], data=[0.5] * 30 * 1025), 413, "PAYLOAD_TOO_LARGE"),
]


def assert_error(result: Any, status: int, code: str) -> None:
    assert result.status_code == status, result.text
    doc = result.json
    assert doc["error_code"] == code
    assert set(doc) == {"error", "error_code", "request_id"}
    assert doc["request_id"] == result.headers["X-Request-ID"]
    assert "Traceback" not in doc["error"]
    assert not PATH_RE.search(doc["error"]), doc["error"]  # no file paths


def assert_still_serving(client: TestClient) -> None:
    result = client.simulate_post("/v2/models/tabular/infer", json=GOOD)
    assert result.status_code == 200, result.text


@pytest.mark.parametrize(
    ("body", "status", "code"), [c[1:] for c in JSON_CASES], ids=[c[0] for c in JSON_CASES]
)
def test_bad_json_request(client: TestClient, body: Any, status: int, code: str) -> None:
    result = client.simulate_post(
        "/v2/models/tabular/infer", body=raw(body), headers={"Content-Type": "application/json"}
    )
    assert_error(result, status, code)
    assert_still_serving(client)


BINARY_CASES = [
    # (id, header length delta, declared binary size, actual bytes)
    ("header_length_past_body", 10_000, 120, 120),
    ("header_length_zero", None, 120, 120),
    ("header_length_cuts_json", -5, 120, 120),
    ("tensor_size_mismatch", 0, 116, 116),
    ("declared_size_beyond_body", 0, 240, 120),
    ("unclaimed_trailing_bytes", 0, 120, 124),
]


@pytest.mark.parametrize(
    ("delta", "declared", "actual"), [c[1:] for c in BINARY_CASES], ids=[c[0] for c in BINARY_CASES]
)
def test_bad_binary_request(
    client: TestClient, delta: int | None, declared: int, actual: int
) -> None:
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 30],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": declared},
                }
            ]
        }
    )
    length = 0 if delta is None else len(header) + delta
    result = client.simulate_post(
        "/v2/models/tabular/infer",
        body=header + b"\0" * actual,
        headers={
            "Inference-Header-Content-Length": str(length),
            "Content-Type": "application/octet-stream",
        },
    )
    assert_error(result, 400, "INVALID_INPUT")
    assert_still_serving(client)


def test_header_length_not_a_number(client: TestClient) -> None:
    result = client.simulate_post(
        "/v2/models/tabular/infer",
        body=raw(GOOD),
        headers={"Inference-Header-Content-Length": "12abc"},
    )
    assert_error(result, 400, "INVALID_INPUT")


def test_truncated_binary_bytes_element(client: TestClient) -> None:
    payload = (100).to_bytes(4, "little") + b"short"
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "text",
                    "shape": [1, 1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(payload)},
                }
            ]
        }
    )
    result = client.simulate_post(
        "/v2/models/sentiment/infer",
        body=header + payload,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert_error(result, 400, "INVALID_INPUT")
    assert_still_serving(client)


def test_values_beyond_fp32_are_refused_on_the_simple_route_too(client: TestClient) -> None:
    result = client.simulate_post("/predict", json={"instances": [[1e39] + [0.5] * 29]})
    assert_error(result, 400, "INVALID_INPUT")
    assert "out of range for FP32" in result.json["error"]
    assert client.simulate_post("/predict", json={"instances": [[3e38] + [0.5] * 29]}).status == (
        "200 OK"
    )


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/nope/infer",
        "/v2/models/tabular/versions/3/infer",
        "/v2/models/tabular/versions/abc/infer",
        "/v2/models/tabular/versions/0/infer",
        "/v2/models/%2e%2e/infer",
        "/v2/models/%2E%2E%2Ftabular/infer",
        "/v2/models/..%2F..%2Fetc%2Fpasswd/infer",
        "/v2/models/tabular%00/infer",
        "/v2/models/%252e%252e/infer",
        "/v2/models/tabular/versions/%2e%2e/infer",
        "/v1/models/%2e%2e:predict",
        "/v1/models/..%2ftabular:predict",
    ],
)
def test_unknown_or_tricky_model_is_404(client: TestClient, path: str) -> None:
    result = client.simulate_post(path, body=raw(GOOD))
    assert result.status_code == 404, result.text
    assert result.json["error_code"] in ("MODEL_NOT_FOUND", "NOT_FOUND")
    assert "etc" not in result.json["error"]
    assert_still_serving(client)


def test_wrong_method_is_405_json(client: TestClient) -> None:
    result = client.simulate_get("/v2/models/tabular/infer")
    assert_error(result, 405, "METHOD_NOT_ALLOWED")
    assert "POST" in result.headers["Allow"]


def test_unknown_route_is_404_json(client: TestClient) -> None:
    assert_error(client.simulate_get("/v3/anything"), 404, "NOT_FOUND")


def test_fixed_shape_model_rejects_other_shapes(extra_client: TestClient) -> None:
    body = {"inputs": [{"name": "x", "shape": [3, 2], "datatype": "FP32", "data": [1] * 6}]}
    assert_error(
        extra_client.simulate_post("/v2/models/fixed/infer", json=body), 400, "INVALID_INPUT"
    )
    body["inputs"][0]["shape"] = [2, 3]
    result = extra_client.simulate_post("/v2/models/fixed/infer", json=body)
    assert result.json["outputs"][0]["data"] == [2.0] * 6


@pytest.mark.parametrize(
    ("datatype", "data"),
    [
        ("UINT8", [256, 0, 0, 0]),
        ("INT8", [-129, 0, 0, 0]),
        ("UINT64", [-1, 0, 0, 0]),
        ("INT32", [1.5, 0, 0, 0]),
        ("BOOL", [1, 0, 1, 0]),
        ("BYTES", [1, 2, 3, 4]),
        ("INT64", [2**64, 0, 0, 0]),
        ("FP32", [1e39, 0, 0, 0]),
        ("FP32", [-1e39, 0, 0, 0]),
        ("FP16", [70000, 0, 0, 0]),
        ("FP16", [1e5, 0.5, 0, 0]),
    ],
)
def test_values_that_do_not_fit_the_datatype(
    extra_client: TestClient, datatype: str, data: list[Any]
) -> None:
    body = {
        "inputs": [
            {
                "name": f"x_{dt.lower()}",
                "shape": [2, 2],
                "datatype": dt,
                "data": data if dt == datatype else _zeros(dt),
            }
            for dt in onnx_factory.ELEM_TYPES
        ]
    }
    assert_error(
        extra_client.simulate_post("/v2/models/all_types/infer", json=body), 400, "INVALID_INPUT"
    )


def _zeros(datatype: str) -> list[Any]:
    return {"BOOL": [False] * 4, "BYTES": ["x"] * 4}.get(datatype, [0] * 4)


def test_missing_input_of_several(extra_client: TestClient) -> None:
    body = {"inputs": [{"name": "a", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    result = extra_client.simulate_post("/v2/models/two_inputs/infer", json=body)
    assert_error(result, 400, "INVALID_INPUT")
    assert "'b'" in result.json["error"]


def test_inputs_with_different_batch_sizes_fail_cleanly(extra_client: TestClient) -> None:
    body = {
        "inputs": [
            {"name": "a", "shape": [2, 3], "datatype": "FP32", "data": [1] * 6},
            {"name": "b", "shape": [3, 3], "datatype": "FP32", "data": [1] * 9},
        ]
    }
    result = extra_client.simulate_post("/v2/models/two_inputs/infer", json=body)
    assert_error(result, 400, "INFERENCE_FAILED")
    assert "onnxruntime_src" not in result.json["error"]
