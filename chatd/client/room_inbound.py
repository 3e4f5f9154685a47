"""Receiving room envelopes: room messages, room events, receipts about them.

The client's inbound worker hands every envelope of a ``deliver`` frame that
concerns rooms to :meth:`RoomInbound.take` before it acknowledges the frame.
``take`` stores what the envelope says and returns what the application
should see; the worker sends those on after the ``ack``. Nothing here waits
on the network: work that needs it (key shares, key requests) goes to
:class:`chatd.client.room_jobs.RoomJobs`.

* ``room_message``: decrypted and stored, or held until its key comes
  (:meth:`chatd.client.room_keys.RoomKeys.receive`); the key wait starts.
* ``room_event``: recorded once by its ``message_id``; the room's epoch,
  topic and our role follow it; a member leaving or being removed, or a
  member's devices changing, makes our next message read the member devices
  again (and so rotate or share); our own leaving, removal, or the room's
  deletion forgets our outbound session; with ``share_history`` a join or a
  device change sends history keys.
* ``delivered`` / ``expired`` with ``room_id``: counted for our message
  (a :class:`RoomDeliveryChanged` when the counts or the state moved);
  an ``expired`` receipt of an Olm message that carried one of our sessions
  makes it shared again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from .room_events import RoomDeliveryChanged, RoomEventItem, RoomUpdate
from .room_jobs import RoomJobs
from .room_keys import Held
from .rooms import Rooms
from .store import DeviceRecord, LocalStore

#: The sending device as we know it (``Client._sender_device``).
SenderDevice = Callable[[int, str], Awaitable[DeviceRecord | None]]

ROOM_KINDS = frozenset({"room_message", "room_event"})


class RoomInbound:
    """Takes the room envelopes of one device."""

    def __init__(
        self, store: LocalStore, rooms: Rooms, jobs: RoomJobs, sender_device: SenderDevice
    ) -> None:
        self._store = store
        self._rooms = rooms
        self._jobs = jobs
        self._sender_device = sender_device

    @property
    def _me(self) -> int:
        return self._rooms.keys.own.user_id

    async def take(self, env: dict[str, Any]) -> list[RoomEventItem]:
        """Store one room envelope (or receipt); what the application should see."""
        kind = env["kind"]
        if kind == "room_message":
            return await self._message(env)
        if kind == "room_event":
            return await self._event(env)
        if kind in ("delivered", "expired"):
            return await self._receipt(env)
        return []

    async def _message(self, env: dict[str, Any]) -> list[RoomEventItem]:
        if await self._store.has_message(env["message_id"]):
            return []
        sender = await self._sender_device(env["sender_user_id"], env["sender_device_id"])
        result = await self._rooms.keys.receive(env, sender, env["sender_user_id"] == self._me)
        if isinstance(result, Held):
            self._jobs.held_arrived()
            return []
        return [] if result is None else [result]

    async def _event(self, env: dict[str, Any]) -> list[RoomEventItem]:
        update = RoomUpdate.from_envelope(env)
        if not await self._store.add_control(update.message_id, "room_event", (0, "")):
            return []  # seen before
        room_id, rooms = update.room_id, self._rooms
        ours = update.user_id == self._me
        if update.type in ("left", "removed") and ours or update.type == "deleted":
            await rooms.closed(room_id)
            return [update]
        rooms.changed(room_id, update.epoch)
        values: dict[str, Any] = {"epoch": update.epoch}
        if update.type == "topic" and update.topic is not None:
            values["topic"] = update.topic
        if update.type == "role" and ours:
            values["role"] = update.role
        await rooms.store.update_room(room_id, **values)
        if update.type in ("left", "removed", "devices"):
            rooms.changed(room_id)  # read the member devices again before sending
        if update.type in ("joined", "devices") and update.user_id is not None:
            self._jobs.member_changed(room_id, update.user_id)
        return [update]

    async def _receipt(self, env: dict[str, Any]) -> list[RoomEventItem]:
        device_id = env.get("device_id") or ""
        if env.get("room_id") is not None:
            changed = await self._rooms.deliveries.add_room_receipt(
                env["message_id"], device_id, env["kind"]
            )
            if changed is not None:
                room_id, delivery = changed
                return [RoomDeliveryChanged(room_id, env["message_id"], delivery)]
        elif env["kind"] == "expired" and await self._rooms.store.shares_sent_in(
            env["message_id"], device_id
        ):
            self._jobs.share_expired(env["message_id"], device_id)
        return []
