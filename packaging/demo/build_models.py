"""Build the bundled demo model repository from scratch.

Run with the dev dependencies installed (scikit-learn, skl2onnx)::

    .venv/bin/python packaging/demo/build_models.py app/demo_models [SAMPLES]

Everything is seeded, and every model is fitted in float64 to the optimum of a strictly
convex problem (closed-form ridge, Newton's method for logistic regression) rather than
stopped early by an iterative solver, so another CPU's BLAS kernels change the fitted
parameters only in digits that float32 (what ONNX stores) cannot hold. The models are small
enough to ship in the package, so ``make run`` never needs these tools.

Models written:
    tabular/1, tabular/2   breast-cancer classifier, 30 floats -> label + probabilities
                           (two versions, for canary work)
    regression/1           diabetes progression, 10 floats -> 1 float
    sentiment/1            raw English text -> label + probabilities; TF-IDF is inside the
                           ONNX graph, so there is no training/serving skew
    mlp/1                  compute-heavy MLP, float32 [N,256] -> 1024 -> 1024 -> 10 logits
    digits/1               handwritten digit classifier: RGB pictures of any size, uint8
                           [N,H,W,3] -> label + probabilities; greying, inverting, resizing
                           and pooling to the 8x8 features it was trained on are in the graph

Sample pictures for the digits model (for each digit the first held-out image it reads
right with a score over 0.9, drawn large, dark on light, as a scan would give it) go to SAMPLES,
``packaging/demo/digits/`` by default.
"""

from __future__ import annotations

import csv
import itertools
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType, StringTensorType
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

HERE = Path(__file__).resolve().parent
OPSET = {"": 17, "ai.onnx.ml": 3}
# Newton steps to a gradient this small: the optimum to float64 precision, whatever the BLAS.
# (lbfgs at its default tol=1e-4 stopped 3% away from it, at a point that moved with the CPU.)
_CONVERGED = {"solver": "newton-cholesky", "tol": 1e-10, "max_iter": 100}


def _save(model: onnx.ModelProto, out: Path, name: str, version: int, doc: str) -> None:
    model.doc_string = doc
    model.graph.name = name  # skl2onnx names graphs with a random uuid
    # ... and lists opsets in set order, which changes with Python's string hashing.
    opsets = sorted(model.opset_import, key=lambda o: o.domain)
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    model.producer_name = "onnx-appliance demo"
    target = out / name / str(version) / "model.onnx"
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.checker.check_model(model)
    target.write_bytes(model.SerializeToString())
    print(f"wrote {target} ({target.stat().st_size} bytes)")


def _classifier(pipe: object, n_features: int) -> onnx.ModelProto:
    return convert_sklearn(  # type: ignore[no-any-return]
        pipe,
        initial_types=[("input", FloatTensorType([None, n_features]))],
        options={id(pipe): {"zipmap": False}},
        target_opset=OPSET,
    )


def build_tabular(out: Path) -> None:
    """Two versions of a logistic regression on the breast-cancer data (30 features)."""
    x, y = load_breast_cancer(return_X_y=True)
    for version, c in ((1, 1.0), (2, 0.05)):
        pipe = make_pipeline(StandardScaler(), LogisticRegression(C=c, **_CONVERGED))
        pipe.fit(x, y)
        _save(
            _classifier(pipe, x.shape[1]),
            out,
            "tabular",
            version,
            f"Breast cancer classifier, logistic regression C={c}",
        )
    (out / "tabular" / "model.toml").write_text(
        "# Newest version serves by default; pin with /versions/{v}.\n"
        "default_version = 2\n"
        'labels = ["malignant", "benign"]\n'
    )


def build_regression(out: Path) -> None:
    """Ridge regression on the diabetes data (10 features)."""
    x, y = load_diabetes(return_X_y=True)
    pipe = make_pipeline(StandardScaler(), Ridge(alpha=1.0, solver="cholesky"))
    pipe.fit(x, y)
    model = convert_sklearn(
        pipe, initial_types=[("input", FloatTensorType([None, 10]))], target_opset=OPSET
    )
    _save(model, out, "regression", 1, "Diabetes progression, ridge regression")


