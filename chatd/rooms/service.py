"""The room service: rooms, membership and room messages.

Every room request is checked against the rooms held in memory
(:mod:`chatd.rooms.model`) and carried out there at once, on the event loop;
its statements and events go into the queue writer's open batch
(:mod:`chatd.rooms.members`), and the answer waits until they are durable.
So membership is checked on every action, from any session or connection,
against the state every other action sees: a member removed a moment ago
can no longer send, list members, or get the room's entries accepted
after the removal.

A request that must read the database first (a user's current devices, an
account) does that read before it looks at the room, and then checks and
changes the room with no await in between.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any, Protocol

import trio

from chatd.config import RoomSettings
from chatd.e2ee.current import CurrentDevices
from chatd.e2ee.outcomes import Accepted, Repeated
from chatd.e2ee.queues import QueueService
from chatd.log import fields
from chatd.protocol import frames as f
from chatd.protocol import rooms as r
from chatd.rooms import model as m
from chatd.rooms.members import DeviceChanges, Members
from chatd.rooms.model import MEMBER, OWNER, Room, RoomError
from chatd.store import Store, now_ms

log = logging.getLogger("chatd.rooms")


class RoomPushes(Protocol):
    def room_invited(self, user_id: int, frame: r.RoomInvited) -> None:
        """Tell the live connections of an invited user (never stored)."""


class RoomService:
    """Rooms held in memory, written through the queue writer. One per daemon;
    call :meth:`open` first, and run :meth:`serve`."""

    def __init__(
        self,
        store: Store,
        queues: QueueService,
        current: CurrentDevices,
        changes: DeviceChanges,
        pushes: RoomPushes,
        settings: RoomSettings,
    ) -> None:
        self.store = store
        self.queues = queues
        self.current = current
        self.changes = changes
        self.pushes = pushes
        self.settings = settings
        self.members = Members(queues)
        self.rooms: dict[int, Room] = {}
        self.joined: dict[int, set[int]] = {}  # user -> rooms they are a member of
        self.invited: dict[int, set[int]] = {}  # user -> rooms they are invited to
        self._next_id = 1

    # -- start -------------------------------------------------------------------------

    async def open(self) -> None:
        """Load the rooms, then make every room's member devices the current
        devices of its members (a change that committed just before a crash
        may not have reached the ranges)."""
        loaded = await self.store.read(_load)
        self._next_id = loaded.next_id
        for room in loaded.rooms:
            self.rooms[room.room_id] = room
            for user_id in room.members:
                self.joined.setdefault(user_id, set()).add(room.room_id)
            for user_id in room.invites:
                self.invited.setdefault(user_id, set()).add(room.room_id)
        if self.joined:
            current = await self.current.of(self.joined)
            for user_id, room_ids in self.joined.items():
                for room_id in room_ids:
                    self.members.follow(self.rooms[room_id], user_id, current[user_id])
            await self.members.commit().wait()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Follow changes of users' current devices into their rooms, until cancelled."""
        task_status.started()
        async for users in self.changes.receive:
            wanted = [u for u in users if u in self.joined]
            if not wanted:
                continue
            generation = {u: self.changes.generation.get(u, 0) for u in wanted}
            current = await self.current.of(wanted)
            for user_id in wanted:
                if self.changes.generation.get(user_id, 0) != generation[user_id]:
                    continue  # changed again meanwhile: that change's read follows
                for room_id in sorted(self.joined.get(user_id, ())):
                    self.members.follow(self.rooms[room_id], user_id, current[user_id])
            self.members.commit()

    async def _devices(self, user_id: int) -> frozenset[str]:
        """A user's current devices, as of now (not a read that raced with a change)."""
        while True:
            generation = self.changes.generation.get(user_id, 0)
            devices = (await self.current.of([user_id]))[user_id]
            if self.changes.generation.get(user_id, 0) == generation:
                return devices

    # -- reading -----------------------------------------------------------------------

    def overview(self, user_id: int) -> r.Rooms:
        """The answer to list_rooms (its ``id`` left empty)."""
        rooms = self.rooms
        joined = sorted(self.joined.get(user_id, ()))
        invited = []
        for room_id in sorted(self.invited.get(user_id, ())):
            by, at = rooms[room_id].invites[user_id]
            invited.append(r.Invitation(room=rooms[room_id].info(), invited_at=at, by_user_id=by))
        return r.Rooms(
            id="",
            joined=[rooms[i].info(user_id) for i in joined],
            invited=invited,
            channels=[
                room.info()
                for room_id, room in sorted(rooms.items())
                if room.kind == "channel" and user_id not in room.members
            ],
        )

    async def member_list(self, user_id: int | None, room_id: int) -> r.RoomMembers:
        """A room's members and member devices at its epoch (``user_id`` None:
        a server admin)."""
        room = self.rooms.get(room_id)
        if user_id is not None:
            room = m.member(room, user_id)
        elif room is None:
            raise RoomError(m.ERR_ROOM_NOT_FOUND, "no such room")
        epoch, roles = room.epoch, dict(room.members)
        devices, invited = dict(room.devices), sorted(room.invites)
        names, keys = await self.store.read(lambda conn: _directory(conn, roles, devices))
        by_user: dict[int, list[f.DirectoryDevice]] = {}
        for device_id, user in sorted(devices.items()):
            if device_id in keys:
                by_user.setdefault(user, []).append(keys[device_id])
        members = [
            r.RoomMember(
                user_id=u, username=names.get(u, ""), role=role, devices=by_user.get(u, [])
            )
            for u, role in sorted(roles.items())
        ]
        return r.RoomMembers(id="", room_id=room_id, epoch=epoch, members=members, invited=invited)

    # -- membership --------------------------------------------------------------------

    async def create(self, user_id: int, frame: r.RoomCreate) -> r.RoomInfo:
        devices = await self._devices(user_id)
        if len(self.rooms) >= self.settings.max_rooms:
            raise RoomError(m.ERR_TOO_MANY_ROOMS, "the server holds its maximum of rooms")
        room = Room(
            room_id=self._next_id,
            kind=frame.kind,
            name=frame.name,
            topic=frame.topic,
            invite_only=frame.invite_only or frame.kind == "group",
            share_history=frame.share_history,
            created_at=now_ms(),
            epoch=0,
        )
        self._next_id += 1
        self.rooms[room.room_id] = room
        members = self.members
        members.op(
            "INSERT INTO rooms (id, kind, name, topic, invite_only, share_history, created_at,"
            " epoch) VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
            room.room_id,
            room.kind,
            room.name,
            room.topic,
            room.invite_only,
            room.share_history,
            room.created_at,
        )
        self._join(room, user_id, OWNER, devices)
        members.event(room, "created", by_user_id=user_id, name=room.name, topic=room.topic)
        await members.commit().wait()
        log.info("rooms.created", extra=fields(room_id=room.room_id, kind=room.kind))
        return room.info(user_id)

    async def invite(self, user_id: int, room_id: int, target: int) -> None:
        exists = await self.store.read(lambda conn: _enabled_user(conn, target))
        room = m.check_invite(
            self.rooms.get(room_id), user_id, target, max_members=self.settings.max_members
        )
        if not exists:
            raise RoomError(m.ERR_USER_NOT_FOUND, "no such user", field="$.user_id")
        if target in room.invites:
            return  # invited already: nothing changes
        at = now_ms()
        room.invites[target] = (user_id, at)
        self.invited.setdefault(target, set()).add(room_id)
        members = self.members
        members.op(
            "INSERT OR IGNORE INTO room_invites (room_id, user_id, by_user_id, invited_at)"
            " VALUES (?, ?, ?, ?)",
            room_id,
            target,
            user_id,
            at,
        )
        members.event(room, "invited", user_id=target, by_user_id=user_id)
        await members.commit().wait()
        self.pushes.room_invited(target, r.RoomInvited(room=room.info(), by_user_id=user_id))

    async def join(self, user_id: int, room_id: int) -> r.RoomInfo:
        devices = await self._devices(user_id)
        room = m.check_join(self.rooms.get(room_id), user_id, max_members=self.settings.max_members)
        if user_id in room.members:
            return room.info(user_id)
        self._uninvite(room, user_id)
        self._join(room, user_id, MEMBER, devices)
        self.members.event(room, "joined", user_id=user_id)
        await self.members.commit().wait()
        return room.info(user_id)

    async def leave(self, user_id: int, room_id: int) -> None:
        room = m.check_leave(self.rooms.get(room_id), user_id)
        if user_id not in room.members:
            self._uninvite(room, user_id)
            self.members.event(room, "declined", user_id=user_id)
        elif len(room.members) == 1:
            self._delete(room, user_id)  # the last member leaves: the room goes
        else:
            self._part(room, user_id, "left")
        await self.members.commit().wait()

    async def remove(self, user_id: int | None, room_id: int, target: int) -> None:
        """Remove a member or revoke an invitation (``user_id`` None: a server admin)."""
        room = m.check_remove(self.rooms.get(room_id), user_id, target)
        if target not in room.members:
            self._uninvite(room, target)
            self.members.event(room, "invite_revoked", user_id=target, by_user_id=user_id)
        elif len(room.members) == 1:
            self._delete(room, user_id)  # an admin removed the last member: the room goes
        else:
            self._part(room, target, "removed", by_user_id=user_id)
        await self.members.commit().wait()

    async def set_role(self, user_id: int | None, room_id: int, target: int, role: str) -> None:
        room = m.check_set_role(self.rooms.get(room_id), user_id, target, role)
        if room.members[target] == role:
            return
        room.members[target] = role
        self.members.op(
            "UPDATE room_members SET role = ? WHERE room_id = ? AND user_id = ?",
            role,
            room_id,
            target,
        )
        self.members.event(room, "role", user_id=target, role=role, by_user_id=user_id)
        await self.members.commit().wait()

    async def set_topic(self, user_id: int, room_id: int, topic: str) -> None:
        room = m.with_role(self.rooms.get(room_id), user_id, m.MODERATOR)
        if room.topic == topic:
            return
        room.topic = topic
        self.members.op("UPDATE rooms SET topic = ? WHERE id = ?", topic, room_id)
        self.members.event(room, "topic", topic=topic, by_user_id=user_id)
        await self.members.commit().wait()

    async def delete(self, user_id: int | None, room_id: int) -> None:
        """Delete a room (``user_id`` None: a server admin)."""
        room = self.rooms.get(room_id)
        if user_id is not None:
            room = m.with_role(room, user_id, OWNER)
        elif room is None:
            raise RoomError(m.ERR_ROOM_NOT_FOUND, "no such room")
        self._delete(room, user_id)
        await self.members.commit().wait()
        log.info("rooms.deleted", extra=fields(room_id=room_id, by_admin=user_id is None))

    # -- sending -----------------------------------------------------------------------

    def send(
        self, user_id: int, device_id: str, frame: r.RoomSend
    ) -> tuple[Accepted | Repeated, list[f.DeviceRef]]:
        """Accept a room message for the room's member devices (this one
        aside), or refuse it. Returns the result and the member devices left
        out because their queues are full."""
        repeat = self.queues.repeated(device_id, frame.message_id)
        if repeat is not None:
            return Repeated(repeat), []
        room = m.member(self.rooms.get(frame.room_id), user_id)
        if frame.epoch != room.epoch:
            raise RoomError(
                m.ERR_ROOM_CHANGED,
                f"the room's member devices changed (epoch {frame.epoch} is not current):"
                " read room_members, share the room key with its devices, and send again",
                field="$.epoch",
            )
        members = self.members
        members.resume(room)
        text = frame.ciphertext
        size = len(text) if text.isascii() else len(text.encode())
        targets = room.targets(device_id)
        full = [d for d in targets if self.queues.full(d, size)]
        if full:
            members.suspend(room, full)
            targets = room.targets(device_id)
        if members.ops:
            members.commit()
        result = self.queues.send_room(user_id, device_id, frame, targets)
        skipped = [f.DeviceRef(user_id=room.devices[d], device_id=d) for d in sorted(full)]
        return result, skipped

    # -- internals (no await: each runs in one step of the loop) -----------------------------

    def _join(self, room: Room, user_id: int, role: str, devices: Iterable[str]) -> None:
        room.members[user_id] = role
        self.joined.setdefault(user_id, set()).add(room.room_id)
        self.members.op(
            "INSERT INTO room_members (room_id, user_id, role, joined_at) VALUES (?, ?, ?, ?)",
            room.room_id,
            user_id,
            role,
            now_ms(),
        )
        self.members.add(room, user_id, devices)
        self.members.new_epoch(room)

    def _part(self, room: Room, user_id: int, why: str, *, by_user_id: int | None = None) -> None:
        """A member leaves or is removed: the event reaches their devices too
        (their last entry of the room), then their ranges close."""
        members = self.members
        extra: dict[str, Any] = {"by_user_id": by_user_id} if why == "removed" else {}
        members.event(room, why, epoch=room.epoch + 1, user_id=user_id, **extra)
        members.drop(room, members.of_user(room, user_id))
        members.new_epoch(room)
        del room.members[user_id]
        self._forget(self.joined, user_id, room.room_id)
        members.op(
            "DELETE FROM room_members WHERE room_id = ? AND user_id = ?", room.room_id, user_id
        )

    def _uninvite(self, room: Room, user_id: int) -> None:
        if room.invites.pop(user_id, None) is not None:
            self._forget(self.invited, user_id, room.room_id)
            self.members.op(
                "DELETE FROM room_invites WHERE room_id = ? AND user_id = ?", room.room_id, user_id
            )

    def _delete(self, room: Room, by_user_id: int | None) -> None:
        members = self.members
        members.event(room, "deleted", by_user_id=by_user_id)
        members.drop(room, list(room.devices))
        for user_id in room.members:
            self._forget(self.joined, user_id, room.room_id)
        for user_id in room.invites:
            self._forget(self.invited, user_id, room.room_id)
        del self.rooms[room.room_id]
        members.op("DELETE FROM rooms WHERE id = ?", room.room_id)

    @staticmethod
    def _forget(index: dict[int, set[int]], user_id: int, room_id: int) -> None:
        rooms = index.get(user_id)
        if rooms is not None:
            rooms.discard(room_id)
            if not rooms:
                del index[user_id]


