"""The relay service: the public WebSocket server at ``/v1/ws``.

:func:`serve_relay` runs in the daemon's nursery. Per connection, one task
(:meth:`Relay.handle`) reads messages, feeds them to the protocol core and
hands the core's actions to the dispatcher; a writer task exists only while
the connection has frames to write (:mod:`chatd.relay.connection`). The
relay's own tasks are few and fixed: presence pushes, key-count pushes and
the session sweep (:mod:`chatd.relay.registry`).

Guarantees, each backed by a setting:

* The handshake and then the first frame must each arrive within
  ``relay.handshake_timeout_seconds``; after that, any gap of
  ``relay.idle_timeout_seconds`` without a complete message closes the
  connection (this also bounds a half-sent frame). An unauthenticated
  connection lives one idle period at most, however many pings it sends.
* One client address (behind ``relay.trusted_proxies``) holds at most
  ``relay.max_connections_per_address`` connections, and at most
  ``relay.max_unauthenticated_per_address`` without a session; past either,
  the upgrade is answered 429 with ``Retry-After`` (:mod:`chatd.relay.addresses`).
  One TCP peer that is not a trusted proxy has at most the latter number of
  handshakes under way; more are hung up on at accept (a slowloris).
* One device has at most ``relay.max_connections_per_device`` connections
  with a session; a further one closes its oldest (the registry), and each
  connection's delivery window is bounded in bytes too, so what connections
  that do not read can pin is bounded per device; after they close, the
  :class:`~chatd.memory.Trimmer` gives the memory back to the kernel.
* A message over ``relay.max_frame_bytes`` closes with 1009.
* Answers and pushes wait in a send queue of ``relay.send_queue_frames``;
  overflow closes with 1008 "send queue full", and a write may take
  ``relay.send_timeout_seconds``.
* Every close we initiate sends a real Close frame and then, bounded by a
  timeout, hangs up the TCP stream itself.
* New connections are set up (the upgrade request checked, 101 or a refusal
  written, hello sent) ADMITTING_AT_ONCE at a time, first come first served:
  a burst of them waits its turn instead of holding up every other
  connection's answers for one long row of the event loop. A connection
  that ends takes a turn the same way (without holding it) before its
  Close, so many that time out together are closed a few per row too.

Shutdown: when ``stopping`` is set, listeners close (no new connections),
every connection finishes the frame it is handling, gets the answers still
owed to it (for CLOSE_TIMEOUT at most) and is closed with 1001, and
:func:`serve_relay` returns once all are gone. The daemon bounds that with
the grace period.
"""

from __future__ import annotations

import errno
import logging
import math
import socket
import ssl
from collections.abc import Sequence
from functools import partial
from typing import Final

import trio

from chatd.auth.service import AuthService
from chatd.blobs.service import BlobService
from chatd.config import Config, RelaySettings
from chatd.consent import ConsentService
from chatd.e2ee.keys import KeyService
from chatd.e2ee.queues import QueueService
from chatd.errors import ConfigError, ListenError
from chatd.log import fields, mask_ip
from chatd.memory import Trimmer
from chatd.protocol import core
from chatd.protocol import delivery as rules
from chatd.protocol.frames import Limits
from chatd.push import Notifier
from chatd.relay.accept import StreamCounter, serve_websockets
from chatd.relay.addresses import (
    RETRY_AFTER_SECONDS,
    AddressLimits,
    TrustedProxies,
    address_key,
)
from chatd.relay.connection import Connection, Flusher
from chatd.relay.dispatch import Dispatcher
from chatd.relay.ratelimits import RequestLimits
from chatd.relay.registry import Registry
from chatd.relay.ws import Control, UpgradeRequest, WebSocketClosed
from chatd.rooms.service import RoomService

log = logging.getLogger("chatd.relay")

WS_PATH: Final = "/v1/ws"
RETRY_AFTER: Final = str(RETRY_AFTER_SECONDS).encode()
#: New connections set up (checked, answered 101 or refused, sent hello) at
#: once. About 0.3 ms of the event loop each: a burst of them (a reconnect
#: storm, a flood from one address) then runs two at a time between other
#: connections' work, not 16 or 64 in one row of the loop (RELIABILITY 4).
#: Ending connections pass through the same turns before their Close.
ADMITTING_AT_ONCE: Final = 2


