"""The model repository: ``<root>/<name>/<version>/model.onnx`` plus optional ``model.toml``.

Scanning is pure file inspection (no sessions), so the master process and ``onnx-appliance
check`` can refuse a bad repository before any worker starts. Loading creates the sessions and
warms them up; it runs in each worker after fork.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import msgspec
import numpy as np
import structlog

from app.models.batching import BatchingOptions
from app.models.cache import CacheOptions
from app.models.drift import CaptureOptions, Drift, DriftObserver, DriftOptions
from app.models.errors import ModelNotFound, ModelNotReady, RepositoryError
from app.models.generation import CHAT_TEMPLATE_FILE, Generator
from app.models.image import KNOWN_FORMATS, ImageRunner
from app.models.onnx import (
    GenerationOptions,
    ImageOptions,
    InferenceObserver,
    ModelState,
    OnnxModel,
    RuntimeOptions,
    TextOptions,
)
from app.models.onnx_proto import ProtoError, external_data_locations, looks_like_model, op_types
from app.models.rollout import RolloutState, shares, traffic_override
from app.models.runner import Predictor, Runner
from app.models.shadow import (
    Replay,
    Shadow,
    ShadowExecutor,
    ShadowJob,
    ShadowObserver,
    ShadowOptions,
)
from app.models.signature import Signature
from app.models.text import TOKENIZER_FILE, TextRunner, Vocabulary
from app.settings import (
    MAX_BATCH_ROWS,
    MAX_IMAGE_PIXELS,
    MAX_INLINE_RUN_US,
    MAX_QUEUE,
    MAX_SEQUENCES,
    MAX_TENSOR_ELEMENTS,
    MAX_TEXT_TOKENS,
    MAX_TIMEOUT_MS,
    MAX_WARMUP_RUNS,
    first_out_of_range,
    out_of_range,
    thread_limit,
)

log = structlog.get_logger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
VERSION_RE = re.compile(r"^[1-9][0-9]{0,8}$")
MAX_VERSION = 999_999_999
MODEL_FILE = "model.onnx"
#: onnxruntime's contrib operators, where its quantized MatMulNBits lives.
QUANTIZED_DOMAIN = "com.microsoft"
MODEL_CONFIG = "model.toml"


_Served = TypeVar("_Served")


class BatchingConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[batching]`` in ``model.toml``: turns on dynamic batching for the model.

    Attributes:
        max_batch_size: Most rows merged into one session run.
        max_queue_delay_us: Microseconds the oldest request may wait for batch-mates.
        max_queue: Requests that may wait per worker; more get 503.
        preferred_batch_sizes: Batch sizes to run at once, without waiting for more.
    """

    max_batch_size: int = 32
    max_queue_delay_us: int = 500
    max_queue: int = 256
    preferred_batch_sizes: list[int] = msgspec.field(default_factory=list)

    def options(self, model: str) -> BatchingOptions:
        """Validated runtime options.

        Raises:
            RepositoryError: a value out of range.
        """
        where = f"model {model!r}: {MODEL_CONFIG}: batching"
        problem = first_out_of_range(
            ("max_batch_size", self.max_batch_size, 1, MAX_BATCH_ROWS),
            ("max_queue", self.max_queue, 1, MAX_QUEUE),
            ("max_queue_delay_us", self.max_queue_delay_us, 0, 1_000_000),
        )
        if problem:
            raise RepositoryError(f"{where}: {problem}")
        bad = [n for n in self.preferred_batch_sizes if not 1 <= n <= self.max_batch_size]
        if bad:
            raise RepositoryError(
                f"{where}: preferred_batch_sizes {bad} are outside 1..{self.max_batch_size}"
            )
        return BatchingOptions(
            max_batch_size=self.max_batch_size,
            max_queue_delay=self.max_queue_delay_us / 1_000_000,
            max_queue=self.max_queue,
            preferred_batch_sizes=tuple(sorted(set(self.preferred_batch_sizes))),
        )


class CacheConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[cache]`` in ``model.toml``: answers kept per worker by exact request (off when
    absent).

    Attributes:
        max_entries: Most answers kept per worker.
        max_mib: Most memory they take per worker (inputs and outputs), in MiB.
    """

    max_entries: int = 1024
    max_mib: int = 64

    def options(self, model: str) -> CacheOptions:
        """Validated runtime options.

        Raises:
            RepositoryError: a value out of range.
        """
        problem = first_out_of_range(
            ("max_entries", self.max_entries, 1, 10_000_000),
            ("max_mib", self.max_mib, 1, 65_536),
        )
        if problem:
            raise RepositoryError(f"model {model!r}: {MODEL_CONFIG}: cache: {problem}")
        return CacheOptions(max_entries=self.max_entries, max_bytes=self.max_mib * 1024 * 1024)


class TextConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[text]`` in ``model.toml``: the model takes text, tokenized with the
    ``tokenizer.json`` beside each ``model.onnx`` (see :mod:`app.models.text`).

    Attributes:
        task: ``embedding``: one vector per text.
        max_tokens: Longest token sequence the model takes (special tokens included).
        pooling: ``graph`` (the output is already one vector per text), ``mean`` or ``cls``.
        normalize: Scale pooled vectors to unit length (``mean`` and ``cls``).
        output: Graph output to read ("" for the only one).
        max_inputs: Most texts per request.
        max_batch_tokens: Most padded tokens (rows x longest) in one session run.
        max_queue_delay_us: Microseconds the oldest request may wait for batch-mates.
        max_queue: Requests that may wait per worker; more get 503.
    """

    task: Literal["embedding"]
    max_tokens: int = 512
    pooling: Literal["graph", "mean", "cls"] = "graph"
    normalize: bool = True
    output: str = ""
    max_inputs: int = 2048
    max_batch_tokens: int = 4096
    max_queue_delay_us: int = 500
    max_queue: int = 1024

    def options(self, model: str) -> TextOptions:
        """Validated options.

        Raises:
            RepositoryError: a value out of range.
        """
        where = f"model {model!r}: {MODEL_CONFIG}: text"
        problem = first_out_of_range(
            ("max_tokens", self.max_tokens, 1, MAX_TEXT_TOKENS),
            ("max_inputs", self.max_inputs, 1, MAX_BATCH_ROWS),
            ("max_batch_tokens", self.max_batch_tokens, self.max_tokens, MAX_TENSOR_ELEMENTS),
            ("max_queue_delay_us", self.max_queue_delay_us, 0, 1_000_000),
            ("max_queue", self.max_queue, 1, MAX_QUEUE),
        )
        if problem:
            raise RepositoryError(f"{where}: {problem}")
        return TextOptions(
            task=self.task,
            max_tokens=self.max_tokens,
            pooling=self.pooling,
            normalize=self.normalize,
            output=self.output,
            max_inputs=self.max_inputs,
            max_batch_tokens=self.max_batch_tokens,
            max_queue_delay=self.max_queue_delay_us / 1_000_000,
            max_queue=self.max_queue,
        )


class GenerationConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[generation]`` in ``model.toml``: a causal language model with its
    ``tokenizer.json`` (and ``chat_template.jinja``) beside each ``model.onnx`` (see
    :mod:`app.models.generation`).

    Attributes:
        max_context: Longest sequence (prompt and generated tokens) per request.
        max_sequences: Sequences generating at once per worker.
        max_queue: Requests that may wait for a sequence per worker; more get 503.
        max_new_tokens: Largest ``max_tokens`` a request may ask for (default: what the
            context has room for after a one-token prompt).
        default_max_tokens: Tokens generated when a request does not say (default: 256, or
            ``max_new_tokens`` if smaller).
        eos_token_ids: Tokens that end a generation.
        bos_token_id: Token put before plain prompts, if the model wants one.
        max_stop_sequences: Most stop sequences per request.
        max_stop_length: Longest stop sequence, in characters.
    """

    max_context: int = 2048
    max_sequences: int = 8
    max_queue: int = 64
    max_new_tokens: int | None = None
    default_max_tokens: int | None = None
    eos_token_ids: list[int] = msgspec.field(default_factory=list)
    bos_token_id: int | None = None
    max_stop_sequences: int = 8
    max_stop_length: int = 256

    def options(self, model: str) -> GenerationOptions:
        """Validated options.

        Raises:
            RepositoryError: a value out of range.
        """
        where = f"model {model!r}: {MODEL_CONFIG}: generation"
        new_tokens = self.max_new_tokens or self.max_context - 1
        default_tokens = self.default_max_tokens or min(256, new_tokens)
        problem = first_out_of_range(
            ("max_context", self.max_context, 2, MAX_TEXT_TOKENS),
            ("max_sequences", self.max_sequences, 1, MAX_SEQUENCES),
            ("max_queue", self.max_queue, 0, MAX_QUEUE),
            ("max_new_tokens", new_tokens, 1, self.max_context - 1),
            ("default_max_tokens", default_tokens, 1, new_tokens),
            ("max_stop_sequences", self.max_stop_sequences, 0, 64),
            ("max_stop_length", self.max_stop_length, 1, 4096),
        )
        if problem:
            raise RepositoryError(f"{where}: {problem}")
        if not self.eos_token_ids:
            raise RepositoryError(f"{where}: eos_token_ids is empty: name the end token(s)")
        return GenerationOptions(
            max_context=self.max_context,
            max_sequences=self.max_sequences,
            max_queue=self.max_queue,
            max_new_tokens=new_tokens,
            default_max_tokens=default_tokens,
            eos_token_ids=tuple(self.eos_token_ids),
            bos_token_id=self.bos_token_id,
            max_stop_sequences=self.max_stop_sequences,
            max_stop_length=self.max_stop_length,
        )


class ImageConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[image]`` in ``model.toml``: the model takes pictures, decoded here; its graph's
    image input is UINT8 ``[images, height, width, 3]`` (see :mod:`app.models.image`).

    Attributes:
        input: The graph input that takes the images.
        scores: The output of class scores that ``:classify`` ranks ("" for the only
            2-dimensional float output).
        formats: Image formats accepted, of PNG, JPEG, WEBP, BMP, GIF, TIFF.
        max_pixels: Most pixels one image may declare (refused before decoding).
        max_images: Most images in one request.
    """

    input: str = "image"
    scores: str = ""
    formats: list[str] = msgspec.field(default_factory=lambda: ["PNG", "JPEG"])
    max_pixels: int = 4_194_304
    max_images: int = 16

    def options(self, model: str) -> ImageOptions:
        """Validated options.

        Raises:
            RepositoryError: a value out of range or an unknown format.
        """
        where = f"model {model!r}: {MODEL_CONFIG}: image"
        problem = first_out_of_range(
            ("max_pixels", self.max_pixels, 1, MAX_IMAGE_PIXELS),
            ("max_images", self.max_images, 1, MAX_BATCH_ROWS),
        )
        if problem:
            raise RepositoryError(f"{where}: {problem}")
        formats = [f.upper() for f in self.formats]
        unknown = sorted(set(formats) - set(KNOWN_FORMATS))
        if unknown or not formats:
            raise RepositoryError(
                f"{where}: formats {unknown or '[]'} are not among {', '.join(KNOWN_FORMATS)}"
            )
        return ImageOptions(
            input=self.input,
            scores=self.scores,
            formats=tuple(formats),
            max_pixels=self.max_pixels,
            max_images=self.max_images,
        )


class ShadowConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[shadow]`` in ``model.toml``: replay a share of the model's requests on a candidate
    version after answering them, and compare (see :mod:`app.models.shadow`).

    Attributes:
        version: The candidate version.
        percent: Share of the other versions' requests replayed, in percent (0 < p <= 100).
        max_queue: Replays that may wait per worker; more are dropped (counted).
    """

    version: int
    percent: float = 10.0
    max_queue: int = 16

    def options(self, model: str) -> ShadowOptions:
        """Validated options (the version is checked against the repository later).

        Raises:
            RepositoryError: a value out of range.
        """
        where = f"model {model!r}: {MODEL_CONFIG}: shadow"
        if not 0 < self.percent <= 100:
            raise RepositoryError(f"{where}: percent {self.percent:g} is out of range 0 < p <= 100")
        problem = out_of_range("max_queue", self.max_queue, 1, MAX_QUEUE)
        if problem:
            raise RepositoryError(f"{where}: {problem}")
        return ShadowOptions(self.version, float(self.percent), self.max_queue)


class CaptureConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[drift.capture]``: store a sampled share of the model's request payloads (nothing
    is stored without it).

    Attributes:
        percent: Share of requests captured (0 < p <= 100).
        max_file_mib: A file is closed at this size, in MiB.
        max_files: Files kept for the model; the oldest are removed.
        redact: Inputs whose values are never written.
    """

    percent: float = 1.0
    max_file_mib: int = 16
    max_files: int = 8
    redact: list[str] = msgspec.field(default_factory=list)


class DriftConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[drift]`` in ``model.toml``: input statistics and a drift score against a
    reference window (see :mod:`app.models.drift`).

    Attributes:
        window_s: Time constant of the recent statistics scored, in seconds.
        max_features: Features tracked per input (the first ones).
        capture: Sampled payload capture (``[drift.capture]``); off when absent.
    """

    window_s: float = 300.0
    max_features: int = 32
    capture: CaptureConfig | None = None

    def options(self, model: str, drift_dir: Path | None, capture_dir: Path | None) -> DriftOptions:
        """Validated options.

        Raises:
            RepositoryError: a value out of range, or capture without a folder.
        """
        where = f"model {model!r}: {MODEL_CONFIG}: drift"
        if not 1 <= self.window_s <= 86_400:
            raise RepositoryError(f"{where}: window_s {self.window_s:g} is out of range 1..86400")
        problem = out_of_range("max_features", self.max_features, 1, 1024)
        if problem:
            raise RepositoryError(f"{where}: {problem}")
        capture = None
        if self.capture is not None:
            c = self.capture
            if not 0 < c.percent <= 100:
                raise RepositoryError(
                    f"{where}.capture: percent {c.percent:g} is out of range 0 < p <= 100"
                )
            problem = first_out_of_range(
                ("max_file_mib", c.max_file_mib, 1, 1024),
                ("max_files", c.max_files, 1, 1000),
            )
            if problem:
                raise RepositoryError(f"{where}.capture: {problem}")
            if capture_dir is None:
                raise RepositoryError(
                    f"{where}.capture: payload capture needs a folder: set models.capture_dir"
                )
            capture = CaptureOptions(
                capture_dir / model, c.percent, c.max_file_mib << 20, c.max_files,
                frozenset(c.redact),
            )  # fmt: skip
        return DriftOptions(
            reference=drift_dir / f"{model}.json" if drift_dir else None,
            window_s=self.window_s,
            max_features=self.max_features,
            capture=capture,
        )


class ModelConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Contents of ``<name>/model.toml``; every key is optional.

    Attributes:
        default_version: Version served when a request names none (default: newest).
        intra_op_threads: Overrides the server-wide intra-op thread count for this model.
        inter_op_threads: Overrides the server-wide inter-op thread count for this model.
        max_batch_rows: Largest batch per request for this model (at most the global limit).
        warmup_runs: Warm-up inferences per version (0 disables warm-up).
        timeout_ms: Default deadline of a request to this model; clients may only lower it.
        max_concurrency: Runs of this model at once per worker.
        max_queue: Requests that may wait for a run slot per worker; more get 503.
        inline_run_us: Overrides the server-wide ``inline_run_us`` for this model (0: always
            run in a helper thread in gevent workers).
        share_weights: Run on the weights as mapped from the model's external data file,
            one copy shared by every worker, instead of a repacked copy in each (less
            memory; slower at small batches). Needs float weights in external data.
        batching: Dynamic batching (``[batching]`` table); off when absent.
        cache: Response cache (``[cache]`` table); off when absent.
        text: The model takes text (``[text]`` table); a tensor model when absent.
        generation: The model generates text (``[generation]`` table).
        image: The model takes images (``[image]`` table).
        traffic: Weights by version for requests that name no version, e.g.
            ``{"1" = 90, "2" = 10}``; routing is sticky per request id.
        shadow: Shadow traffic to a candidate version (``[shadow]`` table); off when absent.
        drift: Input statistics and drift scores (``[drift]`` table); off when absent.
        labels: Class names, shown in metadata for clients.
        description: Free text shown in metadata.
    """

    default_version: int | None = None
    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    max_batch_rows: int | None = None
    warmup_runs: int | None = None
    timeout_ms: int | None = None
    max_concurrency: int | None = None
    max_queue: int | None = None
    inline_run_us: int | None = None
    share_weights: bool = False
    traffic: dict[str, int] = msgspec.field(default_factory=dict)
    batching: BatchingConfig | None = None
    cache: CacheConfig | None = None
    text: TextConfig | None = None
    generation: GenerationConfig | None = None
    image: ImageConfig | None = None
    shadow: ShadowConfig | None = None
    drift: DriftConfig | None = None
    labels: list[str] = msgspec.field(default_factory=list)
    description: str = ""


