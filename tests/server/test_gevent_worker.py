"""The gevent worker class: start-up cost of its monkey patching."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

SCRIPT = """
import importlib.metadata as md
calls = []
counted = md.entry_points
def counting(**params):
    calls.append(params)
    return counted(**params)
md.entry_points = counting
from gevent import monkey
from app.server.gevent_worker import GeventWorker
worker = object.__new__(GeventWorker)
worker.sockets = []
worker.patch()
print(">", len(calls), monkey.is_module_patched("socket"), md.entry_points is counting)
"""


def test_patching_reads_the_entry_points_once() -> None:
    # gevent scans every installed package for plugins around each patched module (25 times);
    # the worker answers those scans from one read, and puts importlib back afterwards.
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("> "))
    assert line.split()[1:] == ["1", "True", "True"], result.stdout
