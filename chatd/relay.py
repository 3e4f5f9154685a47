"""The relay service: the public WebSocket server at ``/v1/ws`` (trio-websocket).

This is the thin I/O layer around :mod:`chatd.protocol.core`. Per connection
it runs one handler task (receive loop); trio-websocket adds its own reader
task. Other tasks exist only while they have work, so an idle connection
costs little: a sender drains the bounded send queue while it holds frames,
a delivery pump (:mod:`chatd.relay_sessions`) reads the device's queue until
the connection is caught up, and a connection that pipelines ``send``/``ack``
requests gets a responder, which sends their replies in order as their
writes commit (see ``_carry_out``).

Guarantees, each backed by a setting:

* The handshake and then the first frame must each arrive within
  ``relay.handshake_timeout_seconds``; after that, any gap of
  ``relay.idle_timeout_seconds`` without a complete message closes the
  connection. This also bounds a half-sent frame, which trio-websocket itself
  would wait on forever.
* A message over ``relay.max_frame_bytes`` closes with 1009.
* The send queue holds ``relay.send_queue_frames`` frames; overflow closes the
  connection with 1008 "send queue full", and one frame may take
  ``relay.send_timeout_seconds`` to write.
* Every close we initiate sends a real Close frame and then, bounded by a
  timeout, hangs up the TCP stream itself, so a peer that never answers the
  Close cannot pin the connection (trio-websocket would wait for it).

Shutdown: when ``stopping`` is set, listeners close (no new connections),
every connection finishes the frame it is handling and is closed with 1001,
and :func:`serve_relay` returns once all are gone. The daemon bounds that
with the grace period.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Final

import trio
from trio_websocket import ConnectionClosed, WebSocketRequest

from chatd.auth.models import SessionGrant
from chatd.auth.service import AuthService
from chatd.config import Config, RelaySettings
from chatd.e2ee.keys import KeyService
from chatd.e2ee.queues import QueueService
from chatd.errors import ConfigError, ListenError
from chatd.log import fields, mask_ip
from chatd.protocol import core
from chatd.protocol.frames import Limits
from chatd.relay_sessions import SessionFrames
from chatd.wsserver import StreamCounter, release_handshake, serve_websockets

log = logging.getLogger("chatd.relay")

WS_PATH: Final = "/v1/ws"
CLOSE_TIMEOUT: Final = 2.0  # seconds to wait for the peer's Close reply before hanging up
RECEIVE_BUFFER: Final = 4_096  # bytes read from the socket at a time
REASON_SEND_TIMEOUT: Final = "send timeout"
PIPELINE_DEPTH: Final = 64  # pipelined requests per connection awaiting their commit

Finish = Callable[[], Awaitable[list[core.Action]]]


class _Client:
    """One live connection: protocol state, socket and send queue."""

    __slots__ = (
        "ws",
        "proto",
        "peer",
        "outbox",
        "sending",
        "out_closed",
        "peer_gone",
        "receive_scope",
        "closing",
        "grant",
        "delivered",
        "unacked",
        "pumping",
        "synced",
        "pump_running",
        "again",
        "helpers",
        "helpers_done",
        "cut_off",
        "pipeline",
        "in_flight",
        "drained",
    )

    def __init__(self, ws: Any, proto: core.ServerConnection, peer: str) -> None:
        self.ws = ws
        self.proto = proto
        self.peer = peer
        # The send queue: frames waiting for the sender task, which runs only
        # while there are some (idle connections do not pay for a task).
        self.outbox: list[bytes] = []
        self.sending = False  # a sender task is draining the outbox
        self.out_closed = False  # the connection is finishing: no new frames
        self.peer_gone = False  # the peer hung up: frames are dropped
        self.receive_scope: trio.CancelScope | None = None
        self.closing: core.Close | None = None
        self.grant: SessionGrant | None = None  # the session, once authenticated
        self.delivered = 0  # highest envelope id sent on this connection
        # Ids sent and not yet acked, ascending (a list: an empty deque costs 600 bytes).
        self.unacked: list[int] = []
        self.pumping = False  # a delivery pump runs for this connection
        # Caught up: it was sent every committed envelope of its device that
        # the relay has heard of, so new ones may be pushed without a read.
        self.synced = False
        self.pump_running = False  # a pump task is reading the queue for it
        self.again = False  # news came while it read: read once more
        # The connection's helper tasks (sender, responder) while any runs:
        # one cancel scope each. They run in the relay's nursery, not one of
        # the connection's own (see Relay._spawn).
        self.helpers: list[trio.CancelScope] | None = None
        self.helpers_done: trio.Event | None = None  # set when the last one ends
        # A write to the socket was interrupted: a frame may be half sent, so
        # nothing valid, not even a Close frame, can follow on this stream.
        self.cut_off = False
        # Pipelined requests (sends, acks) whose replies are not out yet, in
        # order; made on the first one, so idle connections do not pay for it.
        self.pipeline: trio.MemorySendChannel[Finish] | None = None
        self.in_flight = 0
        self.drained: trio.Event | None = None


class Relay:
    """Connection registry and per-connection logic; one per relay service."""

    def __init__(
        self,
        settings: RelaySettings,
        auth: AuthService | None = None,
        keys: KeyService | None = None,
        queues: QueueService | None = None,
    ) -> None:
        self.settings = settings
        self.session_frames = SessionFrames(self, auth, keys, queues)
        self.nursery: trio.Nursery | None = None  # for short pushes; set by serve_relay
        self.limits = Limits(
            max_frame_bytes=settings.max_frame_bytes,
            handshake_timeout_seconds=settings.handshake_timeout_seconds,
            idle_timeout_seconds=settings.idle_timeout_seconds,
            send_queue_frames=settings.send_queue_frames,
            max_bad_frames=settings.max_bad_frames,
        )
        self.clients: set[_Client] = set()
        self.stopping = False
        self.connections_served = 0
        self.port = 0  # the bound port, set by serve_relay
        self.streams = StreamCounter(settings.max_connections)  # TCP streams and slots
        self.trusted_proxies = [
            ipaddress.ip_network(n, strict=False) for n in settings.trusted_proxies
        ]

    # -- handshake --------------------------------------------------------------

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.trusted_proxies)

    def client_address(self, peer: str, headers: list[tuple[bytes, bytes]]) -> str:
        """The client's address: the TCP peer, or, behind a trusted reverse proxy,
        the right-most X-Forwarded-For entry that is not itself a trusted proxy."""
        if not self._trusted(peer):
            return peer
        forwarded = ",".join(
            value.decode("latin-1") for key, value in headers if key.lower() == b"x-forwarded-for"
        )
        for candidate in reversed([part.strip() for part in forwarded.split(",")][-32:]):
            try:
                ipaddress.ip_address(candidate)
            except ValueError:
                return peer  # a malformed chain: trust nothing in it
            if not self._trusted(candidate):
                return candidate
        return peer

    async def handle(self, request: WebSocketRequest) -> None:
        """Check the handshake, accept it and serve the connection until it ends.

        The handler of serve_websockets: it must never raise, or the whole
        server stops. One function rather than several nested ones, because
        every coroutine waiting in an idle connection's stack is memory held
        for as long as it is connected (see wsserver).
        """
        client: _Client | None = None
        try:
            peer = self.client_address(_peer_host(request.remote), request.headers)
            path = request.path.partition("?")[0]
            if path != WS_PATH:
                await request.reject(404, body=b"not found: the relay lives at /v1/ws\n")
                return
            origin = _header(request.headers, b"origin")
            if origin is not None and origin not in self.settings.allowed_origins:
                log.info("relay.origin_refused", extra=fields(peer=mask_ip(peer), origin=origin))
                await request.reject(403, body=b"origin not allowed\n")
                return
            if self.stopping:
                await request.reject(503, body=b"server shutting down\n")
                return
            ws = await request.accept()
            del request  # its headers are not needed again
            release_handshake(ws)
            proto = core.ServerConnection(self.limits, server_name="chatd")
            client = _Client(ws, proto, peer)
            self.clients.add(client)
            self.connections_served += 1
            try:
                await self._receive_loop(client)
            finally:
                # Flush what is queued (an error frame may explain the close),
                # unless the queue itself is the problem: then it is dropped,
                # but the frame being written is finished, so a Close frame can
                # follow it. After a send timeout nothing can.
                if client.pipeline is not None:
                    client.pipeline.close()
                client.out_closed = True
                closing = client.closing
                if closing is not None and closing.reason == core.REASON_SEND_QUEUE_FULL:
                    client.outbox.clear()
                await self._end_helpers(
                    client, flush=closing is not None and closing.reason != REASON_SEND_TIMEOUT
                )
        except Exception:
            if client is None:
                log.exception("relay.handler_failed")
                return
            log.exception("relay.connection_failed", extra=fields(peer=mask_ip(client.peer)))
            client.closing = core.Close(core.CLOSE_INTERNAL_ERROR, core.REASON_INTERNAL)
        finally:
            if client is not None:
                try:
                    self.clients.discard(client)
                    self.session_frames.detach(client)
                    await self._hang_up(client)
                except Exception:
                    log.exception("relay.handler_failed")

    # -- per-connection loop ----------------------------------------------------

    def _spawn(self, client: _Client, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Start one of a connection's helper tasks (sender, responder).

        They run in the relay's nursery, each in a cancel scope the connection
        keeps while it runs, and :meth:`_end_helpers` waits for them before the
        connection hangs up. A nursery per connection would do the same but
        stays for the connection's whole life: about 1.3 KiB on every idle one.
        """
        assert self.nursery is not None  # noqa: S101 - set by serve_relay
        scope = trio.CancelScope()
        if client.helpers is None:
            client.helpers = []
        client.helpers.append(scope)
        self.nursery.start_soon(self._helper, client, scope, fn, *args)

    async def _helper(
        self,
        client: _Client,
        scope: trio.CancelScope,
        fn: Callable[..., Awaitable[None]],
        *args: Any,
    ) -> None:
        try:
            with scope:
                await fn(*args)
        except Exception:
            # As a nursery per connection would: the connection ends with 1011.
            log.exception("relay.connection_failed", extra=fields(peer=mask_ip(client.peer)))
            if client.closing is None:
                client.closing = core.Close(core.CLOSE_INTERNAL_ERROR, core.REASON_INTERNAL)
            if client.receive_scope is not None:
                client.receive_scope.cancel()
        finally:
            helpers = client.helpers
            if helpers is not None:
                helpers.remove(scope)
                if not helpers:
                    client.helpers = None
                    if client.helpers_done is not None:
                        client.helpers_done.set()

    async def _end_helpers(self, client: _Client, *, flush: bool) -> None:
        """Let the helpers finish their work for at most CLOSE_TIMEOUT (flush),
        or cancel them; return once none is left."""
        if not client.helpers:
            return
        for scope in client.helpers:
            if flush:
                scope.deadline = min(scope.deadline, trio.current_time() + CLOSE_TIMEOUT)
            else:
                scope.cancel()
        client.helpers_done = trio.Event()
        await client.helpers_done.wait()

    async def _receive_loop(self, client: _Client) -> None:
        s = self.settings
        proto = client.proto
        if not self._perform(client, proto.start()):
            return
        timeout = s.handshake_timeout_seconds
        # An unauthenticated connection may live for one idle period at most,
        # however many pings it sends.
        auth_deadline = trio.current_time() + s.idle_timeout_seconds
        while client.closing is None:
            wait = timeout
            if not proto.authenticated:
                wait = max(0.0, min(wait, auth_deadline - trio.current_time()))
            # One scope for both ways the wait ends early: its deadline (a
            # timeout), or a cancel from outside, which always comes with
            # ``closing`` set or the relay stopping (see push, close_client,
            # begin_shutdown). One scope per connection, not two, is memory.
            with trio.CancelScope(deadline=trio.current_time() + wait) as scope:
                client.receive_scope = scope
                if self.stopping:
                    scope.cancel()
                try:
                    message = await client.ws.get_message()
                except ConnectionClosed as exc:
                    self._peer_closed(client, exc)
                    return
            if client.closing is not None:
                return  # closed from outside: revoked, expired, send timeout
            if scope.cancelled_caught and self.stopping:
                await self._drain(client)  # replies to sends already committed go first
                self._perform(client, proto.shutdown())
                return
            if scope.cancelled_caught:
                if proto.state is core.State.AWAITING_FIRST_FRAME:
                    actions = proto.first_frame_timeout()
                elif not proto.authenticated and trio.current_time() >= auth_deadline:
                    actions = proto.auth_timeout()
                else:
                    actions = proto.idle_timeout()
                self._perform(client, actions)
                return
            timeout = s.idle_timeout_seconds
            if isinstance(message, bytes):
                actions = proto.receive_bytes(message)
            else:
                actions = proto.receive_text(message)
            await self._carry_out(client, actions)

    async def _carry_out(self, client: _Client, actions: list[core.Action]) -> None:
        """Perform actions; hand decoded requests to the session layer, in order.

        Sends and acks are pipelined: their writes are submitted at once and
        the connection reads on, so a client with many in flight gets them
        committed together; their replies go out in order from
        :meth:`_respond`. Anything else first waits for those replies, so
        replies never overtake each other and a request that changes the
        session sees every earlier write done.
        """
        frames = self.session_frames
        for action in actions:
            if client.closing is not None:
                return
            if frames.pipelined(action):
                await self._pipeline(client, await frames.begin(client, action))
                continue
            await self._drain(client)
            if isinstance(action, core.Send | core.Close):
                more: list[core.Action] = [action]
            else:
                more = await frames.handle(client, action)
            if not self._perform(client, more):
                return

    async def _pipeline(self, client: _Client, finish: Finish) -> None:
        if client.pipeline is None:
            client.pipeline, replies = trio.open_memory_channel[Finish](PIPELINE_DEPTH)
            client.drained = trio.Event()
            self._spawn(client, self._respond, client, replies)
        client.in_flight += 1
        await client.pipeline.send(finish)  # waits when PIPELINE_DEPTH are in flight

    async def _respond(self, client: _Client, replies: trio.MemoryReceiveChannel[Finish]) -> None:
        """Send the replies of pipelined requests in the order they came; end
        (dropping the pipeline) once none is left, so idle connections keep no
        responder. ``in_flight`` counts requests before they enter the channel,
        so at zero nothing is on its way in."""
        async for finish in replies:
            actions = await finish()
            client.in_flight -= 1
            if client.closing is None and not self._perform(client, actions):
                if client.receive_scope is not None:
                    client.receive_scope.cancel()
            if client.in_flight == 0:
                drained, client.drained, client.pipeline = client.drained, None, None
                if drained is not None:
                    drained.set()
                return

    async def _drain(self, client: _Client) -> None:
        """Wait until every pipelined request of this connection has its reply out."""
        while client.in_flight and client.drained is not None:
            await client.drained.wait()

    def _perform(self, client: _Client, actions: list[core.Action]) -> bool:
        """Carry out actions without blocking; False once the connection is closing."""
        for action in actions:
            if isinstance(action, core.Send):
                if client.out_closed:
                    return False  # the connection is already finishing
                if client.peer_gone:
                    continue  # nobody to send to; the receive loop sees the close
                if len(client.outbox) >= self.settings.send_queue_frames:
                    self._perform(client, client.proto.send_queue_full())
                else:
                    client.outbox.append(action.data)
                    if not client.sending and self.nursery is not None:
                        client.sending = True
                        self._spawn(client, self._sender, client)
            elif isinstance(action, core.Close):
                client.closing = action
            if client.closing is not None:
                return False
        return True

    async def _sender(self, client: _Client) -> None:
        """Write the outbox to the socket in order, then end (see _perform)."""
        timeout = self.settings.send_timeout_seconds
        try:
            while client.outbox:
                data = client.outbox.pop(0)
                with trio.move_on_after(timeout) as stuck:
                    try:
                        await client.ws.send_message(data.decode())
                    except trio.Cancelled:
                        client.cut_off = True  # maybe in the middle of the frame
                        raise
                    except ConnectionClosed:
                        client.peer_gone = True
                        client.outbox.clear()
                        return
                if stuck.cancelled_caught:
                    client.closing = core.Close(core.CLOSE_POLICY, REASON_SEND_TIMEOUT)
                    client.outbox.clear()
                    if client.receive_scope is not None:
                        client.receive_scope.cancel()
                    return
        finally:
            client.sending = False

    def _peer_closed(self, client: _Client, exc: ConnectionClosed) -> None:
        reason = exc.reason
        code = getattr(reason, "code", None)
        if code not in (core.CLOSE_NORMAL, core.CLOSE_GOING_AWAY):
            log.info(
                "relay.closed",
                extra=fields(
                    peer=mask_ip(client.peer), code=code, reason=getattr(reason, "reason", None)
                ),
            )

    async def _hang_up(self, client: _Client) -> None:
        """Send our Close (if any) and wait briefly for the peer's reply.

        The stream itself is closed by serve_websockets when the handler
        returns, even if the peer never answers.
        """
        close = client.closing
        if client.cut_off:
            # A frame was cut off mid-write (send timeout, or the sender
            # cancelled): nothing valid can follow it on this stream, not
            # even a Close frame. Just hang up.
            reason = close.reason if close is not None else "write interrupted"
            log.info("relay.close", extra=fields(peer=mask_ip(client.peer), reason=reason))
            return
        with trio.move_on_after(CLOSE_TIMEOUT):
            if close is None:
                await client.ws.aclose()
                return
            if close.code != core.CLOSE_GOING_AWAY:
                log.info(
                    "relay.close",
                    extra=fields(peer=mask_ip(client.peer), code=close.code, reason=close.reason),
                )
            await client.ws.aclose(close.code, close.reason)

    def push(self, client: _Client, actions: list[core.Action]) -> None:
        """Queue frames for a connection from outside its receive loop."""
        if client.closing is None and self._perform(client, actions) is False:
            if client.receive_scope is not None:
                client.receive_scope.cancel()

    def close_client(self, client: _Client, actions: list[core.Action]) -> None:
        """Close a connection from outside its receive loop (revocation, expiry)."""
        self._perform(client, actions)
        if client.receive_scope is not None:
            client.receive_scope.cancel()

    def begin_shutdown(self) -> None:
        """Ask every connection to close with 1001 after its current frame."""
        self.stopping = True
        self.streams.cancel_handshakes()
        for client in list(self.clients):
            if client.receive_scope is not None:
                client.receive_scope.cancel()


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _peer_host(remote: Any) -> str:
    return str(getattr(remote, "address", "") or "")