@dataclass(slots=True)
class ModelEntry:
    """All versions of one model, and once loaded, the runner of each."""

    name: str
    config: ModelConfig
    versions: dict[int, OnnxModel] = field(default_factory=dict)
    runners: dict[int, Predictor] = field(default_factory=dict)
    shadow: Shadow | None = None
    rollout: RolloutState | None = None

    def traffic_shares(self) -> dict[str, float]:
        """Percent of the requests naming no version that each version gets."""
        weights = self.config.traffic
        return shares(weights) if weights else {str(self.default_version): 100.0}

    @property
    def default_version(self) -> int:
        """The configured default, or the newest version."""
        return self.config.default_version or max(self.versions)

    def route(self, routing_key: str | None) -> int:
        """The version for a request that names none: by traffic weight, sticky per key."""
        weights = self.config.traffic
        if not weights or routing_key is None:
            return self.default_version
        total = sum(weights.values())
        digest = hashlib.blake2b(f"{self.name}\0{routing_key}".encode(), digest_size=8).digest()
        point = int.from_bytes(digest, "big") % total
        for version, weight in weights.items():
            if point < weight:
                return int(version)
            point -= weight
        return self.default_version  # unreachable: the points cover the total

    def states(self) -> list[tuple[str, ModelState]]:
        """``(version, state)`` of every version, in version order."""
        return [(m.version_str, m.state) for _, m in sorted(self.versions.items())]


def valid_name(name: str) -> bool:
    """Whether a model name is acceptable (no path separators, dots-only or odd characters)."""
    return bool(NAME_RE.match(name)) and name.strip(".") != ""


class RepositoryObserver(InferenceObserver, ShadowObserver, DriftObserver, Protocol):
    """Receives what the models and their shadows measure (a worker's metrics)."""


