"""Rooms over the real relay: Alice on two devices, Bob and Carol on one.

The ciphertexts are opaque strings (Megolm is the client library's business,
tested apart): these tests are about what the server stores, whom it
queues entries for, and whom it refuses.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from chatd.config import DeviceSettings, RetentionSettings, RoomSettings
from chatd.retention import Retention, queue_jobs
from chatd.store import now_ms

from .test_keys import BOB_PASSWORD, Device, login_device, team
from .test_messaging import FailingWrites
from .test_relay_auth import PASSWORD, Server, connect, create_once

CAROL_PASSWORD = "carol keeps a long password"


@dataclass
class Crew:
    srv: Server
    alice1: Device
    alice2: Device
    bob: Device
    carol: Device

    @property
    def everyone(self) -> list[Device]:
        return [self.alice1, self.alice2, self.bob, self.carol]


@asynccontextmanager
async def crew(
    short_tmp: Path, devices: DeviceSettings | None = None, rooms: RoomSettings | None = None
) -> AsyncIterator[Crew]:
    async with team(short_tmp, devices=devices, rooms=rooms) as srv, AsyncExitStack() as stack:
        await create_once(srv.admin, "carol", CAROL_PASSWORD)
        people = []
        for username, password in (
            ("alice", PASSWORD),
            ("alice", PASSWORD),
            ("bob", BOB_PASSWORD),
            ("carol", CAROL_PASSWORD),
        ):
            client = await stack.enter_async_context(connect(srv))
            device = await login_device(client, username, password)
            await device.publish(2)
            people.append(device)
        yield Crew(srv, *people)


async def entries(device: Device, count: int, *, ack: bool = True) -> list[dict[str, Any]]:
    """The next ``count`` queued entries this device gets (receipts included),
    acknowledged unless told otherwise."""
    got: list[dict[str, Any]] = []
    client = device.client
    with trio.fail_after(10):
        while len(got) < count:
            if client.skipped:
                frame = client.skipped.pop(0)
            else:
                frame = json.loads(await client.ws.get_message())
            if frame["type"] == "deliver":
                got.extend(frame["envelopes"])
    assert len(got) == count, got
    if ack:
        await device.client.request("ack", up_to=got[-1]["envelope_id"])
    return got


def events(got: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e["event"] for e in got if e["kind"] == "room_event"]


async def create(device: Device, name: str = "general", **fields: Any) -> dict[str, Any]:
    reply = await device.client.request("room_create", name=name, **{"kind": "channel", **fields})
    assert reply["type"] == "room", reply
    return reply["room"]  # type: ignore[no-any-return]


async def room_send(
    device: Device, room_id: int, epoch: int, text: str = "megolm", message_id: str | None = None
) -> dict[str, Any]:
    return await device.client.request(
        "room_send",
        room_id=room_id,
        message_id=message_id or str(uuid.uuid4()),
        epoch=epoch,
        ciphertext=text,
    )


async def count(srv: Server, sql: str, *args: Any) -> int:
    return int(await srv.store.read(lambda conn: conn.execute(sql, args).fetchone()[0]))


async def queue_of(srv: Server, device: Device) -> list[Any]:
    """What the device's queue holds on disk and in memory now (as delivery reads it)."""
    await srv.queues.flush()
    done = trio.Event()
    got: list[Any] = []

    def read(envelopes: list[Any], *_: Any) -> None:
        got.extend(envelopes)
        done.set()

    def failed(exc: BaseException) -> None:
        raise exc

    srv.queues.read(device.device_id, 0, 1000, read, failed)
    with trio.fail_after(10):
        await done.wait()
    return got


async def settle(srv: Server) -> None:
    """Wait until what the queues hold in memory is written (a commit round)."""
    await srv.queues.flush()


