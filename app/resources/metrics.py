"""``GET /metrics``: Prometheus exposition, summed over every worker."""

from __future__ import annotations

import falcon

from app.metrics import Metrics


class MetricsResource:
    """Serve the metrics text format."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Render every metric of every live and dead worker."""
        resp.data, resp.content_type = self._metrics.render()