def tls_context(config: Config) -> ssl.SSLContext:
    """TLS 1.3 only, X25519 key exchange, HTTP/1.1 ALPN."""
    relay = config.relay
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ecdh_curve("X25519")
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(
            config.in_data_dir(relay.tls_certificate), config.in_data_dir(relay.tls_private_key)
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            config.path,
            f"cannot load the TLS certificate or key: {exc.strerror or exc}",
            key="relay.tls_certificate",
        ) from None
    return ctx


async def open_relay_listeners(config: Config) -> list[Any]:
    """Bind the relay's TCP listeners (wrapped in TLS when configured)."""
    relay = config.relay
    try:
        listeners: list[Any] = list(await trio.open_tcp_listeners(relay.port, host=relay.host))
    except OSError as exc:
        where = f"{relay.host}:{relay.port}"
        if exc.errno == errno.EADDRINUSE:
            raise ListenError(
                f"relay: address {where} is already in use (change relay.port in {config.path})"
            ) from None
        raise ListenError(f"relay: cannot listen on {where}: {exc.strerror}") from None
    if config.relay_tls:
        ctx = tls_context(config)
        listeners = [trio.SSLListener(lst, ctx, https_compatible=True) for lst in listeners]
    return listeners


def listener_port(listener: Any) -> int:
    inner = getattr(listener, "transport_listener", listener)
    return int(inner.socket.getsockname()[1])


