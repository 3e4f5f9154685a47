"""The client library end to end: real relay, real Olm, real SQCipher stores."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from chatd.client import (
    Client,
    ClientError,
    ClientStoreError,
    DecryptionError,
    ReceivedMessage,
    fingerprint,
    key_from_passphrase,
    open_client,
)
from chatd.client.crypto import decode_ciphertext, decode_payload, encode_payload

from .test_keys import BOB_PASSWORD, team
from .test_relay_auth import PASSWORD, Server

ALICE_KEY = bytes([1]) * 32
BOB_KEY = bytes([2]) * 32
RELAXED = {"login_rate_per_ip": 100_000.0, "login_rate_per_account": 100_000.0, "rate_burst": 1000}


@asynccontextmanager
async def relay(tmp: Path) -> AsyncIterator[Server]:
    """The real relay with alice and bob."""
    async with team(tmp, **RELAXED) as srv:
        yield srv


@asynccontextmanager
async def device(
    srv: Server, tmp: Path, username: str, store: str, key: bytes, **kw: Any
) -> AsyncIterator[Client]:
    password = PASSWORD if username == "alice" else BOB_PASSWORD
    async with open_client(
        srv.url,
        username,
        password,
        device_name=store,
        store_path=tmp / f"{store}.db",
        store_key=key,
        backoff_base=0.01,
        **kw,
    ) as client:
        yield client


async def next_message(client: Client) -> ReceivedMessage:
    with trio.fail_after(10):
        return await client.messages().receive()


async def test_alice_and_bob_exchange_encrypted_messages(short_tmp: Path) -> None:
    async with (
        relay(short_tmp) as srv,
        device(srv, short_tmp, "alice", "alice", ALICE_KEY) as alice,
        device(srv, short_tmp, "bob", "bob", BOB_KEY) as bob,
    ):
        sent = await alice.send_text(bob.user_id, "hello bob, ünïcode ✓")
        got = await next_message(bob)
        assert (got.message_id, got.text, got.sender_user_id) == (
            sent,
            "hello bob, ünïcode ✓",
            alice.user_id,
        )
        assert got.sender_device_id == alice.device_id and not got.outgoing
        reply = await bob.send_text(alice.user_id, "hi alice")
        assert (await next_message(alice)).text == "hi alice"
        # Bob acknowledged, so Alice learns her message was delivered.
        with trio.fail_after(10):
            await alice.wait_state(sent, "delivered")
        history = await alice.history(bob.user_id)
        assert [(e.direction, e.text) for e in history] == [
            ("out", "hello bob, ünïcode ✓"),
            ("in", "hi alice"),
        ]
        assert history[1].message_id == reply
        # Several messages in a row ride the same Olm channels.
        for n in range(5):
            await alice.send_text(bob.user_id, f"n{n}")
        assert [(await next_message(bob)).text for _ in range(5)] == [f"n{n}" for n in range(5)]


async def test_an_offline_device_gets_its_messages_when_it_opens(short_tmp: Path) -> None:
    async with relay(short_tmp) as srv:
        async with device(srv, short_tmp, "bob", "bob", BOB_KEY) as bob:
            bob_id, bob_device = bob.user_id, bob.device_id
        async with device(srv, short_tmp, "alice", "alice", ALICE_KEY) as alice:
            ids = [await alice.send_text(bob_id, f"while you were out {n}") for n in range(3)]
        async with device(srv, short_tmp, "bob", "bob", BOB_KEY) as bob:
            assert bob.device_id == bob_device  # the stored device logged in again
            got = [await next_message(bob) for _ in range(3)]
            assert [m.message_id for m in got] == ids
            assert [m.text for m in got] == [f"while you were out {n}" for n in range(3)]
            entries = await bob.history()
            assert [e.state for e in entries] == ["received"] * 3


async def test_a_redelivered_message_is_stored_once_and_then_acknowledged(
    short_tmp: Path,
) -> None:
    async with (
        relay(short_tmp) as srv,
        device(srv, short_tmp, "alice", "alice", ALICE_KEY) as alice,
        device(srv, short_tmp, "bob", "bob", BOB_KEY) as bob,
    ):
        conn = bob.connection
        real_send_frame = conn.send_frame
        acks: list[int] = []

        async def lose_acks(frame_type: str, **fields: Any) -> None:
            acks.append(fields["up_to"])  # the ack "gets lost"

        conn.send_frame = lose_acks  # type: ignore[method-assign]
        sent = await alice.send_text(bob.user_id, "exactly once")
        assert (await next_message(bob)).message_id == sent
        assert len(acks) == 1
        conn.send_frame = real_send_frame  # type: ignore[method-assign]
        # Drop the connection: the client reconnects (resume) and the server
        # delivers the unacknowledged envelope again.
        connects = conn.connects
        await conn.drop()
        with trio.fail_after(10):
            await alice.wait_state(sent, "delivered")  # acked after the redelivery
        assert conn.connects == connects + 1
        assert [e.message_id for e in await bob.history()] == [sent]
        with pytest.raises(trio.WouldBlock):
            bob.messages().receive_nowait()  # not handed to the application twice
        # The Olm channel still works both ways after the reconnect.
        await bob.send_text(alice.user_id, "still here")
        assert (await next_message(alice)).text == "still here"


async def test_my_other_devices_get_a_copy_of_what_i_send(short_tmp: Path) -> None:
    async with (
        relay(short_tmp) as srv,
        device(srv, short_tmp, "alice", "laptop", ALICE_KEY) as laptop,
        device(srv, short_tmp, "alice", "phone", bytes([3]) * 32) as phone,
        device(srv, short_tmp, "bob", "bob", BOB_KEY) as bob,
    ):
        # The laptop's directory predates the phone: the send meets
        # device_mismatch, refreshes the directory and retries.
        await laptop.directory()
        sent = await laptop.send_text(bob.user_id, "from my laptop")
        copy = await next_message(phone)
        assert (copy.message_id, copy.text, copy.outgoing) == (sent, "from my laptop", True)
        assert copy.peer_user_id == bob.user_id
        assert (await next_message(bob)).text == "from my laptop"
        [entry] = await phone.history(bob.user_id)
        assert entry.direction == "out"


async def test_the_server_database_never_holds_the_plaintext(short_tmp: Path) -> None:
    marker = "PLAINTEXT-MARKER-c1i3nt"
    async with relay(short_tmp) as srv:
        async with device(srv, short_tmp, "bob", "bob", BOB_KEY) as bob:
            bob_id = bob.user_id
        async with device(srv, short_tmp, "alice", "alice", ALICE_KEY) as alice:
            await alice.send_text(bob_id, marker)
            queued = await srv.store.read(
                lambda c: c.execute("SELECT ciphertext FROM envelopes").fetchall()
            )
            assert queued and all(marker.encode() not in bytes(row[0]) for row in queued)
        files = [p for p in short_tmp.iterdir() if p.name.startswith("c.db")]
        assert files
        for path in files:
            assert marker.encode() not in path.read_bytes(), path.name
        # Neither do the clients' own stores on disk (they are encrypted).
        for name in ("alice.db", "bob.db"):
            assert marker.encode() not in (short_tmp / name).read_bytes()


async def test_new_devices_start_unverified_until_their_fingerprint_is_checked(
    short_tmp: Path,
) -> None:
    async with (
        relay(short_tmp) as srv,
        device(srv, short_tmp, "alice", "alice", ALICE_KEY) as alice,
        device(srv, short_tmp, "bob", "bob", BOB_KEY) as bob,
    ):
        await alice.directory()
        flags = {(d.user_id, d.device_id): d.verified for d in await alice.devices()}
        assert flags == {
            (alice.user_id, alice.device_id): True,
            (bob.user_id, bob.device_id): False,
        }
        with pytest.raises(ClientError, match="does not match"):
            await alice.verify_device(bob.user_id, bob.device_id, alice.fingerprint)
        await alice.verify_device(bob.user_id, bob.device_id, bob.fingerprint.lower())
        [bob_device] = [d for d in await alice.devices() if d.user_id == bob.user_id]
        assert bob_device.verified
        # The lookup each incoming message makes, by key.
        assert await alice._store.device(bob.user_id, bob.device_id) == bob_device
        assert await alice._store.device(bob.user_id, "NOSUCHDEVICE1") is None


async def test_a_wrong_store_key_is_refused_and_the_store_kept(short_tmp: Path) -> None:
    async with relay(short_tmp) as srv:
        async with device(srv, short_tmp, "alice", "alice", ALICE_KEY):
            pass
        before = (short_tmp / "alice.db").read_bytes()
        with pytest.raises(ClientStoreError, match="store key does not open"):
            async with device(srv, short_tmp, "alice", "alice", bytes(32)):
                pass  # pragma: no cover - never reached
        assert (short_tmp / "alice.db").read_bytes() == before


def test_fingerprints_and_passphrase_keys() -> None:
    assert fingerprint("A" * 43) == " ".join(["0000"] * 16)
    salt = b"0123456789abcdef"
    key = key_from_passphrase("a long passphrase", salt)
    assert len(key) == 32 and key == key_from_passphrase("a long passphrase", salt)
    assert key != key_from_passphrase("a long passphrase", b"fedcba9876543210")
    with pytest.raises(ClientError):
        key_from_passphrase("x", b"short")


def test_payloads_are_bound_to_their_message_id() -> None:
    payload = encode_payload("m-1", 7, "hi")
    assert decode_payload(payload, "m-1").text == "hi"
    with pytest.raises(DecryptionError, match="differs"):
        decode_payload(payload, "m-2")
    with pytest.raises(DecryptionError, match="malformed ciphertext"):
        decode_ciphertext('{"v":1,"type":2,"body":""}')


async def test_envelope_ids_are_never_reused_so_no_delivery_is_skipped(short_tmp: Path) -> None:
    """Alice sends, Bob acks (queue empties), Alice acks the receipt (table
    empty again), Bob replies: the reply must still reach Alice's open
    connection (a reused envelope id would sit below its delivery cursor)."""
    async with (
        relay(short_tmp) as srv,
        device(srv, short_tmp, "alice", "alice", ALICE_KEY) as alice,
        device(srv, short_tmp, "bob", "bob", BOB_KEY) as bob,
    ):
        sent = await alice.send_text(bob.user_id, "one")
        await next_message(bob)
        with trio.fail_after(10):
            await alice.wait_state(sent, "delivered")
        await alice.connection.request("ping")  # the ack of the receipt is processed
        await bob.send_text(alice.user_id, "two")
        assert (await next_message(alice)).text == "two"


async def test_the_client_store_is_private_to_its_user(short_tmp: Path) -> None:
    import os
    import stat

    from chatd.client.store import LocalStore

    old = os.umask(0o022)  # a typical umask: files would otherwise be world-readable
    try:
        store = await LocalStore.open(short_tmp / "mine.db", ALICE_KEY)
        await store.set_meta(device_id="ABC")
        await store.aclose()
    finally:
        os.umask(old)
    for name in os.listdir(short_tmp):
        if name.startswith("mine.db"):
            mode = stat.S_IMODE(os.stat(short_tmp / name).st_mode)
            assert mode == 0o600, (name, oct(mode))


async def test_the_example_in_client_md_runs(short_tmp: Path, monkeypatch: Any) -> None:
    """The ~15-line example of docs/CLIENT.md, run as written against the real
    relay: only the address, the password and the store path are swapped in,
    and it stops after the first message instead of listening forever."""
    import re

    text = (Path(__file__).parent.parent / "docs" / "CLIENT.md").read_text()
    code = re.search(r"## Example\n\n```python\n(.*?)```", text, re.S)
    assert code is not None
    source = code.group(1)
    assert len(source.splitlines()) <= 25
    swaps = {
        '"correct horse battery staple"': repr(PASSWORD),
        'store_path="alice.db"': f"store_path={str(short_tmp / 'alice.db')!r}",
        "print(message.sender_user_id, message.text)": (
            "print(message.sender_user_id, message.text); return"
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
            got = await next_message(bob)
            assert got.text == "hello bob"
            await bob.send_text(got.sender_user_id, "hi alice")
        assert printed[0].startswith("sent ") and printed[-1].endswith("hi alice")


def _raw_store(path: Path, key: bytes) -> Any:
    import sqlcipher3

    conn = sqlcipher3.connect(str(path), isolation_level=None)
    conn.execute(f"PRAGMA key = \"x'{key.hex()}'\"")
    return conn


async def test_a_store_from_before_olm_channels_keeps_its_channels(short_tmp: Path) -> None:
    """A store made when the Olm channels' table was olm_sessions opens with its
    channels renamed in place: the pickled ratchet goes on where it was."""
    import vodozemac

    from chatd.client.crypto import OlmMachine, pickle_key
    from chatd.client.store import _SCHEMA, SCHEMA_VERSION, LocalStore

    key = pickle_key(ALICE_KEY)
    alice, bob = vodozemac.Account(), vodozemac.Account()
    bob.generate_one_time_keys(1)
    [otk] = bob.one_time_keys.values()
    channel = alice.create_outbound_session(bob.curve25519_key, otk)
    bob_curve = bob.curve25519_key.to_base64()
    path = short_tmp / "old.db"
    old_schema = _SCHEMA.replace("olm_channels", "olm_sessions").replace("channel_id", "session_id")
    assert old_schema != _SCHEMA
    conn = _raw_store(path, ALICE_KEY)
    conn.executescript(old_schema)
    conn.execute("INSERT INTO meta (name, value) VALUES ('account', ?)", (alice.pickle(key),))
    conn.execute(
        "INSERT INTO olm_sessions (session_id, peer_curve25519, pickle, used_at)"
        " VALUES (?, ?, ?, 1)",
        (channel.session_id, bob_curve, channel.pickle(key)),
    )
    conn.close()

    for _ in range(2):  # the second open finds nothing left to migrate
        store = await LocalStore.open(path, ALICE_KEY)
        machine = OlmMachine.restore(
            (await store.meta())["account"], await store.olm_channels(), key
        )
        await store.aclose()
        assert machine.has_channel(bob_curve)
    conn = _raw_store(path, ALICE_KEY)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "olm_channels" in tables and "olm_sessions" not in tables
    assert conn.execute("SELECT channel_id FROM olm_channels").fetchall() == [(channel.session_id,)]
    conn.close()
    # The restored channel is the same ratchet: Bob decrypts what it encrypts.
    ciphertext = machine.encrypt(bob_curve, b"still the same channel")
    decrypted = OlmMachine(bob, key).decrypt(alice.curve25519_key.to_base64(), ciphertext)
    assert decrypted.plaintext == b"still the same channel"


async def test_a_store_from_a_newer_client_is_refused(short_tmp: Path) -> None:
    from chatd.client.store import SCHEMA_VERSION, LocalStore

    path = short_tmp / "new.db"
    await (await LocalStore.open(path, ALICE_KEY)).aclose()
    conn = _raw_store(path, ALICE_KEY)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(ClientStoreError, match="schema version"):
        await LocalStore.open(path, ALICE_KEY)
