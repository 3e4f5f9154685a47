"""The cast against the real daemon: Alice on two devices, Bob on one.

Each scenario starts its own ``chatd serve`` subprocess (tests/test_daemon.py's
helper) on a fresh data dir with a real SQLCipher file, creates alice and bob
over the admin API, and plays the scenario with the real client library:
vodozemac Olm and encrypted client stores. When a scenario ends, every message
text it used is searched for in the server's files, byte for byte (the
database with its ``-wal`` and ``-shm``, the daemon's log), in every value of
the decrypted server database, and in the raw bytes of the clients' stores;
once while the daemon runs and once more after SIGTERM, which must exit 0.

Nothing sleeps: every wait is for a message, a state or a reply, bounded by
``trio.fail_after``. What the server holds is read from its SQLCipher file,
read-only with the key, as ``chatd demo`` does.
"""

from __future__ import annotations

import json
import secrets
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from chatd.client import Client, ReceivedMessage, ServerRefusedError, open_client
from chatd.inspection import ScanReport, open_server_db, scan_database, scan_files

from .conftest import DataDir
from .test_daemon import daemon
from .test_daemon_messaging import PASSWORDS, create_users

WAIT = 15.0  # seconds any one awaited message, state or reply may take
#: Logins without rate limits (the scenarios log in often); no second factor.
RELAXED_AUTH = {
    "require_mfa": "none",
    "login_rate_per_ip": 100_000.0,
    "login_rate_per_account": 100_000.0,
    "rate_burst": 1000,
}


@dataclass
class Cast:
    """The people of one scenario, on one running daemon."""

    url: str
    data_dir: DataDir
    stores: Path  # the clients' stores, outside the server's data dir
    texts: list[str] = field(default_factory=list)  # every text sent, even refused ones
    keys: dict[str, bytes] = field(default_factory=dict)

    @asynccontextmanager
    async def device(self, name: str, **kw: Any) -> AsyncIterator[Client]:
        """Open the device ``user-what`` (a new device the first time, then the same one)."""
        user = name.split("-", 1)[0]
        async with open_client(
            self.url,
            user,
            PASSWORDS[user],
            device_name=name,
            store_path=self.stores / f"{name}.db",
            store_key=self.keys.setdefault(name, secrets.token_bytes(32)),
            backoff_base=0.01,
            **kw,
        ) as client:
            yield client

    async def say(self, sender: Client, to_user_id: int, text: str) -> str:
        self.texts.append(text)
        return await sender.send_text(to_user_id, text)

    async def server_rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Rows from the server's database (read-only; sees every committed write)."""

        def read() -> list[tuple[Any, ...]]:
            with open_server_db(self.data_dir.db, self.data_dir.key) as conn:
                return [tuple(row) for row in conn.execute(sql, params).fetchall()]

        return await trio.to_thread.run_sync(read)

    def find_plaintext(self) -> ScanReport:
        # Each text as UTF-8, and as JSON would escape it to ASCII.
        needles = list(dict.fromkeys(n for t in self.texts for n in (t, json.dumps(t)[1:-1])))
        report = ScanReport()
        scan_files([self.data_dir.path, self.stores], needles, report)
        scan_database(self.data_dir.db, self.data_dir.key, needles, report)
        return report

    async def assert_no_plaintext(self) -> None:
        report = await trio.to_thread.run_sync(self.find_plaintext)
        assert report.found == []
        assert "chatd.db" in report.files and "stderr.log" in report.files
        assert report.values > 0  # the decrypted database was searched too


@asynccontextmanager
async def cast_on_daemon(
    data_dir: DataDir, short_tmp: Path, stores: Path, **devices: Any
) -> AsyncIterator[Cast]:
    """A fresh daemon with alice and bob; ``devices`` are [devices] settings.

    After the scenario: no plaintext anywhere, SIGTERM exits 0, and still none."""
    data_dir.configure(auth=RELAXED_AUTH, devices=devices)
    async with daemon(data_dir, short_tmp) as d:
        await d.wait_notify("READY")
        await create_users(data_dir)
        cast = Cast(d.relay_url(), data_dir, stores)
        yield cast
        assert cast.texts
        await cast.assert_no_plaintext()  # the WAL as the running daemon wrote it
        d.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await d.proc.wait() == 0
    await cast.assert_no_plaintext()


