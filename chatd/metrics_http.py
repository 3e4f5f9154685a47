"""The token-free metrics listener (``[metrics] listen``): only ``GET /metrics``.

For a Prometheus that cannot reach the admin API (a unix socket by default,
and token-protected). It serves the text of :meth:`chatd.metrics.Metrics.scrape`
and nothing else: any other path is 404, any other method 405. No admin
route, no personal data: the metrics carry no label that names a user, a
device or an address. Off unless configured (or passed a socket named
``metrics`` by systemd).

A tiny ASGI app under hypercorn (as the admin API is), in the daemon's
nursery; it stops with ``stopping`` like the other listeners.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from functools import partial
from typing import Any, cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from hypercorn.typing import ASGIFramework

from chatd.config import Config
from chatd.errors import ListenError, exception_leaves
from chatd.log import fields
from chatd.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger("chatd.metrics")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def metrics_app(metrics: Metrics) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The ASGI app: ``GET /metrics`` (and HEAD) answer the scrape."""

    async def answer(send: Send, status: int, body: bytes, content_type: bytes) -> None:
        headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
        if status == 405:
            headers.append((b"allow", b"GET, HEAD"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        text = b"text/plain; charset=utf-8"
        if scope["path"] != "/metrics":
            await answer(send, 404, b"not found: only /metrics is served here\n", text)
        elif scope["method"] not in ("GET", "HEAD"):
            await answer(send, 405, b"method not allowed: use GET\n", text)
        else:
            body = await metrics.scrape()
            await answer(
                send, 200, b"" if scope["method"] == "HEAD" else body, CONTENT_TYPE.encode()
            )

    return app


async def serve_metrics_http(
    config: Config,
    metrics: Metrics,
    stopping: trio.Event,
    *,
    sockets: Sequence[socket.socket] = (),
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` on ``metrics.listen`` (or on ``sockets`` from
    systemd) until ``stopping`` is set. Reports the bound address once
    listening; raises :class:`ListenError` when it cannot listen."""
    hc = HypercornConfig()
    if sockets:
        hc.bind = [f"fd://{sock.detach()}" for sock in sockets]  # hypercorn owns them now
    else:
        tcp = config.metrics_tcp
        if tcp is None:  # pragma: no cover - the daemon starts this only when configured
            raise TypeError("metrics.listen is off and no socket was passed")
        host = f"[{tcp[0]}]" if ":" in tcp[0] else tcp[0]
        hc.bind = [f"{host}:{tcp[1]}"]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.include_server_header = False
    hc.graceful_timeout = 1.0  # a scrape is short; nothing to drain
    # The app speaks plain ASGI dicts; hypercorn's TypedDicts describe the same.
    app = cast(ASGIFramework, metrics_app(metrics))
    try:
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(
                partial(serve, app, hc, shutdown_trigger=stopping.wait, mode="asgi")
            )
            log.info("metrics.listening", extra=fields(bind=binds[0]))
            task_status.started(binds[0])
    except* OSError as group:
        exc = next(exception_leaves(group))
        where = hc.bind[0]
        if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
            raise ListenError(
                f"metrics: address {where} is already in use "
                f"(change metrics.listen in {config.path})"
            ) from None
        raise ListenError(f"metrics: cannot listen on {where}: {exc}") from None
