"""Text generation: a decoder with a key/value cache, sampling, and continuous batching.

A model folder whose ``model.toml`` has a ``[generation]`` table serves a causal language
model: each version holds ``model.onnx`` (the decoder graph that
``packaging/text/build_smollm.py`` writes: ``input_ids``, ``seqlens_k``,
``total_sequence_length`` and a ``past.{i}.key``/``.value`` cache per layer in; ``logits`` of
each sequence's last token and the ``present`` caches out), ``tokenizer.json`` and, for chat,
``chat_template.jinja``.

:class:`Generator` serves it. Every worker keeps one key/value cache of ``max_sequences``
slots of ``max_context`` positions, bound to onnxruntime once per batch size so a step
copies nothing. One scheduler (a greenlet in gevent workers, else a thread) runs the model:

* a new request is prefilled on its own (its whole prompt in one run, batch 1, its slot);
* then one decoding step runs every active sequence together, one token each, whatever
  their lengths (``seqlens_k`` tells the attention where each one ends);
* requests join at the next step and leave when they finish, are cancelled (the client went
  away) or pass their deadline; beyond ``max_sequences`` they wait, beyond ``max_queue``
  more they are refused (503).

Session runs go to a helper thread in gevent workers, so the worker's own thread keeps
serving other requests and probes while a step runs. Tokens reach the request as
:class:`Chunk` events through a queue, text already decoded (UTF-8 split across tokens is
held back) and checked for stop sequences (text that may start one is held back too).
"""

from __future__ import annotations

import mmap
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import structlog
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from app.models.errors import (
    InferenceFailed,
    InferenceTimeout,
    InvalidInput,
    Overloaded,
    RepositoryError,
    ServingError,
)
from app.models.onnx import GenerationOptions, OnnxModel
from app.models.scheduling import cooperative, run_in_thread
from app.models.signature import Signature, TensorSpec
from app.models.text import Vocabulary, load_tokenizers

log = structlog.get_logger(__name__)

CHAT_TEMPLATE_FILE = "chat_template.jinja"
#: Tensor names of the text-in, text-out signature the tensor protocols see.
TEXT_INPUT, TEXT_OUTPUT = "text_input", "text_output"
#: Candidates looked at first for top-p; the whole vocabulary only when they hold too little.
_NUCLEUS_CANDIDATES = 256
#: Seconds past its deadline a request waits for the scheduler to say that it passed.
_PATIENCE = 5.0
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, slots=True)
class Sampling:
    """How to pick tokens and when to stop (already validated).

    Attributes:
        max_tokens: Most tokens to generate.
        temperature: 0 is greedy (always the likeliest token).
        top_k: Sample from the ``top_k`` likeliest tokens only (0: all).
        top_p: Sample from the smallest set of likeliest tokens whose probability reaches
            ``top_p`` (1: all).
        seed: Seed of the sampler, for repeatable sampling; None draws one.
        stop: Texts that end the generation; they are not part of the answer.
    """

    max_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Chunk:
    """New text of a generation (possibly empty while a stop sequence may be starting)."""

    text: str
    token: int


@dataclass(frozen=True, slots=True)
class Finished:
    """How a generation ended.

    Attributes:
        reason: ``stop`` (an end-of-sequence token or a stop sequence), ``length``
            (``max_tokens`` reached).
        prompt_tokens: Tokens of the prompt.
        completion_tokens: Tokens generated (the end-of-sequence token included).
        seconds: From submission to the last token.
    """

    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    seconds: float


