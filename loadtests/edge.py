"""Real NGINX on loopback in front of a real appliance: lab TLS, the site template, curl.

Used by the end-to-end tests and by ``make bench`` (the appliance-nginx configuration).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtests.templates import render

ROOT = Path(__file__).resolve().parents[1]

SITE_TEMPLATE = ROOT / "nginx" / "onnx-appliance.conf.j2"
LB_TEMPLATE = ROOT / "nginx" / "onnx-appliance-lb.conf.j2"
SERVER_NAME = "appliance.test"


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lab_tls(tmp: Path, name: str = SERVER_NAME) -> dict[str, Path]:
    """A lab CA and a leaf for ``name`` (ECDSA P-256, 30 days, SAN not critical)."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp, check=True, capture_output=True, timeout=60)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "30",
        "-subj",
        "/CN=lab CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "leaf.key",
        "-out",
        "leaf.csr",
        "-subj",
        f"/CN={name}",
    )
    (tmp / "leaf.ext").write_text(
        f"subjectAltName=DNS:{name}\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid:always\n"
    )
    openssl(
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "leaf.pem",
        "-days",
        "30",
        "-extfile",
        "leaf.ext",
    )
    return {"ca": tmp / "ca.pem", "cert": tmp / "leaf.pem", "key": tmp / "leaf.key"}


def render_site(**variables: Any) -> str:
    """Render the site template; a missing variable is an error."""
    return render(SITE_TEMPLATE, **variables)


