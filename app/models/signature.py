"""Tensor signatures: names, Open Inference Protocol datatypes and shapes of a model's tensors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# onnxruntime's type strings -> Open Inference Protocol datatype names.
ORT_TO_DATATYPE: dict[str, str] = {
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
DATATYPE_TO_NUMPY: dict[str, np.dtype[np.generic]] = {
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

NUMPY_TO_DATATYPE: dict[np.dtype[np.generic], str] = {
    dt: name for name, dt in DATATYPE_TO_NUMPY.items()
}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output of a model.

    Attributes:
        name: Tensor name in the ONNX graph.
        datatype: Open Inference Protocol datatype (``FP32``, ``BYTES``...).
        shape: Dimensions, ``-1`` where the model leaves the dimension dynamic.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]

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

    def as_dict(self) -> dict[str, object]:
        """Metadata form used by the protocols: ``{name, datatype, shape}``."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def dims_from_ort(shape: list[int | str | None] | None) -> tuple[int, ...]:
    """Turn an onnxruntime shape (ints, symbolic names or None) into ints with -1 for dynamic."""
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (shape or []))
