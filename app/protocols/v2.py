"""Open Inference Protocol (KServe V2) REST inference bodies, JSON and binary tensor data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from app.models.errors import InvalidInput
from app.models.onnx import OnnxModel
from app.models.signature import DATATYPE_TO_NUMPY, NUMPY_TO_DATATYPE
from app.protocols.tensors import (
    array_from_bytes,
    array_from_json,
    array_to_bytes,
    check_shape,
    to_json_data,
)

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_CONTENT_TYPE = "application/octet-stream"
EXTENSIONS = ["binary_tensor_data", "model_repository"]


@dataclass(slots=True)
class InferRequest:
    """A decoded inference request, checked against the model's signature.

    Attributes:
        id: Client's request id, echoed in the response.
        inputs: Arrays by input name.
        outputs: Output names asked for, or ``None`` for all.
        binary_outputs: Names of outputs to return as binary tensor data.
        timeout: The client's ``parameters.timeout`` in seconds (sent in microseconds, as
            Triton does), or None.
    """

    id: str | None
    inputs: dict[str, np.ndarray]
    timeout: float | None = None
    outputs: list[str] | None = None
    binary_outputs: set[str] = field(default_factory=set)


def parse_json(body: bytes | memoryview) -> Any:
    """Parse JSON, mapping every decoder complaint to InvalidInput."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None


def _params(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput(f"{where}: 'parameters' must be an object")
    return params


def parse_infer(
    body: bytes, header_length: int | None, model: OnnxModel, max_elements: int
) -> InferRequest:
    """Decode an inference request body.

    Args:
        body: The whole request body.
        header_length: ``Inference-Header-Content-Length`` when the body carries binary
            tensors after the JSON header, else ``None``.
        model: The model version that will serve it.
        max_elements: Largest element count of one input.

    Raises:
        InvalidInput: anything malformed; PayloadTooLarge: a tensor over the element limit.
    """
    if header_length is not None and not 0 < header_length <= len(body):
        raise InvalidInput(f"{HEADER_LENGTH} is {header_length} but the body has {len(body)} bytes")
    view = memoryview(body)
    doc = parse_json(view[:header_length] if header_length is not None else view)
    if not isinstance(doc, dict):
        raise InvalidInput("request body must be a JSON object with an 'inputs' list")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")
    inputs_doc = doc.get("inputs")
    if not isinstance(inputs_doc, list) or not inputs_doc:
        raise InvalidInput("'inputs' must be a non-empty list of tensors")
    binary = view[header_length:] if header_length is not None else view[:0]
    offset = 0
    inputs: dict[str, np.ndarray] = {}
    for item in inputs_doc:
        if not isinstance(item, dict):
            raise InvalidInput("each entry of 'inputs' must be an object")
        name = item.get("name")
        if not isinstance(name, str):
            raise InvalidInput("each input needs a string 'name'")
        if name in inputs:
            raise InvalidInput(f"input {name!r} is given more than once")
        spec = model.input_spec(name)
        datatype = item.get("datatype")
        if datatype != spec.datatype:
            known = datatype in DATATYPE_TO_NUMPY
            raise InvalidInput(
                f"input {name!r} has datatype {datatype!r} but the model expects {spec.datatype}"
                if known or datatype is None
                else f"input {name!r}: unknown datatype {datatype!r}"
            )
        shape = check_shape(name, item.get("shape"), max_elements)
        if not spec.accepts_shape(shape):
            raise InvalidInput(
                f"input {name!r} has shape {list(shape)} but model "
                f"{model.name!r} expects {list(spec.shape)} (-1 is any size)"
            )
        size = _params(item, f"input {name!r}").get("binary_data_size")
        if size is not None:
            if header_length is None:
                raise InvalidInput(
                    f"input {name!r} has binary_data_size but the request has "
                    f"no {HEADER_LENGTH} header"
                )
            if type(size) is not int or size < 0 or offset + size > len(binary):
                raise InvalidInput(
                    f"input {name!r}: binary_data_size {size!r} does not fit "
                    f"the {len(binary) - offset} bytes left in the body"
                )
            inputs[name] = array_from_bytes(name, binary[offset : offset + size], datatype, shape)
            offset += size
        elif "data" in item:
            inputs[name] = array_from_json(name, item["data"], datatype, shape)
        else:
            raise InvalidInput(f"input {name!r} has neither 'data' nor binary_data_size")
    if offset != len(binary):
        raise InvalidInput(
            f"the body has {len(binary) - offset} bytes of binary data that no input claims"
        )
    request = InferRequest(request_id, inputs, timeout=_parse_timeout(doc))
    _parse_outputs(doc, model, request)
    return request


def _parse_timeout(doc: dict[str, Any]) -> float | None:
    timeout = _params(doc, "request").get("timeout")
    if timeout is None:
        return None
    if type(timeout) is not int or timeout <= 0:
        raise InvalidInput("parameters.timeout must be a positive integer (microseconds)")
    return timeout / 1_000_000


def _parse_outputs(doc: dict[str, Any], model: OnnxModel, request: InferRequest) -> None:
    all_binary = _params(doc, "request").get("binary_data_output") is True
    outputs_doc = doc.get("outputs")
    if outputs_doc is None:
        if all_binary:
            request.binary_outputs = {s.name for s in model.outputs}
        return
    if not isinstance(outputs_doc, list):
        raise InvalidInput("'outputs' must be a list of objects with a 'name'")
    names: list[str] = []
    for item in outputs_doc:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput("each entry of 'outputs' must be an object with a string 'name'")
        name = item["name"]
        if name in names:
            raise InvalidInput(f"output {name!r} is requested more than once")
        names.append(name)
        if all_binary or _params(item, f"output {name!r}").get("binary_data") is True:
            request.binary_outputs.add(name)
    model.check_outputs(names)
    request.outputs = names or None


def encode_infer(
    model: OnnxModel, request: InferRequest, results: dict[str, np.ndarray]
) -> tuple[bytes, int | None]:
    """Encode the response.

    Returns:
        The body and, when binary outputs follow the JSON header, that header's length.
    """
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, array in results.items():
        datatype = NUMPY_TO_DATATYPE.get(array.dtype, "BYTES")
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if name in request.binary_outputs:
            raw = array_to_bytes(array, datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = to_json_data(array)
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": model.name, "model_version": model.version_str}
    if request.id is not None:
        doc["id"] = request.id
    doc["outputs"] = outputs
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)
