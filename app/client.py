"""Requests to the local server through one of its bind addresses (``health``, ``rollout``)."""

from __future__ import annotations

import http.client
import socket


def local_get(address: str, path: str, timeout: float) -> tuple[int, bytes]:
    """``GET path`` at a bind address (``host:port`` or ``unix:/path``): status and body.

    A wildcard host is asked on loopback, the one address sure to be there.

    Raises:
        OSError: nothing answers there in time.
    """
    if address.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(address[len("unix:") :])
        except OSError:
            sock.close()
            raise
        conn = http.client.HTTPConnection("localhost", timeout=timeout)
        conn.sock = sock
    else:
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class NoMetrics(Exception):
    """The server does not answer its metrics."""


def local_metrics(address: str, timeout: float = 10) -> str:
    """The exposition text of ``GET /metrics`` at a bind address.

    Raises:
        NoMetrics: nothing answers, or the answer is not 200.
    """
    try:
        status, body = local_get(address, "/metrics", timeout)
    except OSError as exc:
        raise NoMetrics(f"the server does not answer on {address}: {exc}") from None
    if status != 200:
        raise NoMetrics(f"GET /metrics on {address} answered HTTP {status}")
    return body.decode("utf-8", "replace")
