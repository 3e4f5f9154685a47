"""Rooms in the client library, end to end: the real relay, real Megolm and Olm,
real SQLCipher stores in a temporary directory."""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from chatd.client import Client, ServerRefusedError
from chatd.client.megolm import KeyMissing, MemberDevice, RoomSettings
from chatd.client.room_events import (
    BAD_CIPHERTEXT,
    CANNOT_DECRYPT,
    REPLAY,
    WRONG_ROOM,
    RoomDeliveryChanged,
    RoomInvitation,
    RoomMessage,
    RoomUndecryptable,
    RoomUpdate,
)
from chatd.client.room_payloads import RoomKeyRequest, encode_room_text
from chatd.client.rooms import RoomMember, mentioned_users
from chatd.client.store import now_ms
from chatd.config import DeviceSettings

from .test_client import ALICE_KEY, BOB_KEY, RELAXED, device, relay
from .test_keys import BOB_PASSWORD, create_once, team
from .test_relay_auth import PASSWORD, Server

T = TypeVar("T")
BOB2_KEY = bytes([3]) * 32
CAROL_KEY = bytes([4]) * 32


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
        assert (got.message_id, got.room_id, got.text) == (
            sent,
            room_id,
            "hello @bob, see you at 5",
        )
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


async def wait_until(client: Client, check: Callable[[], Awaitable[bool]]) -> None:
    """Wait (on the client's change notices, never a sleep) until ``check()`` holds."""
    with trio.fail_after(10):
        while True:
            changed = client._changed
            if await check():
                return
            await changed.wait()


async def room_state(client: Client, room_id: int, message_id: str) -> str | None:
    return next(
        (e.state for e in await client.rooms.history(room_id) if e.message_id == message_id), None
    )


def capture_room_sends(client: Client) -> list[dict[str, Any]]:
    """Record every room_send the client makes (its fields), then make it."""
    sends: list[dict[str, Any]] = []
    real = client.connection.request

    async def request(frame_type: str, **fields: Any) -> dict[str, Any]:
        if frame_type == "room_send":
            sends.append(fields)
        return await real(frame_type, **fields)

    client.connection.request = request  # type: ignore[method-assign]
    return sends


# -- races: no message may become undecryptable because of one ---------------------


async def test_a_device_that_joins_while_a_message_is_in_flight_can_read_it(
    short_tmp: Path,
) -> None:
    """Alice's message is encrypted for the room as it was; before it reaches
    the server, Bob's second device appears. The server answers room_changed;
    Alice shares her session with the new device from the index of the
    message already encrypted, and sends the same ciphertext again under the
    same message id."""
    async with pair(short_tmp) as (srv, alice, bob):
        room_id = await shared_room(alice, bob)
        real = alice.connection.request
        sends: list[dict[str, Any]] = []
        replies: list[str] = []
        in_flight, go = trio.Event(), trio.Event()

        async def request(frame_type: str, **fields: Any) -> dict[str, Any]:
            if frame_type == "room_send":
                sends.append(fields)
                if not in_flight.is_set():
                    in_flight.set()
                    await go.wait()
            try:
                reply = await real(frame_type, **fields)
            except ServerRefusedError as exc:
                replies.append(f"{frame_type}: {exc.code}")
                raise
            replies.append(f"{frame_type}: {reply['type']}")
            return reply

        alice.connection.request = request  # type: ignore[method-assign]
        sent: list[str] = []
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                sent.append(await alice.rooms.send(room_id, "in flight"))

            nursery.start_soon(send)
            with trio.fail_after(10):
                await in_flight.wait()
            async with device(srv, short_tmp, "bob", "bob2", BOB2_KEY) as bob2:
                go.set()
                second = await next_event(bob2, RoomMessage)
                first = await next_event(bob, RoomMessage)
        assert first.message_id == second.message_id == sent[0]
        assert second.text == "in flight" and not second.late
        room_sends = [r for r in replies if r.startswith("room_send")]
        assert room_sends == ["room_send: room_changed", "room_send: sent"]
        assert [s["message_id"] for s in sends] == [sent[0], sent[0]]
        assert sends[0]["ciphertext"] == sends[1]["ciphertext"]  # encrypted once
        assert sends[1]["epoch"] != sends[0]["epoch"]


