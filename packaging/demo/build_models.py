"""Build the bundled demo model repository from scratch.

Run with the dev dependencies installed (scikit-learn, skl2onnx)::

    .venv/bin/python packaging/demo/build_models.py app/demo_models

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
"""

from __future__ import annotations

import csv
import itertools
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType, StringTensorType
from sklearn.datasets import load_breast_cancer, load_diabetes
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


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else Path("app/demo_models")
    build_tabular(out)
    build_regression(out)
    build_sentiment(out)
    build_mlp(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
