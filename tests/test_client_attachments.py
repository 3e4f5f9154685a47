"""The client library's attachments end to end: a file encrypted on Alice's
device, stored by the server only as ciphertext, saved by Bob after the hash
check; and the cipher's refusals."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from chatd.client import (
    Attachment,
    AttachmentError,
    AttachmentMismatchError,
    Client,
    DecryptionError,
    RoomMessage,
    ServerRefusedError,
    open_client,
)
from chatd.client.attachments import decrypt_file, encrypt_file, safe_name

from .test_blobs import TEAM, BlobServer, blob_server
from .test_client_rooms import next_event

ALICE_KEY = bytes([1]) * 32
BOB_KEY = bytes([2]) * 32
CAROL_KEY = bytes([4]) * 32


@asynccontextmanager
async def device(
    srv: BlobServer, tmp: Path, username: str, key: bytes, **kw: Any
) -> AsyncIterator[Client]:
    password = dict(TEAM)[username]
    home = tmp / username
    home.mkdir(exist_ok=True)
    async with open_client(
        srv.url,
        username,
        password,
        device_name=username,
        store_path=home / "client.db",
        store_key=key,
        backoff_base=0.01,
        **kw,
    ) as client:
        yield client


async def test_a_file_goes_encrypted_and_bob_saves_it_after_the_hash_check(
    short_tmp: Path,
) -> None:
    secret = b"the launch plan: " + os.urandom(200_000) + b" MARKER-PLAINTEXT"
    source = short_tmp / "plan.pdf"
    source.write_bytes(secret)
    async with (
        blob_server(short_tmp) as srv,
        device(srv, short_tmp, "alice", ALICE_KEY) as alice,
        device(srv, short_tmp, "bob", BOB_KEY) as bob,
    ):
        message_id, attachment = await alice.send_file(bob.user_id, source)
        assert attachment.media_type == "application/pdf" and attachment.name == "plan.pdf"
        assert attachment.plain_size == len(secret) and attachment.size > len(secret)
        # The server holds the ciphertext only, under its SHA-256.
        stored = (srv.directory / attachment.blob_id).read_bytes()
        assert len(stored) == attachment.size and b"MARKER-PLAINTEXT" not in stored
        assert b"launch plan" not in stored

        with trio.fail_after(10):
            got = await bob.messages().receive()
        assert got.message_id == message_id and got.text == "[file] plan.pdf"
        assert got.attachment is not None and got.attachment.blob_id == attachment.blob_id
        saved = await bob.save_file(got.attachment, short_tmp / "bob")
        assert saved == short_tmp / "bob" / "plan.pdf"
        assert saved.read_bytes() == secret
        # It never overwrites, and leaves no temporary file behind.
        with pytest.raises(AttachmentError, match="exists already"):
            await bob.save_file(got.attachment, saved)
        assert sorted(p.name for p in (short_tmp / "bob").iterdir() if p.name.startswith(".")) == []

        # A message whose attachment does not match the server's ciphertext is refused.
        wrong = Attachment(
            attachment.blob_id,
            attachment.key,
            attachment.size + 1,
            attachment.plain_size,
            attachment.media_type,
            "x",
        )
        with pytest.raises(AttachmentMismatchError):
            await bob.save_file(wrong, short_tmp / "bob" / "x")
        assert not (short_tmp / "bob" / "x").exists()


async def test_an_attachment_in_the_history_can_be_saved_after_a_restart(
    short_tmp: Path,
) -> None:
    secret = os.urandom(100_000)
    source = short_tmp / "notes.txt"
    source.write_bytes(secret)
    async with blob_server(short_tmp) as srv:
        async with (
            device(srv, short_tmp, "alice", ALICE_KEY) as alice,
            device(srv, short_tmp, "bob", BOB_KEY) as bob,
        ):
            message_id, attachment = await alice.send_file(bob.user_id, source)
            with trio.fail_after(10):
                await bob.messages().receive()
            [mine] = await alice.history(bob.user_id)
            assert mine.attachment is not None and mine.attachment.key == attachment.key
        # Both devices restart: the history still says what the file was.
        async with device(srv, short_tmp, "bob", BOB_KEY) as bob:
            [entry] = await bob.history()
            assert entry.message_id == message_id and entry.attachment is not None
            assert entry.attachment.blob_id == attachment.blob_id
            saved = await bob.save_file(entry.attachment, short_tmp / "bob")
            assert saved.read_bytes() == secret
        async with device(srv, short_tmp, "alice", ALICE_KEY) as alice:
            [entry] = await alice.history()
            assert entry.attachment is not None
            mine_saved = await alice.save_file(entry.attachment, short_tmp / "alice")
            assert mine_saved.read_bytes() == secret


async def test_a_file_sent_to_a_room_is_saved_by_a_member_and_not_by_others(
    short_tmp: Path,
) -> None:
    secret = b"room minutes " + os.urandom(150_000)
    source = short_tmp / "minutes.md"
    source.write_bytes(secret)
    async with (
        blob_server(short_tmp) as srv,
        device(srv, short_tmp, "alice", ALICE_KEY) as alice,
        device(srv, short_tmp, "bob", BOB_KEY) as bob,
        device(srv, short_tmp, "carol", CAROL_KEY) as carol,
    ):
        room = await alice.rooms.create("plans", "group")
        await alice.rooms.invite(room.room_id, bob.user_id)
        await bob.rooms.join(room.room_id)
        message_id, attachment = await alice.rooms.send_file(room.room_id, source)
        assert attachment.media_type == "text/markdown"
        stored = (srv.directory / attachment.blob_id).read_bytes()
        assert b"room minutes" not in stored

        got = await next_event(bob, RoomMessage, message_id=message_id)
        assert got.text == "[file] minutes.md" and got.attachment is not None
        assert got.attachment.blob_id == attachment.blob_id
        saved = await bob.save_file(got.attachment, short_tmp / "bob")
        assert saved.read_bytes() == secret
        [entry] = await bob.rooms.history(room.room_id)
        assert entry.attachment is not None and entry.attachment.key == attachment.key
        # Carol is not in the room: the server will not give her the ciphertext.
        with pytest.raises(ServerRefusedError) as refused:
            await carol.save_file(got.attachment, short_tmp / "carol")
        assert refused.value.code == "blob_not_found"


async def test_the_media_type_allowlist_is_checked_by_the_client(short_tmp: Path) -> None:
    source = short_tmp / "tool.exe"
    source.write_bytes(b"MZ")
    async with (
        blob_server(short_tmp) as srv,
        device(srv, short_tmp, "alice", ALICE_KEY, media_types=("image/png",)) as alice,
    ):
        with pytest.raises(AttachmentError, match="not allowed"):
            await alice.send_file(alice.user_id, source, media_type="application/x-msdownload")
        assert srv.files() == []


def test_the_cipher_refuses_a_wrong_key_and_damaged_or_truncated_ciphertext(
    tmp_path: Path,
) -> None:
    source = tmp_path / "in"
    source.write_bytes(os.urandom(200_000))
    sealed = tmp_path / "sealed"
    key, _digest, size, plain = encrypt_file(source, sealed)
    assert size == sealed.stat().st_size and plain == 200_000
    assert decrypt_file(sealed, tmp_path / "out", key) == 200_000
    assert (tmp_path / "out").read_bytes() == source.read_bytes()
    data = sealed.read_bytes()
    cases = {
        "wrong key": (data, bytes(32)),
        "flipped bit": (data[:100] + bytes([data[100] ^ 1]) + data[101:], key),
        "truncated": (data[: 24 + 65_536 + 17], key),
        "extra bytes": (data + b"x", key),
    }
    for name, (body, use_key) in cases.items():
        damaged = tmp_path / f"damaged-{name}"
        damaged.write_bytes(body)
        with pytest.raises(DecryptionError):
            decrypt_file(damaged, tmp_path / f"out-{name}", use_key)


def test_file_names_from_senders_cannot_escape_the_target_directory() -> None:
    assert safe_name("../../etc/passwd") == "passwd"
    assert safe_name("..\\..\\boot.ini") == "boot.ini"
    assert safe_name(".bashrc") == "bashrc"
    assert safe_name("\x1b[31mred") == "[31mred"
    assert safe_name("") == "attachment"
