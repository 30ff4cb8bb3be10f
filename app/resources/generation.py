"""Generation routes: ``POST /generate`` (LLM serving layers), OpenAI's ``/v1/completions``
and ``/v1/chat/completions``, each whole or as Server-Sent Events, and ``GET /ws``
(WebSocket: a ``/generate`` body per message, tokens back as messages).

Thin fronts: each parses its body with :mod:`app.protocols.generation`, asks the repository
for the generation model (named, or the first one), starts a
:class:`~app.models.generation.Generation` and writes its tokens out as they come. A stream
that the client leaves (a failed write, a closed socket) cancels its generation at once.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import falcon
import msgspec
import simple_websocket

from app.errors import ErrorCode
from app.models.errors import InvalidInput, ServingError
from app.models.generation import Generation, Generator
from app.protocols import generation as protocol
from app.protocols import schema
from app.resources.common import HIJACKED, RepositoryResource, deadline, label, send
from app.resources.errors import ApiError, error_document
from app.resources.openapi import INFERENCE_ERRORS, documented

_E = ErrorCode
EVENT_STREAM = "text/event-stream"


class WsToken(schema.GeneratedToken, tag_field="event", tag="token"):
    """A ``/ws`` message: a new token's text."""


class WsDone(schema.GenerateResponse, tag_field="event", tag="done"):
    """The last ``/ws`` message of a generation: the whole text and the counts."""


class WsError(schema.ErrorBody, tag_field="event", tag="error"):
    """A ``/ws`` message: the request failed (the connection stays open for the next)."""


class _GenerationResource(RepositoryResource):
    """What every generation route does first: read the body, find the model, start."""

    def _generator(self, req: falcon.Request, name: str | None) -> Generator:
        generator = self._repository.generator(name, routing_key=req.context.request_id)
        label(req, generator.signature)
        return generator

    @staticmethod
    def _start(generator: Generator, call: protocol.GenerateCall, due: float | None) -> Generation:
        if call.messages:
            ids = generator.chat(call.messages)
        elif call.prompt_ids is not None:
            ids = generator.prompt_ids(call.prompt_ids)
        else:
            ids = generator.prompt(call.prompt or "")
        s = call.sampling
        sampling = generator.sampling(
            len(ids), s.max_tokens, s.temperature, s.top_k, s.top_p, s.seed, s.stop
        )
        return generator.generate(ids, sampling, due)


def _streaming(resp: falcon.Response, events: Iterator[bytes]) -> None:
    """Answer with Server-Sent Events, each written as soon as it is made."""
    resp.content_type = EVENT_STREAM
    resp.set_header("Cache-Control", "no-cache")
    # NGINX passes this response through unbuffered (and uncompressed: see nginx/).
    resp.set_header("X-Accel-Buffering", "no")
    resp.stream = events


def _wants_stream(req: falcon.Request, asked: bool) -> bool:
    return asked or EVENT_STREAM in (req.get_header("Accept") or "")


class GenerateResource(_GenerationResource):
    """``POST /generate``: a prompt and sampling settings; the text, or its tokens as events."""

    @documented(
        "Generate text from a prompt; Server-Sent Events with stream (or Accept: "
        "text/event-stream): 'token' events, then 'done' with the counts (or 'error')",
        response=schema.GenerateResponse,
        request=schema.GenerateRequest,
        errors=INFERENCE_ERRORS,
        deadline=True,
        events=schema.GeneratedToken | schema.GenerateResponse | schema.ErrorBody,
    )
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Generate with the default (or named) generation model."""
        call = protocol.parse_generate(self._json_body(req))
        generator = self._generator(req, call.model)
        generation = self._start(generator, call, deadline(req, generator))
        if _wants_stream(req, call.stream):
            _streaming(resp, self._events(req, generator, generation))
            return
        text = generation.text()
        send(resp, _result(generator, generation, text))

    @staticmethod
    def _events(
        req: falcon.Request, generator: Generator, generation: Generation
    ) -> Iterator[bytes]:
        parts: list[str] = []
        try:
            yield protocol.ADMITTED
            for index, chunk in enumerate(generation):
                parts.append(chunk.text)
                yield protocol.sse(
                    schema.GeneratedToken(text=chunk.text, token_id=chunk.token, index=index),
                    "token",
                )
            yield protocol.sse(_result(generator, generation, "".join(parts)), "done")
        except ServingError as exc:
            yield protocol.sse(error_document(req, exc.code, exc.message), "error")
        finally:
            generation.cancel()  # the client left (or it ended: then this does nothing)


def _result(generator: Generator, generation: Generation, text: str) -> schema.GenerateResponse:
    done = generation.done
    return protocol.generate_response(
        text,
        done.completion_tokens,
        done.prompt_tokens,
        done.reason,
        done.seconds,
        generator.signature.name,
        generator.signature.version,
    )


class _OpenAIResource(_GenerationResource):
    """OpenAI's completions and chat completions, whole or streamed."""

    _chat = False

    def _answer(self, req: falcon.Request, resp: falcon.Response, call: Any) -> None:
        generator = self._generator(req, call.model)
        generation = self._start(generator, call, deadline(req, generator))
        shape = protocol.OpenAIStream(generator.signature.name, self._chat)
        if call.stream:
            _streaming(resp, self._events(req, generation, shape, call.include_usage))
            return
        text = generation.text()
        done = generation.done
        usage = shape.usage(done.prompt_tokens, done.completion_tokens)
        send(resp, shape.whole(text, done.reason, usage))

    @staticmethod
    def _events(
        req: falcon.Request, generation: Generation, shape: protocol.OpenAIStream, usage: bool
    ) -> Iterator[bytes]:
        try:
            yield shape.start() or protocol.ADMITTED
            for chunk in generation:
                if chunk.text:
                    yield shape.text(chunk.text)
            done = generation.done
            counts = shape.usage(done.prompt_tokens, done.completion_tokens) if usage else None
            yield shape.end(done.reason, counts)
        except ServingError as exc:
            yield protocol.sse(error_document(req, exc.code, exc.message)) + protocol.DONE
        finally:
            generation.cancel()


