"""Open Inference Protocol bodies as pure functions of bytes and signatures."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from app.models.errors import InvalidInput, PayloadTooLarge
from app.models.onnx import ModelState
from app.models.signature import Signature, TensorSpec
from app.protocols import v2

SIGNATURE = Signature(
    "m",
    "3",
    (TensorSpec("x", "FP32", (-1, 2)), TensorSpec("t", "BYTES", (-1,))),
    (TensorSpec("y", "FP32", (-1, 2)), TensorSpec("label", "INT64", (-1,))),
    labels=("no", "yes"),
)


def body(**doc: object) -> bytes:
    base: dict[str, object] = {
        "inputs": [
            {"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [[0.5, 1.5]]},
            {"name": "t", "shape": [1], "datatype": "BYTES", "data": ["hi"]},
        ]
    }
    return json.dumps(base | doc).encode()


def test_json_inputs_become_arrays_of_the_signatures_types() -> None:
    request = v2.parse_infer(body(id="r1"), None, SIGNATURE, 100)
    assert request.id == "r1"
    assert request.inputs["x"].dtype == np.float32
    assert request.inputs["x"].tolist() == [[0.5, 1.5]]
    assert request.inputs["t"].tolist() == ["hi"]
    assert request.outputs is None and request.timeout is None


def test_binary_inputs_follow_the_json_header() -> None:
    header = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [1, 2], "datatype": "FP32",
                 "parameters": {"binary_data_size": 8}},
                {"name": "t", "shape": [1], "datatype": "BYTES",
                 "parameters": {"binary_data_size": 6}},
            ],
            "parameters": {"binary_data_output": True, "timeout": 250000},
        }
    ).encode()  # fmt: skip
    raw = header + np.array([1.0, 2.0], "<f4").tobytes() + struct.pack("<I", 2) + b"ok"
    request = v2.parse_infer(raw, len(header), SIGNATURE, 100)
    assert request.inputs["x"].tolist() == [[1.0, 2.0]]
    assert request.inputs["t"].tolist() == ["ok"]
    assert request.binary_outputs == {"y", "label"}
    assert request.timeout == 0.25


@pytest.mark.parametrize(
    ("doc", "header", "error", "fragment"),
    [
        ({"inputs": [{"name": "z", "shape": [1], "datatype": "FP32", "data": [1]}]}, None,
         InvalidInput, "no input 'z'"),
        ({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP64", "data": [1, 2]}]}, None,
         InvalidInput, "has datatype 'FP64' but the model expects FP32"),
        ({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]},
         None, InvalidInput, "has shape [1, 3]"),
        ({"inputs": [{"name": "x", "shape": [100, 2], "datatype": "FP32", "data": [1]}]}, None,
         PayloadTooLarge, "200 elements; the limit is 100"),
        ({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32"}]}, None,
         InvalidInput, "neither 'data' nor binary_data_size"),
        ({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32",
                      "parameters": {"binary_data_size": 8}}]}, None,
         InvalidInput, "no Inference-Header-Content-Length"),
        ({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}] * 2},
         None, InvalidInput, "more than once"),
        ({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}],
          "outputs": [{"name": "y"}, {"name": "y"}]}, None, InvalidInput, "more than once"),
        ({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}],
          "outputs": [{"name": "nope"}]}, None, InvalidInput, "no output(s) 'nope'"),
        ({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}, 10_000,
         InvalidInput, "Inference-Header-Content-Length is 10000"),
    ],
)  # fmt: skip
def test_requests_that_do_not_fit_the_signature(
    doc: dict[str, object], header: int | None, error: type[Exception], fragment: str
) -> None:
    with pytest.raises(error) as info:
        v2.parse_infer(json.dumps(doc).encode(), header, SIGNATURE, 100)
    assert fragment in str(info.value)


def test_unclaimed_binary_bytes_are_refused() -> None:
    header = body()
    with pytest.raises(InvalidInput, match="3 bytes of binary data that no input claims"):
        v2.parse_infer(header + b"abc", len(header), SIGNATURE, 100)


def test_responses_echo_the_id_and_encode_json_or_binary() -> None:
    results = {
        "y": np.array([[0.25, 0.75]], np.float32),
        "label": np.array([1], np.int64),
    }
    plain = v2.parse_infer(body(id="r9"), None, SIGNATURE, 100)
    data, header_length = v2.encode_infer(SIGNATURE, plain, results)
    assert header_length is None
    assert json.loads(data) == {
        "model_name": "m",
        "model_version": "3",
        "id": "r9",
        "outputs": [
            {"name": "y", "datatype": "FP32", "shape": [1, 2], "data": [0.25, 0.75]},
            {"name": "label", "datatype": "INT64", "shape": [1], "data": [1]},
        ],
    }
    binary = v2.parse_infer(body(outputs=[{"name": "y", "parameters": {"binary_data": True}}]),
                            None, SIGNATURE, 100)  # fmt: skip
    data, header_length = v2.encode_infer(SIGNATURE, binary, {"y": results["y"]})
    assert header_length is not None
    doc = json.loads(data[:header_length])
    assert "id" not in doc
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": 8}
    assert np.frombuffer(data[header_length:], "<f4").tolist() == [0.25, 0.75]


def test_metadata_readiness_and_index_shapes() -> None:
    meta = v2.model_metadata(SIGNATURE, ["1", "3"])
    assert meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, t.shape) for t in meta.inputs] == [
        ("x", "FP32", [-1, 2]),
        ("t", "BYTES", [-1]),
    ]
    assert meta.parameters.labels == ["no", "yes"]  # type: ignore[union-attr]
    bare = v2.model_metadata(Signature("n", "1"), ["1"])
    assert "parameters" not in json.loads(v2.schema.encode(bare))
    assert v2.model_ready(SIGNATURE).ready
    index = v2.repository_index(
        [("a", "1", ModelState.READY), ("a", "2", ModelState.LOADING)], only_ready=True
    )
    assert [(e.name, e.version, e.state) for e in index] == [("a", "1", "READY")]
    assert v2.parse_index_request(b"") is False
    assert v2.parse_index_request(b'{"ready": true}') is True
    with pytest.raises(InvalidInput, match="ready"):
        v2.parse_index_request(b'{"ready": "yes"}')
