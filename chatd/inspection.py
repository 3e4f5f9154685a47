"""What a chatd server has stored, read from outside: for ``chatd demo`` and tests.

Opens the server's SQLCipher file read-only with its key (while the daemon
runs: WAL lets readers see what it committed) to show what is there, and
searches the raw bytes of its files and every decrypted value for given
texts, to prove that message plaintext is nowhere on the server.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import sqlcipher3

from chatd.errors import StoreError


@dataclass(frozen=True)
class EnvelopeRow:
    id: int
    recipient_device_id: str
    kind: str
    sender: str | None  # the sender's username (the server stores the user id)
    ciphertext: bytes | None


@dataclass(frozen=True)
class RoomLogRow:
    """One entry of the room log: stored once, whatever the number of members."""

    id: int
    room: str  # the room's name (not end-to-end encrypted)
    kind: str  # room_message | room_event
    sender: str | None  # the sender's username, for a room message
    ciphertext: bytes | None  # a room message's Megolm ciphertext
    event: str | None  # a room event's JSON, made by the server
    waiting: int  # devices it is still queued for


@dataclass(frozen=True)
class ServerView:
    """What the server's database holds, as far as a person is shown it."""

    users: list[tuple[str, str]]  # (username, password hash)
    devices: list[tuple[str, str, str, int]]  # (device id, owner, curve25519 key, one-time keys)
    envelopes: list[EnvelopeRow]
    rooms: list[tuple[int, str, str, int]] = field(default_factory=list)  # id, name, kind, members
    room_log: list[RoomLogRow] = field(default_factory=list)


#: Each room log entry with the number of devices still waiting for it: those
#: with a range of the room that holds it, past their cursor, but not its sender.
_ROOM_LOG: Final = (
    "SELECT m.id, coalesce(r.name, '#' || m.room_id), m.kind, u.username, m.ciphertext, m.event,"
    " (SELECT count(*) FROM room_devices s JOIN devices d ON d.id = s.device_id"
    "  WHERE s.room_id = m.room_id AND m.id > max(s.from_id, d.room_cursor)"
    "  AND (s.until_id IS NULL OR m.id <= s.until_id)"
    "  AND m.sender_device_id IS NOT s.device_id)"
    " FROM room_log m LEFT JOIN rooms r ON r.id = m.room_id"
    " LEFT JOIN users u ON u.id = m.sender_user_id ORDER BY m.id"
)


@dataclass(frozen=True)
class BlobRow:
    """What the database says about one attachment: whose, how big, until when."""

    blob_id: str  # hex SHA-256 of the ciphertext: the file name under blobs/
    owner: str | None  # the uploader's username
    size: int  # ciphertext bytes
    expires_at: int  # unix ms
    referenced: bool  # a message named it
    devices: int  # devices that may download it (the uploader's, direct recipients')
    rooms: list[str]  # rooms whose members may download it


@dataclass(frozen=True)
class BlobFile:
    """One file under ``<data_dir>/blobs/``, as its bytes are on disk."""

    name: str
    size: int
    sha256: str  # hex, computed here from the bytes
    head: bytes  # the first bytes


@contextmanager
def open_server_db(path: Path, key: bytes) -> Iterator[Any]:
    """A read-only connection to the server's SQLCipher file (blocking: use a thread).

    Opened with ``mode=ro`` but not ``immutable``, so it sees what the running
    daemon committed to the WAL; ``query_only`` makes sure nothing is written.
    """
    conn = sqlcipher3.connect(
        f"{path.as_uri()}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
    )
    try:
        conn.execute("PRAGMA cipher_log_level = NONE")
        conn.execute(f"PRAGMA key = \"x'{key.hex()}'\"")
        conn.execute("PRAGMA query_only = ON")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        yield conn
    except sqlcipher3.dbapi2.DatabaseError as exc:
        raise StoreError(f"cannot read the server's database {path}: {exc}") from None
    finally:
        conn.close()


