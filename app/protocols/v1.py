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

Pure functions of bytes, signatures and arrays: no HTTP, no sessions.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any

import numpy as np
from msgspec import UNSET

from app.models.errors import InvalidInput, PayloadTooLarge
from app.models.onnx import ModelState
from app.models.signature import Signature, TensorSpec
from app.protocols import schema
from app.protocols.tensors import coerce

# TensorFlow Serving's names for the states clients poll for.
_TF_STATES: dict[ModelState, schema.TfState] = {
    ModelState.READY: "AVAILABLE",
    ModelState.LOADING: "LOADING",
    ModelState.UNAVAILABLE: "UNAVAILABLE",
}


class BodyForm(enum.Enum):
    """Which of the three body forms a request used; the answer uses the same one."""

    ROWS = "instances"
    COLUMNS = "inputs"
    ONE_ROW = "row"


def parse_predict(
    body: bytes, signature: Signature, max_rows: int
) -> tuple[BodyForm, dict[str, np.ndarray]]:
    """Turn a predict body of any of the three forms into arrays by input name.

    Raises:
        InvalidInput: a body of none of the forms, or values that do not fit the model.
        PayloadTooLarge: more rows than ``max_rows``.
    """
    request = schema.decode(body, schema.PredictRequest)
    if request.instances is not UNSET:
        return BodyForm.ROWS, _rows(request.instances, signature, max_rows)
    if request.inputs is not UNSET:
        return BodyForm.COLUMNS, _columns(request.inputs, signature, max_rows)
    row = schema.decode(body, schema.OneRow)
    row.pop("signature_name", None)
    names = {s.name for s in signature.inputs}
    if not row or row.keys() != names:
        raise InvalidInput(
            f'send {{"instances": [...]}}, {{"inputs": ...}}, or one row keyed by the '
            f"input names {sorted(names)}; got the keys {sorted(row)}"
        )
    return BodyForm.ONE_ROW, {s.name: _column(s, [row[s.name]]) for s in signature.inputs}


def _rows(instances: list[Any], signature: Signature, max_rows: int) -> dict[str, np.ndarray]:
    if len(instances) > max_rows:
        raise PayloadTooLarge(f"{len(instances)} instances; the limit is {max_rows}")
    if len(signature.inputs) == 1:
        spec = signature.inputs[0]
        return {spec.name: _column(spec, instances)}
    names = {s.name for s in signature.inputs}
    for row in instances:
        if not isinstance(row, dict):
            raise InvalidInput(
                f"model {signature.name!r} has several inputs: each instance must be "
                f"an object with keys {sorted(names)}"
            )
        if row.keys() != names:
            raise InvalidInput(
                f"each instance needs exactly the keys {sorted(names)}, got {sorted(row)}"
            )
    return {s.name: _column(s, [row[s.name] for row in instances]) for s in signature.inputs}


def _columns(columns: Any, signature: Signature, max_rows: int) -> dict[str, np.ndarray]:
    names = {s.name for s in signature.inputs}
    if len(names) == 1 and not (isinstance(columns, dict) and columns.keys() == names):
        columns = {signature.inputs[0].name: columns}
    if not isinstance(columns, dict) or columns.keys() != names:
        raise InvalidInput(
            f"'inputs' must be an object with exactly the keys {sorted(names)}"
            + (" (or, for one input, its tensor)" if len(names) == 1 else "")
        )
    arrays = {s.name: _column(s, columns[s.name]) for s in signature.inputs}
    for name, array in arrays.items():
        if array.ndim and array.shape[0] > max_rows:
            raise PayloadTooLarge(
                f"input {name!r} has {array.shape[0]} rows; the limit is {max_rows}"
            )
    return arrays


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


def encode_predict(signature: Signature, form: BodyForm, results: dict[str, np.ndarray]) -> Any:
    """The answer in the form the request used (see the module's description)."""
    if form is BodyForm.ROWS:
        return encode_predictions(signature, results)
    if form is BodyForm.ONE_ROW:
        specs = {s.name: s for s in signature.outputs}
        return {name: _unbatch(a, specs[name]).tolist() for name, a in results.items()}
    columns = {name: a.tolist() for name, a in results.items()}
    return schema.PredictColumnsResponse(
        outputs=next(iter(columns.values())) if len(columns) == 1 else columns,
        model_name=signature.name,
        model_version=signature.version,
    )


def _unbatch(array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """The one row of a batch of one, without a fixed last dimension of 1."""
    if not spec.batched or not array.ndim:
        return array
    row = np.asarray(array[0])
    if row.ndim and spec.shape[-1] == 1 and row.shape[-1] == 1:
        row = row[..., 0]
    return row


def encode_predictions(
    signature: Signature, results: dict[str, np.ndarray]
) -> schema.PredictResponse:
    """``predictions`` as one entry per row; rows are objects when there are several outputs.

    Outputs whose first dimension is not the batch come back column-wise under their names.
    """
    arrays = list(results.values())
    rows = arrays[0].shape[0] if arrays and arrays[0].ndim else None
    predictions: Any
    if len(arrays) == 1:
        predictions = arrays[0].tolist()
    elif rows is not None and all(a.ndim and a.shape[0] == rows for a in arrays):
        # tolist() gives Python scalars (str for BYTES), which every JSON encoder accepts.
        columns = {name: a.tolist() for name, a in results.items()}
        predictions = [{name: col[i] for name, col in columns.items()} for i in range(rows)]
    else:
        predictions = {name: a.tolist() for name, a in results.items()}
    return schema.PredictResponse(predictions, signature.name, signature.version)


def model_status(
    name: str, default_version: int, states: Iterable[tuple[str, ModelState]]
) -> schema.ModelStatus:
    """``GET /v1/models/{m}``: each version with its state, TensorFlow Serving style."""
    return schema.ModelStatus(
        model_name=name,
        default_version=str(default_version),
        model_version_status=[
            schema.ModelVersionStatus(version, _TF_STATES[state], schema.VersionStatus())
            for version, state in states
        ],
    )
