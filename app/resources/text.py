"""Text routes: OpenAI's ``/v1/embeddings`` and ``/v1/models``, text-embeddings-inference's
``/embed``, LLM serving layers' ``/embeddings`` and ``/batch_embed``, and ``/tokenize``,
``/detokenize`` (``/decode``).

Thin fronts: each parses its body with :mod:`app.protocols.text`, asks the repository for the
text model (named, or the first one) and calls its :class:`~app.models.text.TextRunner`.
"""

from __future__ import annotations

import functools
from typing import cast

import falcon
import numpy as np

from app.errors import ErrorCode
from app.models.errors import InvalidInput
from app.models.repository import Repository
from app.models.runner import Predictor
from app.models.text import Embedded, TextRunner, Vocabulary
from app.protocols import schema
from app.protocols import text as protocol
from app.resources.common import RepositoryResource, deadline, label, mirror, send
from app.resources.openapi import INFERENCE_ERRORS, documented

_E = ErrorCode
_TEXT_ERRORS = (*INFERENCE_ERRORS, _E.PAYLOAD_TOO_LARGE)


class _TextResource(RepositoryResource):
    """What every text route does first: read the body, find the model, embed."""

    def _vocabulary(self, req: falcon.Request, name: str | None) -> Vocabulary:
        vocabulary = self._repository.vocabulary(name, routing_key=req.context.request_id)
        label(req, vocabulary.signature)
        return vocabulary

    def _runner(self, req: falcon.Request, name: str | None) -> TextRunner:
        runner = self._repository.text(name, routing_key=req.context.request_id)
        label(req, runner.signature)
        return runner

    def _embed(
        self, req: falcon.Request, runner: TextRunner, call: protocol.TextRequest
    ) -> Embedded:
        if call.dimensions is not None and call.dimensions != runner.dimensions:
            raise InvalidInput(
                f"model {runner.signature.name!r} makes {runner.dimensions}-dimensional "
                f"vectors; 'dimensions' asked for {call.dimensions}"
            )
        sequences = (
            runner.check_sequences(call.sequences)
            if call.sequences is not None
            else runner.sequences(call.texts or [], truncate=call.truncate)
        )
        embedded = runner.embed(sequences, deadline(req, runner))
        replay = functools.partial(_replay_embed, call)
        mirror(req, self._repository, runner, {SHADOW_OUTPUT: embedded.vectors}, replay)
        return embedded


class OpenAIEmbeddingsResource(_TextResource):
    """``POST /v1/embeddings``: OpenAI's embeddings API."""

    @documented(
        "Embeddings, OpenAI-compatible",
        response=schema.EmbeddingsResponse,
        request=schema.EmbeddingsRequest,
        errors=_TEXT_ERRORS,
        deadline=True,
    )
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Embed texts or token ids with the model named in the body."""
        call = protocol.parse_openai_embeddings(self._json_body(req))
        runner = self._runner(req, call.model)
        embedded = self._embed(req, runner, call)
        send(
            resp,
            protocol.encode_openai_embeddings(
                runner.signature.name, embedded.vectors, embedded.tokens, call.base64
            ),
        )


class ModelListResource:
    """``GET /v1/models``: every served model, in OpenAI's format."""

    def __init__(self, repository: Repository) -> None:
        self._repository = repository

    @documented("Served models, OpenAI-compatible", response=schema.ModelList)
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """List the models."""
        send(resp, protocol.model_list(self._repository.names))


class EmbedResource(_TextResource):
    """``POST /embed``: text-embeddings-inference's embeddings route."""

    @documented(
        "Embeddings, text-embeddings-inference style: a list of vectors",
        response=list[list[float]],
        request=schema.EmbedRequest,
        errors=_TEXT_ERRORS,
        deadline=True,
    )
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Embed texts with the default (or named) text model."""
        call, normalize = protocol.parse_tei_embed(self._json_body(req))
        embedded = self._embed(req, self._runner(req, call.model), call)
        vectors = embedded.vectors
        if normalize:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        resp.content_type = falcon.MEDIA_JSON
        resp.data = bytes(protocol.vectors_json(vectors))


class TextsEmbeddingResource(_TextResource):
    """``POST /embeddings`` (texts in ``input``) and ``POST /batch_embed`` (in ``texts``)."""

    def _answer(self, req: falcon.Request, resp: falcon.Response, field: str) -> None:
        call = protocol.parse_texts(self._json_body(req), field)
        runner = self._runner(req, call.model)
        embedded = self._embed(req, runner, call)
        send(
            resp,
            protocol.encode_texts_embedding(
                runner.signature.name, embedded.vectors, embedded.tokens
            ),
        )

    @documented(
        "Embeddings of a text or texts ('input'), LLM serving layer style",
        response=schema.TextsEmbeddingResponse,
        request=schema.TextsEmbeddingRequest,
        errors=_TEXT_ERRORS,
        deadline=True,
    )
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Embed ``input``."""
        self._answer(req, resp, "input")

    @documented(
        "Embeddings of a list of texts ('texts'); an empty list is refused",
        response=schema.TextsEmbeddingResponse,
        request=schema.TextsEmbeddingRequest,
        errors=_TEXT_ERRORS,
        deadline=True,
    )
    def on_post_batch(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Embed ``texts``."""
        self._answer(req, resp, "texts")


class TokenizeResource(_TextResource):
    """``POST /tokenize``: token ids of a text (``text``), or TEI's tokens (``inputs``)."""

    @documented(
        "Tokenize: {text} gives ids and counts; {inputs} gives tokens with their spans (TEI)",
        response=schema.TokenizeResponse | list[list[schema.Token]],
        request=schema.TokenizeRequest,
        errors=(_E.MODEL_NOT_FOUND, _E.MODEL_NOT_READY),
    )
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Tokenize with the default (or named) text or generation model's tokenizer."""
        call = protocol.parse_tokenize(self._json_body(req))
        runner = self._vocabulary(req, call.model)
        encodings = runner.tokenize(call.texts, call.add_special_tokens)
        send(resp, protocol.encode_tokenize(call, encodings, runner.special_ids))


class DetokenizeResource(_TextResource):
    """``POST /detokenize`` and ``POST /decode``: the text of token ids."""

    @documented(
        "Detokenize: {tokens} gives {text}; {ids} gives the text, or texts (TEI)",
        response=schema.DetokenizeResponse | str | list[str],
        request=schema.DetokenizeRequest,
        errors=(_E.MODEL_NOT_FOUND, _E.MODEL_NOT_READY),
    )
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Decode with the default (or named) text or generation model's tokenizer."""
        call = protocol.parse_detokenize(self._json_body(req))
        runner = self._vocabulary(req, call.model)
        texts = [runner.decode(seq, call.skip_special_tokens) for seq in call.sequences]
        send(resp, protocol.encode_detokenize(call, texts))


#: The name shadow comparisons give an embedding route's vectors.
SHADOW_OUTPUT = "embedding"


def _replay_embed(
    call: protocol.TextRequest, candidate: Predictor, due: float
) -> dict[str, np.ndarray]:
    """An embedding request again, on a shadow candidate with its own tokenizer."""
    text = cast(TextRunner, candidate)  # a version of the same text model
    sequences = (
        text.check_sequences(call.sequences)
        if call.sequences is not None
        else text.sequences(call.texts or [], truncate=call.truncate)
    )
    return {SHADOW_OUTPUT: text.embed(sequences, due).vectors}
