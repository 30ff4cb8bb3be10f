"""Simple JSON routes on real sessions."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from falcon.testing import TestClient

from tests.conftest import DEMO_MODELS
from tests.resources.test_errors import assert_error

ROWS = [[float(i % 7) for i in range(30)], [float(i % 5) * 10 for i in range(30)]]


def test_predict_matches_onnxruntime(client: TestClient) -> None:
    result = client.simulate_post("/v1/models/tabular:predict", json={"instances": ROWS})
    assert result.status_code == 200, result.text
    session = ort.InferenceSession(str(DEMO_MODELS / "tabular" / "2" / "model.onnx"))
    labels, probs = session.run(None, {"input": np.array(ROWS, dtype=np.float32)})
    doc = result.json
    assert doc["model_name"] == "tabular"
    assert doc["model_version"] == "2"
    assert [p["label"] for p in doc["predictions"]] == labels.tolist()
    np.testing.assert_allclose([p["probabilities"] for p in doc["predictions"]], probs, rtol=1e-6)


def test_versioned_predict(client: TestClient) -> None:
    result = client.simulate_post("/v1/models/tabular/versions/1:predict", json={"instances": ROWS})
    assert result.json["model_version"] == "1"
    assert result.headers["X-Model-Version"] == "1"


def test_single_output_model_gives_plain_rows(client: TestClient) -> None:
    result = client.simulate_post(
        "/v1/models/regression:predict", json={"instances": [[0.01] * 10, [0.05] * 10]}
    )
    predictions = result.json["predictions"]
    assert len(predictions) == 2
    assert all(isinstance(p, list) and len(p) == 1 for p in predictions)


def test_text_rows_without_trailing_dimension(client: TestClient) -> None:
    result = client.simulate_post(
        "/v1/models/sentiment:predict",
        json={
            "instances": [
                "delivery was fast and the packaging was perfect",
                "the battery dies within an hour, useless",
            ]
        },
    )
    assert [p["label"] for p in result.json["predictions"]] == ["positive", "negative"]


def test_default_model_predict(client: TestClient) -> None:
    result = client.simulate_post("/predict", json={"instances": ROWS})
    assert result.status_code == 200
    assert result.json["model_name"] == "tabular"


def test_several_inputs_as_objects(extra_client: TestClient) -> None:
    result = extra_client.simulate_post(
        "/v1/models/two_inputs:predict",
        json={"instances": [{"a": [1, 2, 3], "b": [1, 1, 1]}, {"a": [0, 0, 0], "b": [1, 2, 3]}]},
    )
    assert result.json["predictions"] == [
        {"sum": [2.0, 3.0, 4.0], "diff": [0.0, 1.0, 2.0]},
        {"sum": [1.0, 2.0, 3.0], "diff": [-1.0, -2.0, -3.0]},
    ]


def test_model_status(client: TestClient) -> None:
    doc = client.simulate_get("/v1/models/tabular").json
    assert doc["default_version"] == "2"
    assert [(v["version"], v["state"]) for v in doc["model_version_status"]] == [
        ("1", "AVAILABLE"),
        ("2", "AVAILABLE"),
    ]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"instances": []}, 400, "INVALID_INPUT"),
        ({"instances": "x"}, 400, "INVALID_INPUT"),
        ({"rows": [[1]]}, 400, "INVALID_INPUT"),
        ([1, 2], 400, "INVALID_INPUT"),
        ({"instances": [[0.5] * 30, [0.5] * 29]}, 400, "INVALID_INPUT"),
        ({"instances": [["a"] * 30]}, 400, "INVALID_INPUT"),
        ({"instances": [[0.5] * 31]}, 400, "INVALID_INPUT"),
        ({"instances": [[0.5] * 30] * 1025}, 413, "PAYLOAD_TOO_LARGE"),
    ],
)
def test_bad_instances(client: TestClient, body: object, status: int, code: str) -> None:
    assert_error(client.simulate_post("/v1/models/tabular:predict", json=body), status, code)
    assert client.simulate_post("/predict", json={"instances": ROWS}).status_code == 200


def test_several_inputs_need_exact_keys(extra_client: TestClient) -> None:
    result = extra_client.simulate_post(
        "/v1/models/two_inputs:predict", json={"instances": [{"a": [1, 2, 3]}]}
    )
    assert_error(result, 400, "INVALID_INPUT")


def test_unknown_model(client: TestClient) -> None:
    assert_error(
        client.simulate_post("/v1/models/nope:predict", json={"instances": [[1]]}),
        404,
        "MODEL_NOT_FOUND",
    )
    assert_error(client.simulate_get("/v1/models/nope"), 404, "MODEL_NOT_FOUND")


@pytest.mark.parametrize(
    "path", ["/v1/models/plain:predict", "/v1/models/plain/versions/1:predict"]
)
def test_one_row_keyed_by_input_names_answers_unbatched(
    extra_client: TestClient, path: str
) -> None:
    result = extra_client.simulate_post(path, json={"features": [1.0, 2.0, 4.0]})
    assert result.status_code == 200, result.text
    assert result.json == {"result": 1.5}  # 0.5 + 0.5 + 0.5, exact in float32


def test_one_row_of_a_multi_output_model_is_keyed_by_output_names(client: TestClient) -> None:
    rows = client.simulate_post("/predict", json={"instances": ROWS[:1]}).json["predictions"][0]
    result = client.simulate_post("/predict", json={"input": ROWS[0]})
    assert result.status_code == 200, result.text
    assert result.json == rows  # {"label": ..., "probabilities": [...]}
    assert result.headers["X-Model-Version"] == "2"


def test_one_text_row_needs_no_trailing_dimension(client: TestClient) -> None:
    result = client.simulate_post(
        "/v1/models/sentiment:predict", json={"text": "the staff were friendly and kind"}
    )
    assert result.status_code == 200, result.text
    assert result.json["label"] == "positive"
    assert len(result.json["probabilities"]) == 2


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"features": [1.0, 2.0]}, "has shape [1, 2] but model 'plain' expects [-1, 3]"),
        ({"features": [1.0, 2.0, 3.0, 4.0]}, "has shape [1, 4]"),
        ({"features": ["a", "b", "c"]}, "elements must be numbers"),
        ({"features": [1.0, 2.0, 3.0], "extra": 1}, "got the keys ['extra', 'features']"),
        ({"feature": [1.0, 2.0, 3.0]}, "one row keyed by the input names ['features']"),
        ({}, "got the keys []"),
        ([1.0, 2.0, 3.0], "Expected `object`, got `array`"),
    ],
)
def test_bad_single_rows_get_the_usual_400(
    extra_client: TestClient, body: object, fragment: str
) -> None:
    result = extra_client.simulate_post("/v1/models/plain:predict", json=body)
    assert_error(result, 400, "INVALID_INPUT")
    assert fragment in result.json["error"]


def test_columnar_inputs_answer_columnar_outputs(
    client: TestClient, extra_client: TestClient
) -> None:
    rows = client.simulate_post("/predict", json={"instances": ROWS}).json["predictions"]
    for body in (
        {"inputs": ROWS},
        {"inputs": {"input": ROWS}, "signature_name": "serving_default"},
    ):
        result = client.simulate_post("/predict", json=body)
        assert result.status_code == 200, result.text
        assert result.json["outputs"] == {
            "label": [r["label"] for r in rows],
            "probabilities": [r["probabilities"] for r in rows],
        }
        assert result.json["model_version"] == "2"
    single = extra_client.simulate_post(
        "/v1/models/plain:predict", json={"inputs": [[1.0, 2.0, 4.0], [4.0, 0.0, 0.0]]}
    )
    assert single.json["outputs"] == [[1.5], [2.0]]  # one output: the tensor itself
    several = extra_client.simulate_post(
        "/v1/models/two_inputs:predict",
        json={"inputs": {"a": [[1, 2, 3]], "b": [[1, 1, 1]]}},
    )
    assert several.json["outputs"] == {"sum": [[2.0, 3.0, 4.0]], "diff": [[0.0, 1.0, 2.0]]}


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"inputs": {"a": [[1, 2, 3]]}}, 400, "exactly the keys ['a', 'b']"),
        ({"inputs": [[1, 2, 3]]}, 400, "exactly the keys ['a', 'b']"),
        ({"inputs": {"a": [[1, 2]], "b": [[1, 2]]}}, 400, "has shape [1, 2]"),
        ({"inputs": {"a": [[1, 2, 3]] * 65, "b": [[1, 2, 3]] * 65}}, 413, "the limit is 64"),
    ],
)
def test_bad_columnar_bodies(
    extra_client: TestClient, body: object, status: int, fragment: str
) -> None:
    result = extra_client.simulate_post("/v1/models/two_inputs:predict", json=body)
    assert_error(result, status, "INVALID_INPUT" if status == 400 else "PAYLOAD_TOO_LARGE")
    assert fragment in result.json["error"]
