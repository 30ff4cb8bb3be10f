"""`make container`'s folder: what the image build and compose.yaml need, and nothing else
in the build context. (The image and the stack run for real in tests/e2e/test_container.py.)"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

from app.settings import load_settings
from tests.conftest import DEMO_MODELS, ROOT

sys.path.insert(0, str(ROOT / "packaging"))
import container


def _staged(tmp_path: Path) -> Path:
    # Staging copies the artifact as it is; its contents are dist's to test.
    artifact = tmp_path / "onnx-appliance-0.0.0.tar.gz"
    artifact.write_bytes(b"artifact")
    return container.stage(tmp_path / "stack", artifact, server_name="appliance.test")


def test_stage_writes_the_build_context_and_the_stack(tmp_path: Path) -> None:
    out = _staged(tmp_path)
    assert (out / "onnx-appliance-0.0.0.tar.gz").read_bytes() == b"artifact"
    assert (out / "Containerfile").read_text() == (
        ROOT / "packaging/container/Containerfile"
    ).read_text()
    assert (out / "appliance.toml").read_text() == (ROOT / "packaging/appliance.toml").read_text()
    assert {p.name for p in (out / "models").iterdir()} == {p.name for p in DEMO_MODELS.iterdir()}
    assert (out / "tls" / "onnx-appliance.crt").read_text().startswith("-----BEGIN CERTIFICATE")
    # The build context is the artifact and the settings; models and keys stay out of it.
    assert (out / ".containerignore").read_text().splitlines() == [
        "*", "!onnx-appliance-*.tar.gz", "!appliance.toml"
    ]  # fmt: skip
    copied = re.findall(r"^COPY (\S+)", (out / "Containerfile").read_text(), re.MULTILINE)
    assert copied == ["onnx-appliance-*.tar.gz", "appliance.toml"]


def test_stage_keeps_an_operators_certificate(tmp_path: Path) -> None:
    tls = tmp_path / "stack" / "tls"
    tls.mkdir(parents=True)
    (tls / "onnx-appliance.crt").write_text("mine")
    _staged(tmp_path)
    assert (tls / "onnx-appliance.crt").read_text() == "mine"


def test_site_is_the_one_template_with_the_stacks_paths(tmp_path: Path) -> None:
    site = (_staged(tmp_path) / "nginx" / "onnx-appliance.conf").read_text()
    assert "# The one copy of this template" in site
    assert f"server unix:{container.SOCKET} max_fails=0;" in site
    assert "ssl_certificate /etc/nginx/tls/onnx-appliance.crt;" in site
    assert "server_name appliance.test;" in site
    assert "access_log /dev/stdout onnx_appliance_json;" in site
    assert "listen [::]" not in site
    assert "{{" not in site


def test_compose_mounts_what_the_folder_has_and_publishes_only_nginx(tmp_path: Path) -> None:
    out = _staged(tmp_path)
    stack = yaml.safe_load((out / "compose.yaml").read_text())
    app, nginx = stack["services"]["app"], stack["services"]["nginx"]
    for service in (app, nginx):
        assert service["read_only"] is True
        for volume in service["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (out / source).exists(), source
    assert "ports" not in app
    assert all(p.endswith((":443", ":80")) for p in nginx["ports"])
    socket_volume = f"socket:{Path(container.SOCKET).parent}"
    assert socket_volume in app["volumes"] and socket_volume in nginx["volumes"]
    bind = yaml.safe_load(app["environment"]["ONNX_APPLIANCE_SERVER__BIND"])
    assert bind == [f"unix:{container.SOCKET}"]
    # The settings the image ships, with the stack's environment, are valid.
    settings = load_settings(out / "appliance.toml", env=app["environment"], check_repository=False)
    assert settings.server.socket_mode == 0o666
    # Stopping waits for requests in flight: longer than gunicorn's graceful timeout.
    grace = int(app["stop_grace_period"].rstrip("s"))
    assert grace > settings.server.graceful_timeout
