"""Who gets a room's log: member devices, their ranges, the epoch and events.

Theory of operation
-------------------
A room's log entries (messages and events, :mod:`chatd.e2ee.roomlog`) go to
its *member devices*: the current devices of its members. The database
holds that as ranges (``room_devices``): a device gets the room's entries
with ``from_id < id <= until_id``. The ranges and the in-memory
``Room.devices`` change together, here, on the event loop, at a *boundary*:
the last id handed out so far. Entries accepted before the change keep the
targets they had; entries accepted after it follow the new set. The
statements that write the change go into the queue writer's open batch, so
they commit no later than any entry accepted after them, in one order.

The *epoch* goes up whenever the set of member devices changes; a
``room_send`` names the epoch its sender shared Megolm keys for, and is
refused if it is not current, so no member device gets a message it was
not given the key for.

A device whose queue is full is *suspended*: its range closes and room
entries skip it (the sender hears so in ``sent.skipped``) until its queue
has room again, checked whenever the room queues something. It stays a
member device (keys are still shared with it; the epoch does not change).

Current devices change outside rooms (a device publishes its keys or is
removed, an account is disabled or enabled): :class:`DeviceChanges` hears
of it from :class:`~chatd.e2ee.current.CurrentDevices` after the commit and
:meth:`Members.follow` updates every room of those users, in order; a read
that raced with a newer change is not applied (a generation per user tells),
since the newer change's own read follows.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable
from typing import Any, Final

import msgspec
import trio

from chatd.e2ee.outcomes import Outcome
from chatd.e2ee.queues import QueueService
from chatd.protocol import rooms as r
from chatd.rooms.model import Room

_encode = msgspec.json.Encoder().encode

#: A suspended device is resumed once its queue is below this share of a cap.
RESUME_BELOW: Final = 0.9

_OPEN: Final = "INSERT OR IGNORE INTO room_devices (device_id, room_id, from_id) VALUES (?, ?, ?)"
_CLOSE: Final = (
    "UPDATE room_devices SET until_id = ? WHERE device_id = ? AND room_id = ? AND until_id IS NULL"
)
_EPOCH: Final = "UPDATE rooms SET epoch = ? WHERE id = ?"


class DeviceChanges:
    """The event sink of :class:`~chatd.e2ee.current.CurrentDevices`: users
    whose current devices changed, in order, for the room service."""

    def __init__(self) -> None:
        self.generation: dict[int, int] = {}  # user -> changes heard so far
        self._send, self.receive = trio.open_memory_channel[list[int]](math.inf)

    def devices_changed(self, user_ids: Iterable[int]) -> None:
        users = list(user_ids)
        for user_id in users:
            self.generation[user_id] = self.generation.get(user_id, 0) + 1
        self._send.send_nowait(users)


class Members:
    """Changes to rooms' member devices, with their statements and events."""

    def __init__(self, queues: QueueService) -> None:
        self.queues = queues
        self.ops: list[tuple[str, tuple[Any, ...]]] = []  # statements not yet handed over

    def op(self, statement: str, *params: Any) -> None:
        self.ops.append((statement, params))

    def commit(self) -> Outcome:
        """Hand the statements made so far to the queue writer; the outcome
        settles once they (and every entry accepted before) are durable."""
        ops, self.ops = self.ops, []
        return self.queues.room_ops(ops)

    def add(self, room: Room, user_id: int, devices: Iterable[str]) -> bool:
        """These devices of a member become member devices (ranges open at
        the boundary). Returns whether any did."""
        boundary = self.queues.boundary()
        added = False
        for device_id in devices:
            if device_id not in room.devices:
                room.devices[device_id] = user_id
                self.op(_OPEN, device_id, room.room_id, boundary)
                added = True
        return added

    def drop(self, room: Room, devices: Iterable[str]) -> bool:
        """These devices stop being member devices (their ranges close at the
        boundary: they get nothing accepted from now on)."""
        boundary = self.queues.boundary()
        dropped = False
        for device_id in list(devices):
            if room.devices.pop(device_id, None) is not None:
                dropped = True
                if device_id in room.suspended:
                    room.suspended.discard(device_id)  # its range is closed already
                else:
                    self.op(_CLOSE, boundary, device_id, room.room_id)
        return dropped

    def of_user(self, room: Room, user_id: int) -> list[str]:
        return [d for d, u in room.devices.items() if u == user_id]

    def new_epoch(self, room: Room) -> None:
        room.epoch += 1
        self.op(_EPOCH, room.epoch, room.room_id)

    def event(self, room: Room, type_: str, *, epoch: int | None = None, **fields: Any) -> None:
        """Queue a room event for the room's member devices, with the room's
        epoch (or ``epoch``: the one a change about to be made will bring)."""
        event = r.RoomEvent(type=type_, epoch=room.epoch if epoch is None else epoch, **fields)
        self.queues.rooms.accept(
            room_id=room.room_id,
            kind="room_event",
            message_id=str(uuid.uuid4()),
            targets=room.targets(),
            event=_encode(event),
        )

    # -- full queues ---------------------------------------------------------------------

    def resume(self, room: Room) -> None:
        """Suspended devices of the room whose queues have room again get its
        entries again, from now on."""
        if not room.suspended:
            return
        ready = [d for d in room.suspended if self.queues.has_room(d, RESUME_BELOW)]
        if ready:
            boundary = self.queues.boundary()
            for device_id in ready:
                room.suspended.discard(device_id)
                self.op(_OPEN, device_id, room.room_id, boundary)

    def suspend(self, room: Room, devices: list[str]) -> None:
        """These member devices' queues are full: their ranges close."""
        boundary = self.queues.boundary()
        for device_id in devices:
            room.suspended.add(device_id)
            self.op(_CLOSE, boundary, device_id, room.room_id)

    # -- current devices changed -----------------------------------------------------------

    def follow(self, room: Room, user_id: int, current: frozenset[str]) -> bool:
        """Make a member's devices in the room its current devices; a change
        makes a new epoch and a ``devices`` event. Returns whether it changed."""
        mine = set(self.of_user(room, user_id))
        gone = mine - current
        dropped = self.drop(room, gone) if gone else False
        added = self.add(room, user_id, current - mine)
        if not (dropped or added):
            return False
        self.new_epoch(room)
        self.event(room, "devices", user_id=user_id)
        return True