async def test_a_message_whose_key_comes_after_it_is_held_then_decrypted(
    short_tmp: Path,
) -> None:
    async with pair(short_tmp) as (_, alice, bob):
        room_id = await shared_room(alice, bob)
        real_share = alice.rooms.share
        deferred: list[tuple[Any, ...]] = []

        async def share_later(*args: Any) -> None:
            if not deferred and args[2]:
                deferred.append(args)  # the key share is "delayed": the message goes first
                return
            await real_share(*args)

        alice.rooms.share = share_later  # type: ignore[method-assign]
        sent = await alice.rooms.send(room_id, "before its key")
        await wait_until(bob, lambda: _is(room_state(bob, room_id, sent), "held"))
        # Held: stored without text, acknowledged, not shown yet.
        assert [e.text for e in await bob.rooms.history(room_id)] == [None]
        await real_share(*deferred[0])
        got = await next_event(bob, RoomMessage)
        assert (got.message_id, got.text, got.late) == (sent, "before its key", True)
        assert await room_state(bob, room_id, sent) == "received"
        # The next message uses the same session, shared now: no holding.
        again = await alice.rooms.send(room_id, "after its key")
        got = await next_event(bob, RoomMessage)
        assert (got.message_id, got.late) == (again, False)


async def _is(value: Awaitable[str | None], expected: str) -> bool:
    return await value == expected


async def expire_key_shares(srv: Server, device_id: str) -> None:
    """Expiry removes the Olm messages (key shares) queued for ``device_id``,
    and only those: its room messages are left to arrive."""
    await srv.store.write(
        lambda c: c.execute(
            "UPDATE envelopes SET expires_at = 0"
            " WHERE recipient_device_id = ? AND kind = 'message'",
            (device_id,),
        )
    )
    assert await srv.queues.expire(now=now_ms(), limit=100) >= 1


async def test_a_device_back_after_its_key_share_expired_gets_it_again_from_the_sender(
    short_tmp: Path,
) -> None:
    """The expired receipt of the key share makes Alice share the session
    with Bob's second device again; that device, back online, holds the room
    message until the new share comes, then decrypts it."""
    async with pair(short_tmp) as (srv, alice, bob):
        async with device(srv, short_tmp, "bob", "bob2", BOB2_KEY) as bob2:
            bob2_id = bob2.device_id
        room_id = await shared_room(alice, bob)
        sent = await alice.rooms.send(room_id, "while you were out")
        session = alice.rooms.keys.machine.outbound[room_id].session_id
        before = await alice.rooms.store.share_message(session, bob.user_id, bob2_id)
        await expire_key_shares(srv, bob2_id)

        async def shared_again() -> bool:
            now = await alice.rooms.store.share_message(session, bob.user_id, bob2_id)
            return now is not None and now != before

        await wait_until(alice, shared_again)
        async with device(srv, short_tmp, "bob", "bob2", BOB2_KEY) as bob2:
            got = await next_event(bob2, RoomMessage)
            assert (got.message_id, got.text) == (sent, "while you were out")


