"""The WebSocket server: TCP (and TLS) streams, the HTTP upgrade, and framing.

It speaks h11 for the upgrade request and wsproto's post-handshake
:class:`wsproto.connection.Connection` for frames, both through their public
APIs, the way hypercorn's ``protocol/ws_stream.py`` does. Everything above
frames (what a message means, send queues, timeouts) belongs to
:mod:`chatd.relay.connection`.

What it guarantees, each covered by ``tests/test_relay.py``:

* Every stream is closed when its handler returns, whatever happened, and a
  peer that does not finish its upgrade within the handshake timeout is
  dropped. A rejected upgrade (404, 403, 503) is answered and hung up, and
  so is a malformed one: 400 for a Sec-WebSocket-Key that is not the base64
  of 16 bytes (RFC 6455 4.2.1), as for a missing one.
* A connection takes a slot at TCP accept, before its upgrade, so a burst of
  concurrent handshakes cannot exceed the connection limit.
* A framing error (unmasked frame, reserved opcode, bad UTF-8, ...) and a
  message over the size limit, counted in UTF-8 bytes as it arrives, end the
  connection with a Close frame carrying wsproto's (or our 1009) code.
* Closing is lingering: after our Close frame we half-close and drain the
  peer (its Close frame included) until it hangs up, for a moment at most,
  so that a peer still sending does not make the kernel answer with a reset
  that destroys our Close frame in flight.
* A connection is read by the task that handles it: one task, and no channel,
  per idle connection. Control frames (a Pong for the peer's Ping) go out
  through the owner's writer, so only one task ever writes to a stream.
"""

from __future__ import annotations

import base64
import binascii
import errno
import logging
import os
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, Final

import h11
import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, TextMessage
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import generate_accept_token, split_comma_header

from chatd.errors import ChatdError
from chatd.log import fields
from chatd.protocol.core import CLOSE_TOO_BIG, REASON_TOO_BIG

log = logging.getLogger("chatd.relay")

RECEIVE_BUFFER: Final = 4_096  # bytes read from the socket at a time
LINGER_SECONDS: Final = 2.0  # how long a closing connection may drain the peer's data
LINGER_MAX_BYTES: Final = 1_048_576  # how much of it we read and discard, at most
MAX_CLOSE_REASON: Final = 120  # bytes; a Close frame's reason is limited to 123
MAX_REQUEST_HEAD: Final = 16_384  # bytes of the upgrade request's head, at most
WEBSOCKET_VERSION: Final = b"13"
WEBSOCKET_KEY_BYTES: Final = 16  # what a Sec-WebSocket-Key encodes (RFC 6455 4.2.1)


class WebSocketClosed(ChatdError):
    """No more messages can come on this connection.

    ``ours`` says who decides the close: False when the peer sent its Close
    (``code`` is the peer's) or hung up (1006); True when the connection
    broke the rules (a framing error, a message too big) and must be closed
    with ``code``, without writing anything queued before.
    """

    def __init__(self, code: int, reason: str = "", *, ours: bool = False) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason
        self.ours = ours


async def linger_close(stream: trio.abc.Stream) -> None:
    """Close gently: half-close (where the stream can), then read and discard
    what the peer still sends (its Close frame, say) until it hangs up, for a
    moment at most; then close."""
    try:
        with trio.move_on_after(LINGER_SECONDS):
            if isinstance(stream, trio.abc.HalfCloseableStream):
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


class Control:
    """A control frame to send (a Pong), in its place among received messages."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


Message = str | bytes | Control  # a text message, a binary one, or a Pong to send


class WebSocket:
    """One upgraded connection: messages in, frames out, the closing handshake.

    :meth:`receive_some` is called by one task only, which reads the socket itself.
    :meth:`frame` and :meth:`close_frame` make the bytes of a frame without
    writing them; the owner writes (:meth:`send_all`) from one task at a time.
    A Pong for the peer's Ping comes out of :meth:`receive_some` as a
    :class:`Control` in its place among the messages, to be written that way
    too, after the answers to what came before the Ping.
    """

    __slots__ = (
        "stream",
        "_ws",
        "_events",
        "_parts",
        "_size",
        "_ended",
        "max_message",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        max_message: int,
        trailing: bytes = b"",
    ) -> None:
        self.stream = stream
        self._ws = Connection(ConnectionType.SERVER, trailing_data=trailing)
        self._events: Iterator[Event] | None = self._ws.events() if trailing else None
        self._parts: list[str | bytes] = []  # the message being received
        self._size = 0  # its UTF-8 bytes so far
        self._ended: WebSocketClosed | None = None  # to raise once the messages before it are out
        self.max_message = max_message

    @property
    def open(self) -> bool:
        """Neither side has sent a Close frame yet."""
        return self._ws.state is ConnectionState.OPEN

    def frame(self, text: str) -> bytes:
        """The bytes of one text message (unfragmented, unmasked); b"" once a
        Close frame went either way (nothing may follow it)."""
        if self._ws.state is not ConnectionState.OPEN:
            return b""
        return self._ws.send(TextMessage(data=text))

    async def send_all(self, data: bytes) -> None:
        await self.stream.send_all(data)

    def try_send(self, data: bytes) -> int:
        """Write what the socket takes at once, without waiting or yielding;
        returns the bytes written. 0 for a TLS stream (only :meth:`send_all`
        writes those) or a closed one. Raises ``trio.BrokenResourceError`` if
        the peer is gone. Never call it while a :meth:`send_all` is running."""
        stream = self.stream
        if not isinstance(stream, trio.SocketStream):
            return 0
        fd = stream.socket.fileno()  # -1 once closed: never a reused descriptor
        if fd < 0:
            return 0
        try:
            return os.write(fd, data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            raise trio.BrokenResourceError(f"the peer is gone: {exc}") from exc

    async def receive_some(self) -> list[Message]:
        """The complete messages that arrived (at least one; text as str,
        binary as bytes), reading the socket once if none is buffered.

        Raises :class:`WebSocketClosed` once no message can come: the peer's
        Close, a hang-up, a framing error or a message over the limit. Messages
        that arrived before such an end are returned first; the next call
        raises.
        """
        if self._ended is not None:
            raise self._ended
        messages: list[Message] = []
        while True:
            if self._events is None:
                if messages:
                    return messages
                await self._read()
                continue
            event = next(self._events, None)
            if event is None:
                self._events = None
                continue
            try:
                message = self._handle(event)
            except WebSocketClosed as ended:
                self._events = None
                if not messages:
                    raise
                self._ended = ended
                return messages
            if message is not None:
                messages.append(message)

    def _handle(self, event: Event) -> Message | None:
        if isinstance(event, TextMessage | BytesMessage):
            if self._ws.state is not ConnectionState.OPEN:
                return None  # sent before the peer saw our Close: dropped
            return self._take(event)
        if isinstance(event, CloseConnection):
            if self._ws.state is ConnectionState.OPEN:
                # Not the peer's Close (that moves wsproto on) but a frame
                # wsproto could not parse: close with its code.
                reason = (event.reason or "").encode()[:MAX_CLOSE_REASON]
                raise WebSocketClosed(event.code, reason.decode(errors="ignore"), ours=True)
            raise WebSocketClosed(event.code, event.reason or "")
        if isinstance(event, Ping) and self._ws.state is ConnectionState.OPEN:
            return Control(self._ws.send(event.response()))
        # A Pong answers nothing here (the relay never pings), and a Ping
        # after our Close gets no answer: both are dropped.
        return None

    async def _read(self) -> None:
        try:
            data = await self.stream.receive_some(RECEIVE_BUFFER)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            raise WebSocketClosed(CloseReason.ABNORMAL_CLOSURE, "connection lost")
        if self._ws.state is ConnectionState.CLOSED:
            return  # both Closes were exchanged; what follows is noise
        self._ws.receive_data(bytes(data))
        self._events = self._ws.events()

    def _take(self, event: TextMessage | BytesMessage) -> str | bytes | None:
        data = event.data
        self._size += len(data) if isinstance(data, bytes | bytearray) else len(data.encode())
        if self._size > self.max_message:
            self._parts, self._size = [], 0
            raise WebSocketClosed(CLOSE_TOO_BIG, REASON_TOO_BIG, ours=True)
        if event.message_finished and not self._parts:
            self._size = 0
            return bytes(data) if isinstance(data, bytearray) else data
        self._parts.append(bytes(data) if isinstance(data, bytearray) else data)
        if not event.message_finished:
            return None
        parts, self._parts, self._size = self._parts, [], 0
        if isinstance(event, BytesMessage):
            return b"".join(p for p in parts if isinstance(p, bytes))
        return "".join(p for p in parts if isinstance(p, str))

    def close_frame(self, code: int, reason: str) -> bytes:
        """Our Close frame, or b"" when one was sent already (or cannot be)."""
        if self._ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            return self._ws.send(CloseConnection(code=code, reason=reason))
        return b""


class UpgradeRequest:
    """A client's HTTP upgrade request, to be accepted or rejected once."""

    __slots__ = ("stream", "path", "headers", "remote", "_h11", "_key")

    def __init__(
        self,
        stream: trio.abc.Stream,
        conn: h11.Connection,
        request: h11.Request,
        key: bytes,
        remote: str,
    ) -> None:
        self.stream = stream
        self.path = request.target.decode("ascii", errors="replace").partition("?")[0]
        self.headers: list[tuple[bytes, bytes]] = [(k, v) for k, v in request.headers]
        self.remote = remote
        self._h11 = conn
        self._key = key

    def header(self, name: bytes) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return None

    async def accept(self, *, max_message: int) -> WebSocket:
        """Answer 101 and return the WebSocket; the request's state is dropped."""
        response = h11.InformationalResponse(
            status_code=101,
            headers=[
                (b"Upgrade", b"websocket"),
                (b"Connection", b"Upgrade"),
                (b"Sec-WebSocket-Accept", generate_accept_token(self._key)),
            ],
            reason=b"Switching Protocols",
        )
        data = self._h11.send(response) or b""
        trailing = self._h11.trailing_data[0]
        self.headers = []
        await self.stream.send_all(data)
        return WebSocket(self.stream, max_message=max_message, trailing=trailing)

    async def reject(
        self, status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        """Answer ``status`` with a short text body (and extra ``headers``);
        the caller then hangs up."""
        await _try_respond(self.stream, self._h11, status, body, headers)


async def _respond(
    stream: trio.abc.Stream,
    conn: h11.Connection,
    status: int,
    body: bytes,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    head = [
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"Content-Length", str(len(body)).encode()),
        (b"Connection", b"close"),
        *headers,
    ]
    data = conn.send(h11.Response(status_code=status, headers=head)) or b""
    data += conn.send(h11.Data(data=body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)


def _upgrade_refusal(request: h11.Request) -> tuple[int, bytes, list[tuple[bytes, bytes]]] | bytes:
    """The WebSocket key of a valid upgrade request, or why it is not one
    (status, body, extra headers); the checks wsproto's handshake makes."""
    if request.method != b"GET":
        return 405, b"only GET upgrades to a WebSocket\n", [(b"Allow", b"GET")]
    values: dict[bytes, list[bytes]] = {}
    for name, value in request.headers:
        values.setdefault(name, []).append(value)
    tokens = [t.lower() for v in values.get(b"connection", []) for t in split_comma_header(v)]
    if "upgrade" not in tokens or [v.lower() for v in values.get(b"upgrade", [])] != [b"websocket"]:
        return (
            426,
            b"this is a WebSocket endpoint: upgrade to websocket\n",
            [(b"Upgrade", b"websocket")],
        )
    version = values.get(b"sec-websocket-version", [])
    if version != [WEBSOCKET_VERSION]:
        status = 426 if version else 400
        return (
            status,
            b"WebSocket version 13 is required\n",
            [(b"Sec-WebSocket-Version", WEBSOCKET_VERSION)],
        )
    key = values.get(b"sec-websocket-key", [])
    if len(key) != 1 or not key[0]:
        return 400, b"missing Sec-WebSocket-Key\n", []
    if not _is_websocket_key(key[0]):
        return 400, b"Sec-WebSocket-Key must be the base64 of 16 bytes\n", []
    return key[0]


def _is_websocket_key(key: bytes) -> bool:
    """RFC 6455 4.2.1: the key is the base64 of 16 random bytes (24 characters)."""
    try:
        return len(base64.b64decode(key, validate=True)) == WEBSOCKET_KEY_BYTES
    except binascii.Error:
        return False


async def read_upgrade(stream: trio.abc.Stream, remote: str) -> UpgradeRequest | None:
    """Read the upgrade request; answer a malformed one (4xx) and return None.
    None also when the peer leaves first."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            await _try_respond(stream, conn, exc.error_status_hint, b"bad request\n")
            return None
        if isinstance(event, h11.Request):
            refusal = _upgrade_refusal(event)
            if isinstance(refusal, bytes):
                return UpgradeRequest(stream, conn, event, refusal, remote)
            status, body, headers = refusal
            await _try_respond(stream, conn, status, body, headers)
            return None
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive_some(RECEIVE_BUFFER)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if not data:
                return None
            conn.receive_data(bytes(data))
            continue
        return None  # the peer closed, or sent something else first


async def _try_respond(
    stream: trio.abc.Stream,
    conn: h11.Connection,
    status: int,
    body: bytes,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    try:
        await _respond(stream, conn, status, body, headers)
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        pass  # the peer is gone, or h11 cannot answer in its state: we hang up anyway


class StreamCounter:
    """TCP streams, counted from accept to close, and the slots they hold.

    A stream takes a slot at accept if one is free and keeps it until it
    closes; a stream accepted while all ``limit`` slots are taken is answered
    503 after its upgrade request and closed. One TCP peer may have at most
    ``per_peer`` streams in their handshake at once (a slowloris sending its
    request a byte at a time); more are hung up on at accept, unanswered.
    ``exempt`` peers (trusted reverse proxies, which pass on whole requests
    for many clients) have no such limit. ``hang_up_on`` is the owner's own
    say at accept (the relay's: an address far over its connection limits).
    Both refusals happen in the accept loop, before a task is started for
    the stream or a byte of it is read (:meth:`screen`).
    """

    def __init__(
        self,
        limit: int,
        per_peer: int | None = None,
        exempt: Callable[[str], bool] = lambda peer: False,
        hang_up_on: Callable[[str], bool] = lambda peer: False,
    ) -> None:
        self.limit = limit
        self.per_peer = per_peer
        self.exempt = exempt
        self.hang_up_on = hang_up_on
        self.open = 0  # every stream, with or without a slot
        self.slotted = 0
        self.handshaking: set[trio.CancelScope] = set()
        self.handshakes_of: dict[str, int] = {}  # peer -> streams in their handshake
        self.hung_up = 0  # streams refused by the per-peer handshake limit
        self._closed = trio.Event()

    def screen(self, peer: str) -> bool:
        """Whether a stream just accepted from ``peer`` goes on to its
        handshake (counted, see :meth:`begin_handshake`); False: hang up on
        it at once, unanswered."""
        return not self.hang_up_on(peer) and self.begin_handshake(peer)

    def begin_handshake(self, peer: str) -> bool:
        """Count a handshake of ``peer``; False (counting nothing) past ``per_peer``."""
        count = self.handshakes_of.get(peer, 0)
        if self.per_peer is not None and count >= self.per_peer and not self.exempt(peer):
            self.hung_up += 1
            return False
        self.handshakes_of[peer] = count + 1
        return True

    def end_handshake(self, peer: str) -> None:
        count = self.handshakes_of[peer] - 1
        if count:
            self.handshakes_of[peer] = count
        else:
            del self.handshakes_of[peer]

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


def peer_address(stream: trio.abc.Stream) -> str:
    """The remote IP address of a TCP (or TLS over TCP) stream, or ""."""
    inner = getattr(stream, "transport_stream", stream)
    sock = getattr(inner, "socket", None)
    try:
        return str(sock.getpeername()[0]) if sock is not None else ""
    except OSError:
        return ""


async def serve_websockets(
    handler: Callable[[UpgradeRequest], Awaitable[None]],
    listeners: Sequence[trio.abc.Listener[Any]],
    *,
    handler_nursery: trio.Nursery,
    counter: StreamCounter,
    handshake_timeout: float,
    task_status: trio.TaskStatus[list[trio.abc.Listener[Any]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on ``listeners`` until cancelled; run ``handler`` per upgrade request.

    Connections run in ``handler_nursery`` and outlive the cancellation of this
    function, so a caller can stop accepting yet let connections drain. The
    handler must not raise; it accepts or rejects the request. Whatever it does,
    the stream is closed when it returns, and a client that does not finish its
    TLS handshake and upgrade request within ``handshake_timeout`` is dropped.
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

    async def accept_forever(listener: trio.abc.Listener[Any]) -> None:
        """Accept, screen, and start a handler task for what passes. A stream
        the counter refuses is closed here, synchronously: no task, no read."""
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    # Out of descriptors or kernel memory: wait for some to be freed.
                    log.warning(
                        "relay.accept_failed", extra=fields(error=errno.errorcode[exc.errno])
                    )
                    await trio.sleep(_ACCEPT_RETRY_SECONDS)
                    continue
                peer = peer_address(stream)
                if counter.screen(peer):
                    handler_nursery.start_soon(handle_stream, stream, peer)
                elif not close_now(stream):
                    handler_nursery.start_soon(trio.aclose_forcefully, stream)

    async with trio.open_nursery() as accepting:
        for listener in listeners:
            accepting.start_soon(accept_forever, listener)
        task_status.started(list(listeners))


def close_now(stream: trio.abc.Stream) -> bool:
    """Close a just-accepted TCP (or TLS over TCP) stream at once, unanswered
    and unread (a peer that already sent its request gets a TCP reset): the
    cheapest refusal. False if it is no socket stream (close it yourself)."""
    inner = getattr(stream, "transport_stream", stream)
    if not isinstance(inner, trio.SocketStream):
        return False
    inner.socket.close()
    return True


_ACCEPT_CAPACITY_ERRNOS: Final = frozenset(
    (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS)
)
_ACCEPT_RETRY_SECONDS: Final = 0.1  # after one of those
