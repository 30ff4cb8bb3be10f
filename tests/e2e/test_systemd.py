"""The systemd units render, verify cleanly and stay within the exposure budget."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests.templates import render
from tests.conftest import ROOT

UNITS = ("onnx-appliance.service", "onnx-appliance.socket")


@pytest.fixture(scope="module", params=["", "/var/lib/onnx-appliance/capture"])
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The units as Ansible renders them, without and with a payload capture folder."""
    out = tmp_path_factory.mktemp("units")
    variables = {
        "onnx_appliance_capture_dir": request.param,
        "onnx_appliance_venv": str(Path(sys.executable).parents[1]),
        # An ordinary system user that exists here (Ansible creates onnx-appliance).
        "onnx_appliance_user": "www-data",
        "onnx_appliance_socket_group": "www-data",
        "onnx_appliance_socket_path": "/run/onnx-appliance/app.sock",
        "onnx_appliance_config_path": "/etc/onnx-appliance/appliance.toml",
        "onnx_appliance_config_dir": "/etc/onnx-appliance",
        "onnx_appliance_models_dir": "/var/lib/onnx-appliance/models",
        "onnx_appliance_graceful_timeout": 30,
        "onnx_appliance_tasks_max": 4096,
    }
    for unit in UNITS:
        (out / unit).write_text(render(ROOT / "systemd" / f"{unit}.j2", **variables))
    (out / "capture_dir").write_text(request.param)
    return out


def test_units_verify_without_complaint(rendered: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", *(str(rendered / u) for u in UNITS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_exposure_is_at_most_2_5(rendered: Path) -> None:
    result = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=true",
            "--no-pager",
            str(rendered / "onnx-appliance.service"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for onnx-appliance.service: ([\d.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.5, result.stdout


def test_stop_timeout_outlasts_the_graceful_timeout(rendered: Path) -> None:
    service = (rendered / "onnx-appliance.service").read_text()
    assert "TimeoutStopSec=45" in service
    assert "OOMPolicy=continue" in service
    assert "bin/onnx-appliance reload --pid $MAINPID" in service


def test_only_the_capture_folder_is_writable(rendered: Path) -> None:
    service = (rendered / "onnx-appliance.service").read_text()
    writable = re.findall(r"^ReadWritePaths=(.*)$", service, re.M)
    assert "ProtectSystem=strict" in service
    capture = (rendered / "capture_dir").read_text()
    assert writable == ([capture] if capture else [])
