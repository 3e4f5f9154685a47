"""Wire frames of rooms (docs/PROTOCOL.md, sections 8.9 to 8.12).

A room is a team *channel* (any user can find it, and join it unless it is
invite-only) or a private *group*. Its messages are Megolm ciphertext the
server stores once and queues for every member device; its events
(``room_event`` envelopes) are made by the server when membership, roles or
the topic change. These frames are announced by the ``rooms`` name in
``hello.features``.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

from chatd.protocol.frames import (
    MAX_CIPHERTEXT_CHARS,
    DeviceRef,
    DirectoryDevice,
    Frame,
    MessageId,
    RequestId,
    UserId,
)

MAX_NAME_CHARS: Final = 64
MAX_TOPIC_CHARS: Final = 512

RoomId = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
RoomName = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_CHARS)]
Topic = Annotated[str, msgspec.Meta(max_length=MAX_TOPIC_CHARS)]
RoomKind = Literal["channel", "group"]
Role = Literal["owner", "moderator", "member"]

# -- client -> server ---------------------------------------------------------------


class RoomCreate(Frame, tag="room_create"):
    """Create a room; you are its first owner. Answered by ``room``."""

    id: RequestId
    name: RoomName
    kind: RoomKind
    topic: Topic = ""
    invite_only: bool = False  # channels only: a group always is
    share_history: bool = False


class ListRooms(Frame, tag="list_rooms"):
    """Your rooms, your invitations, and the channels you could join. Answered by ``rooms``."""

    id: RequestId


class ListRoomMembers(Frame, tag="room_members"):
    """A room's members and their current devices, with the room's epoch."""

    id: RequestId
    room_id: RoomId


class RoomInvite(Frame, tag="room_invite"):
    id: RequestId
    room_id: RoomId
    user_id: UserId


class RoomJoin(Frame, tag="room_join"):
    """Join a channel, or a room you are invited to. Answered by ``room``."""

    id: RequestId
    room_id: RoomId


class RoomLeave(Frame, tag="room_leave"):
    """Leave a room (or decline an invitation to it)."""

    id: RequestId
    room_id: RoomId


class RoomRemove(Frame, tag="room_remove"):
    """Remove a member (or revoke an invitation); needs a moderator or owner."""

    id: RequestId
    room_id: RoomId
    user_id: UserId


class RoomSetRole(Frame, tag="room_set_role"):
    """Give a member another role; owners only."""

    id: RequestId
    room_id: RoomId
    user_id: UserId
    role: Role


class RoomSetTopic(Frame, tag="room_set_topic"):
    id: RequestId
    room_id: RoomId
    topic: Topic


class RoomDelete(Frame, tag="room_delete"):
    """Delete a room; owners only. Every member device gets a ``deleted`` event."""

    id: RequestId
    room_id: RoomId


class RoomSend(Frame, tag="room_send"):
    """One room message: one (Megolm) ciphertext, stored once and queued for every
    member device but this one. ``epoch`` is the room's epoch the sender shared its
    session for; if it is no longer current, nothing is queued (``room_changed``)."""

    id: RequestId
    room_id: RoomId
    message_id: MessageId
    epoch: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
    ciphertext: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_CIPHERTEXT_CHARS)]
    # Attachments (chatd.protocol.blobs): the blobs this message carries the keys of.
    blob_ids: Annotated[
        list[Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]],
        msgspec.Meta(max_length=16),
    ] = []


#: Every room frame a client may send.
ROOM_FRAMES: Final = (
    RoomCreate,
    ListRooms,
    ListRoomMembers,
    RoomInvite,
    RoomJoin,
    RoomLeave,
    RoomRemove,
    RoomSetRole,
    RoomSetTopic,
    RoomDelete,
    RoomSend,
)

# -- server -> client -------------------------------------------------------------------


class RoomInfo(msgspec.Struct, omit_defaults=True):
    room_id: int
    kind: str
    name: str
    topic: str
    invite_only: bool
    share_history: bool
    created_at: int  # unix ms
    member_count: int
    role: str | None = None  # yours, in a room you are in
    epoch: int | None = None  # in a room you are in


class Room(Frame, tag="room"):
    """Answer to room_create and room_join."""

    id: str
    room: RoomInfo


class Invitation(msgspec.Struct, omit_defaults=True):
    room: RoomInfo
    invited_at: int  # unix ms
    by_user_id: int | None = None  # None when a server admin invited, or the account is gone


class Rooms(Frame, tag="rooms"):
    """Answer to list_rooms."""

    id: str
    joined: list[RoomInfo]
    invited: list[Invitation]
    channels: list[RoomInfo]  # channels you are not in


class RoomMember(msgspec.Struct):
    user_id: int
    username: str
    role: str
    devices: list[DirectoryDevice]  # current devices: published keys, account enabled


class RoomMembers(Frame, tag="room_members"):
    """Answer to room_members: who is in the room and their current devices,
    which are exactly the room's member devices at ``epoch``."""

    id: str
    room_id: int
    epoch: int
    members: list[RoomMember]
    invited: list[int]


class RoomInvited(Frame, tag="room_invited"):
    """Pushed to the live connections of someone just invited (never stored:
    ``list_rooms`` shows open invitations)."""

    room: RoomInfo
    by_user_id: int | None = None


class RoomEvent(msgspec.Struct, omit_defaults=True):
    """The ``event`` of a ``room_event`` envelope: made by the server."""

    # created, joined, invited, invite_revoked, declined, left, removed, role,
    # topic, devices or deleted
    type: str
    epoch: int  # the room's epoch after the event
    user_id: int | None = None  # whom it is about
    by_user_id: int | None = None  # who did it (None: themselves, or a server admin)
    role: str | None = None
    topic: str | None = None
    name: str | None = None


__all__ = [
    "ROOM_FRAMES",
    "DeviceRef",
    "Invitation",
    "ListRoomMembers",
    "ListRooms",
    "Room",
    "RoomCreate",
    "RoomDelete",
    "RoomEvent",
    "RoomInfo",
    "RoomInvite",
    "RoomInvited",
    "RoomJoin",
    "RoomLeave",
    "RoomMember",
    "RoomMembers",
    "RoomRemove",
    "RoomSend",
    "RoomSetRole",
    "RoomSetTopic",
    "Rooms",
]
