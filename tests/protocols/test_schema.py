"""Wire schemas: decoding checks shapes by type and names the JSON path; encoding is JSON."""

from __future__ import annotations

import json

import msgspec
import pytest

from app.errors import ErrorCode
from app.models.errors import InvalidInput
from app.protocols import schema


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"inputs": [{"name": "x", "shape": [true], "datatype": "FP32", "data": [1]}]}',
         "Expected `int`, got `bool` - at `$.inputs[0].shape[0]`"),
        (b'{"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]}',
         "Expected `int` >= 0 - at `$.inputs[0].shape[0]`"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP33", "data": [1]}]}',
         "at `$.inputs[0].datatype`"),
        (b'{"inputs": []}', "length >= 1 - at `$.inputs`"),
        (b'{"inputs": [{"shape": [1], "datatype": "FP32"}]}', "missing required field `name`"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}], "id": 5}',
         "Expected `str | null`, got `int` - at `$.id`"),
        (b'{"inputs": [', "not valid JSON"),
        (b'{"id": "\xff\xfe", "inputs": []}', "not valid UTF-8"),
        (b"[]", "Expected `object`, got `array`"),
    ],
)  # fmt: skip
def test_bad_infer_requests_name_the_json_path(body: bytes, fragment: str) -> None:
    with pytest.raises(InvalidInput) as info:
        schema.decode(body, schema.InferRequest)
    assert fragment in info.value.message


def test_shapes_are_bounded_in_rank() -> None:
    deep = {"inputs": [{"name": "x", "shape": [1] * 17, "datatype": "FP32", "data": [1]}]}
    with pytest.raises(InvalidInput, match="length <= 16"):
        schema.decode(json.dumps(deep).encode(), schema.InferRequest)


def test_a_good_request_decodes_to_typed_fields() -> None:
    body = {
        "id": "r1",
        "parameters": {"binary_data_output": True, "timeout": 5000, "other": "ignored"},
        "inputs": [{"name": "x", "shape": [2], "datatype": "INT64", "data": [1, 2]}],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
    }
    request = schema.decode(json.dumps(body).encode(), schema.InferRequest)
    assert request.id == "r1"
    assert request.parameters is not None and request.parameters.timeout == 5000
    assert request.inputs[0].shape == [2]
    assert request.inputs[0].parameters is None
    assert request.outputs is not None and request.outputs[0].parameters.binary_data  # type: ignore[union-attr]


def test_error_bodies_carry_the_code_as_text() -> None:
    body = schema.encode(schema.ErrorBody("bad", ErrorCode.INVALID_INPUT, "rid"))
    assert json.loads(body) == {"error": "bad", "error_code": "INVALID_INPUT", "request_id": "rid"}


def test_encoded_values_are_written_as_they_are() -> None:
    output = schema.ResponseOutput(
        name="y", datatype="FP32", shape=[2], data=msgspec.Raw(b"[1.5,2.0]")
    )
    doc = json.loads(schema.encode(output))
    assert doc == {"name": "y", "datatype": "FP32", "shape": [2], "data": [1.5, 2.0]}


def test_every_body_has_a_component_schema() -> None:
    refs, components = schema.components()
    assert len(refs) == len(schema.BODIES)
    for name in ("InferRequest", "InferResponse", "ErrorBody", "ErrorCode", "PredictRequest"):
        assert name in components
    assert set(components["ErrorCode"]["enum"]) == set(ErrorCode)