async def test_a_channel_is_created_joined_and_its_message_reaches_every_member_device(
    short_tmp: Path,
) -> None:
    async with crew(short_tmp) as c:
        room = await create(c.alice1, topic="all hands")
        assert room | {"created_at": 0} == {
            "room_id": 1,
            "kind": "channel",
            "name": "general",
            "topic": "all hands",
            "invite_only": False,
            "share_history": False,
            "created_at": 0,
            "member_count": 1,
            "role": "owner",
            "epoch": room["epoch"],
        }
        assert events(await entries(c.alice1, 1)) == [
            {
                "type": "created",
                "epoch": room["epoch"],
                "by_user_id": c.alice1.user_id,
                "name": "general",
                "topic": "all hands",
            }
        ]
        await entries(c.alice2, 1)
        listing = await c.bob.client.request("list_rooms")
        assert [r["room_id"] for r in listing["channels"]] == [1]
        assert listing["joined"] == [] and listing["invited"] == []
        joined = await c.bob.client.request("room_join", room_id=1)
        assert joined["room"]["role"] == "member" and joined["room"]["member_count"] == 2
        epoch = joined["room"]["epoch"]
        assert epoch > room["epoch"]
        for device in (c.alice1, c.alice2, c.bob):
            [event] = events(await entries(device, 1))
            assert event == {"type": "joined", "epoch": epoch, "user_id": c.bob.user_id}

        members = await c.bob.client.request("room_members", room_id=1)
        assert members["epoch"] == epoch and members["invited"] == []
        assert [(m["username"], m["role"], len(m["devices"])) for m in members["members"]] == [
            ("alice", "owner", 2),
            ("bob", "member", 1),
        ]
        assert members["members"][1]["devices"][0]["device_id"] == c.bob.device_id

        message_id = str(uuid.uuid4())
        sent = await room_send(c.alice1, 1, epoch, "one ciphertext", message_id)
        assert sent == {"type": "sent", "id": sent["id"], "message_id": message_id, "envelopes": 2}
        for device in (c.alice2, c.bob):
            [entry] = await entries(device, 1)
            assert entry | {"envelope_id": 0, "sent_at": 0} == {
                "envelope_id": 0,
                "sent_at": 0,
                "kind": "room_message",
                "message_id": message_id,
                "room_id": 1,
                "sender_user_id": c.alice1.user_id,
                "sender_device_id": c.alice1.device_id,
                "ciphertext": "one ciphertext",
            }
        receipts = await entries(c.alice1, 2)
        assert {(e["kind"], e["device_id"], e["room_id"]) for e in receipts} == {
            ("delivered", c.alice2.device_id, 1),
            ("delivered", c.bob.device_id, 1),
        }
        # Carol is no member: nothing reached her.
        assert (await c.carol.client.request("list_rooms"))["joined"] == []
        assert not [f for f in c.carol.client.skipped if f["type"] == "deliver"]


async def test_a_room_message_is_stored_once_and_deleted_with_the_last_ack(
    short_tmp: Path,
) -> None:
    async with crew(short_tmp) as c:
        room = await create(c.alice1)
        for device in (c.bob, c.carol):
            joined = await device.client.request("room_join", room_id=room["room_id"])
        epoch = joined["room"]["epoch"]
        for device in c.everyone:
            await device.client.ws.aclose() if device is not c.alice1 else None
        sent = await room_send(c.alice1, 1, epoch, "x" * 1000)
        assert sent["envelopes"] == 3
        await settle(c.srv)
        assert await count(c.srv, "SELECT count(*) FROM room_log WHERE kind = 'room_message'") == 1
        assert await count(c.srv, "SELECT sum(length(ciphertext)) FROM room_log") == 1000
        assert await count(c.srv, "SELECT count(*) FROM envelopes WHERE room_id IS NOT NULL") == 0
        # Each device comes back, reads its queue and acknowledges it.
        left = [c.alice2, c.bob, c.carol]
        for n, device in enumerate(left):
            async with connect(c.srv) as again:
                username = {c.bob: "bob", c.carol: "carol"}.get(device, "alice")
                password = {c.bob: BOB_PASSWORD, c.carol: CAROL_PASSWORD}.get(device, PASSWORD)
                await again.login(username, password, device_id=device.device_id)
                got: list[dict[str, Any]] = []
                with trio.fail_after(10):
                    while not any(e["kind"] == "room_message" for e in got):
                        frame = json.loads(await again.ws.get_message())
                        if frame["type"] == "deliver":
                            got.extend(frame["envelopes"])
                assert got[-1]["ciphertext"] == "x" * 1000
                await again.request("ack", up_to=got[-1]["envelope_id"])
                await settle(c.srv)
                kept = await count(
                    c.srv, "SELECT count(*) FROM room_log WHERE kind = 'room_message'"
                )
                assert kept == (1 if n < len(left) - 1 else 0)


async def test_a_room_message_every_member_acknowledges_at_once_is_never_written(
    short_tmp: Path,
) -> None:
    async with crew(short_tmp, DeviceSettings(ack_wait_ms=2_000)) as c:
        await create(c.alice1)
        joined = await c.bob.client.request("room_join", room_id=1)
        for device, waiting in ((c.alice1, 2), (c.alice2, 2), (c.bob, 1)):
            await entries(device, waiting)  # created, joined
        message_id = str(uuid.uuid4())
        frame = {
            "type": "room_send",
            "id": "fast",
            "room_id": 1,
            "message_id": message_id,
            "epoch": joined["room"]["epoch"],
            "ciphertext": "fast",
        }
        with trio.fail_after(1.5):  # well inside the ack wait
            await c.alice1.client.ws.send_message(json.dumps(frame))
            for device in (c.alice2, c.bob):
                [entry] = await entries(device, 1)
                assert entry["message_id"] == message_id
            sent = await next_reply(c.alice1, "fast")
            assert sent["envelopes"] == 2
        receipts = await entries(c.alice1, 2)
        assert {e["kind"] for e in receipts} == {"delivered"}
        await settle(c.srv)
        assert await count(c.srv, "SELECT count(*) FROM room_log WHERE kind = 'room_message'") == 0


