"""`make loadtest`: the Locust scenarios run headless against the appliance, SLOs checked.

By default it starts its own stack on loopback: the appliance (2 workers, the demo models with
a canary split on ``tabular``) behind NGINX with TLS, rendered from nginx/onnx-appliance.conf.j2
with a lab certificate. ``--host`` and ``--ca`` point it at a running deployment instead.
Each scenario of the SLO file runs for a bounded time; CSV and HTML reports go to
``bench/loadtest/<UTC time>/``. The exit status is 1 when any SLO is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loadtests.edge import run_edge  # noqa: E402

BIN = Path(sys.executable).parent
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
DEFAULT_SLO = ROOT / "loadtests" / "slo.toml"
DEMO_MODELS = ROOT / "app" / "demo_models"


def log(message: str) -> None:
    print(f"[loadtest {time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass
class Scenario:
    """One scenario of the SLO file and its objectives."""

    name: str
    user_class: str
    users: int
    user_rate: float
    run_time: str
    p95_ms: float
    p99_ms: float
    max_error_ratio: float
    min_rps: float
    canary_version: str = ""
    canary_share: float = 0.0
    canary_tolerance: float = 0.0


@dataclass
class Outcome:
    """What a scenario measured and which objectives it missed."""

    scenario: Scenario
    sent: int = 0
    failed: int = 0
    rps: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    canary: float | None = None
    checks: list[tuple[str, str, bool]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(ok for _, _, ok in self.checks)

    def line(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        parts = [
            f"{what} {measured}" + ("" if ok else " MISSED") for what, measured, ok in self.checks
        ]
        return f"{verdict} {self.scenario.name}: " + "; ".join(parts)


def load_slo(path: Path) -> list[Scenario]:
    """The scenarios of an SLO file, defaults applied; unknown keys are errors."""
    data = tomllib.loads(path.read_text())
    defaults = data.get("defaults", {})
    scenarios = []
    for name, table in data.get("scenario", {}).items():
        merged = {**defaults, **table}
        try:
            scenarios.append(Scenario(name=name, **merged))
        except TypeError as exc:
            raise SystemExit(f"{path}: scenario {name!r}: {exc}") from exc
    if not scenarios:
        raise SystemExit(f"{path}: no [scenario.*] tables")
    return scenarios


def _aggregated(stats_csv: Path) -> dict[str, str]:
    with stats_csv.open(newline="") as f:
        for row in csv.DictReader(f):
            if row["Name"] == "Aggregated":
                return row
    raise RuntimeError(f"{stats_csv}: no Aggregated row")


def judge(scenario: Scenario, stats: dict[str, str], versions: dict[str, int]) -> Outcome:
    """Compare one scenario's Locust statistics (and canary counts) with its objectives."""
    out = Outcome(scenario)
    out.sent = int(stats["Request Count"])
    out.failed = int(stats["Failure Count"])
    out.rps = float(stats["Requests/s"])
    out.p95_ms = float(stats["95%"] if stats["95%"] != "N/A" else "inf")
    out.p99_ms = float(stats["99%"] if stats["99%"] != "N/A" else "inf")
    ratio = out.failed / out.sent if out.sent else 1.0
    s = scenario
    out.checks = [
        ("p95", f"{out.p95_ms:g} ms <= {s.p95_ms:g} ms", out.p95_ms <= s.p95_ms),
        ("p99", f"{out.p99_ms:g} ms <= {s.p99_ms:g} ms", out.p99_ms <= s.p99_ms),
        (
            "errors",
            f"{out.failed}/{out.sent} = {ratio:.4%} <= {s.max_error_ratio:.4%}",
            out.sent > 0 and ratio <= s.max_error_ratio,
        ),
        ("throughput", f"{out.rps:.1f} req/s >= {s.min_rps:g} req/s", out.rps >= s.min_rps),
    ]
    if s.canary_version:
        total = sum(versions.values())
        out.canary = versions.get(s.canary_version, 0) / total if total else 0.0
        out.checks.append(
            (
                f"canary v{s.canary_version} share",
                f"{out.canary:.3f} of {total} = {s.canary_share:g} +/- {s.canary_tolerance:g}",
                total > 0 and abs(out.canary - s.canary_share) <= s.canary_tolerance,
            )
        )
    return out