class Repository:
    """The models one worker serves, by name and version."""

    def __init__(self, entries: dict[str, ModelEntry], default_model: str = "") -> None:
        self._entries = dict(sorted(entries.items()))
        self._observer: RepositoryObserver | None = None
        self._drift: dict[str, DriftOptions] = {}
        self._watching: list[Drift] = []
        if default_model and default_model not in self._entries:
            raise RepositoryError(
                f"models.default_model {default_model!r} is not in the repository "
                f"(models: {', '.join(self._entries) or 'none'})"
            )
        self.default_model = default_model or next(iter(self._entries), "")

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def scan(
        cls,
        root: Path,
        options: RuntimeOptions,
        default_model: str = "",
        observer: RepositoryObserver | None = None,
        rollouts: Path | None = None,
        drift: Path | None = None,
        capture: Path | None = None,
    ) -> Repository:
        """Read the layout and configs under ``root`` without creating sessions.

        Args:
            root: The repository folder.
            options: Server-wide session options.
            default_model: Model behind ``/predict`` ("" for the first).
            observer: Where models and shadows report.
            rollouts: Folder of rollout state files whose traffic replaces ``model.toml``'s
                (see :mod:`app.models.rollout`); None for none.
            drift: Folder of drift references (see :mod:`app.models.drift`); None for none.
            capture: Folder for captured payloads; None forbids ``[drift.capture]``.

        Raises:
            RepositoryError: an unusable layout, config or model file.
        """
        try:
            root = root.resolve(strict=True)
        except OSError:
            raise RepositoryError(f"model repository {root} does not exist") from None
        if not root.is_dir():
            raise RepositoryError(f"model repository {root} is not a directory")
        entries: dict[str, ModelEntry] = {}
        for model_dir in sorted(root.iterdir()):
            if model_dir.name.startswith(".") or not model_dir.is_dir():
                continue
            entry = _scan_model(root, model_dir, options, observer)
            entry.rollout = traffic_override(rollouts, entry.name, set(entry.versions))
            if entry.rollout is not None:
                entry.config.traffic = dict(entry.rollout.traffic)
            entries[entry.name] = entry
        if not entries:
            raise RepositoryError(
                f"model repository {root} holds no models (expected <name>/<version>/model.onnx)"
            )
        repository = cls(entries, default_model)
        repository._observer = observer
        for name, entry in entries.items():
            if entry.config.drift is not None:
                repository._drift[name] = entry.config.drift.options(name, drift, capture)
        return repository

    @classmethod
    def single_file(
        cls,
        path: Path,
        options: RuntimeOptions,
        name: str | None = None,
        observer: RepositoryObserver | None = None,
    ) -> Repository:
        """Serve one ``.onnx`` file as version 1 of a model named after the file.

        Raises:
            RepositoryError: the file is missing or the name is unusable.
        """
        if not path.is_file():
            raise RepositoryError(f"model file {path} does not exist")
        name = name or path.stem
        if not valid_name(name):
            raise RepositoryError(f"model name {name!r} is invalid: use letters, digits, _ . -")
        check_model_file(path.resolve(), path.resolve().parent)
        entry = ModelEntry(name, ModelConfig())
        entry.versions[1] = OnnxModel(name, 1, path.resolve(), options, observer)
        repository = cls({name: entry})
        repository._observer = observer
        return repository

    @property
    def largest_batch(self) -> int:
        """The largest ``max_batch_size`` of any batching model (0 when none batches)."""
        return max(
            (m.options.batching.max_batch_size for m in self.models() if m.options.batching),
            default=0,
        )

    def set_observer(self, observer: RepositoryObserver | None) -> None:
        """Report every session run of every model, and every shadow run, to ``observer``
        (a worker's metrics)."""
        self._observer = observer
        for model in self.models():
            model.observer = observer

    def load(self, runner: type[Runner] = Runner) -> None:
        """Create every session, warm it up and give it a runner; then the repository is ready.

        Args:
            runner: The kind of runner the worker needs (:class:`CooperativeRunner` in
                gevent workers).

        Raises:
            RepositoryError: a model cannot be loaded or warmed up.
        """
        for entry in self._entries.values():
            for version, model in sorted(entry.versions.items()):
                model.load()
                served: Predictor
                if model.options.text is not None:
                    tokenizer = str(model.path.parent / TOKENIZER_FILE)
                    served = TextRunner(runner(model), model.options.text, tokenizer)
                elif model.options.generation is not None:
                    served = Generator(model, model.options.generation, model.path.parent)
                elif model.options.image is not None:
                    served = ImageRunner(runner(model), model.options.image)
                    served.warm_up()
                else:
                    served = runner(model)
                entry.runners[version] = served
                log.info("model_ready", model=model.name, version=model.version_str)
        for name, drift in self._drift.items():
            self._watch_inputs(self._entries[name], drift)
        executor = ShadowExecutor()  # one per worker: created after the fork, like its thread
        for entry in self._entries.values():
            if entry.config.shadow is not None:
                options = entry.config.shadow.options(entry.name)
                entry.shadow = Shadow(
                    entry.name, options, entry.runners[options.version], entry.config.labels,
                    executor, self._observer,
                )  # fmt: skip

    def _watch_inputs(self, entry: ModelEntry, options: DriftOptions) -> None:
        """Give each loaded version of ``entry`` its drift statistics."""
        if options.capture is not None:
            inputs = {s.name for r in entry.runners.values() for s in r.signature.inputs}
            unknown = sorted(options.capture.redact - inputs)
            if unknown:
                raise RepositoryError(
                    f"model {entry.name!r}: {MODEL_CONFIG}: drift.capture.redact names "
                    f"{unknown}, which are not inputs of the model ({', '.join(sorted(inputs))})"
                )
        for version, served in entry.runners.items():
            drift = Drift(entry.name, str(version), options, self._observer)
            self._watching.append(drift)
            if isinstance(served, ImageRunner):
                served.runner.drift = drift  # the decoded pixels, as the graph sees them
            elif isinstance(served, (Runner, TextRunner)):
                served.drift = drift

    def flush_statistics(self) -> None:
        """Hand the input statistics gathered since the last second to the metrics (and
        captured payloads to their files), as a worker exits."""
        for drift in self._watching:
            drift.flush()

    def shadow(self, name: str, version: str) -> Shadow | None:
        """The shadow to hand a request of ``name`` served by ``version`` to, if it is one
        to mirror."""
        entry = self._entries.get(name)
        shadow = entry.shadow if entry is not None else None
        return shadow if shadow is not None and shadow.wants(version) else None

    def shadow_job(
        self, signature: Signature, answer: Mapping[str, np.ndarray], replay: Replay
    ) -> ShadowJob | None:
        """The shadow job of a request ``signature``'s version answered with ``answer``, if
        the request is one to mirror; the front submits it once the answer is sent."""
        shadow = self.shadow(signature.name, signature.version)
        return shadow.job(signature.version, answer, replay) if shadow is not None else None

    # -- queries -----------------------------------------------------------------------------

    def models(self) -> Iterator[OnnxModel]:
        """Every model version, by name then version."""
        for entry in self._entries.values():
            for _, model in sorted(entry.versions.items()):
                yield model

    @property
    def names(self) -> list[str]:
        """Model names in order."""
        return list(self._entries)

    @property
    def ready(self) -> bool:
        """True when every model version is loaded and warmed up."""
        return all(m.ready for m in self.models())

    def entry(self, name: str) -> ModelEntry:
        """All versions of a model.

        Raises:
            ModelNotFound: no such model.
        """
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFound(
                f"model {name!r} is not served here" if valid_name(name) else "no such model"
            )
        return entry

    @property
    def text_names(self) -> list[str]:
        """Names of the text models, in order."""
        return [name for name, entry in self._entries.items() if entry.config.text is not None]

    @property
    def image_names(self) -> list[str]:
        """Names of the image models, in order."""
        return [name for name, entry in self._entries.items() if entry.config.image is not None]

    @property
    def generation_names(self) -> list[str]:
        """Names of the generation models, in order."""
        return [n for n, entry in self._entries.items() if entry.config.generation is not None]

    def generator(
        self, name: str | None = None, version: str | None = None, routing_key: str | None = None
    ) -> Generator:
        """A generation model's runner: the one named, or the first generation model.

        Raises:
            ModelNotFound: no such model, or it does not generate (or none is served).
            ModelNotReady: it is still loading.
        """
        return self._served(
            Generator, self.generation_names, "no text generation model is served here",
            "does not generate text", name, version, routing_key,
        )  # fmt: skip

    def vocabulary(self, name: str | None = None, routing_key: str | None = None) -> Vocabulary:
        """The tokenizer of a text or generation model: the one named, or the first text
        model (else the first generation model).

        Raises:
            ModelNotFound: no such model, or it has no tokenizer (or none is served).
            ModelNotReady: it is still loading.
        """
        return self._served(
            Vocabulary, self.text_names or self.generation_names, "no text model is served here",
            "is not a text model", name, None, routing_key,
        )  # fmt: skip

    def text(
        self, name: str | None = None, version: str | None = None, routing_key: str | None = None
    ) -> TextRunner:
        """A text model's runner: the one named, or the first text model.

        Raises:
            ModelNotFound: no such model, or it is not a text model (or none is served).
            ModelNotReady: it is still loading.
        """
        return self._served(
            TextRunner, self.text_names, "no text model is served here", "is not a text model",
            name, version, routing_key,
        )  # fmt: skip

    def image(
        self, name: str, version: str | None = None, routing_key: str | None = None
    ) -> ImageRunner:
        """An image model's runner.

        Raises:
            ModelNotFound: no such model, or it does not take images.
            ModelNotReady: it is still loading.
        """
        return self._served(
            ImageRunner, self.image_names, "no image model is served here",
            "does not take images", name, version, routing_key,
        )  # fmt: skip

    def _served(
        self,
        kind: type[_Served],
        candidates: list[str],
        none: str,
        other: str,
        name: str | None,
        version: str | None,
        routing_key: str | None,
    ) -> _Served:
        """The runner of model ``name`` (else of the first of ``candidates``) if it is a
        ``kind``; ModelNotFound with ``none`` or "model ... ``other``" otherwise."""
        if name is None:
            if not candidates:
                raise ModelNotFound(none)
            name = candidates[0]
        runner = self.get(name, version, routing_key)
        if not isinstance(runner, kind):
            raise ModelNotFound(f"model {name!r} {other}")
        return runner

    def get(
        self, name: str, version: str | None = None, routing_key: str | None = None
    ) -> Predictor:
        """The version to serve: the one asked for, else by traffic split, else the default.

        Args:
            name: Model name.
            version: Version from the URL, if any.
            routing_key: Sticky key for traffic splits (the request id).

        Raises:
            ModelNotFound: unknown model or version.
            ModelNotReady: it exists but is still loading.
        """
        entry = self.entry(name)
        if version is None:
            number = entry.route(routing_key)
        else:
            found = int(version) if VERSION_RE.match(version) else None
            if found is None or found not in entry.versions:
                raise ModelNotFound(
                    f"model {name!r} has no version {version!r}"
                    if found is not None
                    else f"model {name!r} has no such version"
                )
            number = found
        runner = entry.runners.get(number)
        if runner is None or not runner.model.ready:
            raise ModelNotReady(f"model {name!r} version {number} is not ready yet")
        return runner


