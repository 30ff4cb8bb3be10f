"""Turning wire data into numpy arrays and back, with every check done before allocation."""

from __future__ import annotations

import base64
import binascii
import math
import struct
from typing import Any

import numpy as np

from app.models.errors import InvalidInput, PayloadTooLarge
from app.models.signature import DATATYPE_TO_NUMPY, Datatype

_INT_KINDS = frozenset("iu")
_NUMBER_KINDS = frozenset("iuf")


def check_elements(name: str, shape: list[int], max_elements: int) -> tuple[int, ...]:
    """A declared shape (non-negative integers, checked by the schema) within the limit.

    Raises:
        PayloadTooLarge: more elements than ``max_elements``; nothing was allocated.
    """
    count = math.prod(shape)
    if count > max_elements:
        raise PayloadTooLarge(
            f"input {name!r}: shape {shape} has {count} elements; the limit is {max_elements}"
        )
    return tuple(shape)


def array_from_json(
    name: str, data: Any, datatype: Datatype, shape: tuple[int, ...], raw_bytes: bool = False
) -> np.ndarray:
    """Build the array for one input from JSON ``data`` (flat or nested, row-major).

    ``raw_bytes``: the input is BYTES of binary data, sent in JSON as base64 strings.

    Raises:
        InvalidInput: ragged lists, values of the wrong kind, out-of-range integers, or an
            element count that disagrees with ``shape``.
    """
    if not isinstance(data, list):
        data = [data]
    try:
        raw = np.array(data, dtype=object if datatype == "BYTES" else None)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise InvalidInput(f"input {name!r}: 'data' is ragged or too deeply nested") from None
    expected = math.prod(shape)
    if raw.size != expected:
        raise InvalidInput(
            f"input {name!r}: 'data' has {raw.size} elements but shape "
            f"{list(shape)} needs {expected}"
        )
    array = coerce(name, raw, datatype, data).reshape(shape)
    if raw_bytes:
        flat = array.reshape(-1)
        for i, text in enumerate(flat):
            try:
                flat[i] = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidInput(
                    f"input {name!r} takes binary data: element {i} is not base64 (send it "
                    "base64-encoded, or as binary tensor data)"
                ) from None
    return array


def coerce(name: str, raw: np.ndarray, datatype: Datatype, source: Any = None) -> np.ndarray:
    """Cast an array that numpy inferred from JSON to ``datatype``, refusing lossy casts.

    Args:
        name: Input name, for messages.
        raw: What ``np.array`` made of the JSON value.
        datatype: Target Open Inference Protocol datatype.
        source: The JSON value itself; needed for integers beyond int64, which numpy infers
            as float64 or object.

    Raises:
        InvalidInput: strings for numbers, floats for integers, numbers for strings, etc.
    """
    target = DATATYPE_TO_NUMPY[datatype]
    kind = raw.dtype.kind
    if datatype == "BYTES":
        flat = raw.reshape(-1)
        if not all(isinstance(v, str) for v in flat):
            raise InvalidInput(f"input {name!r} is BYTES: every element must be a string")
        return raw
    if raw.size == 0:
        return raw.astype(target)
    if datatype == "BOOL":
        if kind != "b":
            raise InvalidInput(f"input {name!r} is BOOL: elements must be true or false")
        return raw
    if kind not in _NUMBER_KINDS:
        raise InvalidInput(
            f"input {name!r} is {datatype}: elements must be numbers, got {_kind_name(kind)}"
        )
    if target.kind in _INT_KINDS:
        info = np.iinfo(target)  # type: ignore[type-var]
        if kind not in _INT_KINDS:
            if source is None or kind not in "fO":
                raise InvalidInput(f"input {name!r} is {datatype}: elements must be integers")
            return _python_ints(name, source, datatype, info).reshape(raw.shape)
        if raw.min() < info.min or raw.max() > info.max:
            raise InvalidInput(f"input {name!r}: a value is out of range for {datatype}")
        return raw.astype(target, copy=False)
    try:
        # A narrowing cast (1e39 to FP32, 70000 to FP16) would make infinity of what it
        # cannot hold (JSON itself has none).
        with np.errstate(over="raise"):
            return raw.astype(target, copy=False)
    except FloatingPointError:
        raise InvalidInput(f"input {name!r}: a value is out of range for {datatype}") from None