def build_sentiment(out: Path) -> None:
    """TF-IDF + logistic regression over raw strings, trained on the corpus beside this file."""
    with (HERE / "sentiment.tsv").open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    texts = [r["text"] for r in rows]
    labels = [r["label"] for r in rows]
    pipe = make_pipeline(
        TfidfVectorizer(lowercase=True, ngram_range=(1, 1)),
        LogisticRegression(C=10.0, **_CONVERGED),
    )
    pipe.fit(texts, labels)
    model = convert_sklearn(
        pipe,
        initial_types=[("text", StringTensorType([None, 1]))],
        options={id(pipe): {"zipmap": False}},
        target_opset=OPSET,
    )
    # onnxruntime's StringNormalizer defaults to en_US.UTF-8, which a minimal Debian lacks;
    # C.UTF-8 is always there.
    for node in model.graph.node:
        if node.op_type == "StringNormalizer":
            node.attribute.append(helper.make_attribute("locale", "C.UTF-8"))
    _save(model, out, "sentiment", 1, "Sentiment of short English reviews (TF-IDF in graph)")


def build_mlp(out: Path) -> None:
    """A seeded random MLP 256 -> 1024 -> 1024 -> 10: weights do not matter, compute does."""
    rng = np.random.default_rng(20261123)
    sizes = [256, 1024, 1024, 10]
    inits, nodes = [], []
    prev = "input"
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        w = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        b = np.zeros(fan_out, dtype=np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        last = i == len(sizes) - 2
        gemm_out = "logits" if last else f"h{i}_pre"
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [gemm_out]))
        if not last:
            nodes.append(helper.make_node("Relu", [gemm_out], [f"h{i}"]))
            prev = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 256])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    _save(model, out, "mlp", 1, "Compute-heavy MLP for throughput work")


# Resize's antialias attribute (a proper downscale of large pictures) needs opset 18.
_IMAGE_OPSET = {"": 19, "ai.onnx.ml": 3}
_DIGITS_SIDE = 32  # the digits data set's bitmaps, pooled 4x4 into its 8x8 features
_DIGITS_HOLDOUT = 297  # the last images, kept out of training to report accuracy


def _digits_preprocessing() -> onnx.ModelProto:
    """uint8 RGB [N,H,W,3] -> the data set's 64 features (0..16 per 4x4 block of ink)."""
    f = TensorProto.FLOAT
    consts = {
        "grey_weights": np.array([[0.299], [0.587], [0.114]], np.float32),
        "half": np.array(127.5, np.float32),
        "white": np.array(255.0, np.float32),
        "side": np.array([_DIGITS_SIDE, _DIGITS_SIDE], np.int64),
        "picture_axes": np.array([1, 2, 3], np.int64),
        "to_counts": np.array(16.0 / 255.0, np.float32),
        "flat": np.array([-1, 64], np.int64),
    }
    inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    n = helper.make_node
    nodes = [
        n("Cast", ["image"], ["rgb"], to=f),
        n("MatMul", ["rgb", "grey_weights"], ["grey_nhw1"]),  # ITU-R 601 luma
        n("Transpose", ["grey_nhw1"], ["grey"], perm=[0, 3, 1, 2]),  # [N,1,H,W]
        # Ink is what differs from the paper: dark on light (the mean is light) is inverted.
        n("ReduceMean", ["grey", "picture_axes"], ["mean"], keepdims=1),
        n("Greater", ["mean", "half"], ["light_paper"]),
        n("Sub", ["white", "grey"], ["inverted"]),
        n("Where", ["light_paper", "inverted", "grey"], ["ink"]),
        # Resize's sizes name every dimension: the batch's own N and 1, then 32 x 32.
        n("Shape", ["ink"], ["batch_and_channel"], end=2),
        n("Concat", ["batch_and_channel", "side"], ["target"], axis=0),
        n("Resize", ["ink", "", "", "target"], ["square"], mode="linear", antialias=1),
        n("AveragePool", ["square"], ["blocks"], kernel_shape=[4, 4], strides=[4, 4]),
        n("Mul", ["blocks", "to_counts"], ["counts"]),
        n("Reshape", ["counts", "flat"], ["features"]),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_preprocessing",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", "H", "W", 3])],
        [helper.make_tensor_value_info("features", f, ["N", 64])],
        initializer=inits,
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid(d, v) for d, v in _IMAGE_OPSET.items()]
    )


