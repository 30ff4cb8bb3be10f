"""``make container``: the container image's build context and its compose stack.

``build/container/`` gets the ``Containerfile`` and ``compose.yaml`` of
``packaging/container/``, the offline artifact of ``make dist``, the VM's settings file
``appliance.toml``, ``nginx/onnx-appliance.conf`` rendered from the project's one NGINX site
template (the nginx_site role's defaults, with the compose stack's paths), ``tls/`` (kept if
there, else a self-signed certificate for the server name) and ``models/`` (the demo models,
or ``--models DIR``). Then, with podman or docker on the machine, it builds the image.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "packaging"))

import dist  # noqa: E402 (a sibling script, not a package)

from loadtests.templates import render  # noqa: E402

HERE = ROOT / "packaging" / "container"
SITE_TEMPLATE = ROOT / "nginx" / "onnx-appliance.conf.j2"
SITE_DEFAULTS = ROOT / "ansible" / "roles" / "nginx_site" / "defaults" / "main.yml"
#: Where compose.yaml mounts what the NGINX container needs.
SOCKET = "/var/lib/onnx-appliance/socket/app.sock"
TLS_DIR = "/etc/nginx/tls"
TAG = "localhost/onnx-appliance"


def site_variables(server_name: str, metrics_allow: list[str]) -> dict[str, Any]:
    """The nginx_site role's defaults (its own templated ones resolved), for the stack."""
    defaults: dict[str, Any] = yaml.safe_load(SITE_DEFAULTS.read_text())
    overrides = {
        "nginx_site_server_name": server_name,
        "nginx_site_http_port": 80,
        "nginx_site_https_port": 443,
        "nginx_site_ipv6": False,  # container networks are often IPv4 only
        "nginx_site_tls_dir": TLS_DIR,
        "nginx_site_upstream_socket": SOCKET,
        "nginx_site_access_log": "/dev/stdout",  # the engine keeps the logs
        "nginx_site_metrics_allow": metrics_allow,
        # The app is in another container, reached on a unix socket; gRPC stays off there.
        "nginx_site_grpc_upstream": "",
    }
    variables = {**defaults, **overrides}
    for name, value in variables.items():
        if isinstance(value, str) and "{{" in value:
            variables[name] = render_string(value, variables)
    return variables


def render_string(text: str, variables: dict[str, Any]) -> str:
    """One templated default, as Ansible resolves it."""
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)  # noqa: S701
    return env.from_string(text).render(**variables)


def render_site(server_name: str, metrics_allow: list[str]) -> str:
    """The NGINX site of the compose stack."""
    return render(SITE_TEMPLATE, **site_variables(server_name, metrics_allow))


def self_signed(tls: Path, server_name: str) -> None:
    """A self-signed certificate for ``server_name``: enough to try the stack, not to serve."""
    tls.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "365",
         "-subj", f"/CN={server_name}", "-addext", f"subjectAltName=DNS:{server_name}",
         "-keyout", str(tls / "onnx-appliance.key"), "-out", str(tls / "onnx-appliance.crt")],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    (tls / "onnx-appliance.key").chmod(0o644)  # read by NGINX's master inside its container


def stage(
    out: Path,
    artifact: Path | None = None,
    models: Path | None = None,
    server_name: str = "localhost",
    metrics_allow: list[str] | None = None,
) -> Path:
    """Write the build context and compose stack into ``out``; return ``out``.

    Args:
        out: The folder (created; the artifact and models in it are replaced).
        artifact: An artifact tarball of ``make dist``; built when not given.
        models: The model repository to serve; the demo models when not given.
        server_name: The host name NGINX answers (and a self-signed certificate's name).
        metrics_allow: Addresses allowed to read /metrics through NGINX (loopback by default).
    """
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("onnx-appliance-*.tar.gz"):
        old.unlink()
    if artifact is None:
        artifact = dist.build(out / "dist")
    shutil.copy(artifact, out / artifact.name)
    shutil.copy(HERE / "Containerfile", out / "Containerfile")
    shutil.copy(HERE / "compose.yaml", out / "compose.yaml")
    shutil.copy(ROOT / "packaging" / "appliance.toml", out / "appliance.toml")
    (out / ".containerignore").write_text("*\n!onnx-appliance-*.tar.gz\n!appliance.toml\n")
    (out / ".dockerignore").write_text((out / ".containerignore").read_text())
    site = out / "nginx" / "onnx-appliance.conf"
    site.parent.mkdir(exist_ok=True)
    site.write_text(render_site(server_name, metrics_allow or ["127.0.0.1", "::1"]))
    tls = out / "tls"
    if not (tls / "onnx-appliance.crt").exists():
        self_signed(tls, server_name)
    if (out / "models").exists():
        shutil.rmtree(out / "models")
    shutil.copytree(models or ROOT / "app" / "demo_models", out / "models")
    return out


def build_image(
    context: Path,
    tag: str,
    base: str | None = None,
    tool: str = "",
    env: dict[str, str] | None = None,
) -> str:
    """Build the image with podman (or docker); return the tool used."""
    tool = tool or next((t for t in ("podman", "docker") if shutil.which(t)), "")
    if not tool:
        raise SystemExit("container: neither podman nor docker is installed")
    command = [tool, "build", "-t", tag]
    if Path(tool).name == "podman":
        command += ["--format", "docker"]  # OCI images drop HEALTHCHECK
    if base:
        command += ["--build-arg", f"BASE={base}"]
    subprocess.run([*command, str(context)], check=True, timeout=1800, env=env)
    return tool


def main(argv: list[str] | None = None) -> int:
    """``python packaging/container.py [--out DIR] [--models DIR] [--no-build] ...``."""
    from app import __version__

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "container")
    parser.add_argument("--artifact", type=Path, help="a tarball of make dist (default: build)")
    parser.add_argument("--models", type=Path, help="model repository (default: demo models)")
    parser.add_argument("--server-name", default="localhost")
    parser.add_argument("--metrics-allow", action="append", metavar="ADDRESS")
    parser.add_argument("--base", help="base image (default: debian:bookworm-slim)")
    parser.add_argument("--no-build", action="store_true", help="only write the folder")
    args = parser.parse_args(argv)
    for given in (args.artifact, args.models):
        if given is not None and not given.exists():
            print(f"container: error: {given} does not exist", file=sys.stderr)
            return 2
    out = stage(args.out, args.artifact, args.models, args.server_name, args.metrics_allow)
    print(f"staged {out}")
    if not args.no_build:
        tool = build_image(out, f"{TAG}:{__version__}", args.base)
        subprocess.run([tool, "tag", f"{TAG}:{__version__}", f"{TAG}:latest"], check=True)
        print(f"built {TAG}:{__version__}; run it: cd {out} && {tool} compose up -d")
    return 0


if __name__ == "__main__":
    sys.exit(main())
