"""`make dist`: the artifact installs with no package index, idempotently, keeping old versions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.conftest import DEMO_MODELS, ROOT

sys.path.insert(0, str(ROOT / "packaging"))
import dist

pytestmark = pytest.mark.slow


def offline_env() -> dict[str, str]:
    """No pip configuration, find-links or index: only what the artifact carries."""
    keep = {
        k: v
        for k, v in os.environ.items()
        if k in ("PATH", "HOME", "PYENV_VERSION", "PYENV_ROOT", "LANG")
    }
    return keep | {
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_NO_INDEX": "1",
        "PYTHON": shutil.which("python3") or "python3",
    }


def install(stage: Path, prefix: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(stage / "install.sh"), str(prefix)],
        env=offline_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    tarball = dist.build(out)
    digest = (out / f"{tarball.name}.sha256").read_text().split()[0]
    assert digest == dist.sha256(tarball)
    unpacked = tmp_path_factory.mktemp("unpacked")
    with tarfile.open(tarball) as tar:
        tar.extractall(unpacked, filter="data")
    (stage,) = unpacked.iterdir()
    return stage


def test_installs_offline_and_serves(artifact: Path, tmp_path: Path) -> None:
    manifest = json.loads((artifact / "MANIFEST.json").read_text())
    assert any(name.startswith("wheels/onnxruntime-") for name in manifest["files"])
    result = install(artifact, tmp_path)
    assert result.returncode == 0, result.stderr
    current = tmp_path / "current"
    assert str(current.readlink()) == f"releases/{manifest['version']}"
    check = subprocess.run(
        [str(current / "venv" / "bin" / "onnx-appliance"), "check", str(DEMO_MODELS)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    assert "ok: 5 model(s)" in check.stdout
    # The C request parser, built into the artifact from its source (no Linux wheel exists).
    assert any(name.startswith("wheels/gunicorn_h1c-") for name in manifest["files"])
    parser = subprocess.run(
        [str(current / "venv" / "bin" / "python"), "-c", "import gunicorn_h1c"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert parser.returncode == 0, parser.stderr


def test_second_install_changes_nothing_and_new_versions_keep_old(
    artifact: Path, tmp_path: Path
) -> None:
    assert install(artifact, tmp_path).returncode == 0
    release = (
        tmp_path / "releases" / json.loads((artifact / "MANIFEST.json").read_text())["version"]
    )
    before = {p: p.stat().st_mtime_ns for p in release.rglob("*")}
    again = install(artifact, tmp_path)
    assert again.returncode == 0 and "already installed" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in release.rglob("*")} == before
    newer = tmp_path / "newer"
    shutil.copytree(artifact, newer)
    manifest = json.loads((newer / "MANIFEST.json").read_text())
    manifest["version"] = "99.0.0"
    (newer / "MANIFEST.json").write_text(json.dumps(manifest))
    assert install(newer, tmp_path).returncode == 0
    assert str((tmp_path / "current").readlink()) == "releases/99.0.0"
    assert release.is_dir() and (release / ".installed").exists()  # kept for rollback


def test_tampered_artifact_is_refused(artifact: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(artifact, bad)
    wheel = next((bad / "wheels").glob("structlog-*.whl"))
    wheel.write_bytes(wheel.read_bytes() + b"x")
    result = install(bad, tmp_path / "prefix")
    assert result.returncode != 0
    assert "does not match MANIFEST.json" in result.stderr
    assert not (tmp_path / "prefix").exists()
