"""Small real ONNX models built with onnx.helper for tests: every datatype, fixed dims, etc."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# OIP datatype -> ONNX element type, for the identity model.
ELEM_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def save(model: onnx.ModelProto, root: Path, name: str, version: int = 1) -> Path:
    """Write ``model`` as ``root/name/version/model.onnx`` and return the file."""
    target = root / name / str(version) / "model.onnx"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(model.SerializeToString())
    return target


def identity_all_types() -> onnx.ModelProto:
    """One input ``x_<type>`` of shape [-1, 2] per datatype, echoed as ``y_<type>``."""
    nodes, inputs, outputs = [], [], []
    for dt, elem in ELEM_TYPES.items():
        name = dt.lower()
        inputs.append(helper.make_tensor_value_info(f"x_{name}", elem, ["batch", 2]))
        outputs.append(helper.make_tensor_value_info(f"y_{name}", elem, ["batch", 2]))
        nodes.append(helper.make_node("Identity", [f"x_{name}"], [f"y_{name}"]))
    return _model(helper.make_graph(nodes, "all_types", inputs, outputs))


def fixed_shape() -> onnx.ModelProto:
    """float [2, 3] (no dynamic dims) -> doubled."""
    two = numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")
    return _model(
        helper.make_graph(
            [helper.make_node("Mul", ["x", "two"], ["y"])],
            "fixed",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
            initializer=[two],
        )
    )


def features_to_result() -> onnx.ModelProto:
    """A plain /predict service's model: float ``features`` [-1, 3] -> ``result`` [-1, 1],
    the features weighted by 0.5, 0.25 and 0.125 (sums exact in float32)."""
    weights = numpy_helper.from_array(np.array([[0.5], [0.25], [0.125]], dtype=np.float32), "w")
    return _model(
        helper.make_graph(
            [helper.make_node("MatMul", ["features", "w"], ["result"])],
            "features_to_result",
            [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 3])],
            [helper.make_tensor_value_info("result", TensorProto.FLOAT, ["batch", 1])],
            initializer=[weights],
        )
    )


def two_inputs() -> onnx.ModelProto:
    """a: float [-1, 3], b: float [-1, 3] -> sum: a + b, diff: a - b."""
    return _model(
        helper.make_graph(
            [
                helper.make_node("Add", ["a", "b"], ["sum"]),
                helper.make_node("Sub", ["a", "b"], ["diff"]),
            ],
            "two_inputs",
            [
                helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 3]),
                helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 3]),
            ],
            [
                helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["n", 3]),
                helper.make_tensor_value_info("diff", TensorProto.FLOAT, ["n", 3]),
            ],
        )
    )


def with_external_data(location: str) -> onnx.ModelProto:
    """float [-1, 4] + bias, where the bias tensor claims to live in ``location``."""
    bias = numpy_helper.from_array(np.arange(4, dtype=np.float32), "bias")
    bias.data_location = TensorProto.EXTERNAL
    bias.ClearField("raw_data")
    entry = bias.external_data.add()
    entry.key, entry.value = "location", location
    length = bias.external_data.add()
    length.key, length.value = "length", "16"
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "bias"], ["y"])],
        "external",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        initializer=[bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def zipmap_classifier() -> onnx.ModelProto:
    """A model whose output is a sequence of maps, which the server must refuse."""
    graph = helper.make_graph(
        [helper.make_node("ZipMap", ["x"], ["y"], domain="ai.onnx.ml", classlabels_int64s=[0, 1])],
        "zipmap",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor_sequence_value_info("y", TensorProto.FLOAT, None)],
    )
    graph.output[0].type.CopyFrom(
        helper.make_sequence_type_proto(
            helper.make_map_type_proto(
                TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])
            )
        )
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)]
    )
    model.ir_version = 8
    return model


def slow_loop(size: int = 256) -> onnx.ModelProto:
    """x: float [1, 1], n: int64 scalar -> y: float scalar, after n chained MatMul+Tanh steps.

    A real graph whose run time the caller chooses: about 0.15 ms per step at size 256 on one
    thread, and onnxruntime can cancel it between steps (RunOptions.terminate).
    """
    weight = _random_weight(0, size)
    shape = numpy_helper.from_array(np.array([size, size], dtype=np.int64), "shape")
    cond = numpy_helper.from_array(np.array(True), "cond")
    body = _matmul_tanh_step(size, size)
    graph = helper.make_graph(
        [
            helper.make_node("Expand", ["x", "shape"], ["h0"]),
            helper.make_node("Loop", ["n", "cond", "h0"], ["h"], body=body),
            helper.make_node("ReduceMean", ["h"], ["y"], keepdims=0),
        ],
        "slow",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1]),
            helper.make_tensor_value_info("n", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
        initializer=[weight, shape, cond],
    )
    return _model(graph)


class Recorder:
    """An inference observer that remembers what it was told."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, str]] = []
        self.batches: list[tuple[str, int, int]] = []
        self.padded: list[int] = []
        self.tokens_seen: list[int] = []
        self.lookups: list[bool] = []

    def cache_lookup(self, model: str, version: str, hit: bool) -> None:
        self.lookups.append(hit)

    def inference(self, model: str, version: str, seconds: float) -> None:
        self.runs.append((model, version))

    def batch(self, model: str, version: str, rows: int, waits: list[float]) -> None:
        self.batches.append((model, rows, len(waits)))

    def batch_tokens(self, model: str, version: str, padded: int) -> None:
        self.padded.append(padded)

    def tokens(self, model: str, version: str, count: int) -> None:
        self.tokens_seen.append(count)


