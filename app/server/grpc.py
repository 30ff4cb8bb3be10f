"""The Open Inference Protocol over gRPC, served by every worker beside HTTP.

Process model: each gunicorn worker also runs a gRPC server on ``server.grpc_bind``, with
``SO_REUSEPORT`` so that all workers listen on the one address and the kernel spreads the
connections among them. It serves the worker's own repository, runner, keys, rate-limit
buckets and metrics: the serving layer HTTP uses, without a second copy of the models in
memory or a second process to supervise. A reload starts the new workers (each with its gRPC
server) before the old ones stop theirs gracefully, so gRPC rides the same zero-downtime
reload, and a worker that dies takes its gRPC server with it and is replaced by the master.
In gevent workers gRPC runs on gevent (``grpc.experimental.gevent.init_gevent``) and calls go
through the cooperative runner, so onnxruntime never holds up the worker's other connections.

This module is the thin gRPC front: request ids, keys and limits, deadlines, one log line
and the metrics of each call, and errors as gRPC status codes with the messages REST sends.
:mod:`app.protocols.grpc.oip` converts the messages.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import numpy as np
import structlog

from app import __version__
from app.errors import GRPC_STATUS, HTTP_STATUS, ApplianceError, ErrorCode
from app.logging import log_request
from app.metrics import Metrics
from app.middleware import Authenticator, request_id_from
from app.models.errors import InvalidInput, ModelNotReady
from app.models.generation import TEXT_INPUT, TEXT_OUTPUT, Chunk, Generator
from app.models.repository import Repository
from app.models.runner import Predictor
from app.models.signature import Signature
from app.protocols.grpc import inference_pb2 as pb
from app.protocols.grpc import inference_pb2_grpc as pb_grpc
from app.protocols.grpc import oip
from app.protocols.v2 import Inference
from app.settings import Settings

log = structlog.get_logger(__name__)

SERVICE = "/inference.GRPCInferenceService/"
#: Calls that answer without a key, as their HTTP twins do.
OPEN_METHODS = frozenset({"ServerLive", "ServerReady"})
#: What the ``method`` label of the request metrics says for gRPC calls.
PROTOCOL = "GRPC"
T = TypeVar("T")


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over the repository.

    Args:
        settings: Validated settings (limits).
        repository: The worker's loaded models.
        metrics: The worker's metrics.
        gate: Checks keys and rate limits, as for HTTP.
    """

    def __init__(
        self, settings: Settings, repository: Repository, metrics: Metrics, gate: Authenticator
    ) -> None:
        self._limits = settings.limits
        self._repository = repository
        self._metrics = metrics
        self._gate = gate

    # -- health and metadata ------------------------------------------------------------------

    def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:  # noqa: N802
        """Always live while the worker answers."""
        return self._call("ServerLive", context, lambda call: pb.ServerLiveResponse(live=True))

    def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:  # noqa: N802
        """Ready when every model version is loaded and warm."""
        return self._call(
            "ServerReady",
            context,
            lambda call: pb.ServerReadyResponse(ready=self._repository.ready),
        )

    def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:  # noqa: N802
        """Whether that version (or the default) is ready; NOT_FOUND for an unknown one."""

        def answer(call: _Call) -> pb.ModelReadyResponse:
            try:
                call.label(self._repository.get(request.name, request.version or None))
            except ModelNotReady:
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=True)

        return self._call("ModelReady", context, answer)

    def ServerMetadata(  # noqa: N802
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        """Name, version and protocol extensions."""
        return self._call(
            "ServerMetadata",
            context,
            lambda call: oip.server_metadata("onnx-appliance", __version__),
        )

    def ModelMetadata(  # noqa: N802
        self, request: pb.ModelMetadataRequest, context: Any
    ) -> pb.ModelMetadataResponse:
        """Signature of that version (or the default), and every version of the model."""

        def answer(call: _Call) -> pb.ModelMetadataResponse:
            runner = call.label(
                self._repository.get(request.name, request.version or None, call.request_id)
            )
            versions = (
                [runner.signature.version]
                if request.version
                else [v for v, _ in self._repository.entry(request.name).states()]
            )
            return oip.model_metadata(runner.signature, versions)

        return self._call("ModelMetadata", context, answer)

    def RepositoryIndex(  # noqa: N802
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        """Every model version and its state (read-only: no load or unload here)."""

        def answer(call: _Call) -> pb.RepositoryIndexResponse:
            versions = ((m.name, m.version_str, m.state) for m in self._repository.models())
            return oip.repository_index(versions, request.ready)

        return self._call("RepositoryIndex", context, answer)

    # -- inference ----------------------------------------------------------------------------

    def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:  # noqa: N802
        """Run one inference, raw or typed tensors, within the call's deadline."""
        return self._call(
            "ModelInfer",
            context,
            lambda call: self._infer(self._resolve(request, call), request, call),
        )

    def ModelStreamInfer(  # noqa: N802
        self, requests: Iterator[pb.ModelInferRequest], context: Any
    ) -> Iterator[pb.ModelStreamInferResponse]:
        """Inferences on one stream, answered in order; a failed one answers its error
        message and the stream goes on (Triton's behaviour). A generation model answers
        token by token, then with an empty response marked ``triton_final_response``."""
        for request in requests:
            try:
                answers = self._call(
                    "ModelStreamInfer",
                    context,
                    functools.partial(self._stream_one, request),
                    stream=True,
                )
                for answer in answers:
                    yield pb.ModelStreamInferResponse(infer_response=answer)
            except _StreamError as failed:
                yield pb.ModelStreamInferResponse(error_message=failed.message)
            except ApplianceError as exc:  # a generation that failed part way
                log.info("stream_failed", error_code=exc.code.value, error=exc.message)
                yield pb.ModelStreamInferResponse(error_message=exc.message)

    def _stream_one(
        self, request: pb.ModelInferRequest, call: _Call
    ) -> Iterator[pb.ModelInferResponse]:
        runner = self._resolve(request, call)
        if not isinstance(runner, Generator):
            return iter([self._infer(runner, request, call)])
        inference, raw = oip.parse_infer(
            request, runner.signature, self._limits.max_tensor_elements
        )
        prompts = inference.inputs[TEXT_INPUT].reshape(-1)
        if prompts.size != 1:
            raise InvalidInput(f"stream one prompt per message in {TEXT_INPUT!r}")
        ids = runner.prompt(str(prompts[0]))
        sampling = runner.sampling(len(ids), **oip.sampling_parameters(request))
        generation = runner.generate(ids, sampling, call.deadline(runner.timeout))
        return _tokens(runner.signature, Inference(request.id or None, {}), generation, raw)

    def _resolve(self, request: pb.ModelInferRequest, call: _Call) -> Predictor:
        """The model version that serves the request (by traffic split when none is named)."""
        return call.label(
            self._repository.get(request.model_name, request.model_version or None, call.request_id)
        )

    def _infer(
        self, runner: Predictor, request: pb.ModelInferRequest, call: _Call
    ) -> pb.ModelInferResponse:
        inference, raw = oip.parse_infer(
            request, runner.signature, self._limits.max_tensor_elements
        )
        results = runner.predict(inference.inputs, inference.outputs, call.deadline(runner.timeout))
        job = self._repository.shadow_job(
            runner.signature, results,
            lambda candidate, due: candidate.predict(inference.inputs, inference.outputs, due),
        )  # fmt: skip
        if job is not None:
            call.after_answer(job.submit)
        return oip.encode_infer(runner.signature, inference, results, raw)

    # -- every call ---------------------------------------------------------------------------

    def _call(
        self, method: str, context: Any, answer: Callable[[_Call], T], stream: bool = False
    ) -> T:
        """Run ``answer`` as one call: id, key, deadline, errors, log line and metrics."""
        metadata = dict(context.invocation_metadata() or ())
        call = _Call(request_id_from(metadata.get("x-request-id")), context, stream)
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=call.request_id)
        if not stream:
            # With the status, not in a batch of its own (send_initial_metadata costs ~5%).
            context.set_trailing_metadata((("x-request-id", call.request_id),))
        self._metrics.request_started()
        code: ErrorCode | None = None
        message = ""
        try:
            if method not in OPEN_METHODS:
                call.key_id = self._gate.admit(_presented_key(metadata))
            return answer(call)
        except ApplianceError as exc:
            code, message = exc.code, exc.message
        except Exception as exc:  # a bug must not take the worker's gRPC server down
            log.exception("unhandled_error", error_type=type(exc).__name__)
            code, message = ErrorCode.INTERNAL, "internal error; the request id is in the logs"
        finally:
            self._record(method, call, code)
        if stream:
            raise _StreamError(message)
        context.abort(grpc.StatusCode[GRPC_STATUS[code]], message)
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    def _record(self, method: str, call: _Call, code: ErrorCode | None) -> None:
        duration = time.perf_counter() - call.started
        route = SERVICE + method
        status = 200 if code is None else HTTP_STATUS[code]
        self._metrics.request(
            route, PROTOCOL, status, call.model, call.version, call.key_id, duration,
            code.value if code else "",
        )  # fmt: skip
        log_request(
            {
                "method": PROTOCOL,
                "route": route,
                "status": status,
                "grpc_status": GRPC_STATUS[code] if code else "OK",
                "duration_ms": round(duration * 1000, 3),
                "model": call.model or None,
                "version": call.version or None,
                "key_id": call.key_id or None,
                "request_id": call.request_id,
            },
            quiet=method in OPEN_METHODS and code is None,
        )


def _tokens(
    signature: Signature, inference: Inference, generation: Iterable[Chunk], raw: bool
) -> Iterator[pb.ModelInferResponse]:
    """One response per piece of text (in the request's form, raw or typed), then the empty
    final one."""
    for chunk in generation:
        if chunk.text:  # empty while a stop sequence may be starting
            piece = {TEXT_OUTPUT: np.array([chunk.text], dtype=object)}
            yield oip.encode_infer(signature, inference, piece, raw)
    final = oip.encode_infer(signature, inference, {}, raw)
    final.parameters["triton_final_response"].bool_param = True
    yield final


class _StreamError(Exception):
    """A failed message of a stream, answered in the stream rather than by ending it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _Call:
    """What one call has learnt about itself so far."""

    def __init__(self, request_id: str, context: Any, stream: bool = False) -> None:
        self.request_id = request_id
        self._stream = stream
        self.started = time.perf_counter()
        self.arrived = time.monotonic()
        self._context = context
        self.model = ""
        self.version = ""
        self.key_id = ""

    def label(self, runner: Predictor) -> Predictor:
        """Name the model version serving the call (for logs and metrics)."""
        self.model, self.version = runner.signature.name, runner.signature.version
        return runner

    def after_answer(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the answer is sent: when a unary call ends, at once in a
        stream (whose end may be far off)."""
        if self._stream or not self._context.add_callback(callback):
            callback()  # add_callback is False when the call has already ended

    def deadline(self, timeout: float) -> float:
        """When the answer is due: the model's timeout from arrival, or the client's gRPC
        deadline if that comes first (a client can shorten it, never lengthen it)."""
        due = self.arrived + timeout
        remaining = self._context.time_remaining()
        if remaining is not None:
            due = min(due, time.monotonic() + max(remaining, 0.0))
        return due


def _presented_key(metadata: dict[str, Any]) -> str:
    """The key in ``authorization: Bearer <key>`` or ``x-api-key`` metadata."""
    auth = str(metadata.get("authorization", ""))
    scheme, _, value = auth.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return str(metadata.get("x-api-key", "")).strip()


def start_server(
    settings: Settings, repository: Repository, metrics: Metrics, gate: Authenticator
) -> grpc.Server:
    """Start this worker's gRPC server on ``server.grpc_bind``.

    Raises:
        OSError: the address cannot be listened on.
    """
    if _gevent_patched():
        from grpc.experimental import gevent as grpc_gevent

        grpc_gevent.init_gevent()
    limit = settings.limits.max_body_bytes
    server = grpc.server(
        ThreadPoolExecutor(max_workers=settings.server.grpc_threads),
        options=[
            ("grpc.so_reuseport", 1),  # every worker on the one address
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", -1),
        ],
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        InferenceServicer(settings, repository, metrics, gate), server
    )
    if server.add_insecure_port(settings.server.grpc_bind) == 0:
        raise OSError(f"cannot listen for gRPC on {settings.server.grpc_bind}")
    server.start()
    log.info("grpc_listening", address=settings.server.grpc_bind)
    return server


def _gevent_patched() -> bool:
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover (gevent is a dependency)
        return False
    return bool(monkey.is_module_patched("threading"))
