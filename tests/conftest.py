"""Shared fixtures: real repositories of real ONNX files, loaded once per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import falcon.testing
import pytest

from app.metrics import Metrics
from app.models.repository import Repository
from app.settings import Settings, load_settings
from app.wsgi import build_repository, create_app
from tests import onnx_factory

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODELS = ROOT / "app" / "demo_models"
E2E = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tiers by place: tests/e2e starts real servers (``e2e``); everything else is ``unit``."""
    for item in items:
        item.add_marker(pytest.mark.e2e if item.path.is_relative_to(E2E) else pytest.mark.unit)


def wait_until(predicate: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Wait for ``predicate`` to hold (an event, not a guess at how long it takes)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.002)


def run_python(script: str, *args: str, timeout: float = 120) -> list[str]:
    """Run ``script`` in a fresh interpreter (for gevent's monkey patching, which cannot be
    undone) from the repository root; returns the words after ``>`` on its lines that start so
    (the script's own lines: log lines go to stdout too)."""
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return [line[2:] for line in result.stdout.splitlines() if line.startswith("> ")]


def make_settings(repository: Path, **sections: dict[str, Any]) -> Settings:
    """Settings from defaults (no file, no environment) with the given overrides."""
    overrides: dict[str, dict[str, Any]] = {"models": {"repository": str(repository)}}
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
    # /dev/null: an empty file, so a host-wide /etc/onnx-appliance/appliance.toml never leaks in.
    return load_settings(Path(os.devnull), env={}, overrides=overrides)


@pytest.fixture(scope="session")
def demo_settings() -> Settings:
    return make_settings(DEMO_MODELS, models={"default_model": "tabular"})


@pytest.fixture(scope="session")
def demo_metrics() -> Metrics:
    return Metrics()


@pytest.fixture(scope="session")
def demo_repository(demo_settings: Settings, demo_metrics: Metrics) -> Repository:
    repository = build_repository(demo_settings, demo_metrics)
    repository.load()
    return repository


@pytest.fixture
def client(
    demo_settings: Settings, demo_repository: Repository, demo_metrics: Metrics
) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(demo_settings, demo_repository, demo_metrics))


@pytest.fixture(scope="session")
def extra_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with the test models: every datatype, fixed dims, two inputs."""
    root = tmp_path_factory.mktemp("repo")
    onnx_factory.save(onnx_factory.identity_all_types(), root, "all_types")
    onnx_factory.save(onnx_factory.fixed_shape(), root, "fixed")
    onnx_factory.save(onnx_factory.two_inputs(), root, "two_inputs")
    onnx_factory.save(onnx_factory.features_to_result(), root, "plain")
    shutil.copytree(DEMO_MODELS / "tabular", root / "tabular")
    return root


@pytest.fixture(scope="session")
def extra_settings(extra_models_dir: Path) -> Settings:
    return make_settings(
        extra_models_dir, limits={"max_batch_rows": 64, "max_tensor_elements": 100_000}
    )


@pytest.fixture(scope="session")
def extra_repository(extra_settings: Settings) -> Repository:
    repository = build_repository(extra_settings)
    repository.load()
    return repository


@pytest.fixture
def extra_client(
    extra_settings: Settings, extra_repository: Repository
) -> Iterator[falcon.testing.TestClient]:
    yield falcon.testing.TestClient(create_app(extra_settings, extra_repository))


@pytest.fixture(scope="session")
def text_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with the real MiniLM text model (built from its package's weights)."""
    sys.path.insert(0, str(ROOT / "packaging" / "text"))
    import build_minilm

    root = tmp_path_factory.mktemp("text-repo")
    build_minilm.build(root)
    shutil.copytree(DEMO_MODELS / "tabular", root / "tabular")
    return root


@pytest.fixture(scope="session")
def text_repository(text_models_dir: Path) -> Repository:
    repository = build_repository(make_settings(text_models_dir))
    repository.load()
    return repository


@pytest.fixture
def text_client(text_models_dir: Path, text_repository: Repository) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(make_settings(text_models_dir), text_repository))


@pytest.fixture(scope="session")
def generation_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with the real SmolLM2 generation model (built from its package's GGUF)."""
    sys.path.insert(0, str(ROOT / "packaging" / "text"))
    import build_smollm

    root = tmp_path_factory.mktemp("generation-repo")
    build_smollm.build(root)
    return root


@pytest.fixture(scope="session")
def generation_repository(generation_models_dir: Path) -> Repository:
    repository = build_repository(make_settings(generation_models_dir))
    repository.load()
    return repository


@pytest.fixture
def generation_client(
    generation_models_dir: Path, generation_repository: Repository
) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(
        create_app(make_settings(generation_models_dir), generation_repository)
    )