def gather_table() -> onnx.ModelProto:
    """idx: int64 [-1, 1] -> y: float [-1, 1, 4], rows of a 10-row table.

    An index outside 0..9 passes validation but makes onnxruntime fail at run time: the way
    to poison a merged batch.
    """
    table = numpy_helper.from_array(np.arange(40, dtype=np.float32).reshape(10, 4), "table")
    return _model(
        helper.make_graph(
            [helper.make_node("Gather", ["table", "idx"], ["y"], axis=0)],
            "gather",
            [helper.make_tensor_value_info("idx", TensorProto.INT64, ["n", 1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1, 4])],
            initializer=[table],
        )
    )


def slow_batched(steps: int = 30000, size: int = 256) -> onnx.ModelProto:
    """x: float [-1, size] -> y: float [-1], after ``steps`` MatMul+Tanh steps per batch."""
    weight = _random_weight(1, size)
    trip = numpy_helper.from_array(np.array(steps, dtype=np.int64), "steps")
    cond = numpy_helper.from_array(np.array(True), "cond")
    body = _matmul_tanh_step(size, "n")
    graph = helper.make_graph(
        [
            helper.make_node("Loop", ["steps", "cond", "x"], ["h"], body=body),
            helper.make_node("ReduceMean", ["h"], ["y"], axes=[1], keepdims=0),
        ],
        "slow_batched",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
        initializer=[weight, trip, cond],
    )
    return _model(graph)


def _matmul_tanh_step(size: int, rows: int | str) -> onnx.GraphProto:
    """Loop body: h_out = tanh(h_in @ w), with h of shape [rows, size]."""
    return helper.make_graph(
        [
            helper.make_node("MatMul", ["h_in", "w"], ["mm"]),
            helper.make_node("Tanh", ["mm"], ["h_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "step",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [rows, size]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [rows, size]),
        ],
    )


def _random_weight(seed: int, size: int) -> onnx.TensorProto:
    rng = np.random.default_rng(seed)
    return numpy_helper.from_array(
        (rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32), "w"
    )


def pixels_4x4() -> onnx.ModelProto:
    """An image model taking exactly 4x4 RGB pictures: uint8 ``image`` [-1, 4, 4, 3] ->
    ``scores`` float [-1, 48], the pixels as floats (so tests see what the graph got)."""
    shape = numpy_helper.from_array(np.array([-1, 48], dtype=np.int64), "shape")
    return _model(
        helper.make_graph(
            [
                helper.make_node("Cast", ["image"], ["floats"], to=TensorProto.FLOAT),
                helper.make_node("Reshape", ["floats", "shape"], ["scores"]),
            ],
            "pixels",
            [helper.make_tensor_value_info("image", TensorProto.UINT8, ["n", 4, 4, 3])],
            [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 48])],
            initializer=[shape],
        )
    )


def classifier(swap: bool = False, slow_steps: int = 0, size: int = 256) -> onnx.ModelProto:
    """x: float [-1, 2] -> scores: float [-1, 2] (x @ [[2, -1], [-1, 2]]), label: int64 [-1]
    (the best score's column).

    ``swap`` exchanges the weight columns, so every label whose scores differ flips (a wrong
    candidate). ``slow_steps`` adds that many MatMul+Tanh steps on a [size, size] state whose
    result is multiplied by zero before it joins the scores: the same answers, computed
    slower (about 0.15 ms per step at size 256 on one thread).
    """
    w = np.array([[2.0, -1.0], [-1.0, 2.0]], dtype=np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["raw"])]
    initializers = [numpy_helper.from_array(w[:, ::-1].copy() if swap else w, "w")]
    if slow_steps:
        nodes += [
            helper.make_node("Expand", ["one", "shape"], ["h0"]),
            helper.make_node("Loop", ["steps", "cond", "h0"], ["h"], body=_slow_body(size)),
            helper.make_node("ReduceMean", ["h"], ["mean"], keepdims=0),
            helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
            helper.make_node("Add", ["raw", "nothing"], ["scores"]),
        ]
        initializers += [
            _random_weight(2, size),
            numpy_helper.from_array(np.ones((1, 1), dtype=np.float32), "one"),
            numpy_helper.from_array(np.array([size, size], dtype=np.int64), "shape"),
            numpy_helper.from_array(np.array(slow_steps, dtype=np.int64), "steps"),
            numpy_helper.from_array(np.array(True), "cond"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        ]
        initializers[1].name = "w_slow"
    else:
        nodes.append(helper.make_node("Identity", ["raw"], ["scores"]))
    nodes.append(helper.make_node("ArgMax", ["scores"], ["label"], axis=1, keepdims=0))
    return _model(
        helper.make_graph(
            nodes,
            "classifier",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
            [
                helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 2]),
                helper.make_tensor_value_info("label", TensorProto.INT64, ["n"]),
            ],
            initializer=initializers,
        )
    )


def _slow_body(size: int) -> onnx.GraphProto:
    body = _matmul_tanh_step(size, size)
    for node in body.node:
        node.input[:] = ["w_slow" if name == "w" else name for name in node.input]
    return body
