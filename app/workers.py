"""gunicorn worker classes of the appliance.

:class:`GeventWorker` is gunicorn's gevent worker (every connection a greenlet on the worker's
one thread) made fair between keep-alive connections. A thread per request (gthread) pays a
GIL hand-off each time a request moves between threads and each time onnxruntime releases
the GIL for a run; on one thread nothing else is runnable, so small models run at close to
their in-process speed. Models too slow to run inline are handed to a helper thread by
the model layer (see :mod:`app.models.scheduling`), so the worker keeps reading requests.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import gevent
from gunicorn.workers.ggevent import GeventWorker as _GunicornGeventWorker

# The longest a kept-alive connection waits for the others' turn (seconds).
FAIR_WAIT = 0.05


class GeventWorker(_GunicornGeventWorker):  # type: ignore[misc]
    """gunicorn's gevent worker that serves its keep-alive connections in turn.

    A greenlet whose client has already sent its next request reads it without ever
    returning to the event loop, so one busy connection could be served many times while
    the others wait (p99 at 64 connections was 5-10x p50). After each answered request the
    greenlet waits until the loop has nothing else to do, bounded by ``FAIR_WAIT`` so a
    flood of new connections cannot stall a kept-alive one.
    """

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

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> Any:
        """Answer one request, then let every other ready connection go first."""
        result = super().handle_request(listener_name, req, sock, addr)
        with gevent.Timeout(FAIR_WAIT, False):
            gevent.idle()
        return result