class Generation:
    """One request's generation: iterate it for :class:`Chunk` events; then :attr:`finished`
    says how it ended. :meth:`cancel` (or closing the iterator) stops it at the next step.

    Raises (while iterating):
        InferenceTimeout: the deadline passed.
        InferenceFailed: the model failed on this batch.
    """

    def __init__(
        self, prompt: list[int], sampling: Sampling, deadline: float | None, eos: frozenset[int]
    ) -> None:
        self.prompt = prompt
        self.sampling = sampling
        self.deadline = deadline
        self.submitted = time.monotonic()
        self.finished: Finished | None = None
        self.cancelled = False
        self._events: queue.Queue[Chunk | Finished | ServingError] = queue.Queue()
        self._eos = eos
        self._rng = np.random.default_rng(sampling.seed)
        # Scheduler's state.
        self.slot = -1
        self.length = 0  # tokens in the cache
        self.generated: list[int] = []
        self.last_token_at = 0.0
        self._stream: DecodeStream | None = None
        self._text = ""  # generated text so far
        self._sent = 0  # characters of it already handed out
        self._hold = max((len(s) for s in sampling.stop), default=1) - 1

    def __iter__(self) -> Iterator[Chunk]:
        try:
            while True:
                try:
                    event = self._events.get(timeout=self._patience())
                except queue.Empty:
                    raise InferenceTimeout("the generation stopped answering") from None
                if isinstance(event, Chunk):
                    yield event
                elif isinstance(event, Finished):
                    self.finished = event
                    return
                else:
                    raise event
        finally:
            if self.finished is None:
                self.cancel()

    @property
    def done(self) -> Finished:
        """How it ended, once the iteration ran out.

        Raises:
            InferenceFailed: it has not ended (or ended in an error).
        """
        if self.finished is None:
            raise InferenceFailed("the generation has not finished")
        return self.finished

    def _patience(self) -> float | None:
        # The scheduler ends overdue generations itself; this only guards against losing it.
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic()) + _PATIENCE

    def text(self) -> str:
        """Run to the end and return the whole text."""
        return "".join(chunk.text for chunk in self)

    def cancel(self) -> None:
        """Stop generating at the next step (the client went away)."""
        self.cancelled = True

    # -- called by the scheduler -------------------------------------------------------------

    def pick(self, logits: np.ndarray) -> int:
        """The next token from one row of logits."""
        return sample(logits, self.sampling, self._rng)

    def accept(self, token: int, tokenizer: Tokenizer) -> bool:
        """Take a generated token, hand out the text it completes; False once finished."""
        self.generated.append(token)
        sampling = self.sampling
        if token in self._eos:
            if len(self._text) > self._sent:
                self._send(token, len(self._text))
            self._finish("stop")
            return False
        if self._stream is None:
            self._stream = DecodeStream(skip_special_tokens=True)
        piece = self._stream.step(tokenizer, token)
        if piece:
            start = max(0, len(self._text) - self._hold)
            self._text += piece
            for stop in sampling.stop:
                at = self._text.find(stop, start)
                if at >= 0:
                    self._text = self._text[:at]
                    self._send(token, len(self._text))
                    self._finish("stop")
                    return False
        if len(self.generated) >= sampling.max_tokens:
            self._send(token, len(self._text))
            self._finish("length")
            return False
        self._send(token, len(self._text) - self._held())
        return True

    def fail(self, error: ServingError) -> None:
        """End with an error."""
        self._events.put(error)

    def _held(self) -> int:
        """Characters at the end that may be the start of a stop sequence."""
        tail = self._text[max(self._sent, len(self._text) - self._hold) :]
        for i in range(len(tail)):
            if any(stop.startswith(tail[i:]) for stop in self.sampling.stop):
                return len(tail) - i
        return 0

    def _send(self, token: int, upto: int) -> None:
        if upto >= self._sent:
            self._events.put(Chunk(self._text[self._sent : upto], token))
            self._sent = upto

    def _finish(self, reason: FinishReason) -> None:
        self._events.put(
            Finished(
                reason, len(self.prompt), len(self.generated), time.monotonic() - self.submitted
            )
        )


