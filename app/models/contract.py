"""Serving contracts: what clients of a model rely on, kept in a snapshot file.

A model's contract is what its signature shows clients: input and output names, datatypes
and shapes, and its labels. ``onnx-appliance check --contract FILE`` writes the contracts of a
repository to FILE the first time, and later refuses a repository where a model version breaks
its recorded contract (:func:`breaks`) unless the operator accepts that model's change; the
file is then rewritten with the repository's contracts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from app.files import write_atomically
from app.models.signature import Signature, TensorSpec

FORMAT = 1


@dataclass(frozen=True, slots=True)
class Tensor:
    """One input or output as clients see it."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Contract:
    """A model's inputs, outputs and labels."""

    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    labels: tuple[str, ...] = ()

    @classmethod
    def of(cls, signature: Signature) -> Contract:
        """The contract a signature offers."""

        def tensors(specs: Iterable[TensorSpec]) -> tuple[Tensor, ...]:
            return tuple(Tensor(s.name, s.datatype, tuple(s.shape)) for s in specs)

        return cls(tensors(signature.inputs), tensors(signature.outputs), tuple(signature.labels))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Contract:
        """Read one model's entry of a snapshot file."""

        def tensors(items: Iterable[Mapping[str, Any]]) -> tuple[Tensor, ...]:
            return tuple(
                Tensor(str(t["name"]), str(t["datatype"]), tuple(int(d) for d in t["shape"]))
                for t in items
            )

        return cls(tensors(data["inputs"]), tensors(data["outputs"]), tuple(data.get("labels", ())))


class ContractFileError(Exception):
    """The snapshot file cannot be read or written; the message is one line."""


def breaks(old: Contract, new: Contract) -> list[str]:
    """How ``new`` breaks clients written for ``old`` (empty when it does not).

    Breaking: an input or output removed (a rename is a removal), an input added (clients
    do not send it), a datatype changed, a rank changed, a fixed dimension changed, a dynamic
    dimension fixed (narrowed), the labels changed. Not breaking: an output added, a fixed
    input dimension made dynamic.
    """
    found: list[str] = []
    pairs = (("input", old.inputs, new.inputs), ("output", old.outputs, new.outputs))
    for kind, before, after in pairs:
        now = {t.name: t for t in after}
        for tensor in before:
            current = now.get(tensor.name)
            if current is None:
                found.append(f"{kind} {tensor.name!r} was removed")
                continue
            if current.datatype != tensor.datatype:
                found.append(
                    f"{kind} {tensor.name!r} changed datatype {tensor.datatype} -> "
                    f"{current.datatype}"
                )
            found += _shape_breaks(kind, tensor, current)
        if kind == "input":
            known = {t.name for t in before}
            found += [f"input {t.name!r} was added" for t in after if t.name not in known]
    if old.labels and new.labels != old.labels:
        found.append("labels changed")
    return found


def _shape_breaks(kind: str, old: Tensor, new: Tensor) -> list[str]:
    if len(new.shape) != len(old.shape):
        return [f"{kind} {old.name!r} changed rank {list(old.shape)} -> {list(new.shape)}"]
    for was, now in zip(old.shape, new.shape, strict=True):
        if was != now and not (kind == "input" and was >= 0 and now < 0):
            return [f"{kind} {old.name!r} narrowed shape {list(old.shape)} -> {list(new.shape)}"]
    return []


def load(path: Path) -> dict[str, Contract] | None:
    """The contracts recorded in ``path`` by model name, or None when there is no file.

    Raises:
        ContractFileError: a file that is not a snapshot.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ContractFileError(f"contract snapshot {path} is unreadable: {exc}") from None
    try:
        if data["format"] != FORMAT:
            raise ContractFileError(
                f"contract snapshot {path} has format {data['format']!r}, not {FORMAT}"
            )
        return {name: Contract.from_json(entry) for name, entry in data["models"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ContractFileError(f"contract snapshot {path} is malformed: {exc!r}") from None


def save(path: Path, contracts: Mapping[str, Contract]) -> None:
    """Write the snapshot atomically: a reader sees the old file or the new one, whole.

    Raises:
        ContractFileError: the file cannot be written.
    """
    document = {
        "format": FORMAT,
        "models": {name: asdict(contract) for name, contract in sorted(contracts.items())},
    }
    try:
        write_atomically(path, (json.dumps(document, indent=1) + "\n").encode())
    except OSError as exc:
        raise ContractFileError(f"cannot write contract snapshot {path}: {exc}") from None
