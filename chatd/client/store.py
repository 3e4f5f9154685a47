"""The client's local store: one SQLCipher file per device.

It holds the pickled Olm account and Olm channels (sealed again with a key
derived from the store key), the device id, the devices seen in the directory with
their ``verified`` flag, the message history (direct and room messages), and the ids
of received payloads that are not chat messages (device verification, room
keys), so that a re-delivered one is recognised as a duplicate too. The rooms
and their Megolm state (sessions, who each was shared with, messages held
until their key comes) are read and written by :mod:`chatd.client.room_store`
on the same connection, in the same transactions when they go together.

Every call runs in a worker thread (``trio.to_thread.run_sync``); a lock
serialises them on the one connection, and each write is one transaction committed with
``synchronous=FULL`` before the call returns.

The schema and its migrations are in :mod:`chatd.client.schema`.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import sqlcipher3
import trio

from .attachments import Attachment
from .errors import ClientStoreError
from .schema import _SCHEMA, SCHEMA_VERSION, migrate

__all__ = ["_SCHEMA", "SCHEMA_VERSION", "DeviceRecord", "HistoryEntry", "LocalStore", "now_ms"]

T = TypeVar("T")
STORE_KEY_BYTES: Final = 32


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class DeviceRecord:
    user_id: int
    device_id: str
    name: str
    ed25519: str
    curve25519: str
    verified: bool
    current: bool


@dataclass(frozen=True)
class HistoryEntry:
    message_id: str
    peer_user_id: int
    direction: str  # in | out
    sender_user_id: int
    sender_device_id: str
    text: str | None  # None when it could not be decrypted
    sent_at: int  # unix ms
    #: out: sending | sent | delivered | expired; in: received | held | undecryptable
    state: str
    room_id: int | None = None  # the room of a room message; None for a direct one
    mentions: tuple[int, ...] = ()  # user ids a room message mentions
    attachment: Attachment | None = None  # a file it carries (save it with save_file)


class LocalStore:
    """The device's encrypted store. Open with :meth:`open`, close with :meth:`aclose`."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    @classmethod
    async def open(cls, path: Path, key: bytes) -> LocalStore:
        """Open (or create) the store. Raises ClientStoreError if the key is wrong."""
        if len(key) != STORE_KEY_BYTES:
            raise ClientStoreError(f"the store key must be {STORE_KEY_BYTES} bytes")

        def connect() -> Any:
            if not path.exists():
                # Private from the start (SQLite gives its -wal and -shm files the
                # same mode); an empty file is an empty database.
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            conn = sqlcipher3.connect(str(path), check_same_thread=False, isolation_level=None)
            # SQLCipher logs a wrong key to stderr itself ("ERROR CORE
            # sqlcipher_page_cipher: hmac check failed"), in the middle of
            # the terminal; the ClientStoreError below says it better. Its
            # log level is process-wide: quiet it for the check only.
            level = conn.execute("PRAGMA cipher_log_level").fetchone()
            conn.execute("PRAGMA cipher_log_level = NONE")
            try:
                conn.execute(f"PRAGMA key = \"x'{key.hex()}'\"")
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
                opened = True
            except sqlcipher3.DatabaseError:
                opened = False
            finally:
                if level and str(level[0]).isalpha():
                    with contextlib.suppress(sqlcipher3.Error):
                        conn.execute(f"PRAGMA cipher_log_level = {level[0]}")
            if not opened:
                conn.close()
                raise ClientStoreError(
                    f"{path}: the store key does not open this file (wrong key or not a store)"
                )
            try:
                conn.execute("PRAGMA synchronous = FULL")
                migrate(conn, path)
            except BaseException:
                conn.close()
                raise
            return conn

        return cls(await trio.to_thread.run_sync(connect))

    async def aclose(self) -> None:
        await self.read(lambda c: c.close())

    async def read(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(connection)`` in a worker thread (no transaction of its own)."""

        def locked() -> T:
            with self._lock:
                return fn(self._conn)

        return await trio.to_thread.run_sync(locked)

    async def write(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(connection)`` in one transaction; returns after the commit.
        The room store and the Olm writes below compose inside one ``fn``."""

        def tx(conn: Any) -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        return await self.read(tx)

    _write = write  # its name before the room store shared it (tests use it)

    # -- meta and Olm state ---------------------------------------------------

    async def meta(self) -> dict[str, str]:
        return dict(await self.read(lambda c: c.execute("SELECT name, value FROM meta").fetchall()))

    async def set_meta(self, **values: str) -> None:
        await self.write(
            lambda c: c.executemany(
                "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", list(values.items())
            )
        )

    async def olm_channels(self) -> list[tuple[str, str]]:
        """(peer curve25519, pickle), most recently used first."""
        rows = await self.read(
            lambda c: c.execute(
                "SELECT peer_curve25519, pickle FROM olm_channels ORDER BY used_at DESC"
            ).fetchall()
        )
        return [(r[0], r[1]) for r in rows]

    @staticmethod
    def write_olm(
        conn: Any,
        account: str | None,
        channels: list[tuple[str, str, str]],
        meta: dict[str, str] | None = None,
    ) -> None:
        if account is not None:
            conn.execute(
                "INSERT OR REPLACE INTO meta (name, value) VALUES ('account', ?)", (account,)
            )
        if meta:
            conn.executemany(
                "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", list(meta.items())
            )
        now = time.time_ns()
        conn.executemany(
            "INSERT OR REPLACE INTO olm_channels (channel_id, peer_curve25519, pickle, used_at)"
            " VALUES (?, ?, ?, ?)",
            [(cid, curve, pickle, now + i) for i, (cid, curve, pickle) in enumerate(channels)],
        )

    async def save_olm(
        self,
        account: str | None,
        channels: list[tuple[str, str, str]],
        meta: dict[str, str] | None = None,
    ) -> None:
        """Olm state (and ``meta`` values that go with it) in one transaction."""
        await self.write(lambda c: self.write_olm(c, account, channels, meta))

    # -- devices --------------------------------------------------------------

    async def devices(self) -> list[DeviceRecord]:
        rows = await self.read(
            lambda c: c.execute(
                "SELECT user_id, device_id, name, ed25519, curve25519, verified, current"
                " FROM devices ORDER BY user_id, device_id"
            ).fetchall()
        )
        return [DeviceRecord(r[0], r[1], r[2], r[3], r[4], bool(r[5]), bool(r[6])) for r in rows]

    async def device(self, user_id: int, device_id: str) -> DeviceRecord | None:
        """One device, by its primary key (what each incoming message needs)."""
        row = await self.read(
            lambda c: c.execute(
                "SELECT user_id, device_id, name, ed25519, curve25519, verified, current"
                " FROM devices WHERE user_id = ? AND device_id = ?",
                (user_id, device_id),
            ).fetchone()
        )
        if row is None:
            return None
        return DeviceRecord(row[0], row[1], row[2], row[3], row[4], bool(row[5]), bool(row[6]))

    async def replace_devices(self, seen: list[DeviceRecord]) -> None:
        """Record the directory: new devices start unverified (unless ``verified`` is
        given, for our own device); devices gone from it are marked not current."""

        def write(conn: Any) -> None:
            conn.execute("UPDATE devices SET current = 0")
            self.upsert_devices(conn, seen)

        await self.write(write)

    async def record_devices(self, seen: list[DeviceRecord]) -> None:
        """Record devices seen outside the directory (a room's member list): new
        ones start unverified, known ones are current again; others are left as
        they are."""

        def write(conn: Any) -> None:
            self.upsert_devices(conn, seen)

        await self.write(write)

    @staticmethod
    def upsert_devices(conn: Any, seen: list[DeviceRecord]) -> None:
        conn.executemany(
            "INSERT INTO devices (user_id, device_id, name, ed25519, curve25519,"
            " verified, first_seen_at, current) VALUES (?, ?, ?, ?, ?, ?, ?, 1)"
            " ON CONFLICT (user_id, device_id) DO UPDATE SET name = excluded.name,"
            " current = 1",
            [
                (d.user_id, d.device_id, d.name, d.ed25519, d.curve25519, int(d.verified), now_ms())
                for d in seen
            ],
        )

    async def set_verified(self, user_id: int, device_id: str, verified: bool) -> bool:
        changed = await self.write(
            lambda c: (
                c.execute(
                    "UPDATE devices SET verified = ? WHERE user_id = ? AND device_id = ?",
                    (int(verified), user_id, device_id),
                ).rowcount
            )
        )
        return bool(changed)

    # -- history --------------------------------------------------------------

    async def has_message(self, message_id: str) -> bool:
        row = await self.read(
            lambda c: c.execute(
                "SELECT 1 FROM messages WHERE message_id = ?"
                " UNION ALL SELECT 1 FROM control_messages WHERE message_id = ?",
                (message_id, message_id),
            ).fetchone()
        )
        return row is not None

    @staticmethod
    def insert_message(conn: Any, e: HistoryEntry, **room: Any) -> bool:
        """Insert a history entry; ``room`` sets the Megolm columns
        (``megolm_session_id``, ``megolm_index``, ``recipients``, ``envelopes``).
        False when the message id is there already."""
        mentions = ",".join(map(str, e.mentions)) if e.room_id is not None else None
        return bool(
            conn.execute(
                "INSERT OR IGNORE INTO messages (message_id, peer_user_id, direction,"
                " sender_user_id, sender_device_id, plaintext, sent_at, state, room_id, mentions,"
                " megolm_session_id, megolm_index, recipients, envelopes, attachment)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    e.message_id,
                    e.peer_user_id,
                    e.direction,
                    e.sender_user_id,
                    e.sender_device_id,
                    e.text,
                    e.sent_at,
                    e.state,
                    e.room_id,
                    mentions,
                    room.get("megolm_session_id"),
                    room.get("megolm_index"),
                    room.get("recipients"),
                    room.get("envelopes"),
                    attachment_column(e.attachment),
                ),
            ).rowcount
        )

    async def add_message(
        self,
        entry: HistoryEntry,
        account: str | None = None,
        channels: list[tuple[str, str, str]] | None = None,
        meta: dict[str, str] | None = None,
    ) -> bool:
        """Store a message (and the Olm state its decryption changed) in one
        transaction. False when the message id was already in the history."""

        def write(conn: Any) -> bool:
            self.write_olm(conn, account, channels or [], meta)
            return self.insert_message(conn, entry)

        return await self.write(write)

    async def add_control(
        self,
        message_id: str,
        kind: str,
        sender: tuple[int, str],
        account: str | None = None,
        channels: list[tuple[str, str, str]] | None = None,
        meta: dict[str, str] | None = None,
    ) -> bool:
        """Record a received payload that is not a chat message (kept out of the
        history), with the Olm state its decryption changed, in one transaction.
        False when the message id was seen before."""

        def write(conn: Any) -> bool:
            self.write_olm(conn, account, channels or [], meta)
            return self.insert_control(conn, message_id, kind, sender)

        return await self.write(write)

    @staticmethod
    def insert_control(conn: Any, message_id: str, kind: str, sender: tuple[int, str]) -> bool:
        return bool(
            conn.execute(
                "INSERT OR IGNORE INTO control_messages (message_id, kind, sender_user_id,"
                " sender_device_id, received_at) VALUES (?, ?, ?, ?, ?)",
                (message_id, kind, sender[0], sender[1], now_ms()),
            ).rowcount
        )

    async def set_state(self, message_id: str, state: str, *, only_from: str | None = None) -> None:
        """Set a message's state; with ``only_from``, only if it is still in that state
        (a receipt may already have moved it on: ``sent`` must not undo ``delivered``)."""
        await self.write(
            lambda c: c.execute(
                "UPDATE messages SET state = ? WHERE message_id = ? AND coalesce(? = state, 1)",
                (state, message_id, only_from),
            )
        )

    async def add_receipt(self, message_id: str, device_id: str, kind: str, counts: bool) -> None:
        """Record a receipt; when it ``counts`` (the device is the recipient's, not
        our own), move the message to ``delivered`` (never back) or ``expired``."""

        def write(conn: Any) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO receipts (message_id, device_id, kind, at)"
                " VALUES (?, ?, ?, ?)",
                (message_id, device_id, kind, now_ms()),
            )
            if counts:
                conn.execute(
                    "UPDATE messages SET state = ? WHERE message_id = ? AND direction = 'out'"
                    " AND state != 'delivered'",
                    (kind, message_id),
                )

        await self.write(write)

    async def history(
        self, peer_user_id: int | None = None, *, room_id: int | None = None
    ) -> list[HistoryEntry]:
        """The conversation with one user (direct messages only), one room's
        messages, or (neither given) everything; oldest first."""
        query = (
            f"SELECT {HISTORY_COLUMNS} FROM messages"  # noqa: S608 - a constant column list
            " WHERE (? IS NULL OR (peer_user_id = ? AND room_id IS NULL))"
            " AND (? IS NULL OR room_id = ?) ORDER BY sent_at, rowid"
        )
        args = (peer_user_id, peer_user_id, room_id, room_id)
        rows = await self.read(lambda c: c.execute(query, args).fetchall())
        return [history_entry(r) for r in rows]


HISTORY_COLUMNS: Final = (
    "message_id, peer_user_id, direction, sender_user_id, sender_device_id,"
    " plaintext, sent_at, state, room_id, mentions, attachment"
)


def history_entry(row: Any) -> HistoryEntry:
    """A :class:`HistoryEntry` from a row of :data:`HISTORY_COLUMNS`."""
    mentions = tuple(int(m) for m in row[9].split(",") if m) if row[9] else ()
    attachment = Attachment.parse(json.loads(row[10])) if row[10] else None
    return HistoryEntry(
        row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], mentions, attachment
    )


def attachment_column(attachment: Attachment | None) -> str | None:
    """The ``attachment`` column of a message (its payload form, as JSON)."""
    return None if attachment is None else json.dumps(attachment.fields())
