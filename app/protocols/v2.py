"""Open Inference Protocol (KServe V2) over REST: inference (JSON and binary tensor data),
server and model metadata, readiness and the repository index.

Pure functions of bytes, signatures and arrays: no HTTP, no sessions.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from dataclasses import dataclass, field

import numpy as np
import orjson
from msgspec import UNSET, Raw

from app.models.errors import InvalidInput
from app.models.onnx import ModelState
from app.models.signature import NUMPY_TO_DATATYPE, Datatype, Signature, TensorSpec
from app.protocols import schema
from app.protocols.tensors import (
    array_from_bytes,
    array_from_json,
    array_to_bytes,
    check_elements,
    to_json_data,
)

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_CONTENT_TYPE = "application/octet-stream"
EXTENSIONS = ["binary_tensor_data", "model_repository"]
_NO_PARAMETERS = schema.InferParameters()


@dataclass(slots=True)
class Inference:
    """A decoded inference request, checked against the model's signature.

    Attributes:
        id: Client's request id, echoed in the response.
        inputs: Arrays by input name.
        timeout: The client's ``parameters.timeout`` in seconds (sent in microseconds, as
            Triton does), or None.
        outputs: Output names asked for, or ``None`` for all.
        binary_outputs: Names of outputs to return as binary tensor data.
    """

    id: str | None
    inputs: dict[str, np.ndarray]
    timeout: float | None = None
    outputs: list[str] | None = None
    binary_outputs: set[str] = field(default_factory=set)


def checked_input(
    signature: Signature,
    name: str,
    datatype: str,
    shape: list[int],
    max_elements: int,
    seen: Container[str],
) -> tuple[TensorSpec, tuple[int, ...]]:
    """The spec of a request's input and its shape, once both fit the model (every front's
    checks, with the same messages).

    Raises:
        InvalidInput: an unknown or repeated input, another datatype, a shape that does not fit.
        PayloadTooLarge: more elements than ``max_elements``.
    """
    if name in seen:
        raise InvalidInput(f"input {name!r} is given more than once")
    spec = signature.input_spec(name)
    if datatype != spec.datatype:
        raise InvalidInput(
            f"input {name!r} has datatype {datatype!r} but the model expects {spec.datatype}"
        )
    checked = check_elements(name, shape, max_elements)
    if not spec.accepts_shape(checked):
        raise InvalidInput(
            f"input {name!r} has shape {list(checked)} but model "
            f"{signature.name!r} expects {list(spec.shape)} (-1 is any size)"
        )
    return spec, checked


def parse_infer(
    body: bytes, header_length: int | None, signature: Signature, max_elements: int
) -> Inference:
    """Decode an inference request body.

    Args:
        body: The whole request body.
        header_length: ``Inference-Header-Content-Length`` when the body carries binary
            tensors after the JSON header, else ``None``.
        signature: The signature of the model version that will serve it.
        max_elements: Largest element count of one input.

    Raises:
        InvalidInput: anything malformed; PayloadTooLarge: a tensor over the element limit.
    """
    if header_length is not None and not 0 < header_length <= len(body):
        raise InvalidInput(f"{HEADER_LENGTH} is {header_length} but the body has {len(body)} bytes")
    view = memoryview(body)
    request = schema.decode(
        view[:header_length] if header_length is not None else view, schema.InferRequest
    )
    binary = view[header_length:] if header_length is not None else view[:0]
    offset = 0
    inputs: dict[str, np.ndarray] = {}
    for item in request.inputs:
        name = item.name
        spec, shape = checked_input(
            signature, name, item.datatype, item.shape, max_elements, inputs
        )
        size = item.parameters.binary_data_size if item.parameters is not None else UNSET
        if size is not UNSET:
            if header_length is None:
                raise InvalidInput(
                    f"input {name!r} has binary_data_size but the request has "
                    f"no {HEADER_LENGTH} header"
                )
            if offset + size > len(binary):
                raise InvalidInput(
                    f"input {name!r}: binary_data_size {size} does not fit "
                    f"the {len(binary) - offset} bytes left in the body"
                )
            inputs[name] = array_from_bytes(
                name, binary[offset : offset + size], item.datatype, shape, spec.raw
            )
            offset += size
        elif item.data is not UNSET:
            inputs[name] = array_from_json(name, item.data, item.datatype, shape, spec.raw)
        else:
            raise InvalidInput(f"input {name!r} has neither 'data' nor binary_data_size")
    if offset != len(binary):
        raise InvalidInput(
            f"the body has {len(binary) - offset} bytes of binary data that no input claims"
        )
    parameters = request.parameters or _NO_PARAMETERS
    timeout = parameters.timeout / 1_000_000 if parameters.timeout is not UNSET else None
    inference = Inference(request.id, inputs, timeout)
    _requested_outputs(request, parameters.binary_data_output, signature, inference)
    return inference


def _requested_outputs(
    request: schema.InferRequest, all_binary: bool, signature: Signature, inference: Inference
) -> None:
    if request.outputs is None:
        if all_binary:
            inference.binary_outputs = {s.name for s in signature.outputs}
        return
    names: list[str] = []
    for item in request.outputs:
        if item.name in names:
            raise InvalidInput(f"output {item.name!r} is requested more than once")
        names.append(item.name)
        if all_binary or (item.parameters is not None and item.parameters.binary_data):
            inference.binary_outputs.add(item.name)
    signature.check_outputs(names)
    inference.outputs = names or None


def encode_infer(
    signature: Signature, inference: Inference, results: dict[str, np.ndarray]
) -> tuple[bytes, int | None]:
    """Encode the response.

    Returns:
        The body and, when binary outputs follow the JSON header, that header's length.
    """
    outputs: list[schema.ResponseOutput] = []
    chunks: list[bytes] = []
    for name, array in results.items():
        datatype = NUMPY_TO_DATATYPE.get(array.dtype, "BYTES")
        if name in inference.binary_outputs:
            raw = array_to_bytes(array, datatype)
            chunks.append(raw)
            outputs.append(
                schema.ResponseOutput(
                    name=name,
                    datatype=datatype,
                    shape=list(array.shape),
                    parameters=schema.ResponseParameters(len(raw)),
                )
            )
        else:
            # orjson writes numpy arrays natively, far faster than lists of Python floats.
            data = orjson.dumps(to_json_data(array), option=orjson.OPT_SERIALIZE_NUMPY)
            outputs.append(
                schema.ResponseOutput(
                    name=name,
                    datatype=datatype,
                    shape=list(array.shape),
                    data=Raw(data),
                )
            )
    header = schema.encode(
        schema.InferResponse(
            model_name=signature.name,
            model_version=signature.version,
            id=inference.id if inference.id is not None else UNSET,
            outputs=outputs,
        )
    )
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)


def server_metadata(name: str, version: str) -> schema.ServerMetadata:
    """``GET /v2``."""
    return schema.ServerMetadata(name, version, EXTENSIONS)


def model_metadata(signature: Signature, versions: list[str]) -> schema.ModelMetadata:
    """Metadata of a model version; ``versions`` lists every version of the model."""
    about = (
        schema.ModelParameters(list(signature.labels), signature.description)
        if signature.labels or signature.description
        else UNSET
    )
    return schema.ModelMetadata(
        name=signature.name,
        versions=versions,
        inputs=[_tensor(s.name, s.datatype, s.shape) for s in signature.inputs],
        outputs=[_tensor(s.name, s.datatype, s.shape) for s in signature.outputs],
        parameters=about,
    )


def _tensor(name: str, datatype: Datatype, shape: tuple[int, ...]) -> schema.TensorMetadata:
    return schema.TensorMetadata(name, datatype, list(shape))


def model_ready(signature: Signature) -> schema.ModelReady:
    """A ready model version (unready ones are errors)."""
    return schema.ModelReady(signature.name, signature.version, True)


def parse_index_request(body: bytes) -> bool:
    """Whether a repository index request asks for ready versions only (empty body: no).

    Raises:
        InvalidInput: a body that is not ``{"ready": bool}``.
    """
    if not body.strip():
        return False
    return schema.decode(body, schema.RepositoryIndexRequest).ready


def repository_index(
    versions: Iterable[tuple[str, str, ModelState]], only_ready: bool
) -> list[schema.RepositoryIndexEntry]:
    """The index of ``(name, version, state)`` triples."""
    return [
        schema.RepositoryIndexEntry(name, version, state)
        for name, version, state in versions
        if not only_ready or state is ModelState.READY
    ]
