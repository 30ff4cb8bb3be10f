"""Open Inference Protocol over gRPC: protobuf messages to arrays and back.

The twin of :mod:`app.protocols.v2` (REST): pure functions of messages, signatures and
arrays; the checks are the same (names, datatypes, shapes, element counts) and so are the
messages of the errors. Tensors come as ``raw_input_contents`` (little-endian, row-major, as
the binary tensor data extension; BYTES elements with a 4-byte length prefix) or as typed
``contents``; the answer uses the form the request used.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from app.models.errors import InvalidInput
from app.models.onnx import ModelState
from app.models.signature import DATATYPE_TO_NUMPY, NUMPY_TO_DATATYPE, Datatype, Signature
from app.protocols.grpc import inference_pb2 as pb
from app.protocols.tensors import array_from_bytes, array_to_bytes
from app.protocols.v2 import EXTENSIONS, Inference, checked_input

#: The typed ``contents`` field of each datatype (FP16 has none: it must come raw).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parse_infer(
    request: pb.ModelInferRequest, signature: Signature, max_elements: int
) -> tuple[Inference, bool]:
    """Decode ``ModelInfer``'s request.

    Returns:
        The inference, and whether its tensors came raw (the answer's outputs then do too).

    Raises:
        InvalidInput: anything malformed; PayloadTooLarge: a tensor over the element limit.
    """
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs"
        )
    inputs: dict[str, np.ndarray] = {}
    for i, item in enumerate(request.inputs):
        name = item.name
        spec, shape = checked_input(
            signature, name, item.datatype, list(item.shape), max_elements, inputs
        )
        if raw:
            if item.HasField("contents"):
                raise InvalidInput(f"input {name!r} has contents as well as raw_input_contents")
            inputs[name] = array_from_bytes(
                name, memoryview(raw[i]), spec.datatype, shape, spec.raw
            )
        else:
            inputs[name] = _from_contents(name, item.contents, spec.datatype, shape, spec.raw)
    outputs = [o.name for o in request.outputs]
    if len(set(outputs)) != len(outputs):
        raise InvalidInput("an output is requested more than once")
    signature.check_outputs(outputs)
    inference = Inference(request.id or None, inputs, None, outputs or None)
    return inference, bool(raw)


def _from_contents(
    name: str,
    contents: pb.InferTensorContents,
    datatype: Datatype,
    shape: tuple[int, ...],
    raw: bool,
) -> np.ndarray:
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInput(f"input {name!r} is {datatype}: send it in raw_input_contents")
    values: Sequence[Any] = getattr(contents, field)
    expected = int(np.prod(shape))
    if len(values) != expected:
        raise InvalidInput(
            f"input {name!r}: contents has {len(values)} elements but shape "
            f"{list(shape)} needs {expected}"
        )
    if datatype == "BYTES":
        array = np.empty(expected, dtype=object)
        for i, value in enumerate(values):
            if raw:
                array[i] = bytes(value)
                continue
            try:
                array[i] = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput(f"input {name!r}: BYTES element {i} is not UTF-8 text") from None
        return array.reshape(shape)
    target = DATATYPE_TO_NUMPY[datatype]
    wide = np.asarray(values)
    if wide.size and np.issubdtype(target, np.integer):
        info = np.iinfo(target.type)  # type: ignore[type-var]
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidInput(f"input {name!r}: a value is out of range for {datatype}")
    return wide.astype(target, copy=False).reshape(shape)


#: Request parameters a generation stream reads, and the kind of value each must be.
SAMPLING_PARAMETERS = {
    "max_tokens": int,
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "seed": int,
}


def sampling_parameters(request: pb.ModelInferRequest) -> dict[str, Any]:
    """The sampling settings in a generation request's ``parameters``.

    Raises:
        InvalidInput: an unknown parameter or a value of the wrong kind.
    """
    out: dict[str, Any] = {}
    for name, parameter in request.parameters.items():
        if name.startswith("triton_"):
            continue  # the client's own bookkeeping (e.g. empty final responses)
        kind = SAMPLING_PARAMETERS.get(name)
        if kind is None:
            raise InvalidInput(
                f"unknown parameter {name!r}; generation takes {', '.join(SAMPLING_PARAMETERS)}"
            )
        which = parameter.WhichOneof("parameter_choice")
        value = getattr(parameter, which) if which else None
        if (
            which == "bool_param"
            or not isinstance(value, int | float)
            or (kind is int and not isinstance(value, int))
        ):
            raise InvalidInput(f"parameter {name!r} must be a number ({kind.__name__})")
        out[name] = kind(value)
    return out


def encode_infer(
    signature: Signature, inference: Inference, results: dict[str, np.ndarray], raw: bool
) -> pb.ModelInferResponse:
    """``ModelInfer``'s answer: raw output contents when the request was raw, else typed."""
    response = pb.ModelInferResponse(
        model_name=signature.name, model_version=signature.version, id=inference.id or ""
    )
    datatypes = {name: NUMPY_TO_DATATYPE.get(a.dtype, "BYTES") for name, a in results.items()}
    # Raw contents go for every output or for none, and FP16 has no typed field.
    raw = raw or "FP16" in datatypes.values()
    for name, array in results.items():
        datatype = datatypes[name]
        tensor = response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        if raw:
            response.raw_output_contents.append(array_to_bytes(array, datatype))
            continue
        flat = array.reshape(-1)
        target = getattr(tensor.contents, CONTENTS_FIELD[datatype])
        if datatype == "BYTES":
            target.extend(v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in flat)
        else:
            target.extend(flat.tolist())
    return response


def server_metadata(name: str, version: str) -> pb.ServerMetadataResponse:
    """``ServerMetadata``."""
    return pb.ServerMetadataResponse(name=name, version=version, extensions=EXTENSIONS)


def model_metadata(signature: Signature, versions: list[str]) -> pb.ModelMetadataResponse:
    """``ModelMetadata`` of a model version; ``versions`` lists every version of the model."""
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=signature.name,
        versions=versions,
        platform="onnxruntime_onnx",
        inputs=[tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in signature.inputs],
        outputs=[
            tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in signature.outputs
        ],
    )


def repository_index(
    versions: Iterable[tuple[str, str, ModelState]], only_ready: bool
) -> pb.RepositoryIndexResponse:
    """``RepositoryIndex`` of ``(name, version, state)`` triples."""
    entry = pb.RepositoryIndexResponse.ModelIndex
    return pb.RepositoryIndexResponse(
        models=[
            entry(name=name, version=version, state=state.value)
            for name, version, state in versions
            if not only_ready or state is ModelState.READY
        ]
    )
