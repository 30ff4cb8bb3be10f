"""The appliance's default worker class.

:class:`GeventWorker` is gunicorn's gevent worker (every connection a greenlet on the worker's
one thread) made fair between keep-alive connections. A thread per request (gthread) pays a
GIL hand-off each time a request moves between threads and each time onnxruntime releases
the GIL for a run; on one thread nothing else is runnable, so small models run at close to
their in-process speed. Models too slow to run inline are handed to a helper thread by
the model layer (see :mod:`app.models.scheduling`), so the worker keeps reading requests.

When it is told to stop (a reload, ``max_requests``, a shutdown) it stops accepting at once
and closes the kept-alive unix-socket connections that are waiting for their next request, so
NGINX sends its next requests to the live workers instead of the old ones.
"""

from __future__ import annotations

import importlib.metadata
import socket
import time
from functools import partial
from typing import Any

import gevent
from gevent import monkey
from gevent.pool import Pool
from gevent.server import StreamServer
from gunicorn.sock import ssl_context
from gunicorn.workers.ggevent import GeventWorker as _GunicornGeventWorker

from app.models.runner import CooperativeRunner, Runner
from app.server.workers import ApplianceWorker

# The longest a kept-alive connection waits for the others' turn (seconds).
FAIR_WAIT = 0.05
# How often the worker looks whether it was told to stop, and once stopping whether its last
# connection has closed (seconds). gunicorn looks once a second.
STOP_POLL = 0.1


class _KeepAliveWait(gevent.Timeout):  # type: ignore[misc]
    """gunicorn's wait for a connection's next request, which a stopping worker can end."""

    def __init__(self, worker: GeventWorker, seconds: float) -> None:
        super().__init__(seconds, False)  # on expiry the wait ends quietly: the loop closes
        self._worker = worker
        self._greenlet: Any = None

    def __enter__(self) -> _KeepAliveWait:
        self._greenlet = gevent.getcurrent()
        # Not TCP, nor a new connection whose first request is on the way: see _end_wait.
        if self._greenlet in self._worker._closable:
            self._worker._waiting[self._greenlet] = self
            if not self._worker.alive:
                self._worker._end_wait(self._greenlet, self)
        return super().__enter__()  # type: ignore[no-any-return]

    def __exit__(self, *exc: Any) -> bool | None:
        self._worker._waiting.pop(self._greenlet, None)
        return super().__exit__(*exc)  # type: ignore[no-any-return]