async def next_reply(device: Device, request_id: str) -> dict[str, Any]:
    client = device.client
    with trio.fail_after(10):
        while True:
            for n, frame in enumerate(client.skipped):
                if frame.get("id") == request_id:
                    return client.skipped.pop(n)
            frame = json.loads(await client.ws.get_message())
            if frame.get("id") == request_id:
                return frame  # type: ignore[no-any-return]
            client.skipped.append(frame)


async def refused(device: Device, frame_type: str, **fields: Any) -> str:
    reply = await device.client.request(frame_type, **fields)
    assert reply["type"] == "error", reply
    return reply["code"]  # type: ignore[no-any-return]


async def test_a_private_group_is_invisible_to_everyone_outside_it(short_tmp: Path) -> None:
    """ASVS V8: to a non-member a group and a room that does not exist look
    the same, whatever they try; nothing of the group reaches their devices."""
    async with crew(short_tmp) as c:
        group = await create(c.alice1, "secret", kind="group", invite_only=False)
        assert group["invite_only"] is True  # a group always is
        await c.alice1.client.request("room_invite", room_id=group["room_id"], user_id=2)
        missing = 99
        for room_id in (group["room_id"], missing):
            assert await refused(c.carol, "room_join", room_id=room_id) == "room_not_found"
            assert await refused(c.carol, "room_members", room_id=room_id) == "room_not_found"
            assert await refused(c.carol, "room_leave", room_id=room_id) == "room_not_found"
            assert await refused(c.carol, "room_invite", room_id=room_id, user_id=3) == (
                "room_not_found"
            )
            assert await refused(c.carol, "room_remove", room_id=room_id, user_id=2) == (
                "room_not_found"
            )
            assert await refused(c.carol, "room_set_topic", room_id=room_id, topic="x") == (
                "room_not_found"
            )
            assert await refused(
                c.carol, "room_set_role", room_id=room_id, user_id=3, role="owner"
            ) == ("room_not_found")
            assert await refused(c.carol, "room_delete", room_id=room_id) == "room_not_found"
            assert await refused(c.carol, "room_send", **send_fields(room_id, 0)) == (
                "room_not_found"
            )
        listing = await c.carol.client.request("list_rooms")
        assert listing["joined"] == listing["invited"] == listing["channels"] == []
        # Bob, invited, sees it; he is not a member yet, so he cannot read or send.
        bob_sees = await c.bob.client.request("list_rooms")
        assert [i["room"]["name"] for i in bob_sees["invited"]] == ["secret"]
        assert await refused(c.bob, "room_members", room_id=group["room_id"]) == "not_member"
        assert await refused(c.bob, "room_send", **send_fields(group["room_id"], 0)) == (
            "not_member"
        )
        sent = await room_send(c.alice1, group["room_id"], group["epoch"], "for alice only")
        assert sent["envelopes"] == 1  # alice2: invitees get nothing
        await settle(c.srv)
        for outsider in (c.bob, c.carol):
            got = await outsider.client.request("list_sessions")  # a round trip
            assert got["type"] == "sessions"
            assert not any(
                e.get("room_id") == group["room_id"]
                for f in outsider.client.skipped
                if f["type"] == "deliver"
                for e in f["envelopes"]
            )
            assert [e for e in await queue_of(c.srv, outsider) if e.room_id is not None] == []


def send_fields(room_id: int, epoch: int, text: str = "x") -> dict[str, Any]:
    return {"room_id": room_id, "message_id": str(uuid.uuid4()), "epoch": epoch, "ciphertext": text}


async def test_a_channel_member_list_and_messages_need_membership(short_tmp: Path) -> None:
    async with crew(short_tmp) as c:
        room = await create(c.alice1)
        assert await refused(c.bob, "room_members", room_id=1) == "not_member"
        assert await refused(c.bob, "room_send", **send_fields(1, room["epoch"])) == "not_member"
        assert await refused(c.bob, "room_invite", room_id=1, user_id=3) == "not_member"
        assert await refused(c.bob, "room_leave", room_id=1) == "not_member"
        # An invite-only channel is listed, but joining needs an invitation.
        await create(c.alice1, "staff", invite_only=True)
        listing = await c.bob.client.request("list_rooms")
        assert [(r["name"], r["invite_only"]) for r in listing["channels"]] == [
            ("general", False),
            ("staff", True),
        ]
        assert "role" not in listing["channels"][0] and "epoch" not in listing["channels"][0]
        assert await refused(c.bob, "room_join", room_id=2) == "not_invited"
        await c.alice1.client.request("room_invite", room_id=2, user_id=c.bob.user_id)
        assert (await c.bob.client.request("room_join", room_id=2))["type"] == "room"


