"""The minimal protobuf walker finds every external-data location the onnx package finds,
and the ones in sparse initializers it does not; and every operator a model uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import _get_all_tensors

from app.models.onnx_proto import ProtoError, external_data_locations, looks_like_model, op_types
from tests import onnx_factory


def _external(name: str, location: str) -> TensorProto:
    tensor = numpy_helper.from_array(np.zeros(4, dtype=np.float32), name)
    tensor.data_location = TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    return tensor


def _reference(model: onnx.ModelProto) -> list[str]:
    found = []
    for tensor in _get_all_tensors(model):
        if tensor.data_location == TensorProto.EXTERNAL:
            found += [e.value for e in tensor.external_data if e.key == "location"]
    return found


def nested_model() -> onnx.ModelProto:
    """External data in an initializer, a Constant attribute inside a Loop body, and a
    sparse initializer."""
    body = helper.make_graph(
        [
            helper.make_node("Constant", [], ["c"], value=_external("in_body", "body.bin")),
            helper.make_node("Add", ["h_in", "c"], ["h_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [4]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [4]),
        ],
    )
    sparse = helper.make_sparse_tensor(
        _external("sparse_values", "../sparse.bin"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "idx"),
        [4],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", "cond", "w"], ["out"], body=body)],
        "g",
        [
            helper.make_tensor_value_info("n", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4])],
        initializer=[_external("w", "weights/w.bin")],
        sparse_initializer=[sparse],
    )
    return helper.make_model(graph)


@pytest.mark.parametrize(
    "model",
    [
        nested_model(),
        onnx_factory.with_external_data("../../x.bin"),
        onnx_factory.slow_loop(),
        onnx_factory.identity_all_types(),
    ],
    ids=["nested", "initializer", "no_external_loop", "no_external"],
)
def test_same_locations_as_the_onnx_package(model: onnx.ModelProto) -> None:
    found = external_data_locations(model.SerializeToString())
    # The onnx package's own walk skips sparse initializers; ours finds those too.
    assert set(_reference(model)) <= set(found)
    assert looks_like_model(model.SerializeToString())


def test_nested_locations_are_all_found() -> None:
    assert sorted(external_data_locations(nested_model().SerializeToString())) == [
        "../sparse.bin",
        "body.bin",
        "weights/w.bin",
    ]


@pytest.mark.parametrize("data", [b"\xff\xff\xff", b"\x0a\x05ab", b"\x0f", b"\x08" + b"\xff" * 11])
def test_garbage_is_refused(data: bytes) -> None:
    with pytest.raises(ProtoError):
        external_data_locations(data)
    assert not looks_like_model(data)


def _reference_ops(graph: onnx.GraphProto) -> set[tuple[str, str]]:
    found = set()
    for node in graph.node:
        found.add((node.domain, node.op_type))
        for attr in node.attribute:
            for body in [attr.g] if attr.HasField("g") else list(attr.graphs):
                found |= _reference_ops(body)
    return found


@pytest.mark.parametrize(
    "model",
    [nested_model(), onnx_factory.slow_loop(), onnx_factory.identity_all_types()],
    ids=["nested", "loop", "flat"],
)
def test_same_operators_as_the_onnx_package(model: onnx.ModelProto) -> None:
    assert op_types(model.SerializeToString()) == _reference_ops(model.graph)


def test_operators_of_nested_graphs_and_functions_are_found() -> None:
    assert ("", "Add") in op_types(nested_model().SerializeToString())  # in the Loop body
    function = helper.make_function(
        "local", "f", ["a"], ["b"], [helper.make_node("Softsign", ["a"], ["b"])], []
    )
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("f", ["x"], ["y"], domain="local")],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        ),
        functions=[function],
    )
    assert op_types(model.SerializeToString()) == {("local", "f"), ("", "Softsign")}


def test_a_quantized_model_shows_its_matmulnbits(generation_models_dir: Path) -> None:
    data = (generation_models_dir / "smollm2" / "1" / "model.onnx").read_bytes()
    assert ("com.microsoft", "MatMulNBits") in op_types(data)
