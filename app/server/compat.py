"""Every use of gunicorn's internals (beyond its documented settings and server hooks).

gunicorn is pinned to the minor version these were written against (pyproject.toml), and
``tests/server/test_compat.py`` fails when any of them changes, so an upgrade is a
deliberate review of this module and of :meth:`app.server.gevent_worker.GeventWorker.run`.
"""

from __future__ import annotations

import email.utils
import functools
import os
import time
from collections.abc import Callable
from typing import Any

from gunicorn import sock as gunicorn_sock
from gunicorn import systemd, util
from gunicorn.http import wsgi


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


def http_date() -> str:
    """The Date header's value for now (RFC 9110), formatted once per second, not per answer."""
    return _formatted_date(int(time.time()))


@functools.lru_cache(maxsize=1)
def _formatted_date(second: int) -> str:
    return email.utils.formatdate(second, usegmt=True)


class CoalescingResponse(wsgi.Response):  # type: ignore[misc]
    """gunicorn's response, with the headers sent in one write with the first body bytes.

    gunicorn writes the headers, then each body piece: two writes for every answer. Between
    them a worker killed (or recycled hard) leaves NGINX with headers and no body, which it
    can no longer send to another worker, so the client's request is lost; one write also
    saves a system call per request.
    """

    _pending = b""
    headers_sent: bool
    chunked: bool

    def default_headers(self) -> list[str]:
        """gunicorn's status line and default headers, the Date formatted once a second."""
        if self.upgrade:
            connection = "upgrade"
        elif self.should_close():
            connection = "close"
        else:
            connection = "keep-alive"
        headers = [
            f"HTTP/{self.req.version[0]}.{self.req.version[1]} {self.status}\r\n",
            f"Server: {self.version}\r\n",
            f"Date: {http_date()}\r\n",
            f"Connection: {connection}\r\n",
        ]
        if self.chunked:
            headers.append("Transfer-Encoding: chunked\r\n")
        return headers

    def send_headers(self) -> None:
        """Render the headers (as gunicorn does) and keep them for the next write."""
        if self.headers_sent:
            return
        lines = self.default_headers()
        lines.extend(f"{k}: {v}\r\n" for k, v in self.headers)
        self._pending = ("".join(lines) + "\r\n").encode("latin-1")
        self.headers_sent = True

    def _emit_body(self, data: bytes) -> None:
        if self._pending:
            if self.chunked:
                data = b"%X\r\n%s\r\n" % (len(data), data)
            data, self._pending = self._pending + data, b""
            self.sock.sendall(data)
        else:
            super()._emit_body(data)

    def flush(self) -> None:
        """Send headers still kept back."""
        if self._pending:
            data, self._pending = self._pending, b""
            self.sock.sendall(data)

    def write_file(self, respiter: Any) -> Any:
        """gunicorn's, after the headers (its sendfile path writes to the socket itself)."""
        self.send_headers()
        self.flush()
        return super().write_file(respiter)

    def close(self) -> None:
        """Send what is kept back, then end the response as gunicorn does."""
        self.send_headers()
        self.flush()
        super().close()


def coalesce_writes() -> None:
    """Make every worker class build :class:`CoalescingResponse` (``wsgi.create`` looks the
    class up in its module on each request)."""
    wsgi.Response = CoalescingResponse
