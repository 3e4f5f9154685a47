"""The request dispatcher: what each client frame does, and its answer.

The protocol core (:mod:`chatd.protocol.core`) decides *whether* a frame is
allowed in the connection's state and answers what it can alone (``ping``,
bad frames, ``bye``); the dispatcher carries out the rest with the services
and queues the answers on the connection, in the order the frames came.

``send`` and ``ack`` are pipelined: a connection may have up to
PIPELINE_DEPTH of them waiting for their outcome while it reads on. A
``send`` is checked and accepted at once (its envelopes reach live
recipients before they are written) and keeps its place among the answers
until it is durable or delivered (:mod:`chatd.e2ee.queues`). Any other
request first waits until every earlier ``send`` and ``ack`` is answered, so
a request that changes the session sees every earlier write done.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Final

import msgspec
import trio

from chatd.auth.models import AuthError, Peer, SessionGrant
from chatd.auth.service import AuthService
from chatd.blobs.grants import Referral
from chatd.blobs.service import BlobError, BlobService
from chatd.consent import ConsentError, ConsentService
from chatd.e2ee.keys import KeyService
from chatd.e2ee.queues import Accepted, Mismatch, Outcome, QueueFull, QueueService, Repeated
from chatd.errors import StoreError
from chatd.log import client_network, fields, mask_ip
from chatd.protocol import core
from chatd.protocol import frames as f
from chatd.protocol import rooms as r
from chatd.protocol.delivery import Phase
from chatd.push import Notifier, PushRefused
from chatd.relay import consent, delivery
from chatd.relay.blobs import BLOB_REQUESTS, serve_blob_request, unavailable
from chatd.relay.connection import Connection
from chatd.relay.export import EXPORT_REQUESTS, serve_export_request
from chatd.relay.push import PUSH_REQUESTS, serve_push_request
from chatd.relay.ratelimits import RequestLimits
from chatd.relay.registry import Registry, close_with
from chatd.relay.rooms import ROOM_REQUESTS, serve_room_request
from chatd.rooms.model import RoomError
from chatd.rooms.service import RoomService
from chatd.store.store import WRITE_RECHECK_SECONDS

log = logging.getLogger("chatd.relay")

PIPELINE_DEPTH: Final = 64  # sends and acks per connection waiting for their outcome
STORAGE_RETRY_SECONDS: Final = WRITE_RECHECK_SECONDS  # retry_after of storage_unavailable

ERR_QUEUE_FULL: Final = "queue_full"
ERR_STORAGE_UNAVAILABLE: Final = "storage_unavailable"


def _session_frame(
    request_id: str, grant: SessionGrant, consent_required: list[f.ConsentDocument]
) -> f.Session:
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
        consent_required=consent_required,
    )


def _storage_error(
    proto: core.ServerConnection, request_id: str | None, *, sending: bool = False
) -> list[core.Action]:
    """A request that needed a write the storage refused. For a send, nothing
    was queued; for other requests a part may have been written (try again)."""
    if sending:
        message = (
            "the server cannot write to its storage right now; the message may not be"
            " queued: send it again later with the same message_id"
        )
    else:
        message = "the server cannot write to its storage right now; try again later"
    return proto.error(
        ERR_STORAGE_UNAVAILABLE, message, request_id=request_id, retry_after=STORAGE_RETRY_SECONDS
    )


class Dispatcher:
    """Carries out client frames for one relay."""

    def __init__(
        self,
        registry: Registry,
        auth: AuthService,
        keys: KeyService,
        queues: QueueService,
        rooms: RoomService,
        limits: RequestLimits,
        push: Notifier,
        consent: ConsentService,
        blobs: BlobService | None = None,
        *,
        export_seconds: float = 300.0,
    ) -> None:
        self.registry = registry
        self.auth = auth
        self.keys = keys
        self.queues = queues
        self.rooms = rooms
        self.limits = limits  # per-account rates of send, keys_claim, directory
        self.push = push
        self.consent = consent
        self.blobs = blobs  # None: no blob listener, attachment requests are refused
        self.export_seconds = export_seconds  # lifetime of an account export URL

    async def carry_out(self, conn: Connection, actions: list[core.Action]) -> None:
        """Carry out the core's actions for one client message, in order."""
        for action in actions:
            if conn.closing is not None:
                return
            if isinstance(action, f.Send):  # the common cases first
                self.registry.stats.sends += 1
                await self._send(conn, action)
            elif isinstance(action, f.Ack):
                self.registry.stats.acks += 1
                await self._ack(conn, action)
            elif isinstance(action, r.RoomSend):
                self.registry.stats.room_sends += 1
                await self._room_send(conn, action)
            elif isinstance(action, core.Send):
                conn.answer([action.data])
            elif isinstance(action, core.Close):
                conn.close(action)
            else:
                await self._request(conn, action)

    def _perform(self, conn: Connection, actions: list[core.Action]) -> None:
        """Answer with the frames among ``actions``, then close if one says so."""
        conn.answer([a.data for a in actions if isinstance(a, core.Send)])
        close_with(conn, actions)

    # -- pipelined: send and ack -------------------------------------------------------

    async def _sender(self, conn: Connection, request_id: str) -> SessionGrant | None:
        """The grant of a connection that may send (its session has a device),
        once the pipeline has room; None if it was refused with ``no_device``
        or ``rate_limited`` (the account's send rate, relay.send_rate_per_user)."""
        grant = conn.grant
        if grant is None or not grant.device_id:
            error = conn.proto.error(
                "no_device", "this session has no device", request_id=request_id
            )
            self._perform(conn, error)
            return None
        if conn.waiting_answers >= PIPELINE_DEPTH:
            await conn.wait_answers(below=PIPELINE_DEPTH)  # backpressure, not an error
        refused = self.limits.refuse(conn.proto, "send", grant.user_id, request_id)
        if refused is not None:
            self._perform(conn, refused.actions)
            # Read nothing more of this connection until the account may send
            # again: TCP holds back a flood of sends for free (section 6.12).
            conn.pause_reading(refused.retry_after)
            return None
        return grant

    async def _refer(
        self,
        conn: Connection,
        grant: SessionGrant,
        frame: f.Send | r.RoomSend,
        *,
        device_ids: list[str] | None = None,
        room_id: int | None = None,
    ) -> Referral | None:
        """Record the references of a message's ``blob_ids`` before it is
        queued (so no recipient sees it before it may fetch them); what was
        new, to withdraw if the message is refused. None (and the error
        answered) when one is refused."""
        if not frame.blob_ids:
            return Referral()
        try:
            if self.blobs is None:
                raise unavailable("$.blob_ids")
            return await self.blobs.refer(
                grant.user_id,
                grant.device_id,
                frame.blob_ids,
                device_ids=device_ids or (),
                room_id=room_id,
            )
        except BlobError as exc:
            self._perform(conn, _refused(conn.proto, frame.id, exc))
        except StoreError:
            self._perform(conn, _storage_error(conn.proto, frame.id, sending=True))
        return None

    async def _withdraw(self, referral: Referral, device_ids: list[str] | None = None) -> None:
        """Take back the references of a refused message (or of the devices a
        send left out), so that they grant no read access."""
        if self.blobs is None:
            return
        try:
            with trio.CancelScope(shield=True):
                await self.blobs.withdraw(referral, device_ids=device_ids)
        except StoreError:
            log.warning("relay.blob_references_kept", extra=fields(grants=len(referral.readers)))

    def _confirm(self, referral: Referral, skipped: list[str] | None = None) -> None:
        if self.blobs is not None:
            self.blobs.confirm(referral, except_devices=skipped or ())

    def _release(self, referral: Referral) -> None:
        if self.blobs is not None:
            self.blobs.release(referral)

    async def _send(self, conn: Connection, frame: f.Send) -> None:
        grant = await self._sender(conn, frame.id)
        if grant is None:
            return
        referral = await self._refer(
            conn, grant, frame, device_ids=[e.device_id for e in frame.envelopes]
        )
        if referral is None:
            return
        try:
            await self._send_referred(conn, frame, grant, referral)
        finally:
            self._release(referral)

    async def _send_referred(
        self, conn: Connection, frame: f.Send, grant: SessionGrant, referral: Referral
    ) -> None:
        proto = conn.proto
        try:
            result = await self.queues.send(grant.user_id, grant.device_id, frame)
        except StoreError:
            await self._withdraw(referral)
            self._perform(conn, _storage_error(proto, frame.id, sending=True))
            return
        match result:
            case Accepted(outcome) | Repeated(outcome):
                skipped = list(result.skipped) if isinstance(result, Accepted) else None
                left_out = [d.device_id for d in skipped or ()]
                if left_out:
                    await self._withdraw(referral, left_out)
                self._confirm(referral, left_out)
                handle = conn.reserve()
                if handle is None:
                    return
                outcome.when_done(lambda o: conn.fill(handle, _sent(proto, frame, o, skipped)))
                watching = conn.watching or ()
                if any(
                    e.user_id not in watching and e.user_id != grant.user_id
                    for e in frame.envelopes
                ):
                    self.registry.watch(conn, {e.user_id for e in frame.envelopes})
            case Mismatch(mismatch):
                await self._withdraw(referral)
                self._perform(conn, proto.reply(mismatch))
            case QueueFull(device_ids):
                await self._withdraw(referral)
                self._perform(
                    conn,
                    proto.error(
                        ERR_QUEUE_FULL,
                        f"the queue of device {', '.join(device_ids)} is full; nothing was sent"
                        " (try again later)",
                        request_id=frame.id,
                        field="$.envelopes",
                    ),
                )

    async def _room_send(self, conn: Connection, frame: r.RoomSend) -> None:
        grant = await self._sender(conn, frame.id)
        if grant is None:
            return
        referral = await self._refer(conn, grant, frame, room_id=frame.room_id)
        if referral is None:
            return
        proto = conn.proto
        try:
            try:
                result, skipped = self.rooms.send(grant.user_id, grant.device_id, frame)
            except RoomError as exc:
                await self._withdraw(referral)
                self._perform(conn, _refused(proto, frame.id, exc))
                return
            self._confirm(referral)
        finally:
            self._release(referral)
        handle = conn.reserve()
        if handle is None:
            return
        result.outcome.when_done(lambda o: conn.fill(handle, _sent(proto, frame, o, skipped)))

    async def _ack(self, conn: Connection, frame: f.Ack) -> None:
        if conn.waiting_answers >= PIPELINE_DEPTH:
            await conn.wait_answers(below=PIPELINE_DEPTH)  # backpressure, not an error
        outcome = delivery.acknowledge(conn, frame.up_to, self.queues)
        proto = conn.proto
        request_id = frame.id
        if outcome is None or outcome.done:
            if request_id is not None:
                self._perform(conn, _acked(proto, request_id, outcome))
            delivery.pump(conn, self.queues, self.registry)
            return
        # Its place among the answers is kept even without an id (then silent),
        # so that later requests still see its write done. With an id, the
        # deliveries the ack makes room for come after its answer.
        handle = conn.reserve(silent=request_id is None)
        if handle is None:
            return
        if request_id is None:
            delivery.pump(conn, self.queues, self.registry)

        def answered(done: Outcome) -> None:
            conn.fill(handle, _acked_frames(proto, request_id, done))
            if request_id is not None:
                delivery.pump(conn, self.queues, self.registry)

        outcome.when_done(answered)

    # -- everything else -----------------------------------------------------------------

    async def _request(self, conn: Connection, frame: Any) -> None:
        await conn.wait_answers()  # answers keep request order; writes are done
        if conn.closing is not None:
            return
        proto = conn.proto
        request_id: str | None = getattr(frame, "id", None)
        peer = Peer(ip=mask_ip(conn.peer), device_name="", network=client_network(conn.peer))
        try:
            # Carried out to the end even if the connection is closed meanwhile
            # (a session may be made, a password changed): it is bounded by the
            # request's own work, and shutdown waits for it.
            with trio.CancelScope(shield=True):
                actions = await self._serve(conn, frame, peer)
        except AuthError as exc:
            actions = proto.error(
                exc.code,
                exc.message,
                request_id=request_id,
                field=exc.field,
                retry_after=exc.retry_after,
            )
        except (RoomError, PushRefused, BlobError, ConsentError) as exc:
            actions = _refused(proto, request_id, exc)
        except StoreError:
            # Per request at debug: the store logs the episode and its cause once.
            log.debug("relay.storage_unavailable", extra=fields(request=type(frame).__name__))
            actions = _storage_error(proto, request_id)
        self._perform(conn, actions)
        if conn.grant is not None and conn.delivery.phase is Phase.WAITING:
            # A session began (or lost its restriction): its reply is queued,
            # so deliveries may follow it.
            delivery.start(conn, self.queues, self.registry)

    async def _started(
        self, conn: Connection, request_id: str, grant: SessionGrant
    ) -> list[core.Action]:
        """A login, registration or resume made ``grant``: attach it to the
        connection, gated on the documents its user has not accepted; the
        ``session`` answer, and the key count once nothing is left to accept."""
        accepted = await self.consent.accepted(grant.user_id)
        self.registry.attach(conn, grant)
        consent.gate(conn, self.consent, accepted)
        required = consent.documents(conn, self.consent.current)
        reply = conn.proto.reply(_session_frame(request_id, grant, required))
        return reply if required else reply + await self._key_count(conn)

    def _lifted(self, conn: Connection) -> None:
        """``conn``'s user accepted, on another connection, all it was gated
        on: its deliveries start, and it hears its device's key count."""
        if conn.grant is not None and conn.grant.device_id:
            self.registry.keys_low((conn.grant.device_id,))
        if conn.delivery.phase is Phase.WAITING:
            delivery.start(conn, self.queues, self.registry)

    async def _key_count(self, conn: Connection) -> list[core.Action]:
        """After a session starts: the device's one-time key count (and whether to upload)."""
        if conn.grant is None or not conn.grant.device_id:
            return []
        return conn.proto.reply(await self.keys.key_count(conn.grant.device_id))

    def _rotated(self, fresh: SessionGrant) -> f.NewTokens:
        """After a request rotated the session's tokens (refresh, a password or
        second-factor change): every connection of the session lives on from
        here under the new access token's expiry; the new pair."""
        for other in self.registry.by_session.get(fresh.session_id, ()):
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

    async def _serve(self, conn: Connection, frame: Any, peer: Peer) -> list[core.Action]:
        auth = self.auth
        proto = conn.proto
        grant = conn.grant
        registry = self.registry
        match frame:
            case f.Login():
                grant = await auth.login(
                    frame.username,
                    frame.password,
                    replace(peer, device_name=frame.device_name),
                    totp=frame.totp,
                    recovery_code=frame.recovery_code,
                    device_id=frame.device_id,
                )
                return await self._started(conn, frame.id, grant)
            case f.Register():
                grant = await auth.register(
                    frame.invite_code,
                    frame.username,
                    frame.password,
                    replace(peer, device_name=frame.device_name),
                )
                return await self._started(conn, frame.id, grant)
            case f.Resume():
                grant = await auth.resume(frame.access_token, peer)
                return await self._started(conn, frame.id, grant)
            case f.Refresh():
                fresh = await auth.refresh(frame.refresh_token, peer)
                if grant is None:  # refreshing authenticates a new connection
                    accepted = await self.consent.accepted(fresh.user_id)
                    registry.attach(conn, fresh)
                    consent.gate(conn, self.consent, accepted)
                elif grant.session_id == fresh.session_id:  # and extends a live one
                    registry.attach(conn, fresh)
                pair = self._rotated(fresh)
                required = consent.documents(conn, self.consent.current)
                tokens = f.Tokens(
                    id=frame.id, consent_required=required, **msgspec.structs.asdict(pair)
                )
                return proto.reply(tokens)
        assert grant is not None  # noqa: S101 - the core admits the rest only with a session
        match frame:
            case f.Logout():
                registry.detach(conn)  # so the revocation does not close us with 4003
                try:
                    await auth.logout(grant, peer)
                except BaseException:
                    registry.attach(conn, grant)  # still logged in: the session goes on
                    raise
                return proto.reply(f.Ok(id=frame.id)) + proto.logged_out()
            case f.ListSessions():
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
                    for s in await auth.list_sessions(grant.user_id)  # the live ones
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
                if grant.mfa_enrollment_required and conn.grant is not None:
                    registry.attach(conn, replace(conn.grant, mfa_enrollment_required=False))
                return proto.reply(f.RecoveryCodes(id=frame.id, codes=codes, tokens=pair))
            case f.MfaDisable():
                fresh = await auth.mfa_disable(grant, frame.password, frame.code, peer)
                return proto.reply(f.Ok(id=frame.id, tokens=self._rotated(fresh)))
            case f.NewRecoveryCodes():
                codes, fresh = await auth.regenerate_recovery_codes(
                    grant, frame.password, frame.code, peer
                )
                return proto.reply(
                    f.RecoveryCodes(id=frame.id, codes=codes, tokens=self._rotated(fresh))
                )
            case f.KeysUpload():
                return proto.reply(await self.keys.upload(grant.user_id, grant.device_id, frame))
            case f.KeysClaim():
                refused = self.limits.refuse(proto, "keys_claim", grant.user_id, frame.id)
                if refused is not None:
                    return refused.actions
                claimed, missing = await self.keys.claim(frame.devices)
                return proto.reply(f.KeysClaimed(id=frame.id, keys=claimed, missing=missing))
            case f.Directory():
                refused = self.limits.refuse(proto, "directory", grant.user_id, frame.id)
                if refused is not None:
                    return refused.actions
                members = await self.keys.directory()
                return proto.reply(f.Members(id=frame.id, members=members))
            case f.RemoveDevice():
                if frame.device_id == grant.device_id:
                    raise AuthError(
                        "use_logout",
                        "a device cannot remove itself; log out, or remove it from another device",
                        field="$.device_id",
                    )
                ended = await self.keys.remove_device(grant.user_id, frame.device_id)
                registry.sessions_revoked(ended)
                self.queues.forget_device(frame.device_id)
                self.push.forget_device(frame.device_id)
                await auth.audit(
                    "remove_device", "ok", peer, user_id=grant.user_id, session_id=grant.session_id
                )
                return proto.reply(f.Ok(id=frame.id))
            case f.Typing():
                notice = core.encode(f.TypingNotice(user_id=grant.user_id, active=frame.active))
                for other in registry.by_user.get(frame.to_user_id, ()):
                    other.push(notice)
                registry.watch_each_other(conn, frame.to_user_id)
                return []
            case _ if isinstance(frame, ROOM_REQUESTS):
                if not grant.device_id:
                    raise AuthError("no_device", "this session has no device")
                return proto.reply(await serve_room_request(self.rooms, grant, frame))
            case _ if isinstance(frame, PUSH_REQUESTS):
                if not grant.device_id:
                    raise AuthError("no_device", "this session has no device")
                refused = self.limits.refuse(proto, "push", grant.user_id, frame.id)
                if refused is not None:
                    return refused.actions
                return proto.reply(await serve_push_request(self.push, grant, frame))
            case _ if isinstance(frame, BLOB_REQUESTS):
                if not grant.device_id:
                    raise AuthError("no_device", "this session has no device")
                return proto.reply(await serve_blob_request(self.blobs, grant, frame))
            case _ if isinstance(frame, consent.CONSENT_REQUESTS):
                was_gated = bool(proto.consent_pending)
                actions = await consent.serve_consent_request(
                    self.consent, registry, conn, grant, frame, self._lifted
                )
                if was_gated and not proto.consent_pending:  # its session can start now
                    actions += await self._key_count(conn)
                return actions
            case _ if isinstance(frame, EXPORT_REQUESTS):
                reply = await serve_export_request(
                    auth, self.blobs, grant, frame, peer, lifetime_seconds=self.export_seconds
                )
                return proto.reply(reply)
            case f.WhoIsOnline():
                if frame.user_ids is None:
                    online = registry.online_users()
                else:
                    registry.watch(conn, frame.user_ids)
                    online = sorted({u for u in frame.user_ids if registry.is_online(u)})
                return proto.reply(f.Presence(id=frame.id, online=online))
        log.error("relay.unhandled_frame", extra=fields(type=type(frame).__name__))
        return proto.internal_error()