def _python_ints(name: str, source: Any, datatype: Datatype, info: Any) -> np.ndarray:
    # The slow path, taken only for integers numpy cannot infer exactly (beyond int64).
    flat = np.array(source, dtype=object).reshape(-1)
    if not all(type(v) is int for v in flat):
        raise InvalidInput(f"input {name!r} is {datatype}: elements must be integers")
    if min(flat) < info.min or max(flat) > info.max:
        raise InvalidInput(f"input {name!r}: a value is out of range for {datatype}")
    return flat.astype(DATATYPE_TO_NUMPY[datatype])


def _kind_name(kind: str) -> str:
    return {"U": "strings", "S": "strings", "b": "booleans", "O": "mixed or null values"}.get(
        kind, "non-numeric values"
    )


def array_from_bytes(
    name: str,
    chunk: memoryview,
    datatype: Datatype,
    shape: tuple[int, ...],
    raw_bytes: bool = False,
) -> np.ndarray:
    """Decode one tensor of the binary tensor data extension (little-endian, row-major).

    ``raw_bytes``: BYTES elements stay ``bytes`` (binary data) instead of UTF-8 text.

    Raises:
        InvalidInput: the byte count does not match the shape and datatype.
    """
    count = math.prod(shape)
    if datatype == "BYTES":
        return _bytes_elements(name, chunk, count, raw_bytes).reshape(shape)
    dtype = DATATYPE_TO_NUMPY[datatype].newbyteorder("<")
    if len(chunk) != count * dtype.itemsize:
        raise InvalidInput(
            f"input {name!r}: binary data has {len(chunk)} bytes but shape "
            f"{list(shape)} of {datatype} needs {count * dtype.itemsize}"
        )
    array = np.frombuffer(chunk, dtype=dtype)
    if datatype == "BOOL" and array.size and (chunk.tobytes().strip(b"\x00\x01") != b""):
        raise InvalidInput(f"input {name!r}: BOOL bytes must be 0 or 1")
    return array.astype(DATATYPE_TO_NUMPY[datatype], copy=False).reshape(shape)


def _bytes_elements(name: str, chunk: memoryview, count: int, raw_bytes: bool) -> np.ndarray:
    out = np.empty(count, dtype=object)
    pos, end = 0, len(chunk)
    for i in range(count):
        if pos + 4 > end:
            raise InvalidInput(f"input {name!r}: binary BYTES data ends before element {i}")
        (size,) = struct.unpack_from("<I", chunk, pos)
        pos += 4
        if pos + size > end:
            raise InvalidInput(f"input {name!r}: binary BYTES element {i} is truncated")
        try:
            element = bytes(chunk[pos : pos + size])
            out[i] = element if raw_bytes else element.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"input {name!r}: BYTES element {i} is not UTF-8 text") from None
        pos += size
    if pos != end:
        raise InvalidInput(f"input {name!r}: binary BYTES data has {end - pos} bytes too many")
    return out


def array_to_bytes(array: np.ndarray, datatype: Datatype) -> bytes:
    """Encode an output for the binary tensor data extension."""
    if datatype == "BYTES":
        parts = []
        for value in array.reshape(-1):
            raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
            parts.append(struct.pack("<I", len(raw)))
            parts.append(raw)
        return b"".join(parts)
    dtype = array.dtype.newbyteorder("<")
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def to_json_data(array: np.ndarray) -> Any:
    """A flat, JSON-encodable row-major view of an output (orjson serialises numpy)."""
    if array.dtype.kind == "O":
        return [
            v if isinstance(v, str) else bytes(v).decode("utf-8", "replace")
            for v in array.reshape(-1)
        ]
    return np.ascontiguousarray(array).reshape(-1)
