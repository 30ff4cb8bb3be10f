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


# -- Text: OpenAI-compatible ---------------------------------------------------------------

#: Vectors as JSON arrays (encoded natively from numpy).
EncodedVectors = Annotated[
    Raw,
    Meta(
        extra_json_schema={
            "type": "array",
            "items": {"type": "array", "items": {"type": "number"}},
            "description": "One vector per input, in input order.",
        }
    ),
]


class EmbeddingsRequest(_Body, kw_only=True):
    """``POST /v1/embeddings``, as OpenAI's API takes it."""

    input: Annotated[
        str | list[Any],
        Meta(description="A text, a list of texts, a list of token ids, or a list of such lists."),
    ]
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Meta(ge=1)] | UnsetType = UNSET
    user: str | UnsetType = UNSET


class Embedding(_Body, kw_only=True):
    """One vector: numbers, or base64 of little-endian float32."""

    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Annotated[
        Any,
        Meta(
            extra_json_schema={
                "anyOf": [{"type": "array", "items": {"type": "number"}}, {"type": "string"}]
            }
        ),
    ]


class Usage(_Body):
    """Tokens a request used."""

    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(_Body, kw_only=True):
    """The vectors of ``POST /v1/embeddings``."""

    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(_Body, kw_only=True):
    """One model in ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "onnx-appliance"


class ModelList(_Body, kw_only=True):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIError(_Body, kw_only=True):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(_Body):
    """Errors on the OpenAI-compatible routes: OpenAI's shape, plus the usual code and id."""

    error: OpenAIError
    error_code: ErrorCode
    request_id: str


# -- Text: text-embeddings-inference and LLM serving layers ------------------------------


class EmbedRequest(_Body, kw_only=True):
    """``POST /embed``, as text-embeddings-inference takes it."""

    inputs: str | list[str]
    normalize: bool = True
    truncate: bool = False
    truncation_direction: Literal["Right", "right"] = "Right"
    model: str | UnsetType = UNSET


class TextsEmbeddingRequest(_Body, kw_only=True):
    """``POST /embeddings`` (``input``) and ``POST /batch_embed`` (``texts``)."""

    input: str | list[str] | UnsetType = UNSET
    texts: list[str] | UnsetType = UNSET
    truncate: bool = True
    model: str | UnsetType = UNSET


class TextsEmbeddingResponse(_Body, kw_only=True):
    """The vectors of ``POST /embeddings`` and ``POST /batch_embed``."""

    embeddings: EncodedVectors
    model: str
    dimensions: int
    count: int
    token_count: int


class TokenizeRequest(_Body, kw_only=True):
    """``POST /tokenize``: ``text`` (LLM serving layers) or ``inputs`` (TEI)."""

    text: str | UnsetType = UNSET
    inputs: str | list[str] | UnsetType = UNSET
    add_special_tokens: bool | UnsetType = UNSET
    add_bos: bool | UnsetType = UNSET
    model: str | UnsetType = UNSET


class TokenizeResponse(_Body):
    """Token ids of a ``text``."""

    tokens: list[int]
    token_count: int
    text_length: int


class Token(_Body, kw_only=True):
    """One token of an ``inputs`` text (TEI): its id, text and character span."""

    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


class DetokenizeRequest(_Body, kw_only=True):
    """``POST /detokenize`` and ``/decode``: ``tokens`` (one list) or ``ids`` (TEI: one list
    or a list of lists)."""

    tokens: list[int] | UnsetType = UNSET
    ids: list[Any] | UnsetType = UNSET
    skip_special_tokens: bool = True
    model: str | UnsetType = UNSET


class DetokenizeResponse(_Body):
    """The text of ``tokens``."""

    text: str


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
    except UnicodeDecodeError:
        raise InvalidInput("request body is not valid UTF-8") from None


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
    EmbeddingsRequest,
    EmbeddingsResponse,
    ModelList,
    OpenAIErrorBody,
    EmbedRequest,
    TextsEmbeddingRequest,
    TextsEmbeddingResponse,
    TokenizeRequest,
    TokenizeResponse,
    list[list[Token]],
    DetokenizeRequest,
    DetokenizeResponse,
)


def components(
    types: tuple[Any, ...] = BODIES,
) -> tuple[tuple[dict[str, Any], ...], dict[str, Any]]:
    """JSON schemas of ``types`` (references) and the components they refer to."""
    return msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
