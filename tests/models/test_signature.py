"""Tensor specs and signatures: shapes, dtypes, and the checks protocols rely on."""

from __future__ import annotations

import numpy as np
import pytest

from app.models.errors import InvalidInput
from app.models.signature import (
    DATATYPE_TO_NUMPY,
    NUMPY_TO_DATATYPE,
    ORT_TO_DATATYPE,
    Signature,
    TensorSpec,
    dims_from_ort,
)

SIGNATURE = Signature(
    "m",
    "2",
    (TensorSpec("a", "FP32", (-1, 3)), TensorSpec("b", "INT64", (2,))),
    (TensorSpec("y", "FP32", (-1,)),),
)


def test_dynamic_dimensions_and_batching() -> None:
    spec = TensorSpec("x", "FP32", (-1, 3))
    assert spec.batched
    assert spec.dtype == np.float32
    assert spec.accepts_shape((7, 3))
    assert not spec.accepts_shape((7, 4))
    assert not spec.accepts_shape((7, 3, 1))
    assert not TensorSpec("x", "FP32", (2, 3)).batched
    assert not TensorSpec("s", "FP32", ()).batched


def test_onnxruntime_shapes_become_ints() -> None:
    assert dims_from_ort(["batch", 3, None, -1]) == (-1, 3, -1, -1)
    assert dims_from_ort(None) == ()


def test_datatype_tables_agree() -> None:
    assert set(ORT_TO_DATATYPE.values()) == set(DATATYPE_TO_NUMPY)
    for datatype, dtype in DATATYPE_TO_NUMPY.items():
        assert NUMPY_TO_DATATYPE[dtype] == datatype


def test_inputs_and_outputs_are_looked_up_by_name() -> None:
    assert SIGNATURE.input_spec("b").shape == (2,)
    with pytest.raises(InvalidInput, match="no input 'c'; inputs are 'a', 'b'"):
        SIGNATURE.input_spec("c")
    SIGNATURE.check_outputs(["y"])
    with pytest.raises(InvalidInput, match="no output\\(s\\) 'z'"):
        SIGNATURE.check_outputs(["y", "z"])
