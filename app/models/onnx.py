"""One version of one model: an onnxruntime session, its signature, validation and warm-up."""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from app.models.batching import BatchingOptions
from app.models.cache import CacheOptions
from app.models.errors import InvalidInput, PayloadTooLarge, RepositoryError
from app.models.signature import ORT_TO_DATATYPE, Signature, TensorSpec, dims_from_ort


class InferenceObserver(Protocol):
    """Receives what the serving layer measures (a worker's metrics implement it)."""

    def inference(self, model: str, version: str, seconds: float) -> None:
        """One session run took ``seconds``."""

    def batch(self, model: str, version: str, rows: int, waits: list[float]) -> None:
        """A (micro-)batch of ``rows`` ran; each request in it had waited ``waits`` seconds."""

    def batch_tokens(self, model: str, version: str, padded: int) -> None:
        """A text model's run held ``padded`` tokens (rows x the longest)."""

    def tokens(self, model: str, version: str, count: int) -> None:
        """A request's texts came to ``count`` tokens."""

    def prompt_tokens(self, model: str, version: str, count: int) -> None:
        """A generation request's prompt came to ``count`` tokens."""

    def generated_tokens(self, model: str, version: str, count: int) -> None:
        """``count`` tokens were generated."""

    def first_token(self, model: str, version: str, seconds: float) -> None:
        """A generation's first token came ``seconds`` after its request was queued."""

    def inter_token(self, model: str, version: str, seconds: float) -> None:
        """A generation's next token came ``seconds`` after its previous one."""

    def active_sequences(self, model: str, version: str, count: int) -> None:
        """``count`` sequences are generating in this worker now."""

    def cache_lookup(self, model: str, version: str, hit: bool) -> None:
        """A request was answered from the response cache (``hit``) or had to run."""


class ModelState(enum.StrEnum):
    """Life cycle of a model version inside one worker."""

    UNAVAILABLE = "UNAVAILABLE"
    LOADING = "LOADING"
    READY = "READY"


@dataclass(frozen=True, slots=True)
class TextOptions:
    """``[text]`` in ``model.toml``.

    Attributes:
        task: What the model does with text (``embedding``: one vector per text).
        max_tokens: Longest token sequence (special tokens included) the model takes; longer
            texts are truncated to it, or refused where the caller asks for no truncation.
        pooling: ``graph`` (the output is one vector per text), ``mean`` (average the
            output over the real tokens) or ``cls`` (the first token's vector).
        normalize: Scale pooled vectors to unit length (for ``mean`` and ``cls``).
        output: The graph output to read; "" for the only one.
        max_inputs: Most texts in one request.
        max_batch_tokens: Most padded tokens (rows x longest) in one session run.
        max_queue_delay: Seconds the oldest request may wait for others to batch with.
        max_queue: Requests that may wait per worker; more get 503.
    """

    task: Literal["embedding"] = "embedding"
    max_tokens: int = 512
    pooling: Literal["graph", "mean", "cls"] = "graph"
    normalize: bool = True
    output: str = ""
    max_inputs: int = 2048
    max_batch_tokens: int = 4096
    max_queue_delay: float = 0.0005
    max_queue: int = 1024


@dataclass(frozen=True, slots=True)
class GenerationOptions:
    """``[generation]`` in ``model.toml`` (see :mod:`app.models.generation`).

    Attributes:
        max_context: Longest sequence, prompt and generated tokens together; the key/value
            cache holds this many positions per sequence.
        max_sequences: Sequences generating at once per worker (one decoding step runs
            them all).
        max_queue: Requests that may wait for a sequence slot per worker; more get 503.
        max_new_tokens: Largest ``max_tokens`` a request may ask for.
        default_max_tokens: Tokens generated when a request does not say (at most what the
            context has room for).
        eos_token_ids: Tokens that end a generation.
        bos_token_id: Token put before plain prompts (not chat ones: the template does it),
            or None.
        max_stop_sequences: Most stop sequences per request.
        max_stop_length: Longest stop sequence, in characters.
    """

    max_context: int = 2048
    max_sequences: int = 8
    max_queue: int = 64
    max_new_tokens: int = 2048
    default_max_tokens: int = 256
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    max_stop_sequences: int = 8
    max_stop_length: int = 256


