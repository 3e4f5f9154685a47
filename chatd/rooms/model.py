"""Rooms as data, and the rules of who may do what in them. Pure: no I/O.

Every room request is checked here against the room as the server holds it
in memory, before anything changes (docs/PROTOCOL.md, section 8.10). A
refusal is a :class:`RoomError` whose code and message go to the client as
they are. The rules keep private groups private: to someone who is neither
a member nor invited, a group and a room that does not exist get the same
answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from chatd.errors import RefusedError
from chatd.protocol import rooms as r

ERR_ROOM_NOT_FOUND: Final = "room_not_found"
ERR_NOT_MEMBER: Final = "not_member"
ERR_NOT_INVITED: Final = "not_invited"
ERR_FORBIDDEN: Final = "forbidden"
ERR_ALREADY_MEMBER: Final = "already_member"
ERR_USER_NOT_FOUND: Final = "user_not_found"
ERR_LAST_OWNER: Final = "last_owner"
ERR_ROOM_CHANGED: Final = "room_changed"
ERR_ROOM_FULL: Final = "room_full"
ERR_TOO_MANY_ROOMS: Final = "too_many_rooms"

OWNER: Final = "owner"
MODERATOR: Final = "moderator"
MEMBER: Final = "member"
RANK: Final = {MEMBER: 0, MODERATOR: 1, OWNER: 2}


class RoomError(RefusedError):
    """A refused room request; ``code`` and ``message`` go to the client as they are."""

    def __init__(self, code: str, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


@dataclass(slots=True)
class Room:
    """A room as the server holds it in memory (and in the ``rooms``,
    ``room_members``, ``room_invites`` and ``room_devices`` tables)."""

    room_id: int
    kind: str  # channel | group
    name: str
    topic: str
    invite_only: bool
    share_history: bool
    created_at: int
    epoch: int
    members: dict[int, str] = field(default_factory=dict)  # user -> role
    invites: dict[int, tuple[int | None, int]] = field(default_factory=dict)  # user -> (by, at)
    devices: dict[str, int] = field(default_factory=dict)  # member device -> its user
    suspended: set[str] = field(default_factory=set)  # member devices whose queue was full

    def info(self, user_id: int | None = None) -> r.RoomInfo:
        """What a user sees of the room (with their role and the epoch if a member)."""
        role = self.members.get(user_id) if user_id is not None else None
        return r.RoomInfo(
            room_id=self.room_id,
            kind=self.kind,
            name=self.name,
            topic=self.topic,
            invite_only=self.invite_only,
            share_history=self.share_history,
            created_at=self.created_at,
            member_count=len(self.members),
            role=role,
            epoch=self.epoch if role is not None else None,
        )

    def owners(self) -> list[int]:
        return [u for u, role in self.members.items() if role == OWNER]

    def targets(self, sending_device: str | None = None) -> list[str]:
        """The member devices an entry of the room goes to now: not suspended,
        and not the device that sent it."""
        suspended = self.suspended
        return [d for d in self.devices if d != sending_device and d not in suspended]


# -- who may see and do what ------------------------------------------------------------


def visible(room: Room | None, user_id: int) -> Room:
    """The room, if this user may know it exists: any channel, or a group
    they are a member of or invited to."""
    if room is None or (
        room.kind == "group" and user_id not in room.members and user_id not in room.invites
    ):
        raise RoomError(ERR_ROOM_NOT_FOUND, "no such room", field="$.room_id")
    return room


def member(room: Room | None, user_id: int) -> Room:
    """The room, if this user is a member of it."""
    room = visible(room, user_id)
    if user_id not in room.members:
        raise RoomError(ERR_NOT_MEMBER, "you are not a member of this room", field="$.room_id")
    return room


def with_role(room: Room | None, user_id: int, needed: str) -> Room:
    """The room, if this user is a member with at least the ``needed`` role."""
    room = member(room, user_id)
    if RANK[room.members[user_id]] < RANK[needed]:
        raise RoomError(ERR_FORBIDDEN, f"this needs the {needed} role in the room")
    return room


def check_invite(room: Room | None, actor: int, target: int, *, max_members: int) -> Room:
    """May ``actor`` invite ``target``? (Whether the target account exists is
    checked by the caller.) Returns the room."""
    room = member(room, actor)
    if target in room.members:
        raise RoomError(ERR_ALREADY_MEMBER, "they are already a member", field="$.user_id")
    if target not in room.invites and len(room.members) + len(room.invites) >= max_members:
        raise RoomError(ERR_ROOM_FULL, f"the room has its maximum of {max_members} members")
    return room


def check_join(room: Room | None, user_id: int, *, max_members: int) -> Room:
    """May this user join? A member joining again is not refused."""
    room = visible(room, user_id)
    if user_id in room.members:
        return room
    if user_id not in room.invites:
        if room.invite_only:
            raise RoomError(ERR_NOT_INVITED, "this channel is invite-only: ask for an invitation")
        if len(room.members) + len(room.invites) >= max_members:
            raise RoomError(ERR_ROOM_FULL, f"the room has its maximum of {max_members} members")
    return room


def check_leave(room: Room | None, user_id: int) -> Room:
    """May this user leave (or decline)? The last owner may not leave while
    others stay: they promote someone first."""
    room = visible(room, user_id)
    if user_id in room.invites and user_id not in room.members:
        return room  # declining
    room = member(room, user_id)
    if room.members[user_id] == OWNER and room.owners() == [user_id] and len(room.members) > 1:
        raise RoomError(
            ERR_LAST_OWNER, "you are the last owner: make another member an owner first"
        )
    return room


def check_remove(room: Room | None, actor: int | None, target: int) -> Room:
    """May ``actor`` remove ``target`` (a member, or an invitation)? ``actor``
    None is a server admin, who may remove anyone."""
    if actor is None:
        if room is None:
            raise RoomError(ERR_ROOM_NOT_FOUND, "no such room")
        if target not in room.members and target not in room.invites:
            raise RoomError(ERR_USER_NOT_FOUND, "they are not a member of this room")
        return room
    room = with_role(room, actor, MODERATOR)
    if target == actor:
        raise RoomError(ERR_FORBIDDEN, "to leave a room, send room_leave", field="$.user_id")
    role = room.members.get(target)
    if role is None:
        if target in room.invites:
            return room  # revoking an invitation
        raise RoomError(ERR_USER_NOT_FOUND, "they are not a member of this room", field="$.user_id")
    if role == OWNER:
        raise RoomError(
            ERR_FORBIDDEN, "an owner cannot be removed: they leave, or are made a moderator first"
        )
    if RANK[room.members[actor]] <= RANK[role]:
        raise RoomError(ERR_FORBIDDEN, "removing a moderator needs the owner role")
    return room


def check_set_role(room: Room | None, actor: int | None, target: int, role: str) -> Room:
    """May ``actor`` (None: a server admin) give ``target`` this role?"""
    room = with_role(room, actor, OWNER) if actor is not None else _exists(room)
    if target not in room.members:
        raise RoomError(ERR_USER_NOT_FOUND, "they are not a member of this room", field="$.user_id")
    if role != OWNER and room.members[target] == OWNER and room.owners() == [target]:
        raise RoomError(ERR_LAST_OWNER, "a room needs an owner: make another member an owner first")
    return room


def _exists(room: Room | None) -> Room:
    if room is None:
        raise RoomError(ERR_ROOM_NOT_FOUND, "no such room")
    return room
