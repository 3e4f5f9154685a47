"""Store-and-forward over the real relay: Alice with two devices, Bob with one.

The ciphertexts here are opaque strings: the server must neither read nor
care what they hold (the client library's Olm encryption is tested apart).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from chatd.config import DeviceSettings, RetentionSettings
from chatd.retention import Retention, queue_jobs
from chatd.store import now_ms

from .test_keys import BOB_PASSWORD, Device, login_device, team
from .test_relay import relay_tasks
from .test_relay_auth import PASSWORD, Client, Server, connect, create_once


class Cast:
    """Alice on two devices, Bob on one, all with published keys."""

    def __init__(self, srv: Server, alice1: Device, alice2: Device, bob: Device) -> None:
        self.srv = srv
        self.alice1, self.alice2, self.bob = alice1, alice2, bob

    def to_everyone(self, sender: Device, text: str) -> list[dict[str, Any]]:
        return [
            {
                "user_id": d.user_id,
                "device_id": d.device_id,
                "ciphertext": f"{text} for {d.device_id}",
            }
            for d in (self.alice1, self.alice2, self.bob)
            if d is not sender
        ]


@asynccontextmanager
async def cast(
    short_tmp: Path, devices: DeviceSettings | None = None, relay: dict[str, Any] | None = None
) -> AsyncIterator[Cast]:
    async with team(short_tmp, devices=devices, relay=relay) as srv, AsyncExitStack() as stack:
        people = []
        for username, password in (("alice", PASSWORD), ("alice", PASSWORD), ("bob", BOB_PASSWORD)):
            client = await stack.enter_async_context(connect(srv))
            device = await login_device(client, username, password)
            await device.publish(5)
            people.append(device)
        yield Cast(srv, *people)


async def next_frame(c: Client, frame_type: str) -> dict[str, Any]:
    with trio.fail_after(10):
        while True:
            frame = json.loads(await c.ws.get_message())
            if frame["type"] == frame_type:
                return frame  # type: ignore[no-any-return]


async def replies_with_ids(ws: Any, count: int) -> list[dict[str, Any]]:
    """The next ``count`` frames that answer a request (pushes are skipped)."""
    replies: list[dict[str, Any]] = []
    with trio.fail_after(10):
        while len(replies) < count:
            frame = json.loads(await ws.get_message())
            if frame.get("id") is not None:
                replies.append(frame)
    return replies


async def send(
    sender: Device, envelopes: list[dict[str, Any]], message_id: str | None = None
) -> dict[str, Any]:
    return await sender.client.request(
        "send", message_id=message_id or str(uuid.uuid4()), envelopes=envelopes
    )


async def assert_queue_totals_exact(c: Cast) -> None:
    """The running totals the triggers keep match the envelopes table."""

    def read(conn: Any) -> tuple[set[Any], set[Any], int]:
        kept = set(
            conn.execute(
                "SELECT device_id, envelopes, bytes FROM queue_totals"
                " WHERE envelopes != 0 OR bytes != 0"
            )
        )
        real = set(
            conn.execute(
                "SELECT recipient_device_id, count(*), coalesce(sum(length(ciphertext)), 0)"
                " FROM envelopes GROUP BY recipient_device_id"
            )
        )
        rows = conn.execute("SELECT count(*) FROM queue_totals").fetchone()[0]
        return kept, real, rows

    kept, real, rows = await c.srv.store.read(read)
    assert kept == real
    assert rows <= 3  # one row per device at most, removed with the device


async def test_a_message_reaches_online_devices_and_the_sender_learns_it_was_delivered(
    short_tmp: Path,
) -> None:
    async with cast(short_tmp) as c:
        message_id = str(uuid.uuid4())
        sent = await send(c.alice1, c.to_everyone(c.alice1, "hi"), message_id)
        assert sent == {"type": "sent", "id": sent["id"], "message_id": message_id, "envelopes": 2}
        delivered = await next_frame(c.bob.client, "deliver")
        [envelope] = delivered["envelopes"]
        assert envelope["kind"] == "message" and envelope["message_id"] == message_id
        assert envelope["ciphertext"] == f"hi for {c.bob.device_id}"
        assert envelope["sender_user_id"] == c.alice1.user_id
        assert envelope["sender_device_id"] == c.alice1.device_id
        # Alice's other device gets her own message too.
        mine = await next_frame(c.alice2.client, "deliver")
        assert mine["envelopes"][0]["message_id"] == message_id
        await c.bob.client.request("ack", up_to=envelope["envelope_id"])
        receipt = await next_frame(c.alice1.client, "deliver")
        assert receipt["envelopes"][0] | {"envelope_id": 0, "sent_at": 0} == {
            "envelope_id": 0,
            "sent_at": 0,
            "kind": "delivered",
            "message_id": message_id,
            "device_id": c.bob.device_id,
        }
        # Idle again, each connection is down to its one task: no pump, sender
        # or responder is left running (memory per idle connection).
        await trio.testing.wait_all_tasks_blocked()
        per_connection, others = relay_tasks(c.srv.relay)
        assert per_connection == [1, 1, 1]
        assert set(others) <= {"revalidate_forever", "flush_presence_forever"}
        await assert_queue_totals_exact(c)


async def test_an_offline_device_gets_its_queue_in_order_when_it_comes_back(
    short_tmp: Path,
) -> None:
    async with cast(short_tmp) as c:
        bob_device = c.bob.device_id
        await c.bob.client.ws.aclose()  # Bob goes offline
        ids = []
        for n in range(5):
            sent = await send(c.alice1, c.to_everyone(c.alice1, f"msg{n}"))
            ids.append(sent["message_id"])
        async with connect(c.srv) as again:
            session = await again.login("bob", BOB_PASSWORD, device_id=bob_device)
            assert session["device_id"] == bob_device
            delivered = await next_frame(again, "deliver")
            got = [e["message_id"] for e in delivered["envelopes"]]
            assert got == ids
            await again.request("ack", up_to=delivered["envelopes"][-1]["envelope_id"])
        async with connect(c.srv) as later:
            await later.login("bob", BOB_PASSWORD, device_id=bob_device)
            await later.request("list_sessions")  # a round trip: no deliver came first
        rows = await c.srv.store.read(
            lambda conn: conn.execute(
                "SELECT count(*) FROM envelopes WHERE recipient_device_id = ?", (bob_device,)
            ).fetchone()[0]
        )
        assert rows == 0  # acknowledged means deleted


async def test_a_send_must_name_exactly_the_current_devices(short_tmp: Path) -> None:
    async with cast(short_tmp) as c:
        only_bob = [e for e in c.to_everyone(c.alice1, "x") if e["user_id"] == c.bob.user_id]
        mismatch = await send(c.alice1, only_bob)
        assert mismatch["type"] == "device_mismatch"
        assert mismatch["missing"] == [
            {"user_id": c.alice2.user_id, "device_id": c.alice2.device_id}
        ]
        assert mismatch["stale"] == []
        stale = c.to_everyone(c.alice1, "x") + [
            {"user_id": c.bob.user_id, "device_id": "ZZZZZZZZ", "ciphertext": "x"}
        ]
        mismatch = await send(c.alice1, stale)
        assert mismatch["stale"] == [{"user_id": c.bob.user_id, "device_id": "ZZZZZZZZ"}]
        count = await c.srv.store.read(
            lambda conn: conn.execute("SELECT count(*) FROM envelopes").fetchone()[0]
        )
        assert count == 0  # nothing was queued


async def test_resending_a_message_id_queues_nothing_twice(short_tmp: Path) -> None:
    async with cast(short_tmp) as c:
        message_id = str(uuid.uuid4())
        first = await send(c.alice1, c.to_everyone(c.alice1, "once"), message_id)
        again = await send(c.alice1, c.to_everyone(c.alice1, "once"), message_id)
        assert {k: v for k, v in first.items() if k != "id"} == {
            k: v for k, v in again.items() if k != "id"
        }
        count = await c.srv.store.read(
            lambda conn: conn.execute(
                "SELECT count(*) FROM envelopes WHERE message_id = ?", (message_id,)
            ).fetchone()[0]
        )
        assert count == 2


async def test_a_full_queue_refuses_the_whole_send(short_tmp: Path) -> None:
    async with cast(short_tmp, DeviceSettings(max_queued_envelopes=2)) as c:
        await c.bob.client.ws.aclose()
        for _ in range(2):
            assert (await send(c.alice1, c.to_everyone(c.alice1, "fill")))["type"] == "sent"
        refused = await send(c.alice1, c.to_everyone(c.alice1, "one too many"))
        assert refused["code"] == "queue_full" and c.bob.device_id in refused["message"]
        count = await c.srv.store.read(
            lambda conn: conn.execute(
                "SELECT count(*) FROM envelopes WHERE recipient_device_id = ?",
                (c.alice2.device_id,),
            ).fetchone()[0]
        )
        assert count <= 2  # alice2 got nothing from the refused send
        await assert_queue_totals_exact(c)


async def test_undelivered_messages_expire_and_the_sender_is_told(short_tmp: Path) -> None:
    async with cast(short_tmp) as c:
        await c.bob.client.ws.aclose()
        sent = await send(c.alice1, c.to_everyone(c.alice1, "too late"))
        await c.srv.store.write(
            lambda conn: conn.execute("UPDATE envelopes SET expires_at = ?", (now_ms() - 1,))
        )
        jobs = queue_jobs(DeviceSettings(), c.srv.queues)
        retention = Retention(c.srv.store, RetentionSettings(), jobs)
        reports = await retention.run_now(["envelopes"])
        assert reports[0].rows_purged == 2
        async with connect(c.srv) as again:
            await again.login(device_id=c.alice1.device_id)
            notice = await next_frame(again, "deliver")
            kinds = {(e["kind"], e.get("device_id")) for e in notice["envelopes"]}
            assert ("expired", c.bob.device_id) in kinds
            assert {e["message_id"] for e in notice["envelopes"]} == {sent["message_id"]}
        await assert_queue_totals_exact(c)


async def test_nothing_acknowledged_is_lost_when_the_server_stops(short_tmp: Path) -> None:
    async with cast(short_tmp) as c:
        await c.bob.client.ws.aclose()
        sent = await send(c.alice1, c.to_everyone(c.alice1, "durable"))
        bob = c.bob.device_id
    # The whole server (store included) is gone; start it again on the same files.
    async with team(short_tmp) as srv, connect(srv) as again:
        await again.login("bob", BOB_PASSWORD, device_id=bob)
        delivered = await next_frame(again, "deliver")
        assert [e["message_id"] for e in delivered["envelopes"]] == [sent["message_id"]]


async def test_the_database_files_hold_no_message_text(short_tmp: Path) -> None:
    marker = "PLAINTEXT-MARKER-4f1c"
    async with cast(short_tmp) as c:
        await c.bob.client.ws.aclose()
        await send(c.alice1, c.to_everyone(c.alice1, marker))
        files = [p for p in short_tmp.iterdir() if p.name.startswith("c.db")]
        assert files
        for path in files:
            assert marker.encode() not in path.read_bytes(), path.name


async def test_typing_and_presence_are_relayed_and_never_stored(short_tmp: Path) -> None:
    async with cast(short_tmp) as c:
        online = await c.alice1.client.request("who_is_online")
        assert online["online"] == sorted({c.alice1.user_id, c.bob.user_id})
        await c.bob.client.ws.send_message(
            json.dumps({"type": "typing", "to_user_id": c.alice1.user_id, "active": True})
        )
        for device in (c.alice1, c.alice2):  # every online device of Alice
            notice = await next_frame(device.client, "typing_notice")
            assert notice == {"type": "typing_notice", "user_id": c.bob.user_id, "active": True}
        await c.bob.client.ws.aclose()
        change = await next_frame(c.alice1.client, "presence")
        assert change == {"type": "presence", "online": [], "offline": [c.bob.user_id]}
        tables = await c.srv.store.read(
            lambda conn: [r[0] for r in conn.execute("SELECT name FROM sqlite_master")]
        )
        assert not any("typing" in t or "presence" in t for t in tables)


async def test_removing_a_device_ends_it_and_peers_see_the_change(short_tmp: Path) -> None:
    async with cast(short_tmp) as c:
        before = await c.bob.client.request("directory")
        own = await c.alice2.client.request("remove_device", device_id=c.alice2.device_id)
        assert own["code"] == "use_logout"
        ok = await c.alice2.client.request("remove_device", device_id=c.alice1.device_id)
        assert ok["type"] == "ok"
        with trio.fail_after(10):
            while True:
                try:
                    await c.alice1.client.ws.get_message()
                except Exception as exc:  # ConnectionClosed
                    assert exc.reason.code == 4003  # type: ignore[attr-defined]
                    break
        after = await c.bob.client.request("directory")
        alice_before = next(m for m in before["members"] if m["user_id"] == c.alice1.user_id)
        alice_after = next(m for m in after["members"] if m["user_id"] == c.alice1.user_id)
        assert [d["device_id"] for d in alice_after["devices"]] == [c.alice2.device_id]
        assert alice_after["device_list_version"] > alice_before["device_list_version"]
        old_list = await send(c.bob, c.to_everyone(c.bob, "hi"))
        assert old_list["type"] == "device_mismatch"
        assert old_list["stale"] == [{"user_id": c.alice1.user_id, "device_id": c.alice1.device_id}]
        assert (
            await c.bob.client.request(
                "keys_claim",
                devices=[{"user_id": c.alice1.user_id, "device_id": c.alice1.device_id}],
            )
        )["keys"] == []
        await assert_queue_totals_exact(c)  # the removed device's row went with it


async def test_an_expired_receipt_reaches_the_senders_live_connection(short_tmp: Path) -> None:
    async with cast(short_tmp) as c:
        await c.bob.client.ws.aclose()
        sent = await send(c.alice1, c.to_everyone(c.alice1, "late"))
        mine = await next_frame(c.alice2.client, "deliver")  # alice2 got her copy...
        await c.alice2.client.request("ack", up_to=mine["envelopes"][-1]["envelope_id"])
        await next_frame(c.alice1.client, "deliver")  # ...and alice1 the delivered receipt
        await c.srv.store.write(
            lambda conn: conn.execute("UPDATE envelopes SET expires_at = ?", (now_ms() - 1,))
        )
        queues = c.srv.queues
        retention = Retention(
            c.srv.store, RetentionSettings(), queue_jobs(DeviceSettings(), queues)
        )
        await retention.run_now(["envelopes"])
        receipt = await next_frame(c.alice1.client, "deliver")
        kinds = [(e["kind"], e["message_id"], e.get("device_id")) for e in receipt["envelopes"]]
        assert ("expired", sent["message_id"], c.bob.device_id) in kinds


async def test_an_ack_beyond_what_was_delivered_deletes_nothing_unseen(short_tmp: Path) -> None:
    async with cast(short_tmp) as c:
        await c.alice2.client.ws.aclose()  # offline: its queue grows unseen
        await send(c.alice1, c.to_everyone(c.alice1, "unseen"))
        await next_frame(c.bob.client, "deliver")
        # Bob's connection acknowledges far beyond anything it was sent.
        assert (await c.bob.client.request("ack", up_to=10**12))["type"] == "ok"
        left = await c.srv.store.read(
            lambda conn: conn.execute(
                "SELECT count(*) FROM envelopes WHERE recipient_device_id = ?",
                (c.alice2.device_id,),
            ).fetchone()[0]
        )
        assert left == 1


async def test_pipelined_sends_commit_together_and_are_answered_in_order(
    short_tmp: Path,
) -> None:
    """A client may write many sends without waiting: the connection reads on,
    their writes share commits, and the replies (refusals included) come back
    in the order the requests came, before the reply to a later request."""
    async with cast(short_tmp, DeviceSettings(max_queued_envelopes=30)) as c:
        await c.bob.client.ws.aclose()  # Bob's queue fills up at 30
        stats = c.srv.store.stats
        commits_before = stats.commits
        message_ids = [str(uuid.uuid4()) for _ in range(40)]
        ws = c.alice1.client.ws
        for n, message_id in enumerate(message_ids):
            envelopes = c.to_everyone(c.alice1, f"p{n}")
            frame = {"type": "send", "id": f"s{n}", "message_id": message_id}
            await ws.send_message(json.dumps(frame | {"envelopes": envelopes}))
        await ws.send_message(json.dumps({"type": "directory", "id": "after"}))
        replies = await replies_with_ids(ws, 41)
        assert [r["id"] for r in replies] == [f"s{n}" for n in range(40)] + ["after"]
        assert [r["type"] for r in replies[:30]] == ["sent"] * 30
        assert {r["code"] for r in replies[30:40]} == {"queue_full"}
        assert replies[40]["type"] == "members"
        assert stats.commits - commits_before < 40  # sends shared commits
        # Answered, the responder is gone (idle connections keep no task); a
        # later send starts another.
        assert all(conn.waiting_answers == 0 for conn in c.srv.relay.connections)
        more = await send(c.alice1, c.to_everyone(c.alice1, "later"))
        assert more["code"] == "queue_full"  # Bob's queue is still full, and it says so
        queued = await c.srv.store.read(
            lambda conn: [
                row[0]
                for row in conn.execute(
                    "SELECT message_id FROM envelopes WHERE recipient_device_id = ? ORDER BY id",
                    (c.bob.device_id,),
                )
            ]
        )
        assert queued == message_ids[:30]  # in the order they were sent, nothing twice


async def test_a_caught_up_device_gets_new_envelopes_straight_from_their_commit(
    short_tmp: Path,
) -> None:
    """Once a connection has read its queue to the end, envelopes committed
    later are pushed from the commit itself: no read of the table, in order."""
    async with cast(short_tmp) as c:
        queues = c.srv.queues
        reads = 0
        read = queues.read

        def counted(*args: Any) -> None:
            nonlocal reads
            reads += 1
            read(*args)

        queues.read = counted  # type: ignore[method-assign]
        ids = []
        for n in range(20):
            ids.append((await send(c.alice1, c.to_everyone(c.alice1, f"m{n}")))["message_id"])
        got: list[str] = []
        envelope_ids: list[int] = []
        while len(got) < 20:
            frame = await next_frame(c.bob.client, "deliver")
            got += [e["message_id"] for e in frame["envelopes"]]
            envelope_ids += [e["envelope_id"] for e in frame["envelopes"]]
        assert got == ids and envelope_ids == sorted(envelope_ids)
        assert reads == 0  # bob and alice2 were caught up: nothing was read back
        await c.bob.client.request("ack", up_to=envelope_ids[-1])
        receipts = 0
        while receipts < 20:  # alice1's delivered receipts come the same way
            frame = await next_frame(c.alice1.client, "deliver")
            receipts += sum(e["kind"] == "delivered" for e in frame["envelopes"])
        assert reads == 0


async def test_a_full_delivery_window_falls_back_to_reading_the_queue_in_order(
    short_tmp: Path, monkeypatch: Any
) -> None:
    """Past the window of unacknowledged envelopes nothing more is pushed; after
    the ack the rest comes from the table, in order, none twice, none skipped."""
    from chatd.protocol import delivery

    monkeypatch.setattr(delivery, "DELIVERY_WINDOW", 4)
    async with cast(short_tmp) as c:
        ids = [
            (await send(c.alice1, c.to_everyone(c.alice1, f"w{n}")))["message_id"]
            for n in range(10)
        ]
        got: list[dict[str, Any]] = []
        while len(got) < 4:
            got += (await next_frame(c.bob.client, "deliver"))["envelopes"]
        assert len(got) == 4  # the window is full
        while len(got) < 10:
            await c.bob.client.request("ack", up_to=got[-1]["envelope_id"])
            got += (await next_frame(c.bob.client, "deliver"))["envelopes"]
        assert [e["message_id"] for e in got] == ids


def test_deliver_frames_hold_at_most_100_envelopes_and_about_256_kib() -> None:
    from chatd.protocol import frames as f
    from chatd.protocol.delivery import DELIVER_BYTES, deliver_batches

    def env(n: int, size: int) -> f.Envelope:
        return f.Envelope(
            envelope_id=n, kind="message", message_id="m", sent_at=0, ciphertext="x" * size
        )

    small = [env(n, 10) for n in range(1, 251)]
    assert [len(b) for b in deliver_batches(small)] == [100, 100, 50]
    assert [e for b in deliver_batches(small) for e in b] == small
    big = [env(n, DELIVER_BYTES // 2 + 1) for n in range(1, 4)]
    assert [len(b) for b in deliver_batches(big)] == [1, 1, 1]  # never empty, never over
    huge = [env(1, DELIVER_BYTES * 2), env(2, 10)]
    assert [len(b) for b in deliver_batches(huge)] == [1, 1]
    assert deliver_batches([]) == []


async def test_a_bad_frame_after_pipelined_sends_is_answered_after_them(
    short_tmp: Path,
) -> None:
    """Replies keep request order even when a malformed frame follows a burst
    of sends: the error comes last, and every send before it was queued."""
    async with cast(short_tmp) as c:
        ws = c.alice1.client.ws
        message_ids = [str(uuid.uuid4()) for _ in range(5)]
        for n, message_id in enumerate(message_ids):
            frame = {"type": "send", "id": f"s{n}", "message_id": message_id}
            await ws.send_message(json.dumps(frame | {"envelopes": c.to_everyone(c.alice1, "x")}))
        await ws.send_message('{"type": "send", "id": "bad", "message_id": 7}')
        replies = await replies_with_ids(ws, 6)
        assert [r["id"] for r in replies] == [f"s{n}" for n in range(5)] + ["bad"]
        assert {r["type"] for r in replies[:5]} == {"sent"}
        assert replies[5]["type"] == "error" and replies[5]["code"] == "bad_frame"
        got: list[str] = []
        while len(got) < 5:
            got += [
                e["message_id"] for e in (await next_frame(c.bob.client, "deliver"))["envelopes"]
            ]
        assert got == message_ids


async def test_queue_totals_follow_a_rolled_back_job_and_cap_bytes(short_tmp: Path) -> None:
    """A write that fails after queuing leaves the totals as they were, and the
    byte cap is checked against them."""
    async with cast(short_tmp, DeviceSettings(max_queued_bytes=1_024)) as c:
        await c.bob.client.ws.aclose()
        bob = c.bob.device_id

        def queue_then_fail(conn: Any) -> None:
            conn.execute(
                "INSERT INTO envelopes (recipient_device_id, kind, message_id, ciphertext,"
                " sent_at, expires_at) VALUES (?, 'message', 'm', ?, 1, 2)",
                (bob, b"x" * 500),
            )
            raise ValueError("the job fails after its insert")

        with pytest.raises(ValueError, match="after its insert"):
            await c.srv.store.write(queue_then_fail)
        await assert_queue_totals_exact(c)
        big = "y" * 600
        envelopes = [e | {"ciphertext": big} for e in c.to_everyone(c.alice1, "")]
        assert (await send(c.alice1, envelopes))["type"] == "sent"
        refused = await send(c.alice1, envelopes)  # 1,200 bytes would be over 1,024
        assert refused["code"] == "queue_full"
        await assert_queue_totals_exact(c)


# -- the rebuilt relay: presence scope, delivery before the commit, failures ----------------


async def frames_until(c: Client, frame_type: str, seconds: float) -> list[dict[str, Any]]:
    """Every frame read for ``seconds`` (stopping early at one of ``frame_type``)."""
    seen: list[dict[str, Any]] = []
    with trio.move_on_after(seconds):
        while True:
            frame = json.loads(await c.ws.get_message())
            seen.append(frame)
            if frame["type"] == frame_type:
                break
    return seen


async def test_presence_reaches_only_those_who_share_a_conversation_or_ask(
    short_tmp: Path,
) -> None:
    """A login is not announced to everyone online: only to connections that
    exchanged messages or typing notices with the user, or named them in
    who_is_online. Everyone may still ask who is online."""
    async with cast(short_tmp) as c:
        await create_once(c.srv.admin, "carol", PASSWORD)
        # Nobody shares anything with carol: her login and logout reach no one.
        async with connect(c.srv) as carol:
            session = await carol.login("carol")
            carol_id = session["user"]["id"]
            everyone = await c.bob.client.request("who_is_online")
            assert carol_id in everyone["online"]
        # Bob asks about carol by id: from then on he hears of her.
        watched = await c.bob.client.request("who_is_online", user_ids=[carol_id, 999])
        assert watched["online"] == []
        async with connect(c.srv) as carol:
            await carol.login("carol")
            change = await next_frame(c.bob.client, "presence")
            assert change == {"type": "presence", "online": [carol_id]}
        change = await next_frame(c.bob.client, "presence")
        assert change == {"type": "presence", "online": [], "offline": [carol_id]}
        # Alice never heard of any of it: her connections got no presence at all.
        for device in (c.alice1, c.alice2):
            seen = await frames_until(device.client, "presence", 0.3)
            assert all(f["type"] != "presence" for f in seen)
        # A message makes sender and recipient watch each other.
        await send(c.alice1, c.to_everyone(c.alice1, "hi"))
        await next_frame(c.bob.client, "deliver")
        await c.bob.client.ws.aclose()
        change = await next_frame(c.alice1.client, "presence")
        assert change["offline"] == [c.bob.user_id]


async def test_who_is_online_refuses_too_many_ids(short_tmp: Path) -> None:
    async with cast(short_tmp) as c:
        refused = await c.bob.client.request("who_is_online", user_ids=list(range(1, 1002)))
        assert (refused["code"], refused["field"]) == ("bad_frame", "$.user_ids")


async def test_an_online_recipient_is_not_kept_waiting_for_the_disk(short_tmp: Path) -> None:
    """With a long ack wait, a message to online devices is delivered and
    acknowledged before anything is written: the acks cancel the inserts, the
    sender gets sent at once, and the receipts follow; the table never holds it."""
    devices = DeviceSettings(ack_wait_ms=1_000)
    async with cast(short_tmp, devices) as c:
        message_id = str(uuid.uuid4())
        envelopes = c.to_everyone(c.alice1, "fast")
        frame = {"type": "send", "id": "fast", "message_id": message_id, "envelopes": envelopes}
        with trio.fail_after(0.9):  # well inside the ack wait
            await c.alice1.client.ws.send_message(json.dumps(frame))
            for device in (c.bob, c.alice2):
                delivered = await next_frame(device.client, "deliver")
                assert [e["message_id"] for e in delivered["envelopes"]] == [message_id]
                up_to = delivered["envelopes"][-1]["envelope_id"]
                await device.client.ws.send_message(json.dumps({"type": "ack", "up_to": up_to}))
            sent: list[dict[str, Any]] = []
            receipts: list[dict[str, Any]] = []
            while not sent or len(receipts) < 2:
                got = json.loads(await c.alice1.client.ws.get_message())
                if got["type"] == "sent":
                    sent.append(got)
                elif got["type"] == "deliver":
                    receipts += got["envelopes"]
            assert [(s["id"], s["envelopes"]) for s in sent] == [("fast", 2)]
            assert {e["kind"] for e in receipts} == {"delivered"}
        rows = await c.srv.store.read(
            lambda conn: conn.execute(
                "SELECT count(*) FROM envelopes WHERE message_id = ?", (message_id,)
            ).fetchone()[0]
        )
        assert rows == 0


async def test_a_device_acknowledging_on_two_connections_makes_one_receipt(
    short_tmp: Path,
) -> None:
    async with cast(short_tmp) as c, connect(c.srv) as again:
        await again.login("bob", BOB_PASSWORD, device_id=c.bob.device_id)
        message_id = (await send(c.alice1, c.to_everyone(c.alice1, "twice")))["message_id"]
        first = await next_frame(c.bob.client, "deliver")
        second = await next_frame(again, "deliver")
        assert first["envelopes"] == second["envelopes"]
        up_to = first["envelopes"][-1]["envelope_id"]
        await c.bob.client.request("ack", up_to=up_to)
        await again.request("ack", up_to=up_to)
        receipts: list[dict[str, Any]] = []
        for frame in await frames_until(c.alice1.client, "never", 0.5):
            if frame["type"] == "deliver":
                receipts += [e for e in frame["envelopes"] if e["kind"] == "delivered"]
        assert [(r["message_id"], r["device_id"]) for r in receipts] == [
            (message_id, c.bob.device_id)
        ]


class FailingWrites:
    """The queue writer's writes fail (and roll back) while ``failing`` is set."""

    def __init__(self, monkeypatch: Any) -> None:
        from chatd.e2ee import writes
        from chatd.errors import StoreError

        self.failing = True
        write = writes.QueueWriter._write

        def flaky(writer: Any, conn: Any) -> Any:
            result = write(writer, conn)
            if self.failing:
                raise StoreError("database or disk is full")
            return result

        monkeypatch.setattr(writes.QueueWriter, "_write", flaky)


