"""Admin API routes for rooms: list, show, remove a member, set a role, delete.

A server admin manages any room, channel or group, whether or not they are
in it. The work is done by :class:`chatd.rooms.service.RoomService`
(``AdminContext.rooms``) with ``user_id=None``, which stands for a server
admin: the room events it makes (``removed``, ``invite_revoked``, ``role``,
``deleted``) carry no ``by_user_id``, and members see them like any other
room event. Without a room service these routes answer 503
``service_unavailable``.

Every route needs the admin token and is written to the admin audit log
(time, method, path, status): the path names the room and the member, so
the log says who was removed from which room, and a read shows which room's
members an admin looked at.

A refusal of the room service is a :class:`~chatd.rooms.model.RoomError`;
it keeps its code here, with the HTTP status of :data:`ROOM_ERROR_STATUS`
and the path parameter it is about as ``field``: 404 ``room_not_found``
(``room_id``), 404 ``user_not_found`` (``user_id``: not a member of the room
nor invited to it), 409 ``last_owner``. A change the store could not commit
is 503 ``storage_unavailable``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

import msgspec
import trio

from chatd.admin.api import MAX_INT, AdminContext, ApiError, Limit, route
from chatd.errors import StoreError
from chatd.log import fields
from chatd.protocol.rooms import Role, RoomKind
from chatd.rooms import model as m

if TYPE_CHECKING:
    from chatd.rooms.model import Room
    from chatd.rooms.service import RoomService

log = logging.getLogger("chatd.admin")

#: HTTP status and path parameter of a RoomError code; any other code is 400.
ROOM_ERROR_STATUS: Final = {
    m.ERR_ROOM_NOT_FOUND: (404, "room_id"),
    m.ERR_USER_NOT_FOUND: (404, "user_id"),
    m.ERR_LAST_OWNER: (409, None),
}

# Route-specific errors, for the OpenAPI document.
_UNAVAILABLE: Final = (503, "Rooms are not running (service_unavailable).")
_NO_ROOM: Final = (404, "No room with this id (room_not_found, error.field room_id).")
_NO_MEMBER: Final = (
    404,
    "The user is neither a member of the room nor invited to it "
    "(user_not_found, error.field user_id).",
)
_STORAGE: Final = (503, "The change could not be committed (storage_unavailable); try again.")


def _rooms(ctx: AdminContext) -> RoomService:
    if ctx.rooms is None:
        raise ApiError(503, "service_unavailable", "rooms are not running on this server")
    return ctx.rooms


@contextmanager
def _refusals() -> Iterator[None]:
    """RoomError and StoreError from the room service, as API errors."""
    try:
        yield
    except m.RoomError as exc:
        status, field = ROOM_ERROR_STATUS.get(exc.code, (400, None))
        raise ApiError(status, exc.code, exc.message, field) from None
    except StoreError:
        raise ApiError(
            503, "storage_unavailable", "the change could not be committed; try again"
        ) from None


def _room(rooms: RoomService, room_id: int) -> Room:
    room = rooms.rooms.get(room_id)
    if room is None:
        raise ApiError(404, m.ERR_ROOM_NOT_FOUND, "no such room", "room_id")
    return room


def _usernames(user_ids: list[int], conn: Any) -> dict[int, str]:
    return dict(
        conn.execute(
            "SELECT id, username FROM users WHERE id IN (SELECT value FROM json_each(?))",
            (json.dumps(user_ids),),
        )
    )


# -- schemas ------------------------------------------------------------------------------------


class RoomSummary(msgspec.Struct):
    room_id: int
    kind: RoomKind
    name: str
    topic: str
    invite_only: bool
    share_history: bool
    created_at: int  # unix ms
    member_count: int
    invitation_count: int
    epoch: Annotated[int, msgspec.Meta(description="Goes up when the member devices change.")]


def _summary(room: Room) -> RoomSummary:
    return RoomSummary(
        room_id=room.room_id,
        kind=room.kind,  # type: ignore[arg-type]  # "channel" or "group", checked at creation
        name=room.name,
        topic=room.topic,
        invite_only=room.invite_only,
        share_history=room.share_history,
        created_at=room.created_at,
        member_count=len(room.members),
        invitation_count=len(room.invites),
        epoch=room.epoch,
    )


class RoomMemberInfo(msgspec.Struct):
    user_id: int
    username: str  # "" if the account is gone
    role: Role
    device_ids: Annotated[
        list[str], msgspec.Meta(description="The member's devices that get the room's messages.")
    ]


class RoomInvitation(msgspec.Struct):
    user_id: int
    username: str
    invited_at: int  # unix ms
    by_user_id: Annotated[
        int | None, msgspec.Meta(description="Who invited; null for a server admin.")
    ]
    by_username: str | None  # null with by_user_id; "" if the account is gone


class RoomDetail(msgspec.Struct):
    room: RoomSummary
    members: list[RoomMemberInfo]
    invitations: list[RoomInvitation]


class RoomsQuery(msgspec.Struct, forbid_unknown_fields=True):
    limit: Limit = 50
    after_id: (
        Annotated[
            int,
            msgspec.Meta(ge=0, le=MAX_INT, description="Return rooms with an id above this one."),
        ]
        | None
    ) = None


class RoomsPage(msgspec.Struct):
    """Rooms in id order; pass ``next_after_id`` as ``after_id`` for the next page."""

    rooms: list[RoomSummary]
    next_after_id: int | None


class MemberRemoved(msgspec.Struct):
    room_id: int
    user_id: int
    username: str
    was: Annotated[
        Literal["member", "invitation"],
        msgspec.Meta(description="Removed a member, or revoked an invitation."),
    ]
    room_deleted: Annotated[
        bool,
        msgspec.Meta(
            description="They were the room's last member, so the room was deleted "
            "(its member devices got a deleted event)."
        ),
    ] = False


class RoomRoleChange(msgspec.Struct, forbid_unknown_fields=True):
    role: Role


# -- routes -------------------------------------------------------------------------------------


@route(
    "GET",
    "/v1/rooms",
    "Rooms in id order, channels and groups alike",
    response=RoomsPage,
    query=RoomsQuery,
    tag="rooms",
    errors=(_UNAVAILABLE,),
)
async def list_rooms(ctx: AdminContext, query: RoomsQuery, body: None) -> RoomsPage:
    rooms = _rooms(ctx)
    after = query.after_id or 0
    ids = sorted(i for i in rooms.rooms if i > after)[: query.limit]
    page = [_summary(rooms.rooms[i]) for i in ids]
    await trio.lowlevel.checkpoint()
    more = len(page) == query.limit
    return RoomsPage(rooms=page, next_after_id=page[-1].room_id if more else None)


@route(
    "GET",
    "/v1/rooms/{room_id}",
    "One room with its members, their member devices, and open invitations "
    "(personal data: audit-logged)",
    response=RoomDetail,
    tag="rooms",
    errors=(_UNAVAILABLE, _NO_ROOM),
)
async def show_room(ctx: AdminContext, query: None, body: None, *, room_id: int) -> RoomDetail:
    room = _room(_rooms(ctx), room_id)
    # A snapshot, taken in one step: the names are read after it.
    summary = _summary(room)
    roles = dict(room.members)
    invites = dict(room.invites)
    devices: dict[int, list[str]] = {}
    for device_id, user_id in sorted(room.devices.items()):
        devices.setdefault(user_id, []).append(device_id)
    inviters = [by for by, _ in invites.values() if by is not None]
    names = await ctx.store.read(lambda conn: _usernames([*roles, *invites, *inviters], conn))
    return RoomDetail(
        room=summary,
        members=[
            RoomMemberInfo(
                user_id=u,
                username=names.get(u, ""),
                role=role,  # type: ignore[arg-type]  # a Role: only those are stored
                device_ids=devices.get(u, []),
            )
            for u, role in sorted(roles.items())
        ],
        invitations=[
            RoomInvitation(
                user_id=u,
                username=names.get(u, ""),
                invited_at=at,
                by_user_id=by,
                by_username=None if by is None else names.get(by, ""),
            )
            for u, (by, at) in sorted(invites.items())
        ],
    )


@route(
    "DELETE",
    "/v1/rooms/{room_id}/members/{user_id}",
    "Remove a member from a room, or revoke their invitation; the room's member devices, "
    "theirs included, get a removed (or invite_revoked) event without by_user_id. "
    "Removing the last member deletes the room (a deleted event instead)",
    response=MemberRemoved,
    tag="rooms",
    errors=(_UNAVAILABLE, _NO_ROOM, _NO_MEMBER, _STORAGE),
)
async def remove_room_member(
    ctx: AdminContext, query: None, body: None, *, room_id: int, user_id: int
) -> MemberRemoved:
    rooms = _rooms(ctx)
    names = await ctx.store.read(lambda conn: _usernames([user_id], conn))
    # No await from here into remove's own check: "was" is what it removes.
    room = rooms.rooms.get(room_id)
    was: Literal["member", "invitation"] = (
        "invitation" if room is not None and user_id not in room.members else "member"
    )
    last = room is not None and list(room.members) == [user_id]
    with _refusals():
        await rooms.remove(None, room_id, user_id)
    log.info(
        "admin.room_member_removed",
        extra=fields(room_id=room_id, user_id=user_id, was=was, room_deleted=last),
    )
    return MemberRemoved(
        room_id=room_id,
        user_id=user_id,
        username=names.get(user_id, ""),
        was=was,
        room_deleted=last,
    )


@route(
    "PUT",
    "/v1/rooms/{room_id}/members/{user_id}/role",
    "Give a member of a room another role, e.g. make someone the owner of a room that has "
    "none; members get a role event without by_user_id",
    response=RoomMemberInfo,
    body=RoomRoleChange,
    tag="rooms",
    errors=(
        _UNAVAILABLE,
        _NO_ROOM,
        (404, "The user is not a member of the room (user_not_found, error.field user_id)."),
        (409, "That would leave the room without an owner (last_owner)."),
        _STORAGE,
    ),
)
async def set_room_member_role(
    ctx: AdminContext, query: None, body: RoomRoleChange, *, room_id: int, user_id: int
) -> RoomMemberInfo:
    rooms = _rooms(ctx)
    names = await ctx.store.read(lambda conn: _usernames([user_id], conn))
    with _refusals():
        await rooms.set_role(None, room_id, user_id, body.role)
    log.info("admin.room_role_set", extra=fields(room_id=room_id, user_id=user_id, role=body.role))
    room = rooms.rooms.get(room_id)
    devices = sorted(d for d, u in room.devices.items() if u == user_id) if room else []
    return RoomMemberInfo(
        user_id=user_id, username=names.get(user_id, ""), role=body.role, device_ids=devices
    )


@route(
    "DELETE",
    "/v1/rooms/{room_id}",
    "Delete a room; its member devices get a deleted event without by_user_id, their last "
    "entry from the room. Returns the room as it was",
    response=RoomSummary,
    tag="rooms",
    errors=(_UNAVAILABLE, _NO_ROOM, _STORAGE),
)
async def delete_room(ctx: AdminContext, query: None, body: None, *, room_id: int) -> RoomSummary:
    rooms = _rooms(ctx)
    summary = _summary(_room(rooms, room_id))
    with _refusals():
        await rooms.delete(None, room_id)
    return summary
