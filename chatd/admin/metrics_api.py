"""``GET /metrics``: the daemon's Prometheus metrics on the admin listener.

Like every admin route it needs the admin token (Prometheus sends it from
``authorization.credentials_file``). The metrics name no person, device or
address (see :mod:`chatd.metrics`); for a scraper that cannot reach the admin
listener (a unix socket by default), ``[metrics] listen`` serves the same
text, token-free, on a TCP address of its own (:mod:`chatd.metrics_http`).
"""

from __future__ import annotations

from chatd.admin.api import AdminContext, ApiError, route
from chatd.metrics import CONTENT_TYPE


@route(
    "GET",
    "/metrics",
    "Prometheus metrics (text format 0.0.4); no label names a user, device or address",
    response=str,
    audit=False,
    tag="metrics",
    media_type=CONTENT_TYPE,
    errors=((503, "The metrics are not set up (service_unavailable)."),),
)
async def metrics(ctx: AdminContext, query: None, body: None) -> bytes:
    if ctx.metrics is None:
        raise ApiError(503, "service_unavailable", "metrics are not available in this server")
    return await ctx.metrics.scrape()
