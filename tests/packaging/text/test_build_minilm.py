"""The MiniLM graph built from the package's weights computes what the checkpoint defines.

Checked against an independent forward pass in numpy (float64) of the same weights, on
sentences of different lengths run as one padded batch, and on meaning: a paraphrase scores
far above an unrelated pair.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "packaging" / "text"))
import build_minilm

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome, I loved every minute of it!",
    "Quantum chromodynamics describes how quarks and gluons interact.",
    "ok",
    " ".join(["longer sentence"] * 40),
]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_minilm.build(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="module")
def checkpoint() -> build_minilm.Checkpoint:
    return build_minilm.load_checkpoint()


def tokenize(model: Path, texts: list[str]) -> list[list[int]]:
    tokenizer = Tokenizer.from_file(str(model.parent / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(build_minilm.MAX_TOKENS)
    return [e.ids for e in tokenizer.encode_batch(texts)]


def padded(sequences: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(s) for s in sequences)
    ids = np.zeros((len(sequences), width), np.int64)
    mask = np.zeros_like(ids)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = seq
        mask[i, : len(seq)] = 1
    return ids, mask


def reference(checkpoint: build_minilm.Checkpoint, ids: list[int]) -> np.ndarray:
    """BERT as the checkpoint's config describes it, in float64, one unpadded sentence."""
    w = {k: v.astype(np.float64) for k, v in checkpoint.weights.items() if v.dtype.kind == "f"}
    cfg = checkpoint.config
    eps = float(cfg["layer_norm_eps"])  # type: ignore[arg-type]
    heads = int(cfg["num_attention_heads"])  # type: ignore[call-overload]

    def norm(x: np.ndarray, p: str) -> np.ndarray:
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w[f"{p}.weight"] + w[f"{p}.bias"]

    def dense(x: np.ndarray, p: str) -> np.ndarray:
        return x @ w[f"{p}.weight"].T + w[f"{p}.bias"]

    n = len(ids)
    x = (
        w["embeddings.word_embeddings.weight"][ids]
        + w["embeddings.token_type_embeddings.weight"][0]
        + w["embeddings.position_embeddings.weight"][:n]
    )
    x = norm(x, "embeddings.LayerNorm")
    erf = np.vectorize(math.erf)
    for i in range(int(cfg["num_hidden_layers"])):  # type: ignore[call-overload]
        p = f"encoder.layer.{i}"
        q, k, v = (
            dense(x, f"{p}.attention.self.{t}").reshape(n, heads, -1).transpose(1, 0, 2)
            for t in ("query", "key", "value")
        )
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1])
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(1, 0, 2).reshape(n, -1)
        x1 = norm(
            dense(context, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm"
        )
        inner = dense(x1, f"{p}.intermediate.dense")
        gelu = 0.5 * inner * (1 + erf(inner / math.sqrt(2)))
        x = norm(dense(gelu, f"{p}.output.dense") + x1, f"{p}.output.LayerNorm")
    mean = x.mean(0)
    return mean / np.linalg.norm(mean)  # type: ignore[no-any-return]


def test_the_graph_matches_an_independent_forward_pass(
    built: Path, checkpoint: build_minilm.Checkpoint
) -> None:
    sequences = tokenize(built, SENTENCES)
    assert max(len(s) for s in sequences) > 3 * min(len(s) for s in sequences)  # real padding
    session = ort.InferenceSession(str(built))
    ids, mask = padded(sequences)
    batch = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    for i, seq in enumerate(sequences):
        expected = reference(checkpoint, seq)
        alone = session.run(
            None, dict(zip(("input_ids", "attention_mask"), padded([seq]), strict=True))
        )[0][0]
        for got in (batch[i], alone):
            cosine = float(got @ expected / np.linalg.norm(got))
            assert cosine >= 0.99999, (SENTENCES[i][:30], cosine)
            assert abs(float(np.linalg.norm(got)) - 1) < 1e-5


def test_meaning_survives(built: Path) -> None:
    session = ort.InferenceSession(str(built))
    ids, mask = padded(tokenize(built, SENTENCES[:4]))
    emb = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    paraphrase = float(emb[0] @ emb[1])
    unrelated = max(float(emb[0] @ emb[3]), float(emb[2] @ emb[3]))
    assert paraphrase > 0.6
    assert unrelated < 0.2
    assert paraphrase - unrelated > 0.5


def test_the_folder_has_what_the_repository_needs(built: Path) -> None:
    folder = built.parent.parent
    assert (built.parent / "tokenizer.json").is_file()
    assert 'task = "embedding"' in (folder / "model.toml").read_text()
    # The real weights, not a toy, beside the graph (mapped, not copied, by onnxruntime).
    assert (built.parent / "model.onnx.data").stat().st_size > 80_000_000
    assert built.stat().st_size < 100_000