class Relay:
    """The relay's connections and their handling; one per relay service."""

    def __init__(
        self,
        settings: RelaySettings,
        registry: Registry,
        dispatcher: Dispatcher,
        nursery: trio.Nursery,
        flusher: Flusher | None = None,
    ) -> None:
        self.settings = settings
        self.flusher = flusher
        self.registry = registry
        self.dispatcher = dispatcher
        self.nursery = nursery  # connections and their writers run here
        self.limits = Limits(
            max_frame_bytes=settings.max_frame_bytes,
            handshake_timeout_seconds=settings.handshake_timeout_seconds,
            idle_timeout_seconds=settings.idle_timeout_seconds,
            send_queue_frames=settings.send_queue_frames,
            max_bad_frames=settings.max_bad_frames,
        )
        self.proxies = TrustedProxies(settings.trusted_proxies)
        self.addresses = AddressLimits(
            settings.max_connections_per_address, settings.max_unauthenticated_per_address
        )
        self.streams = StreamCounter(  # TCP streams and slots
            settings.max_connections,
            per_peer=settings.max_unauthenticated_per_address,
            exempt=self.proxies.trusted,
            hang_up_on=self._hang_up_on,
            key=address_key,
        )
        self.stopping = False
        self.admitting = trio.CapacityLimiter(ADMITTING_AT_ONCE)
        self.trimmer = Trimmer()  # gives back what connections pinned, once they close
        self.connections_served = 0
        self.port = 0  # the bound port, set by serve_relay

    @property
    def connections(self) -> set[Connection]:
        return self.registry.connections

    def _hang_up_on(self, peer: str) -> float | None:
        """At accept: None, or ``peer`` is hung up on unread (over its limits
        and answered its 429s for now; never a trusted proxy, whose clients
        are only known from the request) until the time returned
        (AddressLimits.hang_up)."""
        if self.proxies.trusted(peer):
            return None
        until = self.addresses.hang_up(address_key(peer), trio.current_time())
        if until is None:
            return None
        if self.addresses.hung_up % _LOG_EVERY == 1:  # not a log line per hang-up
            log.info(
                "relay.address_limit",
                extra=fields(
                    peer=mask_ip(peer),
                    refused=self.addresses.refused,
                    hung_up=self.addresses.hung_up,
                ),
            )
        return until

    async def handle(self, request: UpgradeRequest) -> None:
        """Check the upgrade request, accept it and serve the connection until
        it ends. The handler of serve_websockets: it never raises."""
        conn: Connection | None = None
        admitted: str | None = None  # the address it counts against, once admitted
        try:
            async with self.admitting:  # its checks, 101 and hello: CPU, no waits on the peer
                peer = self.proxies.client_address(request.remote, request.headers)
                if request.path != WS_PATH:
                    await request.reject(404, b"not found: the relay lives at /v1/ws\n")
                    return
                origin = request.header(b"origin")
                if origin is not None and origin not in self.settings.allowed_origins:
                    log.info(
                        "relay.origin_refused", extra=fields(peer=mask_ip(peer), origin=origin)
                    )
                    await request.reject(403, b"origin not allowed\n")
                    return
                if self.stopping:
                    await request.reject(503, b"server shutting down\n")
                    return
                key = address_key(peer)  # what its limits count (an IPv6 client: its /64)
                refusal = self.addresses.admit(key, trio.current_time())
                if refusal is not None:
                    if self.addresses.refused % _LOG_EVERY == 1:  # not a log line per refusal
                        log.info(
                            "relay.address_limit",
                            extra=fields(peer=mask_ip(peer), refused=self.addresses.refused),
                        )
                    await request.reject(429, refusal, [(b"Retry-After", RETRY_AFTER)])
                    return
                admitted = key
                ws = await request.accept(max_message=self.settings.max_frame_bytes)
                del request  # its headers are not needed again
                conn = Connection(
                    ws,
                    core.ServerConnection(self.limits, server_name="chatd"),
                    peer,
                    nursery=self.nursery,
                    flusher=self.flusher,
                    send_queue_frames=self.settings.send_queue_frames,
                    send_timeout=self.settings.send_timeout_seconds,
                    window=rules.DELIVERY_WINDOW,
                    stats=self.registry.stats,
                )
                self.addresses.bind(key, conn)
                self.registry.connections.add(conn)
                self.connections_served += 1
                await self.dispatcher.carry_out(conn, conn.proto.start())
            flush = await self._serve(conn)
            async with self.admitting:  # a turn (not held): timeouts due together spread out
                pass
            await conn.finish(flush=flush)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer left during the upgrade
        except Exception:
            if conn is None:
                log.exception("relay.handler_failed")
                return
            log.exception("relay.connection_failed", extra=fields(peer=mask_ip(conn.peer)))
            conn.close(core.Close(core.CLOSE_INTERNAL_ERROR, core.REASON_INTERNAL))
        finally:
            if admitted is not None:
                self.addresses.release(admitted, conn)
                self.streams.drops.discard(admitted)  # perhaps under its limits again
            if conn is not None:
                if conn.delivery.handed_bytes >= _TRIM_WORTHY:  # unread deliveries it pinned
                    self.trimmer.request()
                try:
                    self.registry.connections.discard(conn)
                    self.registry.detach(conn)
                    await conn.finish(flush=False)
                    await conn.hang_up()
                except Exception:
                    log.exception("relay.handler_failed")

    async def _serve(self, conn: Connection) -> bool:
        """Read and carry out the connection's messages until it ends; whether
        what is queued should still be written (flushed) before the Close."""
        s = self.settings
        proto = conn.proto
        dispatcher = self.dispatcher
        timeout = s.handshake_timeout_seconds
        auth_deadline = trio.current_time() + s.idle_timeout_seconds
        # One scope for the connection's life, for both ways its wait for the
        # next message ends early: the deadline (a timeout, moved on with each
        # message), or a cancel from outside, which always comes with
        # ``closing`` set or the relay stopping. Requests that must not be cut
        # short shield themselves (see Dispatcher._request).
        with trio.CancelScope() as scope:
            conn.read_scope = scope
            heard = trio.current_time()  # the last complete message (control frames aside)
            while conn.closing is None and not self.stopping:
                if conn.resume_reading_at:
                    heard = max(heard, await _wait_out_pause(conn, scope))
                deadline = heard + timeout
                if not proto.authenticated:
                    deadline = min(deadline, auth_deadline)
                scope.deadline = deadline
                try:
                    messages = await conn.ws.receive_some()
                except WebSocketClosed as closed:
                    return self._closed(conn, closed)
                for message in messages:
                    if conn.resume_reading_at:
                        heard = max(heard, await _wait_out_pause(conn, scope))
                    if conn.closing is not None:
                        break
                    if isinstance(message, Control):
                        # A Pong, after the answers before it. Control frames
                        # are not messages: they move no timer.
                        conn.control(message.data)
                        continue
                    heard = trio.current_time()
                    timeout = s.idle_timeout_seconds
                    if isinstance(message, bytes):
                        actions = proto.receive_bytes(message)
                    else:
                        actions = proto.receive_text(message)
                    await dispatcher.carry_out(conn, actions)
        conn.read_scope = None
        if conn.closing is None and self.stopping:
            return await self._shut(conn)
        if conn.closing is None and scope.cancelled_caught:
            if proto.state is core.State.AWAITING_FIRST_FRAME:
                actions = proto.first_frame_timeout()
            elif not proto.authenticated and trio.current_time() >= auth_deadline:
                actions = proto.auth_timeout()
            else:
                actions = proto.idle_timeout()
            await dispatcher.carry_out(conn, actions)
        close = conn.closing
        return close is None or close.reason not in (
            core.REASON_SEND_QUEUE_FULL,
            core.REASON_TOO_BIG,
        )

    async def _shut(self, conn: Connection) -> bool:
        """The relay is stopping: answers owed go first, then 1001."""
        with trio.move_on_after(_CLOSE_WAIT):
            await conn.wait_answers(closing_too=True)
        for action in conn.proto.shutdown():
            if isinstance(action, core.Close):
                conn.close(action)
        return True

    def _closed(self, conn: Connection, closed: WebSocketClosed) -> bool:
        """The WebSocket layer ended the connection; flush or not."""
        if closed.ours:
            # The peer broke the framing rules or sent too much: close with
            # the WebSocket layer's code; what was queued is dropped.
            conn.close(core.Close(closed.code, closed.reason))
            return False
        conn.peer_closed(closed.code)
        if closed.code not in (core.CLOSE_NORMAL, core.CLOSE_GOING_AWAY):
            log.info(
                "relay.closed",
                extra=fields(peer=mask_ip(conn.peer), code=closed.code, reason=closed.reason),
            )
        return False

    def begin_shutdown(self) -> None:
        """Ask every connection to close with 1001 after its current frame."""
        self.stopping = True
        self.streams.cancel_handshakes()
        for conn in list(self.registry.connections):
            if conn.read_scope is not None:
                conn.read_scope.cancel()


