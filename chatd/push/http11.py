"""A minimal HTTP/1.1 POST client for wake-ups: h11 over Trio streams, with
keep-alive connections kept per checked address.

Why not httpx here: measured with bench/push_sender.py, httpx (with
httpcore) costs about 1.3 ms of CPU per wake-up POST, so 1,000 wake-ups a
second would need more than one core. A wake-up needs one request shape
only (POST, a small body, the status line of the answer, no redirects, no
cookies, no proxies, no decoding), so this client does just that with
h11, the HTTP/1.1 state machine httpcore itself uses.

* Connections are keyed by (scheme, checked address, port, TLS server
  name) and reused while idle for less than ``IDLE_SECONDS`` and not
  readable (a readable idle connection was closed by the peer); at most
  ``max_idle`` of them stay open.
* TLS: verified against certifi's CA bundle (as httpx does), the server
  name is the URL's host, HTTP/1.1 only.
* The answer's body is read and discarded up to ``MAX_BODY`` bytes so the
  connection can be reused; a longer one closes the connection.
* Errors: every failure of the network or the peer's HTTP raises
  :class:`PostError`; cancellation (the caller's timeout) closes the
  connection in use.
"""

from __future__ import annotations

import select
import ssl
from collections import deque
from typing import Final

import certifi
import h11
import trio

IDLE_SECONDS: Final = 30.0  # an idle connection older than this is closed, not reused
MAX_BODY: Final = 16 * 1024  # bytes of an answer's body read to keep the connection
READ_SIZE: Final = 16 * 1024

Key = tuple[str, str, int, str]  # scheme, address, port, TLS server name


class PostError(Exception):
    """The POST failed: no connection, TLS, a broken or malformed answer."""


class _NoAnswer(Exception):
    """The connection failed before any byte of an answer came."""


class _Connection:
    __slots__ = ("stream", "h11", "idle_since", "answering")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0
        self.answering = False  # a byte of the current answer has come

    def looks_closed(self) -> bool:
        """Readable while idle: the peer closed it (or sent what it must not)."""
        stream = self.stream
        if isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        sock = getattr(stream, "socket", None)
        if sock is None:
            return True
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)


class Client:
    """Keep-alive connections and POSTs over them. Not a service: no tasks of
    its own; :meth:`aclose` closes the idle connections."""

    def __init__(
        self, *, user_agent: str, max_idle: int, tls: ssl.SSLContext | None = None
    ) -> None:
        self.user_agent = user_agent
        self.max_idle = max_idle
        self._idle: dict[Key, deque[_Connection]] = {}
        self._idle_count = 0
        self._tls = tls  # None: certifi's CAs, made when first needed

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            # certifi's CA bundle, as httpx (which sent wake-ups before) uses.
            self._tls = ssl.create_default_context(cafile=certifi.where())
            self._tls.set_alpn_protocols(["http/1.1"])
        return self._tls

    async def _connect(self, key: Key) -> _Connection:
        scheme, address, port, server_name = key
        try:
            stream: trio.abc.Stream = await trio.open_tcp_stream(address, port)
            if scheme == "https":
                tls = trio.SSLStream(
                    stream, self._tls_context(), server_hostname=server_name, https_compatible=True
                )
                await tls.do_handshake()
                stream = tls
        except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
            raise PostError(type(exc).__name__) from None
        return _Connection(stream)

    def _take_idle(self, key: Key) -> _Connection | None:
        idle = self._idle.get(key)
        now = trio.current_time()
        while idle:
            conn = idle.pop()  # the most recently used first
            self._idle_count -= 1
            if now - conn.idle_since < IDLE_SECONDS and not conn.looks_closed():
                return conn
            _close_now(conn)
        return None

    def _put_idle(self, key: Key, conn: _Connection) -> None:
        if self._idle_count >= self.max_idle:
            _close_now(conn)
            return
        conn.idle_since = trio.current_time()
        self._idle.setdefault(key, deque()).append(conn)
        self._idle_count += 1

    async def post(self, key: Key, target: str, headers: list[tuple[str, str]], body: bytes) -> int:
        """POST ``body`` to ``target`` (path and query) over a connection to
        ``key``; the answer's status code. A kept-alive connection that the
        peer closed just as it was reused (no answer at all) is replaced by a
        new one, once. Raises PostError."""
        request = h11.Request(
            method="POST",
            target=target,
            headers=[
                *headers,
                ("User-Agent", self.user_agent),
                ("Content-Length", str(len(body))),
            ],
        )
        conn = self._take_idle(key)
        if conn is not None:
            try:
                return await self._exchange(key, conn, request, body)
            except _NoAnswer:
                pass  # closed by the peer while idle: a new connection below
        try:
            return await self._exchange(key, await self._connect(key), request, body)
        except _NoAnswer as exc:
            raise PostError(str(exc)) from None

    async def _exchange(
        self, key: Key, conn: _Connection, request: h11.Request, body: bytes
    ) -> int:
        reusable = False
        try:
            try:
                conn.answering = False
                data = conn.h11.send(request) or b""
                data += conn.h11.send(h11.Data(data=body)) or b""
                data += conn.h11.send(h11.EndOfMessage()) or b""
                await conn.stream.send_all(data)
                status, reusable = await _read_answer(conn)
            except (h11.ProtocolError, OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
                if not conn.answering:  # not one byte of an answer
                    raise _NoAnswer(type(exc).__name__) from None
                raise PostError(type(exc).__name__) from None
        finally:
            if reusable:
                self._put_idle(key, conn)
            else:
                _close_now(conn)
        return status

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                _close_now(conn)
        self._idle.clear()
        self._idle_count = 0
        await trio.lowlevel.checkpoint()


async def _read_answer(conn: _Connection) -> tuple[int, bool]:
    """The status of the answer, and whether the connection can be reused."""
    status = 0
    body = 0
    while True:
        event = conn.h11.next_event()
        if event is h11.NEED_DATA:
            data = await conn.stream.receive_some(READ_SIZE)
            conn.answering = conn.answering or bool(data)
            conn.h11.receive_data(bytes(data))  # b"" is the end of the stream
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += len(event.data)
            if body > MAX_BODY:
                return status, False
        elif isinstance(event, h11.EndOfMessage):
            if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
                conn.h11.start_next_cycle()
                return status, True
            return status, False
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            if status:
                return status, False
            if conn.answering:
                raise PostError("the connection closed during the answer")
            raise _NoAnswer("the connection closed before an answer")
        # h11.InformationalResponse (1xx): keep reading


def _close_now(conn: _Connection) -> None:
    """Close without waiting (no TLS close_notify: wake-up answers are done)."""
    stream = conn.stream
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    sock = getattr(stream, "socket", None)
    if sock is not None:
        sock.close()
