"""``chat``'s attachment commands through pseudo-terminals: what ``/save N``
numbers, and each refusal a person can meet, said plainly.

The server is :func:`tests.test_blobs.blob_server` (relay and blob listener
on loopback, a real SQLCipher file) with small limits where a test needs
them; the clients are real ``chat`` subprocesses (see tests/test_chat.py).
"""

from __future__ import annotations

import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace

from chatd.chat.files import FileCommands
from chatd.config import RetentionSettings
from chatd.retention import Retention, blob_jobs

from .test_blobs import CAROL_PASSWORD, blob_server
from .test_chat import Terminal, chat, log_in, user_args
from .test_keys import BOB_PASSWORD
from .test_relay_auth import PASSWORD

ALICE_KEY, BOB_KEY, CAROL_KEY = bytes([1]) * 32, bytes([2]) * 32, bytes([3]) * 32


async def save_number(term: Terminal, start: str) -> int:
    """The N of the ``(/save N)`` that ends the line beginning with ``start``."""
    line = await term.expect_line(start)
    found = re.search(r"/save (\d+)\)", line)
    assert found, line
    return int(found[1])


async def test_file_messages_say_which_number_saves_them(short_tmp: Path) -> None:
    source = short_tmp / "plan.txt"
    source.write_bytes(b"the plan\n" * 100)
    saved = short_tmp / "saved"
    saved.mkdir()
    async with blob_server(short_tmp) as srv:
        alice_args = user_args(srv.url, short_tmp, "alice", key=ALICE_KEY)
        bob_args = user_args(srv.url, short_tmp, "bob", key=BOB_KEY)
        async with chat(short_tmp, *bob_args) as bob, chat(short_tmp, *alice_args) as alice:
            await log_in(bob, "bob", BOB_PASSWORD)
            await log_in(alice, "alice", PASSWORD)
            # Bob is in another conversation: the hint says to open alice's first.
            await bob.type("/open carol")
            await bob.expect("-- conversation with carol --")
            await alice.type("/open bob")
            await alice.expect("-- conversation with bob --")
            await alice.type("first a line of text")
            await alice.expect('✓ sent "first a line of text"')
            await alice.type(f"/send-file {source}")
            await alice.expect("✓ sent file plan.txt (900 bytes)")
            await bob.expect("alice: first a line of text")
            await bob.expect("alice: [file] plan.txt (/open alice, then /save 2)")
            await bob.type("/open alice")
            await bob.expect("-- alice: messages 1–2 of 2 --")
            await bob.expect("alice: first a line of text\n")
            assert await save_number(bob, "alice: [file] plan.txt") == 2
            await bob.type(f"/save 2 {saved}")
            await bob.expect(f"✓ saved {saved / 'plan.txt'} (900 bytes)")
            # In the open conversation a file arrives with its number alone;
            # the sender's /history numbers her copy the same way.
            await alice.type(f"/send-file {source}")
            await bob.expect("alice: [file] plan.txt (/save 3)")
            await alice.type("/history")
            await alice.expect("alice: [file] plan.txt (/save 2)  ✓")
            await alice.expect("alice: [file] plan.txt (/save 3)  ✓")

            # In a room: the number is the room's, as its /history shows it.
            await alice.type("/create plans")
            await alice.expect("-- room #plans")
            await bob.type("/join plans")
            await bob.expect("-- room #plans")
            await alice.expect("bob joined")
            await alice.type(f"/send-file {source}")
            await alice.expect("✓ sent file plan.txt (900 bytes)")
            number = await save_number(bob, "#plans alice: [file] plan.txt")
            await bob.type(f"/save {number} {saved / 'from-room.txt'}")
            await bob.expect(f"✓ saved {saved / 'from-room.txt'} (900 bytes)")
            await bob.type("/history")
            assert await save_number(bob, "alice: [file] plan.txt") == number
            for term in (alice, bob):
                await term.type("/quit")
                assert await term.exit_code() == 0
    assert (saved / "from-room.txt").read_bytes() == source.read_bytes()


