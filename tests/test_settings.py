"""Settings: file, environment and command-line overrides, and one-line errors."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from app.settings import SettingsError, cpu_count, load_settings, thread_limit
from tests.conftest import DEMO_MODELS, make_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "appliance.toml"
    path.write_text(text)
    return path


def test_defaults_are_safe(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, f'[models]\nrepository = "{tmp_path}"\n'), env={})
    assert s.server.bind == ["127.0.0.1:8000"]
    assert s.server.worker_class == "auto"
    assert s.limits.max_body_bytes == 8 * 1024 * 1024
    assert s.server.control_socket == ""
    assert s.effective_workers() >= 1
    assert s.effective_intra_op_threads() >= 1


def test_file_env_and_overrides_layer(tmp_path: Path) -> None:
    path = write(
        tmp_path, f'[models]\nrepository = "{tmp_path}"\n[server]\nworkers = 3\nthreads = 2\n'
    )
    env = {
        "ONNX_APPLIANCE_SERVER__WORKERS": "5",
        "ONNX_APPLIANCE_SERVER__BIND": '["127.0.0.1:9000", "unix:/run/x.sock"]',
        "ONNX_APPLIANCE_LOGGING__FORMAT": "console",
        "UNRELATED": "1",
    }
    s = load_settings(path, env=env, overrides={"server": {"threads": 8}})
    assert s.server.workers == 5
    assert s.server.threads == 8
    assert s.server.bind == ["127.0.0.1:9000", "unix:/run/x.sock"]
    assert s.logging.format == "console"


def test_intra_op_threads_default_is_cores_over_workers(tmp_path: Path) -> None:
    workers = 2 * cpu_count()
    s = load_settings(
        write(tmp_path, f'[models]\nrepository = "{tmp_path}"\n[server]\nworkers = {workers}\n'),
        env={},
    )
    assert s.effective_intra_op_threads() == 1


@pytest.mark.parametrize(
    ("text", "env", "fragment"),
    [
        ("[server]\nwokers = 2\n", {}, "wokers"),
        ("[sever]\nworkers = 2\n", {}, "sever"),
        ('[server]\nworkers = "two"\n', {}, "server.workers"),
        ("[server]\nworkers = -1\n", {}, "server.workers"),
        ('[server]\nworker_class = "eventlet"\n', {}, "worker_class"),
        ('[server]\nhttp_parser = "c"\n', {}, "http_parser"),
        ("[server]\nworker_connections = 0\n", {}, "server.worker_connections"),
        ("[server]\ninline_run_us = -1\n", {}, "server.inline_run_us"),
        ('[server]\nbind = ["0.0.0.0"]\n', {}, "server.bind"),
        ('[server]\nbind = ["0.0.0.0:8000"]\n', {}, "not a loopback address"),
        ('[server]\nbind = ["192.168.1.10:8000"]\n', {}, "not a loopback address"),
        ('[server]\nbind = ["127.0.0.1:0"]\n', {}, "use 1 to 65535"),
        ('[server]\nbind = ["[::1]:65536"]\n', {}, "use 1 to 65535"),
        ("[server]\nintra_op_threads = 100000\n", {}, "server.intra_op_threads = 100000"),
        ("[server]\ninter_op_threads = 100000\n", {}, "server.inter_op_threads"),
        ("[server]\nworkers = 100000\n", {}, "server.workers"),
        ("[server]\nthreads = 100000\n", {}, "server.threads"),
        ("[limits]\nmax_concurrency = 100000\n", {}, "limits.max_concurrency"),
        ("[limits]\nbody_timeout_ms = 0\n", {}, "limits.body_timeout_ms"),
        ("[auth]\nrate = nan\n", {}, "auth.rate = nan"),
        ("[auth]\nrate = -1.0\n", {}, "auth.rate"),
        ("[auth]\nrate = 1e-320\n", {}, "auth.rate"),
        ("[auth]\nburst = 0\n", {}, "auth.burst = 0"),
        ("", {"ONNX_APPLIANCE_AUTH__RATE": "inf"}, "auth.rate = inf"),
        ("[limits]\nmax_body_bytes = 0\n", {}, "limits.max_body_bytes"),
        ("[server\n", {}, "not valid TOML"),
        ("", {"ONNX_APPLIANCE_SERVER__WORKERS": "many"}, "server.workers"),
        ("", {"ONNX_APPLIANCE_WORKERS": "2"}, "ONNX_APPLIANCE_WORKERS"),
        ("", {"ONNX_APPLIANCE_SERVER__NOPE": "2"}, "nope"),
    ],
)
def test_bad_settings_give_one_line(
    tmp_path: Path, text: str, env: dict[str, str], fragment: str
) -> None:
    path = write(
        tmp_path,
        f'[models]\nrepository = "{tmp_path}"\n' + text if not text.startswith("[models") else text,
    )
    with pytest.raises(SettingsError) as info:
        load_settings(path, env=env)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_the_fast_parser_is_there_and_asking_for_it_without_it_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, f'[models]\nrepository = "{tmp_path}"\n[server]\nhttp_parser = "fast"\n')
    assert load_settings(path, env={}).server.http_parser == "fast"
    monkeypatch.setitem(sys.modules, "gunicorn_h1c", None)  # as if it were not installed
    with pytest.raises(SettingsError, match=r'http_parser = "fast" needs gunicorn_h1c'):
        load_settings(path, env={})


def test_missing_model_directory(tmp_path: Path) -> None:
    path = write(tmp_path, f'[models]\nrepository = "{tmp_path / "missing"}"\n')
    with pytest.raises(SettingsError, match=r"models\.repository .* does not exist"):
        load_settings(path, env={})


def test_explicit_config_must_exist(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", env={})


def test_documented_example_matches_the_defaults() -> None:
    from app.settings import Settings

    example = Path(__file__).resolve().parents[1] / "packaging" / "appliance.toml"
    documented = load_settings(example, env={}, check_repository=False)
    assert documented == Settings()
    text = example.read_text()
    for section in Settings.__struct_fields__:
        assert f"[{section}]" in text
        for field in getattr(Settings(), section).__struct_fields__:
            assert f"\n{field} = " in text, f"{section}.{field} is not documented"


def test_loopback_binds_are_allowed_and_others_need_the_opt_in(tmp_path: Path) -> None:
    loopback = '["127.0.0.2:8000", "[::1]:8000", "localhost:8000", "unix:/run/a.sock"]'
    base = f'[models]\nrepository = "{tmp_path}"\n[server]\n'
    assert load_settings(write(tmp_path, base + f"bind = {loopback}\n"), env={}).server.bind
    public = base + 'bind = ["0.0.0.0:8000"]\nallow_non_loopback = true\n'
    assert load_settings(write(tmp_path, public), env={}).server.bind == ["0.0.0.0:8000"]


def test_relative_paths_in_the_file_are_relative_to_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "etc"
    (conf / "models").mkdir(parents=True)
    path = conf / "appliance.toml"
    path.write_text(
        '[models]\nrepository = "models"\n[auth]\nkeys_file = "api-keys"\n'
        '[server]\npidfile = "run/app.pid"\n'
    )
    monkeypatch.chdir(tmp_path)  # anywhere but the file's folder
    s = load_settings(Path("etc/appliance.toml"), env={})
    assert s.models.repository == str(conf / "models")
    assert s.auth.keys_file == str(conf / "api-keys")
    assert s.server.pidfile == str(conf / "run" / "app.pid")
    assert s.server.runtime_dir == ""  # "" keeps meaning "choose one"
    # From the command line or the environment a relative path is the caller's, as usual.
    s = load_settings(path, env={}, overrides={"models": {"repository": "etc/models"}})
    assert s.models.repository == "etc/models"


def test_thread_bound_follows_the_cores(tmp_path: Path) -> None:
    base = f'[models]\nrepository = "{tmp_path}"\n[server]\n'
    limit = thread_limit()
    assert limit == 4 * cpu_count()
    ok = load_settings(write(tmp_path, base + f"intra_op_threads = {limit}\n"), env={})
    assert ok.server.intra_op_threads == limit
    with pytest.raises(SettingsError, match=f"must be from 0 to {limit}"):
        load_settings(write(tmp_path, base + f"intra_op_threads = {limit + 1}\n"), env={})


@pytest.mark.parametrize(
    ("grpc_bind", "fragment"),
    [
        ("10.0.0.1:8001", "server.grpc_bind '10.0.0.1:8001' is not a loopback address"),
        ("unix:/run/x.sock", "takes host:port, not a unix socket"),
        ("127.0.0.1:0", "has port 0"),
        ("nonsense", "is invalid"),
    ],
)
def test_grpc_bind_is_checked_like_bind(grpc_bind: str, fragment: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(fragment)):
        make_settings(DEMO_MODELS, server={"grpc_bind": grpc_bind})
    assert make_settings(DEMO_MODELS, server={"grpc_bind": "127.0.0.1:8001"}).server.grpc_bind