async def test_a_device_back_after_expiry_reports_the_message_and_asks_the_sender(
    short_tmp: Path,
) -> None:
    """Alice is offline when the key share to Bob's second device expires. That
    device holds the room message, and once its key wait is over reports it as
    "cannot decrypt, ask the sender to resend" and sends a room_key_request to
    Alice's device. When Alice comes back she shares the key again, and the
    message decrypts after all."""
    quick = RoomSettings(key_wait_seconds=0)
    async with relay(short_tmp) as srv:
        async with device(srv, short_tmp, "bob", "bob2", BOB2_KEY) as bob2:
            bob2_id = bob2.device_id
        async with (
            device(srv, short_tmp, "alice", "alice", ALICE_KEY) as alice,
            device(srv, short_tmp, "bob", "bob", BOB_KEY) as bob,
        ):
            room_id = await shared_room(alice, bob)
            sent = await alice.rooms.send(room_id, "can you read this?")
        await expire_key_shares(srv, bob2_id)
        async with device(srv, short_tmp, "bob", "bob2", BOB2_KEY, rooms=quick) as bob2:
            notice = await next_event(bob2, RoomUndecryptable)
            assert (notice.message_id, notice.reason) == (
                sent,
                "cannot decrypt, ask the sender to resend",
            )
            assert await room_state(bob2, room_id, sent) == "undecryptable"
            async with device(srv, short_tmp, "alice", "alice", ALICE_KEY):
                got = await next_event(bob2, RoomMessage)
            assert (got.message_id, got.text, got.late) == (sent, "can you read this?", True)
            assert await room_state(bob2, room_id, sent) == "received"


# -- rotation -----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["removed", "left"])
async def test_after_a_member_goes_they_cannot_decrypt_later_messages(
    short_tmp: Path, how: str
) -> None:
    async with pair(short_tmp) as (_, alice, bob):
        room_id = await shared_room(alice, bob)
        await alice.rooms.send(room_id, "before")
        await next_event(bob, RoomMessage)
        first = alice.rooms.keys.machine.outbound[room_id].session_id
        if how == "removed":
            await alice.rooms.remove(room_id, bob.user_id)
        else:
            await bob.rooms.leave(room_id)
        await next_event(bob, RoomUpdate, type=how, user_id=bob.user_id)
        await next_event(alice, RoomUpdate, type=how, user_id=bob.user_id)
        sends = capture_room_sends(alice)
        await alice.rooms.send(room_id, "after")
        second = alice.rooms.keys.machine.outbound[room_id].session_id
        assert second != first
        # Had Bob got the ciphertext some other way, he holds no key for it.
        verdict = bob.rooms.keys.machine.decrypt(
            room_id, alice.user_id, alice.device_id, sends[-1]["ciphertext"]
        )
        assert isinstance(verdict, KeyMissing)
        assert not await bob.rooms.store.share(second, bob.user_id, bob.device_id)


async def test_a_removed_device_makes_a_new_session_and_a_new_device_does_not(
    short_tmp: Path,
) -> None:
    """Bob adds a second device: Alice's session goes on, shared with it from
    its current index, so it reads what comes after. Bob then removes that
    device: Alice's next message uses a new session."""
    async with pair(short_tmp) as (srv, alice, bob):
        room_id = await shared_room(alice, bob)
        await alice.rooms.send(room_id, "one")
        await next_event(bob, RoomMessage)
        first = alice.rooms.keys.machine.outbound[room_id].session_id
        async with device(srv, short_tmp, "bob", "bob2", BOB2_KEY) as bob2:
            await alice.rooms.send(room_id, "two")
            got = await next_event(bob2, RoomMessage)
            assert got.text == "two"
            assert alice.rooms.keys.machine.outbound[room_id].session_id == first
            ((key, inbound),) = bob2.rooms.keys.machine.inbound.items()
            assert key[3] == first and inbound.first_index == 1  # "one" is not readable
            bob2_id = bob2.device_id
        await bob.connection.request("remove_device", device_id=bob2_id)
        await next_event(alice, RoomUpdate, type="devices", user_id=bob.user_id)
        await alice.rooms.send(room_id, "three")
        await next_event(bob, RoomMessage, text="three")
        assert alice.rooms.keys.machine.outbound[room_id].session_id != first