async def test_a_removed_member_is_refused_on_every_old_connection_and_session(
    short_tmp: Path,
) -> None:
    async with crew(short_tmp) as c:
        group = await create(c.alice1, "team", kind="group")
        await c.alice1.client.request("room_invite", room_id=1, user_id=c.bob.user_id)
        joined = await c.bob.client.request("room_join", room_id=1)
        # Bob opens a second connection on the same session, before his removal.
        async with connect(c.srv) as old:
            session = await old.login("bob", BOB_PASSWORD, device_id=c.bob.device_id)
            assert session["type"] == "session"
            removed = await c.alice1.client.request("room_remove", room_id=1, user_id=2)
            assert removed["type"] == "ok"
            got = events(await entries(c.bob, 2))  # joined, removed
            assert got[-1] == {
                "type": "removed",
                "epoch": joined["room"]["epoch"] + 1,
                "user_id": c.bob.user_id,
                "by_user_id": c.alice1.user_id,
            }
            for conn in (c.bob.client, old):
                for frame_type, fields in (
                    ("room_send", send_fields(1, joined["room"]["epoch"] + 1)),
                    ("room_members", {"room_id": 1}),
                    ("room_invite", {"room_id": 1, "user_id": 3}),
                    ("room_join", {"room_id": 1}),
                ):
                    reply = await conn.request(frame_type, **fields)
                    assert reply["code"] == "room_not_found", (frame_type, reply)
        # A session resumed later with an old access token is refused the same way.
        async with connect(c.srv) as later:
            await later.request("resume", access_token=session["access_token"])
            reply = await later.request("room_send", **send_fields(1, group["epoch"]))
            assert reply["code"] == "room_not_found"
        sent = await room_send(c.alice1, 1, joined["room"]["epoch"] + 1, "after bob left")
        assert sent["envelopes"] == 1  # only alice2
        assert [e.kind for e in await queue_of(c.srv, c.bob) if e.kind == "room_message"] == []


async def test_a_send_for_an_old_epoch_is_refused_and_nothing_is_queued(short_tmp: Path) -> None:
    async with crew(short_tmp) as c:
        room = await create(c.alice1)
        await c.bob.client.request("room_join", room_id=1)
        reply = await c.alice1.client.request("room_send", **send_fields(1, room["epoch"]))
        assert reply["code"] == "room_changed" and reply["field"] == "$.epoch"
        members = await c.alice1.client.request("room_members", room_id=1)
        message_id = str(uuid.uuid4())
        fields = send_fields(1, members["epoch"]) | {"message_id": message_id}
        assert (await c.alice1.client.request("room_send", **fields))["envelopes"] == 2
        # Sending the same message again answers the first answer, whatever the epoch now.
        await c.carol.client.request("room_join", room_id=1)
        again = await c.alice1.client.request("room_send", **fields)
        assert again["type"] == "sent" and again["envelopes"] == 2
        await settle(c.srv)
        assert await count(c.srv, "SELECT count(*) FROM room_log WHERE kind = 'room_message'") == 1


async def test_a_members_new_device_and_removed_device_change_the_epoch(short_tmp: Path) -> None:
    async with crew(short_tmp) as c:
        await create(c.alice1)
        joined = await c.bob.client.request("room_join", room_id=1)
        epoch = joined["room"]["epoch"]
        await entries(c.alice1, 2)
        async with connect(c.srv) as phone:
            bob2 = await login_device(phone, "bob", BOB_PASSWORD)
            await bob2.publish(1)
            [event] = events(await entries(c.alice1, 1))
            assert event == {"type": "devices", "epoch": epoch + 1, "user_id": c.bob.user_id}
            members = await c.alice1.client.request("room_members", room_id=1)
            assert members["epoch"] == epoch + 1
            bob_devices = {d["device_id"] for d in members["members"][1]["devices"]}
            assert bob_devices == {c.bob.device_id, bob2.device_id}
            sent = await room_send(c.alice1, 1, epoch + 1, "to both of bob's")
            assert sent["envelopes"] == 3
            got = await entries(bob2, 2)
            assert [e["kind"] for e in got] == ["room_event", "room_message"]
            removed = await c.bob.client.request("remove_device", device_id=bob2.device_id)
            assert removed["type"] == "ok", removed
        [event] = events(await entries(c.alice1, 2))[-1:]
        assert event == {"type": "devices", "epoch": epoch + 2, "user_id": c.bob.user_id}
        assert (await room_send(c.alice1, 1, epoch + 2))["envelopes"] == 2