async def next_message(client: Client) -> ReceivedMessage:
    with trio.fail_after(WAIT):
        return await client.messages().receive()


async def wait_delivered(client: Client, *message_ids: str) -> None:
    with trio.fail_after(WAIT):
        for message_id in message_ids:
            await client.wait_state(message_id, "delivered")


async def history_ids(client: Client) -> list[str]:
    return [e.message_id for e in await client.history()]


async def test_an_offline_device_gets_every_message_in_order_when_it_comes_back(
    data_dir: DataDir, short_tmp: Path, tmp_path: Path
) -> None:
    async with cast_on_daemon(data_dir, short_tmp, tmp_path) as cast:
        async with cast.device("bob-phone") as bob:
            bob_id, bob_device = bob.user_id, bob.device_id
        async with cast.device("alice-phone"):
            pass  # her phone has keys now, and goes offline too
        async with cast.device("alice-laptop") as laptop:
            texts = [f"while you were out, note {n}: café at 10 ✓" for n in range(5)]
            sent = [await cast.say(laptop, bob_id, text) for text in texts]
            assert [e.state for e in await laptop.history(bob_id)] == ["sent"] * 5
            async with cast.device("bob-phone") as bob:
                assert bob.device_id == bob_device  # the same device logged in again
                got = [await next_message(bob) for _ in texts]
                assert [(m.message_id, m.text, m.sender_device_id) for m in got] == [
                    (message_id, text, laptop.device_id)
                    for message_id, text in zip(sent, texts, strict=True)
                ]
                await wait_delivered(laptop, *sent)
                assert [(e.message_id, e.state) for e in await bob.history()] == [
                    (message_id, "received") for message_id in sent
                ]
            # Her phone was offline as well: it gets her copies, in order.
            async with cast.device("alice-phone") as phone:
                copies = [await next_message(phone) for _ in texts]
                assert [(m.message_id, m.text, m.outgoing, m.peer_user_id) for m in copies] == [
                    (message_id, text, True, bob_id)
                    for message_id, text in zip(sent, texts, strict=True)
                ]
            assert [e.state for e in await laptop.history(bob_id)] == ["delivered"] * 5


async def test_a_device_added_mid_conversation_gets_what_follows_and_shows_unverified(
    data_dir: DataDir, short_tmp: Path, tmp_path: Path
) -> None:
    async with (
        cast_on_daemon(data_dir, short_tmp, tmp_path) as cast,
        cast.device("alice-laptop") as laptop,
        cast.device("bob-phone") as bob,
    ):
        await bob.directory()
        await bob.verify_device(laptop.user_id, laptop.device_id, laptop.fingerprint)
        first = await cast.say(laptop, bob.user_id, "Lunch at noon? — Alice")
        assert (await next_message(bob)).message_id == first
        reply = await cast.say(bob, laptop.user_id, "Noon works, the usual place ☕")
        assert (await next_message(laptop)).message_id == reply
        async with cast.device("alice-phone") as phone:
            # Bob's client still knows only the laptop: the server answers
            # device_mismatch, the client refreshes its directory and retries.
            text = "Running five minutes late, sorry ⏱"
            late = await cast.say(bob, laptop.user_id, text)
            for alice in (laptop, phone):
                got = await next_message(alice)
                assert (got.message_id, got.text, got.sender_device_id) == (
                    late,
                    text,
                    bob.device_id,
                )
            await wait_delivered(bob, late)
            alices = {
                d.device_id: d.verified for d in await bob.devices() if d.user_id == laptop.user_id
            }
            assert alices == {laptop.device_id: True, phone.device_id: False}
            # The laptop's directory predates the phone too: its reply reaches
            # the phone as a copy.
            answer = await cast.say(laptop, bob.user_id, "No problem, I'll grab a table")
            got = await next_message(bob)
            assert (got.message_id, got.sender_verified) == (answer, True)
            copy = await next_message(phone)
            assert (copy.message_id, copy.outgoing) == (answer, True)
            # What the new phone says reaches Bob marked as from an unverified device.
            hello = await cast.say(phone, bob.user_id, "Hi from my new phone 📱")
            got = await next_message(bob)
            assert (got.message_id, got.sender_device_id, got.sender_verified) == (
                hello,
                phone.device_id,
                False,
            )
            assert (await next_message(laptop)).message_id == hello
            await wait_delivered(laptop, first, answer)
            await wait_delivered(phone, hello)
            # Nothing was lost: the phone holds everything since it joined.
            assert await history_ids(phone) == [late, answer, hello]
            assert await history_ids(laptop) == [first, reply, late, answer, hello]
            assert await history_ids(bob) == [first, reply, late, answer, hello]


