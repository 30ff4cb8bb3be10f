"""The ``onnx-appliance`` command: help, check, and start-up refusals as one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests import onnx_factory
from tests.conftest import DEMO_MODELS

CLI = [str(Path(sys.executable).with_name("onnx-appliance"))]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_help_explains_each_subcommand() -> None:
    out = run("--help").stdout
    for command in ("serve", "check", "version"):
        assert command in out
    serve_help = run("serve", "--help").stdout
    for flag in (
        "--config",
        "--model-dir",
        "--model",
        "--bind",
        "--workers",
        "--intra-op-threads",
        "--cpu-affinity",
        "--control-socket",
    ):
        assert flag in serve_help


def test_check_prints_every_signature() -> None:
    result = run("check", str(DEMO_MODELS))
    assert result.returncode == 0, result.stderr
    assert "tabular version 2 (default): ready" in result.stdout
    assert "input  text: BYTES [-1, 1]" in result.stdout
    assert "output logits: FP32 [-1, 10]" in result.stdout
    assert "ok: 4 model(s), 5 version(s)" in result.stdout


def test_check_refuses_a_bad_repository(tmp_path: Path) -> None:
    onnx_factory.save(onnx_factory.with_external_data("../../etc/passwd"), tmp_path, "evil")
    result = run("check", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.startswith("onnx-appliance: error: ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("config", "args", "fragment"),
    [
        ("[server]\nworkers = 'x'\n", [], "server.workers"),
        ("[server]\nunknown = 1\n", [], "unknown"),
        ("", ["--model-dir", "/nonexistent/models"], "models.repository"),
        ("", ["--model", "/nonexistent/model.onnx"], "does not exist"),
    ],
)
def test_serve_refuses_bad_settings_in_one_line(
    tmp_path: Path, config: str, args: list[str], fragment: str
) -> None:
    path = tmp_path / "appliance.toml"
    path.write_text(f'[models]\nrepository = "{DEMO_MODELS}"\n' + config)
    result = run("serve", "--config", str(path), *args)
    assert result.returncode == 2
    assert fragment in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_repository_with_escaping_data(tmp_path: Path) -> None:
    onnx_factory.save(onnx_factory.with_external_data("/etc/passwd"), tmp_path, "evil")
    result = run("serve", "--model-dir", str(tmp_path), "--bind", "127.0.0.1:0")
    assert result.returncode == 2
    assert "external data" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_version() -> None:
    assert run("version").stdout.startswith("onnx-appliance ")