async def test_history_keys_go_to_joiners_only_when_the_room_shares_history(
    short_tmp: Path,
) -> None:
    for share_history in (False, True):
        session = ""
        tmp = short_tmp / str(share_history)
        tmp.mkdir()
        async with pair(tmp) as (_, alice, bob):
            room = await alice.rooms.create("log", "group", share_history=share_history)
            sends = capture_room_sends(alice)
            await alice.rooms.send(room.room_id, "before bob")
            await alice.rooms.invite(room.room_id, bob.user_id)
            await bob.rooms.join(room.room_id)
            session = alice.rooms.keys.machine.outbound[room.room_id].session_id
            if share_history:  # Alice shares her earlier session when Bob joins

                async def has_key(session: str = session) -> bool:
                    return (
                        await alice.rooms.store.share(session, bob.user_id, bob.device_id)
                        is not None
                    )

                await wait_until(alice, has_key)
                await wait_until(bob, partial(_has_session, bob, session))
            await alice.rooms.send(room.room_id, "after bob")
            await next_event(bob, RoomMessage, text="after bob")
            verdict = bob.rooms.keys.machine.decrypt(
                room.room_id, alice.user_id, alice.device_id, sends[0]["ciphertext"]
            )
            assert isinstance(verdict, KeyMissing) != share_history


async def _has_session(client: Client, session_id: str) -> bool:
    return any(k[3] == session_id for k in client.rooms.keys.machine.inbound)


async def test_rotation_after_the_message_limit(short_tmp: Path) -> None:
    async with pair(short_tmp, rooms=RoomSettings(rotation_messages=2)) as (_, alice, bob):
        room_id = await shared_room(alice, bob)
        sessions = []
        for n in range(3):
            await alice.rooms.send(room_id, f"m{n}")
            sessions.append(alice.rooms.keys.machine.outbound[room_id].session_id)
            assert (await next_event(bob, RoomMessage)).text == f"m{n}"
        assert sessions[0] == sessions[1] != sessions[2]


async def test_the_rooms_example_in_client_md_runs(short_tmp: Path, monkeypatch: Any) -> None:
    """The rooms example of docs/CLIENT.md, run as written against the real
    relay (address, password and store path swapped in; it stops after the
    first room message instead of listening forever), with Bob joining and
    answering."""
    text = (Path(__file__).parent.parent / "docs" / "CLIENT.md").read_text()
    code = re.search(r"## Rooms\n.*?### Example\n\n```python\n(.*?)```", text, re.S)
    assert code is not None
    source = code.group(1)
    assert len(source.splitlines()) <= 25
    swaps = {
        '"correct horse battery staple"': repr(PASSWORD),
        'store_path="alice.db"': f"store_path={str(short_tmp / 'alice.db')!r}",
        "print(event.sender_user_id, event.text)": (
            "print(event.sender_user_id, event.text); return"
        ),
        "trio.run(main)": "",
    }
    for old, new in swaps.items():
        assert old in source, old
        source = source.replace(old, new)
    async with relay(short_tmp) as srv:
        source = source.replace('"ws://127.0.0.1:7878/v1/ws"', repr(srv.url))
        namespace: dict[str, Any] = {}
        exec(compile(source, "CLIENT.md", "exec"), namespace)  # noqa: S102 - our own docs
        printed: list[str] = []
        monkeypatch.setattr("builtins.print", lambda *a: printed.append(" ".join(map(str, a))))
        async with device(srv, short_tmp, "bob", "bob", BOB_KEY) as bob, trio.open_nursery() as n:
            n.start_soon(namespace["main"])
            invitation = await next_event(bob, RoomInvitation)
            await bob.rooms.join(invitation.room.room_id)
            welcome = await next_event(bob, RoomMessage)
            assert (welcome.text, welcome.mentions) == ("welcome @bob", (bob.user_id,))
            await bob.rooms.send(welcome.room_id, "thanks")
        assert printed[-1].endswith(" thanks")