async def test_each_refusal_of_a_file_is_said_plainly(short_tmp: Path) -> None:
    small, big = short_tmp / "small.txt", short_tmp / "big.txt"
    small.write_bytes(b"s" * 3000)
    big.write_bytes(b"b" * 5000)
    saved = short_tmp / "saved"
    saved.mkdir()
    limits = {"max_file_bytes": 4096, "quota_bytes_per_user": 6500}
    async with blob_server(short_tmp, **limits) as srv:
        alice_args = user_args(srv.url, short_tmp, "alice", key=ALICE_KEY)
        carol_args = user_args(srv.url, short_tmp, "carol", key=CAROL_KEY)
        async with chat(short_tmp, *carol_args) as carol, chat(short_tmp, *alice_args) as alice:
            await log_in(carol, "carol", CAROL_PASSWORD)
            await log_in(alice, "alice", PASSWORD)
            await alice.type("/open carol")
            await alice.expect("-- conversation with carol --")
            # Over attachments.max_file_bytes: refused before anything is stored.
            await alice.type(f"/send-file {big}")
            await alice.expect(
                "! /send-file failed: the file is over the server's size limit for attachments"
            )
            assert srv.files() == []
            await alice.type(f"/send-file {small}")
            await alice.expect("✓ sent file small.txt (3000 bytes)")
            await alice.type(f"/send-file {short_tmp / 'small.txt'}")  # the same bytes, anew
            await alice.expect("✓ sent file small.txt (3000 bytes)")
            # Two encryptions of one file are two blobs: the third is over the quota.
            await alice.type(f"/send-file {small}")
            await alice.expect(
                "! /send-file failed: your attachment quota on the server is used up;"
                " wait until older files expire"
            )
            assert len(srv.files()) == 2
            first = await save_number(carol, "alice: [file] small.txt")
            second = await save_number(carol, "alice: [file] small.txt")

            # A blob altered on the server: the client's SHA-256 check refuses it.
            for blob in srv.files():
                path = srv.directory / blob
                data = bytearray(path.read_bytes())
                data[-1] ^= 0xFF
                path.write_bytes(bytes(data))
            await carol.type(f"/save {first} {saved}")
            await carol.expect(
                "! /save failed: hash mismatch: the downloaded file is not the one the"
                " message names; nothing was saved"
            )
            assert os.listdir(saved) == []

            # Expired: retention has purged it; the server says blob_not_found.
            await srv.store.write(lambda c: c.execute("UPDATE blobs SET expires_at = 0"))
            retention = Retention(
                srv.store, RetentionSettings(), blob_jobs(srv.blobs.settings, srv.blobs)
            )
            [report] = await retention.run_now()
            assert report.rows_purged == 2 and srv.files() == []
            await carol.type(f"/save {second} {saved}")
            await carol.expect(
                "! /save failed: the file is no longer on the server (it expired)"
                " or was not sent to this device"
            )
            assert os.listdir(saved) == []
            # Once purged, the quota is free again.
            await alice.type(f"/send-file {small}")
            await alice.expect("✓ sent file small.txt (3000 bytes)")
            for term in (alice, carol):
                await term.type("/quit")
                assert await term.exit_code() == 0


async def test_send_file_returns_to_typing_and_reports_when_the_upload_ends(
    short_tmp: Path,
) -> None:
    """/send-file checks its input at once, then hands the upload to a task
    of its own (the input loop types on) and says the outcome when it ends."""
    source = short_tmp / "plan.txt"
    source.write_bytes(b"x" * 900)
    uploads: list[tuple[int, Path]] = []

    class Uploader:  # the client's send_file, as far as the command sees it
        async def send_file(self, to: int, path: Path) -> tuple[None, object]:
            uploads.append((to, path))
            return None, SimpleNamespace(name=path.name, plain_size=900)

    said: list[str] = []
    started: list[tuple[str, Callable[[], Awaitable[None]]]] = []
    files = FileCommands(
        Uploader(),  # type: ignore[arg-type]
        said.append,
        lambda: 7,  # the open conversation: user 7
        lambda name, run: started.append((name, run)),
    )
    await files.cmd_send_file([str(source)])
    assert uploads == [] and said == []  # not uploaded yet: the command returned
    [(name, run)] = started
    assert name == "send-file"
    await run()  # what the app's nursery runs
    assert uploads == [(7, source)]
    assert said == ["✓ sent file plan.txt (900 bytes)"]
