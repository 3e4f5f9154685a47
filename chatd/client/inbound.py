"""The client's inbound worker: delivered envelopes decrypted, stored, acknowledged.

:class:`Inbound` handles the frames the server pushes (``deliver``, pushed
``key_count``, ``room_invited``, ``presence``, ``typing_notice`` and
``consent_required``) one at a
time, until cancelled. :class:`chatd.client.client.Client` opens it with the
rooms (it needs our device id) and runs :meth:`Inbound.serve` in the nursery
of ``open_client``. Room envelopes go to :mod:`chatd.client.room_inbound`, a
``room_key`` payload to :meth:`chatd.client.room_keys.RoomKeys.take_room_key`
(in the same transaction as the Olm state that decrypted it). What the
application sees leaves on the channels the Client hands out
(``messages()``, ``room_events()``, ``activity()``).

Ordering guarantees
-------------------
* A received message, and the Olm state its decryption changed, are written
  in one transaction; only after that commit does the client send
  ``ack up_to``. Delivery is at least once, so the client skips envelopes
  whose message id is already in the history *before* decrypting (a repeated
  Olm message could not be decrypted twice anyway).
* Decryption holds the client's Olm lock, so it never interleaves with
  sending inside the ratchet.
* Payloads that are not chat messages (device verification) are recorded by
  message id in their own table, with the Olm state, before the ack; they
  never enter the history. Their replies are sent after the ack.
* When a pre-key message used our published fallback key, that is recorded
  with the message, and a new fallback key is uploaded after the ack
  (:mod:`chatd.client.keys`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from .attachments import Attachment
from .connection import Connection
from .consent import ConsentDocument, ConsentRequired
from .crypto import OlmMachine, Payload, decode_payload
from .errors import ClientError, DecryptionError
from .keys import KeySupply
from .room_events import RoomEventItem, RoomInvitation, RoomMessage
from .room_inbound import ROOM_KINDS, RoomInbound
from .room_jobs import RoomJobs
from .room_store import OlmWrite, RoomInfo
from .rooms import Rooms
from .sas import KINDS as VERIFY_KINDS
from .sas import Party
from .store import DeviceRecord, HistoryEntry, LocalStore
from .verification import Verifications

log = logging.getLogger(__name__)

#: The sending device as we know it (``Client._sender_device``).
SenderDevice = Callable[[int, str], Awaitable[DeviceRecord | None]]


@dataclass(frozen=True)
class ReceivedMessage:
    message_id: str
    sender_user_id: int
    sender_device_id: str
    peer_user_id: int  # the conversation: the sender, or for our own copies the recipient
    text: str
    sent_at: int  # unix ms, as the server recorded it
    outgoing: bool  # a copy of a message we sent from another of our devices
    sender_verified: bool = False  # the sending device was verified when it arrived
    attachment: Attachment | None = None  # a file the message carries (save it with save_file)


@dataclass(frozen=True)
class PresenceChange:
    """A pushed ``presence``: watched users who came online, and who went offline."""

    online: tuple[int, ...]
    offline: tuple[int, ...]


@dataclass(frozen=True)
class TypingNotice:
    """A pushed ``typing_notice``: ``user_id`` started (or stopped) typing to us."""

    user_id: int
    active: bool


Activity = PresenceChange | TypingNotice | ConsentRequired


@dataclass(frozen=True)
class _Control:
    """A received payload that is not a chat message, handled after the ack."""

    sender: DeviceRecord
    payload: Payload


@dataclass(frozen=True)
class _RoomKeyTaken:
    """A ``room_key`` stored, with the held room messages it opened."""

    released: list[RoomMessage]


class Inbound:
    """The inbound worker of one logged-in device, with what it writes to."""

    def __init__(
        self,
        store: LocalStore,
        olm: OlmMachine,
        conn: Connection,
        olm_lock: trio.Lock,
        keys: KeySupply,
        verifications: Verifications,
        rooms: Rooms,
        room_jobs: RoomJobs,
        room_inbound: RoomInbound,
        *,
        sender_device: SenderDevice,
        notify: Callable[[], None],
        inbox: trio.MemorySendChannel[ReceivedMessage],
        room_events: trio.MemorySendChannel[RoomEventItem],
        activity: trio.MemorySendChannel[Activity],
    ) -> None:
        self._store = store
        self._olm = olm
        self._conn = conn
        self._olm_lock = olm_lock
        self._keys = keys
        self._verifications = verifications
        self._rooms = rooms
        self._room_jobs = room_jobs
        self._room_inbound = room_inbound
        self._sender_device = sender_device
        self._notify = notify  # wakes Client.wait_state
        self._inbox_send = inbox
        self._room_events_send = room_events
        self._activity_send = activity

    @property
    def user_id(self) -> int:
        return self._conn.user_id

    async def serve(self) -> None:
        """Handle deliver and key_count frames, one at a time, until cancelled."""
        async for frame in self._conn.unsolicited:
            try:
                if frame.get("type") == "deliver":
                    await self._deliver(frame["envelopes"])
                elif frame.get("type") == "room_invited":
                    room = RoomInfo.from_wire(frame["room"])
                    await self._room_events_send.send(RoomInvitation(room, frame.get("by_user_id")))
                elif frame.get("type") == "key_count":
                    await self._keys.top_up(frame)
                elif frame.get("type") in ("presence", "typing_notice"):
                    item: Activity = (
                        PresenceChange(
                            tuple(frame.get("online", [])), tuple(frame.get("offline", []))
                        )
                        if frame["type"] == "presence"
                        else TypingNotice(frame["user_id"], bool(frame["active"]))
                    )
                    with contextlib.suppress(trio.WouldBlock):
                        self._activity_send.send_nowait(item)
                elif frame.get("type") == "consent_required":
                    documents = tuple(ConsentDocument.from_wire(d) for d in frame["documents"])
                    with contextlib.suppress(trio.WouldBlock):
                        self._activity_send.send_nowait(ConsentRequired(documents))
            except (ClientError, trio.TooSlowError) as exc:
                # The server re-delivers what we did not acknowledge.
                log.warning("client.inbound_failed", extra={"error": str(exc)})

    async def _deliver(self, envelopes: list[dict[str, Any]]) -> None:
        received: list[ReceivedMessage] = []
        controls: list[_Control] = []
        room_items: list[RoomEventItem] = []
        ours: set[str] | None = None  # our own devices, read once per frame if needed
        for env in envelopes:
            if env["kind"] == "message":
                result = await self._receive(env)
                if isinstance(result, ReceivedMessage):
                    received.append(result)
                elif isinstance(result, _RoomKeyTaken):
                    room_items.extend(result.released)
                elif result is not None:
                    controls.append(result)
            elif env["kind"] in ROOM_KINDS or env.get("room_id") is not None:
                room_items.extend(await self._room_inbound.take(env))
            elif env["kind"] in ("delivered", "expired"):
                if env["kind"] == "expired":
                    await self._room_inbound.take(env)  # a key share that expired is shared again
                if ours is None:
                    ours = {
                        d.device_id
                        for d in await self._store.devices()
                        if d.user_id == self.user_id
                    }
                counts = env.get("device_id") not in ours
                await self._store.add_receipt(
                    env["message_id"], env.get("device_id") or "", env["kind"], counts
                )
        if envelopes:
            await self._conn.send_frame("ack", up_to=envelopes[-1]["envelope_id"])
        self._notify()
        # Everything below is stored and acknowledged already: a failure here
        # loses nothing (a fallback rotation is retried on the next key_count).
        if self._keys.rotation_due:
            await self._guarded(self._keys.rotate_fallback())
        for control in controls:
            await self._guarded(self._handle_control(control))
        for message in received:
            await self._inbox_send.send(message)
        for item in room_items:
            await self._room_events_send.send(item)

    async def _guarded(self, work: Awaitable[None]) -> None:
        try:
            await work
        except (ClientError, trio.TooSlowError) as exc:
            log.warning("client.after_ack_failed", extra={"error": str(exc)})

    async def _handle_control(self, control: _Control) -> None:
        payload, sender = control.payload, control.sender
        if payload.kind in VERIFY_KINDS:
            them = Party(sender.user_id, sender.device_id, sender.ed25519)
            await self._verifications.handle(them, payload.to_user_id, payload.fields)
        elif payload.kind == "room_key_request":
            self._room_jobs.key_requested(sender, payload.fields)

    async def _receive(
        self, env: dict[str, Any]
    ) -> ReceivedMessage | _Control | _RoomKeyTaken | None:
        """Decrypt and store one message envelope. Returns a chat message, or a
        payload of another kind (recorded, not in the history); None for a
        duplicate or a message that cannot be decrypted (stored as
        ``undecryptable``)."""
        message_id = env["message_id"]
        if await self._store.has_message(message_id):
            return None
        sender_user_id, sender_device_id = env["sender_user_id"], env["sender_device_id"]
        device = await self._sender_device(sender_user_id, sender_device_id)
        async with self._olm_lock:
            try:
                if device is None:
                    raise DecryptionError(f"unknown sender device {sender_device_id}")
                decrypted = self._olm.decrypt(device.curve25519, env["ciphertext"])
                payload = decode_payload(decrypted.plaintext, message_id)
                attachment = None
                if payload.kind == "text" and "attachment" in payload.fields:
                    attachment = Attachment.parse(payload.fields["attachment"])
            except DecryptionError as exc:
                log.warning("client.undecryptable", extra={"error": str(exc)})
                entry = HistoryEntry(
                    message_id,
                    sender_user_id,
                    "in",
                    sender_user_id,
                    sender_device_id,
                    None,
                    env["sent_at"],
                    "undecryptable",
                )
                dirty = self._olm.take_dirty()
                account = self._olm.account_pickle() if dirty else None
                await self._store.add_message(entry, account, dirty)
                return None
            meta = self._keys.noticed(decrypted.one_time_key)
            account = self._olm.account_pickle()
            if payload.kind == "room_key" and device is not None:
                released = await self._rooms.keys.take_room_key(
                    message_id,
                    device,
                    payload.fields,
                    OlmWrite(account, self._olm.take_dirty(), meta),
                    self.user_id,
                )
                return _RoomKeyTaken(released)
            if payload.kind != "text":
                new = await self._store.add_control(
                    message_id,
                    payload.kind,
                    (sender_user_id, sender_device_id),
                    account,
                    self._olm.take_dirty(),
                    meta,
                )
                return _Control(device, payload) if new else None
            outgoing = sender_user_id == self.user_id
            peer = payload.to_user_id if outgoing else sender_user_id
            entry = HistoryEntry(
                message_id,
                peer,
                "out" if outgoing else "in",
                sender_user_id,
                sender_device_id,
                payload.text,
                env["sent_at"],
                "sent" if outgoing else "received",
                attachment=attachment,
            )
            new = await self._store.add_message(entry, account, self._olm.take_dirty(), meta)
        if not new:
            return None
        return ReceivedMessage(
            message_id,
            sender_user_id,
            sender_device_id,
            peer,
            payload.text,
            env["sent_at"],
            outgoing,
            device.verified,
            attachment,
        )
