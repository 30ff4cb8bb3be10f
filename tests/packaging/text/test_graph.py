"""The text builders' shared helpers: models saved with their weights beside the graph."""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "packaging" / "text"))
import graph


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def matmul_model(weight: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    g = graph.Graph()
    w, b = g.const("w", weight), g.const("b", bias)
    out = g.op("Add", [g.op("MatMul", ["x", w]), b])
    g.nodes.append(helper.make_node("Identity", [out], ["y"]))
    model = helper.make_model(
        helper.make_graph(
            g.nodes,
            "m",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, weight.shape[0]])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, weight.shape[1]])],
            g.initializers,
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    return model


def test_weights_go_beside_the_graph_and_compute_the_same(tmp_path: Path, umask_022: None) -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 256)).astype(np.float32)  # 64 KiB: external
    bias = rng.standard_normal(256).astype(np.float32)  # 1 KiB: external too
    small = matmul_model(weight[:, :8], bias[:8])  # 2 KiB and 32 B
    target = tmp_path / "1" / "model.onnx"
    target.parent.mkdir()
    data = graph.save(matmul_model(weight, bias), target)

    assert data == tmp_path / "1" / "model.onnx.data"
    assert data.stat().st_size >= weight.nbytes + bias.nbytes
    assert target.stat().st_size < 4096
    # Readable by the service as model.onnx is, though onnx creates it private.
    assert stat.S_IMODE(data.stat().st_mode) == stat.S_IMODE(target.stat().st_mode) == 0o644
    x = rng.standard_normal((3, 64)).astype(np.float32)
    (y,) = ort.InferenceSession(str(target)).run(None, {"x": x})
    # float32: 64 products summed and a bias added, each step within eps of exact.
    exact = x.astype(np.float64) @ weight.astype(np.float64) + bias
    bound = 65 * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(weight) + np.abs(bias))
    assert np.all(np.abs(y - exact) <= bound)

    # Below the threshold a tensor stays in the graph.
    small_target = tmp_path / "small" / "model.onnx"
    small_target.parent.mkdir()
    graph.save(small, small_target)
    inline = [
        t.name
        for t in onnx.load(str(small_target), load_external_data=False).graph.initializer
        if t.data_location != TensorProto.EXTERNAL
    ]
    assert len(inline) == 1 and inline[0].startswith("b_")


def test_saving_again_replaces_the_weights_instead_of_appending(tmp_path: Path) -> None:
    weight = np.ones((32, 32), np.float32)
    target = tmp_path / "model.onnx"
    size = graph.save(matmul_model(weight, np.zeros(32, np.float32)), target).stat().st_size
    again = graph.save(matmul_model(weight * 2, np.zeros(32, np.float32)), target)
    assert again.stat().st_size == size
    (y,) = ort.InferenceSession(str(target)).run(None, {"x": np.ones((1, 32), np.float32)})
    assert np.all(y == 64)