def _sent(
    proto: core.ServerConnection,
    frame: f.Send | r.RoomSend,
    outcome: Outcome,
    skipped: list[f.DeviceRef] | None = None,
) -> list[bytes]:
    """The answer to a send (or a room send) once its outcome is known."""
    if outcome.error is not None:
        actions = _storage_error(proto, frame.id, sending=True)
    else:
        reply = f.Sent(
            id=frame.id,
            message_id=frame.message_id,
            envelopes=outcome.envelopes,
            skipped=skipped or [],
        )
        actions = proto.reply(reply)
    return [a.data for a in actions if isinstance(a, core.Send)]


def _refused(
    proto: core.ServerConnection,
    request_id: str | None,
    exc: RoomError | PushRefused | BlobError | ConsentError,
) -> list[core.Action]:
    return proto.error(exc.code, exc.message, request_id=request_id, field=exc.field)


def _acked(
    proto: core.ServerConnection, request_id: str, outcome: Outcome | None
) -> list[core.Action]:
    if outcome is not None and outcome.error is not None:
        return _storage_error(proto, request_id)
    return proto.reply(f.Ok(id=request_id))


def _acked_frames(
    proto: core.ServerConnection, request_id: str | None, outcome: Outcome
) -> list[bytes]:
    if request_id is None:
        return []
    return [a.data for a in _acked(proto, request_id, outcome) if isinstance(a, core.Send)]
