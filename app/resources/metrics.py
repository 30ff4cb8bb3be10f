"""``GET /metrics``: Prometheus exposition, summed over every worker."""

from __future__ import annotations

import falcon

from app.metrics import Metrics
from app.resources.openapi import documented


class MetricsResource:
    """Serve the metrics text format."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    @documented("Prometheus metrics, summed over all workers", media="text/plain; version=0.0.4")
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Render every metric of every live and dead worker."""
        resp.data, resp.content_type = self._metrics.render()
