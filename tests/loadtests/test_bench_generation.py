"""The generation benchmark's harness, run small against the real appliance (no peer)."""

from pathlib import Path

import pytest

from loadtests import bench_generation

pytestmark = pytest.mark.e2e


def test_a_small_run_reports_both_concurrencies_and_the_ceiling(tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    assert (
        bench_generation.main(["--no-peer", "--rounds", "1", "--tokens", "6", "--out", str(out)])
        == 0
    )
    report = out.read_text()
    rows = [line for line in report.splitlines() if line.startswith("| appliance |")]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[2]) > 0  # tokens/s aggregate
        assert cells[-1] == "6"  # every answer had its 6 tokens
    assert "In-process ceiling" in report
    assert "llama-cpp-python was not measured: --no-peer" in report
