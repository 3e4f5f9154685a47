"""The admin service: the admin app under hypercorn, inside the daemon's nursery."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart_trio import QuartTrio

from chatd.admin.api import AdminContext
from chatd.admin.app import create_app
from chatd.config import Config
from chatd.errors import ListenError, exception_leaves
from chatd.log import fields

log = logging.getLogger("chatd.admin")

KEEP_ALIVE_SECONDS = 5.0  # idle keep-alive connections are closed after this


def _check_unix_socket_free(path: Path) -> None:
    """Refuse to steal the socket of a chatd that is still running."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ListenError(f"admin: {path} exists and is not a socket; move it away")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return  # stale socket from an earlier run; hypercorn replaces it
    finally:
        probe.close()
    raise ListenError(
        f"admin: socket {path} is in use by another process (is chatd already running?)"
    )


def _warn_if_elsewhere(config: Config, sockets: Sequence[socket.socket]) -> None:
    """chatctl finds the admin API through admin.listen: say so when the
    socket systemd passed is not there."""
    expected = config.admin_unix_socket
    for sock in sockets:
        name = sock.getsockname()
        if sock.family == socket.AF_UNIX and expected is not None and name != str(expected):
            log.warning(
                "admin.socket_elsewhere",
                extra=fields(
                    passed=name,
                    configured=str(expected),
                    hint="set admin.listen to the socket unit's ListenStream= for chatctl",
                ),
            )


async def serve_admin(
    config: Config,
    ctx: AdminContext,
    stopping: trio.Event,
    *,
    sockets: Sequence[socket.socket] = (),
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin API until ``stopping`` is set, then drain and return.

    Reports the bound address (``unix:/path`` or ``http://host:port``) once
    listening. In-flight requests get ``server.shutdown_grace_seconds`` to
    finish. Raises :class:`ListenError` when the address is taken.

    ``sockets`` are listening sockets from systemd (socket activation),
    served instead of ``admin.listen``: hypercorn takes them over, and the
    socket file, which systemd made and keeps, is left in place.
    """
    hc = HypercornConfig()
    unix_path = config.admin_unix_socket
    if sockets:
        _warn_if_elsewhere(config, sockets)
        hc.bind = [f"fd://{sock.detach()}" for sock in sockets]  # hypercorn owns them now
        unix_path = None  # systemd's file: neither checked nor removed here
    elif unix_path is not None:
        _check_unix_socket_free(unix_path)
        hc.bind = [f"unix:{unix_path}"]
        hc.umask = 0o177  # socket file mode 0600: only the chatd user (and root)
    else:
        tcp = config.admin_tcp
        if tcp is None:  # pragma: no cover - admin_unix_socket covers the other case
            raise TypeError("admin.listen is neither unix: nor HOST:PORT")
        host = f"[{tcp[0]}]" if ":" in tcp[0] else tcp[0]
        hc.bind = [f"{host}:{tcp[1]}"]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.include_server_header = False
    hc.graceful_timeout = config.server.shutdown_grace_seconds
    hc.keep_alive_timeout = KEEP_ALIVE_SECONDS
    app = create_app(ctx, max_body_bytes=config.admin.max_body_bytes)
    try:
        binds = await _start(app, hc, stopping, task_status)
    except* OSError as group:
        exc = _first_leaf(group)
        where = hc.bind[0]
        if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
            raise ListenError(
                f"admin: address {where} is already in use (change admin.listen in {config.path})"
            ) from None
        raise ListenError(f"admin: cannot listen on {where}: {exc}") from None
    del binds
    if unix_path is not None:
        try:
            os.unlink(unix_path)
        except FileNotFoundError:
            pass
    log.info("admin.stopped")


def _first_leaf(exc: BaseException) -> BaseException:
    return next(exception_leaves(exc))


async def _start(
    app: QuartTrio, hc: HypercornConfig, stopping: trio.Event, task_status: trio.TaskStatus[str]
) -> list[str]:
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            partial(serve, app, hc, shutdown_trigger=stopping.wait)
        )
        log.info("admin.listening", extra=fields(bind=binds[0]))
        task_status.started(binds[0])
    return binds
