"""The container image and its compose stack, built and run for real with podman.

The image is built from the `make dist` artifact on a Debian 12 base imported from the
debootstrapped root the appliance test makes (no registry is reachable here), then run: as
its own user, on a read-only root, models from a read-only volume, readiness through its
HEALTHCHECK, a prediction equal to onnxruntime's, a reload by SIGHUP and a graceful stop.
compose.yaml then runs with podman-compose, with an NGINX image built from Debian's nginx on
the same base standing in for the official one: HTTPS over HTTP/2 through NGINX to the app's
unix socket in the volume the two share.

podman here runs containers with runc and explicit limits (containers.conf below): crun
refuses a host with hybrid cgroups, and podman's default open-files limit is above this
host's hard limit, which an unprivileged setrlimit cannot raise.
"""

from __future__ import annotations

import json
import os
import resource
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from tests.conftest import DEMO_MODELS, ROOT, wait_until
from tests.e2e.conftest import base_rootfs, free_port

sys.path.insert(0, str(ROOT / "packaging"))
import container
import dist

pytestmark = [pytest.mark.root, pytest.mark.slow]

ROW = [0.5] * 30
PODMAN_COMPOSE = str(Path(sys.executable).with_name("podman-compose"))
NGINX_CONTAINERFILE = """ARG BASE
FROM ${BASE}
RUN apt-get update -qq \\
    && apt-get install -y -qq --no-install-recommends nginx >/dev/null \\
    && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/default \\
    && ln -sf /dev/stdout /var/log/nginx/access.log \\
    && ln -sf /dev/stderr /var/log/nginx/error.log
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
"""


def _limit(kind: int, wanted: int) -> str:
    hard = resource.getrlimit(kind)[1]
    value = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    return f"{value}:{value}"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment podman and podman-compose run with."""
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    nofile = _limit(resource.RLIMIT_NOFILE, 4096)
    nproc = _limit(resource.RLIMIT_NPROC, 4096)
    conf.write_text(
        f'[containers]\ndefault_ulimits = ["nofile={nofile}", "nproc={nproc}"]\n'
        '[engine]\nruntime = "runc"\n'
    )
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def podman(env: dict[str, str], *args: str, timeout: float = 600, check: bool = True) -> str:
    result = subprocess.run(
        ["podman", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {result.stdout}{result.stderr}")
    return result.stdout


def logs(env: dict[str, str], name: str) -> str:
    """What the container wrote (the app logs to stderr)."""
    result = subprocess.run(
        ["podman", "logs", name], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def base_image(engine: dict[str, str]) -> str:
    """Debian 12 imported from the cached debootstrapped root, once per root."""
    root = base_rootfs()
    tag = f"localhost/onnx-appliance-test-base:{root.name}"
    if subprocess.run(["podman", "image", "exists", tag], env=engine, check=False).returncode:
        tar = subprocess.Popen(
            ["tar", "-C", str(root), "--exclude=./.complete", "-c", "."], stdout=subprocess.PIPE
        )
        subprocess.run(
            ["podman", "import", "-", tag],
            stdin=tar.stdout,
            env=engine,
            capture_output=True,
            check=True,
            timeout=600,
        )
        assert tar.wait(timeout=60) == 0
    return tag


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`make container`'s folder: build context and compose stack, from a fresh artifact."""
    work = tmp_path_factory.mktemp("container")
    artifact = dist.build(work / "dist")
    return container.stage(work / "stack", artifact, server_name="appliance.test")


@pytest.fixture(scope="module")
def image(engine: dict[str, str], base_image: str, stack: Path) -> Iterator[str]:
    tag = f"localhost/onnx-appliance-test:{os.getpid()}"
    tool = container.build_image(stack, tag, base=base_image, tool="podman", env=engine)
    assert tool == "podman"
    yield tag
    podman(engine, "rmi", "-f", tag, check=False)