async def test_my_other_device_reads_what_i_send_and_counts_for_nobody(short_tmp: Path) -> None:
    async with pair(short_tmp) as (srv, alice, bob):
        room_id = await shared_room(alice, bob)
        async with device(srv, short_tmp, "alice", "alice2", BOB2_KEY) as alice2:
            sent = await alice.rooms.send(room_id, "from my laptop")
            copy = await next_event(alice2, RoomMessage)
            assert (copy.message_id, copy.text, copy.outgoing) == (sent, "from my laptop", True)
            await next_event(bob, RoomMessage)
            with trio.fail_after(10):
                await alice.wait_state(sent, "delivered")
            delivery = await alice.rooms.delivery(sent)
            assert delivery is not None
            assert (delivery.delivered, delivery.members, delivery.devices) == (1, 1, 2)


async def test_sessions_and_held_messages_survive_a_restart(short_tmp: Path) -> None:
    """Alice's outbound session and who has it, and a message a device holds
    for its key, are in the stores: after a restart Alice's session goes on
    without sharing again, and a late key still opens the held message."""
    async with relay(short_tmp) as srv:
        async with (
            device(srv, short_tmp, "alice", "alice", ALICE_KEY) as alice,
            device(srv, short_tmp, "bob", "bob", BOB_KEY) as bob,
        ):
            room_id = await shared_room(alice, bob)
            await alice.rooms.send(room_id, "one")
            await next_event(bob, RoomMessage)
            session = alice.rooms.keys.machine.outbound[room_id].session_id
        async with device(srv, short_tmp, "bob", "bob2", BOB2_KEY) as bob2:
            bob2_id = bob2.device_id
        async with device(srv, short_tmp, "alice", "alice", ALICE_KEY) as alice:
            real_share = alice.rooms.share
            shares: list[tuple[Any, ...]] = []

            async def no_share(*args: Any) -> None:
                shares.append(args)

            alice.rooms.share = no_share  # type: ignore[method-assign]
            sent = await alice.rooms.send(room_id, "two")
            assert alice.rooms.keys.machine.outbound[room_id].session_id == session
            # Only Bob's new device lacks the session; its share is held back.
            assert [[d.device_id for d in s[2]] for s in shares] == [[bob2_id]]
            async with device(srv, short_tmp, "bob", "bob2", BOB2_KEY) as bob2:
                await wait_until(bob2, lambda: _is(room_state(bob2, room_id, sent), "held"))
            await real_share(*shares[0])
        async with device(srv, short_tmp, "bob", "bob2", BOB2_KEY) as bob2:
            got = await next_event(bob2, RoomMessage)
            assert (got.message_id, got.text, got.late) == (sent, "two", True)


async def test_a_room_message_that_expires_unread_is_reported_expired(short_tmp: Path) -> None:
    async with relay(short_tmp) as srv:
        async with device(srv, short_tmp, "alice", "alice", ALICE_KEY) as alice:
            async with device(srv, short_tmp, "bob", "bob", BOB_KEY) as bob:
                room_id = await shared_room(alice, bob)
            sent = await alice.rooms.send(room_id, "nobody reads this")
            await srv.queues.expire(now=now_ms() + 10**12, limit=100)
            with trio.fail_after(10):
                await alice.wait_state(sent, "expired")
            delivery = await alice.rooms.delivery(sent)
            assert delivery is not None
            assert (delivery.delivered, delivery.expired, delivery.members) == (0, 1, 1)


