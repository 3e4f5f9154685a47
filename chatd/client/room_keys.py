"""The device's Megolm state with its persistence: one owner for the
:class:`~chatd.client.megolm.MegolmMachine` and the rooms' part of the store.

Every use of the machine happens under :attr:`RoomKeys.lock`, and what it
changed is committed before the call returns, so:

* a Megolm ciphertext leaves the device only after the ratchet step that made
  it is stored (a crash never reuses a message key);
* a received ``room_key`` is stored in one transaction with the Olm state that
  decrypted it, its control record, and the held messages it opened;
* a received room message is stored in one transaction with the inbound
  session state its decryption changed.

Lock order: the client's Olm lock may be held when this lock is taken (a
``room_key`` arrives inside an Olm decryption); never the other way round,
so nothing here sends over Olm while holding :attr:`lock`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, NamedTuple

import trio

from .errors import DecryptionError, RoomMismatchError
from .megolm import (
    InboundSession,
    KeyMissing,
    MegolmMachine,
    MemberDevice,
    OutboundSession,
    RoomSettings,
)
from .room_events import BAD_CIPHERTEXT, REPLAY, WRONG_ROOM, RoomMessage, RoomUndecryptable
from .room_payloads import RoomKey, decode_room_text, room_ciphertext_session
from .room_store import HeldMessage, OlmWrite, Released, RoomStore
from .store import DeviceRecord, HistoryEntry, now_ms

log = logging.getLogger(__name__)


class Held(NamedTuple):
    """A room message stored as held: its key has not come (yet)."""

    message_id: str
    room_id: int
    session_id: str


def member_device(d: DeviceRecord | MemberDevice) -> MemberDevice:
    return MemberDevice(d.user_id, d.device_id, d.curve25519, d.ed25519)


class RoomKeys:
    """Megolm sessions of every room, and their storage. Get one from :meth:`open`."""

    def __init__(self, store: RoomStore, machine: MegolmMachine, settings: RoomSettings) -> None:
        self.store = store
        self.machine = machine
        self.settings = settings
        self.lock = trio.Lock()

    @classmethod
    async def open(
        cls, store: RoomStore, key: bytes, own: MemberDevice, settings: RoomSettings
    ) -> RoomKeys:
        outbound, inbound = await store.megolm_state()
        return cls(store, MegolmMachine.restore(key, own, outbound, inbound), settings)

    @property
    def own(self) -> MemberDevice:
        return self.machine.own

    # -- sending --------------------------------------------------------------

    async def session_for(
        self, room_id: int, members: Sequence[MemberDevice]
    ) -> tuple[OutboundSession, str | None]:
        """The outbound session for the room's next message (``members``: the
        member devices but this one), made and stored if a new one is due.
        Returns it and why it is new (None if it is not)."""
        async with self.lock:
            session, reason = self.machine.outbound_for(room_id, members, self.settings, now_ms())
            if reason is not None:
                await self.store.save_megolm(self.machine.take_dirty())
            return session, reason

    async def shared(
        self,
        room_id: int,
        key: RoomKey,
        devices: Sequence[MemberDevice],
        message_id: str,
        skipped: Sequence[MemberDevice] = (),
    ) -> None:
        """``key`` went to ``devices`` in Olm message ``message_id`` (the server
        accepted it). ``skipped`` devices were meant to get it but their queue
        was full: they are recorded as entitled to it (a key request of theirs
        is answered from that index) but not as having it (our next message
        shares it with them again)."""
        async with self.lock:
            self.machine.mark_shared(room_id, key.session_id, devices, key.first_index)
            await self.store.add_shares(
                room_id, key.session_id, [*devices, *skipped], key.first_index, message_id
            )

    async def encrypt(self, room_id: int, session_id: str, plaintext: bytes) -> str | None:
        """Encrypt with the room's outbound session if it is still ``session_id``
        (None if it rotated meanwhile); stores the ratchet step before
        returning the ciphertext."""
        async with self.lock:
            outbound = self.machine.outbound.get(room_id)
            if outbound is None or outbound.session_id != session_id:
                return None
            ciphertext = self.machine.encrypt(room_id, plaintext)
            await self.store.save_megolm(self.machine.take_dirty())
            return ciphertext

    def export(self, room_id: int, session_id: str, index: int | None = None) -> RoomKey | None:
        """One of our sessions of the room, from ``index`` (default: its first)."""
        own = self.machine.inbound.get((room_id, self.own.user_id, self.own.device_id, session_id))
        return None if own is None else own.export(index)

    def current_key(self, room_id: int) -> RoomKey:
        return self.machine.current_key(room_id)

    def own_sessions(self, room_id: int) -> list[InboundSession]:
        return self.machine.own_sessions(room_id)

    async def discard(self, room_id: int) -> None:
        """We are out of the room: the next session (if we come back) is new."""
        async with self.lock:
            self.machine.discard_outbound(room_id)
            await self.store.forget_outbound(room_id)

    # -- receiving ------------------------------------------------------------

    async def receive(
        self, env: dict[str, Any], sender: DeviceRecord | None, outgoing: bool
    ) -> RoomMessage | RoomUndecryptable | Held | None:
        """Decrypt and store one ``room_message`` envelope: the message, Held
        (stored without text until its key comes), RoomUndecryptable for one
        no key will open (malformed, damaged or forged, for another room, or a
        replay of another message's Megolm index: logged, and stored as
        ``undecryptable``), or None for a duplicate."""
        room_id, message_id = int(env["room_id"]), str(env["message_id"])
        sender_user, sender_device = int(env["sender_user_id"]), str(env["sender_device_id"])
        base = HistoryEntry(
            message_id,
            sender_user,
            "out" if outgoing else "in",
            sender_user,
            sender_device,
            None,
            int(env["sent_at"]),
            "held",
            room_id,
        )
        async with self.lock:
            try:
                session_id = room_ciphertext_session(env["ciphertext"])
                if sender is None:
                    decrypted: Any = KeyMissing(session_id)
                else:
                    decrypted = self.machine.decrypt(
                        room_id, sender_user, sender_device, env["ciphertext"]
                    )
                if isinstance(decrypted, KeyMissing):
                    new = await self.store.hold(base, session_id, env["ciphertext"])
                    return Held(message_id, room_id, session_id) if new else None
                text = decode_room_text(decrypted.plaintext, room_id)
            except DecryptionError as exc:
                log.warning("client.room_undecryptable", extra={"error": str(exc)})
                self.machine.take_dirty()  # nothing worth keeping from a failed decryption
                cause = WRONG_ROOM if isinstance(exc, RoomMismatchError) else BAD_CIPHERTEXT
                return await self._undecryptable(room_id, base, cause)
            entry = replace(
                base,
                text=text.text,
                mentions=text.mentions,
                state="sent" if outgoing else "received",
                attachment=text.attachment,
            )
            new = await self.store.add_room_message(
                entry,
                self.machine.take_dirty(),
                megolm_session_id=decrypted.session_id,
                megolm_index=decrypted.message_index,
            )
            if not new and not await self.store.has_message(message_id):
                # Not a duplicate: another message holds its session and index.
                log.warning("client.room_undecryptable", extra={"error": "a replayed index"})
                return await self._undecryptable(room_id, base, REPLAY)
        if not new:
            return None
        return RoomMessage(
            room_id,
            message_id,
            sender_user,
            sender_device,
            text.text,
            text.mentions,
            entry.sent_at,
            bool(sender and sender.verified),
            outgoing,
            attachment=text.attachment,
        )

    async def _undecryptable(
        self, room_id: int, base: HistoryEntry, cause: str
    ) -> RoomUndecryptable | None:
        """Store a room message no key will open as ``undecryptable`` (no text);
        None if its message id is stored already (a duplicate)."""
        if not await self.store.add_room_message(replace(base, state="undecryptable")):
            return None
        return RoomUndecryptable(
            room_id,
            base.message_id,
            base.sender_user_id,
            base.sender_device_id,
            base.sent_at,
            cause=cause,
        )

    async def take_room_key(
        self,
        message_id: str,
        sender: DeviceRecord,
        fields: dict[str, Any],
        olm: OlmWrite,
        own_user_id: int,
    ) -> list[RoomMessage]:
        """A ``room_key`` payload from ``sender`` (whose Olm channel carried it):
        store the session with the Olm state and release the held messages it
        opens. Returns those messages, now decrypted. Call with the Olm lock held."""
        async with self.lock:
            try:
                key = RoomKey.parse(fields)
                self.machine.add_room_key(member_device(sender), key)
            except DecryptionError as exc:
                log.warning("client.room_key_refused", extra={"error": str(exc)})
                self.machine.take_dirty()
                await self.store.add_room_key(
                    message_id, (sender.user_id, sender.device_id), olm, ([], []), []
                )
                return []
            held = await self.store.held(
                key.room_id, (sender.user_id, sender.device_id), key.session_id
            )
            released = self._open(held)
            new, ids = await self.store.add_room_key(
                message_id,
                (sender.user_id, sender.device_id),
                olm,
                self.machine.take_dirty(),
                [r for r, _ in released],
            )
        if not new:
            return []
        return [
            _message(h, r, sender.verified, own_user_id) for r, h in released if r.message_id in ids
        ]

    def _open(self, held: list[HeldMessage]) -> list[tuple[Released, HeldMessage]]:
        """Decrypt held messages with the sessions we have now (under the lock)."""
        out: list[tuple[Released, HeldMessage]] = []
        for h in held:
            try:
                decrypted = self.machine.decrypt(
                    h.room_id, h.sender_user_id, h.sender_device_id, h.ciphertext
                )
                if isinstance(decrypted, KeyMissing):
                    continue
                text = decode_room_text(decrypted.plaintext, h.room_id)
            except DecryptionError as exc:
                log.warning("client.room_undecryptable", extra={"error": str(exc)})
                continue
            released = Released(
                h.message_id,
                text.text,
                text.mentions,
                decrypted.session_id,
                decrypted.message_index,
                text.attachment,
            )
            out.append((released, h))
        return out


def _message(h: HeldMessage, r: Released, verified: bool, own_user_id: int) -> RoomMessage:
    return RoomMessage(
        h.room_id,
        h.message_id,
        h.sender_user_id,
        h.sender_device_id,
        r.text,
        r.mentions,
        h.sent_at,
        verified,
        h.sender_user_id == own_user_id,
        late=True,
        attachment=r.attachment,
    )
