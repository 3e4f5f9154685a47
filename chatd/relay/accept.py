"""Accepting the relay's TCP connections: screen each, count it, hand it on.

:func:`serve_websockets` runs one accept loop per listening socket. The loop
takes what the kernel has queued with non-blocking ``accept`` calls, up to
ACCEPT_BATCH at a time before it lets other tasks run, and asks the
:class:`StreamCounter` about each new connection's peer before anything else
is spent on it. A connection refused there (a peer with too many handshakes
under way, or one the relay wants hung up on: an address flooding past its
limits, see :mod:`chatd.relay.addresses`) is closed in the loop itself: no
task, no trio stream, no byte read; a peer that already sent its request
gets a TCP reset. An address the relay hangs up on is then dropped in the
kernel until the time the relay gives (:mod:`chatd.relay.syndrop`): its
SYNs go unanswered, and the event loop spends nothing on it. That is what
a flood of connections from one address meets (docs/RELIABILITY.md
section 4).

A connection that passes gets a task: TLS (when configured) and the upgrade
request within the handshake timeout, then the handler
(:meth:`chatd.relay.server.Relay.handle`); the stream is closed, lingering,
when the handler returns (:func:`chatd.relay.ws.linger_close`). It takes a
connection slot at accept, so a burst of concurrent handshakes cannot
exceed the connection limit.

Errors of ``accept``: the ones that say the system is out of descriptors or
memory are logged and retried after a pause (like ``trio.serve_listeners``),
the ones that are about one failed connection are skipped; any other ends
the relay.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import trio

from chatd.log import fields
from chatd.relay.syndrop import SynDrops
from chatd.relay.ws import UpgradeRequest, linger_close, read_upgrade

log = logging.getLogger("chatd.relay")

#: Accepted in a row before other tasks run: at ~25 µs a refusal, a step stays
#: under 0.5 ms (64 made steps of about 1.7 ms, the quiet p99 of the relay).
ACCEPT_BATCH: Final = 16
#: A peer hung up on for too many handshakes under way has its SYNs dropped
#: by the kernel until one of them ends, or this long at most.
HANDSHAKE_DROP_SECONDS: Final = 0.1
ACCEPT_RETRY_SECONDS: Final = 0.1  # pause after accept ran out of descriptors or memory
_CAPACITY_ERRNOS: Final = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS))
#: accept errors about one connection only (trio's list): skip it, accept on
_SKIPPED_ERRNOS: Final = frozenset(
    getattr(errno, name)
    for name in (
        "EPERM",
        "ECONNABORTED",
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
    )
    if hasattr(errno, name)
)


class StreamCounter:
    """TCP streams, counted from accept to close, and the slots they hold.

    A stream takes a slot at accept if one is free and keeps it until it
    closes; a stream accepted while all ``limit`` slots are taken is answered
    503 after its upgrade request and closed. One TCP peer may have at most
    ``per_peer`` streams in their handshake at once (a slowloris sending its
    request a byte at a time); more are hung up on at accept, unanswered.
    Peers are counted by ``key`` (the relay's: an IPv6 peer by its /64).
    ``exempt`` peers (trusted reverse proxies, which pass on whole requests
    for many clients) have no such limit; a peer past it has its SYNs
    dropped by the kernel (:attr:`drops`) until one of its handshakes ends,
    HANDSHAKE_DROP_SECONDS at most. ``hang_up_on`` is the owner's own
    say at accept (the relay's: an address far over its connection limits):
    None, or the time (trio's clock) until which the peer's new connections
    are refused, which the kernel does from then on (:attr:`drops`).
    Both refusals happen in the accept loop, before a task is started for
    the stream or a byte of it is read (:meth:`screen`).
    """

    def __init__(
        self,
        limit: int,
        per_peer: int | None = None,
        exempt: Callable[[str], bool] = lambda peer: False,
        hang_up_on: Callable[[str], float | None] = lambda peer: None,
        key: Callable[[str], str] = lambda peer: peer,
    ) -> None:
        self.limit = limit
        self.per_peer = per_peer
        self.exempt = exempt
        self.hang_up_on = hang_up_on
        self.key = key  # what a peer is counted and dropped as (the relay's: IPv6 by /64)
        self.open = 0  # every stream, with or without a slot
        self.slotted = 0
        self.handshaking: set[trio.CancelScope] = set()
        self.handshakes_of: dict[str, int] = {}  # peer's key -> streams in their handshake
        self.hung_up = 0  # streams refused by the per-peer handshake limit
        self.drops = SynDrops()  # peers hung up on, dropped in the kernel for a while
        self._capped: set[str] = set()  # peers dropped for their handshakes under way
        self._closed = trio.Event()

    def screen(self, peer: str) -> bool:
        """Whether a stream just accepted from ``peer`` goes on to its
        handshake (counted, see :meth:`begin_handshake`); False: hang up on
        it at once, unanswered (and, for the owner's hang-ups, have the
        kernel drop the peer's further connections until the time it gave)."""
        until = self.hang_up_on(peer)
        if until is not None:
            self.drops.add(self.key(peer), until)
            return False
        return self.begin_handshake(peer)

    def begin_handshake(self, peer: str) -> bool:
        """Count a handshake of ``peer``; False (counting nothing) past ``per_peer``."""
        key = self.key(peer)
        count = self.handshakes_of.get(key, 0)
        if self.per_peer is not None and count >= self.per_peer and not self.exempt(peer):
            self.hung_up += 1
            # Until one of its handshakes ends, or for a moment at most.
            if self.drops.add(key, trio.current_time() + HANDSHAKE_DROP_SECONDS):
                self._capped.add(key)
            return False
        self.handshakes_of[key] = count + 1
        return True

    def end_handshake(self, peer: str) -> None:
        key = self.key(peer)
        count = self.handshakes_of[key] - 1
        if count:
            self.handshakes_of[key] = count
        else:
            del self.handshakes_of[key]
        if key in self._capped:  # under its cap again
            self._capped.discard(key)
            self.drops.discard(key)

    def stream_closed(self, slot: bool) -> None:
        self.open -= 1
        self.slotted -= slot
        self._closed.set()
        self._closed = trio.Event()

    async def wait_all_closed(self) -> None:
        """Wait until no stream is open."""
        while self.open:
            await self._closed.wait()

    def cancel_handshakes(self) -> None:
        """Drop every connection still in its handshake (used at shutdown)."""
        for scope in self.handshaking:
            scope.cancel()

    def take_slot(self) -> bool:
        if self.slotted >= self.limit:
            return False
        self.slotted += 1
        return True


async def serve_websockets(
    handler: Callable[[UpgradeRequest], Awaitable[None]],
    listeners: Sequence[trio.SocketListener],
    *,
    handler_nursery: trio.Nursery,
    counter: StreamCounter,
    handshake_timeout: float,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on ``listeners`` until cancelled; run ``handler`` per upgrade request.

    Connections run in ``handler_nursery`` and outlive the cancellation of this
    function, so a caller can stop accepting yet let connections drain. The
    handler must not raise; it accepts or rejects the request. Whatever it does,
    the stream is closed when it returns, and a client that does not finish its
    TLS handshake (with ``ssl_context``: TLS is terminated here) and upgrade
    request within ``handshake_timeout`` is dropped. The listeners stay open
    on return: closing them is the caller's.
    """

    async def handle_stream(stream: trio.abc.Stream, peer: str) -> None:
        """One stream past the accept-time checks, its handshake counted."""
        counter.open += 1
        slot = counter.take_slot()
        request: UpgradeRequest | None = None
        counted = True  # its handshake, counted by counter.screen
        try:
            with trio.CancelScope(deadline=trio.current_time() + handshake_timeout) as handshake:
                counter.handshaking.add(handshake)
                if isinstance(stream, trio.SSLStream):
                    # Handshake TLS up front, so a client that offers only
                    # refused versions or groups fails now, not at timeout.
                    try:
                        await stream.do_handshake()
                    except trio.BrokenResourceError:
                        return
                request = await read_upgrade(stream, peer)
            counter.handshaking.discard(handshake)
            counter.end_handshake(peer)
            counted = False
            if request is not None and not slot:
                log.warning("relay.full", extra=fields(limit=counter.limit))
                await request.reject(503, b"too many connections\n")
            elif request is not None:
                await handler(request)
        finally:
            counter.handshaking.discard(handshake)
            if counted:
                counter.end_handshake(peer)
            try:
                # Under cancellation this degrades to an immediate close.
                await linger_close(stream)
            finally:
                counter.stream_closed(slot)

    def start(sock: socket.socket, peer: str) -> None:
        stream: trio.abc.Stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        if ssl_context is not None:
            stream = trio.SSLStream(stream, ssl_context, server_side=True, https_compatible=True)
        handler_nursery.start_soon(handle_stream, stream, peer)

    async def accept_forever(listener: trio.SocketListener) -> None:
        # A second descriptor of the listening socket, for plain non-blocking
        # accept calls (trio's would cost a checkpoint and a stream each).
        listening = socket.socket(fileno=os.dup(listener.socket.fileno()))
        counter.drops.watch(listening)
        try:
            listening.setblocking(False)
            while True:
                await trio.lowlevel.wait_readable(listening)  # also lets others run
                for _ in range(ACCEPT_BATCH):
                    try:
                        sock, address = listening.accept()
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        if exc.errno in _SKIPPED_ERRNOS:
                            continue
                        if exc.errno not in _CAPACITY_ERRNOS:
                            raise
                        log.warning(
                            "relay.accept_failed", extra=fields(error=errno.errorcode[exc.errno])
                        )
                        await trio.sleep(ACCEPT_RETRY_SECONDS)
                        break
                    peer = str(address[0])
                    if counter.screen(peer):
                        counter.drops.accepted(sock)
                        start(sock, peer)
                    else:
                        sock.close()  # unanswered, unread
        finally:
            counter.drops.unwatch(listening)
            trio.lowlevel.notify_closing(listening)
            listening.close()

    async with trio.open_nursery() as accepting:
        accepting.start_soon(counter.drops.run)
        for listener in listeners:
            accepting.start_soon(accept_forever, listener)
        task_status.started()
