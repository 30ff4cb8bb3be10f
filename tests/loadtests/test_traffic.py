"""The drills' traffic pool (loadtests/traffic.py): pacing under a rate."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from loadtests.traffic import Traffic

CA = Path("ca.pem")


def test_a_rate_spaces_the_starts_of_all_clients_together(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ssl.SSLContext.load_verify_locations", lambda *a, **k: None)  # no CA
    traffic = Traffic("127.0.0.1", 1, "localhost", CA, "/", b"{}", threads=4, rate=100)
    waits = [traffic._wait_turn() for _ in range(5)]
    assert waits[0] == pytest.approx(0, abs=0.002)
    # Each claim is one interval after the previous one, whichever client claims it.
    assert [b - a for a, b in itertools.pairwise(waits)] == pytest.approx([0.01] * 4, abs=0.002)
