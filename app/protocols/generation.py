"""Generation routes' bodies: ``/generate`` (LLM serving layers), OpenAI's completions and
chat completions, and their Server-Sent Events.

Pure functions of bytes and values: no HTTP, no model (the serving layer tokenizes and
generates; these functions say what the client asked for and shape the answers).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from msgspec import UNSET

from app.models.errors import InvalidInput
from app.protocols import schema

#: The line that ends an OpenAI stream.
DONE = b"data: [DONE]\n\n"
#: What a stream starts with when it has no first event yet: a comment, which clients skip,
#: that sends the headers at once, so a client whose request waits for a sequence slot knows
#: it was admitted.
ADMITTED = b": admitted\n\n"


@dataclass(frozen=True, slots=True)
class SamplingCall:
    """Sampling settings as the client gave them (validated against the model later)."""

    max_tokens: int | None
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    stop: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class GenerateCall:
    """What a generation request asked.

    Attributes:
        model: The model named, or None for the default generation model.
        prompt: A plain prompt, when the client sent text.
        prompt_ids: Token ids, when the client sent those (OpenAI completions).
        messages: A chat, for the model's template.
        sampling: How to sample and when to stop.
        stream: Answer as Server-Sent Events.
        include_usage: OpenAI streams: a last chunk with the token usage.
    """

    model: str | None
    sampling: SamplingCall
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def _stops(value: str | list[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def parse_generate(body: bytes | memoryview | str) -> GenerateCall:
    """``POST /generate`` (or a ``/ws`` message).

    Raises:
        InvalidInput: a body of another shape (unknown fields included).
    """
    data = body.encode() if isinstance(body, str) else body
    request = schema.decode(data, schema.GenerateRequest)
    return GenerateCall(
        model=request.model if request.model is not UNSET else None,
        prompt=request.prompt,
        sampling=SamplingCall(
            request.max_tokens if request.max_tokens is not UNSET else None,
            request.temperature,
            request.top_k,
            request.top_p,
            request.seed,
            tuple(request.stop_sequences),
        ),
        stream=request.stream,
    )


def parse_completion(body: bytes | memoryview) -> GenerateCall:
    """``POST /v1/completions``: one prompt (a text, a list of one text, or token ids).

    Raises:
        InvalidInput: a body of another shape, or several prompts.
    """
    request = schema.decode(body, schema.CompletionRequest)
    given = request.prompt
    prompt: str | None = None
    ids: list[int] | None = None
    if isinstance(given, str):
        prompt = given
    elif len(given) == 1 and isinstance(given[0], str):
        prompt = given[0]
    elif given and all(type(t) is int for t in given):
        ids = list(given)
    else:
        raise InvalidInput(
            "'prompt' must be a text, a list of one text, or a list of token ids "
            "(one prompt per request)"
        )
    return GenerateCall(
        model=request.model,
        prompt=prompt,
        prompt_ids=ids,
        sampling=_openai_sampling(request, request.max_tokens),
        stream=request.stream,
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
    )


def parse_chat(body: bytes | memoryview) -> GenerateCall:
    """``POST /v1/chat/completions``: text messages.

    Raises:
        InvalidInput: a body of another shape.
    """
    request = schema.decode(body, schema.ChatCompletionRequest)
    messages = []
    for message in request.messages:
        content = message.content
        text = content if isinstance(content, str) else "".join(part.text for part in content)
        # The template knows system, user and assistant; OpenAI's developer is a system role.
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": text})
    limit = request.max_completion_tokens or request.max_tokens
    return GenerateCall(
        model=request.model,
        messages=messages,
        sampling=_openai_sampling(request, limit),
        stream=request.stream,
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
    )


def _openai_sampling(
    request: schema.CompletionRequest | schema.ChatCompletionRequest, max_tokens: int | None
) -> SamplingCall:
    return SamplingCall(
        max_tokens,
        request.temperature,
        request.top_k,
        request.top_p,
        request.seed,
        _stops(request.stop),
    )


# -- answers ---------------------------------------------------------------------------------


def sse(doc: Any, event: str | None = None) -> bytes:
    """One Server-Sent Event carrying ``doc`` as JSON."""
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + schema.encode(doc) + b"\n\n"


def generate_response(
    text: str,
    completion_tokens: int,
    prompt_tokens: int,
    reason: Literal["stop", "length"],
    seconds: float,
    model: str,
    version: str,
) -> schema.GenerateResponse:
    """The answer of ``/generate`` (and the last event of its stream)."""
    return schema.GenerateResponse(
        text=text,
        tokens_generated=completion_tokens,
        prompt_tokens=prompt_tokens,
        finish_reason=reason,
        processing_time_ms=round(seconds * 1000, 3),
        model_info=schema.ModelInfo(model, version),
    )


class OpenAIStream:
    """Shapes the answers of one OpenAI completion or chat request, whole or streamed.

    Args:
        model: The model's name, as the answers report it.
        chat: Chat completions (else completions).
    """

    def __init__(self, model: str, chat: bool) -> None:
        self.model = model
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int) -> schema.CompletionUsage:
        """Token counts."""
        return schema.CompletionUsage(
            prompt_tokens, completion_tokens, prompt_tokens + completion_tokens
        )

    def whole(
        self,
        text: str,
        reason: Literal["stop", "length"],
        usage: schema.CompletionUsage,
    ) -> schema.Completion | schema.ChatCompletion:
        """The answer of a request that did not stream."""
        if self.chat:
            return schema.ChatCompletion(
                id=self.id,
                created=self.created,
                model=self.model,
                choices=[
                    schema.ChatChoice(
                        message=schema.AssistantMessage(content=text), finish_reason=reason
                    )
                ],
                usage=usage,
            )
        return schema.Completion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[schema.CompletionChoice(text=text, finish_reason=reason)],
            usage=usage,
        )

    def start(self) -> bytes:
        """What a stream begins with: the assistant's role (chat), else nothing."""
        if not self.chat:
            return b""
        return sse(self._chunk(schema.Delta(role="assistant", content=""), None))

    def text(self, text: str) -> bytes:
        """A chunk of new text."""
        if self.chat:
            return sse(self._chunk(schema.Delta(content=text), None))
        return sse(self._completion([schema.CompletionChoice(text=text, finish_reason=None)]))

    def end(self, reason: Literal["stop", "length"], usage: schema.CompletionUsage | None) -> bytes:
        """The last chunks: the finish reason, the usage if asked for, and ``[DONE]``."""
        if self.chat:
            out = sse(self._chunk(schema.Delta(), reason))
            if usage is not None:
                out += sse(
                    schema.ChatCompletionChunk(
                        id=self.id,
                        created=self.created,
                        model=self.model,
                        choices=[],
                        usage=usage,
                    )
                )
        else:
            out = sse(self._completion([schema.CompletionChoice(text="", finish_reason=reason)]))
            if usage is not None:
                out += sse(self._completion([], usage))
        return out + DONE

    def _chunk(
        self, delta: schema.Delta, reason: Literal["stop", "length"] | None
    ) -> schema.ChatCompletionChunk:
        return schema.ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[schema.ChunkChoice(delta=delta, finish_reason=reason)],
        )

    def _completion(
        self, choices: list[schema.CompletionChoice], usage: schema.CompletionUsage | None = None
    ) -> schema.Completion:
        return schema.Completion(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )
