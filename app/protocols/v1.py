"""Simple JSON in the TensorFlow Serving / KServe V1 style: ``instances`` in, ``predictions`` out.

A row is the input's value for single-input models, or an object keyed by input name. When a
model's last input dimension is a fixed 1 (text models taking ``[N, 1]`` strings), a row may
leave it out: ``{"instances": ["great film", "dull"]}``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from app.models.errors import InvalidInput, PayloadTooLarge
from app.models.onnx import OnnxModel
from app.models.signature import TensorSpec
from app.protocols.tensors import coerce


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


def _column(spec: TensorSpec, rows: list[Any]) -> np.ndarray:
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
