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
  about 2 KiB per idle connection, and puts the connection's own (always
  empty) event deque on a list.
* trio-websocket reads every connection in a second task through a memory
  channel. :class:`RelayWebSocket` is read by the task that handles it
  instead: one task, one coroutine stack and no channel per connection.

It builds on trio-websocket's ``WebSocketConnection`` and ``WebSocketRequest``
(the handshake answer, sending, event handlers) and so relies on their
private attributes and methods (``_wsproto``, ``_stream``, ``_send``,
``_accept``, the ``_handle_*_event`` handlers); the dependency is pinned
below 0.13 in pyproject.toml for that reason, and ``tests/test_relay.py``
covers each behaviour.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, Final, cast

import trio
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection, WebSocketRequest
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, Request, TextMessage
from wsproto.utilities import RemoteProtocolError

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


class _Unused:
    """Stands in for the trio Events trio-websocket keeps per connection for a
    background reader and for its ``aclose()``, neither of which runs here:
    they are only ever ``set()``. Shared by every connection (about 650 bytes
    each saved)."""

    __slots__ = ()

    def set(self) -> None:
        pass


_UNUSED: Final = _Unused()


class RelayWebSocket(WebSocketConnection):
    """trio-websocket's server connection, read by the task that handles it.

    trio-websocket reads each connection in a background task that feeds a
    memory channel, and ``get_message`` waits on the channel: two tasks, two
    coroutine stacks, a nursery and a channel per connection, about 6 KiB of
    an idle connection's 25. Here the caller of :meth:`get_message` (and of
    :meth:`read_request` and :meth:`aclose`) reads the socket itself and feeds
    wsproto, one event at a time, through trio-websocket's own event handlers.
    Sending is trio-websocket's, unchanged, and may run in another task. Only
    one task may read at a time; nothing reads unless one of those is awaited,
    so a Ping is answered when the handler next waits for a message.

    Beyond that it answers framing errors with a Close frame (trio-websocket
    drops the TCP connection) and measures messages in UTF-8 bytes
    (trio-websocket counts characters).
    """

    def __init__(self, stream: trio.abc.Stream, *, max_message_size: int, receive_buffer_size: int):
        # Not WebSocketConnection.__init__: it makes the channel, the Future
        # and the Events of the background reader. These are the attributes
        # trio-websocket's methods used here read.
        self._close_reason: CloseReason | None = None
        self._id = next(WebSocketConnection.CONNECTION_ID)
        self._stream = stream
        self._stream_lock = trio.StrictFIFOLock()
        self._wsproto = WSConnection(ConnectionType.SERVER)
        self._message_parts: list[bytes | str] = []
        self._max_message_size = max_message_size
        self._receive_buffer_size = receive_buffer_size
        self._reader_running = True
        self._initial_request = None
        self._path: str | None = None
        self._subprotocol: str | None = None
        self._handshake_headers: tuple[tuple[bytes, bytes], ...] = ()
        self._open_handshake = self._close_handshake = _UNUSED  # type: ignore[assignment]
        self._for_testing_peer_closed_connection = _UNUSED  # type: ignore[assignment]
        self._utf8_size = 0  # bytes of the message being received so far
        self._events: Iterator[Event] | None = None  # wsproto's, being taken one by one
        self._ready: WebSocketRequest | str | bytes | None = None  # what a handler produced

    # -- reading, in the caller's task ---------------------------------------------

    async def _handle_one(self) -> bool:
        """Take the next wsproto event, reading the socket as needed, and handle
        it; False once nothing more can come. (One coroutine, not two: it is
        part of every idle connection's stack.)"""
        event: Event | None = None
        while event is None:
            if self._events is not None:
                event = next(self._events, None)
                if event is None:
                    self._events = None
                continue
            if not self._reader_running:
                return False
            try:
                data = await self._stream.receive_some(self._receive_buffer_size)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self._abort_web_socket()
                return False
            if not data:
                # TCP closed before the WebSocket did: an abnormal closure.
                self._reader_running = False
                if self._wsproto.state != ConnectionState.CLOSED:
                    await self._abort_web_socket()
                return False
            if self._wsproto.state == ConnectionState.CLOSED:
                continue
            try:
                self._wsproto.receive_data(bytes(data))
            except RemoteProtocolError as err:
                # A bad handshake request: wsproto's hint is the HTTP 400.
                if err.event_hint is not None:
                    await self._send(err.event_hint)
                await self._close_stream()
                continue
            self._events = self._wsproto.events()
        try:
            if isinstance(event, TextMessage | BytesMessage):
                await self._handle_message_event(event)
            elif isinstance(event, Request):
                self._ready = WebSocketRequest(self, event)
            elif isinstance(event, CloseConnection):
                await self._handle_close_connection_event(event)
            elif isinstance(event, Ping):
                await self._handle_ping_event(event)
            # A Pong answers nothing here (no ping() is ever sent): ignored.
        except ConnectionClosed:
            self._reader_running = False
        return True

    async def read_request(self) -> bool:
        """Read until the client's handshake request; False if it never came."""
        while self._ready is None:
            if not await self._handle_one():
                return False
        # Nothing else can be pending in the handshake; let go of wsproto's
        # iterator over it, so release_handshake can drop the handshake state.
        self._events = None
        return True

    def take_request(self) -> WebSocketRequest:
        """The request :meth:`read_request` read; the connection keeps no reference."""
        request, self._ready = self._ready, None
        assert isinstance(request, WebSocketRequest)  # noqa: S101 - after read_request
        return request

    async def get_message(self) -> str | bytes:
        """The next message. Raises ConnectionClosed once the connection is
        closing: after the peer's Close frame, ours, or the stream's end."""
        while self._ready is None:
            if self._close_reason is not None or not await self._handle_one():
                raise ConnectionClosed(self._close_reason)
        message, self._ready = self._ready, None
        assert not isinstance(message, WebSocketRequest)  # noqa: S101 - after the handshake
        return message

    async def _aclose(self, code: int, reason: str | None) -> None:
        """Send our Close, read (and drop) until the peer's reply, then close the
        stream. The caller bounds the wait."""
        if self._close_reason:
            return
        try:
            if self._wsproto.state == ConnectionState.OPEN:
                self._close_reason = CloseReason(code, reason)
                await self._send(CloseConnection(code=code, reason=reason))
                while await self._handle_one() and not self._closed_both_ways():
                    self._ready = None  # a message sent before the peer saw our Close
        except ConnectionClosed:
            pass
        finally:
            await self._close_stream()

    async def ping(self, payload: bytes | None = None) -> None:
        """Not available: waiting for a Pong needs a reader running beside the
        caller, which this connection does not have. The relay never pings
        (clients keep alive with the protocol's ``ping`` frame)."""
        raise NotImplementedError("RelayWebSocket does not send WebSocket Pings")

    def _closed_both_ways(self) -> bool:
        return self._wsproto.state == ConnectionState.CLOSED

    async def _close_web_socket(self, code: int, reason: str | None = None) -> None:
        self._close_reason = CloseReason(code, reason)

    # -- trio-websocket's event handlers, adjusted ---------------------------------

    async def _handle_message_event(self, event: BytesMessage | TextMessage) -> None:
        data: bytes | str = bytes(event.data) if isinstance(event, BytesMessage) else event.data
        self._utf8_size += len(data) if isinstance(data, bytes | bytearray) else len(data.encode())
        if self._utf8_size > self._max_message_size:
            self._utf8_size = 0
            self._message_parts = []
            self._close_reason = CloseReason(CLOSE_TOO_BIG, REASON_TOO_BIG)
            await self._send(CloseConnection(code=CLOSE_TOO_BIG, reason=REASON_TOO_BIG))
            self._reader_running = False
            return
        self._message_parts.append(data)
        if event.message_finished:
            parts, self._message_parts, self._utf8_size = self._message_parts, [], 0
            if isinstance(event, BytesMessage):
                self._ready = b"".join(cast(list[bytes], parts))
            else:
                self._ready = "".join(cast(list[str], parts))

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

    async def handle_stream(stream: trio.abc.Stream) -> None:
        counter.open += 1
        slot = counter.take_slot()
        requested = False
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
                ws = RelayWebSocket(
                    stream,
                    max_message_size=max_message_size,
                    receive_buffer_size=receive_buffer_size,
                )
                requested = await ws.read_request()
            counter.handshaking.discard(handshake)
            # The handler runs its own timers from here on.
            if requested and not slot:
                log.warning("relay.full", extra=fields(limit=counter.limit))
                await ws.take_request().reject(503, body=b"too many connections\n")
            elif requested:
                # Not kept in a variable here: the handler lets go of the
                # request (and its headers) once it has accepted it.
                await handler(ws.take_request())
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


class EventQueue(list[Any]):
    """Stands in for the deque in which wsproto's ``Connection`` queues the
    events it makes itself (only a CloseConnection on ``receive_data(None)``,
    which the relay never calls): the same queue on a list, about 70 bytes
    where an empty deque takes 624, on every idle connection."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


def release_handshake(ws: WebSocketConnection) -> None:
    """Drop wsproto's handshake state of an accepted connection, and put its
    own event queue on a list (see above)."""
    conn = getattr(ws, "_wsproto", None)
    if isinstance(conn, WSConnection) and conn.connection is not None:
        pending = getattr(conn.handshake, "_events", None)
        if pending is not None and not pending:  # nothing left to hand over
            conn.handshake = SPENT_HANDSHAKE  # type: ignore[assignment]
        own = getattr(conn.connection, "_events", None)
        if isinstance(own, deque) and not own:
            conn.connection._events = EventQueue()  # type: ignore[assignment]
