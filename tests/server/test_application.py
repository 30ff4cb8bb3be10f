"""The gunicorn application: what the master refuses, and connections closed after refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from gunicorn.http.wsgi import Response

from app.keys import KeyStore, new_key
from app.resources.common import CLOSE_CONNECTION
from app.server.application import ApplianceApplication, closing_connections
from app.server.state import StartupError
from tests.conftest import DEMO_MODELS


def write_config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "appliance.toml"
    path.write_text(
        f'[models]\nrepository = "{DEMO_MODELS}"\n[auth]\nkeys_file = "{tmp_path / "keys"}"\n'
        + extra
    )
    return path


def test_the_master_validates_settings_repository_and_keys(tmp_path: Path) -> None:
    app = ApplianceApplication(write_config(tmp_path), {}, runtime=tmp_path / "run")
    assert app.state.repository.names == ["digits", "mlp", "regression", "sentiment", "tabular"]
    assert app.state.limiter_path is None  # no keys, no rate-limit state
    with pytest.raises(StartupError, match=r"auth\.required is set"):
        ApplianceApplication(write_config(tmp_path, "required = true\n"), {}, runtime=tmp_path)
    (tmp_path / "keys").write_text("not a key line\n")
    with pytest.raises(StartupError, match="line 1 is malformed"):
        ApplianceApplication(write_config(tmp_path), {}, runtime=tmp_path)


def test_keys_get_shared_rate_limit_state_per_generation(tmp_path: Path) -> None:
    record, _ = new_key("ci")
    KeyStore({"ci": record}).save(tmp_path / "keys")
    app = ApplianceApplication(write_config(tmp_path), {}, runtime=tmp_path / "run")
    assert app.state.limiter_path == tmp_path / "run" / "ratelimit.0.bin"
    app.refresh()
    assert app.state.generation == 1 and app.previous.generation == 0
    app.rollback()
    assert app.state.generation == 0


def _start_response() -> Any:
    req = type(
        "Req", (), {"version": (1, 1), "method": "POST", "should_close": lambda self: False}
    )()
    return Response(req, None, type("Cfg", (), {"is_ssl": False})()).start_response


@pytest.mark.parametrize("close", [True, False])
def test_a_refused_body_closes_the_connection(close: bool) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("413 Payload Too Large", [("Content-Length", "0")])
        if close:
            environ[CLOSE_CONNECTION] = True
        return [b""]

    start_response = _start_response()
    closing_connections(app)({}, start_response)
    assert start_response.__self__.should_close() is close
