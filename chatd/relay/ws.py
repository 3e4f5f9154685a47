"""The WebSocket server: TCP (and TLS) streams, the HTTP upgrade, and framing.

It speaks h11 for the upgrade request and wsproto's post-handshake
:class:`wsproto.connection.Connection` for frames, both through their public
APIs, the way hypercorn's ``protocol/ws_stream.py`` does. Everything above
frames (what a message means, send queues, timeouts) belongs to
:mod:`chatd.relay.connection`.

What it guarantees, each covered by ``tests/test_relay.py``:

* A rejected upgrade (404, 403, 503) is answered and hung up, and so is a
  malformed one: 400 for a Sec-WebSocket-Key that is not the base64 of 16
  bytes (RFC 6455 4.2.1), as for a missing one. Accepting connections,
  screening them and the handshake timeout are :mod:`chatd.relay.accept`'s.
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
import os
from collections.abc import Iterator, Sequence
from typing import Final

import h11
import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, TextMessage
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import generate_accept_token, split_comma_header

from chatd.errors import ChatdError
from chatd.protocol.core import CLOSE_TOO_BIG, REASON_TOO_BIG

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