async def test_a_failed_write_is_refused_with_storage_unavailable_and_the_connection_stays(
    short_tmp: Path, monkeypatch: Any
) -> None:
    """A write that fails gets an error frame with retry_after (not a closed
    connection); nothing was acknowledged, and the next send goes through."""
    async with cast(short_tmp) as c:
        await c.bob.client.ws.aclose()
        await c.alice2.client.ws.aclose()
        disk = FailingWrites(monkeypatch)
        refused = await send(c.alice1, c.to_everyone(c.alice1, "lost"))
        assert refused["type"] == "error" and refused["code"] == "storage_unavailable"
        assert refused["retry_after"] > 0
        disk.failing = False
        message_id = refused_id = None
        sent = await send(c.alice1, c.to_everyone(c.alice1, "kept"))
        assert sent["type"] == "sent"
        message_id, refused_id = sent["message_id"], refused.get("id")
        assert refused_id is not None
        queued = await c.srv.store.read(
            lambda conn: [r[0] for r in conn.execute("SELECT message_id FROM envelopes")]
        )
        assert set(queued) == {message_id}
        await assert_queue_totals_exact(c)


async def test_acks_without_id_waiting_for_their_write_take_no_room_in_the_send_queue(
    short_tmp: Path, monkeypatch: Any
) -> None:
    """Acks without id keep later answers behind their deletes, but they make
    no frame: many of them waiting on a slow disk do not fill the send queue."""
    from chatd.e2ee import writes

    async with cast(short_tmp, relay={"send_queue_frames": 4}) as c:
        await c.bob.client.ws.aclose()
        for n in range(12):
            await send(c.alice1, c.to_everyone(c.alice1, f"m{n}"))
        write = writes.QueueWriter._write

        def slow(self: Any, conn: Any) -> Any:
            time.sleep(0.05)  # in the writer thread: a slow disk
            return write(self, conn)

        monkeypatch.setattr(writes.QueueWriter, "_write", slow)
        async with connect(c.srv) as again:
            await again.login("bob", BOB_PASSWORD, device_id=c.bob.device_id)
            got: list[dict[str, Any]] = []
            while len(got) < 12:
                got += (await next_frame(again, "deliver"))["envelopes"]
            for envelope in got:  # one ack per envelope, none waited for
                ack = {"type": "ack", "up_to": envelope["envelope_id"]}
                await again.ws.send_message(json.dumps(ack))
            members = await again.request("directory")  # answered after all their writes
            assert members["type"] == "members"
        left = await c.srv.store.read(
            lambda conn: conn.execute(
                "SELECT count(*) FROM envelopes WHERE recipient_device_id = ?", (c.bob.device_id,)
            ).fetchone()[0]
        )
        assert left == 0


