"""Tensor signatures: names, Open Inference Protocol datatypes and shapes of a model's tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from app.models.errors import InvalidInput

#: Open Inference Protocol datatypes.
Datatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]

# onnxruntime's type strings -> Open Inference Protocol datatype names.
ORT_TO_DATATYPE: dict[str, Datatype] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

# Datatype -> numpy dtype used for arrays handed to onnxruntime (little-endian on the wire).
DATATYPE_TO_NUMPY: dict[Datatype, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}

NUMPY_TO_DATATYPE: dict[np.dtype[np.generic], Datatype] = {
    dt: name for name, dt in DATATYPE_TO_NUMPY.items()
}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output of a model.

    Attributes:
        name: Tensor name in the ONNX graph.
        datatype: Open Inference Protocol datatype (``FP32``, ``BYTES``...).
        shape: Dimensions, ``-1`` where the model leaves the dimension dynamic.
        raw: A BYTES tensor whose elements are binary data (an image's file), not text: the
            protocols pass them on as ``bytes`` (base64 in JSON).
    """

    name: str
    datatype: Datatype
    shape: tuple[int, ...]
    raw: bool = False

    @property
    def dtype(self) -> np.dtype[np.generic]:
        """The numpy dtype of arrays for this tensor."""
        return DATATYPE_TO_NUMPY[self.datatype]

    @property
    def batched(self) -> bool:
        """True when the first dimension is dynamic, so it can carry a batch."""
        return bool(self.shape) and self.shape[0] == -1

    def accepts_shape(self, shape: tuple[int, ...]) -> bool:
        """Whether a concrete shape fits this spec (same rank, fixed dims equal)."""
        return len(shape) == len(self.shape) and all(
            want in (-1, got) for want, got in zip(self.shape, shape, strict=True)
        )


@dataclass(frozen=True, slots=True)
class Signature:
    """What a client sees of one model version: names, tensors and what model.toml says.

    Protocols depend on this, not on the model object that owns the session.

    Attributes:
        name: Model name.
        version: Version number as text.
        inputs: Input tensors in the model's order.
        outputs: Output tensors in the model's order.
        labels: Class names from ``model.toml``.
        description: Free text from ``model.toml``.
    """

    name: str
    version: str
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    labels: tuple[str, ...] = ()
    description: str = ""
    _inputs: dict[str, TensorSpec] = field(init=False, repr=False, compare=False)
    _outputs: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_inputs", {spec.name: spec for spec in self.inputs})
        object.__setattr__(self, "_outputs", frozenset(spec.name for spec in self.outputs))

    def input_spec(self, name: str) -> TensorSpec:
        """Spec of the named input.

        Raises:
            InvalidInput: the model has no such input.
        """
        spec = self._inputs.get(name)
        if spec is None:
            raise InvalidInput(
                f"model {self.name!r} has no input {name!r}; inputs are "
                f"{', '.join(repr(s.name) for s in self.inputs)}"
            )
        return spec

    def check_outputs(self, names: Sequence[str]) -> None:
        """Raise InvalidInput unless every requested output exists."""
        unknown = [n for n in names if n not in self._outputs]
        if unknown:
            raise InvalidInput(
                f"model {self.name!r} has no output(s) {', '.join(repr(n) for n in unknown)}; "
                f"outputs are {', '.join(repr(s.name) for s in self.outputs)}"
            )


def dims_from_ort(shape: list[int | str | None] | None) -> tuple[int, ...]:
    """Turn an onnxruntime shape (ints, symbolic names or None) into ints with -1 for dynamic."""
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (shape or []))
