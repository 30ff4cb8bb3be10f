"""Text routes' bodies as pure functions: what was asked, and the answers' shapes."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from app.models.errors import InvalidInput
from app.protocols import schema
from app.protocols import text as protocol


@pytest.mark.parametrize(
    ("input_", "texts", "sequences"),
    [
        ("hi", ["hi"], None),
        (["a", "b"], ["a", "b"], None),
        ([1, 2, 3], None, [[1, 2, 3]]),
        ([[1, 2], [3]], None, [[1, 2], [3]]),
    ],
)
def test_openai_input_forms(input_: object, texts: object, sequences: object) -> None:
    call = protocol.parse_openai_embeddings(json.dumps({"input": input_, "model": "m"}).encode())
    assert (call.texts, call.sequences, call.model, call.truncate) == (texts, sequences, "m", False)


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        ({"input": [], "model": "m"}, "'input' is empty"),
        ({"input": ["a", 1], "model": "m"}, "must be a string, a list of strings"),
        ({"input": [[1, "x"]], "model": "m"}, "must be a string"),
        ({"input": [True], "model": "m"}, "must be a string"),
        ({"input": "a"}, "missing required field `model`"),
        ({"input": "a", "model": "m", "encoding_format": "hex"}, "encoding_format"),
    ],
)
def test_bad_openai_bodies(doc: object, fragment: str) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        protocol.parse_openai_embeddings(json.dumps(doc).encode())


def test_openai_answers_floats_or_base64_and_usage() -> None:
    vectors = np.array([[0.5, -0.25], [1.0, 0.0]], np.float32)
    plain = json.loads(
        schema.encode(protocol.encode_openai_embeddings("m", vectors, [3, 4], False))
    )
    assert plain["object"] == "list" and plain["model"] == "m"
    assert plain["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    assert [d["embedding"] for d in plain["data"]] == [[0.5, -0.25], [1.0, 0.0]]
    packed = json.loads(
        schema.encode(protocol.encode_openai_embeddings("m", vectors, [3, 4], True))
    )
    decoded = np.frombuffer(base64.b64decode(packed["data"][1]["embedding"]), dtype="<f4")
    assert decoded.tolist() == [1.0, 0.0]


def test_tei_and_layer_bodies() -> None:
    call, normalize = protocol.parse_tei_embed(b'{"inputs": "x", "normalize": false}')
    assert (call.texts, call.truncate, normalize) == (["x"], False, False)
    assert protocol.parse_texts(b'{"input": "x"}', "input").texts == ["x"]
    assert protocol.parse_texts(b'{"texts": ["x", "y"]}', "texts").texts == ["x", "y"]
    with pytest.raises(InvalidInput, match="'texts' is empty"):
        protocol.parse_texts(b'{"texts": []}', "texts")
    with pytest.raises(InvalidInput, match="send the texts in 'texts'"):
        protocol.parse_texts(b'{"input": "x"}', "texts")
    with pytest.raises(InvalidInput, match="truncation_direction"):
        protocol.parse_tei_embed(b'{"inputs": "x", "truncation_direction": "Left"}')


def test_tokenize_and_detokenize_forms() -> None:
    call = protocol.parse_tokenize(b'{"text": "hi", "add_bos": false}')
    assert (call.texts, call.add_special_tokens, call.tei) == (["hi"], False, False)
    assert protocol.parse_tokenize(b'{"inputs": ["a", "b"]}').tei
    with pytest.raises(InvalidInput, match="send 'text'"):
        protocol.parse_tokenize(b'{"text": "a", "inputs": "b"}')
    one = protocol.parse_detokenize(b'{"tokens": [1, 2]}')
    assert (one.sequences, one.tei) == ([[1, 2]], False)
    nested = protocol.parse_detokenize(b'{"ids": [[1], [2, 3]]}')
    assert (nested.sequences, nested.nested) == ([[1], [2, 3]], True)
    assert protocol.encode_detokenize(nested, ["a", "b"]) == ["a", "b"]
    with pytest.raises(InvalidInput, match="'ids' must be"):
        protocol.parse_detokenize(b'{"ids": ["x"]}')
