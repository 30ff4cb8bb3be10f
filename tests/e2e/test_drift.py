"""Input drift on a real server (two workers): a reference captured with the CLI from good
traffic, a low score while traffic stays alike and a high one once it shifts, sampled payloads
redacted in rotated files, and statistics that survive a reload."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

from tests import onnx_factory
from tests.conftest import wait_until
from tests.e2e.conftest import CLI, Clients, Server, run_server, scrape, wait_for_event


@pytest.fixture(scope="module")
def drift_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("drift")
    models = tmp / "models"
    onnx_factory.save(onnx_factory.classifier(), models, "clf", 1)
    (models / "clf" / "model.toml").write_text(
        "[drift]\nwindow_s = 2\n[drift.capture]\npercent = 100\nmax_file_mib = 1\n"
        'max_files = 2\nredact = ["x"]\n'
    )
    with run_server(
        tmp,
        models=models,
        models_conf=f'drift_dir = "{tmp / "drift"}"\ncapture_dir = "{tmp / "capture"}"',
    ) as server:
        server.extra.update(config=tmp / "appliance.toml", tmp=tmp)
        yield server


#: Every Traffic of this module (one server): their requests are all the rows it saw.
SENT: list[Traffic] = []


class Traffic(Clients):
    """Two clients sending 8 rows of N(shift, 1) per request until stopped (at most 60 s)."""

    def __init__(self, server: Server, shift: float) -> None:
        super().__init__(2)
        self._url = f"{server.url}/v2/models/clf/infer"
        self._shift = shift
        self.statuses: list[int] = []
        SENT.append(self)

    def send(self, index: int) -> None:
        rng = np.random.default_rng(index)
        session = requests.Session()
        while self.running():
            rows = rng.normal(self._shift, 1.0, (8, 2)).round(4).tolist()
            body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [8, 2], "data": rows}]}
            self.statuses.append(session.post(self._url, json=body, timeout=30).status_code)
            time.sleep(0.005)


def _score(server: Server) -> float:
    scores = scrape(server, "onnx_appliance_input_drift")
    return scores.get(("input=x", "model=clf", "version=1"), -1.0)


def test_a_shift_in_the_inputs_shows_in_the_score(drift_server: Server) -> None:
    config = str(drift_server.extra["config"])
    with Traffic(drift_server, 0.0) as good:
        time.sleep(1)
        captured = subprocess.run(
            [CLI, "drift", "clf", "--capture-reference", "3", "--config", config],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert captured.returncode == 0, captured.stderr
        reference = json.loads((drift_server.extra["tmp"] / "drift" / "clf.json").read_text())
        x = reference["inputs"]["x"]
        # N(0, 1) draws, hundreds of them: mean near 0, spread near 1.
        assert abs(x["0"]["mean"]) < 0.3 and 0.8 < x["0"]["std"] < 1.2
        wait_until(lambda: 0 <= _score(drift_server) < 1, "a low score on alike traffic")
    with Traffic(drift_server, 4.0) as shifted:
        wait_until(lambda: _score(drift_server) > 3, "a high score once shifted", timeout=30)
    assert set(good.statuses) == set(shifted.statuses) == {200}
    shown = subprocess.run(
        [CLI, "drift", "clf", "--show", "--config", config],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    scores = json.loads(shown.stdout)["scores"]
    assert scores[0]["input"] == "x" and scores[0]["score"] > 3


def test_captured_payloads_are_redacted_and_bounded(drift_server: Server) -> None:
    with Traffic(drift_server, 0.0):
        time.sleep(2)
    files = sorted((drift_server.extra["tmp"] / "capture" / "clf").glob("*.jsonl"))
    assert files and len(files) <= 2 * 2  # two per worker at most once they rotate
    lines = [json.loads(line) for f in files for line in f.read_text().splitlines() if line]
    assert lines and {line["inputs"]["x"] for line in lines} == {"[redacted]"}
    assert all(f.stat().st_size <= 1 << 20 for f in files)


def test_no_input_row_is_lost_across_a_reload(drift_server: Server) -> None:
    with Traffic(drift_server, 0.0):
        time.sleep(1.5)
    drift_server.process.send_signal(signal.SIGHUP)
    wait_for_event(drift_server, "reload_complete", count=1)
    metrics_dir: Path = drift_server.metrics_dir
    # The old workers hand over what they gathered in their last second as they exit, and
    # their counters and summed gauges are folded into the archives.
    sent = 8 * sum(len(t.statuses) for t in SENT)

    def counted() -> float:
        rows = scrape(drift_server, "onnx_appliance_input_rows_total")
        return rows.get(("feature=0", "input=x", "model=clf", "version=1"), 0.0)

    wait_until((metrics_dir / "gauge_sum_archive.db").exists, "the archive")
    wait_until(lambda: counted() == sent, f"{sent} rows counted", timeout=30)
    sums = scrape(drift_server, "onnx_appliance_input_sum")
    assert sums and all(np.isfinite(v) for v in sums.values())