def sample(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """One token id from a row of logits, as ``sampling`` says."""
    if sampling.temperature == 0:
        return int(np.argmax(logits))
    ids: np.ndarray | None = None
    scores = logits.astype(np.float64) / sampling.temperature
    if 0 < sampling.top_k < scores.size:
        ids = np.argpartition(scores, -sampling.top_k)[-sampling.top_k :]
        scores = scores[ids]
    if sampling.top_p < 1.0:
        picked = _nucleus(scores, sampling.top_p)
        ids = picked if ids is None else ids[picked]
        scores = scores[picked]
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    choice = int(rng.choice(probs.size, p=probs))
    return choice if ids is None else int(ids[choice])


def _nucleus(scores: np.ndarray, top_p: float) -> np.ndarray:
    """Indices of the smallest set of likeliest scores whose probability reaches ``top_p``."""
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    order = None
    if probs.size > _NUCLEUS_CANDIDATES:
        # The nucleus lies within the likeliest candidates when those already hold top_p.
        head = np.argpartition(probs, -_NUCLEUS_CANDIDATES)[-_NUCLEUS_CANDIDATES:]
        if probs[head].sum() >= top_p:
            order = head[np.argsort(-probs[head], kind="stable")]
    if order is None:
        order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    keep = int(np.searchsorted(cumulative, top_p)) + 1
    return order[: min(keep, order.size)]


class ChatTemplate:
    """A model's chat template (Jinja, rendered in a sandbox as transformers does it).

    Raises:
        RepositoryError: the template does not compile.
    """

    def __init__(self, source: str, label: str) -> None:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def fail(message: str) -> None:
            raise InvalidInput(f"the chat template refused the messages: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = fail
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise RepositoryError(
                f"{label}: {CHAT_TEMPLATE_FILE} does not compile: {exc}"
            ) from None
        self._errors = (TemplateError,)

    def render(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The prompt for ``messages``, ending where the assistant's answer starts.

        Raises:
            InvalidInput: the template refused the messages.
        """
        try:
            return str(self._template.render(messages=list(messages), add_generation_prompt=True))
        except self._errors as exc:
            raise InvalidInput(f"the chat template could not render the messages: {exc}") from None


class LazyZeros:
    """A float32 array of zeros whose memory is taken page by page as it is written.

    ``np.zeros`` asks the kernel for huge pages on large arrays, so writing one cache position
    would make 2 MiB resident: every slot's whole cache after a few steps. Small pages keep a
    worker's memory in proportion to the positions its sequences reach.
    """

    def __init__(self, shape: tuple[int, ...]) -> None:
        count = int(np.prod(shape))
        self._area = mmap.mmap(-1, max(count * 4, 1))
        if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux
            self._area.madvise(mmap.MADV_NOHUGEPAGE)
        self.array = np.frombuffer(self._area, np.float32, count=count).reshape(shape)

    def forget(self) -> None:
        """Give the memory back: every value reads zero again, no page stays resident."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self._area.madvise(mmap.MADV_DONTNEED)
        else:
            self.array.fill(0)


class _Decoder:
    """The session with its key/value cache: prefill one sequence, or step several.

    The cache is one array per layer and kind, ``[slots, kv_heads, max_context, head_dim]``;
    slot ``s`` is sequence ``s``'s rows. Bindings are made once per slot (prefill) and per
    batch size (steps over slots ``0..B-1``): the arrays never move, so runs write into them.
    """

    def __init__(self, model: OnnxModel, options: GenerationOptions) -> None:
        import onnxruntime as ort

        self._ort = ort
        self.model = model
        self.options = options
        session = model.session
        self._caches = [i.name for i in session.get_inputs() if i.name.startswith("past.")]
        shapes = {i.name: i.shape for i in session.get_inputs()}
        for name in ("input_ids", "seqlens_k", "total_sequence_length"):
            if name not in shapes:
                raise RepositoryError(f"{model.label}: a generation model takes {name!r}")
        if not self._caches:
            raise RepositoryError(f"{model.label}: a generation model takes past.N.key/value")
        first = shapes[self._caches[0]]
        heads, head_dim = first[1], first[3]
        if not isinstance(heads, int) or not isinstance(head_dim, int):
            raise RepositoryError(f"{model.label}: its caches need fixed heads and head size")
        logits = next(o for o in session.get_outputs() if o.name == "logits")
        self.vocab = int(logits.shape[-1])
        shape = (options.max_sequences, heads, options.max_context, head_dim)
        self._memory = [LazyZeros(shape) for _ in self._caches]
        self._arrays = {name: m.array for name, m in zip(self._caches, self._memory, strict=True)}
        self._logits = np.zeros((options.max_sequences, self.vocab), np.float32)
        self._bound: dict[tuple[str, int], Any] = {}

    def _binding(self, kind: str, index: int) -> Any:
        """IO binding of the caches for ``prefill`` of slot ``index`` or a ``step`` of
        ``index`` sequences."""
        binding = self._bound.get((kind, index))
        if binding is None:
            ort = self._ort
            binding = self.model.session.io_binding()
            rows = slice(index, index + 1) if kind == "prefill" else slice(0, index)
            for name in self._caches:
                value = ort.OrtValue.ortvalue_from_numpy(self._arrays[name][rows])
                binding.bind_ortvalue_input(name, value)
                binding.bind_ortvalue_output(name.replace("past.", "present.", 1), value)
            out = self._logits[: 1 if kind == "prefill" else index]
            binding.bind_output("logits", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
            self._bound[(kind, index)] = binding
        return binding

    def forget(self) -> None:
        """Empty every slot's cache and give its memory back (no sequence may be running)."""
        for memory in self._memory:
            memory.forget()

    def prefill(self, slot: int, tokens: Sequence[int]) -> np.ndarray:
        """Run a whole prompt into slot ``slot``'s cache; the logits of its last token."""
        ids = np.asarray([tokens], np.int64)
        seqlens = np.array([len(tokens) - 1], np.int32)
        logits: np.ndarray = self._run(self._binding("prefill", slot), ids, seqlens)[0]
        return logits

    def step(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """One token for each of the first ``len(tokens)`` slots; ``lengths`` are their
        cache lengths before it. Returns one row of logits per slot."""
        return self._run(
            self._binding("step", len(tokens)),
            tokens.reshape(-1, 1).astype(np.int64),
            lengths.astype(np.int32),
        )

    def _run(self, binding: Any, ids: np.ndarray, seqlens: np.ndarray) -> np.ndarray:
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("seqlens_k", seqlens)
        total = np.array([int(seqlens.max()) + 1], np.int32)
        binding.bind_cpu_input("total_sequence_length", total)
        start = time.perf_counter()
        self.model.session.run_with_iobinding(binding)
        observer = self.model.observer
        if observer is not None:
            observer.inference(self.model.name, self.model.version_str, time.perf_counter() - start)
        return self._logits[: len(ids)]


class Generator(Vocabulary):
    """Serves a generation model: prompts in, tokens out, many sequences per step.

    Args:
        model: A loaded model version.
        options: ``[generation]`` from ``model.toml``.
        folder: The version's folder (``tokenizer.json``, ``chat_template.jinja``).

    Raises:
        RepositoryError: the graph, tokenizer or template does not fit.
    """

    def __init__(self, model: OnnxModel, options: GenerationOptions, folder: Path) -> None:
        exact, _ = load_tokenizers(str(folder / "tokenizer.json"), options.max_context)
        super().__init__(exact)
        self.model = model
        self.options = options
        self._decoder = _Decoder(model, options)
        if self._decoder.vocab < self.vocab_size:
            raise RepositoryError(
                f"{model.label}: its tokenizer has {self.vocab_size} tokens, the graph "
                f"{self._decoder.vocab} logits"
            )
        template = folder / CHAT_TEMPLATE_FILE
        self.chat_template = (
            ChatTemplate(template.read_text(encoding="utf-8"), model.label)
            if template.is_file()
            else None
        )
        self._eos = frozenset(options.eos_token_ids)
        self.signature = Signature(
            model.signature.name,
            model.signature.version,
            (TensorSpec(TEXT_INPUT, "BYTES", (-1,)),),
            (TensorSpec(TEXT_OUTPUT, "BYTES", (-1,)),),
            model.signature.labels,
            model.signature.description,
        )
        self._offload = cooperative()
        self._lock = threading.Condition(threading.RLock())
        self._waiting: deque[Generation] = deque()
        self._active: list[Generation | None] = [None] * options.max_sequences
        self._running = False
        #: Decoding steps run (each advances every active sequence by one token).
        self.steps = 0
        self.warm_up()

    @property
    def timeout(self) -> float:
        """Default deadline of a request to this model, in seconds from its arrival."""
        return self.model.options.timeout

    @property
    def load(self) -> tuple[int, int]:
        """(sequences generating, requests waiting) in this worker right now."""
        return sum(1 for s in self._active if s is not None), len(self._waiting)

    def warm_up(self) -> None:
        """Prefill and step once at each batch size, and once at the last position (which
        proves the model's rotary tables cover ``max_context``).

        Raises:
            RepositoryError: the model cannot run so.
        """
        decoder, context = self._decoder, self.options.max_context
        try:
            decoder.prefill(0, [0, 0])
            for size in range(1, self.options.max_sequences + 1):
                decoder.step(np.zeros(size, np.int64), np.full(size, 2))
            decoder.step(np.zeros(1, np.int64), np.array([context - 1]))
            # That step read slot 0's whole cache, which made it resident.
            decoder.forget()
        except Exception as exc:  # onnxruntime raises several unrelated types
            raise RepositoryError(
                f"{self.model.label}: it cannot decode with max_context = {context} and "
                f"max_sequences = {self.options.max_sequences}: {exc}"
            ) from None

    # -- requests ----------------------------------------------------------------------------

    def prompt(self, text: str) -> list[int]:
        """Token ids of a plain prompt (with the model's BOS when it wants one).

        Raises:
            InvalidInput: an empty prompt, or one too long to leave room for a token.
        """
        if not text:
            raise InvalidInput("the prompt is empty")
        ids = self.tokenize([text], add_special_tokens=True)[0].ids
        bos = self.options.bos_token_id
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return self._check_prompt(ids)

    def prompt_ids(self, ids: Sequence[int]) -> list[int]:
        """A prompt the client sent as token ids.

        Raises:
            InvalidInput: an id outside the vocabulary, or a prompt that is too long.
        """
        self._check_ids(ids, "prompt")
        return self._check_prompt(list(ids))

    def chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of the chat template applied to ``messages``.

        Raises:
            InvalidInput: no messages, no template, or a prompt that is too long.
        """
        if self.chat_template is None:
            raise InvalidInput(f"model {self.model.name!r} has no chat template")
        if not messages:
            raise InvalidInput("'messages' is empty")
        text = self.chat_template.render(messages)
        return self._check_prompt(self.tokenize([text], add_special_tokens=False)[0].ids)

    def _check_prompt(self, ids: list[int]) -> list[int]:
        if not ids:
            raise InvalidInput("the prompt is empty")
        room = self.options.max_context - 1
        if len(ids) > room:
            raise InvalidInput(
                f"the prompt has {len(ids)} tokens; model {self.model.name!r} takes at most "
                f"{room} (its context is {self.options.max_context} tokens)"
            )
        return ids

    def sampling(
        self,
        prompt_tokens: int,
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> Sampling:
        """Validated sampling settings for a prompt of ``prompt_tokens`` tokens.

        Raises:
            InvalidInput: a value out of range, or more tokens than the context has room for.
        """
        options = self.options
        room = options.max_context - prompt_tokens
        if max_tokens is None:
            max_tokens = min(options.default_max_tokens, room)
        if not 1 <= max_tokens <= options.max_new_tokens:
            raise InvalidInput(
                f"max_tokens must be 1 to {options.max_new_tokens}; got {max_tokens}"
            )
        if max_tokens > room:
            raise InvalidInput(
                f"the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: "
                f"together more than model {self.model.name!r}'s context of "
                f"{options.max_context} tokens"
            )
        if not 0 <= temperature <= 100:
            raise InvalidInput(f"temperature must be 0 to 100; got {temperature}")
        if not 0 <= top_k <= self.vocab_size:
            raise InvalidInput(f"top_k must be 0 (off) to {self.vocab_size}; got {top_k}")
        if not 0 < top_p <= 1:
            raise InvalidInput(f"top_p must be above 0 and at most 1; got {top_p}")
        if seed is not None and not 0 <= seed < 2**63:
            raise InvalidInput("seed must be 0 to 2**63 - 1")
        if len(stop) > options.max_stop_sequences:
            raise InvalidInput(f"at most {options.max_stop_sequences} stop sequences")
        for text in stop:
            if not 0 < len(text) <= options.max_stop_length:
                raise InvalidInput(
                    f"a stop sequence must have 1 to {options.max_stop_length} characters"
                )
        return Sampling(max_tokens, temperature, top_k, top_p, seed, tuple(stop))

    def generate(
        self, prompt: list[int], sampling: Sampling, deadline: float | None = None
    ) -> Generation:
        """Queue a generation; iterate the result for its tokens.

        Raises:
            Overloaded: ``max_sequences`` generate and ``max_queue`` wait already.
        """
        generation = Generation(prompt, sampling, deadline, self._eos)
        with self._lock:
            active, waiting = self.load
            if active + waiting >= self.options.max_sequences + self.options.max_queue:
                raise Overloaded(
                    f"model {self.model.label} is generating {active} sequences with "
                    f"{waiting} waiting; retry later"
                )
            self._waiting.append(generation)
            if not self._running:
                self._running = True
                thread = threading.Thread(target=self._loop, name="generator", daemon=True)
                thread.start()
        observer = self.model.observer
        if observer is not None:
            observer.prompt_tokens(self.model.name, self.model.version_str, len(prompt))
        return generation

    def predict(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        deadline: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Tensors in, tensors out for the protocols: ``text_input`` prompts in,
        ``text_output`` texts out (``default_max_tokens`` each, sampled as the model's
        defaults say)."""
        if set(inputs) != {TEXT_INPUT}:
            raise InvalidInput(f"model {self.model.name!r} takes one input, {TEXT_INPUT!r}")
        prompts = inputs[TEXT_INPUT]
        if prompts.ndim != 1:
            raise InvalidInput(f"input {TEXT_INPUT!r} must be a list of prompts ([-1])")
        self.signature.check_outputs(list(outputs or ()))
        runs = []
        for text in prompts:
            ids = self.prompt(text.decode() if isinstance(text, bytes) else str(text))
            runs.append(self.generate(ids, self.sampling(len(ids)), deadline))
        texts = np.array([run.text() for run in runs], dtype=object)
        return {TEXT_OUTPUT: texts}

    # -- the scheduler -----------------------------------------------------------------------

    def _loop(self) -> None:
        """Admit, prefill and step until nothing is left, then end (the next request starts
        it again)."""
        try:
            self._schedule()
        except Exception:  # a bug here must not leave requests waiting forever
            log.exception("generator_failed", model=self.model.name)
            with self._lock:
                stranded = [s for s in self._active if s is not None] + list(self._waiting)
                self._active = [None] * self.options.max_sequences
                self._waiting.clear()
                self._running = False
            for sequence in stranded:
                sequence.fail(InferenceFailed(f"model {self.model.name!r} failed to generate"))

    def _schedule(self) -> None:
        while True:
            with self._lock:
                self._retire()
                if not self._waiting and not any(self._active):
                    self._running = False
                    self._report_active()
                    return
                admitted = []
                for slot, sequence in enumerate(self._active):
                    if sequence is None and self._waiting:
                        new = self._waiting.popleft()
                        new.slot = slot
                        self._active[slot] = new
                        admitted.append(new)
            if admitted:
                self._report_active()
            for sequence in admitted:
                self._prefill(sequence)
            self._step()
            self._report_active()

    def _retire(self) -> None:
        """Free the slots of cancelled and overdue sequences; drop such waiting requests."""
        now = time.monotonic()
        for slot, sequence in enumerate(self._active):
            if sequence is not None and self._expired(sequence, now):
                self._active[slot] = None
        for sequence in list(self._waiting):
            if self._expired(sequence, now):
                self._waiting.remove(sequence)

    def _expired(self, sequence: Generation, now: float) -> bool:
        if sequence.cancelled:
            return True
        if sequence.deadline is not None and now >= sequence.deadline:
            sequence.fail(
                InferenceTimeout(
                    f"model {self.model.name!r}: the request's deadline passed after "
                    f"{len(sequence.generated)} tokens"
                )
            )
            return True
        return False

    def _execute(self, fn: Any, *args: Any) -> np.ndarray:
        result: np.ndarray = run_in_thread(fn, *args) if self._offload else fn(*args)
        return result

    def _prefill(self, sequence: Generation) -> None:
        try:
            logits = self._execute(self._decoder.prefill, sequence.slot, sequence.prompt)
        except Exception as exc:  # onnxruntime raises several unrelated types
            self._fail([sequence], exc)
            return
        sequence.length = len(sequence.prompt)
        self._take(sequence, logits, time.monotonic(), first=True)

    def _step(self) -> None:
        with self._lock:
            live = [s for s in self._active if s is not None and s.generated]
        if not live:
            return
        size = max(s.slot for s in live) + 1
        tokens = np.zeros(size, np.int64)
        lengths = np.zeros(size, np.int64)  # free slots below `size` decode a dummy token
        for sequence in live:
            tokens[sequence.slot] = sequence.generated[-1]
            lengths[sequence.slot] = sequence.length
        try:
            logits = self._execute(self._decoder.step, tokens, lengths)
        except Exception as exc:  # onnxruntime raises several unrelated types
            self._fail(live, exc)
            return
        self.steps += 1
        now = time.monotonic()
        for sequence in live:
            sequence.length += 1
            if not sequence.cancelled:
                self._take(sequence, logits[sequence.slot], now, first=False)

    def _take(self, sequence: Generation, logits: np.ndarray, now: float, first: bool) -> None:
        """Sample the sequence's next token and hand it over; free its slot when done."""
        observer, model = self.model.observer, self.model
        if observer is not None:
            if first:
                observer.first_token(model.name, model.version_str, now - sequence.submitted)
            else:
                observer.inter_token(model.name, model.version_str, now - sequence.last_token_at)
            observer.generated_tokens(model.name, model.version_str, 1)
        sequence.last_token_at = now
        if not sequence.accept(sequence.pick(logits), self._exact):
            with self._lock:
                self._active[sequence.slot] = None

    def _fail(self, sequences: list[Generation], exc: Exception) -> None:
        log.warning(
            "generation_failed",
            model=self.model.name,
            version=self.model.version_str,
            error=str(exc),
        )
        with self._lock:
            for sequence in sequences:
                sequence.fail(InferenceFailed(f"model {self.model.name!r} failed to generate"))
                self._active[sequence.slot] = None

    def _report_active(self) -> None:
        observer = self.model.observer
        if observer is not None:
            observer.active_sequences(self.model.name, self.model.version_str, self.load[0])
