"""Simple JSON bodies (rows, columns, one keyed row) as pure functions of bytes and signatures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from app.models.errors import InvalidInput, PayloadTooLarge
from app.models.onnx import ModelState
from app.models.signature import Signature, TensorSpec
from app.protocols import schema, v1

ONE = Signature(
    "plain",
    "1",
    (TensorSpec("features", "FP32", (-1, 3)),),
    (TensorSpec("result", "FP32", (-1, 1)),),
)
TWO = Signature(
    "two",
    "2",
    (TensorSpec("a", "INT64", (-1, 2)), TensorSpec("b", "INT64", (-1, 2))),
    (TensorSpec("sum", "INT64", (-1, 2)), TensorSpec("label", "BYTES", (-1,))),
)
TEXT = Signature("text", "1", (TensorSpec("text", "BYTES", (-1, 1)),), ())


def parse(
    doc: object, signature: Signature = ONE, max_rows: int = 4
) -> tuple[v1.BodyForm, dict[str, np.ndarray]]:
    return v1.parse_predict(json.dumps(doc).encode(), signature, max_rows)


def test_the_three_forms() -> None:
    form, inputs = parse({"instances": [[1, 2, 3], [4, 5, 6]]})
    assert form is v1.BodyForm.ROWS and inputs["features"].shape == (2, 3)
    form, inputs = parse({"inputs": [[1, 2, 3]], "signature_name": "serving_default"})
    assert form is v1.BodyForm.COLUMNS and inputs["features"].dtype == np.float32
    form, inputs = parse({"features": [1, 2, 3]})
    assert form is v1.BodyForm.ONE_ROW and inputs["features"].tolist() == [[1.0, 2.0, 3.0]]
    form, inputs = parse({"instances": [{"a": [1, 2], "b": [3, 4]}]}, TWO)
    assert sorted(inputs) == ["a", "b"]
    form, inputs = parse({"text": "great"}, TEXT)  # the fixed trailing 1 may be left out
    assert inputs["text"].shape == (1, 1)


@pytest.mark.parametrize(
    ("doc", "signature", "error", "fragment"),
    [
        ({"instances": []}, ONE, InvalidInput, "length >= 1"),
        ({"instances": [[1, 2, 3]] * 5}, ONE, PayloadTooLarge, "5 instances; the limit is 4"),
        ({"inputs": [[1, 2, 3]] * 5}, ONE, PayloadTooLarge, "5 rows; the limit is 4"),
        ({"instances": [[1, 2, 3]]}, TWO, InvalidInput, "must be an object with keys"),
        ({"instances": [{"a": [1, 2]}]}, TWO, InvalidInput, "exactly the keys ['a', 'b']"),
        ({"inputs": {"a": [[1, 2]]}}, TWO, InvalidInput, "exactly the keys ['a', 'b']"),
        ({"feature": [1, 2, 3]}, ONE, InvalidInput, "got the keys ['feature']"),
        ({"instances": [[1, [2], 3]]}, ONE, InvalidInput, "ragged"),
        ({"instances": [["a", "b", "c"]]}, ONE, InvalidInput, "must be numbers"),
        ([1, 2, 3], ONE, InvalidInput, "Expected `object`, got `array`"),
    ],
)
def test_bodies_that_do_not_fit(
    doc: object, signature: Signature, error: type[Exception], fragment: str
) -> None:
    with pytest.raises(error) as info:
        parse(doc, signature)
    assert fragment in str(info.value)


def test_answers_use_the_form_of_the_request() -> None:
    one = {"result": np.array([[1.5]], np.float32)}
    assert v1.encode_predict(ONE, v1.BodyForm.ONE_ROW, one) == {"result": 1.5}
    rows = v1.encode_predict(ONE, v1.BodyForm.ROWS, one)
    assert json.loads(schema.encode(rows)) == {
        "predictions": [[1.5]],
        "model_name": "plain",
        "model_version": "1",
    }
    two = {"sum": np.array([[1, 2], [3, 4]]), "label": np.array(["x", "y"], dtype=object)}
    rows = v1.encode_predict(TWO, v1.BodyForm.ROWS, two)
    assert rows.predictions == [{"sum": [1, 2], "label": "x"}, {"sum": [3, 4], "label": "y"}]
    columns = v1.encode_predict(TWO, v1.BodyForm.COLUMNS, two)
    assert columns.outputs == {"sum": [[1, 2], [3, 4]], "label": ["x", "y"]}
    single = v1.encode_predict(ONE, v1.BodyForm.COLUMNS, one)
    assert single.outputs == [[1.5]]


def test_model_status_speaks_tensorflow_servings_states() -> None:
    status = v1.model_status("m", 2, [("1", ModelState.READY), ("2", ModelState.LOADING)])
    assert status.default_version == "2"
    assert [(s.version, s.state) for s in status.model_version_status] == [
        ("1", "AVAILABLE"),
        ("2", "LOADING"),
    ]
