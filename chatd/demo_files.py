"""``chatd demo``, third part: a file sent to the channel, stored only as ciphertext.

Theory of operation
-------------------
In the channel of :mod:`chatd.demo_rooms`, while bob and carol are still
offline, alice sends a small text file (:data:`FILE_NAME`, written into her
client directory):

* her client encrypts it (libsodium secretstream, a fresh random key), asks
  the relay for a signed upload URL and PUTs the ciphertext to the blob
  listener, which checks its size and SHA-256 and stores it as
  ``<data_dir>/blobs/<sha256>``. The key, the hash and the file name travel
  only inside her Megolm room message;
* the server's column shows that file as it is on disk (its size, the
  SHA-256 of its bytes, which is its name, its first bytes) and says whether
  any line of the plaintext is in it, then the database's row about it:
  owner, size, expiry, and who may download it (the channel's members);
* when bob comes online he reads the message, downloads the ciphertext, has
  it checked (SHA-256 and size) and decrypted by his client into his own
  directory; the demo compares his copy with alice's file byte for byte.

The file's lines join the final plaintext scan, which reads every file under
the data dir, ``blobs/`` included.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio

from chatd.client import Client
from chatd.client.room_events import RoomMessage
from chatd.inspection import BlobFile, BlobRow, read_blob_files, read_blobs

from .errors import ChatdError

if TYPE_CHECKING:  # pragma: no cover - the demo imports this module, not the reverse
    from .demo import _Demo

FILE_NAME: Final = "budget.txt"
FILE_LINES: Final = (
    "Q3 budget approved: 48,500 EUR",
    "Venue deposit due Friday, ref KX-2291",
)
FILE_TEXT: Final = "".join(f"{line}\n" for line in FILE_LINES)
HASH_CHARS: Final = 16  # hex digits of a blob id shown
HEAD_BYTES: Final = 12  # first bytes of a blob file shown


class FileDemoError(ChatdError):
    """A file step saw something else than it should (a copy that differs)."""


def short_blob(name: str) -> str:
    """A blob file's name (64 hex digits), or a path ending in one, shortened."""
    head, _, last = name.rpartition("/")
    if len(last) == 64 and all(c in "0123456789abcdef" for c in last):
        last = last[:HASH_CHARS] + "…"
    return f"{head}/{last}" if head else last


def _days(unix_ms: int) -> str:
    return f"{(unix_ms / 1000 - time.time()) / 86_400:.0f} days"


def _file_lines(file: BlobFile) -> list[str]:
    return [
        f"  {short_blob(file.name)}  {file.size:,} bytes",
        f"  SHA-256 of its bytes {'= its name ✓' if file.sha256 == file.name else 'DIFFERS'}",
        f"  first bytes: {file.head[:HEAD_BYTES].hex(' ')}",
    ]


def _row_lines(row: BlobRow) -> list[str]:
    rooms = ", ".join(f"#{r}" for r in row.rooms) or "none"
    return [
        f"  blobs row: owner {row.owner or '-'}, {row.size:,} bytes,"
        f" expires in {_days(row.expires_at)}",
        f"  may download: members of {rooms}, {row.devices} device(s) listed",
    ]


class FileScript:
    """Alice's file to the channel, and bob's copy of it."""

    def __init__(self, demo: _Demo) -> None:
        self.demo = demo
        self.source = demo.workdir / "clients" / "alice-files" / FILE_NAME
        self.saved = demo.workdir / "clients" / "bob-saved"
        self.sent: str = ""  # the file message's id

    async def server_lines(self) -> list[str]:
        """The blob files on disk and the database's rows about them."""
        config, key = self.demo.config, self.demo.db_key
        files = await trio.to_thread.run_sync(read_blob_files, config.blobs_dir)
        rows = await trio.to_thread.run_sync(read_blobs, config.database_path, key)
        lines = [f"blobs/: {len(files)} file(s), each named by its SHA-256"]
        for file in files:
            lines += _file_lines(file)
            data = await trio.to_thread.run_sync((config.blobs_dir / file.name).read_bytes)
            found = [line for line in FILE_LINES if line.encode() in data]
            lines.append(
                f"  {FILE_NAME}'s text in it: {'FOUND' if found else 'none: ciphertext only ✓'}"
            )
        for row in rows:
            lines += _row_lines(row)
        return lines

    async def step_alice_sends(self, alice: Client, room_id: int, room_name: str) -> None:
        """Alice (online, a member of ``room_id``) sends the file to the room."""
        self.demo.screen.step(f"7. alice sends a file to #{room_name}: the server gets ciphertext")
        await trio.to_thread.run_sync(self._write_source)
        self.sent, attachment = await alice.rooms.send_file(room_id, self.source)
        left = [
            f"alice: encrypts {FILE_NAME} ({attachment.plain_size} bytes) on her device",
            f"alice: uploads the ciphertext ({attachment.size} bytes) to a signed URL",
            f"alice → #{room_name}: [file] {attachment.name}; its key, hash and name"
            " travel inside the Megolm message",
            "alice: offline",
        ]
        self.demo.screen.columns(left, await self.server_lines())

    def _write_source(self) -> None:
        self.source.parent.mkdir(mode=0o700, exist_ok=True)
        self.source.write_text(FILE_TEXT)

    async def bob_saves(self, bob: Client, message: RoomMessage) -> list[str]:
        """Bob downloads, checks and decrypts the file; the lines to show.
        Raises FileDemoError if his copy differs from alice's file."""
        if message.attachment is None:
            raise FileDemoError("the file message arrived without its attachment")
        await trio.to_thread.run_sync(lambda: self.saved.mkdir(mode=0o700, exist_ok=True))
        path = await bob.save_file(message.attachment, self.saved)
        same = await trio.to_thread.run_sync(_same, path, self.source)
        if not same:
            raise FileDemoError(f"bob's copy {path} differs from alice's {self.source}")
        return [
            f"bob: saves it: downloads the ciphertext, checks its SHA-256, decrypts: {path.name},"
            f" {message.attachment.plain_size} bytes, the same as alice's file ✓"
        ]

    @staticmethod
    def retention_line() -> str:
        return "blobs/: the file stays, read or not, until it expires"


def _same(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()