class CompletionsResource(_OpenAIResource):
    """``POST /v1/completions``: OpenAI's (legacy) completions API."""

    @documented(
        "Completions, OpenAI-compatible (one choice; stream gives chunks and data: [DONE])",
        response=schema.Completion,
        request=schema.CompletionRequest,
        errors=INFERENCE_ERRORS,
        deadline=True,
        events=schema.Completion | schema.OpenAIErrorBody,
    )
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Complete a prompt with the model named in the body."""
        self._answer(req, resp, protocol.parse_completion(self._json_body(req)))


class ChatCompletionsResource(_OpenAIResource):
    """``POST /v1/chat/completions``: OpenAI's chat completions API, through the model's chat
    template."""

    _chat = True

    @documented(
        "Chat completions, OpenAI-compatible (text messages, one choice; stream gives chunks "
        "and data: [DONE])",
        response=schema.ChatCompletion,
        request=schema.ChatCompletionRequest,
        errors=INFERENCE_ERRORS,
        deadline=True,
        events=schema.ChatCompletionChunk | schema.OpenAIErrorBody,
    )
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Answer a chat with the model named in the body."""
        self._answer(req, resp, protocol.parse_chat(self._json_body(req)))


class WebSocketResource(_GenerationResource):
    """``GET /ws``: generation over a WebSocket. Each text message is a ``/generate`` body;
    the answer is ``token`` messages, then ``done`` (or ``error``); the connection then takes
    the next request. Closing it cancels the generation under way."""

    @documented(
        "Generation over WebSocket (Upgrade: websocket)",
        errors=(_E.INVALID_INPUT,),
        websocket="send GenerateRequest JSON messages; receive WsToken messages, then WsDone "
        "(or WsError), each tagged by its 'event' field",
        events=WsToken | WsDone | WsError,
    )
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Upgrade, then serve generation requests until the client closes."""
        if (req.get_header("Upgrade") or "").lower() != "websocket":
            raise ApiError(
                _E.INVALID_INPUT, "GET /ws speaks WebSocket: connect with Upgrade: websocket"
            )
        try:
            ws = simple_websocket.Server.accept(
                req.env, max_message_size=self._limits.max_body_bytes
            )
        except Exception as exc:  # the handshake's own errors (a bad key, a lost socket)
            raise ApiError(_E.INVALID_INPUT, f"WebSocket handshake failed: {exc}") from None
        # The socket is the WebSocket's now: gunicorn must not write an HTTP answer into it.
        req.env[HIJACKED] = True
        resp.status = falcon.HTTP_101  # for the request log
        idle = max(self._limits.timeout_ms / 1000, 1.0)
        try:
            while ws.connected:
                message = ws.receive(timeout=idle)
                if message is None:
                    break
                self._serve(req, ws, message)
        except simple_websocket.ConnectionClosed:
            pass
        finally:
            _hang_up(ws)

    def _serve(self, req: falcon.Request, ws: simple_websocket.Server, message: Any) -> None:
        generation = None
        try:
            call = protocol.parse_generate(message)
            generator = self._generator(req, call.model)
            generation = self._start(generator, call, time.monotonic() + generator.timeout)
            parts: list[str] = []
            for index, chunk in enumerate(generation):
                parts.append(chunk.text)
                ws.send(_ws_json(WsToken(text=chunk.text, token_id=chunk.token, index=index)))
            done = _result(generator, generation, "".join(parts))
            ws.send(_ws_json(WsDone(**msgspec.structs.asdict(done))))
        except (ServingError, InvalidInput) as exc:
            request_id = getattr(req.context, "request_id", "")
            ws.send(_ws_json(WsError(exc.message, exc.code, request_id)))
        finally:
            if generation is not None:
                generation.cancel()


def _hang_up(ws: simple_websocket.Server) -> None:
    """Close the WebSocket and wait for its reader thread before the socket is closed.

    The server closes the descriptor once this returns; a reader still about to read from it
    could otherwise read from whatever connection gets the same number next (with real
    threads; gevent's sockets cancel their waiters). The shutdown ends a read under way.
    """
    if ws.connected:
        ws.close()
    with contextlib.suppress(OSError):
        ws.sock.shutdown(socket.SHUT_RDWR)
    ws.thread.join(timeout=5)


def _ws_json(doc: Any) -> str:
    return schema.encode(doc).decode()