async def test_a_full_queue_holds_up_neither_the_key_share_nor_the_message(
    short_tmp: Path,
) -> None:
    """Bob's second device is offline with a full queue. Alice's key share
    leaves it out (``skip_full``) instead of failing, the room message reaches
    Bob's other device, and the full device stays entitled to the key: it is
    shared with it again on Alice's next message."""
    limits = DeviceSettings(max_queued_envelopes=4)
    async with team(short_tmp, devices=limits, **RELAXED) as srv:
        async with device(srv, short_tmp, "bob", "bob2", BOB2_KEY) as bob2:
            bob2_id = bob2.device_id
        async with (
            device(srv, short_tmp, "alice", "alice", ALICE_KEY) as alice,
            device(srv, short_tmp, "bob", "bob", BOB_KEY) as bob,
        ):
            room_id = await shared_room(alice, bob)
            refused, fillers = None, 0
            for n in range(5):  # the room's events and these fill bob2's queue
                try:
                    await alice.send_text(bob.user_id, f"filler {n}")
                except ServerRefusedError as exc:
                    refused = exc.code
                    break
                fillers += 1
            assert refused == "queue_full" and fillers
            sent = await alice.rooms.send(room_id, "to whoever can take it")
            got = await next_event(bob, RoomMessage)
            assert got.message_id == sent
            session = alice.rooms.keys.machine.outbound[room_id].session_id
            outbound = alice.rooms.keys.machine.outbound[room_id]
            assert (bob.user_id, bob2_id) not in outbound.shared  # it did not get it
            entitled = await alice.rooms.store.share(session, bob.user_id, bob2_id)
            assert entitled is not None and entitled.first_index == 0
            # Back with room in its queue, bob2 asks for the session: it was
            # entitled to it all along, so alice shares it.
            async with device(srv, short_tmp, "bob", "bob2", BOB2_KEY) as bob2:
                with trio.fail_after(10):  # its queue's last entry: all are acknowledged
                    while (await bob2.messages().receive()).text != f"filler {fillers - 1}":
                        pass
                assert not await _has_session(bob2, session)
                members = await bob2.rooms.members(room_id)
                named = [
                    d
                    for d in members.devices()
                    if d.user_id in (alice.user_id, bob.user_id) and d.device_id != bob2_id
                ]
                request = RoomKeyRequest(room_id, session).fields()
                wanted = {(alice.user_id, alice.device_id)}

                async def again() -> list[MemberDevice]:
                    return named

                await bob2.rooms.send_control(request, named, wanted, again)
                await wait_until(bob2, partial(_has_session, bob2, session))


def test_mentions_match_usernames_in_any_case() -> None:
    members = [RoomMember(1, "alice", "owner", []), RoomMember(2, "bob.", "member", [])]
    members.append(RoomMember(3, "carol", "member", []))
    assert mentioned_users("hi @Alice and @BOB. and @carol.", members) == [1, 2, 3]
    assert mentioned_users("mail@alice.org, @alicex, @ali", members) == []


async def test_a_mention_typed_in_another_case_reaches_the_member(short_tmp: Path) -> None:
    async with pair(short_tmp) as (_, alice, bob):
        room_id = await shared_room(alice, bob)
        await alice.rooms.send(room_id, "ping @Bob")
        got = await next_event(bob, RoomMessage)
        assert got.mentions == (bob.user_id,)


async def test_a_room_message_that_no_key_opens_is_reported_in_its_room(
    short_tmp: Path,
) -> None:
    """A damaged ciphertext, one whose plaintext names another room, and a
    replay of another message's Megolm index each reach the application as
    RoomUndecryptable (room, sender, message id, cause), never only a log line."""
    async with pair(short_tmp) as (_, alice, bob):
        room_id = await shared_room(alice, bob)
        first = await alice.rooms.send(room_id, "a real one")
        await next_event(bob, RoomMessage, message_id=first)
        sends = capture_room_sends(alice)
        await alice.rooms.send(room_id, "another real one")
        original = sends[-1]["ciphertext"]
        session = alice.rooms.keys.machine.outbound[room_id].session_id
        moved = await alice.rooms.keys.encrypt(
            room_id, session, encode_room_text(room_id + 1, "meant for another room")
        )
        outer = json.loads(original)
        body = bytearray(base64.b64decode(outer["body"] + "=" * (-len(outer["body"]) % 4)))
        body[-1] ^= 1  # the signature no longer matches
        outer["body"] = base64.b64encode(bytes(body)).decode().rstrip("=")
        epoch = (await alice.rooms.current_members(room_id)).epoch
        crafted = {
            BAD_CIPHERTEXT: "not a room ciphertext",
            WRONG_ROOM: moved,
            REPLAY: original,
        }
        crafted_ids = {}
        for cause, ciphertext in [*crafted.items(), ("tampered", json.dumps(outer))]:
            message_id = str(uuid.uuid4())
            crafted_ids[message_id] = BAD_CIPHERTEXT if cause == "tampered" else cause
            await alice.connection.request(
                "room_send",
                room_id=room_id,
                message_id=message_id,
                epoch=epoch,
                ciphertext=ciphertext,
            )
        await next_event(bob, RoomMessage, text="another real one")
        for message_id, cause in crafted_ids.items():
            got = await next_event(bob, RoomUndecryptable, message_id=message_id)
            assert (got.room_id, got.sender_user_id, got.sender_device_id, got.cause) == (
                room_id,
                alice.user_id,
                alice.device_id,
                cause,
            )
            assert got.reason == CANNOT_DECRYPT and not got.may_decrypt_later
        states = {e.message_id: e.state for e in await bob.rooms.history(room_id)}
        assert all(states[m] == "undecryptable" for m in crafted_ids)


