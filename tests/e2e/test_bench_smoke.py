"""`make bench` in smoke mode: every configuration starts, answers correctly, and is measured.

Timings are not asserted here (speed claims live in the benchmark report); this only proves
that the benchmark and each peer still work.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

# MLServer and BentoML may be skipped with a message when they cannot be installed.
REQUIRED = (
    "floor",
    "floor-model",
    "floor-guarded",
    "fastapi",
    "fastapi-tuned",
    "appliance",
    "appliance-batched",
    "appliance-gthread",
    "appliance-nginx",
    "floor-model-nginx",
)


def test_bench_smoke() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "loadtests" / "bench.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    for config in REQUIRED:
        assert f"{config}: answered correctly" in out, out[-4000:]
    for peer in ("mlserver", "bentoml"):
        assert f"{peer}: answered correctly" in out or f"SKIP {peer}: cannot be installed" in out
    assert "| appliance |" in out  # the table was printed with the appliance in it
