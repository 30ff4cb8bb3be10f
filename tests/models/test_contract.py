"""Serving contracts: what breaks clients and what does not, and the snapshot file."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.models.contract import Contract, ContractFileError, Tensor, breaks, load, save

OLD = Contract(
    (Tensor("input", "FP32", (-1, 30)), Tensor("mask", "INT64", (-1, 4))),
    (Tensor("label", "INT64", (-1,)), Tensor("probabilities", "FP32", (-1, 2))),
    ("malignant", "benign"),
)


def _with(**changes: object) -> Contract:
    fields = {"inputs": OLD.inputs, "outputs": OLD.outputs, "labels": OLD.labels, **changes}
    return Contract(**fields)  # type: ignore[arg-type]


def _input(datatype: str, shape: tuple[int, ...], name: str = "input") -> Contract:
    return _with(inputs=(Tensor(name, datatype, shape), OLD.inputs[1]))


BREAKS = {
    "output removed": (_with(outputs=OLD.outputs[:1]), "output 'probabilities' was removed"),
    "input renamed": (_input("FP32", (-1, 30), "features"), "input 'input' was removed"),
    "input added": (
        _with(inputs=(*OLD.inputs, Tensor("extra", "FP32", (-1, 1)))),
        "input 'extra' was added",
    ),
    "datatype": (_input("FP64", (-1, 30)), "changed datatype FP32 -> FP64"),
    "dynamic fixed": (_input("FP32", (1, 30)), "narrowed shape [-1, 30] -> [1, 30]"),
    "fixed changed": (_input("FP32", (-1, 31)), "narrowed shape"),
    "output widened": (
        _with(outputs=(OLD.outputs[0], Tensor("probabilities", "FP32", (-1, -1)))),
        "narrowed shape",
    ),
    "rank": (_input("FP32", (-1, 30, 1)), "changed rank"),
    "labels": (_with(labels=("benign", "malignant")), "labels changed"),
}


@pytest.mark.parametrize(("new", "found"), BREAKS.values(), ids=BREAKS)
def test_what_breaks_clients(new: Contract, found: str) -> None:
    assert any(found in b for b in breaks(OLD, new)), breaks(OLD, new)


def test_what_does_not() -> None:
    assert breaks(OLD, OLD) == []
    widened = _with(inputs=(Tensor("input", "FP32", (-1, -1)), OLD.inputs[1]))
    more_outputs = _with(outputs=(*OLD.outputs, Tensor("logits", "FP32", (-1, 2))))
    reordered = _with(inputs=OLD.inputs[::-1])
    for new in (widened, more_outputs, reordered):
        assert breaks(OLD, new) == []
    assert breaks(_with(labels=()), _with(labels=("a", "b"))) == []  # labels added


def test_snapshot_round_trip_and_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "contract.json"
    assert load(path) is None
    save(path, {"tabular": OLD})
    assert load(path) == {"tabular": OLD}
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in path.parent.iterdir()] == ["contract.json"]  # no temporary left
    for text, fragment in (("{not json", "unreadable"), ('{"format": 9, "models": {}}', "format 9"),
                           ('{"format": 1, "models": {"m": {}}}', "malformed")):  # fmt: skip
        path.write_text(text)
        with pytest.raises(ContractFileError, match=fragment):
            load(path)