def _seconds(run_time: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return float(run_time[:-1]) * units[run_time[-1]] if run_time[-1] in units else float(run_time)


def run_scenario(scenario: Scenario, host: str, ca: Path | None, out_dir: Path) -> Outcome:
    """Run one scenario headless with Locust (bounded by its run time) and judge it."""
    prefix = out_dir / scenario.name
    versions_file = out_dir / f"{scenario.name}_versions.json"
    env = dict(
        os.environ,
        LOADTEST_USER_RATE=str(scenario.user_rate),
        LOADTEST_VERSIONS_OUT=str(versions_file),
        PYTHONUNBUFFERED="1",
    )
    if ca is not None:
        env["LOADTEST_CA"] = str(ca)
    cmd = [
        str(BIN / "locust"),
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--only-summary",
        "--reset-stats",
        "--users",
        str(scenario.users),
        "--spawn-rate",
        str(scenario.users),
        "--run-time",
        scenario.run_time,
        "--stop-timeout",
        "10",
        "--host",
        host,
        "--csv",
        str(prefix),
        "--html",
        f"{prefix}.html",
        "--loglevel",
        "WARNING",
        scenario.user_class,
    ]
    log(
        f"{scenario.name}: {scenario.users} users x {scenario.user_rate:g} req/s "
        f"({scenario.user_class}) for {scenario.run_time} ..."
    )
    with (out_dir / f"{scenario.name}.log").open("wb") as output:
        subprocess.run(
            cmd,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            timeout=_seconds(scenario.run_time) + 90,
            check=False,
        )
    stats = prefix.with_name(f"{scenario.name}_stats.csv")
    if not stats.exists():
        raise RuntimeError(f"locust wrote no statistics; see {out_dir / scenario.name}.log")
    versions = json.loads(versions_file.read_text()) if versions_file.exists() else {}
    outcome = judge(scenario, _aggregated(stats), versions)
    log(outcome.line())
    return outcome


# -- the local stack ------------------------------------------------------------------------


def _ready(socket_path: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5)
            sock.connect(str(socket_path))
            conn = http.client.HTTPConnection("localhost", timeout=5)
            conn.sock = sock
            conn.request("GET", "/v2/health/ready")
            if conn.getresponse().status == 200:
                conn.close()
                return
            conn.close()
        time.sleep(0.1)
    raise RuntimeError("the appliance did not become ready")


def canary_repository(target: Path, scenarios: list[Scenario]) -> Path:
    """The demo repository, with the canary scenario's split on ``tabular``."""
    shutil.copytree(DEMO_MODELS, target)
    canary = next((s for s in scenarios if s.canary_version), None)
    if canary is not None:
        versions = sorted(p.name for p in (target / "tabular").iterdir() if p.name.isdigit())
        weight = round(canary.canary_share * 100)
        rest = [v for v in versions if v != canary.canary_version]
        split = {canary.canary_version: weight, rest[-1]: 100 - weight}
        toml = target / "tabular" / "model.toml"
        entries = ", ".join(f'"{v}" = {w}' for v, w in split.items())
        toml.write_text(toml.read_text() + f"traffic = {{ {entries} }}\n")
    return target


@contextlib.contextmanager
def local_stack(
    workdir: Path, scenarios: list[Scenario], workers: int
) -> Iterator[tuple[str, Path]]:
    """The appliance on a unix socket behind NGINX with TLS on loopback; yields (url, CA)."""
    repository = canary_repository(workdir / "models", scenarios)
    socket_path = workdir / "app.sock"
    config = workdir / "appliance.toml"
    config.write_text(
        f'[server]\nbind = ["unix:{socket_path}"]\nworkers = {workers}\n'
        f'runtime_dir = "{workdir / "run"}"\n'
        f'[models]\nrepository = "{repository}"\ndefault_model = "tabular"\n'
        f'[metrics]\nmultiproc_dir = "{workdir / "metrics"}"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONNX_APPLIANCE_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log(f"starting the appliance ({workers} workers) and NGINX with TLS in {workdir} ...")
    with (workdir / "appliance.log").open("wb") as output:
        process = subprocess.Popen(
            [str(BIN / "onnx-appliance"), "serve", "--config", str(config)],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        _ready(socket_path)
        with run_edge(
            workdir,
            str(socket_path),
            nginx_site_server_name="localhost",
            nginx_site_conn_limit=1000,
        ) as edge:
            yield f"https://localhost:{edge.https_port}", edge.ca
    finally:
        process.terminate()
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slo", type=Path, default=DEFAULT_SLO, help="SLO file (TOML)")
    parser.add_argument(
        "--scenario", action="append", default=[], help="run only this one (repeatable)"
    )
    parser.add_argument("--run-time", default="", help="override every scenario's run time")
    parser.add_argument("--out", type=Path, default=None, help="report folder")
    parser.add_argument("--host", default="", help="a running deployment, e.g. https://name")
    parser.add_argument("--ca", type=Path, default=None, help="CA file for --host")
    parser.add_argument("--workers", type=int, default=2, help="appliance workers (own stack)")
    args = parser.parse_args(argv)

    scenarios = load_slo(args.slo)
    if args.scenario:
        unknown = set(args.scenario) - {s.name for s in scenarios}
        if unknown:
            parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
        scenarios = [s for s in scenarios if s.name in args.scenario]
    for s in scenarios:
        if args.run_time:
            s.run_time = args.run_time
        _seconds(s.run_time)  # a bad duration fails here, before anything starts
    stamp = time.strftime("%Y-%m-%dT%H%M%SZ", time.gmtime())
    out_dir = args.out or ROOT / "bench" / "loadtest" / stamp
    out_dir.mkdir(parents=True, exist_ok=True)

    outcomes = []
    with contextlib.ExitStack() as stack:
        if args.host:
            host, ca = args.host, args.ca
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loadtest-")))
            host, ca = stack.enter_context(local_stack(workdir, scenarios, args.workers))
        for scenario in scenarios:
            outcomes.append(run_scenario(scenario, host, ca, out_dir))

    summary: dict[str, Any] = {
        "host": host,
        "slo": str(args.slo),
        "scenarios": {
            o.scenario.name: {
                "passed": o.passed,
                "sent": o.sent,
                "failed": o.failed,
                "rps": o.rps,
                "p95_ms": o.p95_ms,
                "p99_ms": o.p99_ms,
                "canary_share": o.canary,
                "checks": [{"slo": w, "measured": m, "ok": ok} for w, m, ok in o.checks],
            }
            for o in outcomes
        },
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print()
    for o in outcomes:
        print(o.line())
    passed = sum(o.passed for o in outcomes)
    verdict = "PASS" if passed == len(outcomes) else "FAIL"
    print(
        f"loadtest {verdict}: {passed}/{len(outcomes)} scenarios met their SLOs; reports: {out_dir}"
    )
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