def _scan_model(
    root: Path, model_dir: Path, options: RuntimeOptions, observer: InferenceObserver | None
) -> ModelEntry:
    name = model_dir.name
    if not valid_name(name):
        raise RepositoryError(
            f"model folder {name!r} has an invalid name: use letters, digits, _ . - "
            "(at most 128 characters)"
        )
    if not _inside(model_dir, root):
        raise RepositoryError(f"model folder {name!r} leads outside the repository")
    config = _read_config(model_dir)
    entry = ModelEntry(name, config)
    runtime = RuntimeOptions(
        intra_op_threads=config.intra_op_threads or options.intra_op_threads,
        inter_op_threads=config.inter_op_threads or options.inter_op_threads,
        # A generation model warms up its own way (app.models.generation.Generator.warm_up).
        warmup_runs=0
        if config.generation
        else options.warmup_runs
        if config.warmup_runs is None
        else config.warmup_runs,
        max_batch_rows=min(config.max_batch_rows or options.max_batch_rows, options.max_batch_rows),
        timeout=config.timeout_ms / 1000 if config.timeout_ms else options.timeout,
        max_concurrency=config.max_concurrency or options.max_concurrency,
        max_queue=options.max_queue if config.max_queue is None else config.max_queue,
        batching=config.batching.options(name) if config.batching else None,
        cache=config.cache.options(name) if config.cache else None,
        text=config.text.options(name) if config.text else None,
        generation=config.generation.options(name) if config.generation else None,
        image=config.image.options(name) if config.image else None,
        inline_run_us=(
            options.inline_run_us if config.inline_run_us is None else config.inline_run_us
        ),
        share_weights=config.share_weights,
    )
    kinds = [k for k in ("text", "generation", "image") if getattr(config, k) is not None]
    if len(kinds) > 1:
        raise RepositoryError(
            f"model {name!r}: {MODEL_CONFIG}: a model has one of [text] (embeddings), "
            f"[generation] and [image]; this one has {', '.join(f'[{k}]' for k in kinds)}"
        )
    if config.image is not None and (config.batching or config.cache):
        raise RepositoryError(
            f"model {name!r}: {MODEL_CONFIG}: an image model runs the images of a request "
            "together by size; [batching] and [cache] are for tensor models"
        )
    if config.text is not None or config.generation is not None:
        if config.batching is not None:
            raise RepositoryError(
                f"model {name!r}: {MODEL_CONFIG}: a text model batches by tokens "
                "([text] max_batch_tokens), not with [batching]"
            )
        if config.cache is not None:
            raise RepositoryError(
                f"model {name!r}: {MODEL_CONFIG}: [cache] is for tensor models, not "
                "text or generation models"
            )
    for version_dir in sorted(model_dir.iterdir()):
        if not version_dir.is_dir() or version_dir.name.startswith("."):
            continue
        if not VERSION_RE.match(version_dir.name):
            # Skipping it would never serve what the operator meant as a new version.
            raise RepositoryError(
                f"model {name!r} has a folder {version_dir.name!r} that is not a version: "
                "version folders are positive integers without leading zeros (1, 2, ...); "
                "rename or remove it (folders starting with '.' are ignored)"
            )
        if not _inside(version_dir, model_dir):
            raise RepositoryError(
                f"model {name!r} version folder {version_dir.name!r} leads outside the model folder"
            )
        model_file = _check_version(name, config, version_dir)
        version = int(version_dir.name)
        entry.versions[version] = OnnxModel(
            name,
            version,
            model_file.resolve(),
            runtime,
            observer,
            labels=config.labels,
            description=config.description,
        )
    if not entry.versions:
        raise RepositoryError(
            f"model {name!r} has no version folders (expected {name}/1/{MODEL_FILE})"
        )
    versions = ", ".join(map(str, sorted(entry.versions)))
    if config.default_version is not None and config.default_version not in entry.versions:
        raise RepositoryError(
            f"model {name!r}: default_version {config.default_version} does not exist "
            f"(versions: {versions})"
        )
    for split, weight in config.traffic.items():
        if not VERSION_RE.match(split) or int(split) not in entry.versions:
            raise RepositoryError(
                f"model {name!r}: traffic names version {split!r}, which does not exist "
                f"(versions: {versions})"
            )
        if weight < 0:
            raise RepositoryError(f"model {name!r}: traffic weight for {split} is negative")
    if config.traffic and sum(config.traffic.values()) <= 0:
        raise RepositoryError(f"model {name!r}: traffic weights add up to 0")
    if config.shadow is not None:
        _check_shadow(entry, config.shadow)
    return entry