@dataclass(frozen=True, slots=True)
class ImageOptions:
    """``[image]`` in ``model.toml`` (see :mod:`app.models.image`).

    Attributes:
        input: The graph input that takes images: UINT8 ``[-1, -1, -1, 3]`` (images,
            height, width, RGB).
        scores: The graph output of class scores ``[-1, classes]`` that ``:classify``
            ranks; "" for the only 2-dimensional float output.
        formats: Image formats accepted (Pillow's names).
        max_pixels: Most pixels one image may declare; larger ones are refused before any
            pixel is decoded (decompression bombs).
        max_images: Most images in one request.
    """

    input: str = "image"
    scores: str = ""
    formats: tuple[str, ...] = ("PNG", "JPEG")
    max_pixels: int = 4_194_304
    max_images: int = 16


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    """How a session is built and warmed up.

    Attributes:
        intra_op_threads: Threads one operator may use.
        inter_op_threads: Threads for independent graph branches.
        warmup_runs: Inference runs on synthetic inputs before the model is ready.
        max_batch_rows: Largest first dimension accepted on batched inputs.
        timeout: Default deadline of a request, in seconds from its arrival.
        max_concurrency: Session runs of this model at once, per worker.
        max_queue: Requests that may wait for a run slot, per worker; more are shed.
        batching: Dynamic batching limits, or None to run each request on its own.
        text: How a text model tokenizes and pools, or None for a tensor model.
        generation: How a generation model decodes, or None.
        image: How an image model decodes its uploads, or None.
        cache: Bounds of the response cache, or None for no cache.
        inline_run_us: In a gevent worker, a model whose warm-up (the fastest run at each
            warm-up batch size) took at most this long runs on the worker's own thread; a
            slower one, one never warmed up, and one whose runs exceed it in CPU time
            ``SLOW_STREAK`` times in a row run in a helper thread, so the worker keeps serving.
        share_weights: Leave the weights in the pages mapped from the external data file
            (shared by every process serving the model) instead of repacking them.
    """

    intra_op_threads: int = 1
    inter_op_threads: int = 1
    warmup_runs: int = 3
    max_batch_rows: int = 1024
    timeout: float = 30.0
    max_concurrency: int = 1
    max_queue: int = 64
    batching: BatchingOptions | None = None
    inline_run_us: int = 1000
    text: TextOptions | None = None
    generation: GenerationOptions | None = None
    image: ImageOptions | None = None
    cache: CacheOptions | None = None
    share_weights: bool = False