# -- reads (in a reader thread) -----------------------------------------------------------


class _Loaded:
    def __init__(self, rooms: list[Room], next_id: int) -> None:
        self.rooms = rooms
        self.next_id = next_id


def _load(conn: Any) -> _Loaded:
    rooms = {
        row[0]: Room(
            room_id=row[0],
            kind=row[1],
            name=row[2],
            topic=row[3],
            invite_only=bool(row[4]),
            share_history=bool(row[5]),
            created_at=row[6],
            epoch=row[7],
        )
        for row in conn.execute(
            "SELECT id, kind, name, topic, invite_only, share_history, created_at, epoch FROM rooms"
        )
    }
    for room_id, user_id, role in conn.execute("SELECT room_id, user_id, role FROM room_members"):
        rooms[room_id].members[user_id] = role
    for room_id, user_id, by, at in conn.execute(
        "SELECT room_id, user_id, by_user_id, invited_at FROM room_invites"
    ):
        rooms[room_id].invites[user_id] = (by, at)
    for room_id, device_id, user_id in conn.execute(
        "SELECT s.room_id, s.device_id, d.user_id FROM room_devices s"
        " JOIN devices d ON d.id = s.device_id WHERE s.until_id IS NULL"
    ):
        room = rooms.get(room_id)
        if room is not None:
            room.devices[device_id] = user_id
    highest = conn.execute(
        "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'rooms'), 0),"
        " coalesce((SELECT max(room_id) FROM room_log), 0),"
        " coalesce((SELECT max(room_id) FROM room_devices), 0))"
    ).fetchone()[0]
    return _Loaded(list(rooms.values()), max([highest, *rooms]) + 1)


def _enabled_user(conn: Any, user_id: int) -> bool:
    row = conn.execute("SELECT 1 FROM users WHERE id = ? AND disabled_at IS NULL", (user_id,))
    return row.fetchone() is not None


def _directory(
    conn: Any, roles: dict[int, str], devices: dict[str, int]
) -> tuple[dict[int, str], dict[str, f.DirectoryDevice]]:
    """Usernames of these users, and the identity keys of these devices."""
    names = dict(
        conn.execute(
            "SELECT id, username FROM users WHERE id IN (SELECT value FROM json_each(?))",
            (json.dumps(list(roles)),),
        )
    )
    keys = {
        row[0]: f.DirectoryDevice(
            device_id=row[0], name=row[1], ed25519=row[2], curve25519=row[3], signature=row[4]
        )
        for row in conn.execute(
            "SELECT id, name, ed25519, curve25519, signature FROM devices"
            " WHERE id IN (SELECT value FROM json_each(?))",
            (json.dumps(list(devices)),),
        )
    }
    return names, keys