async def run_jobs(srv: Server, *names: str) -> dict[str, int]:
    retention = Retention(srv.store, RetentionSettings(), queue_jobs(DeviceSettings(), srv.queues))
    reports = await retention.run_now(list(names))
    assert all(r.error is None for r in reports), reports
    return {r.job: r.rows_purged for r in reports}


async def test_an_undelivered_room_message_expires_with_a_receipt_per_waiting_device(
    short_tmp: Path,
) -> None:
    async with crew(short_tmp) as c:
        await create(c.alice1)
        for device in (c.bob, c.carol):
            joined = await device.client.request("room_join", room_id=1)
        await entries(c.bob, 2)  # joined x2: bob is caught up
        await c.carol.client.ws.aclose()
        await c.alice2.client.ws.aclose()
        sent = await room_send(c.alice1, 1, joined["room"]["epoch"], "too late for some")
        [entry] = await entries(c.bob, 1)
        assert entry["message_id"] == sent["message_id"]
        await settle(c.srv)
        await c.srv.store.write(
            lambda conn: conn.execute("UPDATE room_log SET expires_at = ?", (now_ms() - 1,))
        )
        purged = await run_jobs(c.srv, "envelopes")
        assert purged["envelopes"] >= 1
        assert await count(c.srv, "SELECT count(*) FROM room_log") == 0
        got = [e for e in await entries(c.alice1, 6) if e["kind"] != "room_event"]
        receipts = {(e["kind"], e["device_id"], e.get("room_id")) for e in got}
        assert receipts == {
            ("delivered", c.bob.device_id, 1),
            ("expired", c.alice2.device_id, 1),
            ("expired", c.carol.device_id, 1),
        }
        assert await queue_of(c.srv, c.carol) == []


async def test_entries_of_a_removed_device_and_its_closed_ranges_are_swept(
    short_tmp: Path,
) -> None:
    async with crew(short_tmp) as c:
        await create(c.alice1)
        joined = await c.carol.client.request("room_join", room_id=1)
        await c.carol.client.ws.aclose()  # carol never reads again
        sent = await room_send(c.alice1, 1, joined["room"]["epoch"], "carol never reads this")
        assert sent["envelopes"] == 2
        await c.alice1.client.request("room_remove", room_id=1, user_id=c.carol.user_id)
        await entries(c.alice2, 4)  # created, joined, the message, removed
        await entries(c.alice1, 4)  # created, joined, removed; alice2's receipt
        await settle(c.srv)
        assert await count(c.srv, "SELECT count(*) FROM room_devices WHERE until_id IS NULL") == 2
        kept = await count(c.srv, "SELECT count(*) FROM room_log")
        assert kept >= 2  # carol still waits for the message and her removal
        assert (await run_jobs(c.srv, "rooms"))["rooms"] == 0
        # Carol's device is removed: nothing waits for those entries any more.
        async with connect(c.srv) as phone:
            await phone.login("carol", CAROL_PASSWORD)
            removed = await phone.request("remove_device", device_id=c.carol.device_id)
            assert removed["type"] == "ok", removed
        await settle(c.srv)
        assert (await run_jobs(c.srv, "rooms"))["rooms"] >= 1
        assert await count(c.srv, "SELECT count(*) FROM room_log") == 0
        assert await count(
            c.srv, "SELECT count(*) FROM room_devices WHERE until_id IS NOT NULL"
        ) == (0)
        assert await count(c.srv, "SELECT count(*) FROM room_devices") == 2  # alice's two


async def test_a_full_queue_skips_that_device_and_it_rejoins_once_drained(short_tmp: Path) -> None:
    """Room messages are not refused because one member's device is full:
    that device is skipped (named in every ``sent.skipped`` meanwhile) until
    it has room, and it still gets the room's events."""
    async with crew(short_tmp, DeviceSettings(max_queued_envelopes=4)) as c:
        await create(c.alice1)
        joined = await c.bob.client.request("room_join", room_id=1)
        epoch = joined["room"]["epoch"]
        bob_device = c.bob.device_id
        bob_ref = {"user_id": c.bob.user_id, "device_id": bob_device}
        await c.bob.client.ws.aclose()  # bob holds one entry: his joined event
        await entries(c.alice2, 2)
        sent = []
        for n in range(5):
            sent.append(await room_send(c.alice1, 1, epoch, f"m{n}"))
            await entries(c.alice2, 1)
        assert [s["envelopes"] for s in sent] == [2, 2, 2, 1, 1]
        assert [s.get("skipped") for s in sent] == [None, None, None, [bob_ref], [bob_ref]]
        # Bob's full device still hears that carol joined (and nothing else).
        await c.carol.client.request("room_join", room_id=1)
        await entries(c.alice2, 1)
        async with connect(c.srv) as again:
            await again.login("bob", BOB_PASSWORD, device_id=bob_device)
            bob = Device(again, c.bob.user_id, bob_device)
            got = await entries(bob, 5)
            assert [e.get("ciphertext") for e in got] == [None, "m0", "m1", "m2", None]
            assert events(got)[-1]["type"] == "joined"
            assert events(got)[-1]["user_id"] == c.carol.user_id
            await settle(c.srv)
            # With room again, bob gets what is sent from now on (m3, m4 are gone for him).
            after = await room_send(c.alice1, 1, epoch + 1, "m5")
            assert after["envelopes"] == 3 and "skipped" not in after
            [entry] = await entries(bob, 1)
            assert entry["ciphertext"] == "m5"


