"""Wire schemas: one msgspec Struct for every JSON body the appliance reads or writes.

Requests are decoded straight from bytes into these types, so their shape is checked by the
types (a bool is not an int, a shape holds non-negative integers, datatypes are a closed set)
and a violation names its JSON path (``$.inputs[0].shape[0]``). What depends on the model
(names, datatypes, shapes, limits) is checked afterwards against its signature. The OpenAPI
document is generated from the same types (:func:`components`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import UNSET, Meta, Raw, Struct, UnsetType

from app.errors import ErrorCode
from app.models.errors import InvalidInput
from app.models.onnx import ModelState
from app.models.signature import Datatype

T = TypeVar("T")

#: Most dimensions a tensor may declare.
MAX_RANK = 16
Shape = Annotated[
    list[Annotated[int, Meta(ge=0)]],
    Meta(max_length=MAX_RANK, description="Dimensions of the tensor, row-major."),
]
SignatureShape = Annotated[list[int], Meta(description="Dimensions; -1 marks a dynamic one.")]
#: Values already encoded as JSON (numpy arrays are encoded natively by orjson).
EncodedValues = Annotated[
    Raw,
    Meta(extra_json_schema={"type": "array", "description": "Row-major values, flat."}),
]


class _Body(Struct, gc=False):
    """Base of every body: plain data that never forms a reference cycle, so the garbage
    collector need not track it (it is created and dropped several times per request)."""


# -- Open Inference Protocol: inference ------------------------------------------------------


class InputParameters(_Body, omit_defaults=True):
    """``parameters`` of one input tensor (others are accepted and ignored)."""

    binary_data_size: Annotated[int, Meta(ge=0)] | UnsetType = UNSET


class RequestInput(_Body, kw_only=True):
    """One input tensor: ``data`` as JSON, or its bytes after the JSON header."""

    name: str
    shape: Shape
    datatype: Datatype
    data: Annotated[
        Any,
        Meta(
            description="Row-major values, flat or nested; omitted when "
            "parameters.binary_data_size is given."
        ),
    ] = UNSET
    parameters: InputParameters | None = None


class OutputParameters(_Body):
    """``parameters`` of one requested output."""

    binary_data: bool = False


class RequestOutput(_Body, kw_only=True):
    """One output the client asks for."""

    name: str
    parameters: OutputParameters | None = None


class InferParameters(_Body, omit_defaults=True):
    """Request-wide ``parameters``."""

    binary_data_output: bool = False
    timeout: (
        Annotated[int, Meta(gt=0, description="Shorten the deadline, in microseconds (as Triton).")]
        | UnsetType
    ) = UNSET


class InferRequest(_Body, kw_only=True):
    """``POST /v2/models/{m}/infer``."""

    id: str | None = None
    parameters: InferParameters | None = None
    inputs: Annotated[list[RequestInput], Meta(min_length=1)]
    outputs: list[RequestOutput] | None = None


class ResponseParameters(_Body):
    """``parameters`` of an output sent as binary tensor data."""

    binary_data_size: int


class ResponseOutput(_Body, kw_only=True):
    """One output tensor of an inference response."""

    name: str
    datatype: Datatype
    shape: list[int]
    data: EncodedValues | UnsetType = UNSET
    parameters: ResponseParameters | UnsetType = UNSET


class InferResponse(_Body, kw_only=True):
    """An inference response; ``id`` echoes the request's."""

    model_name: str
    model_version: str
    id: str | UnsetType = UNSET
    outputs: list[ResponseOutput]


# -- Open Inference Protocol: server, health, metadata, repository -------------------------


class ServerMetadata(_Body):
    """``GET /v2``."""

    name: str
    version: str
    extensions: list[str]


class Live(_Body):
    """Liveness."""

    live: bool


class Ready(_Body):
    """Readiness."""

    ready: bool


class TensorMetadata(_Body):
    """One input or output of a model's signature."""

    name: str
    datatype: Datatype
    shape: SignatureShape


class ModelParameters(_Body, omit_defaults=True):
    """What ``model.toml`` says about the model for its clients."""

    labels: list[str] = msgspec.field(default_factory=list)
    description: str = ""


