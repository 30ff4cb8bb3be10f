"""The ``onnx-appliance`` command: help, check, and start-up refusals as one clear line."""

from __future__ import annotations

import contextlib
import http.server
import json
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.settings import thread_limit
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
    assert "ok: 5 model(s), 6 version(s)" in result.stdout


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
    result = run("serve", "--model-dir", str(tmp_path), "--bind", "127.0.0.1:8000")
    assert result.returncode == 2
    assert "external data" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_version() -> None:
    assert run("version").stdout.startswith("onnx-appliance ")


@pytest.mark.parametrize(
    "limit",
    [
        ["--burst", "0"],
        ["--burst", "-5"],
        ["--rate", "-1"],
        ["--rate", "nan"],
        ["--rate", "inf"],
        ["--rate", "1e-320"],
    ],
)
def test_keys_add_refuses_limits_that_would_break_the_next_start(
    tmp_path: Path, limit: list[str]
) -> None:
    keys = tmp_path / "api-keys"
    assert run("keys", "--file", str(keys), "add", "good").returncode == 0
    before = keys.read_text()
    result = run("keys", "--file", str(keys), "add", "typo", *limit)
    assert result.returncode == 2
    assert result.stdout == ""  # no key printed: none was made
    assert len(result.stderr.strip().splitlines()) == 1
    assert "is invalid" in result.stderr
    assert keys.read_text() == before
    listing = run("keys", "--file", str(keys), "list")
    assert listing.returncode == 0
    assert listing.stdout.startswith("good\t")