async def test_the_sends_row_is_written_only_once_every_envelope_is_safe(short_tmp: Path) -> None:
    """The record that answers a repeat with sent is written only when each
    envelope is durable or acknowledged: a repeat after a crash in between is
    delivered again rather than answered sent with an envelope missing."""
    async with cast(short_tmp, DeviceSettings(ack_wait_ms=10_000)) as c:
        await c.alice2.client.ws.aclose()  # offline: its copy is written at once
        message_id = (await c.alice1.client.request("ping"))["type"] and str(uuid.uuid4())
        frame = {
            "type": "send",
            "id": "both",
            "message_id": message_id,
            "envelopes": c.to_everyone(c.alice1, "x"),
        }
        await c.alice1.client.ws.send_message(json.dumps(frame))
        delivered = await next_frame(c.bob.client, "deliver")  # bob's copy waits for his ack

        def rows(conn: Any) -> tuple[int, int]:
            sends = conn.execute(
                "SELECT count(*) FROM sends WHERE message_id = ?", (message_id,)
            ).fetchone()[0]
            queued = conn.execute(
                "SELECT count(*) FROM envelopes WHERE message_id = ?", (message_id,)
            ).fetchone()[0]
            return sends, queued

        await c.srv.store.write(lambda conn: None)  # the offline copy's write has committed
        assert await c.srv.store.read(rows) == (0, 1)
        up_to = delivered["envelopes"][-1]["envelope_id"]
        await c.bob.client.ws.send_message(json.dumps({"type": "ack", "up_to": up_to}))
        assert (await next_frame(c.alice1.client, "sent"))["id"] == "both"
        await c.srv.store.write(lambda conn: None)  # the row's write went before this one
        assert await c.srv.store.read(rows) == (1, 1)