class ModelMetadata(_Body, kw_only=True):
    """``GET /v2/models/{m}[/versions/{v}]``."""

    name: str
    versions: list[str]
    platform: Literal["onnxruntime_onnx"] = "onnxruntime_onnx"
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: ModelParameters | UnsetType = UNSET


class ModelReady(_Body):
    """``GET /v2/models/{m}[/versions/{v}]/ready``."""

    name: str
    version: str
    ready: bool


class RepositoryIndexRequest(_Body):
    """``POST /v2/repository/index``; ``ready`` keeps only ready versions."""

    ready: bool = False


class RepositoryIndexEntry(_Body):
    """One model version in the repository index."""

    name: str
    version: str
    state: ModelState
    reason: str = ""


# -- Simple JSON (TensorFlow Serving / KServe V1) ------------------------------------------


class PredictRequest(_Body, kw_only=True):
    """``:predict`` rows (``instances``) or columns (``inputs``).

    The third form, one row keyed by the model's input names, is a plain object and is
    read as one when neither key is present.
    """

    instances: (
        Annotated[
            list[Any],
            Meta(
                min_length=1,
                description="One row per instance: the input's value, or an object keyed by "
                "input name for several inputs.",
            ),
        ]
        | UnsetType
    ) = UNSET
    inputs: Annotated[
        Any,
        Meta(description="A tensor (one input) or an object of tensors by input name."),
    ] = UNSET
    signature_name: str | UnsetType = UNSET


class PredictResponse(_Body):
    """Rows in, rows out."""

    predictions: Any
    model_name: str
    model_version: str


class PredictColumnsResponse(_Body):
    """Columns in, columns out: a tensor (one output) or an object of tensors."""

    outputs: Any
    model_name: str
    model_version: str


#: One row in, keyed by the model's input names; one row out, keyed by its output names.
OneRow = Annotated[
    dict[str, Any],
    Meta(title="OneRow", description="Values keyed by tensor name, without the batch dimension."),
]


TfState = Literal["AVAILABLE", "LOADING", "UNAVAILABLE"]


class VersionStatus(_Body):
    """TensorFlow Serving's status of one version."""

    error_code: str = "OK"
    error_message: str = ""


class ModelVersionStatus(_Body):
    """One version in ``GET /v1/models/{m}``."""

    version: str
    state: TfState
    status: VersionStatus


class ModelStatus(_Body):
    """``GET /v1/models/{m}``: the model's versions and their states."""

    model_name: str
    default_version: str
    model_version_status: list[ModelVersionStatus]


# -- Errors ----------------------------------------------------------------------------------


class ErrorBody(_Body):
    """Every error: a message, a stable code and the request id."""

    error: str
    error_code: ErrorCode
    request_id: str


# -- Decoding and encoding -------------------------------------------------------------------

_encoder = msgspec.json.Encoder()
_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


def decode(body: bytes | memoryview, kind: type[T]) -> T:
    """Decode a request body into ``kind``.

    Raises:
        InvalidInput: not JSON, or not of that shape; the message names the JSON path.
    """
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        return decoder.decode(body)  # type: ignore[no-any-return]
    except msgspec.ValidationError as exc:
        raise InvalidInput(f"invalid request body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None


def encode(doc: Any) -> bytes:
    """Encode a response body (Structs, and the lists and dicts inside them)."""
    return _encoder.encode(doc)


#: Every body type, for the OpenAPI components.
BODIES: tuple[Any, ...] = (
    InferRequest,
    InferResponse,
    ServerMetadata,
    Live,
    Ready,
    ModelMetadata,
    ModelReady,
    RepositoryIndexRequest,
    list[RepositoryIndexEntry],
    PredictRequest,
    PredictResponse,
    PredictColumnsResponse,
    OneRow,
    ModelStatus,
    ErrorBody,
)


def components(
    types: tuple[Any, ...] = BODIES,
) -> tuple[tuple[dict[str, Any], ...], dict[str, Any]]:
    """JSON schemas of ``types`` (references) and the components they refer to."""
    return msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
