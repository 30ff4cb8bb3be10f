"""Real servers for end-to-end tests: the CLI starts gunicorn with real workers."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import DEMO_MODELS

CLI = str(Path(sys.executable).with_name("onnx-appliance"))
# One line per fault drill (requests sent, succeeded, failed), printed after the run.
DRILL_REPORTS: list[str] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if DRILL_REPORTS:
        terminalreporter.section("fault drills under load")
        for line in DRILL_REPORTS:
            terminalreporter.write_line(line)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket, the way NGINX will talk to the app."""

    def __init__(self, path: str, timeout: float = 10) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


@dataclass
class Server:
    """A running ``onnx-appliance serve`` process."""

    process: subprocess.Popen[bytes]
    port: int
    socket_path: str
    metrics_dir: Path
    log_path: Path
    started: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_lines(self) -> list[dict[str, Any]]:
        """Every complete stderr line, parsed; fails the test if one is not JSON."""
        return json_lines(self.log_path)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return int(self.process.returncode)


#: Where debootstrapped roots are kept between runs.
ROOTFS_CACHE = Path(
    os.environ.get("ONNX_APPLIANCE_ROOTFS_CACHE", Path.home() / ".cache" / "onnx-appliance")
)
# What a fresh Debian 12 VM image has (python3-apt lets Ansible run --check on it).
ROOTFS_PACKAGES = (
    "systemd,systemd-sysv,dbus,python3,python3-apt,python3-venv,curl,ca-certificates,openssl"
)


def base_rootfs() -> Path:
    """A minimal bookworm root, built once per package list and kept."""
    digest = hashlib.sha256(ROOTFS_PACKAGES.encode()).hexdigest()[:8]
    cache = ROOTFS_CACHE / f"rootfs-bookworm-{digest}"
    if (cache / ".complete").exists():
        return cache
    if cache.exists():
        shutil.rmtree(cache)
    cache.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={ROOTFS_PACKAGES}",
            "bookworm",
            str(cache),
            "http://deb.debian.org/debian",
        ],
        check=True,
        capture_output=True,
        timeout=1200,
    )
    (cache / ".complete").touch()
    return cache


def children(pid: int) -> list[int]:
    """The pids of a process's children (a gunicorn master's workers, nspawn's PID 1)."""
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def json_lines(path: Path) -> list[dict[str, Any]]:
    """A JSON-lines log's complete lines, parsed; fails the test if one is not JSON."""
    # The text after the last newline is a line still being written (or nothing).
    return [json.loads(raw) for raw in path.read_text().split("\n")[:-1]]


def wait_for_event(server: Server, event: str, count: int = 1, timeout: float = 60) -> None:
    """Wait until the server has logged ``event`` at least ``count`` times."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(1 for x in server.log_lines() if x.get("event") == event) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {count}x {event} in {timeout}s:\n{server.log_path.read_text()}")


def add_key(path: Path, key_id: str, *extra: str) -> str:
    """Add an API key to the keys file with the CLI; returns the key."""
    result = subprocess.run(
        [CLI, "keys", "--file", str(path), "add", key_id, *extra],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout.strip()


def wait_ready(server: Server, timeout: float = 90) -> float:
    """Poll readiness over TCP; return the time of the first 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"server exited early:\n{server.log_path.read_text()}")
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        try:
            conn.request("GET", "/v2/health/ready")
            if conn.getresponse().status == 200:
                return time.time()
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.05)
    raise AssertionError(f"server not ready in {timeout}s:\n{server.log_path.read_text()}")


@contextlib.contextmanager
def run_server(
    tmp: Path,
    *args: str,
    config: str = "",
    models: Path = DEMO_MODELS,
    workers: int = 2,
    wait: bool = True,
    server_conf: str = "",
    models_conf: str = "",
) -> Iterator[Server]:
    """Start the CLI with a config in ``tmp``; stop it (SIGTERM) afterwards.

    ``server_conf`` lines go into the ``[server]`` section, ``models_conf`` into ``[models]``,
    ``config`` after everything.
    """
    port = free_port()
    socket_path = str(tmp / "app.sock")
    metrics_dir = tmp / "metrics"
    config_path = tmp / "appliance.toml"
    config_path.write_text(
        f'[server]\nbind = ["127.0.0.1:{port}", "unix:{socket_path}"]\nworkers = {workers}\n'
        f"{server_conf}\n"
        f'[models]\nrepository = "{models}"\n{models_conf}\n'
        + ('default_model = "tabular"\n' if (models / "tabular").is_dir() else "")
        + f'[metrics]\nmultiproc_dir = "{metrics_dir}"\n'
        + config
    )
    log_path = tmp / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONNX_APPLIANCE_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with log_path.open("wb") as log:
        started = time.time()
        process = subprocess.Popen(
            [CLI, "serve", "--config", str(config_path), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    server = Server(process, port, socket_path, metrics_dir, log_path, started)
    try:
        if wait:
            server.extra["ready_at"] = wait_ready(server)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Two workers on the demo models, over TCP and a unix socket."""
    with run_server(tmp_path_factory.mktemp("server")) as running:
        yield running


class Clients:
    """``count`` client threads, each running :meth:`send` while :meth:`running` (until the
    block ends, or ``limit`` seconds at most)."""

    def __init__(self, count: int, limit: float = 60) -> None:
        self._stop = threading.Event()
        self._end = time.monotonic() + limit
        self._threads = [
            threading.Thread(target=self.send, args=(i,), daemon=True) for i in range(count)
        ]

    def running(self) -> bool:
        """Whether the clients should go on sending."""
        return not self._stop.is_set() and time.monotonic() < self._end

    def send(self, index: int) -> None:
        """What client ``index`` does (loop while :meth:`running`)."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def scrape(server: Server, name: str, **match: str) -> dict[tuple[str, ...], float]:
    """The samples called ``name`` in a scrape of ``server`` whose labels include ``match``,
    keyed by their other labels as sorted ``label=value`` strings (``()`` when none are left)."""
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        tuple(f"{k}={v}" for k, v in sorted(s.labels.items()) if k not in match): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in match.items())
    }