async def serve_relay(
    config: Config,
    stopping: trio.Event,
    *,
    auth: AuthService | None = None,
    keys: KeyService | None = None,
    queues: QueueService | None = None,
    task_status: trio.TaskStatus[Relay] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the relay until ``stopping`` is set, then drain and return.

    Reports the :class:`Relay` once listening (``relay.port`` tells the bound
    port when the setting is 0). Raises :class:`ListenError` if the address
    cannot be bound. Cancellation drops every connection at once. Without
    ``auth`` (lifecycle tests), every session request is refused.
    """
    s = config.relay
    listeners = await open_relay_listeners(config)
    relay = Relay(s, auth, keys, queues)
    relay.port = listener_port(listeners[0])
    async with trio.open_nursery() as handlers:
        relay.nursery = handlers
        if keys is not None:
            keys.on_keys_low = relay.session_frames.push_key_counts
        if queues is not None:
            queues.on_queued = relay.session_frames.wake_devices
            queues.on_committed = relay.session_frames.deliver_committed
        if auth is not None:
            auth.on_revoked = relay.session_frames.close_sessions
            handlers.start_soon(
                relay.session_frames.revalidate_forever, config.auth.session_check_seconds
            )
            handlers.start_soon(relay.session_frames.flush_presence_forever)
        async with trio.open_nursery() as accepting:
            await accepting.start(
                partial(
                    serve_websockets,
                    relay.handle,
                    listeners,
                    handler_nursery=handlers,
                    counter=relay.streams,
                    handshake_timeout=s.handshake_timeout_seconds,
                    max_message_size=s.max_frame_bytes,
                    receive_buffer_size=RECEIVE_BUFFER,
                )
            )
            log.info(
                "relay.listening",
                extra=fields(host=s.host, port=relay.port, tls=config.relay_tls),
            )
            task_status.started(relay)
            await stopping.wait()
            accepting.cancel_scope.cancel()
        for listener in listeners:
            await listener.aclose()
        relay.begin_shutdown()
        relay.session_frames.stop()
    log.info("relay.stopped", extra=fields(served=relay.connections_served))
