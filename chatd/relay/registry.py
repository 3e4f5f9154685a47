"""The registry of live connections: by session, by user and by device.

It is also the relay's event sink, made by ``daemon.py`` before the services
and handed to each (explicit wiring): the auth service tells it which
sessions were revoked (:meth:`Registry.sessions_revoked`), the key service
which devices run low on one-time keys (:meth:`Registry.keys_low`), and the
queue service which envelopes were accepted for which device
(:meth:`Registry.queued`) or left a queue unacknowledged (:meth:`Registry.dropped`),
and the consent service that an admin set a new version (:meth:`Registry.consent_changed`).
An envelope for a device with no live connection goes on to the registry's
offline sink (the push notifier, given to it at construction).
Each of these runs on the event loop and only records or hands over; work
that needs a service (a key count to read) is done by the relay's own tasks
(:meth:`Registry.serve_key_counts`).

Presence reaches only connections with a reason to see it: those that share a
conversation with the user (they sent each other a message or a typing
notice) or asked about them with ``who_is_online``. A connection *watches*
those users; a change of a user's presence is pushed to the connections
watching them, coalesced to one frame per connection per interval. So a
login costs the same however many people are online.

For admins, :meth:`Registry.online_devices` lists who is connected now, by
device, with no message metadata (``GET /v1/online``, ``chatctl online``).
"""

from __future__ import annotations

import logging
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

import trio

from chatd.auth.models import SessionGrant
from chatd.protocol import consent as c
from chatd.protocol import core
from chatd.protocol import frames as f
from chatd.protocol import rooms as r
from chatd.protocol.delivery import DeviceLedger
from chatd.relay.connection import REASON_DEVICE_CONNECTIONS
from chatd.relay.consent import documents, recheck
from chatd.store import now_ms

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from chatd.auth.service import AuthService
    from chatd.consent import Document
    from chatd.e2ee.keys import KeyService
    from chatd.relay.connection import Connection

log = logging.getLogger("chatd.relay")

PRESENCE_INTERVAL: Final = 1.0  # seconds between two coalesced presence pushes
MAX_WATCHED: Final = 1_000  # users one connection may watch the presence of


class OfflineSink(Protocol):
    """Hears of envelopes queued for devices with no live connection (the push
    notifier, :class:`chatd.push.Notifier`). Called on the event loop in the
    queue service's hot path: it must only record, in O(1), and never block."""

    def queued_offline(self, device_id: str, envelope: f.Envelope) -> None: ...


class DeviceState:
    """A device with live connections: them, and what they hold unacknowledged."""

    __slots__ = ("connections", "ledger")

    def __init__(self) -> None:
        self.connections: list[Connection] = []
        self.ledger = DeviceLedger()


class RelayStats:
    """What the relay did since it started, for :mod:`chatd.metrics`: plain
    counters bumped on the event loop, read at scrape time."""

    __slots__ = ("sends", "room_sends", "acks", "delivered")

    def __init__(self) -> None:
        self.sends = 0  # send requests received
        self.room_sends = 0  # room_send requests received
        self.acks = 0  # ack requests received
        self.delivered = 0  # envelopes written to connections in deliver frames


@dataclass(frozen=True, slots=True)
class OnlineDevice:
    """One device with live connections, as an admin sees it."""

    user_id: int
    username: str
    device_id: str  # "" for a session without a device
    since: int  # unix ms: when the oldest of its live connections got its session
    connections: int