@dataclass
class Edge:
    """A running nginx."""

    process: subprocess.Popen[bytes]
    prefix: Path
    http_port: int
    https_port: int
    ca: Path
    name: str = SERVER_NAME

    @property
    def access_log(self) -> Path:
        return self.prefix / "access.log"

    def url(self, path: str) -> str:
        return f"https://{self.name}:{self.https_port}{path}"

    def curl(
        self, path: str, *args: str, https: bool = True, host: str = ""
    ) -> subprocess.CompletedProcess[str]:
        """curl through the edge with the lab CA, resolving the name to loopback."""
        host = host or self.name
        port = self.https_port if https else self.http_port
        scheme = "https" if https else "http"
        return subprocess.run(
            [
                "curl",
                "-sS",
                "--max-time",
                "20",
                "--cacert",
                str(self.ca),
                "--resolve",
                f"{host}:{port}:127.0.0.1",
                *args,
                f"{scheme}://{host}:{port}{path}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def access_lines(self) -> list[dict[str, Any]]:
        time.sleep(0.2)
        return [json.loads(x) for x in self.access_log.read_text().splitlines()]


@contextlib.contextmanager
def run_edge(tmp: Path, socket_path: str, **overrides: Any) -> Iterator[Edge]:
    """Render the site for ``socket_path`` and run nginx in the foreground under ``tmp``."""
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        raise RuntimeError("nginx is not installed (.ci/run installs it)")
    prefix = tmp / "nginx"
    prefix.mkdir()
    name = overrides.get("nginx_site_server_name", SERVER_NAME)
    tls = lab_tls(prefix, name)
    http_port, https_port = free_port(), free_port()
    variables = {
        "nginx_site_server_name": SERVER_NAME,
        "nginx_site_http_port": http_port,
        "nginx_site_https_port": https_port,
        "nginx_site_ipv6": False,
        "nginx_site_tls_certificate": tls["cert"],
        "nginx_site_tls_certificate_key": tls["key"],
        "nginx_site_hsts_max_age": 63072000,
        "nginx_site_client_max_body_size": "1m",
        "nginx_site_client_timeout": 10,
        "nginx_site_keepalive_timeout": 30,
        "nginx_site_rate_limit": 1000,
        "nginx_site_rate_burst": 2000,
        "nginx_site_conn_limit": 200,
        "nginx_site_metrics_allow": ["127.0.0.1"],
        "nginx_site_trusted_proxies": [],
        "nginx_site_upstream_socket": socket_path,
        "nginx_site_upstream_keepalive": 64,
        "nginx_site_upstream_timeout": 60,
        "nginx_site_grpc_upstream": "",
        "nginx_site_stream_timeout": 600,
        "nginx_site_access_log": prefix / "access.log",
        **overrides,
    }
    with _nginx(prefix, render_site(**variables), http_port, https_port, tls["ca"], name) as edge:
        yield edge


@contextlib.contextmanager
def run_lb(tmp: Path, upstream: Edge, **overrides: Any) -> Iterator[Edge]:
    """Render the load balancer template in front of ``upstream`` (one appliance, reached over
    TLS and verified with its CA) and run it under ``tmp``."""
    prefix = tmp / "nginx-lb"
    prefix.mkdir()
    name = overrides.get("nginx_lb_server_name", upstream.name)
    tls = lab_tls(prefix, name)
    http_port, https_port = free_port(), free_port()
    variables = {
        "nginx_lb_server_name": name,
        "nginx_lb_http_port": http_port,
        "nginx_lb_https_port": https_port,
        "nginx_lb_ipv6": False,
        "nginx_lb_tls_certificate": tls["cert"],
        "nginx_lb_tls_certificate_key": tls["key"],
        "nginx_lb_hsts_max_age": 63072000,
        "nginx_lb_client_max_body_size": "8m",
        "nginx_lb_client_timeout": 10,
        "nginx_lb_keepalive_timeout": 30,
        "nginx_lb_rate_limit": 1000,
        "nginx_lb_rate_burst": 2000,
        "nginx_lb_conn_limit": 200,
        "nginx_lb_upstreams": [{"name": "appliance-1", "address": "127.0.0.1"}],
        "nginx_lb_upstream_port": upstream.https_port,
        "nginx_lb_upstream_server_name": upstream.name,
        "nginx_lb_upstream_verify": True,
        "nginx_lb_upstream_ca": upstream.ca,
        "nginx_lb_max_fails": 1,
        "nginx_lb_fail_timeout": 10,
        "nginx_lb_connect_timeout": 2,
        "nginx_lb_upstream_timeout": 60,
        "nginx_lb_stream_timeout": 600,
        "nginx_lb_upstream_keepalive": 16,
        "nginx_lb_drained": [],
        "nginx_lb_access_log": prefix / "access.log",
        **overrides,
    }
    with _nginx(
        prefix, render(LB_TEMPLATE, **variables), http_port, https_port, tls["ca"], name
    ) as lb:
        yield lb


@contextlib.contextmanager
def _nginx(
    prefix: Path, site: str, http_port: int, https_port: int, ca: Path, name: str
) -> Iterator[Edge]:
    """Run nginx in the foreground with ``site`` under ``prefix``, until it answers."""
    (prefix / "site.conf").write_text(site)
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / sub).mkdir()
    (prefix / "nginx.conf").write_text(
        "user root;\nworker_processes auto;\ndaemon off;\n"
        f"pid {prefix}/nginx.pid;\nerror_log {prefix}/error.log warn;\n"
        "events { worker_connections 1024; }\n"
        f"http {{\n  client_body_temp_path {prefix}/body;\n  proxy_temp_path {prefix}/proxy;\n"
        f"  fastcgi_temp_path {prefix}/fastcgi;\n  uwsgi_temp_path {prefix}/uwsgi;\n"
        f"  scgi_temp_path {prefix}/scgi;\n  include {prefix}/site.conf;\n}}\n"
    )
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    check = subprocess.run(
        [nginx, "-t", "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if check.returncode != 0:
        raise RuntimeError(f"nginx -t failed:\n{check.stderr}")
    process = subprocess.Popen(
        [nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    edge = Edge(process, prefix, http_port, https_port, ca, name)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if edge.curl("/v2/health/live").returncode == 0:
                break
            time.sleep(0.1)
        yield edge
    finally:
        process.send_signal(signal.SIGQUIT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
