"""Simple JSON in the TensorFlow Serving / KServe V1 style, in three body forms.

- Rows: ``{"instances": [row, ...]}`` answers ``{"predictions": [...]}``. A row is the
  input's value for single-input models, or an object keyed by input name.
- Columns: ``{"inputs": tensor}`` (one input) or ``{"inputs": {name: tensor, ...}}``, each
  tensor with its batch dimension, answers ``{"outputs": tensor}`` (one output) or
  ``{"outputs": {name: tensor, ...}}``.
- One row keyed by the input names, as plain ``/predict`` services take it:
  ``{"features": [1.0, 2.0]}`` answers ``{"result": 1.7}``, keyed by the output names and
  without the batch dimension.

``instances`` and ``inputs`` are read as the first two forms even for a model with an input
of that name. When a model's last input dimension is a fixed 1 (text models taking
``[N, 1]`` strings), a row may leave it out: ``{"instances": ["great film", "dull"]}``; in the
one-row form a fixed last output dimension of 1 is left out too (``1.7``, not ``[1.7]``).
"""

from __future__ import annotations

import enum
from typing import Any

import numpy as np

from app.models.errors import InvalidInput, PayloadTooLarge
from app.models.onnx import OnnxModel
from app.models.signature import TensorSpec
from app.protocols.tensors import coerce


class BodyForm(enum.Enum):
    """Which of the three body forms a request used; the answer uses the same one."""

    ROWS = "instances"
    COLUMNS = "inputs"
    ONE_ROW = "row"


def parse_predict(
    doc: Any, model: OnnxModel, max_rows: int
) -> tuple[BodyForm, dict[str, np.ndarray]]:
    """Turn a predict body of any of the three forms into arrays by input name.

    Raises:
        InvalidInput: a body of none of the forms, or values that do not fit the model.
        PayloadTooLarge: more rows than ``max_rows``.
    """
    if isinstance(doc, dict):
        if "instances" in doc:
            return BodyForm.ROWS, parse_instances(doc, model, max_rows)
        if "inputs" in doc:
            return BodyForm.COLUMNS, _parse_columns(doc, model, max_rows)
        names = {s.name for s in model.inputs}
        if doc and doc.keys() == names:
            return BodyForm.ONE_ROW, {s.name: _column(s, [doc[s.name]]) for s in model.inputs}
        if doc.keys() - {"signature_name"}:
            raise InvalidInput(
                f'unknown keys {sorted(doc)}: send {{"instances": [...]}}, '
                f'{{"inputs": ...}}, or one row keyed by the input names {sorted(names)}'
            )
    raise InvalidInput(
        'request body must be a JSON object: {"instances": [...]}, {"inputs": ...}, or one '
        "row keyed by the model's input names"
    )


def _parse_columns(doc: dict[str, Any], model: OnnxModel, max_rows: int) -> dict[str, np.ndarray]:
    columns = doc["inputs"]
    names = {s.name for s in model.inputs}
    if len(model.inputs) == 1 and not (isinstance(columns, dict) and columns.keys() == names):
        columns = {model.inputs[0].name: columns}
    if not isinstance(columns, dict) or columns.keys() != names:
        raise InvalidInput(
            f"'inputs' must be an object with exactly the keys {sorted(names)}"
            + (" (or, for one input, its tensor)" if len(names) == 1 else "")
        )
    arrays = {s.name: _column(s, columns[s.name]) for s in model.inputs}
    for name, array in arrays.items():
        if array.ndim and array.shape[0] > max_rows:
            raise PayloadTooLarge(
                f"input {name!r} has {array.shape[0]} rows; the limit is {max_rows}"
            )
    return arrays


def parse_instances(doc: Any, model: OnnxModel, max_rows: int) -> dict[str, np.ndarray]:
    """Turn ``{"instances": [...]}`` into arrays by input name.

    Raises:
        InvalidInput: malformed body or rows that do not fit the model.
        PayloadTooLarge: more rows than ``max_rows``.
    """
    if not isinstance(doc, dict):
        raise InvalidInput("request body must be a JSON object with an 'instances' list")
    instances = doc.get("instances")
    if not isinstance(instances, list):
        raise InvalidInput("'instances' must be a list of rows")
    if not instances:
        raise InvalidInput("'instances' is empty: send at least one row")
    if len(instances) > max_rows:
        raise PayloadTooLarge(f"{len(instances)} instances; the limit is {max_rows}")
    if len(model.inputs) == 1:
        spec = model.inputs[0]
        return {spec.name: _column(spec, instances)}
    names = {s.name for s in model.inputs}
    for row in instances:
        if not isinstance(row, dict):
            raise InvalidInput(
                f"model {model.name!r} has several inputs: each instance must be "
                f"an object with keys {sorted(names)}"
            )
        if row.keys() != names:
            raise InvalidInput(
                f"each instance needs exactly the keys {sorted(names)}, got {sorted(row)}"
            )
    return {s.name: _column(s, [row[s.name] for row in instances]) for s in model.inputs}


def _column(spec: TensorSpec, rows: Any) -> np.ndarray:
    try:
        raw = np.array(rows, dtype=object if spec.datatype == "BYTES" else None)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise InvalidInput(
            f"input {spec.name!r}: instances are ragged or too deeply nested"
        ) from None
    array = coerce(spec.name, raw, spec.datatype, rows)
    if array.ndim == len(spec.shape) - 1 and spec.shape and spec.shape[-1] == 1:
        array = array[..., np.newaxis]
    return array


def encode_predict(
    model: OnnxModel, form: BodyForm, results: dict[str, np.ndarray]
) -> dict[str, Any]:
    """The answer in the form the request used (see the module's description)."""
    if form is BodyForm.ROWS:
        return encode_predictions(model, results)
    if form is BodyForm.ONE_ROW:
        specs = {s.name: s for s in model.outputs}
        return {name: _plain(_unbatch(a, specs[name])) for name, a in results.items()}
    columns = {name: _plain(a) for name, a in results.items()}
    return {
        "outputs": next(iter(columns.values())) if len(columns) == 1 else columns,
        "model_name": model.name,
        "model_version": model.version_str,
    }


def _unbatch(array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """The one row of a batch of one, without a fixed last dimension of 1."""
    if not spec.batched or not array.ndim:
        return array
    row = np.asarray(array[0])
    if row.ndim and spec.shape[-1] == 1 and row.shape[-1] == 1:
        row = row[..., 0]
    return row


def encode_predictions(model: OnnxModel, results: dict[str, np.ndarray]) -> dict[str, Any]:
    """``predictions`` as one entry per row; rows are objects when there are several outputs.

    Outputs whose first dimension is not the batch come back column-wise under their names.
    """
    arrays = list(results.values())
    rows = arrays[0].shape[0] if arrays and arrays[0].ndim else None
    predictions: Any
    if len(arrays) == 1:
        predictions = _plain(arrays[0])
    elif rows is not None and all(a.ndim and a.shape[0] == rows for a in arrays):
        columns = {name: _plain(a) for name, a in results.items()}
        predictions = [{name: col[i] for name, col in columns.items()} for i in range(rows)]
    else:
        predictions = {name: _plain(a) for name, a in results.items()}
    return {
        "predictions": predictions,
        "model_name": model.name,
        "model_version": model.version_str,
    }


def _plain(array: np.ndarray) -> Any:
    # tolist() gives Python scalars (str for BYTES), which every JSON encoder accepts.
    return array.tolist()
