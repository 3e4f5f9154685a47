"""A WebSocket server loop on trio-websocket that always says goodbye properly.

trio-websocket's own ``WebSocketServer`` has gaps a public server cannot
have, each covered by a test in ``tests/test_relay.py``:

* wsproto reports a framing error (unmasked frame, reserved opcode, bad
  UTF-8, ...) as a ``CloseConnection`` *event* without changing state, and
  trio-websocket then drops the TCP connection without a Close frame.
  :class:`RelayWebSocket` sends the Close frame with wsproto's code.
* Closing right after our Close frame while the peer is still sending makes
  the kernel answer with RST, which can destroy the Close frame in flight.
  :func:`linger_close` half-closes, drains (bounded in time and bytes), then
  closes.
* A rejected handshake (404/403/503) and a connection whose reader is stuck
  mid-frame are never hung up by trio-websocket. :func:`serve_websockets`
  owns every stream and always closes it when the handler returns.
* Connections take a slot at TCP accept, before the handshake, so a burst of
  concurrent handshakes cannot exceed the connection limit (trio-websocket
  users typically count after ``accept()``, which races).

* wsproto keeps its handshake machinery (an h11 connection with its
  buffers, an event deque) for the life of the connection, although it is
  never used again after the upgrade: :func:`release_handshake` drops it,
  about 2 KiB per idle connection.

It relies on two private trio-websocket methods (``_reader_task``,
``_get_request``) exactly as ``WebSocketServer`` itself uses them, and on its
``_wsproto`` attribute; the dependency is pinned below 0.13 in pyproject.toml
for that reason.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, Final

import trio
from trio_websocket import CloseReason, WebSocketConnection, WebSocketRequest
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

from chatd.log import fields
from chatd.protocol.core import CLOSE_TOO_BIG, REASON_TOO_BIG

log = logging.getLogger("chatd.relay")

LINGER_SECONDS: Final = 2.0  # how long a closing connection may drain the peer's data
LINGER_MAX_BYTES: Final = 65_536  # how much of it we read and discard, at most
MAX_CLOSE_REASON: Final = 120  # bytes; a Close frame's reason is limited to 123


async def linger_close(stream: trio.abc.Stream) -> None:
    """Half-close, discard what the peer still sends for a moment, then close."""
    try:
        if isinstance(stream, trio.abc.HalfCloseableStream):
            with trio.move_on_after(LINGER_SECONDS):
                await stream.send_eof()
                drained = 0
                while drained < LINGER_MAX_BYTES:
                    data = await stream.receive_some(4_096)
                    if not data:
                        break
                    drained += len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
        pass  # already gone, or another task holds it: just close
    finally:
        await trio.aclose_forcefully(stream)


class RelayWebSocket(WebSocketConnection):
    """trio-websocket's connection, answering framing errors with a Close frame
    and measuring messages in UTF-8 bytes (trio-websocket counts characters)."""

    _utf8_size = 0  # bytes of the message being received so far

    async def _handle_message_event(self, event: BytesMessage | TextMessage) -> None:
        data = event.data
        self._utf8_size += len(data) if isinstance(data, bytes | bytearray) else len(data.encode())
        if self._utf8_size > self._max_message_size:
            self._utf8_size = 0
            self._message_size = 0
            self._message_parts = []
            self._close_reason = CloseReason(CLOSE_TOO_BIG, REASON_TOO_BIG)
            await self._send(CloseConnection(code=CLOSE_TOO_BIG, reason=REASON_TOO_BIG))
            await self._recv_channel.aclose()
            self._reader_running = False
            return
        if event.message_finished:
            self._utf8_size = 0
        await super()._handle_message_event(event)

    async def _handle_close_connection_event(self, event: CloseConnection) -> None:
        if self._wsproto.state == ConnectionState.OPEN:
            # Not the peer's Close (that moves wsproto to REMOTE_CLOSING) but a
            # parse failure: tell the peer why before hanging up.
            reason = (event.reason or "").encode()[:MAX_CLOSE_REASON].decode(errors="ignore")
            try:
                await self._send(CloseConnection(code=event.code, reason=reason))
            except Exception:  # noqa: S110 - the peer may be gone already; we hang up anyway
                pass
        await super()._handle_close_connection_event(event)

    async def _close_stream(self) -> None:
        self._reader_running = False
        await linger_close(self._stream)

    async def _handle_ping_event(self, event: Ping) -> None:
        # After our Close, wsproto refuses to send a Pong and raises, which
        # would escape the reader task. A closing connection ignores Pings.
        if self._wsproto.state == ConnectionState.OPEN:
            await super()._handle_ping_event(event)


class StreamCounter:
    """TCP streams, counted from accept to close, and the slots they hold.

    A stream takes a slot at accept if one is free and keeps it until it
    closes; a stream accepted while all ``limit`` slots are taken is answered
    503 after its handshake and closed.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0  # every stream, with or without a slot
        self.slotted = 0
        self.handshaking: set[trio.CancelScope] = set()
        self._closed = trio.Event()

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
    handler: Callable[[WebSocketRequest], Awaitable[None]],
    listeners: Sequence[trio.abc.Listener[Any]],
    *,
    handler_nursery: trio.Nursery,
    counter: StreamCounter,
    handshake_timeout: float,
    max_message_size: int,
    receive_buffer_size: int,
    task_status: trio.TaskStatus[list[trio.abc.Listener[Any]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on ``listeners`` until cancelled; run ``handler`` per handshake.

    Connections run in ``handler_nursery`` and outlive the cancellation of
    this function, so a caller can stop accepting yet let connections drain.
    The handler must not raise. Whatever it does, the stream is closed when it
    returns, and a client that does not finish its handshake within
    ``handshake_timeout`` is dropped.
    """

    async def read_then_end_handshake(ws: RelayWebSocket, handshake: trio.CancelScope) -> None:
        try:
            await ws._reader_task()
        except Exception:
            # A peer must never be able to take the server down through a
            # library bug: drop this connection, keep serving the others.
            log.exception("relay.reader_failed")
            await trio.aclose_forcefully(ws._stream)
        # The peer left (EOF, reset) before finishing its handshake: stop
        # waiting for a request that cannot come.
        handshake.cancel()

    async def handle_stream(stream: trio.abc.Stream) -> None:
        counter.open += 1
        slot = counter.take_slot()
        request: WebSocketRequest | None = None
        try:
            async with trio.open_nursery() as nursery:
                with trio.CancelScope(
                    deadline=trio.current_time() + handshake_timeout
                ) as handshake:
                    counter.handshaking.add(handshake)
                    if isinstance(stream, trio.SSLStream):
                        # Handshake TLS up front, so a client that offers only
                        # refused versions or groups fails now, not at timeout.
                        try:
                            await stream.do_handshake()
                        except trio.BrokenResourceError:
                            return
                    ws = RelayWebSocket(
                        stream,
                        WSConnection(ConnectionType.SERVER),
                        message_queue_size=1,
                        max_message_size=max_message_size,
                        receive_buffer_size=receive_buffer_size,
                    )
                    nursery.start_soon(read_then_end_handshake, ws, handshake)
                    request = await ws._get_request()
                counter.handshaking.discard(handshake)
                try:
                    # The handler runs its own timers from here on.
                    if request is not None and not slot:
                        log.warning("relay.full", extra=fields(limit=counter.limit))
                        await request.reject(503, body=b"too many connections\n")
                    elif request is not None:
                        await handler(request)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            counter.handshaking.discard(handshake)
            try:
                # Under cancellation this degrades to an immediate close.
                await linger_close(stream)
            finally:
                counter.stream_closed(slot)

    await trio.serve_listeners(
        handle_stream, list(listeners), handler_nursery=handler_nursery, task_status=task_status
    )


class _SpentHandshake:
    """Stands in for wsproto's ``WSConnection.handshake`` after the upgrade.

    Once ``WSConnection.connection`` is set, wsproto only asks the handshake
    for its (by then empty) event queue, in ``WSConnection.events``.
    """

    __slots__ = ()

    def events(self) -> Iterator[Any]:
        return iter(())


SPENT_HANDSHAKE: Final = _SpentHandshake()


def release_handshake(ws: WebSocketConnection) -> None:
    """Drop wsproto's handshake state of an accepted connection (see above)."""
    conn = getattr(ws, "_wsproto", None)
    if isinstance(conn, WSConnection) and conn.connection is not None:
        pending = getattr(conn.handshake, "_events", None)
        if pending is not None and not pending:  # nothing left to hand over
            conn.handshake = SPENT_HANDSHAKE  # type: ignore[assignment]
