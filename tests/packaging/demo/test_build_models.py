"""The bundled demo models are reproducible from the script and behave as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from PIL import Image

from tests.conftest import DEMO_MODELS, ROOT

MODELS = ("tabular/1", "tabular/2", "regression/1", "sentiment/1", "mlp/1", "digits/1")
SAMPLES = ROOT / "packaging" / "demo" / "digits"
# One float32 step at the larger of two values is at most 2**-23 of it; 2**-22 covers the
# step measured from the smaller one.
FLOAT32_STEP = 2.0**-22
# The fits solve strictly convex problems to float64 precision, so two CPUs' solutions differ
# by about cond * 2**-52 of the parameter vector's size (cond < 1e3 for these data).
FLOAT64_SOLVE = 1e-12


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo repository built again by its script on this machine."""
    out = tmp_path_factory.mktemp("rebuilt")
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "packaging" / "demo" / "build_models.py"),
            str(out),
            str(out / "samples"),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(path)).run(None, feeds)  # type: ignore[no-any-return]


def _split(path: Path) -> tuple[onnx.ModelProto, list[tuple[str, np.ndarray]]]:
    """The model with its float parameters taken out, and those parameters by name."""
    model = onnx.load(str(path))
    floats: list[tuple[str, np.ndarray]] = []
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.FLOATS:
                floats.append((f"{node.op_type}.{attribute.name}", np.array(attribute.floats)))
                del attribute.floats[:]
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor)
        if array.dtype.kind == "f":
            floats.append((tensor.name, array.astype(np.float64)))
            tensor.ClearField("raw_data")
            tensor.ClearField("float_data")
    return model, floats


def test_rebuilt_models_have_the_bundled_graphs_and_parameters(rebuilt: Path) -> None:
    """The build script reproduces the bundled files on this CPU, whatever its BLAS kernels.

    Graphs (operators, attributes, integer and string data) must be identical. ONNX stores
    the fitted parameters as float32, rounded from a float64 optimum that another CPU finds
    to within ``FLOAT64_SOLVE`` of the parameters' size; such a difference can only move a
    value across a rounding boundary, one float32 step. Before the fits were made exact,
    other BLAS kernels moved the ridge coefficients by 5e-4 relative.
    """
    for name in MODELS:
        bundled, bundled_floats = _split(DEMO_MODELS / name / "model.onnx")
        again, again_floats = _split(rebuilt / name / "model.onnx")
        assert again == bundled, f"{name}: the graph differs"
        for (label, want), (_, got) in zip(bundled_floats, again_floats, strict=True):
            np.testing.assert_allclose(
                got,
                want,
                rtol=FLOAT32_STEP,
                atol=FLOAT64_SOLVE * float(np.abs(want).max(initial=0.0)),
                err_msg=f"{name}: {label}",
            )
    for name in ("tabular", "digits"):
        config = (rebuilt / name / "model.toml").read_text()
        assert config == (DEMO_MODELS / name / "model.toml").read_text()


def test_rebuilt_models_predict_like_the_bundled_ones(rebuilt: Path) -> None:
    """Same labels, and scores within what one float32 step per parameter can move them.

    The worst case is the ridge model: its output sums ten products that cancel (their
    absolute sum is up to 9x the output for these inputs), so one step in each of three
    parameters per term plus float32 rounding of the sum moves it by at most about
    (3 * 2**-22 + 12 * 2**-24) * 9 = 1.3e-5 of its value. A logistic output moves by at
    most a quarter of its logit's change. 1e-4 keeps a margin above both.
    """
    rng = np.random.default_rng(0)
    feeds: dict[str, dict[str, Any]] = {
        "tabular/1": {"input": rng.normal(10, 5, (8, 30)).astype(np.float32)},
        "tabular/2": {"input": rng.normal(10, 5, (8, 30)).astype(np.float32)},
        "regression/1": {"input": rng.normal(0, 0.05, (8, 10)).astype(np.float32)},
        "sentiment/1": {"text": np.array([["great product"], ["rude staff"]], dtype=object)},
        "mlp/1": {"input": rng.normal(0, 1, (4, 256)).astype(np.float32)},
        "digits/1": {"image": rng.integers(0, 256, (3, 40, 30, 3), dtype=np.uint8)},
    }
    for model, feed in feeds.items():
        bundled = _run(DEMO_MODELS / model / "model.onnx", feed)
        again = _run(rebuilt / model / "model.onnx", feed)
        for a, b in zip(bundled, again, strict=True):
            if a.dtype.kind in "OiU":
                assert a.tolist() == b.tolist(), model
            else:
                np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=model)


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


def _picture(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_digit_samples_are_the_data_sets_pictures_and_classified_right(rebuilt: Path) -> None:
    """The bundled samples are what the script draws, and the model reads each correctly."""
    model = DEMO_MODELS / "digits" / "1" / "model.onnx"
    for digit in range(10):
        bundled = _picture(SAMPLES / f"{digit}.png")
        assert np.array_equal(bundled, _picture(rebuilt / "samples" / f"{digit}.png"))
        (label,), _ = _run(model, {"image": bundled[None]})
        assert label == digit


def test_digits_graph_reads_pictures_as_the_data_set_features() -> None:
    """Over the whole data set drawn as pictures, the graph's preprocessing gives back the
    8x8 features it was trained on, whatever the picture's size or polarity: inverted and
    enlarged pictures read as the originals wherever the original is not near a tie. (An
    inverted picture's grey levels differ from 255 minus the original's by float32 rounding
    of the luma weights, and another CPU's resize kernels round their own way: either can
    tip a label whose two best scores are within a hair, so those are not compared.)"""
    sys.path.insert(0, str(ROOT / "packaging" / "demo"))
    import build_models

    pictures, labels = build_models.digits_pictures()
    session = ort.InferenceSession(str(DEMO_MODELS / "digits" / "1" / "model.onnx"))
    predicted, scores = session.run(None, {"image": pictures})
    assert (predicted == labels).mean() > 0.95  # training and held-out pictures together
    best_two = np.sort(scores, axis=1)[:, -2:]
    clear = best_two[:, 1] - best_two[:, 0] > 0.01
    # Light ink on dark paper, and a picture four times larger, read the same.
    inverted, _ = session.run(None, {"image": 255 - pictures[:200]})
    assert clear[:200].sum() >= 190
    assert inverted[clear[:200]].tolist() == predicted[:200][clear[:200]].tolist()
    large = np.stack([np.kron(p, np.ones((4, 4, 1), np.uint8)) for p in pictures[:50]])
    enlarged, _ = session.run(None, {"image": large})
    assert clear[:50].sum() >= 45
    assert enlarged[clear[:50]].tolist() == predicted[:50][clear[:50]].tolist()