class GeventWorker(ApplianceWorker, _GunicornGeventWorker):  # type: ignore[misc]
    """gunicorn's gevent worker that serves its keep-alive connections in turn, and that
    lets go of its idle ones as soon as it is told to stop.

    Its models run on the worker's one thread while they are fast, else in a helper thread
    (:class:`~app.models.runner.CooperativeRunner`).

    A greenlet whose client has already sent its next request reads it without ever
    returning to the event loop, so one busy connection could be served many times while
    the others wait (p99 at 64 connections was 5-10x p50). After each answered request the
    greenlet waits until the loop has nothing else to do, bounded by ``FAIR_WAIT`` so a
    flood of new connections cannot stall a kept-alive one.
    """

    runner: type[Runner] = CooperativeRunner

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Greenlet -> socket of each unix-socket connection that has answered a request.
        self._closable: dict[Any, Any] = {}
        # Greenlet -> its wait for the next request, for those of them waiting now.
        self._waiting: dict[Any, _KeepAliveWait] = {}

    def patch(self) -> None:
        """gunicorn's monkey patching, with the installed entry points read once.

        gevent looks for plugins before and after patching each module: 25 scans of every
        installed package's metadata, 70-140 ms of a worker's start here. The scans only
        select by group, so one read of all entry points answers them all alike.
        """
        every = importlib.metadata.entry_points()
        original = importlib.metadata.entry_points

        def entry_points(**params: Any) -> Any:
            return every.select(**params) if params else every

        importlib.metadata.entry_points = entry_points
        try:
            super().patch()
        finally:
            importlib.metadata.entry_points = original

    def run(self) -> None:
        """gunicorn's gevent loop, made to stop promptly when told to.

        gunicorn notices SIGTERM (or its ``max_requests``) up to a second late, keeps
        accepting meanwhile, and lets each kept-alive connection wait up to ``keepalive``
        seconds for one more request. After a reload that served the old model version to
        NGINX's pooled connections for seconds. Here the listeners close within
        ``STOP_POLL`` and the idle unix-socket connections then (see ``_end_wait``);
        requests already read are answered, as before.
        """
        ssl_args = {"ssl_context": ssl_context(self.cfg)} if self.cfg.is_ssl else {}
        servers = []
        for sock in self.sockets:
            sock.setblocking(1)
            server = StreamServer(
                sock, handle=partial(self.handle, sock), spawn=Pool(self.worker_connections),
                **ssl_args,
            )  # fmt: skip
            if self.cfg.workers > 1:
                server.max_accept = 1  # leave the other workers their share of a burst
            server.start()
            servers.append(server)
        while self.alive:
            self.notify()
            gevent.sleep(STOP_POLL)
        for server in servers:
            server.close()
        for greenlet, wait in list(self._waiting.items()):
            self._end_wait(greenlet, wait)
        deadline = time.monotonic() + self.cfg.graceful_timeout
        while time.monotonic() < deadline:
            if all(server.pool.free_count() == server.pool.size for server in servers):
                return
            self.notify()
            gevent.sleep(STOP_POLL)
        self.log.warning("Worker graceful timeout (pid:%s)", self.pid)
        for server in servers:
            server.stop(timeout=1)

    def timeout_ctx(self) -> _KeepAliveWait:
        """The wait for a connection's next request (``keepalive`` seconds at most)."""
        return _KeepAliveWait(self, self.cfg.keepalive)

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        """Serve one connection."""
        try:
            super().handle(listener, client, addr)
        finally:
            self._closable.pop(gevent.getcurrent(), None)

    def _end_wait(self, greenlet: Any, wait: _KeepAliveWait) -> None:
        """End a connection's wait for its next request, unless that request is arriving.

        The connection then closes without an answer. Should NGINX have sent a request
        into it meanwhile, it sees the close before any answer and sends the request again
        on another connection (``proxy_next_upstream error ... non_idempotent``), which a
        live worker accepts; bytes already here are read and answered instead.

        Only connections on a unix socket, where NGINX is the client, and only once they
        have answered a request: NGINX opens a connection to send a request at once, and
        a client on TCP may be one that does not retry a POST (python-requests does not),
        so those keep gunicorn's way: one more request answered, then the close.
        """
        gevent.get_hub().loop.run_callback(self._end_wait_now, greenlet, wait)

    def _end_wait_now(self, greenlet: Any, wait: _KeepAliveWait) -> None:
        # In the hub, so the greenlet is blocked reading and these checks hold for the throw.
        client = self._closable.get(greenlet)
        if self._waiting.get(greenlet) is wait and client is not None and not _readable(client):
            greenlet.throw(wait)  # the wait ends as if its time were up

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> Any:
        """Answer one request, then let every other ready connection go first."""
        result = super().handle_request(listener_name, req, sock, addr)
        if sock.family == socket.AF_UNIX:
            self._closable[gevent.getcurrent()] = sock
        with gevent.Timeout(FAIR_WAIT, False):
            gevent.idle()
        return result


_select = monkey.get_original("select", "select")


def _readable(sock: Any) -> bool:
    """Whether a socket has bytes (or an end) to read now, without waiting."""
    try:
        return bool(_select([sock.fileno()], [], [], 0)[0])
    except (OSError, ValueError):  # closed meanwhile: nothing to wait for
        return False
