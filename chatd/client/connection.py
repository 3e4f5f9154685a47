"""One logical connection to the relay that survives drops.

:class:`Connection` owns the WebSocket. ``serve`` connects, reads ``hello``,
authenticates (``login`` the first time; ``resume``, then ``refresh``, then
``login`` again after a drop), and then runs three tasks per WebSocket: the
reader (which never stops reading, docs/PROTOCOL.md section 11), a keepalive
``ping`` every third of the idle timeout, and a token refresher that sends
``refresh`` at 80 % of the access token's lifetime. When the WebSocket drops
it reconnects with exponential backoff and full jitter (section 14).

Replies are matched to requests by ``id``. Frames that are not replies
(``deliver``, pushed ``key_count``, anything else) go to ``unsolicited``, a
bounded channel that the client's inbound worker drains; the reader waits
when it is full, which is the backpressure the protocol asks for.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from .errors import ConnectionLostError, LoginError, ServerRefusedError

log = logging.getLogger(__name__)

REQUEST_TIMEOUT: Final = 30.0  # seconds to wait for a reply (including a reconnect)
HELLO_TIMEOUT: Final = 10.0  # seconds from connecting to hello
UNSOLICITED_FRAMES: Final = 64  # frames buffered for the inbound worker
BACKOFF_CAP: Final = 60.0  # seconds
STABLE_AFTER: Final = 30.0  # seconds connected before the backoff resets
REFRESH_AT: Final = 0.8  # of the access token's remaining lifetime
MAX_FRAME_BYTES: Final = 1 << 20  # what we accept from the server


@dataclass
class Credentials:
    username: str
    password: str
    device_name: str
    totp: str | None = None
    device_id: str | None = None
    access_token: str | None = None
    refresh_token: str | None = None
    access_expires_at: int = 0  # unix ms

    def __repr__(self) -> str:  # never print secrets
        return f"Credentials(username={self.username!r}, device_id={self.device_id!r})"


@dataclass
class _Pending:
    done: trio.Event = field(default_factory=trio.Event)
    reply: dict[str, Any] | None = None


class Connection:
    """The relay connection of one device. Start :meth:`serve` in a nursery."""

    def __init__(
        self,
        url: str,
        credentials: Credentials,
        *,
        ssl_context: ssl.SSLContext | None = None,
        backoff_base: float = 1.0,
        on_session: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        self.url = url
        self.credentials = credentials
        self.ssl_context = ssl_context
        self.backoff_base = backoff_base
        self.on_session = on_session
        self.user_id = 0
        self.connects = 0  # successful authentications, for tests and status
        #: From the last ``hello``: the server's limits and the features it lists.
        self.limits: dict[str, Any] = {}
        self.features: frozenset[str] = frozenset()
        self._ws: Any = None
        self._ids = (f"c{n}" for n in itertools.count(1))
        self._pending: dict[str, _Pending] = {}
        self._connected = trio.Event()
        self._send, self.unsolicited = trio.open_memory_channel[dict[str, Any]](UNSOLICITED_FRAMES)
        self._closing = False

    @property
    def connected(self) -> bool:
        return self._ws is not None

    async def wait_connected(self) -> None:
        await self._connected.wait()

    # -- requests -------------------------------------------------------------

    async def request(self, frame_type: str, **fields: Any) -> dict[str, Any]:
        """Send a request and return its reply frame (``error`` frames raise
        ServerRefusedError). Waits for a connection if there is none; raises
        ConnectionLostError if it drops before the reply, TooSlowError after
        REQUEST_TIMEOUT."""
        with trio.fail_after(REQUEST_TIMEOUT):
            await self._connected.wait()
            request_id = next(self._ids)
            pending = self._pending[request_id] = _Pending()
            try:
                await self._ws.send_message(
                    json.dumps({"type": frame_type, "id": request_id, **fields})
                )
                await pending.done.wait()
            except ConnectionClosed:
                raise ConnectionLostError(f"the connection dropped during {frame_type}") from None
            finally:
                self._pending.pop(request_id, None)
        reply = pending.reply
        if reply is None:
            raise ConnectionLostError(f"the connection dropped during {frame_type}")
        if reply.get("type") == "error":
            raise ServerRefusedError(reply["code"], reply.get("message", ""), reply.get("field"))
        return reply

    async def send_frame(self, frame_type: str, **fields: Any) -> None:
        """Send a frame that gets no reply (``ack`` without id). Best effort:
        a dropped connection is ignored (the server re-delivers, we de-duplicate)."""
        ws = self._ws
        if ws is None:
            return
        try:
            await ws.send_message(json.dumps({"type": frame_type, **fields}))
        except ConnectionClosed:
            pass

    async def aclose(self) -> None:
        """Say ``bye`` and stop reconnecting."""
        self._closing = True
        ws = self._ws
        if ws is not None:
            try:
                await ws.send_message('{"type":"bye"}')
            except ConnectionClosed:
                pass

    async def drop(self) -> None:
        """Close the WebSocket abruptly, as a network failure would (for tests)."""
        if self._ws is not None:
            await self._ws.aclose(4000, "dropped by the client")

    # -- the connection loop --------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect and stay connected until :meth:`aclose` or cancellation.

        The first connection's failures (refused, login refused) raise to the
        caller of ``nursery.start``. Later drops reconnect with backoff; a
        refused login after a drop (password changed, session revoked) raises
        LoginError out of the nursery.
        """
        attempt = 0
        started = False
        while not self._closing:
            began = trio.current_time()
            try:
                async with open_websocket_url(
                    self.url, self.ssl_context, max_message_size=MAX_FRAME_BYTES
                ) as ws:
                    limits = await self._authenticate(ws)
                    self.limits = limits
                    self._ws = ws
                    self._connected.set()
                    self.connects += 1
                    if not started:
                        task_status.started()
                        started = True
                    await self._run_connection(ws, limits)
            except Exception as exc:
                if not _transient(exc):
                    raise
                if not started:
                    raise ConnectionLostError(f"cannot connect to {self.url}: {exc!r}") from None
                log.info("client.disconnected", extra={"error": type(exc).__name__})
            finally:
                self._ws = None
                self._connected = trio.Event()
                for pending in self._pending.values():
                    pending.done.set()  # reply None: ConnectionLostError
            if self._closing:
                return
            if trio.current_time() - began >= STABLE_AFTER:
                attempt = 0
            delay = random.uniform(0, min(BACKOFF_CAP, self.backoff_base * 2**attempt))  # noqa: S311
            attempt += 1
            await trio.sleep(delay)

    async def _direct(self, ws: Any, frame_type: str, **fields: Any) -> dict[str, Any]:
        """A request before the reader runs: read until its reply."""
        request_id = next(self._ids)
        await ws.send_message(json.dumps({"type": frame_type, "id": request_id, **fields}))
        while True:
            frame = json.loads(await ws.get_message())
            if frame.get("id") == request_id:
                return frame  # type: ignore[no-any-return]

    async def _authenticate(self, ws: Any) -> dict[str, Any]:
        """hello, then resume / refresh / login. Returns hello's limits."""
        with trio.fail_after(HELLO_TIMEOUT):
            hello = json.loads(await ws.get_message())
        if hello.get("type") != "hello" or hello.get("protocol") != 1:
            raise LoginError("unsupported_protocol", "the server does not speak protocol 1")
        self.features = frozenset(f for f in hello.get("features", []) if isinstance(f, str))
        c = self.credentials
        with trio.fail_after(REQUEST_TIMEOUT):
            if c.access_token and c.access_expires_at > time.time() * 1000 + 5000:
                reply = await self._direct(ws, "resume", access_token=c.access_token)
                if reply["type"] == "session":
                    await self._session(reply)
                    return dict(hello["limits"])
            if c.refresh_token:
                reply = await self._direct(ws, "refresh", refresh_token=c.refresh_token)
                if reply["type"] == "tokens":
                    self._tokens(reply)
                    return dict(hello["limits"])
                if reply.get("code") == "rate_limited":
                    raise trio.TooSlowError  # transient: back off and retry
            login: dict[str, Any] = {
                "username": c.username,
                "password": c.password,
                "device_name": c.device_name,
            }
            if c.totp:
                login["totp"] = c.totp
            if c.device_id:
                login["device_id"] = c.device_id
            reply = await self._direct(ws, "login", **login)
        if reply["type"] != "session":
            raise LoginError(reply.get("code", "?"), reply.get("message", ""), reply.get("field"))
        c.totp = None  # one-time: a later login after a drop cannot reuse it
        await self._session(reply)
        return dict(hello["limits"])

    async def _session(self, reply: dict[str, Any]) -> None:
        c = self.credentials
        self.user_id = reply["user"]["id"]
        if reply.get("access_token"):
            c.access_token, c.refresh_token = reply["access_token"], reply["refresh_token"]
            c.access_expires_at = reply["access_expires_at"]
        c.device_id = reply.get("device_id") or c.device_id
        await self.on_session(reply)

    def _tokens(self, reply: dict[str, Any]) -> None:
        c = self.credentials
        c.access_token, c.refresh_token = reply["access_token"], reply["refresh_token"]
        c.access_expires_at = reply["access_expires_at"]

    async def _run_connection(self, ws: Any, limits: dict[str, Any]) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keepalive, ws, float(limits["idle_timeout_seconds"]) / 3)
            nursery.start_soon(self._refresher)
            try:
                await self._read(ws)
            except ConnectionClosed:
                pass
            finally:
                nursery.cancel_scope.cancel()

    async def _read(self, ws: Any) -> None:
        while True:
            frame = json.loads(await ws.get_message())
            request_id = frame.get("id")
            if frame.get("type") == "pong" and request_id is None:
                continue  # keepalive answer
            if request_id is not None and request_id in self._pending:
                pending = self._pending[request_id]
                pending.reply = frame
                pending.done.set()
            elif request_id is None:
                await self._send.send(frame)
            # a reply to a request nobody waits for any more: drop it

    async def _keepalive(self, ws: Any, every: float) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await trio.sleep(every)
                await ws.send_message('{"type":"ping"}')

    async def _refresher(self) -> None:
        while True:
            left = self.credentials.access_expires_at / 1000 - time.time()
            await trio.sleep(max(1.0, left * REFRESH_AT) if math.isfinite(left) else 60.0)
            token = self.credentials.refresh_token
            if token is None:
                continue
            try:
                self._tokens(await self.request("refresh", refresh_token=token))
            except ServerRefusedError as exc:
                log.warning("client.refresh_refused", extra={"code": exc.code})
            except (ConnectionLostError, trio.TooSlowError):
                return  # the next connection refreshes or logs in again


_TRANSIENT: Final = (
    ConnectionClosed,
    HandshakeError,
    OSError,
    trio.TooSlowError,
    ConnectionLostError,
)


def _transient(exc: BaseException) -> bool:
    """True for failures a reconnect may cure (also inside exception groups)."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_transient(e) for e in exc.exceptions)
    return isinstance(exc, _TRANSIENT)
