"""Wire values to arrays and back, with every check before allocation."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from app.models.errors import InvalidInput, PayloadTooLarge
from app.protocols.tensors import (
    array_from_bytes,
    array_from_json,
    array_to_bytes,
    check_elements,
    coerce,
    to_json_data,
)


def test_element_count_is_checked_from_the_shape() -> None:
    assert check_elements("x", [2, 3], 6) == (2, 3)
    with pytest.raises(PayloadTooLarge, match="7 elements; the limit is 6"):
        check_elements("x", [7], 6)


@pytest.mark.parametrize(
    ("data", "datatype", "expected"),
    [
        ([[1, 2], [3, 4]], "INT32", [[1, 2], [3, 4]]),
        ([1.5, 2.5, 3.5, 4.5], "FP16", [[1.5, 2.5], [3.5, 4.5]]),
        ([True, False, True, True], "BOOL", [[True, False], [True, True]]),
        ([2**63 + 1, 0, 0, 0], "UINT64", [[2**63 + 1, 0], [0, 0]]),
    ],
)
def test_json_data_in_any_nesting(data: list[object], datatype: str, expected: object) -> None:
    assert array_from_json("x", data, datatype, (2, 2)).tolist() == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "datatype", "fragment"),
    [
        (1e39, "FP32", "out of range for FP32"),
        (-1e39, "FP32", "out of range for FP32"),
        (70000, "FP16", "out of range for FP16"),
        (256, "UINT8", "out of range for UINT8"),
        (1.5, "INT32", "must be integers"),
        ("1", "FP32", "must be numbers, got strings"),
        (1, "BOOL", "true or false"),
        (1, "BYTES", "must be a string"),
    ],
)
def test_lossy_or_mistyped_values_are_refused(value: object, datatype: str, fragment: str) -> None:
    raw = np.array([value], dtype=object if datatype == "BYTES" else None)
    with pytest.raises(InvalidInput, match=fragment):
        coerce("x", raw, datatype, [value])  # type: ignore[arg-type]


def test_the_largest_finite_fp32_is_kept() -> None:
    big = float(np.finfo(np.float32).max)
    assert coerce("x", np.array([big]), "FP32").tolist() == [big]


def test_element_counts_must_match_the_shape() -> None:
    with pytest.raises(InvalidInput, match="has 3 elements but shape \\[2, 2\\] needs 4"):
        array_from_json("x", [1, 2, 3], "FP32", (2, 2))


def test_binary_tensors_round_trip() -> None:
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    raw = array_to_bytes(values, "FP32")
    assert array_from_bytes("x", memoryview(raw), "FP32", (2, 3)).tolist() == values.tolist()
    texts = np.array(["a", "héllo"], dtype=object)
    packed = array_to_bytes(texts, "BYTES")
    assert packed == struct.pack("<I", 1) + b"a" + struct.pack("<I", 6) + "héllo".encode()
    assert array_from_bytes("t", memoryview(packed), "BYTES", (2,)).tolist() == ["a", "héllo"]


@pytest.mark.parametrize(
    ("raw", "datatype", "shape", "fragment"),
    [
        (b"\x00" * 7, "FP32", (2,), "7 bytes but shape [2] of FP32 needs 8"),
        (b"\x02", "BOOL", (1,), "BOOL bytes must be 0 or 1"),
        (struct.pack("<I", 5) + b"ab", "BYTES", (1,), "truncated"),
        (struct.pack("<I", 1) + b"a" + b"zz", "BYTES", (1,), "2 bytes too many"),
        (struct.pack("<I", 1) + b"\xff", "BYTES", (1,), "not UTF-8"),
    ],
)
def test_bad_binary_tensors(
    raw: bytes, datatype: str, shape: tuple[int, ...], fragment: str
) -> None:
    with pytest.raises(InvalidInput) as info:
        array_from_bytes("x", memoryview(raw), datatype, shape)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_json_data_is_flat() -> None:
    assert to_json_data(np.array([[1, 2], [3, 4]])).tolist() == [1, 2, 3, 4]
    assert to_json_data(np.array([b"a", "b"], dtype=object)) == ["a", "b"]


def test_raw_bytes_stay_binary() -> None:
    png = b"\x89PNG\r\n\x1a\n\xff\x00"
    packed = struct.pack("<I", len(png)) + png + struct.pack("<I", 1) + b"a"
    binary = array_from_bytes("image", memoryview(packed), "BYTES", (2,), raw_bytes=True)
    assert binary.tolist() == [png, b"a"]
    # In JSON, binary elements come base64-encoded.
    encoded = ["iVBORw0KGgr/AA==", "YQ=="]
    assert array_from_json("image", encoded, "BYTES", (2,), raw_bytes=True).tolist() == [png, b"a"]
    with pytest.raises(InvalidInput, match="element 1 is not base64"):
        array_from_json("image", ["YQ==", "not base64!"], "BYTES", (2,), raw_bytes=True)
