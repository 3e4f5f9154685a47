"""Rooms in the client library, end to end: the real relay, real Megolm and Olm,
real SQLCipher stores in a temporary directory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import trio

from chatd.client import Client, ServerRefusedError
from chatd.client.megolm import RoomSettings
from chatd.client.room_events import RoomMessage, RoomUndecryptable, RoomUpdate

from .test_client import ALICE_KEY, BOB_KEY, device, relay
from .test_relay_auth import Server

T = TypeVar("T")
BOB2_KEY = bytes([3]) * 32


async def next_event(client: Client, kind: type[T], **match: Any) -> T:
    """The next room event of ``kind`` (and fields ``match``), skipping others."""
    with trio.fail_after(10):
        async for item in client.room_events():
            if isinstance(item, kind) and all(getattr(item, k) == v for k, v in match.items()):
                return item
    raise AssertionError("the room events ended")  # pragma: no cover


@asynccontextmanager
async def pair(tmp: Path, **kw: Any) -> AsyncIterator[tuple[Server, Client, Client]]:
    async with (
        relay(tmp) as srv,
        device(srv, tmp, "alice", "alice", ALICE_KEY, **kw) as alice,
        device(srv, tmp, "bob", "bob", BOB_KEY, **kw) as bob,
    ):
        yield srv, alice, bob


async def shared_room(alice: Client, bob: Client, **kw: Any) -> int:
    """A group of alice (owner) and bob."""
    room = await alice.rooms.create("plans", "group", **kw)
    await alice.rooms.invite(room.room_id, bob.user_id)
    await bob.rooms.join(room.room_id)
    return room.room_id


async def test_a_room_message_reaches_the_other_member_decrypted(short_tmp: Path) -> None:
    async with pair(short_tmp) as (_, alice, bob):
        room_id = await shared_room(alice, bob)
        await next_event(bob, RoomUpdate, type="joined", user_id=bob.user_id)
        sent = await alice.rooms.send(room_id, "hello @bob, see you at 5")
        got = await next_event(bob, RoomMessage)
        assert (got.message_id, got.room_id, got.text) == (sent, room_id, "hello @bob, see you at 5")
        assert got.sender_user_id == alice.user_id and got.mentions == (bob.user_id,)
        assert not got.late
        # Delivery: sent, then delivered to 1 of 1.
        with trio.fail_after(10):
            await alice.wait_state(sent, "delivered")
        delivery = await alice.rooms.delivery(sent)
        assert delivery is not None
        assert (delivery.delivered, delivery.members, delivery.devices) == (1, 1, 1)
        # Both sides keep it in the room's history.
        assert [e.text for e in await bob.rooms.history(room_id)] == [got.text]
        assert [e.state for e in await alice.rooms.history(room_id)] == ["delivered"]
        # Bob answers; his session is his own.
        await bob.rooms.send(room_id, "ok", mentions=[])
        answer = await next_event(alice, RoomMessage)
        assert (answer.text, answer.mentions) == ("ok", ())


async def test_membership_requests_and_events(short_tmp: Path) -> None:
    async with pair(short_tmp) as (_, alice, bob):
        room = await alice.rooms.create("ops", "channel", topic="uptime")
        assert (room.role, room.kind) == ("owner", "channel")
        listing = await bob.rooms.list_rooms()
        assert [r.room_id for r in listing.channels] == [room.room_id]
        await bob.rooms.join(room.room_id)
        joined = await next_event(alice, RoomUpdate, type="joined")
        assert joined.user_id == bob.user_id
        members = await alice.rooms.members(room.room_id)
        assert [(m.username, m.role) for m in members.members] == [
            ("alice", "owner"),
            ("bob", "member"),
        ]
        await alice.rooms.set_role(room.room_id, bob.user_id, "moderator")
        role = await next_event(bob, RoomUpdate, type="role")
        assert (role.user_id, role.role) == (bob.user_id, "moderator")
        await bob.rooms.set_topic(room.room_id, "uptime and on-call")
        topic = await next_event(alice, RoomUpdate, type="topic")
        assert topic.topic == "uptime and on-call"
        stored = await alice.rooms.rooms()
        assert [r.topic for r in stored] == ["uptime and on-call"]
        await bob.rooms.leave(room.room_id)
        left = await next_event(alice, RoomUpdate, type="left")
        assert left.user_id == bob.user_id
        try:
            await bob.rooms.send(room.room_id, "still here?")
        except ServerRefusedError as exc:
            assert exc.code == "not_member"
        else:  # pragma: no cover
            raise AssertionError("a former member could send")
        await alice.rooms.delete(room.room_id)
        await next_event(alice, RoomUpdate, type="deleted")
