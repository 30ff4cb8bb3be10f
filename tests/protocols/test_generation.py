"""Generation bodies: what /generate and OpenAI's completion routes accept, and the shapes of
their answers and event streams."""

from __future__ import annotations

import json

import pytest

from app.models.errors import InvalidInput
from app.protocols import generation as protocol

pytestmark = pytest.mark.unit


def _events(stream: bytes) -> list[str]:
    assert stream.endswith(b"\n\n")
    return [block.decode() for block in stream.split(b"\n\n") if block]


def test_generate_takes_the_sampling_settings() -> None:
    call = protocol.parse_generate(
        b'{"prompt": "Hi", "max_tokens": 5, "temperature": 0.5, "top_k": 3, "top_p": 0.9,'
        b' "stop_sequences": ["\\n"], "stream": true, "seed": 42, "model": "m"}'
    )
    assert call.prompt == "Hi"
    assert call.model == "m"
    assert call.stream
    assert call.sampling == protocol.SamplingCall(5, 0.5, 3, 0.9, 42, ("\n",))
    plain = protocol.parse_generate('{"prompt": "Hi"}')
    assert plain.model is None
    assert plain.sampling.max_tokens is None  # the model's default applies


@pytest.mark.parametrize(
    ("body", "where"),
    [
        (b'{"prompt": ""}', "$.prompt"),
        (b'{"prompt": "x", "max_tokens": 0}', "$.max_tokens"),
        (b'{"prompt": "x", "temperature": -1}', "$.temperature"),
        (b'{"prompt": "x", "top_p": 0}', "$.top_p"),
        (b'{"prompt": "x", "top_k": true}', "$.top_k"),
        (b'{"prompt": "x", "max_new_tokens": 5}', "unknown field `max_new_tokens`"),
        (b'{"max_tokens": 5}', "missing required field `prompt`"),
        (b"[]", "Expected `object`"),
    ],
)
def test_generate_refuses_bad_bodies_naming_the_field(body: bytes, where: str) -> None:
    with pytest.raises(InvalidInput, match=where.replace("$", r"\$").replace("[", r"\[")):
        protocol.parse_generate(body)


def test_completions_take_a_text_a_list_of_one_or_token_ids() -> None:
    assert protocol.parse_completion(b'{"model": "m", "prompt": "Hi"}').prompt == "Hi"
    assert protocol.parse_completion(b'{"model": "m", "prompt": ["Hi"]}').prompt == "Hi"
    ids = protocol.parse_completion(b'{"model": "m", "prompt": [1, 2, 3]}')
    assert ids.prompt is None
    assert ids.prompt_ids == [1, 2, 3]
    default = protocol.parse_completion(b'{"model": "m", "prompt": "Hi"}')
    assert default.sampling.max_tokens == 16  # OpenAI's default for completions
    with pytest.raises(InvalidInput, match="one prompt per request"):
        protocol.parse_completion(b'{"model": "m", "prompt": ["a", "b"]}')
    with pytest.raises(InvalidInput, match=r"\$.n"):
        protocol.parse_completion(b'{"model": "m", "prompt": "a", "n": 2}')
    with pytest.raises(InvalidInput, match=r"\$.frequency_penalty"):
        protocol.parse_completion(b'{"model": "m", "prompt": "a", "frequency_penalty": 0.5}')
    stream = protocol.parse_completion(
        b'{"model": "m", "prompt": "a", "stream": true, "stream_options": {"include_usage": true}'
        b', "stop": "\\n"}'
    )
    assert stream.stream
    assert stream.include_usage
    assert stream.sampling.stop == ("\n",)


def test_chat_messages_become_template_messages() -> None:
    call = protocol.parse_chat(
        b'{"model": "m", "messages": [{"role": "developer", "content": "Be brief."},'
        b' {"role": "user", "content": [{"type": "text", "text": "Hi "},'
        b' {"type": "text", "text": "there"}]}], "max_completion_tokens": 9}'
    )
    assert call.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
    ]
    assert call.sampling.max_tokens == 9
    assert protocol.parse_chat(b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}')
    for bad in (
        b'{"model": "m", "messages": []}',
        b'{"model": "m", "messages": [{"role": "robot", "content": "x"}]}',
        b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": []}',
        b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
    ):
        with pytest.raises(InvalidInput):
            protocol.parse_chat(bad)


def test_an_event_is_a_data_line_with_an_optional_name() -> None:
    assert protocol.sse({"a": 1}) == b'data: {"a":1}\n\n'
    assert protocol.sse({"a": 1}, "done") == b'event: done\ndata: {"a":1}\n\n'


def test_a_chat_stream_starts_with_the_role_and_ends_with_done() -> None:
    shape = protocol.OpenAIStream("m", chat=True)
    start = json.loads(_events(shape.start())[0].removeprefix("data: "))
    assert start["object"] == "chat.completion.chunk"
    assert start["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = json.loads(_events(shape.text("Par"))[0].removeprefix("data: "))
    assert text["choices"][0]["delta"] == {"content": "Par"}
    assert text["id"] == start["id"]
    end = _events(shape.end("stop", shape.usage(3, 4)))
    assert end[-1] == "data: [DONE]"
    last = json.loads(end[0].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "stop"
    usage = json.loads(end[1].removeprefix("data: "))
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_a_completion_stream_has_no_role_chunk_and_usage_only_when_asked() -> None:
    shape = protocol.OpenAIStream("m", chat=False)
    assert shape.start() == b""
    chunk = json.loads(_events(shape.text("a"))[0].removeprefix("data: "))
    assert chunk["object"] == "text_completion"
    assert chunk["choices"][0]["text"] == "a"
    assert chunk["id"].startswith("cmpl-")
    assert len(_events(shape.end("length", None))) == 2  # the finish reason, then [DONE]


def test_whole_answers_carry_the_usage() -> None:
    usage = protocol.OpenAIStream.usage(5, 2)
    chat = protocol.OpenAIStream("m", chat=True).whole("Paris.", "stop", usage)
    assert chat.choices[0].message.content == "Paris."  # type: ignore[union-attr]
    assert chat.usage.total_tokens == 7  # type: ignore[union-attr]
    completion = protocol.OpenAIStream("m", chat=False).whole(" Paris", "length", usage)
    assert completion.choices[0].text == " Paris"  # type: ignore[union-attr]
    generated = protocol.generate_response("x", 1, 2, "length", 0.0123456, "m", "1")
    assert generated.processing_time_ms == 12.346
    assert generated.model_info.name == "m"