class OnnxModel:
    """A loaded (or loadable) ONNX model version: its session, signature and warm-up.

    The signature is read when the session is created; until :meth:`load` finishes the
    model is not ready. Sessions are safe to run from several threads at once. How runs
    are admitted, timed out and scheduled is a :class:`~app.models.runner.Runner`'s job.

    Args:
        name: Model name.
        version: Version number.
        path: The ``model.onnx`` file.
        options: Session, warm-up and serving options.
        observer: Receives what is measured (a worker's metrics).
        labels: Class names from ``model.toml``, for clients.
        description: Free text from ``model.toml``, for clients.
    """

    def __init__(
        self,
        name: str,
        version: int,
        path: Path,
        options: RuntimeOptions,
        observer: InferenceObserver | None = None,
        labels: Sequence[str] = (),
        description: str = "",
    ) -> None:
        self.name = name
        self.version = version
        self.version_str = str(version)
        self.path = path
        self.options = options
        self.observer = observer
        self.state = ModelState.UNAVAILABLE
        self.signature = Signature(name, self.version_str, (), (), tuple(labels), description)
        #: The fastest warm-up run at the slowest warm-up batch size, in seconds (None
        #: without warm-up runs).
        self.warmup_seconds: float | None = None
        self._session: Any = None
        self._run_options: Any = None

    # -- life cycle -------------------------------------------------------------------------

    def load(self) -> None:
        """Create the session, read the signature and warm up.

        Raises:
            RepositoryError: the file is not a model onnxruntime can serve.
        """
        import onnxruntime as ort  # imported here: workers import it after fork

        self.state = ModelState.LOADING
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.options.intra_op_threads
        opts.inter_op_num_threads = self.options.inter_op_threads
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # Idle pool threads that spin steal the core from the other workers.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if self.options.share_weights:
            # A repacked weight is a private copy; unpacked ones stay in the mapped file.
            opts.add_session_config_entry("session.disable_prepacking", "1")
        try:
            session = ort.InferenceSession(
                str(self.path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises several unrelated types
            self.state = ModelState.UNAVAILABLE
            raise RepositoryError(f"{self.label}: onnxruntime cannot load it: {exc}") from None
        inputs = tuple(self._spec(arg, "input") for arg in session.get_inputs())
        outputs = tuple(self._spec(arg, "output") for arg in session.get_outputs())
        old = self.signature
        self.signature = Signature(
            old.name, old.version, inputs, outputs, old.labels, old.description
        )
        self._session = session
        self._run_options = ort.RunOptions
        if self.options.batching is not None:
            unbatched = [s.name for s in (*inputs, *outputs) if not s.batched]
            if unbatched:
                self.state = ModelState.UNAVAILABLE
                raise RepositoryError(
                    f"{self.label}: batching needs a dynamic first dimension on every input "
                    f"and output; {', '.join(repr(n) for n in unbatched)} has none"
                )
        self.warmup_seconds = self.warmup()
        self.state = ModelState.READY

    def _spec(self, arg: Any, kind: str) -> TensorSpec:
        datatype = ORT_TO_DATATYPE.get(arg.type)
        if datatype is None:
            hint = (
                " (for scikit-learn classifiers convert with zipmap=False)"
                if "map" in (arg.type)
                else ""
            )
            raise RepositoryError(
                f"{self.label}: {kind} {arg.name!r} has type {arg.type}, which cannot be "
                f"served{hint}"
            )
        return TensorSpec(arg.name, datatype, dims_from_ort(arg.shape))

    def warmup(self) -> float | None:
        """Run the configured number of inferences on synthetic inputs.

        Batch 1, plus every preferred batch size and the largest batch of a batching model,
        so the first real batches do not pay for memory planning.

        Returns:
            Seconds of the slowest batch size's fastest run, or None without warm-up runs.
        """
        if not self.options.warmup_runs:
            return None
        fastest: dict[int, float] = {}
        sizes = {1}
        if self.options.batching is not None:
            sizes |= {
                *self.options.batching.preferred_batch_sizes,
                self.options.batching.max_batch_size,
            }
        for rows, _ in itertools.product(sorted(sizes), range(self.options.warmup_runs)):
            feeds = {spec.name: synthetic_input(spec, rows) for spec in self.inputs}
            try:
                start = time.perf_counter()
                self._session.run(None, feeds)
                took = time.perf_counter() - start
            except Exception as exc:  # a model that cannot run at all must not serve
                self.state = ModelState.UNAVAILABLE
                raise RepositoryError(
                    f"{self.label}: warm-up inference failed ({exc}); set warmup_runs = 0 in "
                    "its model.toml if it needs special inputs"
                ) from None
            fastest[rows] = min(took, fastest.get(rows, took))
        return max(fastest.values())

    @property
    def session(self) -> Any:
        """The onnxruntime session (for IO bindings); None until loaded."""
        return self._session

    @property
    def label(self) -> str:
        """``name/version`` for log lines and operator messages."""
        return f"{self.name}/{self.version}"

    @property
    def ready(self) -> bool:
        """True once the session is loaded and warmed up."""
        return self.state is ModelState.READY

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        """The signature's inputs."""
        return self.signature.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        """The signature's outputs."""
        return self.signature.outputs

    # -- serving -----------------------------------------------------------------------------

    def validate(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Check a complete feed against the signature and the batch limit.

        Raises:
            InvalidInput: a missing or unknown input, a wrong dtype or shape.
            PayloadTooLarge: more batch rows than allowed.
        """
        missing = [spec.name for spec in self.inputs if spec.name not in inputs]
        if missing:
            raise InvalidInput(
                f"missing input(s) {', '.join(repr(n) for n in missing)} for model {self.name!r}"
            )
        for name, array in inputs.items():
            spec = self.signature.input_spec(name)
            if array.dtype != spec.dtype:
                raise InvalidInput(
                    f"input {name!r} must be {spec.datatype}, got numpy dtype {array.dtype}"
                )
            if not spec.accepts_shape(array.shape):
                raise InvalidInput(
                    f"input {name!r} has shape {list(array.shape)} but model {self.name!r} "
                    f"expects {list(spec.shape)} (-1 is any size)"
                )
            if spec.batched and array.shape[0] > self.options.max_batch_rows:
                raise PayloadTooLarge(
                    f"input {name!r} has {array.shape[0]} rows; the limit for model "
                    f"{self.name!r} is {self.options.max_batch_rows}"
                )

    def run(
        self, names: list[str], inputs: Mapping[str, np.ndarray], run_options: Any = None
    ) -> list[np.ndarray]:
        """One session run, as onnxruntime does it (its exceptions included)."""
        results: list[np.ndarray] = self._session.run(names, dict(inputs), run_options)
        return results

    def run_options(self) -> Any:
        """A fresh ``onnxruntime.RunOptions`` whose run can be cancelled quietly."""
        options = self._run_options()
        options.log_severity_level = 4  # a cancelled run is expected, not an error
        return options


def synthetic_input(spec: TensorSpec, rows: int = 1) -> np.ndarray:
    """An array that fits the spec with ``rows`` in a dynamic first dimension (others 1)."""
    shape = tuple((rows if i == 0 else 1) if d < 0 else d for i, d in enumerate(spec.shape))
    if spec.datatype == "BYTES":
        return np.full(shape, "warm up", dtype=object)
    return np.zeros(shape, dtype=spec.dtype)
