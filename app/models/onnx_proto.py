"""Just enough of the protobuf wire format to find an ONNX model's external-data locations
and the operators it uses.

The master checks every model before any worker starts, and the ``onnx`` package costs
~0.45 s and ~15 MiB to import there (memory every forked worker then carries). The check
needs only the ``location`` of tensors stored outside the file, so this walks the few message
types that can hold a tensor: graphs, their initializers, node attributes (including nested
graphs, as in Loop and If bodies), sparse tensors and model-local functions.
"""

from __future__ import annotations

from collections.abc import Iterator

# Field numbers from onnx.proto.
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_NODE_OP_TYPE, _NODE_ATTRIBUTE, _NODE_DOMAIN = 4, 5, 7
_FUNCTION_NODE = 7
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS = 5, 6, 10, 11
_ATTR_SPARSE_TENSOR, _ATTR_SPARSE_TENSORS = 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 13, 14
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_EXTERNAL = 1
_MAX_DEPTH = 64


class ProtoError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ProtoError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: memoryview) -> Iterator[tuple[int, int, memoryview | int]]:
    """(field number, wire type, value) for every field of one message."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            yield number, wire, value
        elif wire == 2:
            size, pos = _varint(data, pos)
            if pos + size > len(data):
                raise ProtoError("length-delimited field runs past the end")
            yield number, wire, data[pos : pos + size]
            pos += size
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ProtoError(f"unsupported wire type {wire}")
        if pos > len(data):
            raise ProtoError("field runs past the end")


def _messages(data: memoryview, *numbers: int) -> Iterator[tuple[int, memoryview]]:
    for number, wire, value in _fields(data):
        if number in numbers and wire == 2 and isinstance(value, memoryview):
            yield number, value


def _tensor_location(tensor: memoryview) -> str | None:
    external, location = False, ""
    for number, wire, value in _fields(tensor):
        if number == _TENSOR_DATA_LOCATION and wire == 0:
            external = value == _EXTERNAL
        elif number == _TENSOR_EXTERNAL_DATA and isinstance(value, memoryview):
            entry = dict(_messages(value, _ENTRY_KEY, _ENTRY_VALUE))
            if bytes(entry.get(_ENTRY_KEY, b"")) == b"location":
                location = bytes(entry.get(_ENTRY_VALUE, b"")).decode("utf-8", "replace")
    return location if external else None


def _sparse(sparse: memoryview) -> Iterator[memoryview]:
    for _, tensor in _messages(sparse, _SPARSE_VALUES, _SPARSE_INDICES):
        yield tensor


def _nodes(nodes: Iterator[memoryview], depth: int) -> Iterator[memoryview]:
    for node in nodes:
        for _, attr in _messages(node, _NODE_ATTRIBUTE):
            for number, value in _messages(
                attr,
                _ATTR_T,
                _ATTR_G,
                _ATTR_TENSORS,
                _ATTR_GRAPHS,
                _ATTR_SPARSE_TENSOR,
                _ATTR_SPARSE_TENSORS,
            ):
                if number in (_ATTR_T, _ATTR_TENSORS):
                    yield value
                elif number in (_ATTR_SPARSE_TENSOR, _ATTR_SPARSE_TENSORS):
                    yield from _sparse(value)
                else:
                    yield from _graph_tensors(value, depth + 1)


def _graph_tensors(graph: memoryview, depth: int) -> Iterator[memoryview]:
    if depth > _MAX_DEPTH:
        raise ProtoError("graphs nested too deeply")
    for number, value in _messages(
        graph, _GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER
    ):
        if number == _GRAPH_INITIALIZER:
            yield value
        elif number == _GRAPH_SPARSE_INITIALIZER:
            yield from _sparse(value)
        else:
            yield from _nodes(iter([value]), depth)


def external_data_locations(model: bytes) -> list[str]:
    """Every ``location`` of external data referenced anywhere in a serialized ModelProto.

    Raises:
        ProtoError: the bytes are not a well-formed protobuf message.
    """
    data = memoryview(model)
    tensors: list[memoryview] = []
    for number, value in _messages(data, _MODEL_GRAPH, _MODEL_FUNCTIONS):
        if number == _MODEL_GRAPH:
            tensors.extend(_graph_tensors(value, 0))
        else:
            tensors.extend(_nodes((n for _, n in _messages(value, _FUNCTION_NODE)), 0))
    return [loc for loc in map(_tensor_location, tensors) if loc is not None]


def _graph_ops(graph: memoryview, depth: int) -> Iterator[tuple[str, str]]:
    if depth > _MAX_DEPTH:
        raise ProtoError("graphs nested too deeply")
    for _, node in _messages(graph, _GRAPH_NODE):
        yield from _node_ops(node, depth)


def _node_ops(node: memoryview, depth: int) -> Iterator[tuple[str, str]]:
    fields = {
        number: bytes(value)
        for number, _, value in _fields(node)
        if number in (_NODE_OP_TYPE, _NODE_DOMAIN) and isinstance(value, memoryview)
    }
    yield (
        fields.get(_NODE_DOMAIN, b"").decode("utf-8", "replace"),
        fields.get(_NODE_OP_TYPE, b"").decode("utf-8", "replace"),
    )
    for _, attr in _messages(node, _NODE_ATTRIBUTE):
        for _, body in _messages(attr, _ATTR_G, _ATTR_GRAPHS):
            yield from _graph_ops(body, depth + 1)


def op_types(model: bytes) -> set[tuple[str, str]]:
    """Every (domain, operator) a serialized ModelProto's nodes use, nested graphs and
    model-local functions included ("" is the default ONNX domain).

    Raises:
        ProtoError: the bytes are not a well-formed protobuf message.
    """
    found: set[tuple[str, str]] = set()
    for number, value in _messages(memoryview(model), _MODEL_GRAPH, _MODEL_FUNCTIONS):
        if number == _MODEL_GRAPH:
            found.update(_graph_ops(value, 0))
        else:
            for _, node in _messages(value, _FUNCTION_NODE):
                found.update(_node_ops(node, 0))
    return found


def looks_like_model(model: bytes) -> bool:
    """Whether the bytes parse as a message with a graph (a cheap sanity check)."""
    try:
        return any(True for _ in _messages(memoryview(model), _MODEL_GRAPH))
    except ProtoError:
        return False
