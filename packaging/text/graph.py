"""Helpers the text model builders share: a graph under construction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper


class Graph:
    """Collects nodes and initializers under unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def name(self, hint: str) -> str:
        """A fresh value name."""
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, hint: str, value: np.ndarray) -> str:
        """An initializer holding ``value``."""
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str = "", **attrs: object) -> str:
        """A node with one output; returns the output's name."""
        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def ops(
        self, op_type: str, inputs: list[str], outputs: int, domain: str = "", **attrs: object
    ) -> list[str]:
        """A node with several outputs (or in another domain); returns their names."""
        names = [self.name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, domain=domain, **attrs))
        return names


#: Tensors at least this large go to the external data file.
EXTERNAL_THRESHOLD = 1024


def save(model: onnx.ModelProto, target: Path) -> Path:
    """Write ``model`` as ``target`` with its weights in ``<target>.data`` beside it.

    onnxruntime maps an external data file into memory instead of copying every weight out
    of the parsed model: what it does not repack stays in file-backed pages, which the
    kernel shares between the workers serving the model, and nothing holds the parsed copy.

    Returns:
        The external data file.
    """
    data = target.with_name(target.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to a file that is there
    onnx.save_model(
        model,
        str(target),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=EXTERNAL_THRESHOLD,
    )
    # onnx creates it private (0600); the service reads it as model.onnx is read.
    data.chmod(target.stat().st_mode & 0o777)
    return data
