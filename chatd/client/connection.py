"""One logical connection to the relay that survives drops.

:class:`Connection` owns the WebSocket. ``serve`` connects, reads ``hello``,
authenticates (``login``, or ``register`` with an invite, the first time;
``resume``, then ``refresh`` after a drop), and then runs three tasks per WebSocket: the
reader (which never stops reading, docs/PROTOCOL.md section 11), a keepalive
``ping`` every third of the idle timeout, and a token refresher that sends
``refresh`` at 80 % of the access token's lifetime. When the WebSocket drops
it reconnects with exponential backoff and full jitter (section 14).

Replies are matched to requests by ``id``. Frames that are not replies
(``deliver``, pushed ``key_count``, anything else) go to ``unsolicited``, a
bounded channel that the client's inbound worker drains; the reader waits
when it is full, which is the backpressure the protocol asks for.

The first connection of a process resumes the session whose tokens the
caller passed in (``on_tokens`` lets it keep them, e.g. in the encrypted
store, so that a restart continues the session instead of opening another),
and logs in with the password only if they no longer work. Later, a session
that ended on the server before its ``expires_at`` (a logout elsewhere, a
removed device, an admin resetting the password) is not replaced by logging
in again with the password the client still holds: that password may be the
old one, and each try would be a failed login in the server's audit log.
``serve`` raises LoginError instead (``session_revoked``, or
``password_reset`` when the server says so), and the user logs in again.
Only a session that simply ran out is replaced by a fresh login.

A certificate the client does not trust fails at once with
:class:`~chatd.client.errors.CertificateError`, which names the problem;
it is not a network failure to retry.
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
from urllib.parse import urlsplit

import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from .errors import CertificateError, ConnectionLostError, LoginError, ServerRefusedError

log = logging.getLogger(__name__)

REQUEST_TIMEOUT: Final = 30.0  # seconds to wait for a reply (including a reconnect)
HELLO_TIMEOUT: Final = 10.0  # seconds from connecting to hello
#: Seconds for the TCP connection, TLS and the WebSocket upgrade, and for the
#: closing handshake. trio-websocket waits 60 s for either by default, and a
#: server that hangs up before its 101 (one being killed) is only noticed
#: when the time runs out: a reconnect would stall that long.
CONNECT_TIMEOUT: Final = 10.0
UNSOLICITED_FRAMES: Final = 64  # frames buffered for the inbound worker
BACKOFF_CAP: Final = 60.0  # seconds
STABLE_AFTER: Final = 30.0  # seconds connected before the backoff resets
REFRESH_AT: Final = 0.8  # of the access token's remaining lifetime
MAX_FRAME_BYTES: Final = 1 << 20  # what we accept from the server
#: Answers to resume/refresh that mean the session is over (not "try later").
SESSION_OVER: Final = frozenset({"invalid_token", "password_reset"})


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
    session_expires_at: int = 0  # unix ms; a session ended before this was revoked
    invite_code: str | None = None  # register with it instead of the first login

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
        on_tokens: Callable[[Credentials], Awaitable[None]] | None = None,
    ) -> None:
        self.url = url
        self.credentials = credentials
        self.ssl_context = ssl_context
        self.backoff_base = backoff_base
        self.connect_timeout = CONNECT_TIMEOUT
        self.on_session = on_session
        self.on_tokens = on_tokens  # called after the tokens changed, to keep them
        self.user_id = 0
        self.connects = 0  # successful authentications, for tests and status
        #: From the last ``hello``: the server's limits and the features it lists.
        self.limits: dict[str, Any] = {}
        self.features: frozenset[str] = frozenset()
        #: The session is restricted until TOTP is set up (mfa_enrollment_required).
        self.restricted = False
        #: Documents the session must accept first (PROTOCOL §8.15): from the
        #: login answer, and from pushed ``consent_required`` frames.
        self.consent_required: list[dict[str, Any]] = []
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

    async def logout(self) -> None:
        """End the session on the server (``logout``) and stop reconnecting.
        If the server refuses, the connection goes on as before."""
        self._closing = True
        try:
            await self.request("logout")
        except BaseException:
            self._closing = False
            raise
        self.credentials.access_token = self.credentials.refresh_token = None
        await self._tokens_changed()
        ws, self._ws = self._ws, None  # the server closes it too (1000 logged out)
        if ws is not None:
            await ws.aclose()

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
                if not started or attempt:
                    await self._check_certificate()
                async with open_websocket_url(
                    self.url,
                    self.ssl_context,
                    max_message_size=MAX_FRAME_BYTES,
                    connect_timeout=self.connect_timeout,
                    disconnect_timeout=self.connect_timeout,
                ) as ws:
                    limits = await self._authenticate(ws, first=not started)
                    if started and self.consent_required:
                        # Gated on reconnecting (a revocation elsewhere meanwhile):
                        # tell the application as a pushed consent_required would.
                        frame = {"type": "consent_required", "documents": self.consent_required}
                        with contextlib.suppress(trio.WouldBlock):
                            self._send.send_nowait(frame)
                    self.limits = limits
                    self._ws = ws
                    self._connected.set()
                    self.connects += 1
                    if not started:
                        task_status.started()
                        started = True
                    await self._run_connection(ws, limits)
            except Exception as exc:
                certificate = _certificate_error(exc)
                if certificate is not None:
                    raise CertificateError(
                        f"the server's TLS certificate is not trusted: {certificate}"
                    ) from None
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

    async def _check_certificate(self) -> None:
        """For ``wss://``: a TLS handshake on its own, so that an untrusted
        certificate fails at once with its reason. (trio-websocket would only
        time out its WebSocket handshake after a minute, without the reason.)"""
        parts = urlsplit(self.url)
        if parts.scheme != "wss" or parts.hostname is None:
            return
        context = self.ssl_context or ssl.create_default_context()
        with trio.fail_after(HELLO_TIMEOUT):
            stream = await trio.open_ssl_over_tcp_stream(
                parts.hostname, parts.port or 443, ssl_context=context, https_compatible=True
            )
            try:
                await stream.do_handshake()
            finally:
                await trio.aclose_forcefully(stream)

    async def _direct(self, ws: Any, frame_type: str, **fields: Any) -> dict[str, Any]:
        """A request before the reader runs: read until its reply."""
        request_id = next(self._ids)
        await ws.send_message(json.dumps({"type": frame_type, "id": request_id, **fields}))
        while True:
            frame = json.loads(await ws.get_message())
            if frame.get("id") == request_id:
                return frame  # type: ignore[no-any-return]
            if frame.get("type") == "consent_required":
                self.consent_required = list(frame.get("documents", []))

    async def _authenticate(self, ws: Any, *, first: bool) -> dict[str, Any]:
        """hello, then resume / refresh / login (on a ``first`` connection,
        or when the session ran out). Returns hello's limits."""
        with trio.fail_after(HELLO_TIMEOUT):
            hello = json.loads(await ws.get_message())
        if hello.get("type") != "hello" or hello.get("protocol") != 1:
            raise LoginError("unsupported_protocol", "the server does not speak protocol 1")
        self.features = frozenset(f for f in hello.get("features", []) if isinstance(f, str))
        c = self.credentials
        with trio.fail_after(REQUEST_TIMEOUT):
            ended: dict[str, Any] | None = None  # why the server refused our tokens
            if c.access_token and c.access_expires_at > time.time() * 1000 + 5000:
                reply = await self._direct(ws, "resume", access_token=c.access_token)
                if reply["type"] == "session":
                    await self._session(reply)
                    return dict(hello["limits"])
                if reply.get("code") == "rate_limited":
                    raise trio.TooSlowError  # transient: back off and retry
                if reply.get("code") in SESSION_OVER:
                    ended = reply
            if c.refresh_token:
                reply = await self._direct(ws, "refresh", refresh_token=c.refresh_token)
                if reply["type"] == "tokens":
                    self.consent_required = list(reply.get("consent_required", []))
                    await self.take_tokens(reply)
                    if first:
                        await self._first_key_count(ws)
                    return dict(hello["limits"])
                if reply.get("code") == "rate_limited":
                    raise trio.TooSlowError  # transient: back off and retry
                ended = reply if reply.get("code") in SESSION_OVER else ended
            if ended is not None:
                # Forgotten here, but left in the caller's keeping until a new
                # login replaces them: the next run learns why they ended.
                c.access_token = c.refresh_token = None
            if ended is not None and not first and c.session_expires_at > time.time() * 1000:
                # Ended early, so someone ended it: never retry the password.
                if ended.get("code") == "password_reset":
                    raise LoginError("password_reset", ended.get("message", ""))
                raise LoginError("session_revoked", "the server ended this session")
            if c.invite_code and not c.device_id:
                frame_type, fields = "register", {"invite_code": c.invite_code}
            else:
                frame_type, fields = "login", {}
                if c.totp:
                    fields["totp"] = c.totp
                if c.device_id:
                    fields["device_id"] = c.device_id
            reply = await self._direct(
                ws,
                frame_type,
                username=c.username,
                password=c.password,
                device_name=c.device_name,
                **fields,
            )
        if reply["type"] != "session":
            if reply.get("code") == "login_failed" and ended and ended["code"] == "password_reset":
                # The old password, typed again: say why it no longer works.
                raise LoginError("password_reset", ended.get("message", ""))
            raise LoginError(reply.get("code", "?"), reply.get("message", ""), reply.get("field"))
        c.totp = c.invite_code = None  # one-time: a later login after a drop cannot reuse them
        await self._session(reply)
        return dict(hello["limits"])

    async def _first_key_count(self, ws: Any) -> None:
        """After ``refresh`` attached the first connection of a process (no
        ``session`` frame, so no ``key_count`` follows): ask for the key count
        with an empty ``keys_upload``, and hand it to the inbound worker as if
        pushed. A restricted session refuses it: then TOTP must be set up."""
        reply = await self._direct(ws, "keys_upload")
        if reply.get("type") == "key_count":
            reply.pop("id", None)
            self._send.send_nowait(reply)
        elif reply.get("code") == "mfa_enrollment_required":
            self.restricted = True
        # consent_required: the key count follows the acceptance.

    async def _session(self, reply: dict[str, Any]) -> None:
        c = self.credentials
        self.user_id = reply["user"]["id"]
        self.restricted = bool(reply.get("mfa_enrollment_required"))
        self.consent_required = list(reply.get("consent_required", []))
        c.session_expires_at = int(reply.get("expires_at", 0))
        if reply.get("access_token"):
            c.access_token, c.refresh_token = reply["access_token"], reply["refresh_token"]
            c.access_expires_at = reply["access_expires_at"]
        c.device_id = reply.get("device_id") or c.device_id
        await self.on_session(reply)
        if reply.get("access_token"):
            await self._tokens_changed()

    async def take_tokens(self, tokens: dict[str, Any]) -> None:
        """Store a new token pair (a ``tokens`` frame, or the ``tokens`` field
        of a reply to a change that rotated them), and hand it to ``on_tokens``."""
        c = self.credentials
        c.access_token, c.refresh_token = tokens["access_token"], tokens["refresh_token"]
        c.access_expires_at = tokens["access_expires_at"]
        c.session_expires_at = int(tokens.get("expires_at", c.session_expires_at))
        await self._tokens_changed()

    async def _tokens_changed(self) -> None:
        if self.on_tokens is not None:
            await self.on_tokens(self.credentials)

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
            if frame.get("type") == "consent_required":
                self.consent_required = list(frame.get("documents", []))
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
                await self.take_tokens(await self.request("refresh", refresh_token=token))
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


def _certificate_error(exc: BaseException) -> str | None:
    """What was wrong with the server's certificate, if that is why ``exc``
    happened (also inside exception groups and causes)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ssl.SSLCertVerificationError):
            return str(e.verify_message or e.reason or e)
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    return None


def _transient(exc: BaseException) -> bool:
    """True for failures a reconnect may cure (also inside exception groups)."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_transient(e) for e in exc.exceptions)
    return isinstance(exc, _TRANSIENT)