def digits_pictures() -> tuple[np.ndarray, np.ndarray]:
    """The data set as pictures: each 8x8 image drawn at 32x32, dark ink on white paper
    (uint8 [N,32,32,3]), and its labels."""
    x, y = load_digits(return_X_y=True)
    ink = np.kron(x.reshape(-1, 8, 8), np.ones((4, 4))) * (255.0 / 16.0)
    grey = np.rint(255.0 - ink).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=3), y


def build_digits(out: Path, samples: Path) -> None:
    """Logistic regression on scikit-learn's handwritten digits, behind in-graph preprocessing."""
    x, y = load_digits(return_X_y=True)
    train = slice(0, len(x) - _DIGITS_HOLDOUT)
    classifier = LogisticRegression(C=0.01, **_CONVERGED)
    classifier.fit(x[train], y[train])
    held_out = classifier.score(x[-_DIGITS_HOLDOUT:], y[-_DIGITS_HOLDOUT:])
    converted = convert_sklearn(
        classifier,
        initial_types=[("features", FloatTensorType([None, 64]))],
        options={id(classifier): {"zipmap": False}},
        target_opset=_IMAGE_OPSET,
    )
    # skl2onnx lists the lowest opsets its nodes need (one of them twice); merging wants the
    # two graphs on the same ones.
    del converted.opset_import[:]
    converted.opset_import.extend(helper.make_opsetid(d, v) for d, v in _IMAGE_OPSET.items())
    converted.graph.name = "digits_classifier"  # not skl2onnx's random uuid
    preprocessing = _digits_preprocessing()
    preprocessing.ir_version = converted.ir_version
    model = onnx.compose.merge_models(preprocessing, converted, io_map=[("features", "features")])
    _save(model, out, "digits", 1, f"Handwritten digits, 0-9 (held-out accuracy {held_out:.3f})")
    (out / "digits" / "model.toml").write_text(
        "# Pictures in: PNG or JPEG uploads (POST /v1/models/digits:classify) or OIP BYTES.\n"
        'description = "A handwritten digit filling the picture, dark on light or light on '
        'dark"\n'
        f"labels = {[str(i) for i in range(10)]!r}\n".replace("'", '"')
        + '\n[image]\ninput = "image"\nscores = "probabilities"\n'
    )
    pictures, labels = digits_pictures()
    samples.mkdir(parents=True, exist_ok=True)
    start = len(x) - _DIGITS_HOLDOUT
    scores = classifier.predict_proba(x[start:])
    read_right = (scores.argmax(axis=1) == y[start:]) & (scores.max(axis=1) > 0.9)
    for digit in range(10):
        # The first held-out picture of the digit that the model reads right and clearly: a
        # demo, not a measure (the accuracy above is that).
        index = start + int(np.flatnonzero((labels[start:] == digit) & read_right)[0])
        Image.fromarray(pictures[index]).save(samples / f"{digit}.png", optimize=False)
    print(f"digits: held-out accuracy {held_out:.3f}; samples in {samples}")


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else Path("app/demo_models")
    samples = Path(argv[2]) if len(argv) > 2 else HERE / "digits"
    build_tabular(out)
    build_regression(out)
    build_sentiment(out)
    build_mlp(out)
    build_digits(out, samples)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
