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


# -- Generation ------------------------------------------------------------------------------

Temperature = Annotated[float, Meta(ge=0, le=100, description="0 is greedy.")]
TopP = Annotated[float, Meta(gt=0, le=1)]
TopK = Annotated[int, Meta(ge=0, description="0 samples from the whole vocabulary.")]
MaxTokens = Annotated[int, Meta(ge=1, description="Most tokens to generate.")]
Seed = Annotated[int, Meta(ge=0, le=2**63 - 1)]


class ModelInfo(_Body):
    """Which model version answered."""

    name: str
    version: str


class GenerateRequest(_Body, kw_only=True, forbid_unknown_fields=True):
    """``POST /generate`` (and the first message on ``/ws``)."""

    prompt: Annotated[str, Meta(min_length=1)]
    model: str | UnsetType = UNSET
    max_tokens: MaxTokens | UnsetType = UNSET
    temperature: Temperature = 1.0
    top_k: TopK = 0
    top_p: TopP = 1.0
    stop_sequences: list[str] = msgspec.field(default_factory=list)
    stream: bool = False
    seed: Seed | None = None


class GenerateResponse(_Body, kw_only=True):
    """The answer of ``POST /generate``, and the last event of a stream (``text`` then
    holds the whole text)."""

    text: str
    tokens_generated: int
    prompt_tokens: int
    finish_reason: Literal["stop", "length"]
    processing_time_ms: float
    model_info: ModelInfo


class GeneratedToken(_Body, kw_only=True):
    """One event of a ``/generate`` stream: the text a new token completes (may be empty)."""

    text: str
    token_id: int
    index: int


class StreamOptions(_Body, kw_only=True, forbid_unknown_fields=True):
    """OpenAI's ``stream_options``."""

    include_usage: bool = False


StopField = Annotated[str | list[str] | None, Meta(description="A text or texts that end it.")]
#: OpenAI's parameters that only their defaults are served for.
_Zero = Annotated[float, Meta(ge=0, le=0, description="Only 0 is supported.")]
_One = Annotated[int, Meta(ge=1, le=1, description="Only 1 is supported.")]


class CompletionRequest(_Body, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/completions``, as OpenAI's API takes it (one choice, no log probabilities)."""

    model: str
    prompt: Annotated[
        str | list[Any], Meta(description="A text, or a list of one text or of token ids.")
    ]
    max_tokens: MaxTokens | None = 16
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    n: _One = 1
    best_of: _One = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopField = None
    seed: Seed | None = None
    echo: Literal[False] = False
    logprobs: None = None
    frequency_penalty: _Zero = 0
    presence_penalty: _Zero = 0
    user: str | UnsetType = UNSET


class CompletionChoice(_Body, kw_only=True):
    """One choice of a completion (or of a streamed chunk)."""

    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class CompletionUsage(_Body):
    """Tokens a generation used."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(_Body, kw_only=True):
    """The answer of ``POST /v1/completions`` (and each chunk of its stream)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class ContentPart(_Body, kw_only=True, forbid_unknown_fields=True):
    """A text part of a message's content."""

    type: Literal["text"]
    text: str


class ChatMessage(_Body, kw_only=True, forbid_unknown_fields=True):
    """One message of a chat."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | UnsetType = UNSET


class ChatCompletionRequest(_Body, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/chat/completions``, as OpenAI's API takes it (text only, one choice)."""

    model: str
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    n: _One = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopField = None
    seed: Seed | None = None
    logprobs: Literal[False] = False
    frequency_penalty: _Zero = 0
    presence_penalty: _Zero = 0
    user: str | UnsetType = UNSET


class AssistantMessage(_Body, kw_only=True):
    """The model's message."""

    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Body, kw_only=True):
    """The one choice of a chat completion."""

    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(_Body, kw_only=True):
    """The answer of ``POST /v1/chat/completions``."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage


class Delta(_Body, kw_only=True, omit_defaults=True):
    """What a chunk adds to the message."""

    role: Literal["assistant"] | UnsetType = UNSET
    content: str | UnsetType = UNSET


class ChunkChoice(_Body, kw_only=True):
    """The one choice of a chat stream chunk."""

    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(_Body, kw_only=True):
    """One event of a chat completion stream."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None


# -- Image classification (``POST /v1/models/{m}:classify``) ----------------------------------


class ClassScore(_Body):
    """One class of an image and its score."""

    label: str
    score: float


class ImageClasses(_Body):
    """The best classes of one uploaded image, best first."""

    file: str
    predictions: list[ClassScore]


class ClassifyResponse(_Body, kw_only=True):
    """Every uploaded image's best classes, in upload order."""

    model_name: str
    model_version: str
    results: list[ImageClasses]


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
    GenerateRequest,
    GenerateResponse,
    GeneratedToken,
    CompletionRequest,
    Completion,
    ChatCompletionRequest,
    ChatCompletion,
    ChatCompletionChunk,
)


def components(
    types: tuple[Any, ...] = BODIES,
) -> tuple[tuple[dict[str, Any], ...], dict[str, Any]]:
    """JSON schemas of ``types`` (references) and the components they refer to."""
    return msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
