"""Session requests on relay connections: login, tokens, MFA, session management.

The protocol core decides *whether* a request is allowed in the connection's
state (see :mod:`chatd.protocol.core`); this module carries it out with the
:class:`~chatd.auth.service.AuthService` and turns the outcome into frames.

It also keeps live connections honest about their session: each connection
is registered under its session id, so a revocation closes it at once with
4003, and a sweep every ``auth.session_check_seconds`` closes connections
whose access token expired without a refresh (4001) or whose session ended
in a way that was not announced (4003).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Final

import msgspec
import trio

from chatd.auth.models import AuthError, Peer, SessionGrant
from chatd.e2ee.queues import deliver_batches
from chatd.log import client_network, fields, mask_ip
from chatd.protocol import core
from chatd.protocol import frames as f
from chatd.store import now_ms

if TYPE_CHECKING:  # pragma: no cover - import cycle for annotations only
    from chatd.auth.service import AuthService
    from chatd.e2ee.keys import KeyService
    from chatd.e2ee.queues import QueueService
    from chatd.relay import Relay, _Client

log = logging.getLogger("chatd.relay")

_PIPELINED: Final = (f.Send, f.Ack)

PUMP_WINDOW: Final = 1_000  # envelopes delivered but not yet acknowledged, per connection
PRESENCE_INTERVAL: Final = 1.0  # seconds between two coalesced presence pushes


def _session_frame(request_id: str, grant: SessionGrant) -> f.Session:
    return f.Session(
        id=request_id,
        session_id=grant.session_id,
        user=f.User(id=grant.user_id, username=grant.username, role=grant.role),
        access_expires_at=grant.access_expires_at,
        expires_at=grant.expires_at,
        mfa_enrollment_required=grant.mfa_enrollment_required,
        device_id=grant.device_id,
        access_token=grant.access_token,
        refresh_token=grant.refresh_token,
    )


class SessionFrames:
    """Carries out session requests for one relay; owns the session registry."""

    def __init__(
        self,
        relay: Relay,
        auth: AuthService | None,
        keys: KeyService | None = None,
        queues: QueueService | None = None,
    ) -> None:
        self.relay = relay
        self.auth = auth
        self.keys = keys
        self.queues = queues
        self._new_pumps: set[_Client] = set()
        self._presence: dict[int, bool] = {}  # user id -> online, since the last flush
        self._presence_due = trio.Event()
        self._presence_scope = trio.CancelScope()
        self.by_session: dict[int, set[_Client]] = {}
        self.by_device: dict[str, set[_Client]] = {}
        self._sweep = trio.CancelScope()

    # -- registry ------------------------------------------------------------------

    def attach(self, client: _Client, grant: SessionGrant) -> None:
        first = client.grant is None
        came_online = first and grant.user_id not in self._online_users()
        self._unregister(client)
        client.grant = grant
        self.by_session.setdefault(grant.session_id, set()).add(client)
        if grant.device_id:
            self.by_device.setdefault(grant.device_id, set()).add(client)
        client.proto.session_started(restricted=grant.mfa_enrollment_required)
        if came_online:
            self._announce(grant.user_id, online=True)
        if self.queues is not None and not client.pumping and not grant.mfa_enrollment_required:
            # Started by handle() once the session reply is queued, so that
            # reply always comes before the first deliver. A connection that
            # must still enroll a second factor gets no messages until it has.
            client.pumping = True
            self._new_pumps.add(client)

    def _user_clients(self, user_id: int) -> list[_Client]:
        return [
            c
            for clients in self.by_session.values()
            for c in clients
            if c.grant is not None and c.grant.user_id == user_id and c.closing is None
        ]

    def _online_users(self) -> set[int]:
        return {
            c.grant.user_id
            for clients in self.by_session.values()
            for c in clients
            if c.grant is not None and c.closing is None
        }

    def _announce(self, user_id: int, *, online: bool) -> None:
        """Note a presence change; :meth:`flush_presence_forever` sends the changes
        of each interval as one frame per connection, so a reconnect storm of n
        users costs n frames per connection per interval, not n per change."""
        self._presence[user_id] = online
        self._presence_due.set()

    async def flush_presence_forever(self, interval: float = PRESENCE_INTERVAL) -> None:
        """Send coalesced presence changes, at most once per ``interval`` seconds."""
        with self._presence_scope:
            while True:
                await self._presence_due.wait()
                self._presence_due = trio.Event()
                changes, self._presence = self._presence, {}
                online = sorted(u for u, up in changes.items() if up)
                offline = sorted(u for u, up in changes.items() if not up)
                for clients in list(self.by_session.values()):
                    for client in list(clients):
                        if client.grant is None:
                            continue
                        mine = client.grant.user_id
                        frame = f.Presence(
                            online=[u for u in online if u != mine],
                            offline=[u for u in offline if u != mine],
                        )
                        if frame.online or frame.offline:
                            self.relay.push(client, client.proto.reply(frame))
                await trio.sleep(interval)

    def wake_devices(self, device_ids: Iterable[str]) -> None:
        """These devices' queues changed in the table: their connections read again."""
        for device_id in set(device_ids):
            for client in self.by_device.get(device_id, ()):
                client.synced = False
                self._kick(client)

    def deliver_committed(self, pairs: list[tuple[str, f.Envelope]]) -> None:
        """Envelopes just committed (QueueService.on_committed), in queue order:
        push them to every connection of their device that is caught up and has
        no pump running, without reading them back; the others read again."""
        by_device: dict[str, list[f.Envelope]] = {}
        for device_id, envelope in pairs:
            by_device.setdefault(device_id, []).append(envelope)
        for device_id, envelopes in by_device.items():
            for client in list(self.by_device.get(device_id, ())):
                if client.closing is not None or not client.pumping:
                    continue
                fresh = [e for e in envelopes if e.envelope_id > client.delivered]
                if not fresh:
                    continue
                if (
                    client.synced
                    and not client.pump_running
                    and len(client.unacked) + len(fresh) <= PUMP_WINDOW
                ):
                    client.delivered = fresh[-1].envelope_id
                    client.unacked.extend(e.envelope_id for e in fresh)
                    for batch in deliver_batches(fresh):
                        self.relay.push(client, client.proto.reply(f.Deliver(envelopes=batch)))
                else:
                    client.synced = False  # the pump reads them from the table
                    self._kick(client)

    def _kick(self, client: _Client) -> None:
        """Make sure the connection's queue is read: start its pump, or tell the
        running one to read once more."""
        if not client.pumping or client.closing is not None or client.grant is None:
            return
        if client.pump_running:
            client.again = True
        elif self.relay.nursery is not None:
            client.pump_running = True
            self.relay.nursery.start_soon(self._pump, client)

    async def _pump(self, client: _Client) -> None:
        """Read this connection's queue from the table and send it, in order and
        in batches, at most PUMP_WINDOW unacknowledged at a time.

        A pump runs only while there is reading to do. Once it reads nothing
        new it marks the connection *synced* and ends; from then on
        :meth:`deliver_committed` pushes new envelopes straight from their
        commit, until something (a full window, a wake-up without the
        envelopes) kicks off a pump again. Idle connections have no pump."""
        try:
            while self.queues is not None and client.closing is None:
                grant = client.grant
                if grant is None or client not in self.relay.clients:
                    return
                if len(client.unacked) >= PUMP_WINDOW:
                    return  # not synced: the next ack kicks a pump off again
                client.again = False
                batch = await self.queues.pending(grant.device_id, client.delivered)
                if client.closing is not None:
                    return
                if batch:
                    client.delivered = batch[-1].envelope_id
                    client.unacked.extend(e.envelope_id for e in batch)
                    self.relay.push(client, client.proto.reply(f.Deliver(envelopes=batch)))
                    continue
                if client.again:
                    continue  # something was committed during the read
                client.synced = True
                return
        except Exception:
            # A pump must never take the relay down; the device gets its queue
            # on its next connection.
            log.exception("relay.pump_failed")
        finally:
            client.pump_running = False

    def _unregister(self, client: _Client) -> None:
        grant = client.grant
        if grant is None:
            return
        clients = self.by_session.get(grant.session_id)
        if clients is not None:
            clients.discard(client)
            if not clients:
                del self.by_session[grant.session_id]
        same_device = self.by_device.get(grant.device_id)
        if same_device is not None:
            same_device.discard(client)
            if not same_device:
                del self.by_device[grant.device_id]

    def detach(self, client: _Client) -> None:
        """The connection leaves its session (closing, logging out, revoked)."""
        grant = client.grant
        if grant is None:
            return
        self._unregister(client)
        client.grant = None
        if grant.user_id not in self._online_users():
            self._announce(grant.user_id, online=False)

    def push_key_counts(self, device_ids: Iterable[str]) -> None:
        """Tell these devices' live connections their key count (KeyService.on_keys_low)."""
        wanted = set(device_ids)
        if not wanted or self.keys is None:
            return
        for clients in list(self.by_session.values()):
            for client in list(clients):
                if client.grant is not None and client.grant.device_id in wanted:
                    if self.relay.nursery is not None:
                        self.relay.nursery.start_soon(self._push_key_count, client)

    async def _push_key_count(self, client: _Client) -> None:
        """A fire-and-forget push: it must never raise into the relay's nursery."""
        if self.keys is None or client.grant is None or client.closing is not None:
            return
        try:
            count = await self.keys.key_count(client.grant.device_id)
        except Exception:
            log.exception("relay.key_count_failed")
            return
        self.relay.push(client, client.proto.reply(count))

    def close_sessions(self, session_ids: Iterable[int]) -> None:
        """Close every connection of these sessions with 4003 (AuthService.on_revoked)."""
        for sid in list(session_ids):
            for client in list(self.by_session.pop(sid, ())):
                self.relay.close_client(client, client.proto.session_revoked())

    async def revalidate_forever(self, interval: float) -> None:
        """Every ``interval`` seconds: close expired and no-longer-valid sessions."""
        with self._sweep:
            while True:
                await trio.sleep(interval)
                await self.revalidate()

    def stop(self) -> None:
        self._sweep.cancel()
        self._presence_scope.cancel()

    async def revalidate(self) -> None:
        now = now_ms()
        for clients in list(self.by_session.values()):
            for client in list(clients):
                if client.grant is not None and client.grant.access_expires_at <= now:
                    self.detach(client)
                    self.relay.close_client(client, client.proto.session_expired())
        if self.auth is not None and self.by_session:
            self.close_sessions(await self.auth.invalid_sessions(list(self.by_session)))

    # -- requests ----------------------------------------------------------------------

    def pipelined(self, frame: Any) -> bool:
        """Requests a connection may have several of in flight: sends and acks.
        Their writes are submitted in order and commit in one batch; see begin()."""
        return self.auth is not None and self.queues is not None and isinstance(frame, _PIPELINED)

    async def begin(
        self, client: _Client, frame: Any
    ) -> Callable[[], Awaitable[list[core.Action]]]:
        """Start a pipelined request: its write is queued for the writer before
        this returns, so one connection's requests commit in the order they
        came. The returned function waits for the commit and gives the reply."""
        proto = client.proto
        grant = client.grant
        queues = self.queues
        assert grant is not None and queues is not None  # noqa: S101 - see pipelined() and core
        if isinstance(frame, f.Send):
            send = await queues.begin_send(grant.user_id, grant.device_id, frame)

            async def sent() -> list[core.Action]:
                try:
                    return proto.reply(await send())
                except AuthError as exc:
                    return proto.error(exc.code, exc.message, request_id=frame.id, field=exc.field)

            return sent
        assert isinstance(frame, f.Ack)  # noqa: S101 - see pipelined()
        # Only what this connection was sent can be acknowledged on it: an
        # oversized up_to must not delete envelopes nobody has seen.
        up_to = min(frame.up_to, client.delivered)
        ack = await queues.begin_ack(grant.device_id, up_to) if up_to else None

        async def acked() -> list[core.Action]:
            if ack is not None:
                await ack()
            del client.unacked[: bisect.bisect_right(client.unacked, up_to)]
            if not client.synced:  # a synced connection has nothing to read
                self._kick(client)
            return proto.reply(f.Ok(id=frame.id)) if frame.id else []

        return acked

    def _rotated(self, fresh: SessionGrant) -> f.NewTokens:
        """After a request rotated the session's tokens (refresh, a password or
        second-factor change): every connection of the session lives on from
        here under the new access token's expiry; the new pair."""
        for other in self.by_session.get(fresh.session_id, ()):
            if other.grant is not None:
                other.grant = replace(
                    other.grant,
                    access_expires_at=fresh.access_expires_at,
                    access_token=None,
                    refresh_token=None,
                )
        assert fresh.access_token and fresh.refresh_token  # noqa: S101 - a rotation issues both
        return f.NewTokens(
            session_id=fresh.session_id,
            access_token=fresh.access_token,
            access_expires_at=fresh.access_expires_at,
            refresh_token=fresh.refresh_token,
            expires_at=fresh.expires_at,
        )

    async def handle(self, client: _Client, frame: Any) -> list[core.Action]:
        """Serve one session request; the reply (or error) as actions."""
        proto = client.proto
        request_id: str | None = getattr(frame, "id", None)  # typing and ack may have none
        if self.auth is None:
            return proto.error(
                "unavailable", "sessions are not available on this server", request_id=request_id
            )
        # Device names come with login/register; later requests are tied to the session.
        peer = Peer(ip=mask_ip(client.peer), device_name="", network=client_network(client.peer))
        try:
            actions = await self._dispatch(client, frame, peer)
        except AuthError as exc:
            actions = proto.error(
                exc.code,
                exc.message,
                request_id=request_id,
                field=exc.field,
                retry_after=exc.retry_after,
            )
        if client in self._new_pumps:
            self._new_pumps.discard(client)
            # No checkpoint between here and the caller queuing ``actions``:
            # the pump's first deliver comes after the session reply.
            self._kick(client)
        return actions

    async def _key_count(self, client: _Client) -> list[core.Action]:
        """After a session starts: the device's one-time key count (and whether to upload)."""
        if self.keys is None or client.grant is None or not client.grant.device_id:
            return []
        return client.proto.reply(await self.keys.key_count(client.grant.device_id))

    def _queue_service(self) -> QueueService:
        if self.queues is None:
            raise AuthError("unavailable", "messaging is not available on this server")
        return self.queues

    def _key_service(self) -> KeyService:
        if self.keys is None:
            raise AuthError("unavailable", "keys are not available on this server")
        return self.keys

    async def _dispatch(self, client: _Client, frame: Any, peer: Peer) -> list[core.Action]:
        auth = self.auth
        assert auth is not None  # noqa: S101 - checked by handle()
        proto = client.proto
        grant = client.grant
        match frame:
            case f.Login():
                login_peer = replace(peer, device_name=frame.device_name)
                grant = await auth.login(
                    frame.username,
                    frame.password,
                    login_peer,
                    totp=frame.totp,
                    recovery_code=frame.recovery_code,
                    device_id=frame.device_id,
                )
                self.attach(client, grant)
                return proto.reply(_session_frame(frame.id, grant)) + await self._key_count(client)
            case f.Register():
                reg_peer = replace(peer, device_name=frame.device_name)
                grant = await auth.register(
                    frame.invite_code, frame.username, frame.password, reg_peer
                )
                self.attach(client, grant)
                return proto.reply(_session_frame(frame.id, grant)) + await self._key_count(client)
            case f.Resume():
                grant = await auth.resume(frame.access_token, peer)
                self.attach(client, grant)
                return proto.reply(_session_frame(frame.id, grant)) + await self._key_count(client)
            case f.Refresh():
                fresh = await auth.refresh(frame.refresh_token, peer)
                if grant is None or grant.session_id == fresh.session_id:
                    # Refreshing authenticates a new connection, and extends a live one.
                    self.attach(client, fresh)
                pair = self._rotated(fresh)
                return proto.reply(f.Tokens(id=frame.id, **msgspec.structs.asdict(pair)))
        assert grant is not None  # noqa: S101 - the core admits the rest only with a session
        match frame:
            case f.Logout():
                self.detach(client)  # so the revocation does not close us with 4003
                await auth.logout(grant, peer)
                return proto.reply(f.Ok(id=frame.id)) + proto.logged_out()
            case f.ListSessions():
                sessions = await auth.list_sessions(grant.user_id)
                entries = [
                    f.SessionEntry(
                        session_id=s.session_id,
                        device_name=s.device_name,
                        created_at=s.created_at,
                        last_seen_at=s.last_seen_at,
                        ip=s.ip,
                        expires_at=s.expires_at,
                        current=s.session_id == grant.session_id,
                    )
                    for s in sessions
                    if not s.revoked and s.expires_at > now_ms()
                ]
                return proto.reply(f.Sessions(id=frame.id, sessions=entries))
            case f.RevokeSessions():
                if grant.session_id in frame.session_ids:
                    raise AuthError(
                        "use_logout", "to end this session, send logout", field="$.session_ids"
                    )
                revoked = await auth.revoke_own_sessions(
                    grant, peer, session_ids=frame.session_ids, all_others=frame.all_others
                )
                return proto.reply(f.Revoked(id=frame.id, session_ids=revoked))
            case f.ChangePassword():
                fresh = await auth.change_password(
                    grant, frame.current_password, frame.new_password, frame.totp, peer
                )
                return proto.reply(f.Ok(id=frame.id, tokens=self._rotated(fresh)))
            case f.MfaEnroll():
                secret, uri = await auth.mfa_enroll(grant, frame.password, frame.totp, peer)
                return proto.reply(
                    f.MfaEnrollment(id=frame.id, secret=secret, provisioning_uri=uri)
                )
            case f.MfaConfirm():
                codes, fresh = await auth.mfa_confirm(grant, frame.code, peer)
                pair = self._rotated(fresh)
                if grant.mfa_enrollment_required and client.grant is not None:
                    self.attach(client, replace(client.grant, mfa_enrollment_required=False))
                return proto.reply(f.RecoveryCodes(id=frame.id, codes=codes, tokens=pair))
            case f.MfaDisable():
                fresh = await auth.mfa_disable(grant, frame.password, frame.code, peer)
                return proto.reply(f.Ok(id=frame.id, tokens=self._rotated(fresh)))
            case f.KeysUpload():
                keys = self._key_service()
                return proto.reply(await keys.upload(grant.user_id, grant.device_id, frame))
            case f.KeysClaim():
                claimed, missing = await self._key_service().claim(frame.devices)
                return proto.reply(f.KeysClaimed(id=frame.id, keys=claimed, missing=missing))
            case f.Directory():
                members = await self._key_service().directory()
                return proto.reply(f.Members(id=frame.id, members=members))
            case f.RemoveDevice():
                if frame.device_id == grant.device_id:
                    raise AuthError(
                        "use_logout",
                        "a device cannot remove itself; log out, or remove it from another device",
                        field="$.device_id",
                    )
                ended = await self._key_service().remove_device(grant.user_id, frame.device_id)
                self.close_sessions(ended)
                await auth.audit(
                    "remove_device", "ok", peer, user_id=grant.user_id, session_id=grant.session_id
                )
                return proto.reply(f.Ok(id=frame.id))
            case f.Typing():
                notice = f.TypingNotice(user_id=grant.user_id, active=frame.active)
                for other in self._user_clients(frame.to_user_id):
                    self.relay.push(other, other.proto.reply(notice))
                return []
            case f.WhoIsOnline():
                return proto.reply(f.Presence(id=frame.id, online=sorted(self._online_users())))
            case f.Send() | f.Ack():
                self._queue_service()  # raises: with a queue service they are pipelined
            case f.NewRecoveryCodes():
                codes, fresh = await auth.regenerate_recovery_codes(
                    grant, frame.password, frame.code, peer
                )
                return proto.reply(
                    f.RecoveryCodes(id=frame.id, codes=codes, tokens=self._rotated(fresh))
                )
        log.error("relay.unhandled_frame", extra=fields(type=type(frame).__name__))
        return proto.internal_error()