async def test_a_device_still_full_after_a_restart_stays_suspended_without_a_new_epoch(
    short_tmp: Path,
) -> None:
    async with crew(short_tmp, DeviceSettings(max_queued_envelopes=2)) as c:
        await create(c.alice1)
        joined = await c.bob.client.request("room_join", room_id=1)
        await c.bob.client.ws.aclose()  # joined + m0 fill bob's queue
        for n in range(2):
            await room_send(c.alice1, 1, joined["room"]["epoch"], f"m{n}")
        bob_device, bob_user = c.bob.device_id, c.bob.user_id
    async with team(short_tmp, devices=DeviceSettings(max_queued_envelopes=2)) as srv:
        room = srv.rooms.rooms[1]
        assert room.epoch == joined["room"]["epoch"]
        assert bob_device in room.suspended and room.devices[bob_device] == bob_user


async def test_a_room_change_whose_write_failed_is_written_with_its_event_later(
    short_tmp: Path, monkeypatch: Any
) -> None:
    """storage_unavailable on a room change: its statements and its event are
    tried again with the next write, so members still hear of what took effect."""
    async with crew(short_tmp) as c:
        await create(c.alice1)
        await c.alice2.client.ws.aclose()
        disk = FailingWrites(monkeypatch)
        refused = await c.bob.client.request("room_join", room_id=1)
        assert refused["code"] == "storage_unavailable"
        disk.failing = False
        with trio.fail_after(10):  # the retry is armed at the failure; a flush may pass it
            while await count(c.srv, "SELECT count(*) FROM room_members") != 2:
                await settle(c.srv)
        stored = await c.srv.store.read(
            lambda conn: [
                json.loads(r[0])["type"] for r in conn.execute("SELECT event FROM room_log")
            ]
        )
        assert stored == ["created", "joined"]
        async with connect(c.srv) as again:
            await again.login(device_id=c.alice2.device_id)
            got = await entries(Device(again, c.alice2.user_id, c.alice2.device_id), 2)
            assert [e["event"]["type"] for e in got] == ["created", "joined"]


async def test_rooms_and_queued_room_entries_survive_a_restart(short_tmp: Path) -> None:
    async with crew(short_tmp) as c:
        await create(c.alice1, "kept", topic="t")
        joined = await c.bob.client.request("room_join", room_id=1)
        await c.bob.client.ws.aclose()
        sent = await room_send(c.alice1, 1, joined["room"]["epoch"], "across a restart")
        bob_device, epoch = c.bob.device_id, joined["room"]["epoch"]
    async with crew(short_tmp) as c:
        async with connect(c.srv) as again:
            await again.login("bob", BOB_PASSWORD, device_id=bob_device)
            bob = Device(again, c.bob.user_id, bob_device)
            # joined; the message; the new devices of alice (two) and bob, after the restart
            got = await entries(bob, 5)
            assert [e["kind"] for e in got] == ["room_event", "room_message"] + ["room_event"] * 3
            assert got[1]["message_id"] == sent["message_id"]
            listing = await again.request("list_rooms")
            [room] = listing["joined"]
            assert (room["name"], room["topic"], room["role"]) == ("kept", "t", "member")
            # The new devices that logged in again joined the room's member devices.
            assert room["epoch"] > epoch
            members = await again.request("room_members", room_id=1)
            assert members["epoch"] == room["epoch"]
            assert [len(m["devices"]) for m in members["members"]] == [4, 2]
        # A new room gets a new id, never one used before the restart.
        assert (await create(c.carol, "new"))["room_id"] == 2


