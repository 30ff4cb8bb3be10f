"""The master's listeners: opened before gunicorn starts, one clear line when they cannot be."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from gunicorn.config import Config
from gunicorn.glogging import Logger

from app.server.arbiter import open_listeners
from app.server.state import StartupError


def config(*binds: str) -> Config:
    cfg = Config()
    cfg.set("bind", list(binds))
    return cfg


def test_every_address_is_listened_on(tmp_path: Path) -> None:
    cfg = config("127.0.0.1:0", f"unix:{tmp_path / 'a.sock'}")
    listeners = open_listeners(cfg, Logger(cfg))
    try:
        assert [lst.sock.family for lst in listeners] == [socket.AF_INET, socket.AF_UNIX]
    finally:
        for listener in listeners:
            listener.close()


def test_an_address_in_use_is_one_line_and_nothing_stays_open(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = config(f"unix:{tmp_path / 'first.sock'}", f"127.0.0.1:{port}")
        with pytest.raises(StartupError) as info:
            open_listeners(cfg, Logger(cfg))
    assert str(info.value) == f"cannot listen on 127.0.0.1:{port}: Address already in use"
    # The first listener was closed again: its address can be taken now.
    with socket.socket(socket.AF_UNIX) as probe:
        (tmp_path / "first.sock").unlink(missing_ok=True)
        probe.bind(str(tmp_path / "first.sock"))