def read_server_view(path: Path, key: bytes) -> ServerView:
    with open_server_db(path, key) as conn:
        users = conn.execute("SELECT username, password_hash FROM users ORDER BY id").fetchall()
        devices = conn.execute(
            "SELECT d.id, u.username, d.curve25519, (SELECT count(*) FROM one_time_keys k"
            " WHERE k.device_id = d.id AND k.claimed_at IS NULL)"
            " FROM devices d JOIN users u ON u.id = d.user_id ORDER BY d.created_at"
        ).fetchall()
        envelopes = conn.execute(
            "SELECT e.id, e.recipient_device_id, e.kind, u.username, e.ciphertext"
            " FROM envelopes e LEFT JOIN users u ON u.id = e.sender_user_id ORDER BY e.id"
        ).fetchall()
        rooms = conn.execute(
            "SELECT r.id, r.name, r.kind, (SELECT count(*) FROM room_members m"
            " WHERE m.room_id = r.id) FROM rooms r ORDER BY r.id"
        ).fetchall()
        room_log = conn.execute(_ROOM_LOG).fetchall()
    return ServerView(
        users=[(str(name), str(hashed)) for name, hashed in users],
        devices=[(str(d), str(owner), str(key or ""), int(n)) for d, owner, key, n in devices],
        envelopes=[EnvelopeRow(int(i), str(r), str(k), s, c) for i, r, k, s, c in envelopes],
        rooms=[(int(i), str(n), str(k), int(c)) for i, n, k, c in rooms],
        room_log=[
            RoomLogRow(int(i), str(r), str(k), s, c, e, int(w)) for i, r, k, s, c, e, w in room_log
        ],
    )


def read_blobs(path: Path, key: bytes) -> list[BlobRow]:
    with open_server_db(path, key) as conn:
        rows = conn.execute(
            "SELECT b.blob_id, u.username, b.size, b.expires_at, b.referenced_at IS NOT NULL,"
            " (SELECT count(*) FROM blob_devices d WHERE d.blob_id = b.blob_id),"
            " (SELECT group_concat(coalesce(r.name, '#' || x.room_id), ', ') FROM blob_rooms x"
            "  LEFT JOIN rooms r ON r.id = x.room_id WHERE x.blob_id = b.blob_id)"
            " FROM blobs b LEFT JOIN users u ON u.id = b.owner_user_id ORDER BY b.created_at"
        ).fetchall()
    return [
        BlobRow(str(b), o, int(s), int(e), bool(r), int(d), str(rooms).split(", ") if rooms else [])
        for b, o, s, e, r, d, rooms in rows
    ]


def read_blob_files(directory: Path, head: int = 16) -> list[BlobFile]:
    """The blob files (uploads in progress, ``.part-*``, left out), by name."""
    found = []
    for path in sorted(directory.glob("*")) if directory.is_dir() else []:
        if not path.is_file() or path.name.startswith("."):
            continue
        data = path.read_bytes()  # the demo's files are small
        found.append(BlobFile(path.name, len(data), hashlib.sha256(data).hexdigest(), data[:head]))
    return found


# -- looking for plaintext --------------------------------------------------------------------


@dataclass
class ScanReport:
    files: list[str] = field(default_factory=list)
    file_bytes: int = 0
    tables: int = 0
    values: int = 0
    found: list[str] = field(default_factory=list)  # "where: text"


def scan_files(paths: Sequence[Path], needles: Sequence[str], report: ScanReport) -> None:
    """Search the raw bytes of every regular file under ``paths`` for each needle."""
    encoded = [(n, n.encode()) for n in needles]
    for top in paths:
        candidates = sorted(top.rglob("*")) if top.is_dir() else [top]
        for path in candidates:
            if not path.is_file():
                continue  # the admin socket, subdirectories
            data = path.read_bytes()
            report.files.append(str(path.relative_to(top)) if top.is_dir() else path.name)
            report.file_bytes += len(data)
            report.found += [f"{report.files[-1]}: {n!r}" for n, raw in encoded if raw in data]


def scan_database(path: Path, key: bytes, needles: Sequence[str], report: ScanReport) -> None:
    """Search every text and blob value of every table of the decrypted database."""
    encoded = [(n, n.encode()) for n in needles]
    with open_server_db(path, key) as conn:
        tables = [
            str(row[0])
            for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        ]
        for table in tables:
            report.tables += 1
            quoted = '"' + table.replace('"', '""') + '"'
            # The name comes from sqlite_master and is quoted: no injection.
            for row in conn.execute(f"SELECT * FROM {quoted}"):  # noqa: S608
                for value in row:
                    if isinstance(value, str):
                        value = value.encode()
                    if not isinstance(value, bytes):
                        continue
                    report.values += 1
                    report.found += [f"table {table}: {n!r}" for n, raw in encoded if raw in value]