async def fallback_key(cast: Cast, device_id: str) -> tuple[Any, ...]:
    [row] = await cast.server_rows(
        "SELECT key_id, curve25519, used_at FROM fallback_keys WHERE device_id = ?", device_id
    )
    return row


async def unclaimed_keys(cast: Cast, device_id: str) -> int:
    [(count,)] = await cast.server_rows(
        "SELECT count(*) FROM one_time_keys WHERE device_id = ? AND claimed_at IS NULL", device_id
    )
    return int(count)


async def test_when_one_time_keys_run_out_the_fallback_key_opens_channels_and_is_replaced(
    data_dir: DataDir, short_tmp: Path, tmp_path: Path
) -> None:
    # Bob keeps one one-time key, and the server never asks him for more.
    async with cast_on_daemon(data_dir, short_tmp, tmp_path, one_time_key_threshold=0) as cast:
        async with cast.device("bob-phone", one_time_keys=1) as bob:
            bob_user, bob_device = bob.user_id, bob.device_id
        assert await unclaimed_keys(cast, bob_device) == 1
        published = await fallback_key(cast, bob_device)
        assert published[2] is None  # not handed out yet
        sent: list[tuple[str, str]] = []
        # Bob is offline. The laptop's Olm channel takes his only one-time key...
        async with cast.device("alice-laptop") as laptop:
            text = "First from my laptop (one-time key) 🔑"
            sent.append((await cast.say(laptop, bob_user, text), text))
        assert await unclaimed_keys(cast, bob_device) == 0
        assert await fallback_key(cast, bob_device) == published
        # ...so each new device after it opens its channel with his fallback key.
        for name in ("alice-phone", "alice-tablet"):
            async with cast.device(name) as alice:
                text = f"Hello from {name} (fallback key) 🗝"
                sent.append((await cast.say(alice, bob_user, text), text))
            key_id, curve, used_at = await fallback_key(cast, bob_device)
            assert (key_id, curve) == published[:2] and used_at is not None
        async with cast.device("bob-phone", one_time_keys=1) as bob:
            got = [await next_message(bob) for _ in sent]
            assert [(m.message_id, m.text) for m in got] == sent
            # Bob's client saw its fallback key used and replaced it before
            # handing over the message that used it.
            key_id, curve, used_at = await fallback_key(cast, bob_device)
            assert key_id != published[0] and curve != published[1] and used_at is None
            # A device that comes later still reaches him, and he can answer
            # on a channel that the old fallback key opened.
            async with cast.device("alice-desktop") as desktop:
                text = "And one from the desktop 🖥"
                later = await cast.say(desktop, bob_user, text)
                assert ((await next_message(bob)).message_id, text) == (later, text)
                await wait_delivered(desktop, later)
                answer = await cast.say(bob, desktop.user_id, "Got all four of them ✓")
                assert (await next_message(desktop)).message_id == answer
            assert await history_ids(bob) == [*(m for m, _ in sent), later, answer]
            assert "undecryptable" not in {e.state for e in await bob.history()}