async def _wait_out_pause(conn: Connection, scope: trio.CancelScope) -> float:
    """Wait until the connection's read pause (after a ``rate_limited``
    send) ends, and return when that is. The pause is the server's choice,
    so no timeout runs during it: the idle timer starts again at its end.
    A cancel of ``scope`` (a close, the relay stopping) ends it early."""
    until = conn.resume_reading_at
    conn.resume_reading_at = 0.0
    scope.deadline = math.inf
    await trio.sleep_until(until)
    return until


_TRIM_WORTHY: Final = 65_536  # bytes of unacknowledged deliveries that make a close trim
_LOG_EVERY: Final = 1_000  # address-limit refusals per log line (the first of each run)
_CLOSE_WAIT: Final = 2.0  # seconds a stopping connection waits for answers it owes


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


async def open_relay_listeners(
    config: Config, sockets: Sequence[socket.socket] = ()
) -> list[trio.SocketListener]:
    """The relay's TCP listeners: on ``sockets`` when systemd passed them
    (socket activation), else bound here. TLS, when configured, is
    terminated on each accepted connection (:func:`tls_context`,
    :func:`chatd.relay.accept.serve_websockets`)."""
    relay = config.relay
    listeners: list[trio.SocketListener]
    try:
        if sockets:
            listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets]
        else:
            listeners = list(await trio.open_tcp_listeners(relay.port, host=relay.host))
    except OSError as exc:
        where = f"{relay.host}:{relay.port}"
        if exc.errno == errno.EADDRINUSE:
            raise ListenError(
                f"relay: address {where} is already in use (change relay.port in {config.path})"
            ) from None
        raise ListenError(f"relay: cannot listen on {where}: {exc.strerror}") from None
    return listeners


