"""Rooms for the client: the room requests, and sending room messages.

``client.rooms`` is a :class:`Rooms`. Its requests map one to one onto the
protocol's room frames (docs/PROTOCOL.md, sections 8.9 to 8.12); answers are
recorded in the local store (the rooms and the devices seen).

Sending a room message (:meth:`Rooms.send`)
-------------------------------------------
1. The message goes into the history as ``sending``.
2. The room's member devices at the current epoch are read (``room_members``,
   cached per epoch; a ``room_event`` or ``room_changed`` makes the next send
   read them again). Their self-signatures are checked as the directory's are.
3. :meth:`RoomKeys.session_for` gives the outbound Megolm session, a new one
   when a rotation is due (a device it went to is gone, or the message or
   age limit). Member devices that do not have it get it in a ``room_key``
   over Olm (ordinary ``send`` s, split by user; each waits for ``sent``), from
   the index of the message about to go: *share first, then send*.
4. The message is encrypted (the ratchet step stored first) and sent with
   ``room_send`` naming the epoch. ``room_changed`` goes back to 2 with the
   same ``message_id``; the same ciphertext is sent again unless the session
   rotated, and new devices get the session from that ciphertext's index, so a
   device that joined while the message was in flight can read it.
5. ``sent`` records for how many member users (and devices) it was queued,
   and which member devices it skipped because their queues were full (a
   member all of whose devices were skipped is *unreachable*: not waited
   for); ``delivered`` receipts, each naming a device and the room, move it
   on (:mod:`chatd.client.room_delivery`).

The background work (re-shares, history keys, key requests) is in
:mod:`chatd.client.room_jobs`; receiving in :mod:`chatd.client.room_inbound`.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import trio

from .attachments import Attachment, Attachments
from .connection import Connection
from .crypto import checked_devices
from .errors import ClientError, SendError, ServerRefusedError
from .megolm import MemberDevice
from .olm_send import OlmSender, control_for, largest_payload
from .room_delivery import RoomDeliveries, RoomDelivery
from .room_events import RoomInvitation
from .room_keys import RoomKeys, member_device
from .room_payloads import RoomKey, encode_room_text
from .room_store import RoomInfo, RoomStore
from .store import DeviceRecord, HistoryEntry, LocalStore, now_ms

MAX_SEND_ATTEMPTS: Final = 5  # room_send tries when the room keeps changing under it
MENTION: Final = re.compile(r"(?<![\w@])@([A-Za-z0-9_.-]+)")


@dataclass(frozen=True)
class RoomMember:
    user_id: int
    username: str
    role: str  # owner | moderator | member
    devices: list[DeviceRecord]  # current devices, self-signatures checked


@dataclass(frozen=True)
class RoomMembers:
    """A room's members and their devices, which are its member devices at ``epoch``."""

    room_id: int
    epoch: int
    members: list[RoomMember]
    invited: list[int]  # user ids with an open invitation

    def devices(self) -> list[MemberDevice]:
        return [member_device(d) for m in self.members for d in m.devices]


@dataclass(frozen=True)
class RoomList:
    joined: list[RoomInfo]
    invited: list[RoomInvitation]
    channels: list[RoomInfo]  # channels we are not in (invite-only ones too)


def mentioned_users(text: str, members: Iterable[RoomMember]) -> list[int]:
    """The user ids of the ``members`` whose ``@username`` is in ``text``.
    Usernames are case-insensitive, as on the server (``@Alice`` is
    ``alice``), and a sentence's full stop after one does not count
    (``@bob.`` is ``bob`` unless a member is called ``bob.``)."""
    names = {m.username.casefold(): m.user_id for m in members}
    found = []
    for typed in MENTION.findall(text):
        key = typed.casefold()
        if key not in names:
            key = key.rstrip("._-")
        if key in names:
            found.append(names[key])
    return found


class _Changed(ClientError):
    """A share met ``device_mismatch``: the member devices changed; read them again."""

    def __init__(self) -> None:
        super().__init__("the room's member devices changed during a key share")