def _check_shadow(entry: ModelEntry, shadow: ShadowConfig) -> None:
    name = entry.name
    shadow.options(name)
    if entry.config.generation is not None:
        raise RepositoryError(
            f"model {name!r}: {MODEL_CONFIG}: [shadow] replays tensor, embedding and image "
            "requests; a generation model cannot be shadowed"
        )
    if shadow.version not in entry.versions:
        raise RepositoryError(
            f"model {name!r}: shadow names version {shadow.version}, which does not exist "
            f"(versions: {', '.join(map(str, sorted(entry.versions)))})"
        )
    if len(entry.versions) < 2:
        raise RepositoryError(f"model {name!r}: shadow needs another version to mirror from")


def _quantized(model_file: Path) -> bool:
    """Whether the model uses onnxruntime's quantized MatMulNBits."""
    try:
        return (QUANTIZED_DOMAIN, "MatMulNBits") in op_types(model_file.read_bytes())
    except (OSError, ProtoError) as exc:
        raise RepositoryError(f"{model_file} is not a readable ONNX model: {exc}") from None


def _check_version(name: str, config: ModelConfig, version_dir: Path) -> Path:
    """The files of one version folder, checked; returns its model file."""
    model_file = version_dir / MODEL_FILE
    if not model_file.is_file():
        raise RepositoryError(f"model {name!r} version {version_dir.name} has no {MODEL_FILE}")
    external = check_model_file(model_file, version_dir)
    if config.share_weights and not external:
        raise RepositoryError(
            f"model {name!r} version {version_dir.name}: share_weights needs the weights "
            f"in an external data file beside {MODEL_FILE} (onnx.save_model(model, path, "
            "save_as_external_data=True)); this one holds them inside"
        )
    if config.share_weights and _quantized(model_file):
        raise RepositoryError(
            f"model {name!r} version {version_dir.name}: share_weights leaves quantized "
            "MatMulNBits weights unpacked, and onnxruntime runs them about 25 times slower so "
            "(SmolLM2: 4.4 against 110 tokens/s); leave it off for this model"
        )
    if config.text is not None or config.generation is not None:
        tokenizer = version_dir / TOKENIZER_FILE
        if not tokenizer.is_file() or not _inside(tokenizer, version_dir):
            raise RepositoryError(
                f"model {name!r} version {version_dir.name}: a text model needs its "
                f"{TOKENIZER_FILE} beside {MODEL_FILE}"
            )
        template = version_dir / CHAT_TEMPLATE_FILE
        if template.exists() and not _inside(template, version_dir):
            raise RepositoryError(
                f"model {name!r} version {version_dir.name}: {CHAT_TEMPLATE_FILE} leads "
                "outside its folder"
            )
    return model_file