def test_check_config_validates_a_settings_file_with_the_servers_code(tmp_path: Path) -> None:
    path = tmp_path / "appliance.toml"
    path.write_text('[models]\nrepository = "models-not-there-yet"\n[auth]\nrate = 5.0\n')
    ok = run("check-config", str(path))
    assert ok.returncode == 0, ok.stderr
    for bad, fragment in (
        ("[auth]\nrate = nan\n", "auth.rate"),
        ("[server]\nintra_op_threads = 100000\n", "server.intra_op_threads"),
        ('[server]\nbind = ["0.0.0.0:80"]\n', "loopback"),
    ):
        path.write_text(bad)
        result = run("check-config", str(path))
        assert result.returncode == 2
        assert fragment in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_check_shows_the_traffic_split_instead_of_a_default(tmp_path: Path) -> None:
    shutil.copytree(DEMO_MODELS / "tabular", tmp_path / "tabular")
    (tmp_path / "tabular" / "model.toml").write_text('traffic = {"1" = 90, "2" = 10}\n')
    result = run("check", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "tabular version 1 (traffic 90%): ready" in result.stdout
    assert "tabular version 2 (traffic 10%): ready" in result.stdout
    assert "(default)" not in result.stdout


@pytest.mark.parametrize("folder", ["0", "abc", "01", "-1"])
def test_check_refuses_a_folder_that_is_not_a_version(tmp_path: Path, folder: str) -> None:
    shutil.copytree(DEMO_MODELS / "regression", tmp_path / "regression")
    shutil.copytree(DEMO_MODELS / "regression" / "1", tmp_path / "regression" / folder)
    result = run("check", str(tmp_path))
    assert result.returncode == 2
    assert f"folder {folder!r} that is not a version" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_check_refuses_thread_counts_beyond_the_bound(tmp_path: Path) -> None:
    shutil.copytree(DEMO_MODELS / "regression", tmp_path / "regression")
    (tmp_path / "regression" / "model.toml").write_text("intra_op_threads = 100000\n")
    result = run("check", str(tmp_path), timeout=30)
    assert result.returncode == 2
    assert f"intra_op_threads = 100000 is invalid: must be from 1 to {thread_limit()}" in (
        result.stderr
    )


@pytest.mark.parametrize(
    ("bind", "fragment"),
    [
        ("127.0.0.1:99999", "port 99999"),
        ("0.0.0.0:8000", "not a loopback address"),
        ("[::]:8000", "not a loopback address"),
        ("example.com:8000", "not a loopback address"),
    ],
)
def test_serve_refuses_bad_bind_addresses_in_one_line(bind: str, fragment: str) -> None:
    result = run("serve", "--model-dir", str(DEMO_MODELS), "--bind", bind, timeout=30)
    assert result.returncode == 2
    assert fragment in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_serve_says_in_one_line_when_it_cannot_listen(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        result = run("serve", "--model-dir", str(DEMO_MODELS), "--bind", f"127.0.0.1:{port}")
        took = time.monotonic() - start
    assert result.returncode == 2
    assert result.stderr == (
        f"onnx-appliance: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    )
    assert took < 5  # gunicorn alone retries for five seconds
    config = tmp_path / "appliance.toml"
    config.write_text(
        f'[server]\nallow_non_loopback = true\nbind = ["no-such-host.invalid:8000"]\n'
        f'[models]\nrepository = "{DEMO_MODELS}"\n'
    )
    result = run("serve", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.startswith(
        "onnx-appliance: error: cannot listen on no-such-host.invalid:8000: "
    )
    assert len(result.stderr.strip().splitlines()) == 1


class _Ready(http.server.BaseHTTPRequestHandler):
    """Answers readiness like the app: 200, or 503 once ``ready`` is cleared."""

    ready = True

    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/v2/health/ready" and self.ready else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


class _UnixHTTPServer(socketserver.UnixStreamServer):
    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        request, _ = super().get_request()
        return request, ("local", 0)  # BaseHTTPRequestHandler wants a (host, port)


@contextlib.contextmanager
def _serving(server: socketserver.BaseServer) -> Iterator[None]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_health_asks_the_first_bind_address_for_readiness(tmp_path: Path) -> None:
    config = tmp_path / "appliance.toml"
    with http.server.HTTPServer(("127.0.0.1", 0), _Ready) as tcp, _serving(tcp):
        port = tcp.server_address[1]
        # A wildcard host is asked on loopback.
        config.write_text(f'[server]\nbind = ["0.0.0.0:{port}"]\nallow_non_loopback = true\n')
        result = run("health", "--config", str(config))
        assert (result.returncode, result.stdout) == (0, f"ready on 0.0.0.0:{port}\n")
        _Ready.ready = False
        try:
            result = run("health", "--config", str(config))
        finally:
            _Ready.ready = True
        assert result.returncode == 1
        assert result.stderr == f"onnx-appliance: not ready on 0.0.0.0:{port}: HTTP 503\n"
    path = tmp_path / "app.sock"
    with _UnixHTTPServer(str(path), _Ready) as unix, _serving(unix):
        config.write_text(f'[server]\nbind = ["unix:{path}", "127.0.0.1:1"]\n')
        result = run("health", "--config", str(config))
        assert (result.returncode, result.stdout) == (0, f"ready on unix:{path}\n")
    result = run("health", "--config", str(config), "--timeout", "2")
    assert result.returncode == 1
    assert result.stderr.startswith(f"onnx-appliance: not answering on unix:{path}: ")
    assert len(result.stderr.splitlines()) == 1


def test_health_refuses_bad_settings_with_status_2(tmp_path: Path) -> None:
    config = tmp_path / "appliance.toml"
    config.write_text('[server]\nbind = ["10.1.2.3:80"]\n')
    result = run("health", "--config", str(config))
    assert result.returncode == 2
    assert "not a loopback address" in result.stderr
    config.write_text("")
    result = run("health", "--config", str(config), "--timeout", "0")
    assert (result.returncode, len(result.stderr.splitlines())) == (2, 1)


def test_check_keeps_serving_contracts(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    shutil.copytree(DEMO_MODELS / "tabular", repository / "tabular")
    shutil.copytree(DEMO_MODELS / "regression", repository / "regression")
    contract = tmp_path / "contract.json"
    first = run("check", str(repository), "--contract", str(contract))
    assert first.returncode == 0, first.stderr
    assert f"contract snapshot written to {contract}" in first.stdout
    assert set(json.loads(contract.read_text())["models"]) == {"regression", "tabular"}
    # A new version with the same contract passes.
    shutil.copytree(repository / "tabular" / "1", repository / "tabular" / "3")
    kept = run("check", str(repository), "--contract", str(contract))
    assert kept.returncode == 0 and "contracts kept" in kept.stdout, kept.stderr
    # A version whose output is renamed is refused in one line, and the snapshot stays.
    before = contract.read_text()
    onnx_factory.save(onnx_factory.features_to_result(), repository, "regression", 2)
    broken = run("check", str(repository), "--contract", str(contract))
    assert broken.returncode == 2
    assert broken.stderr.startswith(
        "onnx-appliance: error: model 'regression' version 2: input 'input' was removed (and "
    )
    assert "--accept-contract regression to accept it" in broken.stderr
    assert len(broken.stderr.strip().splitlines()) == 1
    assert contract.read_text() == before
    # The operator accepts it: the snapshot now records the new contract.
    accepted = run(
        "check", str(repository), "--contract", str(contract), "--accept-contract", "regression"
    )
    assert accepted.returncode == 0, accepted.stderr
    inputs = json.loads(contract.read_text())["models"]["regression"]["inputs"]
    assert [i["name"] for i in inputs] == ["features"]
    # A model that disappears is a break too.
    shutil.rmtree(repository / "regression")
    gone = run("check", str(repository), "--contract", str(contract))
    assert gone.returncode == 2 and "model 'regression' is no longer served" in gone.stderr


def test_check_refuses_an_unreadable_contract_in_one_line(tmp_path: Path) -> None:
    contract = tmp_path / "contract.json"
    contract.write_text("{not json")
    result = run("check", str(DEMO_MODELS), "--contract", str(contract))
    assert result.returncode == 2
    assert "contract snapshot" in result.stderr and "unreadable" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _rollout_config(tmp_path: Path, extra: str = "") -> Path:
    models = tmp_path / "models"
    for version in (1, 2):
        onnx_factory.save(onnx_factory.classifier(), models, "clf", version)
    (models / "clf" / "model.toml").write_text("default_version = 1\n")
    config = tmp_path / "appliance.toml"
    config.write_text(
        f'[server]\npidfile = "{tmp_path / "server.pid"}"\n'
        f'[models]\nrepository = "{models}"\nrollouts_dir = "{tmp_path / "rollouts"}"\n{extra}'
    )
    return config


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("clf", "--to", "3"), "has no version 3 (versions: 1, 2)"),
        (("nope", "--to", "2"), "model 'nope' is not served here"),
        (("clf", "--to", "1"), "needs a primary version other than 1"),
        (("clf", "--to", "2", "--from", "5"), "needs a primary version other than 2"),
        (("clf", "--to", "2", "--steps", "50,25,100"), "must rise at every step"),
        (("clf", "--to", "2", "--interval-s", "0"), "--interval-s 0 is out of range"),
        (("clf", "--to", "2", "--min-agreement", "1.5"), "--min-agreement 1.5 is out of range"),
        (("clf", "--to", "2", "--max-error-increase", "nan"), "out of range"),
    ],
)
def test_rollout_refuses_bad_input_with_one_line(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    config = _rollout_config(tmp_path)
    result = run("rollout", *args, "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "rollouts").exists()  # nothing written, nothing signalled


def test_rollout_needs_metrics_and_a_way_to_reload(tmp_path: Path) -> None:
    config = _rollout_config(tmp_path, "[metrics]\nenabled = false\n")
    result = run("rollout", "clf", "--to", "2", "--config", str(config))
    assert result.returncode == 2 and "metrics.enabled must be true" in result.stderr
    config.write_text(config.read_text().replace("[metrics]\nenabled = false\n", ""))
    config.write_text(config.read_text().replace(f'pidfile = "{tmp_path / "server.pid"}"', ""))
    result = run("rollout", "clf", "--to", "2", "--config", str(config))
    assert result.returncode == 2 and "no way to reload the server" in result.stderr


def test_rollout_status_clear_and_a_second_candidate(tmp_path: Path) -> None:
    from app.models.rollout import Thresholds, state_path, write_state
    from app.rollout import new_state

    config = _rollout_config(tmp_path)
    onnx_factory.save(onnx_factory.classifier(), tmp_path / "models", "clf", 3)
    assert (
        "no rollout of 'clf'" in run("rollout", "clf", "--status", "--config", str(config)).stdout
    )
    path = state_path(tmp_path / "rollouts", "clf")
    write_state(path, new_state("clf", 1, 2, [10, 100], Thresholds()))
    status = run("rollout", "clf", "--status", "--config", str(config))
    assert json.loads(status.stdout)["status"] == "running"
    other = run("rollout", "clf", "--to", "3", "--config", str(config))
    assert other.returncode == 2 and "a rollout of 'clf' to version 2 is running" in other.stderr
    cleared = run("rollout", "clf", "--clear", "--config", str(config))
    assert cleared.returncode == 2 and "still running" in cleared.stderr
    path.write_text(path.read_text().replace('"running"', '"complete"'))
    assert run("rollout", "clf", "--clear", "--config", str(config)).returncode == 0
    assert not path.exists()
    # No server behind the pidfile: stopped with one line, the first step on record to resume.
    result = run("rollout", "clf", "--to", "2", "--config", str(config))
    assert result.returncode == 1 and "rollout stopped" in result.stderr
    assert json.loads(path.read_text())["step"] == 0


@pytest.mark.parametrize(
    ("args", "extra", "message"),
    [
        (("--capture-reference", "0.5"), "", "out of range 1..86400"),
        (("--capture-reference", "5", "--min-rows", "0"), "", "--min-rows 0 is out of range"),
        (("--show",), "[metrics]\nenabled = false\n", "metrics.enabled is off"),
    ],
)
def test_drift_refuses_bad_input_with_one_line(
    tmp_path: Path, args: tuple[str, ...], extra: str, message: str
) -> None:
    config = tmp_path / "appliance.toml"
    config.write_text(f'[models]\ndrift_dir = "{tmp_path / "drift"}"\n{extra}')
    result = run("drift", "clf", *args, "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr
