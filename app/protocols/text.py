"""Text routes' bodies: OpenAI embeddings and model list, text-embeddings-inference's
``/embed``, LLM serving layers' ``/embeddings`` and ``/batch_embed``, and tokenization.

Pure functions of bytes, arrays and token lists: no HTTP, no tokenizer (the serving layer
tokenizes; these functions only say what the client asked for and shape the answers).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import orjson
from msgspec import UNSET, Raw
from tokenizers import Encoding

from app.models.errors import InvalidInput
from app.protocols import schema


@dataclass(frozen=True, slots=True)
class TextRequest:
    """What to embed: texts to tokenize, or token ids to use as they are.

    Attributes:
        model: The model asked for, or None for the default text model.
        texts: Texts, when the client sent text.
        sequences: Token id lists, when the client sent tokens (OpenAI's arrays).
        truncate: Cut texts longer than the model takes (else they are refused).
        base64: Answer vectors as base64 of little-endian float32 (OpenAI).
        dimensions: The vector size the client expects, if it said.
    """

    model: str | None
    texts: list[str] | None = None
    sequences: list[list[int]] | None = None
    truncate: bool = True
    base64: bool = False
    dimensions: int | None = None


def _texts(value: str | list[str], where: str) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not texts:
        raise InvalidInput(f"'{where}' is empty: send at least one text")
    return texts


def _model(value: str | object) -> str | None:
    return value if isinstance(value, str) else None


def parse_openai_embeddings(body: bytes) -> TextRequest:
    """``POST /v1/embeddings``: a text, texts, token ids, or lists of token ids.

    OpenAI truncates nothing: a text longer than the model takes is refused.

    Raises:
        InvalidInput: a body of another shape, or an empty or mixed ``input``.
    """
    request = schema.decode(body, schema.EmbeddingsRequest)
    value = request.input
    common = {
        "model": request.model,
        "truncate": False,
        "base64": request.encoding_format == "base64",
        "dimensions": request.dimensions if request.dimensions is not UNSET else None,
    }
    if isinstance(value, str):
        return TextRequest(texts=[value], **common)  # type: ignore[arg-type]
    if not value:
        raise InvalidInput("'input' is empty: send a text, texts or token ids")
    if all(isinstance(v, str) for v in value):
        return TextRequest(texts=value, **common)  # type: ignore[arg-type]
    if all(type(v) is int for v in value):
        return TextRequest(sequences=[value], **common)  # type: ignore[arg-type]
    if all(isinstance(v, list) and all(type(t) is int for t in v) for v in value):
        return TextRequest(sequences=value, **common)  # type: ignore[arg-type]
    raise InvalidInput(
        "'input' must be a string, a list of strings, a list of token ids or a list of "
        "lists of token ids"
    )


def encode_openai_embeddings(
    model: str, vectors: np.ndarray, tokens: Sequence[int], as_base64: bool
) -> schema.EmbeddingsResponse:
    """OpenAI's answer: one ``embedding`` object per input, in order, and the token usage."""
    vectors = np.ascontiguousarray(vectors, dtype="<f4")
    data = [
        schema.Embedding(
            index=i,
            embedding=base64.b64encode(row.tobytes()).decode("ascii")
            if as_base64
            else Raw(orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY)),
        )
        for i, row in enumerate(vectors)
    ]
    used = int(sum(tokens))
    return schema.EmbeddingsResponse(data=data, model=model, usage=schema.Usage(used, used))


def model_list(names: Sequence[str]) -> schema.ModelList:
    """``GET /v1/models``: every served model."""
    return schema.ModelList(data=[schema.ModelCard(id=name) for name in names])


def parse_tei_embed(body: bytes) -> tuple[TextRequest, bool]:
    """``POST /embed``: texts, and whether to normalise (text-embeddings-inference's default
    is yes; TEI does not truncate unless asked).

    Raises:
        InvalidInput: a body of another shape, or no texts.
    """
    request = schema.decode(body, schema.EmbedRequest)
    texts = _texts(request.inputs, "inputs")
    return TextRequest(_model(request.model), texts=texts, truncate=request.truncate), (
        request.normalize
    )


def parse_texts(body: bytes, field: str) -> TextRequest:
    """``POST /embeddings`` (texts in ``input``) or ``POST /batch_embed`` (in ``texts``).

    Raises:
        InvalidInput: a body of another shape, or no texts.
    """
    request = schema.decode(body, schema.TextsEmbeddingRequest)
    value = request.input if field == "input" else request.texts
    if value is UNSET:
        raise InvalidInput(f"send the texts in '{field}'")
    texts = _texts(value, field)
    return TextRequest(_model(request.model), texts=texts, truncate=request.truncate)


def vectors_json(vectors: np.ndarray) -> Raw:
    """Vectors as a JSON array of arrays (numpy encodes them natively)."""
    return Raw(orjson.dumps(np.ascontiguousarray(vectors), option=orjson.OPT_SERIALIZE_NUMPY))


def encode_texts_embedding(
    model: str, vectors: np.ndarray, tokens: Sequence[int]
) -> schema.TextsEmbeddingResponse:
    """The answer of ``/embeddings`` and ``/batch_embed``."""
    return schema.TextsEmbeddingResponse(
        embeddings=vectors_json(vectors),
        model=model,
        dimensions=int(vectors.shape[1]),
        count=int(vectors.shape[0]),
        token_count=int(sum(tokens)),
    )


@dataclass(frozen=True, slots=True)
class TokenizeCall:
    """What ``POST /tokenize`` asked: one ``text`` (LLM layers) or ``inputs`` (TEI)."""

    model: str | None
    texts: list[str]
    add_special_tokens: bool
    tei: bool


def parse_tokenize(body: bytes) -> TokenizeCall:
    """``POST /tokenize``.

    Raises:
        InvalidInput: neither ``text`` nor ``inputs``, or both.
    """
    request = schema.decode(body, schema.TokenizeRequest)
    if (request.text is UNSET) == (request.inputs is UNSET):
        raise InvalidInput("send 'text' (one text) or 'inputs' (a text or a list of texts)")
    special = True
    for flag in (request.add_special_tokens, request.add_bos):
        if flag is not UNSET:
            special = bool(flag)
    if request.text is not UNSET:
        return TokenizeCall(_model(request.model), [request.text], special, tei=False)
    texts = _texts(request.inputs, "inputs")  # type: ignore[arg-type]
    return TokenizeCall(_model(request.model), texts, special, tei=True)


def encode_tokenize(
    call: TokenizeCall, encodings: Sequence[Encoding], specials: set[int]
) -> object:
    """The answer: ``{tokens, token_count, text_length}``, or TEI's tokens with their spans."""
    if not call.tei:
        ids = list(encodings[0].ids)
        return schema.TokenizeResponse(ids, len(ids), len(call.texts[0]))
    return [
        [
            schema.Token(
                id=token,
                text=piece,
                special=token in specials,
                start=None if token in specials else start,
                stop=None if token in specials else stop,
            )
            for token, piece, (start, stop) in zip(e.ids, e.tokens, e.offsets, strict=True)
        ]
        for e in encodings
    ]


@dataclass(frozen=True, slots=True)
class DetokenizeCall:
    """What ``POST /detokenize`` or ``/decode`` asked."""

    model: str | None
    sequences: list[list[int]]
    skip_special_tokens: bool
    nested: bool  # TEI's list of lists: answer a list of texts
    tei: bool


def parse_detokenize(body: bytes) -> DetokenizeCall:
    """``tokens`` (one list) or ``ids`` (one list, or a list of lists).

    Raises:
        InvalidInput: neither or both, or ids that are not integers.
    """
    request = schema.decode(body, schema.DetokenizeRequest)
    if (request.tokens is UNSET) == (request.ids is UNSET):
        raise InvalidInput("send 'tokens' (a list of token ids) or 'ids'")
    model, skip = _model(request.model), request.skip_special_tokens
    if request.tokens is not UNSET:
        return DetokenizeCall(model, [request.tokens], skip, nested=False, tei=False)
    ids = request.ids
    if all(type(t) is int for t in ids):  # type: ignore[union-attr]
        return DetokenizeCall(model, [ids], skip, nested=False, tei=True)  # type: ignore[list-item]
    if all(isinstance(v, list) and all(type(t) is int for t in v) for v in ids):  # type: ignore[union-attr]
        return DetokenizeCall(model, ids, skip, nested=True, tei=True)  # type: ignore[arg-type]
    raise InvalidInput("'ids' must be a list of token ids, or a list of such lists")


def encode_detokenize(call: DetokenizeCall, texts: list[str]) -> object:
    """``{text}`` for ``tokens``; TEI's plain string (or list of strings) for ``ids``."""
    if not call.tei:
        return schema.DetokenizeResponse(texts[0])
    return texts if call.nested else texts[0]