class Registry:
    """Live connections and the events that concern them."""

    def __init__(self, offline: OfflineSink | None = None, *, device_connections: int = 4) -> None:
        self._offline = offline  # told of envelopes for devices with no live connection
        self.device_connections = device_connections  # live connections per device, at most
        self.connections: set[Connection] = set()  # every open one, with or without a session
        self.by_session: dict[int, list[Connection]] = {}
        self.by_user: dict[int, list[Connection]] = {}
        self.by_device: dict[str, DeviceState] = {}
        self._watchers: dict[int, set[Connection]] = {}
        self._presence: dict[int, bool] = {}  # user -> online, changed since the last push
        self._presence_due = trio.Event()
        self._keys_low: set[str] = set()
        self._keys_due = trio.Event()
        self._since: dict[Connection, int] = {}  # unix ms each got its session
        self.stats = RelayStats()

    # -- sessions --------------------------------------------------------------------

    def attach(self, conn: Connection, grant: SessionGrant) -> None:
        """The connection has a session now (or a renewed one)."""
        first = conn.grant is None
        if not first:
            self._unindex(conn)
        else:
            self._since[conn] = now_ms()
        conn.grant = grant
        self.by_session.setdefault(grant.session_id, []).append(conn)
        users = self.by_user.setdefault(grant.user_id, [])
        came_online = not users
        users.append(conn)
        if grant.device_id:
            state = self.by_device.get(grant.device_id)
            if state is None:
                state = self.by_device[grant.device_id] = DeviceState()
            if conn not in state.connections:
                state.connections.append(conn)
            conn.device = state
            self._shed(state)
        conn.proto.session_started(restricted=grant.mfa_enrollment_required)
        if came_online:
            self._changed(grant.user_id, online=True)

    def detach(self, conn: Connection) -> None:
        """The connection leaves its session (closing, logging out, revoked)."""
        grant = conn.grant
        if grant is None:
            return
        self._unindex(conn)
        conn.grant = None
        self._since.pop(conn, None)
        state, conn.device = conn.device, None
        if state is not None:
            others = [c.delivery.held() for c in state.connections]
            state.ledger.forget(conn.delivery.held(), others)
        for user_id in conn.watching or ():
            watchers = self._watchers.get(user_id)
            if watchers is not None:
                watchers.discard(conn)
                if not watchers:
                    del self._watchers[user_id]
        conn.watching = None
        if grant.user_id not in self.by_user:
            self._changed(grant.user_id, online=False)

    def _shed(self, state: DeviceState) -> None:
        """Past ``device_connections``, the device's oldest connections close
        (each one pins up to its delivery window of memory; a reconnecting
        client's newest connection is the one it uses)."""
        while len(state.connections) > self.device_connections:
            oldest = state.connections[0]
            self.detach(oldest)
            oldest.close(core.Close(core.CLOSE_POLICY, REASON_DEVICE_CONNECTIONS))

    def _unindex(self, conn: Connection) -> None:
        grant = conn.grant
        if grant is None:
            return
        _remove(self.by_session, grant.session_id, conn)
        _remove(self.by_user, grant.user_id, conn)
        state = self.by_device.get(grant.device_id)
        if state is not None and conn in state.connections:
            state.connections.remove(conn)
            if not state.connections:
                del self.by_device[grant.device_id]

    def sessions_revoked(self, session_ids: Iterable[int]) -> None:
        """Close every connection of these sessions with 4003 (from the auth service)."""
        for session_id in list(session_ids):
            for conn in list(self.by_session.get(session_id, ())):
                self.detach(conn)
                close_with(conn, conn.proto.session_revoked())

    async def serve_revalidation(self, auth: AuthService, interval: float) -> None:
        """Every ``interval`` seconds: close connections whose access token
        expired without a refresh (4001), or whose session ended in a way that
        was not announced (4003)."""
        while True:
            await trio.sleep(interval)
            now = now_ms()
            for conns in list(self.by_session.values()):
                for conn in list(conns):
                    if conn.grant is not None and conn.grant.access_expires_at <= now:
                        self.detach(conn)
                        close_with(conn, conn.proto.session_expired())
            if self.by_session:
                self.sessions_revoked(await auth.invalid_sessions(list(self.by_session)))

    # -- presence --------------------------------------------------------------------

    def online_users(self) -> list[int]:
        return sorted(self.by_user)

    def is_online(self, user_id: int) -> bool:
        return user_id in self.by_user

    def online_devices(self) -> list[OnlineDevice]:
        """Devices with live connections now, by user id then device id."""
        devices: dict[tuple[int, str], OnlineDevice] = {}
        for conns in self.by_user.values():
            for conn in conns:
                grant = conn.grant
                if grant is None:  # pragma: no cover - by_user holds sessions only
                    continue
                since = self._since.get(conn, 0)
                key = (grant.user_id, grant.device_id)
                seen = devices.get(key)
                if seen is not None:
                    since = min(since, seen.since)
                count = 1 if seen is None else seen.connections + 1
                devices[key] = OnlineDevice(
                    grant.user_id, grant.username, grant.device_id, since, count
                )
        return [devices[key] for key in sorted(devices)]

    def has_device(self, device_id: str) -> bool:
        """Whether this device has a live connection (with a session)."""
        return device_id in self.by_device

    def watch(self, conn: Connection, user_ids: Iterable[int]) -> None:
        """From now on, tell ``conn`` when these users come online or go offline."""
        grant = conn.grant
        if grant is None:
            return
        for user_id in user_ids:
            watching = conn.watching
            if watching is None:
                watching = conn.watching = set()
            if user_id == grant.user_id or user_id in watching or len(watching) >= MAX_WATCHED:
                continue
            watching.add(user_id)
            watchers = self._watchers.get(user_id)
            if watchers is None:
                watchers = self._watchers[user_id] = set()
            watchers.add(conn)

    def watch_each_other(self, conn: Connection, user_id: int) -> None:
        """``conn``'s user and ``user_id`` share a conversation: both watch."""
        self.watch(conn, (user_id,))
        if conn.grant is not None:
            for other in self.by_user.get(user_id, ()):
                self.watch(other, (conn.grant.user_id,))

    def _changed(self, user_id: int, *, online: bool) -> None:
        self._presence[user_id] = online
        self._presence_due.set()

    async def serve_presence(self, interval: float = PRESENCE_INTERVAL) -> None:
        """Push coalesced presence changes to their watchers, at most once per
        ``interval`` seconds."""
        while True:
            await self._presence_due.wait()
            self._presence_due = trio.Event()
            changes, self._presence = self._presence, {}
            news: dict[Connection, tuple[list[int], list[int]]] = {}
            for user_id, online in sorted(changes.items()):
                for conn in self._watchers.get(user_id, ()):
                    entry = news.get(conn)
                    if entry is None:
                        entry = news[conn] = ([], [])
                    entry[0 if online else 1].append(user_id)
            for conn, (up, down) in news.items():
                conn.push_frame(f.Presence(online=up, offline=down))
            await trio.sleep(interval)

    # -- keys ------------------------------------------------------------------------

    def keys_low(self, device_ids: Iterable[str]) -> None:
        """These devices should hear their key count (from the key service)."""
        wanted = [d for d in device_ids if d in self.by_device]
        if wanted:
            self._keys_low.update(wanted)
            self._keys_due.set()

    async def serve_key_counts(self, keys: KeyService) -> None:
        """Push a ``key_count`` to the live connections of devices running low."""
        while True:
            await self._keys_due.wait()
            self._keys_due = trio.Event()
            devices, self._keys_low = self._keys_low, set()
            for device_id in devices:
                if device_id not in self.by_device:
                    continue
                try:
                    count = await keys.key_count(device_id)
                except Exception:
                    log.exception("relay.key_count_failed")
                    continue
                for conn in list(self.by_device.get(device_id, DeviceState()).connections):
                    conn.push_frame(count)

    # -- rooms ---------------------------------------------------------------------------

    def room_invited(self, user_id: int, frame: r.RoomInvited) -> None:
        """Tell the live connections of an invited user (not a restricted one)."""
        data = core.encode(frame)
        for conn in self.by_user.get(user_id, ()):
            if conn.grant is not None and not conn.grant.mfa_enrollment_required:
                conn.push(data)

    # -- consent (events from the consent service) ---------------------------------------

    def consent_changed(self, current: Mapping[str, Document]) -> None:
        """An admin set a document's version: gate every live session whose
        user has not accepted it, and tell it with ``consent_required``."""
        for conns in list(self.by_user.values()):
            for conn in conns:
                if recheck(conn, current):
                    conn.push_frame(c.ConsentRequired(documents=documents(conn, current)))

    # -- queues (events from the queue service) -----------------------------------------

    def queued(self, device_id: str, envelope: f.Envelope, held: bool) -> bool:
        """An envelope was accepted for this device: offer it to its live
        connections. True if one took it. With none, the offline sink hears
        of it (a push wake-up)."""
        state = self.by_device.get(device_id)
        if state is None:
            if self._offline is not None:
                self._offline.queued_offline(device_id, envelope)
            return False
        sender = envelope.sender_user_id
        taken = False
        for conn in state.connections:
            if conn.delivery.offer(envelope, held=held):
                if not taken:
                    state.ledger.handed((envelope,))
                    taken = True
                conn.wake(fan_out=envelope.room_id is not None)
                watching = conn.watching
                if sender is not None and (watching is None or sender not in watching):
                    self.watch(conn, (sender,))  # they share a conversation
        return taken

    def released(self, device_id: str, queue: Iterable[f.Envelope], held: Container[int]) -> None:
        """Envelopes this device's connections waited for are settled: the
        connections that stopped at one go on through the queue."""
        state = self.by_device.get(device_id)
        if state is None:
            return
        rest = list(queue)
        for conn in state.connections:
            handed = conn.delivery.resume(rest, held)
            if handed:
                state.ledger.handed(handed)
                conn.wake()

    def dropped(self, device_id: str, envelope_ids: Sequence[int]) -> None:
        """These envelopes expired: no ack of them makes a receipt any more."""
        state = self.by_device.get(device_id)
        if state is not None:
            state.ledger.forget(envelope_ids)


def close_with(conn: Connection, actions: list[core.Action]) -> None:
    """Close ``conn`` with the Close among ``actions`` (the core's decision)."""
    for action in actions:
        if isinstance(action, core.Close):
            conn.close(action)


def _remove(index: dict[int, list[Connection]], key: int, conn: Connection) -> None:
    conns = index.get(key)
    if conns is not None and conn in conns:
        conns.remove(conn)
        if not conns:
            del index[key]