def listener_port(listener: trio.SocketListener) -> int:
    return int(listener.socket.getsockname()[1])


async def serve_relay(
    config: Config,
    stopping: trio.Event,
    *,
    registry: Registry,
    auth: AuthService,
    keys: KeyService,
    queues: QueueService,
    rooms: RoomService,
    push: Notifier,
    consent: ConsentService,
    blobs: BlobService | None = None,
    sockets: Sequence[socket.socket] = (),
    task_status: trio.TaskStatus[Relay] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the relay until ``stopping`` is set, then drain and return.

    ``registry`` is the event sink the daemon gave the services. Reports the
    :class:`Relay` once listening (``relay.port`` tells the bound port when
    the setting is 0). ``blobs`` (the attachment rules) is None when no blob
    listener runs: attachment requests are then refused. Raises
    :class:`ListenError` if the address cannot be bound. ``sockets`` are
    listening sockets from systemd (socket activation) to serve instead of
    binding ``relay.host``/``relay.port``; they are closed on return like
    our own (systemd keeps its copies). Cancellation drops every connection
    at once.
    """
    s = config.relay
    ssl_context = tls_context(config) if config.relay_tls else None
    listeners = await open_relay_listeners(config, sockets)
    dispatcher = Dispatcher(
        registry,
        auth,
        keys,
        queues,
        rooms,
        RequestLimits(config.relay),
        push,
        consent,
        blobs,
        export_seconds=config.privacy.export_url_seconds,
    )
    async with trio.open_nursery() as services:
        flusher = Flusher()
        services.start_soon(flusher.flush_forever)
        services.start_soon(registry.serve_presence)
        services.start_soon(registry.serve_key_counts, keys)
        services.start_soon(registry.serve_revalidation, auth, config.auth.session_check_seconds)
        async with trio.open_nursery() as handlers:
            relay = Relay(s, registry, dispatcher, handlers, flusher)
            relay.port = listener_port(listeners[0])
            services.start_soon(relay.trimmer.serve)
            async with trio.open_nursery() as accepting:
                await accepting.start(
                    partial(
                        serve_websockets,
                        relay.handle,
                        listeners,
                        handler_nursery=handlers,
                        counter=relay.streams,
                        handshake_timeout=s.handshake_timeout_seconds,
                        ssl_context=ssl_context,
                    )
                )
                log.info(
                    "relay.listening",
                    extra=fields(
                        host=s.host, port=relay.port, tls=config.relay_tls, activated=bool(sockets)
                    ),
                )
                task_status.started(relay)
                await stopping.wait()
                accepting.cancel_scope.cancel()
            for listener in listeners:
                await listener.aclose()
            relay.begin_shutdown()
        services.cancel_scope.cancel()
    log.info("relay.stopped", extra=fields(served=relay.connections_served))
