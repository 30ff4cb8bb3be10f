"""Every use of gunicorn's internals (beyond its documented settings and server hooks).

gunicorn is pinned to the minor version these were written against (pyproject.toml), and
``tests/server/test_compat.py`` fails when any of them changes, so an upgrade is a
deliberate review of this module and of :meth:`app.server.gevent_worker.GeventWorker.run`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from gunicorn import sock as gunicorn_sock
from gunicorn import systemd, util


def inherited_listeners() -> bool:
    """Whether listening sockets are handed over (systemd activation, or gunicorn's own
    re-exec on USR2), in which case gunicorn takes them itself."""
    return bool(systemd.listen_fds(unset_environment=False)) or "GUNICORN_FD" in os.environ


def listener(address: Any, cfg: Any, logger: Any) -> Any:
    """A gunicorn listener on one parsed address (a ``(host, port)`` tuple or a path).

    Raises:
        OSError, OverflowError, ValueError: as socket creation does.
    """
    return gunicorn_sock._sock_type(address)(address, cfg, logger)


def force_close(start_response: Callable[..., Any]) -> None:
    """Make gunicorn close the connection after this response (``Connection: close``).

    gunicorn passes its Response's bound ``start_response``; the headers go out only after
    the application returns, so this still changes them.
    """
    close = getattr(getattr(start_response, "__self__", None), "force_close", None)
    if close is not None:
        close()


def write_raw(sock: Any, data: bytes) -> None:
    """Write bytes to a client socket the way gunicorn writes its own error pages."""
    util.write_nonblock(sock, data)
