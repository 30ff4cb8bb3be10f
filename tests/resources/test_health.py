"""Readiness follows the repository: 503 until every model is loaded and warmed up."""

from __future__ import annotations

import shutil
from pathlib import Path

import falcon.testing

from app.models.onnx import ModelState
from app.wsgi import build_repository, create_app
from tests.conftest import DEMO_MODELS, make_settings


def test_ready_flips_only_after_load_and_warmup(tmp_path: Path) -> None:
    shutil.copytree(DEMO_MODELS / "tabular", tmp_path / "tabular")
    settings = make_settings(tmp_path)
    repository = build_repository(settings)
    client = falcon.testing.TestClient(create_app(settings, repository))

    before = client.simulate_get("/v2/health/ready")
    assert before.status_code == 503
    assert before.json["error_code"] == "MODEL_NOT_READY"
    assert before.headers["Retry-After"] == "1"
    assert client.simulate_get("/v2/health/live").status_code == 200
    model_ready = client.simulate_get("/v2/models/tabular/ready")
    assert model_ready.status_code == 503
    index = client.simulate_post("/v2/repository/index").json
    assert {m["state"] for m in index} == {"UNAVAILABLE"}

    first = next(repository.models())
    first.load()  # one of two versions ready: still not ready overall
    assert client.simulate_get("/readyz").status_code == 503

    warmups: list[str] = []
    for model in repository.models():
        original = model.warmup

        def spy(model=model, original=original) -> None:  # type: ignore[no-untyped-def]
            assert model.state is ModelState.LOADING  # not ready while warming up
            warmups.append(model.label)
            original()

        model.warmup = spy  # type: ignore[method-assign]
    repository.load()
    assert warmups == ["tabular/1", "tabular/2"]
    assert client.simulate_get("/readyz").status_code == 200
    assert client.simulate_get("/v2/models/tabular/ready").status_code == 200