class Rooms:
    """The rooms of one device. Built by :func:`chatd.client.open_client`."""

    def __init__(
        self,
        conn: Connection,
        store: LocalStore,
        room_store: RoomStore,
        keys: RoomKeys,
        olm_send: OlmSender,
        attachments: Attachments | None = None,
    ) -> None:
        self._conn = conn
        self._attachments = attachments
        self._store = store
        self.store = room_store
        self.keys = keys
        self._olm_send = olm_send
        self.deliveries = RoomDeliveries(store)
        self._members: dict[int, RoomMembers] = {}
        self._epochs: dict[int, int] = {}  # the latest epoch a room event told us
        self.send_lock = trio.Lock()  # one room message at a time: one share, one ratchet step
        #: Called after each room message or key share the server accepted.
        self.on_change: Callable[[], None] = lambda: None

    @property
    def _own(self) -> tuple[int, str]:
        return (self.keys.own.user_id, self.keys.own.device_id)

    # -- requests -------------------------------------------------------------

    async def create(
        self,
        name: str,
        kind: str = "group",
        *,
        topic: str = "",
        invite_only: bool = False,
        share_history: bool = False,
    ) -> RoomInfo:
        """Create a channel or a group, with us as its owner. ``name`` and
        ``topic`` are not end-to-end encrypted: the server operator can read
        them. ``share_history``: members' clients give joiners the room's
        earlier keys (see docs/CLIENT.md for the cost)."""
        reply = await self._conn.request(
            "room_create",
            name=name,
            kind=kind,
            topic=topic,
            invite_only=invite_only,
            share_history=share_history,
        )
        return await self._saved(reply["room"])

    async def list_rooms(self) -> RoomList:
        """Our rooms, our open invitations, and the channels we could join."""
        reply = await self._conn.request("list_rooms")
        joined = [RoomInfo.from_wire(r) for r in reply["joined"]]
        await self.store.save_rooms(joined)
        invited = [
            RoomInvitation(RoomInfo.from_wire(i["room"]), i.get("by_user_id"))
            for i in reply["invited"]
        ]
        return RoomList(joined, invited, [RoomInfo.from_wire(r) for r in reply["channels"]])

    async def members(self, room_id: int) -> RoomMembers:
        """The room's members and member devices now (and records the devices:
        new ones as unverified). Raises IdentityChangedError if a known device
        shows new identity keys, and ServerRefusedError (``not_member``, ...)."""
        reply = await self._conn.request("room_members", room_id=room_id)
        known = {(d.user_id, d.device_id): d for d in await self._store.devices()}
        members, seen = [], []
        for m in reply["members"]:
            devices = checked_devices(m["user_id"], m["devices"], known, self._own)
            seen.extend(devices)
            members.append(RoomMember(m["user_id"], m["username"], m["role"], devices))
        await self._store.record_devices(seen)
        result = RoomMembers(room_id, int(reply["epoch"]), members, list(reply["invited"]))
        self._members[room_id] = result
        await self.store.update_room(room_id, epoch=result.epoch, member_count=len(members))
        return result

    async def invite(self, room_id: int, user_id: int) -> None:
        await self._conn.request("room_invite", room_id=room_id, user_id=user_id)

    async def join(self, room_id: int) -> RoomInfo:
        """Join a channel, or a room we are invited to."""
        return await self._saved((await self._conn.request("room_join", room_id=room_id))["room"])

    async def leave(self, room_id: int) -> None:
        """Leave the room (or decline an invitation to it). Our outbound session
        for it is forgotten: if we come back, we start a new one."""
        await self._conn.request("room_leave", room_id=room_id)
        await self.closed(room_id)

    async def remove(self, room_id: int, user_id: int) -> None:
        """Remove a member (moderators and owners), or revoke an invitation. Our
        next message to the room uses a new Megolm session."""
        await self._conn.request("room_remove", room_id=room_id, user_id=user_id)
        self.changed(room_id)

    async def set_role(self, room_id: int, user_id: int, role: str) -> None:
        await self._conn.request("room_set_role", room_id=room_id, user_id=user_id, role=role)

    async def set_topic(self, room_id: int, topic: str) -> None:
        """Set the topic (moderators and owners). Not end-to-end encrypted."""
        await self._conn.request("room_set_topic", room_id=room_id, topic=topic)
        await self.store.update_room(room_id, topic=topic)

    async def delete(self, room_id: int) -> None:
        """Delete the room (owners)."""
        await self._conn.request("room_delete", room_id=room_id)
        await self.closed(room_id)

    async def rooms(self) -> list[RoomInfo]:
        """The rooms as last seen (stored; no request)."""
        return await self.store.rooms()

    async def history(self, room_id: int) -> list[HistoryEntry]:
        """The room's messages in the history, oldest first (``held`` and
        ``undecryptable`` ones have no text)."""
        return await self._store.history(room_id=room_id)

    async def delivery(self, message_id: str) -> RoomDelivery | None:
        """How far one of our room messages got: delivered to N of M members."""
        return await self.deliveries.delivery(message_id)

    async def _saved(self, room: dict[str, Any]) -> RoomInfo:
        info = RoomInfo.from_wire(room)
        await self.store.save_rooms([info])
        return info

    async def room(self, room_id: int) -> RoomInfo | None:
        """The room as stored, or as ``list_rooms`` says if it is not stored."""
        info = await self.store.room(room_id)
        if info is None:
            listing = await self.list_rooms()
            info = next((r for r in listing.joined if r.room_id == room_id), None)
        return info

    # -- what room events tell us ---------------------------------------------

    def changed(self, room_id: int, epoch: int | None = None) -> None:
        """The room's member devices changed (to ``epoch``, if known): the next
        send reads them again."""
        if epoch is None:
            self._members.pop(room_id, None)
        else:
            self._epochs[room_id] = epoch

    async def closed(self, room_id: int) -> None:
        """We are out of the room (left, removed, deleted)."""
        self._members.pop(room_id, None)
        await self.keys.discard(room_id)
        await self.store.update_room(room_id, role=None, epoch=None)

    async def current_members(self, room_id: int, *, fresh: bool = False) -> RoomMembers:
        cached = self._members.get(room_id)
        if fresh or cached is None or self._epochs.get(room_id, cached.epoch) != cached.epoch:
            cached = await self.members(room_id)
            self._epochs[room_id] = cached.epoch
        return cached

    # -- sending --------------------------------------------------------------

    async def send(self, room_id: int, text: str, mentions: Iterable[int] | None = None) -> str:
        """Encrypt ``text`` once with our Megolm session for the room and send
        it; returns the message id once the server has queued it. ``mentions``
        (user ids) travel inside the ciphertext; if None they are the members
        whose ``@username`` is in the text, in any case (:func:`mentioned_users`).
        Raises SendError (the room kept changing), ServerRefusedError
        (``not_member``, ...), KeyClaimError,
        ConnectionLostError; the message then stays ``sending``."""
        members = await self.current_members(room_id)
        if mentions is None:
            mentions = mentioned_users(text, members.members)
        mentioned = tuple(sorted(set(mentions)))
        me, my_device = self._own
        message_id = str(uuid.uuid4())
        entry = HistoryEntry(
            message_id, me, "out", me, my_device, text, now_ms(), "sending", room_id, mentioned
        )
        await self._store.add_message(entry)
        plaintext = encode_room_text(room_id, text, mentioned)
        async with self.send_lock:
            await self._send(room_id, message_id, plaintext)
        self.on_change()
        return message_id

    async def send_file(
        self,
        room_id: int,
        path: Path,
        *,
        media_type: str | None = None,
        text: str | None = None,
    ) -> tuple[str, Attachment]:
        """Encrypt the file at ``path`` here, upload its ciphertext, and send
        the room a Megolm message carrying its key (``room_send`` names the
        blob, so the room's members may download it). ``media_type`` defaults
        to a guess from the name and must be in the allowlist. Returns the
        message id and the attachment. Raises AttachmentError,
        ServerRefusedError (too_large, quota_exceeded, not_member, ...) and
        what :meth:`send` raises."""
        if self._attachments is None:
            raise ClientError("this client was opened without attachments")
        attachment = await self._attachments.upload(path, media_type)
        shown = text if text is not None else f"[file] {attachment.name}"
        me, my_device = self._own
        message_id = str(uuid.uuid4())
        entry = HistoryEntry(
            message_id, me, "out", me, my_device, shown, now_ms(), "sending", room_id
        )
        await self._store.add_message(replace(entry, attachment=attachment))
        plaintext = encode_room_text(room_id, shown, (), attachment=attachment)
        async with self.send_lock:
            await self._send(room_id, message_id, plaintext, blob_ids=[attachment.blob_id])
        self.on_change()
        return message_id, attachment

    async def _send(
        self, room_id: int, message_id: str, plaintext: bytes, *, blob_ids: Sequence[str] = ()
    ) -> None:
        sealed: tuple[str, str, int] | None = None  # session id, ciphertext, its index
        for attempt in range(MAX_SEND_ATTEMPTS):
            members = await self.current_members(room_id, fresh=attempt > 0)
            others = [d for d in members.devices() if (d.user_id, d.device_id) != self._own]
            session, _ = await self.keys.session_for(room_id, others)
            if sealed is not None and sealed[0] != session.session_id:
                sealed = None  # rotated: encrypt again with the new session
            index = session.index if sealed is None else sealed[2]
            key = self.keys.export(room_id, session.session_id, index)
            if key is None:  # pragma: no cover - session_for keeps our own copy
                raise ClientError(f"no copy of our own session for room {room_id}")
            try:
                await self.share(room_id, key, session.unshared(others), members)
            except _Changed:
                continue
            if sealed is None:
                ciphertext = await self.keys.encrypt(room_id, session.session_id, plaintext)
                if ciphertext is None:  # pragma: no cover - the send lock prevents it
                    continue
                sealed = (session.session_id, ciphertext, index)
            try:
                reply = await self._conn.request(
                    "room_send",
                    room_id=room_id,
                    message_id=message_id,
                    epoch=members.epoch,
                    ciphertext=sealed[1],
                    **({"blob_ids": list(blob_ids)} if blob_ids else {}),
                )
            except ServerRefusedError as exc:
                if exc.code == "room_changed":
                    continue
                raise
            skipped = {(d["user_id"], d["device_id"]) for d in reply.get("skipped", [])}
            users = {d.user_id for d in others if d.user_id != self._own[0]}
            reached = {d.user_id for d in others if (d.user_id, d.device_id) not in skipped}
            await self.deliveries.set_sent(
                message_id,
                len(users),
                int(reply["envelopes"]),
                sorted(skipped),
                unreachable=len(users - reached),
            )
            return
        raise SendError(
            f"room {room_id} kept changing while message {message_id} was sent; send it again"
        )

    async def share(
        self,
        room_id: int,
        key: RoomKey,
        targets: Sequence[MemberDevice],
        members: RoomMembers,
    ) -> None:
        """Give ``key`` to ``targets`` over Olm, and record it once the server
        accepted each send. The sends name every member device of the users
        concerned and our own other devices (those without a need get a
        ``dummy``). Raises _Changed on ``device_mismatch``."""
        if not targets:
            return
        wanted = {(d.user_id, d.device_id) for d in targets}
        users = {d.user_id for d in targets} | {self._own[0]}
        named = [
            d
            for d in members.devices()
            if d.user_id in users and (d.user_id, d.device_id) != self._own
        ]
        await self.send_key(room_id, key, named, wanted)

    async def send_key(
        self,
        room_id: int,
        key: RoomKey,
        named: Sequence[MemberDevice],
        wanted: set[tuple[int, str]],
    ) -> None:
        fields = key.fields()
        batches = await self._olm_send.send_split(
            named, control_for(fields, wanted), largest_payload(fields), skip_full=True
        )
        for batch in batches:
            if batch.reply["type"] != "sent":
                self.changed(room_id)
                raise _Changed
            # A device whose queue was full did not get it: the next send shares again.
            skipped = {(d["user_id"], d["device_id"]) for d in batch.reply.get("skipped", [])}
            meant = [
                member_device(d)  # type: ignore[arg-type]  # MemberDevices went in
                for d in batch.devices
                if (d.user_id, d.device_id) in wanted
            ]
            got = [d for d in meant if (d.user_id, d.device_id) not in skipped]
            missed = [d for d in meant if (d.user_id, d.device_id) in skipped]
            await self.keys.shared(room_id, key, got, batch.message_id, missed)
            self.on_change()

    async def send_control(
        self,
        fields: dict[str, Any],
        named: Sequence[MemberDevice],
        wanted: set[tuple[int, str]],
        refresh: Callable[[], Awaitable[Sequence[MemberDevice]]],
    ) -> None:
        """An Olm payload (a key request) to ``wanted`` among ``named``; on
        ``device_mismatch`` ``refresh`` gives the devices to name, once."""
        for _attempt in range(2):
            batches = await self._olm_send.send_split(
                named, control_for(fields, wanted), largest_payload(fields)
            )
            if all(b.reply["type"] == "sent" for b in batches):
                return
            named = await refresh()
        raise SendError(f"the server refused the device list of a {fields['kind']}")