async def test_a_send_with_skip_full_leaves_out_full_devices_and_names_them(
    short_tmp: Path,
) -> None:
    """Key shares must reach every device that can take them: with skip_full
    a full queue is skipped (and named) instead of refusing the whole send."""
    async with cast(short_tmp, DeviceSettings(max_queued_envelopes=1)) as c:
        await c.bob.client.ws.aclose()
        assert (await send(c.alice1, c.to_everyone(c.alice1, "fill")))["type"] == "sent"
        await next_frame(c.alice2.client, "deliver")  # alice2 is live but never acks
        envelopes = c.to_everyone(c.alice1, "key share")
        plain = await send(c.alice1, envelopes)
        assert plain["code"] == "queue_full"
        message_id = str(uuid.uuid4())
        everyone_full = await c.alice1.client.request(
            "send", message_id=message_id, envelopes=envelopes, skip_full=True
        )
        assert everyone_full["code"] == "queue_full"  # nothing could be queued at all
        async with connect(c.srv) as phone:  # bob's second device has room
            bob2 = await login_device(phone, "bob", BOB_PASSWORD)
            await bob2.publish(1)
            envelopes.append(
                {"user_id": bob2.user_id, "device_id": bob2.device_id, "ciphertext": "for bob2"}
            )
            sent = await c.alice1.client.request(
                "send", message_id=message_id, envelopes=envelopes, skip_full=True
            )
            assert sent["type"] == "sent" and sent["envelopes"] == 1, sent
            assert sent["skipped"] == sorted(
                [
                    {"user_id": c.alice2.user_id, "device_id": c.alice2.device_id},
                    {"user_id": c.bob.user_id, "device_id": c.bob.device_id},
                ],
                key=lambda r: (r["user_id"], r["device_id"]),
            )
            delivered = await next_frame(phone, "deliver")
            assert [e["ciphertext"] for e in delivered["envelopes"]] == ["for bob2"]
        await assert_queue_totals_exact(c)