def _read_config(model_dir: Path) -> ModelConfig:
    path = model_dir / MODEL_CONFIG
    if not path.exists():
        return ModelConfig()
    try:
        data: Any = tomllib.loads(path.read_text(encoding="utf-8"))
        config = msgspec.convert(data, ModelConfig)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RepositoryError(
            f"model {model_dir.name!r}: {MODEL_CONFIG} is unreadable: {exc}"
        ) from None
    except msgspec.ValidationError as exc:
        raise RepositoryError(f"model {model_dir.name!r}: {MODEL_CONFIG}: {exc}") from None
    threads = thread_limit()
    bounds = {
        "intra_op_threads": (1, threads),
        "inter_op_threads": (1, threads),
        "max_batch_rows": (1, MAX_BATCH_ROWS),
        "default_version": (1, MAX_VERSION),
        "timeout_ms": (1, MAX_TIMEOUT_MS),
        "max_concurrency": (1, threads),
        "warmup_runs": (0, MAX_WARMUP_RUNS),
        "max_queue": (0, MAX_QUEUE),
        "inline_run_us": (0, MAX_INLINE_RUN_US),
    }
    for key, (low, high) in bounds.items():
        value = getattr(config, key)
        problem = None if value is None else out_of_range(key, value, low, high)
        if problem:
            raise RepositoryError(f"model {model_dir.name!r}: {MODEL_CONFIG}: {problem}")
    return config


def _inside(path: Path, parent: Path) -> bool:
    try:
        return path.resolve(strict=True).is_relative_to(parent.resolve(strict=True))
    except OSError:
        return False


def check_model_file(model_file: Path, folder: Path) -> list[str]:
    """Refuse a model file that is (or needs data) outside its own folder.

    ONNX external data is addressed by a relative ``location``; a location that is absolute,
    climbs with ``..`` or resolves through a link to elsewhere would let a model read any file.
    (onnxruntime refuses those too; checking here stops the repository before any worker
    starts, with a message naming the file.)

    Returns:
        The external data locations the file refers to (none when it holds its weights).

    Raises:
        RepositoryError: the file or its external data escapes ``folder``.
    """
    if not _inside(model_file, folder):
        raise RepositoryError(f"{model_file.name} in {folder} leads outside its folder")
    try:
        data = model_file.read_bytes()
        locations = external_data_locations(data)
    except (OSError, ProtoError) as exc:
        raise RepositoryError(f"{model_file} is not a readable ONNX model: {exc}") from None
    if not looks_like_model(data):
        raise RepositoryError(f"{model_file} is not a readable ONNX model: it has no graph")
    for location in locations:
        target = folder / location
        if not location or Path(location).is_absolute() or not _inside(target, folder):
            raise RepositoryError(
                f"{model_file} refers to external data {location!r} that is missing or "
                "outside its own folder"
            )
    return locations