def _predict(url: str, context: ssl.SSLContext | None = None) -> dict[str, Any]:
    request = urllib.request.Request(
        url + "/v1/models/tabular:predict",
        data=json.dumps({"instances": [ROW]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=20, context=context) as response:
        return dict(json.loads(response.read()))


def _expected() -> list[float]:
    session = ort.InferenceSession(str(DEMO_MODELS / "tabular" / "2" / "model.onnx"))
    feeds = {session.get_inputs()[0].name: np.array([ROW], dtype=np.float32)}
    probabilities = session.run(None, feeds)[1]
    return [float(p) for p in probabilities[0]]


def test_image_serves_as_its_own_user_on_a_read_only_root(
    engine: dict[str, str], image: str, stack: Path
) -> None:
    name = f"onnx-appliance-test-{os.getpid()}"
    port = free_port()
    podman(
        engine, "run", "-d", "--name", name, "--read-only", "--tmpfs", "/tmp",
        "-v", f"{stack / 'models'}:/var/lib/onnx-appliance/models:ro",
        # Straight to the app for this check (compose puts NGINX in front): its own network
        # namespace, published on the host's loopback only.
        "-e", 'ONNX_APPLIANCE_SERVER__BIND=["0.0.0.0:8000"]',
        "-e", "ONNX_APPLIANCE_SERVER__ALLOW_NON_LOOPBACK=true",
        "-e", "ONNX_APPLIANCE_SERVER__WORKERS=2",
        "-p", f"127.0.0.1:{port}:8000", image,
    )  # fmt: skip
    try:
        config = json.loads(podman(engine, "inspect", name))[0]["Config"]
        assert config["Healthcheck"]["Test"] == [
            "CMD", "onnx-appliance", "health", "--timeout", "5"
        ]  # fmt: skip
        assert config["User"] == "onnx-appliance:onnx-appliance"
        assert config["StopSignal"] in (15, "SIGTERM")

        def healthy() -> bool:
            result = subprocess.run(
                ["podman", "healthcheck", "run", name], env=engine, capture_output=True, check=False
            )
            return result.returncode == 0

        wait_until(healthy, "the HEALTHCHECK to pass", timeout=120)
        answer = _predict(f"http://127.0.0.1:{port}")
        assert answer["model_version"] == "2"
        got = answer["predictions"][0]["probabilities"]
        assert np.allclose(got, _expected(), rtol=1e-6, atol=1e-7), (got, _expected())

        assert podman(engine, "exec", name, "id", "-u").strip() == "10001"
        for path in ("/opt/onnx-appliance/x", "/etc/x", "/var/lib/onnx-appliance/models/x"):
            touched = subprocess.run(
                ["podman", "exec", name, "touch", path],
                env=engine,
                capture_output=True,
                text=True,
                check=False,
            )
            assert touched.returncode != 0 and "Read-only file system" in touched.stderr, path

        # SIGHUP reloads without downtime, as under systemd.
        podman(engine, "kill", "--signal", "HUP", name)
        wait_until(lambda: "reload_complete" in logs(engine, name), "the reload", timeout=120)
        assert _predict(f"http://127.0.0.1:{port}")["model_version"] == "2"

        started = time.monotonic()
        podman(engine, "stop", "--time", "45", name, timeout=120)
        assert time.monotonic() - started < 30  # gracefully, not killed at the 45 s limit
        state = json.loads(podman(engine, "inspect", name))[0]["State"]
        assert state["ExitCode"] == 0
        written = logs(engine, name)
        lines = [json.loads(line) for line in written.splitlines() if line.startswith("{")]
        assert any(line["event"] == "Shutting down: Master" for line in lines)
        assert all(line["level"] != "error" for line in lines), written[-3000:]
    finally:
        podman(engine, "rm", "-f", name, check=False)


@pytest.fixture(scope="module")
def nginx_image(
    engine: dict[str, str], base_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """NGINX from Debian's package on the same base (the official image cannot be pulled)."""
    context = tmp_path_factory.mktemp("nginx-image")
    (context / "Containerfile").write_text(NGINX_CONTAINERFILE)
    tag = f"localhost/onnx-appliance-test-nginx:{os.getpid()}"
    podman(engine, "build", "--format", "docker", "-q", "--build-arg", f"BASE={base_image}",
           "-t", tag, str(context))  # fmt: skip
    yield tag
    podman(engine, "rmi", "-f", tag, check=False)


def test_compose_stack_serves_through_nginx_with_tls(
    engine: dict[str, str], image: str, nginx_image: str, stack: Path
) -> None:
    port = free_port()
    project = f"onnx-appliance-test-{os.getpid()}"
    env = {
        **engine,
        "ONNX_APPLIANCE_IMAGE": image,
        "ONNX_APPLIANCE_NGINX_IMAGE": nginx_image,
        "ONNX_APPLIANCE_PUBLISH_ADDRESS": "127.0.0.1",
        "ONNX_APPLIANCE_HTTPS_PORT": str(port),
        "ONNX_APPLIANCE_HTTP_PORT": str(free_port()),
    }

    def compose(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PODMAN_COMPOSE, "-p", project, *args],
            cwd=stack,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def curl(path: str, *extra: str) -> tuple[str, str]:
        """(status and HTTP version, body) of a request verified against the stack's cert."""
        result = subprocess.run(
            ["curl", "-sS", "--max-time", "20", "--http2",
             "--cacert", str(stack / "tls" / "onnx-appliance.crt"),
             "--resolve", f"appliance.test:{port}:127.0.0.1",
             "-w", "\n%{http_code} %{http_version}", *extra,
             f"https://appliance.test:{port}{path}"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        body, _, status = result.stdout.rpartition("\n")
        return status, body

    up = compose("up", "-d")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        # podman 4.3 cannot wait for the app's health before starting NGINX; until the app
        # listens NGINX answers 503 in the app's JSON error format.
        wait_until(
            lambda: curl("/v2/health/ready")[0] == "200 2",
            "the stack to be ready through NGINX",
            timeout=180,
        )
        status, body = curl(
            "/v1/models/tabular:predict",
            "-H", "Content-Type: application/json", "-d", json.dumps({"instances": [ROW]}),
        )  # fmt: skip
        assert status == "200 2", body
        got = json.loads(body)["predictions"][0]["probabilities"]
        assert np.allclose(got, _expected(), rtol=1e-6, atol=1e-7)
        # Only NGINX is published, and it keeps /metrics to its allow-list.
        assert curl("/metrics")[0] == "403 2"
        access = logs(engine, f"{project}_nginx_1")
        assert '"uri":"/v1/models/tabular:predict"' in access  # NGINX's JSON access log
    finally:
        down = compose("down", "-v", "-t", "45")
        assert down.returncode == 0, down.stdout + down.stderr
