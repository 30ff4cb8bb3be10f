"""Generation routes in the app (Falcon's test client, the real SmolLM2 build): answers,
event streams, and the errors bad requests get."""

from __future__ import annotations

import json
from typing import Any

import falcon.testing
import pytest

pytestmark = pytest.mark.unit

CHAT = {
    "model": "smollm2",
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "temperature": 0,
}


def _events(text: str) -> list[tuple[str, Any]]:
    """(event name, data) of each Server-Sent Event; data ``[DONE]`` stays a string."""
    out = []
    for block in text.split("\n\n"):
        if not block or block.startswith(":"):  # a comment
            continue
        name, data = "message", ""
        for line in block.split("\n"):
            key, _, value = line.partition(": ")
            if key == "event":
                name = value
            elif key == "data":
                data = value
        out.append((name, data if data == "[DONE]" else json.loads(data)))
    return out


def test_generate_answers_with_text_and_counts(
    generation_client: falcon.testing.TestClient,
) -> None:
    resp = generation_client.simulate_post(
        "/generate", json={"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0}
    )
    assert resp.status_code == 200, resp.text
    body = resp.json
    assert body["text"].startswith(" Paris")
    assert body["tokens_generated"] == 3
    assert body["finish_reason"] == "length"
    assert body["model_info"] == {"name": "smollm2", "version": "1"}
    assert body["processing_time_ms"] > 0


@pytest.mark.parametrize("how", ["body", "accept"])
def test_generate_streams_tokens_then_done(
    generation_client: falcon.testing.TestClient, how: str
) -> None:
    body: dict[str, Any] = {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}
    headers = {}
    if how == "body":
        body["stream"] = True
    else:
        headers["Accept"] = "text/event-stream"
    resp = generation_client.simulate_post("/generate", json=body, headers=headers)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "text/event-stream"
    assert resp.headers["x-accel-buffering"] == "no"
    events = _events(resp.text)
    tokens = [data for name, data in events if name == "token"]
    assert [t["index"] for t in tokens] == list(range(6))
    name, done = events[-1]
    assert name == "done"
    assert done["tokens_generated"] == 6
    assert done["text"] == "".join(t["text"] for t in tokens)
    whole = generation_client.simulate_post("/generate", json={**body, "stream": False}).json
    assert whole["text"] == done["text"]  # greedy: the same text streamed or not


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"prompt": ""}, 400, "$.prompt"),
        ({"prompt": "hello " * 3000}, 400, "takes at most"),
        ({"prompt": "x", "max_tokens": 0}, 400, "$.max_tokens"),
        ({"prompt": "x", "max_tokens": 4000}, 400, "max_tokens must be 1 to 2047"),
        ({"prompt": "x", "temperature": -0.1}, 400, "$.temperature"),
        ({"prompt": "x", "unknown": 1}, 400, "unknown field"),
        ({"prompt": "x", "model": "nope"}, 404, "nope"),
    ],
)
def test_bad_generate_requests_get_clear_errors(
    generation_client: falcon.testing.TestClient, body: dict[str, Any], status: int, words: str
) -> None:
    resp = generation_client.simulate_post("/generate", json={**body, "stream": True})
    assert resp.status_code == status
    assert resp.headers["content-type"] == "application/json"  # refused before streaming
    assert words in resp.json["error"]


def test_chat_completions_whole_and_streamed(generation_client: falcon.testing.TestClient) -> None:
    whole = generation_client.simulate_post("/v1/chat/completions", json=CHAT)
    assert whole.status_code == 200, whole.text
    answer = whole.json
    assert answer["object"] == "chat.completion"
    assert "Paris" in answer["choices"][0]["message"]["content"]
    assert answer["choices"][0]["finish_reason"] == "stop"
    usage = answer["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    streamed = generation_client.simulate_post(
        "/v1/chat/completions",
        json={**CHAT, "stream": True, "stream_options": {"include_usage": True}},
    )
    events = [data for _, data in _events(streamed.text)]
    assert events[-1] == "[DONE]"
    assert events[-2]["usage"] == usage
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2])
    assert text == answer["choices"][0]["message"]["content"]


def test_completions_follow_openai(generation_client: falcon.testing.TestClient) -> None:
    resp = generation_client.simulate_post(
        "/v1/completions", json={"model": "smollm2", "prompt": "Hello", "temperature": 0}
    )
    body = resp.json
    assert body["object"] == "text_completion"
    assert body["usage"]["completion_tokens"] == 16  # OpenAI's default max_tokens
    assert body["choices"][0]["finish_reason"] == "length"
    stop = generation_client.simulate_post(
        "/v1/completions",
        json={"model": "smollm2", "prompt": "1, 2, 3, 4,", "temperature": 0, "stop": [" 7"]},
    ).json
    assert stop["choices"][0]["text"] == " 5, 6,"
    assert stop["choices"][0]["finish_reason"] == "stop"


def test_openai_routes_answer_errors_in_openai_shape(
    generation_client: falcon.testing.TestClient,
) -> None:
    resp = generation_client.simulate_post("/v1/chat/completions", json={**CHAT, "model": "nope"})
    assert resp.status_code == 404
    assert resp.json["error"]["type"] == "invalid_request_error"
    assert resp.json["error_code"] == "MODEL_NOT_FOUND"
    resp = generation_client.simulate_post("/v1/completions", json={"model": "smollm2"})
    assert resp.status_code == 400
    assert "prompt" in resp.json["error"]["message"]


def test_websocket_route_needs_an_upgrade(generation_client: falcon.testing.TestClient) -> None:
    resp = generation_client.simulate_get("/ws")
    assert resp.status_code == 400
    assert "Upgrade: websocket" in resp.json["error"]


def test_the_generation_model_tokenizes_and_is_listed(
    generation_client: falcon.testing.TestClient,
) -> None:
    tokens = generation_client.simulate_post(
        "/tokenize", json={"text": "Hello world", "model": "smollm2"}
    ).json
    assert tokens["token_count"] == 2
    text = generation_client.simulate_post(
        "/detokenize", json={"tokens": tokens["tokens"], "model": "smollm2"}
    ).json
    assert text == {"text": "Hello world"}
    # The only text model here generates, so it is the default tokenizer too.
    assert generation_client.simulate_post("/tokenize", json={"text": "x"}).status_code == 200
    models = generation_client.simulate_get("/v1/models").json
    assert [m["id"] for m in models["data"]] == ["smollm2"]


def test_the_tensor_protocols_take_prompts_and_give_texts(
    generation_client: falcon.testing.TestClient,
) -> None:
    resp = generation_client.simulate_post(
        "/v2/models/smollm2/infer",
        json={
            "inputs": [
                {
                    "name": "text_input",
                    "shape": [2],
                    "datatype": "BYTES",
                    "data": ["The capital of France is", "Hello"],
                }
            ]
        },
    )
    assert resp.status_code == 200, resp.text
    (output,) = resp.json["outputs"]
    assert output["name"] == "text_output"
    assert output["shape"] == [2]
    assert all(isinstance(text, str) and text for text in output["data"])