async def test_roles_decide_who_removes_promotes_and_deletes(short_tmp: Path) -> None:
    async with crew(short_tmp) as c:
        await create(c.alice1)
        for device in (c.bob, c.carol):
            await device.client.request("room_join", room_id=1)
        bob, carol = c.bob.user_id, c.carol.user_id
        assert await refused(c.bob, "room_remove", room_id=1, user_id=carol) == "forbidden"
        assert await refused(c.bob, "room_set_topic", room_id=1, topic="mine") == "forbidden"
        assert await refused(c.bob, "room_set_role", room_id=1, user_id=bob, role="owner") == (
            "forbidden"
        )
        assert await refused(c.bob, "room_delete", room_id=1) == "forbidden"
        ok = await c.alice1.client.request(
            "room_set_role", room_id=1, user_id=bob, role="moderator"
        )
        assert ok["type"] == "ok"
        assert (await c.bob.client.request("room_set_topic", room_id=1, topic="new"))[
            "type"
        ] == "ok"
        assert await refused(c.bob, "room_remove", room_id=1, user_id=c.alice1.user_id) == (
            "forbidden"
        )
        assert await refused(c.bob, "room_remove", room_id=1, user_id=bob) == "forbidden"
        assert (await c.bob.client.request("room_remove", room_id=1, user_id=carol))["type"] == "ok"
        assert await refused(c.alice1, "room_leave", room_id=1) == "last_owner"
        demote = {"room_id": 1, "user_id": c.alice1.user_id, "role": "member"}
        assert await refused(c.alice1, "room_set_role", **demote) == "last_owner"
        await c.alice1.client.request("room_set_role", room_id=1, user_id=bob, role="owner")
        assert (await c.alice1.client.request("room_leave", room_id=1))["type"] == "ok"
        seen = [e["type"] for e in events(await entries(c.bob, 7))]
        assert seen == ["joined", "joined", "role", "topic", "removed", "role", "left"]
        assert (await c.bob.client.request("room_delete", room_id=1))["type"] == "ok"
        [event] = events(await entries(c.bob, 1))
        assert event["type"] == "deleted" and event["by_user_id"] == bob
        assert await refused(c.bob, "room_members", room_id=1) == "room_not_found"
        assert (await c.bob.client.request("list_rooms"))["channels"] == []


async def test_the_last_member_leaving_deletes_the_room_and_its_ranges_are_swept(
    short_tmp: Path,
) -> None:
    async with crew(short_tmp) as c:
        group = await create(c.carol, "alone", kind="group")
        assert (await c.carol.client.request("room_leave", room_id=group["room_id"]))["type"] == (
            "ok"
        )
        got = events(await entries(c.carol, 2))
        assert [e["type"] for e in got] == ["created", "deleted"]
        await settle(c.srv)
        assert await count(c.srv, "SELECT count(*) FROM rooms") == 0
        await run_jobs(c.srv, "rooms")
        assert await count(c.srv, "SELECT count(*) FROM room_log") == 0
        assert await count(c.srv, "SELECT count(*) FROM room_devices") == 0


async def test_an_invitation_reaches_the_invitees_live_connection_and_can_be_declined(
    short_tmp: Path,
) -> None:
    async with crew(short_tmp) as c:
        await create(c.alice1, "squad", kind="group")
        await c.alice1.client.request("room_invite", room_id=1, user_id=c.carol.user_id)
        push = await next_push(c.carol, "room_invited")
        assert push["by_user_id"] == c.alice1.user_id and push["room"]["name"] == "squad"
        assert "role" not in push["room"]
        again = await c.alice1.client.request("room_invite", room_id=1, user_id=c.carol.user_id)
        assert again["type"] == "ok"  # invited already: nothing changes
        members = await c.alice1.client.request("room_members", room_id=1)
        assert members["invited"] == [c.carol.user_id]
        assert (await c.carol.client.request("room_leave", room_id=1))["type"] == "ok"
        assert (await c.carol.client.request("list_rooms"))["invited"] == []
        assert await refused(c.carol, "room_join", room_id=1) == "room_not_found"
        seen = [e["type"] for e in events(await entries(c.alice2, 3))]
        assert seen == ["created", "invited", "declined"]
        assert await refused(c.alice1, "room_invite", room_id=1, user_id=999) == "user_not_found"
        assert await refused(c.alice1, "room_invite", room_id=1, user_id=c.alice1.user_id) == (
            "already_member"
        )


async def next_push(device: Device, frame_type: str) -> dict[str, Any]:
    client = device.client
    with trio.fail_after(10):
        while True:
            for n, frame in enumerate(client.skipped):
                if frame["type"] == frame_type:
                    return client.skipped.pop(n)
            frame = json.loads(await client.ws.get_message())
            if frame["type"] == frame_type:
                return frame  # type: ignore[no-any-return]
            client.skipped.append(frame)