async def test_a_member_whose_queues_are_full_is_unreachable_not_waited_for(
    short_tmp: Path,
) -> None:
    """Bob's only device is offline with a full queue: alice's room message
    skips it. The delivery says so (bob is unreachable, not waiting), and
    once carol has it the message is final: 1 of 2, 1 unreachable, none
    expired."""
    limits = DeviceSettings(max_queued_envelopes=4)
    async with team(short_tmp, devices=limits, **RELAXED) as srv:
        await create_once(srv.admin, "carol", BOB_PASSWORD)
        async with device(srv, short_tmp, "alice", "alice", ALICE_KEY) as alice:
            async with device(srv, short_tmp, "bob", "bob", BOB_KEY) as bob:
                room_id = await shared_room(alice, bob)
                bob_device = (bob.user_id, bob.device_id)
            async with device(srv, short_tmp, "carol", "carol", CAROL_KEY) as carol:
                await alice.rooms.invite(room_id, carol.user_id)
                await carol.rooms.join(room_id)
                for n in range(10):
                    try:
                        await alice.send_text(bob.user_id, f"filler {n}")
                    except ServerRefusedError as exc:
                        assert exc.code == "queue_full"
                        break
                sent = await alice.rooms.send(room_id, "who gets this?")
                delivery = await alice.rooms.delivery(sent)
                assert delivery is not None
                assert (delivery.members, delivery.unreachable, delivery.devices) == (2, 1, 1)
                assert delivery.skipped == (bob_device,)
                assert delivery.waiting == (0 if delivery.delivered else 1)
                if not delivery.final:
                    changed = await next_event(alice, RoomDeliveryChanged, message_id=sent)
                    delivery = changed.delivery
                assert (delivery.delivered, delivery.expired, delivery.unreachable) == (1, 0, 1)
                assert (delivery.state, delivery.waiting) == ("expired", 0)
                assert await room_state(alice, room_id, sent) == "expired"


async def test_a_receipt_after_the_send_is_a_delivery_changed_event(short_tmp: Path) -> None:
    async with relay(short_tmp) as srv:
        async with device(srv, short_tmp, "alice", "alice", ALICE_KEY) as alice:
            async with device(srv, short_tmp, "bob", "bob", BOB_KEY) as bob:
                room_id = await shared_room(alice, bob)
            sent = await alice.rooms.send(room_id, "read this when you are back")
            delivery = await alice.rooms.delivery(sent)
            assert delivery is not None and (delivery.state, delivery.waiting) == ("sent", 1)
            async with device(srv, short_tmp, "bob", "bob", BOB_KEY):
                changed = await next_event(alice, RoomDeliveryChanged, message_id=sent)
            assert changed.room_id == room_id
            assert (changed.delivery.delivered, changed.delivery.members) == (1, 1)
            assert changed.delivery.state == "delivered" and changed.delivery.final
