"""Room requests on the relay: each frame, carried out by the room service.

``room_send`` is pipelined like ``send`` (see :mod:`chatd.relay.dispatch`);
the other room requests are answered in request order, once their changes
are durable. A refusal is a :class:`~chatd.rooms.model.RoomError`, which
the dispatcher turns into an ``error`` frame.
"""

from __future__ import annotations

from chatd.auth.models import SessionGrant
from chatd.protocol import frames as f
from chatd.protocol import rooms as r
from chatd.rooms.service import RoomService

RoomRequest = (
    r.RoomCreate
    | r.ListRooms
    | r.ListRoomMembers
    | r.RoomInvite
    | r.RoomJoin
    | r.RoomLeave
    | r.RoomRemove
    | r.RoomSetRole
    | r.RoomSetTopic
    | r.RoomDelete
)
ROOM_REQUESTS = (
    r.RoomCreate,
    r.ListRooms,
    r.ListRoomMembers,
    r.RoomInvite,
    r.RoomJoin,
    r.RoomLeave,
    r.RoomRemove,
    r.RoomSetRole,
    r.RoomSetTopic,
    r.RoomDelete,
)


async def serve_room_request(
    rooms: RoomService, grant: SessionGrant, frame: RoomRequest
) -> f.Ok | r.Room | r.Rooms | r.RoomMembers:
    """Carry out one room request for this session; its answer. Raises RoomError."""
    user_id = grant.user_id
    match frame:
        case r.RoomCreate():
            return r.Room(id=frame.id, room=await rooms.create(user_id, frame))
        case r.ListRooms():
            listing = rooms.overview(user_id)
            listing.id = frame.id
            return listing
        case r.ListRoomMembers():
            answer = await rooms.member_list(user_id, frame.room_id)
            answer.id = frame.id
            return answer
        case r.RoomInvite():
            await rooms.invite(user_id, frame.room_id, frame.user_id)
        case r.RoomJoin():
            return r.Room(id=frame.id, room=await rooms.join(user_id, frame.room_id))
        case r.RoomLeave():
            await rooms.leave(user_id, frame.room_id)
        case r.RoomRemove():
            await rooms.remove(user_id, frame.room_id, frame.user_id)
        case r.RoomSetRole():
            await rooms.set_role(user_id, frame.room_id, frame.user_id, frame.role)
        case r.RoomSetTopic():
            await rooms.set_topic(user_id, frame.room_id, frame.topic)
        case r.RoomDelete():
            await rooms.delete(user_id, frame.room_id)
    return f.Ok(id=frame.id)