async def test_a_repeated_send_is_answered_sent_and_received_once(
    data_dir: DataDir, short_tmp: Path, tmp_path: Path
) -> None:
    async with cast_on_daemon(data_dir, short_tmp, tmp_path) as cast:
        async with cast.device("bob-phone") as bob:
            bob_user, bob_device = bob.user_id, bob.device_id
        async with cast.device("alice-phone") as phone:
            phone_device = phone.device_id
        async with cast.device("alice-laptop") as laptop:
            frames: list[dict[str, Any]] = []
            conn = laptop.connection
            request = conn.request

            async def recording(frame_type: str, **fields: Any) -> dict[str, Any]:
                if frame_type == "send":
                    frames.append(fields)
                return await request(frame_type, **fields)

            # A spy, not a fake: it keeps the exact send frame to repeat it.
            conn.request = recording  # type: ignore[method-assign]
            first = await cast.say(laptop, bob_user, "Say it once, mean it once ✓")
            [frame] = frames
            assert frame["message_id"] == first
            # As a client would after a lost reply: the same frame again.
            for _ in range(2):
                again = await request("send", **frame)
                assert (again["type"], again["message_id"], again["envelopes"]) == (
                    "sent",
                    first,
                    2,
                )
            queued = await cast.server_rows(
                "SELECT recipient_device_id, count(*) FROM envelopes WHERE message_id = ?"
                " AND kind = 'message' GROUP BY recipient_device_id ORDER BY recipient_device_id",
                first,
            )
            assert queued == sorted([(bob_device, 1), (phone_device, 1)])
            async with cast.device("bob-phone") as bob:
                got = await next_message(bob)
                assert (got.message_id, got.text) == (first, "Say it once, mean it once ✓")
                await wait_delivered(laptop, first)  # Bob's ack is committed
                # Repeated after Bob has it: still "sent", and nothing queued again.
                again = await request("send", **frame)
                assert (again["type"], again["message_id"]) == ("sent", first)
                queued = await cast.server_rows(
                    "SELECT recipient_device_id FROM envelopes WHERE message_id = ?"
                    " AND kind = 'message'",
                    first,
                )
                assert queued == [(phone_device,)]  # only the offline phone's copy
                later = await cast.say(laptop, bob_user, "And this is the next one")
                assert (await next_message(bob)).message_id == later
                assert await history_ids(bob) == [first, later]
        async with cast.device("alice-phone") as phone:
            copies = [await next_message(phone) for _ in range(2)]
            assert [m.message_id for m in copies] == [first, later]
            assert await history_ids(phone) == [first, later]


async def test_a_full_queue_refuses_the_send_naming_the_device_and_loses_nothing(
    data_dir: DataDir, short_tmp: Path, tmp_path: Path
) -> None:
    async with cast_on_daemon(data_dir, short_tmp, tmp_path, max_queued_envelopes=3) as cast:
        async with cast.device("bob-phone") as bob:
            bob_user, bob_device = bob.user_id, bob.device_id
        async with cast.device("alice-laptop") as laptop, cast.device("alice-phone") as phone:
            accepted = []
            for n in range(3):
                accepted.append(await cast.say(laptop, bob_user, f"Queued for Bob, number {n} ✉"))
                # Her phone is online and keeps its own queue empty: it has the
                # copy, and its ack is committed once a later ping is answered.
                assert (await next_message(phone)).message_id == accepted[-1]
                await phone.connection.request("ping")
            refused_text = "This one does not fit in Bob's queue ✗"
            with pytest.raises(ServerRefusedError) as refused:
                await cast.say(laptop, bob_user, refused_text)
            assert refused.value.code == "queue_full"
            assert f"the queue of device {bob_device} is full" in str(refused.value)
            assert phone.device_id not in str(refused.value)
            # Alice can see it never left: it stays "sending" in her history.
            states = {e.text: e.state for e in await laptop.history(bob_user)}
            assert states[refused_text] == "sending"
            async with cast.device("bob-phone") as bob:
                got = [await next_message(bob) for _ in accepted]
                assert [m.message_id for m in got] == accepted
                await wait_delivered(laptop, *accepted)
                # Room again: the next send goes through, and it is the next
                # thing Bob and the phone get (the refused one never comes).
                later = await cast.say(laptop, bob_user, "Is there room now? ✓")
                assert (await next_message(bob)).message_id == later
                assert (await next_message(phone)).message_id == later
                assert await history_ids(bob) == [*accepted, later]
            assert await history_ids(phone) == [*accepted, later]
