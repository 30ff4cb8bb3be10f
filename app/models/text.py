"""Text models: texts are tokenized here, run through the model, pooled into vectors.

A model folder whose ``model.toml`` has a ``[text]`` table carries its tokenizer
(``tokenizer.json``, for the ``tokenizers`` library) beside each ``model.onnx``. The graph
takes ``input_ids`` and ``attention_mask`` (and ``token_type_ids`` if it has such an input);
its output is either already one vector per text (``pooling = "graph"``, as the bundled
MiniLM) or one vector per token, pooled here (``"mean"`` over the real tokens, or ``"cls"``).

:class:`TextRunner` serves such a model. It speaks text to the protocols (its signature is
``text`` BYTES in, vectors out, so OIP clients send strings), and merges concurrent requests
in a worker into runs of at most ``max_batch_tokens`` padded tokens (:class:`TokenBatcher`):
the sequences of all waiting requests are sorted by length and cut into runs, so short texts
are not padded to the length of long ones; each caller gets exactly its own vectors.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from tokenizers import Encoding, Tokenizer

from app.models.batching import LeaderQueue, Waiter
from app.models.drift import Drift
from app.models.errors import InvalidInput, PayloadTooLarge, RepositoryError, ServingError
from app.models.onnx import TextOptions
from app.models.runner import Runner
from app.models.signature import Signature, TensorSpec

TOKENIZER_FILE = "tokenizer.json"
#: The text input every text model's signature has.
TEXT_INPUT = "text"


@dataclass(frozen=True, slots=True)
class Embedded:
    """Vectors for some texts, and how many tokens each took (after truncation)."""

    vectors: np.ndarray
    tokens: list[int]


def load_tokenizers(path: str, max_tokens: int) -> tuple[Tokenizer, Tokenizer]:
    """The model's tokenizer twice: exact, and truncating to ``max_tokens``.

    ``tokenizer.json`` files often switch on fixed padding and their own truncation; both are
    set here explicitly. Two objects, because these settings are state of the tokenizer and
    requests that do and do not truncate may run at the same time.

    Raises:
        RepositoryError: the file is not a tokenizer.
    """
    try:
        exact, truncating = Tokenizer.from_file(path), Tokenizer.from_file(path)
    except Exception as exc:  # the tokenizers library raises its own exception types
        raise RepositoryError(f"{path} is not a usable tokenizer: {exc}") from None
    for tokenizer in (exact, truncating):
        tokenizer.no_padding()
        tokenizer.no_truncation()
    truncating.enable_truncation(max_tokens)
    return exact, truncating


@dataclass(slots=True, eq=False)
class _Job(Waiter[np.ndarray]):
    sequences: list[list[int]] = field(default_factory=list)
    tokens: int = 0


#: Runs padded sequences: (sequences, deadline) -> one vector per sequence, in order.
EmbedFn = Callable[[list[list[int]], float | None], np.ndarray]
#: Reports (sequences in the run, padded tokens, seconds each request waited).
TokenReport = Callable[[int, int, list[float]], None]


class TokenBatcher(LeaderQueue[_Job, np.ndarray]):
    """Merges the texts of concurrent requests into runs of bounded padded size.

    Args:
        label: ``name/version`` for messages.
        options: Limits.
        run: Runs one padded batch.
        report: Receives each run's size (metrics).
    """

    def __init__(
        self, label: str, options: TextOptions, run: EmbedFn, report: TokenReport | None = None
    ) -> None:
        super().__init__(label, options.max_queue)
        self.options = options
        self._run = run
        self._report = report

    def submit(self, sequences: list[list[int]], deadline: float | None) -> np.ndarray:
        """Queue token sequences and wait for their vectors (one row each, in order).

        Raises:
            Overloaded, InferenceTimeout, ServingError: as :class:`LeaderQueue` says.
        """
        job = _Job(deadline, sequences=sequences, tokens=sum(map(len, sequences)))
        return self._wait_for(job)

    def _collect(self) -> list[_Job]:
        budget = self.options.max_batch_tokens
        with self._cond:
            if not self._queue:
                return []
            batch = [self._queue.popleft()]
            tokens = batch[0].tokens
            close_at = batch[0].enqueued + self.options.max_queue_delay
            while tokens < budget:
                if self._queue:
                    job = self._queue.popleft()
                    batch.append(job)
                    tokens += job.tokens
                    continue
                remaining = close_at - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
        return batch

    def _execute_batch(self, batch: list[_Job]) -> None:
        live = self._expire(batch)
        if not live:
            return
        # Every sequence of every request, shortest first, cut into runs within the budget.
        order = sorted(
            ((len(seq), j, i) for j, job in enumerate(live) for i, seq in enumerate(job.sequences)),
            key=lambda item: item[0],
        )
        results: list[np.ndarray | None] = [None] * len(live)
        failed: set[int] = set()
        now = time.monotonic()
        waits = [now - job.enqueued for job in live]
        deadlines = [job.deadline for job in live]
        deadline = None if None in deadlines else max(d for d in deadlines if d is not None)
        for run in _runs(order, self.options.max_batch_tokens):
            sequences = [live[j].sequences[i] for _, j, i in run]
            if self._report is not None:
                self._report(len(run), len(run) * run[-1][0], waits)
                waits = []
            try:
                vectors = self._run(sequences, deadline)
            except ServingError:
                failed.update(j for _, j, _ in run)
                continue
            for row, (_, j, i) in enumerate(run):
                if results[j] is None:
                    results[j] = np.empty((len(live[j].sequences), vectors.shape[1]), vectors.dtype)
                results[j][i] = vectors[row]  # type: ignore[index]
        for j, job in enumerate(live):
            if j in failed:
                # One request may have poisoned the run: give each its own answer.
                try:
                    job.result = self._run(job.sequences, job.deadline)
                except ServingError as exc:
                    job.error = exc
            else:
                job.result = results[j]
            self._answer(job)


def _runs(order: list[tuple[int, int, int]], budget: int) -> list[list[tuple[int, int, int]]]:
    """Cut length-sorted ``(length, job, index)`` items into runs of at most ``budget``
    padded tokens (rows x the run's longest)."""
    runs: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    for item in order:
        if current and (len(current) + 1) * item[0] > budget:
            runs.append(current)
            current = []
        current.append(item)
    if current:
        runs.append(current)
    return runs


class Vocabulary:
    """A model's tokenizer as clients see it: tokenize and decode, untruncated.

    Args:
        tokenizer: The model's tokenizer, without padding or truncation.
    """

    #: The served model's signature (set by the subclass).
    signature: Signature

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._exact = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        #: Ids of the special tokens ([CLS], [SEP], [PAD], <|im_end|>...).
        self.special_ids = {
            i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special
        }

    def tokenize(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[Encoding]:
        """Tokens of each text, untruncated."""
        return self._exact.encode_batch(list(texts), add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of token ids.

        Raises:
            InvalidInput: an id outside the vocabulary.
        """
        self._check_ids(ids, "ids")
        return self._exact.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _check_ids(self, ids: Sequence[int], where: str) -> None:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidInput(
                f"{where}: token id {bad} is not in the vocabulary (0 to {self.vocab_size - 1})"
            )


class TextRunner(Vocabulary):
    """Serves a text model: tokenizer, token-budget batching and pooling around a runner.

    Args:
        runner: Runs the graph (the worker's kind of runner).
        options: ``[text]`` from ``model.toml``.
        tokenizer_path: The model version's ``tokenizer.json``.

    Raises:
        RepositoryError: the tokenizer or the graph does not fit what ``[text]`` says.
    """

    def __init__(self, runner: Runner, options: TextOptions, tokenizer_path: str) -> None:
        exact, self._truncating = load_tokenizers(tokenizer_path, options.max_tokens)
        super().__init__(exact)
        self.runner = runner
        self.model = runner.model
        self.options = options
        graph = self.model.signature
        names = {s.name for s in graph.inputs}
        if not {"input_ids", "attention_mask"} <= names:
            raise RepositoryError(
                f"{self.model.label}: a text model takes input_ids and attention_mask; "
                f"its inputs are {sorted(names)}"
            )
        self._token_types = "token_type_ids" in names
        outputs = {s.name: s for s in graph.outputs}
        if options.output and options.output not in outputs:
            raise RepositoryError(
                f"{self.model.label}: [text] output {options.output!r} is not an output"
            )
        if not options.output and len(outputs) != 1:
            raise RepositoryError(
                f"{self.model.label}: set [text] output to one of {sorted(outputs)}"
            )
        out = outputs[options.output] if options.output else graph.outputs[0]
        rank = 2 if options.pooling == "graph" else 3
        if len(out.shape) != rank:
            raise RepositoryError(
                f"{self.model.label}: with pooling = {options.pooling!r} the output "
                f"{out.name!r} needs {rank} dimensions, it has {len(out.shape)}"
            )
        self._output = out.name
        self.dimensions = out.shape[-1]
        self.signature = Signature(
            graph.name,
            graph.version,
            (TensorSpec(TEXT_INPUT, "BYTES", (-1,)),),
            (TensorSpec(out.name, "FP32", (-1, self.dimensions)),),
            graph.labels,
            graph.description,
        )
        self.batcher = TokenBatcher(self.model.label, options, self._run, self._report)
        self.drift: Drift | None = None

    @property
    def timeout(self) -> float:
        """Default deadline of a request to this model, in seconds from its arrival."""
        return self.runner.timeout

    # -- text in -----------------------------------------------------------------------------

    def sequences(self, texts: Sequence[str], truncate: bool) -> list[list[int]]:
        """Token ids of each text for the model (special tokens added).

        Raises:
            InvalidInput: no texts, an empty one, or one longer than ``max_tokens`` tokens
                when ``truncate`` is off.
            PayloadTooLarge: more texts than ``max_inputs``.
        """
        self._check_count(len(texts))
        for i, text in enumerate(texts):
            if not text:
                raise InvalidInput(f"input {i} is an empty string")
        tokenizer = self._truncating if truncate else self._exact
        sequences = [e.ids for e in tokenizer.encode_batch(list(texts))]
        if not truncate:
            for i, seq in enumerate(sequences):
                if len(seq) > self.options.max_tokens:
                    raise InvalidInput(
                        f"input {i} has {len(seq)} tokens; model {self.model.name!r} takes at "
                        f"most {self.options.max_tokens} (ask for truncation to cut it)"
                    )
        return sequences

    def check_sequences(self, sequences: Sequence[Sequence[int]]) -> list[list[int]]:
        """Token ids given by a client, used as they are.

        Raises:
            InvalidInput: no sequences, an empty one, one longer than ``max_tokens``, or an
                id outside the vocabulary.
            PayloadTooLarge: too many sequences.
        """
        self._check_count(len(sequences))
        for i, seq in enumerate(sequences):
            if not seq:
                raise InvalidInput(f"input {i} has no tokens")
            if len(seq) > self.options.max_tokens:
                raise InvalidInput(
                    f"input {i} has {len(seq)} tokens; model {self.model.name!r} takes at most "
                    f"{self.options.max_tokens}"
                )
            self._check_ids(seq, f"input {i}")
        return [list(seq) for seq in sequences]

    def _check_count(self, count: int) -> None:
        if count == 0:
            raise InvalidInput("no input: send at least one text")
        if count > self.options.max_inputs:
            raise PayloadTooLarge(
                f"{count} inputs; model {self.model.name!r} takes at most "
                f"{self.options.max_inputs} per request"
            )

    # -- vectors out -------------------------------------------------------------------------

    def embed(self, sequences: list[list[int]], deadline: float | None = None) -> Embedded:
        """One vector per token sequence, batched with the worker's other requests."""
        if self.drift is not None:
            self.drift.observe_lengths(TEXT_INPUT, [len(s) for s in sequences])
        vectors = self.batcher.submit(sequences, deadline)
        if self.model.observer is not None:
            self.model.observer.tokens(
                self.model.name, self.model.version_str, sum(map(len, sequences))
            )
        return Embedded(vectors, [len(s) for s in sequences])

    def predict(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        deadline: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Tensors in, tensors out, for the protocols: ``text`` BYTES in, vectors out.

        Texts longer than the model takes are truncated, as the tensor protocols have no
        way to ask otherwise.

        Raises:
            InvalidInput, PayloadTooLarge: inputs that do not fit.
        """
        if set(inputs) != {TEXT_INPUT}:
            raise InvalidInput(f"model {self.model.name!r} takes one input, {TEXT_INPUT!r}")
        texts = inputs[TEXT_INPUT]
        if texts.ndim != 1:
            raise InvalidInput(f"input {TEXT_INPUT!r} must be a list of texts ([-1])")
        self.signature.check_outputs(list(outputs or ()))
        vectors = self.embed(self.sequences([str(t) for t in texts], truncate=True), deadline)
        return {self._output: vectors.vectors}

    def _run(self, sequences: list[list[int]], deadline: float | None) -> np.ndarray:
        width = max(len(s) for s in sequences)
        ids = np.zeros((len(sequences), width), np.int64)
        mask = np.zeros((len(sequences), width), np.int64)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        feed: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": mask}
        if self._token_types:
            feed["token_type_ids"] = np.zeros_like(ids)
        (out,) = self.runner.run([self._output], feed, deadline)
        return self._pool(np.asarray(out, dtype=np.float32), mask)

    def _pool(self, out: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.options.pooling == "graph":
            return out
        if self.options.pooling == "cls":
            pooled = out[:, 0]
        else:
            weights = mask[..., np.newaxis].astype(np.float32)
            pooled = (out * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        if self.options.normalize:
            pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return pooled

    def _report(self, rows: int, padded: int, waits: list[float]) -> None:
        observer = self.model.observer
        if observer is not None:
            observer.batch(self.model.name, self.model.version_str, rows, waits)
            observer.batch_tokens(self.model.name, self.model.version_str, padded)
