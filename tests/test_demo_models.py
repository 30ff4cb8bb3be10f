"""The bundled demo models are reproducible from the script and behave as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tests.conftest import DEMO_MODELS, ROOT


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(path)).run(None, feeds)  # type: ignore[no-any-return]


def test_rebuilt_models_predict_like_the_bundled_ones(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "packaging" / "demo" / "build_models.py"), str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    rng = np.random.default_rng(0)
    feeds = {
        "tabular/1": {"input": rng.normal(10, 5, (8, 30)).astype(np.float32)},
        "tabular/2": {"input": rng.normal(10, 5, (8, 30)).astype(np.float32)},
        "regression/1": {"input": rng.normal(0, 0.05, (8, 10)).astype(np.float32)},
        "sentiment/1": {"text": np.array([["great product"], ["rude staff"]], dtype=object)},
        "mlp/1": {"input": rng.normal(0, 1, (4, 256)).astype(np.float32)},
    }
    for model, feed in feeds.items():
        bundled = _run(DEMO_MODELS / model / "model.onnx", feed)
        rebuilt = _run(tmp_path / model / "model.onnx", feed)
        for a, b in zip(bundled, rebuilt, strict=True):
            if a.dtype == object:
                assert a.tolist() == b.tolist(), model
            else:
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=model)
    assert (tmp_path / "tabular" / "model.toml").read_text() == (
        DEMO_MODELS / "tabular" / "model.toml"
    ).read_text()


def test_sentiment_model_separates_held_out_sentences() -> None:
    texts = [
        "the staff were friendly and the room was lovely",
        "terrible service, the food was cold",
    ]
    label, _ = _run(
        DEMO_MODELS / "sentiment" / "1" / "model.onnx",
        {"text": np.array(texts, dtype=object).reshape(-1, 1)},
    )
    assert label.tolist() == ["positive", "negative"]
