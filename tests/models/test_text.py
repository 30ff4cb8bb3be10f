"""Text models on the real MiniLM: tokenization limits, token-budget batching that gives each
caller exactly its vectors, pooling, and the text signature the protocols see."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from app.models.errors import InvalidInput, PayloadTooLarge, RepositoryError
from app.models.onnx import OnnxModel, RuntimeOptions, TextOptions
from app.models.repository import Repository
from app.models.runner import Runner
from app.models.text import TextRunner, TokenBatcher, _runs, load_tokenizers
from tests import onnx_factory

SENTENCES = [
    "A man is eating food.",
    "The new movie is awesome.",
    "ok",
    "Quantum chromodynamics describes how quarks and gluons interact inside protons.",
    " ".join(["a longer sentence with many words"] * 8),
]


def runner_for(root: Path, recorder: object = None, **options: object) -> TextRunner:
    model_file = root / "minilm" / "1" / "model.onnx"
    text = TextOptions(max_tokens=256, **options)  # type: ignore[arg-type]
    model = OnnxModel("minilm", 1, model_file, RuntimeOptions(warmup_runs=1, text=text), recorder)  # type: ignore[arg-type]
    model.load()
    return TextRunner(Runner(model), text, str(model_file.parent / "tokenizer.json"))


@pytest.fixture(scope="module")
def minilm(text_models_dir: Path) -> TextRunner:
    return runner_for(text_models_dir)


def test_the_signature_speaks_text(minilm: TextRunner) -> None:
    assert [(s.name, s.datatype, s.shape) for s in minilm.signature.inputs] == [
        ("text", "BYTES", (-1,))
    ]
    assert [(s.name, s.shape) for s in minilm.signature.outputs] == [
        ("sentence_embedding", (-1, 384))
    ]
    vectors = minilm.predict({"text": np.array(SENTENCES[:2], dtype=object)})
    assert vectors["sentence_embedding"].shape == (2, 384)


def test_the_tokenizer_files_own_padding_and_truncation_are_not_used(
    text_models_dir: Path,
) -> None:
    # tokenizer.json pads every text to 128 and truncates at 128.
    exact, truncating = load_tokenizers(
        str(text_models_dir / "minilm" / "1" / "tokenizer.json"), 256
    )
    assert len(exact.encode("ok").ids) == 3  # [CLS] ok [SEP], no padding
    long = " ".join(["word"] * 300)
    assert len(exact.encode(long).ids) == 302
    ids = truncating.encode(long).ids
    assert len(ids) == 256 and ids[-1] == 102  # truncated, [SEP] kept


def test_limits(minilm: TextRunner) -> None:
    long = " ".join(["word"] * 300)
    assert len(minilm.sequences([long], truncate=True)[0]) == 256
    with pytest.raises(InvalidInput, match="302 tokens; model 'minilm' takes at most 256"):
        minilm.sequences([long], truncate=False)
    with pytest.raises(InvalidInput, match="input 1 is an empty string"):
        minilm.sequences(["fine", ""], truncate=True)
    with pytest.raises(InvalidInput, match="no input"):
        minilm.sequences([], truncate=True)
    with pytest.raises(InvalidInput, match="token id 99999 is not in the vocabulary"):
        minilm.check_sequences([[101, 99999, 102]])
    with pytest.raises(InvalidInput, match="input 0 has no tokens"):
        minilm.check_sequences([[]])
    with pytest.raises(InvalidInput, match="257 tokens"):
        minilm.check_sequences([[100] * 257])


def test_too_many_inputs(text_models_dir: Path) -> None:
    runner = runner_for(text_models_dir, max_inputs=3)
    with pytest.raises(PayloadTooLarge, match="4 inputs; model 'minilm' takes at most 3"):
        runner.sequences(["a", "b", "c", "d"], truncate=True)


def test_concurrent_requests_get_exactly_their_vectors(text_models_dir: Path) -> None:
    recorder = onnx_factory.Recorder()
    runner = runner_for(text_models_dir, recorder, max_batch_tokens=256, max_queue_delay=0.02)
    requests = [SENTENCES[i % 5 : i % 5 + 1 + i % 3] for i in range(24)]
    alone = [runner._run(runner.sequences(texts, True), None) for texts in requests]
    barrier = threading.Barrier(len(requests))

    def call(texts: list[str]) -> np.ndarray:
        barrier.wait()
        return runner.embed(runner.sequences(texts, True)).vectors

    with ThreadPoolExecutor(len(requests)) as pool:
        merged = list(pool.map(call, requests))
    for got, expected in zip(merged, alone, strict=True):
        # Another run's padding and batch size change only the summation order.
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    runs = len(recorder.padded)
    assert runs < sum(len(r) for r in requests)  # requests were merged
    assert max(recorder.padded) <= 256  # the budget holds
    assert sum(recorder.tokens_seen) == sum(
        len(s) for texts in requests for s in runner.sequences(texts, True)
    )


def test_runs_are_cut_by_length_within_the_budget() -> None:
    order = [(3, 0, 0), (3, 1, 0), (5, 0, 1), (40, 2, 0), (40, 2, 1), (100, 3, 0)]
    runs = _runs(order, 100)
    assert runs == [order[:3], order[3:5], order[5:]]
    assert all(len(r) * r[-1][0] <= 100 for r in runs)


def test_a_request_that_breaks_its_run_fails_alone() -> None:
    def run(sequences: list[list[int]], deadline: float | None) -> np.ndarray:
        if any(99 in s for s in sequences):
            from app.models.errors import InferenceFailed

            raise InferenceFailed("bad token")
        return np.array([[float(len(s))] for s in sequences])

    batcher = TokenBatcher("m/1", TextOptions(max_batch_tokens=64, max_queue_delay=0.05), run)
    barrier = threading.Barrier(3)

    def call(sequences: list[list[int]]) -> object:
        barrier.wait()
        try:
            return batcher.submit(sequences, None).tolist()
        except Exception as exc:  # collected for the assertion
            return type(exc).__name__

    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(call, [[[1, 2]], [[1, 99, 3]], [[1], [2, 3, 4]]]))
    assert answers == [[[2.0]], "InferenceFailed", [[1.0], [3.0]]]


def _token_vectors_model(path: Path) -> Path:
    """input_ids -> [batch, tokens, 2]: each token's (id, 1), for checking pooling."""
    table = np.stack([np.arange(30522, dtype=np.float32), np.ones(30522, np.float32)], axis=1)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["hidden"])],
        "tokens",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "t"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "t"]),
        ],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["b", "t", 2])],
        initializer=[numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx_factory.save(model, path, "tokens")


@pytest.mark.parametrize(
    ("pooling", "normalize"), [("mean", False), ("cls", False), ("mean", True)]
)
def test_pooling_outside_the_graph(
    tmp_path: Path, text_models_dir: Path, pooling: str, normalize: bool
) -> None:
    model_file = _token_vectors_model(tmp_path)
    options = TextOptions(pooling=pooling, normalize=normalize, max_tokens=64)  # type: ignore[arg-type]
    model = OnnxModel("tokens", 1, model_file, RuntimeOptions(warmup_runs=0, text=options))
    model.load()
    tokenizer = str(text_models_dir / "minilm" / "1" / "tokenizer.json")
    runner = TextRunner(Runner(model), options, tokenizer)
    sequences = runner.sequences(["hello", "hello world again"], truncate=True)
    vectors = runner.embed(sequences).vectors
    for seq, vector in zip(sequences, vectors, strict=True):
        expected = np.array([seq[0], 1.0]) if pooling == "cls" else np.array([np.mean(seq), 1.0])
        if normalize:
            expected = expected / np.linalg.norm(expected)
        np.testing.assert_allclose(vector, expected, rtol=1e-6)


def test_a_text_model_folder_needs_its_tokenizer(tmp_path: Path, text_models_dir: Path) -> None:
    import shutil

    shutil.copytree(text_models_dir / "minilm", tmp_path / "minilm")
    (tmp_path / "minilm" / "1" / "tokenizer.json").unlink()
    with pytest.raises(RepositoryError, match=r"needs its tokenizer\.json"):
        Repository.scan(tmp_path, RuntimeOptions())


def test_the_repository_serves_text_models(text_repository: Repository) -> None:
    assert text_repository.text_names == ["minilm"]
    assert isinstance(text_repository.text(), TextRunner)
    from app.models.errors import ModelNotFound

    with pytest.raises(ModelNotFound, match="not a text model"):
        text_repository.text("tabular")