@pytest.mark.parametrize(
    ("frame", "field"),
    [
        ({"type": "room_create", "name": "", "kind": "channel"}, "$.name"),
        ({"type": "room_create", "name": "x" * 65, "kind": "channel"}, "$.name"),
        ({"type": "room_create", "name": "x", "kind": "lobby"}, "$.kind"),
        ({"type": "room_create", "name": "x", "kind": "group", "topic": "t" * 513}, "$.topic"),
        ({"type": "room_join", "room_id": 0}, "$.room_id"),
        ({"type": "room_join", "room_id": 2**63}, "$.room_id"),
        ({"type": "room_join", "room_id": "1"}, "$.room_id"),
        ({"type": "room_join"}, None),
        ({"type": "room_set_role", "room_id": 1, "user_id": 2, "role": "admin"}, "$.role"),
        (
            {"type": "room_send", "room_id": 1, "message_id": "x", "epoch": 0, "ciphertext": "c"},
            "$.message_id",
        ),
        (
            {
                "type": "room_send",
                "room_id": 1,
                "message_id": str(uuid.uuid4()),
                "epoch": -1,
                "ciphertext": "c",
            },
            "$.epoch",
        ),
        (
            {
                "type": "room_send",
                "room_id": 1,
                "message_id": str(uuid.uuid4()),
                "epoch": 0,
                "ciphertext": "",
            },
            "$.ciphertext",
        ),
        ({"type": "room_members", "room_id": 1, "extra": True}, None),
    ],
)
async def test_a_bad_room_frame_is_refused_with_its_field_and_changes_nothing(
    short_tmp: Path, frame: dict[str, Any], field: str | None
) -> None:
    async with crew(short_tmp) as c:
        room = await create(c.alice1)
        reply = await c.alice1.client.request(
            frame["type"], **{k: v for k, v in frame.items() if k != "type"}
        )
        assert reply["type"] == "error" and reply["code"] == "bad_frame", reply
        if field is not None:
            assert reply["field"] == field
        after = await c.alice1.client.request("list_rooms")
        assert after["joined"] == [room]
        await settle(c.srv)
        assert await count(c.srv, "SELECT count(*) FROM rooms") == 1
        assert await count(c.srv, "SELECT count(*) FROM room_log WHERE kind = 'room_message'") == 0


async def test_room_requests_need_a_session_and_a_device(short_tmp: Path) -> None:
    async with crew(short_tmp) as c, connect(c.srv) as anonymous:
        reply = await anonymous.request("room_create", name="x", kind="channel")
        assert reply["code"] == "auth_required"
        assert (await anonymous.request("list_rooms"))["code"] == "auth_required"
        assert await count(c.srv, "SELECT count(*) FROM rooms") == 0


async def test_rooms_and_members_are_capped(short_tmp: Path) -> None:
    async with crew(short_tmp, rooms=RoomSettings(max_members=2, max_rooms=2)) as c:
        await create(c.alice1, "one")
        await create(c.alice1, "two")
        assert await refused(c.bob, "room_create", name="three", kind="channel") == (
            "too_many_rooms"
        )
        await c.bob.client.request("room_join", room_id=1)
        assert await refused(c.carol, "room_join", room_id=1) == "room_full"
        assert await refused(c.alice1, "room_invite", room_id=1, user_id=c.carol.user_id) == (
            "room_full"
        )


async def test_membership_of_one_room_gives_nothing_in_another(short_tmp: Path) -> None:
    """Bob is a member of #general; that lets him do nothing in Alice's group,
    whatever room id, epoch or device he tries, and nothing of it reaches him."""
    async with crew(short_tmp) as c:
        general = await create(c.alice1)
        joined = await c.bob.client.request("room_join", room_id=general["room_id"])
        group = await create(c.alice1, "board", kind="group")
        await c.alice1.client.request("room_invite", room_id=group["room_id"], user_id=3)
        await c.carol.client.request("room_join", room_id=group["room_id"])
        members = await c.alice1.client.request("room_members", room_id=group["room_id"])
        for epoch in (joined["room"]["epoch"], members["epoch"]):
            fields = send_fields(group["room_id"], epoch)
            assert await refused(c.bob, "room_send", **fields) == "room_not_found"
        assert await refused(c.bob, "room_members", room_id=group["room_id"]) == "room_not_found"
        assert await refused(c.bob, "room_join", room_id=group["room_id"]) == "room_not_found"
        listing = await c.bob.client.request("list_rooms")
        assert [r["room_id"] for r in listing["joined"]] == [general["room_id"]]
        assert listing["channels"] == listing["invited"] == []
        # Bob's second device is a member device of #general only.
        async with connect(c.srv) as phone:
            bob2 = await login_device(phone, "bob", BOB_PASSWORD)
            await bob2.publish(1)
            assert await refused(bob2, "room_members", room_id=group["room_id"]) == (
                "room_not_found"
            )
            sent = await room_send(c.alice1, group["room_id"], members["epoch"], "board only")
            assert sent["envelopes"] == 2  # alice2 and carol
            await settle(c.srv)
            for device in (c.bob, bob2):
                queued = await queue_of(c.srv, device)
                assert {e.room_id for e in queued if e.room_id is not None} <= {1}
