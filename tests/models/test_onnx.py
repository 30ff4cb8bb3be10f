"""One model version: signature, validation, prediction and warm-up on real sessions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.models.errors import InvalidInput, PayloadTooLarge, RepositoryError
from app.models.onnx import ModelState, OnnxModel, RuntimeOptions
from tests import onnx_factory
from tests.conftest import DEMO_MODELS


def load(path: Path, **options: int) -> OnnxModel:
    model = OnnxModel("m", 1, path, RuntimeOptions(**options))
    model.load()
    return model


def test_signature_from_the_model() -> None:
    model = load(DEMO_MODELS / "mlp" / "1" / "model.onnx")
    assert [(s.name, s.datatype, s.shape) for s in model.inputs] == [("input", "FP32", (-1, 256))]
    assert [(s.name, s.datatype, s.shape) for s in model.outputs] == [("logits", "FP32", (-1, 10))]
    assert model.state is ModelState.READY


def test_validation_and_batch_limit() -> None:
    model = load(DEMO_MODELS / "regression" / "1" / "model.onnx", max_batch_rows=4)
    ok = np.zeros((4, 10), dtype=np.float32)
    model.validate({"input": ok})
    assert model.run(["variable"], {"input": ok})[0].shape == (4, 1)
    with pytest.raises(PayloadTooLarge):
        model.validate({"input": np.zeros((5, 10), dtype=np.float32)})
    with pytest.raises(InvalidInput, match="FP32"):
        model.validate({"input": ok.astype(np.float64)})
    with pytest.raises(InvalidInput, match="missing"):
        model.validate({})
    with pytest.raises(InvalidInput, match="no input 'x'"):
        model.validate({"input": ok, "x": ok})


def test_signature_carries_what_model_toml_says() -> None:
    model = OnnxModel(
        "m",
        2,
        DEMO_MODELS / "regression" / "1" / "model.onnx",
        RuntimeOptions(warmup_runs=0),
        labels=["a", "b"],
        description="about",
    )
    model.load()
    assert model.signature.name == "m"
    assert model.signature.version == "2"
    assert model.signature.labels == ("a", "b")
    assert model.signature.description == "about"
    assert [s.name for s in model.signature.inputs] == ["input"]


def test_warmup_failure_refuses_the_model(tmp_path: Path) -> None:
    # Reshape to [3] fails for any batch-1 input of 2 x 2 elements.
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    shape = numpy_helper.from_array(np.array([3], dtype=np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
        initializer=[shape],
    )
    model_proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model_proto.ir_version = 8
    path = onnx_factory.save(model_proto, tmp_path, "bad")
    onnx.checker.check_model(model_proto)
    model = OnnxModel("bad", 1, path, RuntimeOptions(warmup_runs=1))
    with pytest.raises(RepositoryError, match="warm-up inference failed"):
        model.load()
    assert not model.ready
    load(path, warmup_runs=0)  # opting out of warm-up lets it load


#: Loads a model in a fresh interpreter and prints how much anonymous (private, unshareable)
#: memory the session took, and its answer to a fixed input.
_MEMORY_PROBE = """
import json, sys
from pathlib import Path
import numpy as np
import onnxruntime
from app.models.onnx import OnnxModel, RuntimeOptions

def anonymous():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) * 1024

before = anonymous()
model = OnnxModel("m", 1, Path(sys.argv[1]), RuntimeOptions(share_weights=sys.argv[2] == "1"))
model.load()
x = np.linspace(-1, 1, 2 * 2048, dtype=np.float32).reshape(2, 2048)
(y,) = model.run(["y"], {"x": x})
print(json.dumps({"grew": anonymous() - before, "y": y.tolist()}))
"""


def test_shared_weights_stay_in_the_mapped_file(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(3).standard_normal((2048, 2048)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2048])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2048])],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx.data")

    def probe(share: bool) -> dict[str, object]:
        done = subprocess.run(
            [sys.executable, "-c", _MEMORY_PROBE, str(path), "1" if share else "0"],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        result: dict[str, object] = json.loads(done.stdout)
        return result

    shared, packed = probe(True), probe(False)
    size = weight.nbytes  # 16 MiB
    # Repacked, the weight is a private copy in every process; shared, it stays in the
    # file's page-cache pages (what onnxruntime and the arena add besides is < 1/4 of it).
    assert isinstance(packed["grew"], int) and packed["grew"] > 0.75 * size
    assert isinstance(shared["grew"], int) and shared["grew"] < 0.25 * size
    # Both are float32 sums of 2048 products in some order: each is within n·eps·(|x|·|w|) of
    # the exact value (the standard summation bound), so they differ by at most twice that.
    x = np.linspace(-1, 1, 2 * 2048, dtype=np.float32).reshape(2, 2048).astype(np.float64)
    bound = 2 * 2048 * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(weight.astype(np.float64)))
    assert np.all(np.abs(np.array(shared["y"]) - np.array(packed["y"])) <= bound)
