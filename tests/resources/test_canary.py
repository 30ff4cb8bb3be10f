"""Traffic splits between versions: weighted, sticky per request id, pinned when asked."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import falcon.testing
import pytest

from app.metrics import Metrics
from app.wsgi import build_repository, create_app
from tests.conftest import DEMO_MODELS, make_settings

GOOD = {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [0.5] * 30}]}


@pytest.fixture(scope="module")
def canary(tmp_path_factory: pytest.TempPathFactory) -> falcon.testing.TestClient:
    root = tmp_path_factory.mktemp("canary")
    shutil.copytree(DEMO_MODELS / "tabular", root / "tabular")
    (root / "tabular" / "model.toml").write_text('traffic = { "1" = 90, "2" = 10 }\n')
    settings = make_settings(root)
    metrics = Metrics()
    repository = build_repository(settings, metrics)
    repository.load()
    return falcon.testing.TestClient(create_app(settings, repository, metrics))


def test_split_is_90_10_within_3_points(canary: falcon.testing.TestClient) -> None:
    served = Counter()
    for i in range(2000):
        result = canary.simulate_post(
            "/v2/models/tabular/infer", json=GOOD, headers={"X-Request-ID": f"split-{i}"}
        )
        assert result.headers["X-Model-Version"] == result.json["model_version"]
        served[result.json["model_version"]] += 1
    share = served["1"] / 2000
    assert 0.87 <= share <= 0.93, served
    text = canary.simulate_get("/metrics").text
    for version, count in served.items():
        line = next(
            x
            for x in text.splitlines()
            if x.startswith("onnx_appliance_requests_total")
            and 'route="/v2/models/{model}/infer"' in x
            and f'version="{version}"' in x
        )
        assert float(line.rsplit(" ", 1)[1]) == count


def test_same_request_id_always_lands_on_the_same_version(
    canary: falcon.testing.TestClient,
) -> None:
    for i in range(50):
        versions = {
            canary.simulate_post(
                "/v1/models/tabular:predict",
                json={"instances": [[0.5] * 30]},
                headers={"X-Request-ID": f"sticky-{i}"},
            ).json["model_version"]
            for _ in range(5)
        }
        assert len(versions) == 1


def test_pinned_version_ignores_the_split(canary: falcon.testing.TestClient) -> None:
    for i in range(50):
        result = canary.simulate_post(
            "/v2/models/tabular/versions/2/infer", json=GOOD, headers={"X-Request-ID": f"pin-{i}"}
        )
        assert result.json["model_version"] == "2"


@pytest.mark.parametrize(
    ("traffic", "fragment"),
    [
        ('traffic = { "3" = 10 }', "does not exist"),
        ('traffic = { "1" = -1, "2" = 5 }', "negative"),
        ('traffic = { "1" = 0 }', "add up to 0"),
        ('traffic = { "x" = 1 }', "does not exist"),
    ],
)
def test_bad_splits_are_refused(tmp_path: Path, traffic: str, fragment: str) -> None:
    from app.models.errors import RepositoryError

    shutil.copytree(DEMO_MODELS / "tabular", tmp_path / "tabular")
    (tmp_path / "tabular" / "model.toml").write_text(traffic + "\n")
    with pytest.raises(RepositoryError, match=fragment):
        build_repository(make_settings(tmp_path))
