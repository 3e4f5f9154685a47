"""The client's local store: one SQLCipher file per device.

It holds the pickled Olm account and Olm channels (sealed again with a key
derived from the store key), the device id, the devices seen in the directory with
their ``verified`` flag, the message history, and the ids of received
payloads that are not chat messages (device verification), so that a
re-delivered one is recognised as a duplicate too. Every call runs in a worker
thread (``trio.to_thread.run_sync``); a lock serialises them on the one
connection, and each write is one transaction committed with
``synchronous=FULL`` before the call returns.

The schema version is ``PRAGMA user_version``. Opening a store first runs the
steps of :data:`_MIGRATIONS` it has not had yet, each in one transaction with
its version bump, and then ``_SCHEMA`` creates whatever table is missing (all
of them in a new file). Steps are append-only, like the server's migrations.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import sqlcipher3
import trio

from .errors import ClientStoreError

T = TypeVar("T")
STORE_KEY_BYTES: Final = 32

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS olm_channels (
    channel_id TEXT PRIMARY KEY,
    peer_curve25519 TEXT NOT NULL,
    pickle TEXT NOT NULL,
    used_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    user_id INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    name TEXT NOT NULL,
    ed25519 TEXT NOT NULL,
    curve25519 TEXT NOT NULL,
    verified INTEGER NOT NULL DEFAULT 0,
    first_seen_at INTEGER NOT NULL,
    current INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (user_id, device_id)
);
CREATE TABLE IF NOT EXISTS messages (
    message_id TEXT PRIMARY KEY,
    peer_user_id INTEGER NOT NULL,
    direction TEXT NOT NULL CHECK (direction IN ('in', 'out')),
    sender_user_id INTEGER NOT NULL,
    sender_device_id TEXT NOT NULL,
    plaintext TEXT,
    sent_at INTEGER NOT NULL,
    state TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS control_messages (
    message_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    sender_user_id INTEGER NOT NULL,
    sender_device_id TEXT NOT NULL,
    received_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS receipts (
    message_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (message_id, device_id)
);
"""


def _rename_olm_sessions(conn: Any) -> None:
    # 1: the Olm channels' table was olm_sessions, keyed by session_id. Version 0
    # is also a new, empty file: then there is nothing to rename.
    old = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'olm_sessions'"
    ).fetchone()
    if old is not None:
        conn.execute("ALTER TABLE olm_sessions RENAME TO olm_channels")
        conn.execute("ALTER TABLE olm_channels RENAME COLUMN session_id TO channel_id")


#: Step ``n`` takes a store from schema version ``n - 1`` to ``n``.
_MIGRATIONS: Final[tuple[Callable[[Any], None], ...]] = (_rename_olm_sessions,)
SCHEMA_VERSION: Final = len(_MIGRATIONS)


def _migrate(conn: Any, path: Path) -> None:
    """Bring a store to :data:`SCHEMA_VERSION`. Raises ClientStoreError for a
    store from a newer client."""
    found = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if found > SCHEMA_VERSION:
        raise ClientStoreError(
            f"{path}: the store has schema version {found}, but this client knows up to "
            f"{SCHEMA_VERSION}; upgrade chatd"
        )
    for version in range(found + 1, SCHEMA_VERSION + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            _MIGRATIONS[version - 1](conn)
            conn.execute(f"PRAGMA user_version = {version}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    conn.executescript(_SCHEMA)


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
    state: str  # out: sending | sent | delivered | expired; in: received | undecryptable


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
            try:
                conn.execute(f"PRAGMA key = \"x'{key.hex()}'\"")
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            except sqlcipher3.DatabaseError:
                conn.close()
                raise ClientStoreError(
                    f"{path}: the store key does not open this file (wrong key or not a store)"
                ) from None
            try:
                conn.execute("PRAGMA synchronous = FULL")
                _migrate(conn, path)
            except BaseException:
                conn.close()
                raise
            return conn

        return cls(await trio.to_thread.run_sync(connect))

    async def aclose(self) -> None:
        await self._run(lambda c: c.close())

    async def _run(self, fn: Callable[[Any], T]) -> T:
        def locked() -> T:
            with self._lock:
                return fn(self._conn)

        return await trio.to_thread.run_sync(locked)

    async def _write(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn`` in one transaction; returns after the commit."""

        def tx(conn: Any) -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        return await self._run(tx)

    # -- meta and Olm state ---------------------------------------------------

    async def meta(self) -> dict[str, str]:
        return dict(await self._run(lambda c: c.execute("SELECT name, value FROM meta").fetchall()))

    async def set_meta(self, **values: str) -> None:
        await self._write(
            lambda c: c.executemany(
                "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", list(values.items())
            )
        )

    async def olm_channels(self) -> list[tuple[str, str]]:
        """(peer curve25519, pickle), most recently used first."""
        rows = await self._run(
            lambda c: c.execute(
                "SELECT peer_curve25519, pickle FROM olm_channels ORDER BY used_at DESC"
            ).fetchall()
        )
        return [(r[0], r[1]) for r in rows]

    @staticmethod
    def _save_olm(
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
        await self._write(lambda c: self._save_olm(c, account, channels, meta))

    # -- devices --------------------------------------------------------------

    async def devices(self) -> list[DeviceRecord]:
        rows = await self._run(
            lambda c: c.execute(
                "SELECT user_id, device_id, name, ed25519, curve25519, verified, current"
                " FROM devices ORDER BY user_id, device_id"
            ).fetchall()
        )
        return [DeviceRecord(r[0], r[1], r[2], r[3], r[4], bool(r[5]), bool(r[6])) for r in rows]

    async def device(self, user_id: int, device_id: str) -> DeviceRecord | None:
        """One device, by its primary key (what each incoming message needs)."""
        row = await self._run(
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
            for d in seen:
                conn.execute(
                    "INSERT INTO devices (user_id, device_id, name, ed25519, curve25519,"
                    " verified, first_seen_at, current) VALUES (?, ?, ?, ?, ?, ?, ?, 1)"
                    " ON CONFLICT (user_id, device_id) DO UPDATE SET name = excluded.name,"
                    " current = 1",
                    (
                        d.user_id,
                        d.device_id,
                        d.name,
                        d.ed25519,
                        d.curve25519,
                        int(d.verified),
                        now_ms(),
                    ),
                )

        await self._write(write)

    async def set_verified(self, user_id: int, device_id: str, verified: bool) -> bool:
        changed = await self._write(
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
        row = await self._run(
            lambda c: c.execute(
                "SELECT 1 FROM messages WHERE message_id = ?"
                " UNION ALL SELECT 1 FROM control_messages WHERE message_id = ?",
                (message_id, message_id),
            ).fetchone()
        )
        return row is not None

    @staticmethod
    def _insert(conn: Any, e: HistoryEntry) -> bool:
        return bool(
            conn.execute(
                "INSERT OR IGNORE INTO messages (message_id, peer_user_id, direction,"
                " sender_user_id, sender_device_id, plaintext, sent_at, state)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    e.message_id,
                    e.peer_user_id,
                    e.direction,
                    e.sender_user_id,
                    e.sender_device_id,
                    e.text,
                    e.sent_at,
                    e.state,
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
            self._save_olm(conn, account, channels or [], meta)
            return self._insert(conn, entry)

        return await self._write(write)

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
            self._save_olm(conn, account, channels or [], meta)
            return bool(
                conn.execute(
                    "INSERT OR IGNORE INTO control_messages (message_id, kind, sender_user_id,"
                    " sender_device_id, received_at) VALUES (?, ?, ?, ?, ?)",
                    (message_id, kind, sender[0], sender[1], now_ms()),
                ).rowcount
            )

        return await self._write(write)

    async def set_state(self, message_id: str, state: str, *, only_from: str | None = None) -> None:
        """Set a message's state; with ``only_from``, only if it is still in that state
        (a receipt may already have moved it on: ``sent`` must not undo ``delivered``)."""
        await self._write(
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

        await self._write(write)

    async def history(self, peer_user_id: int | None = None) -> list[HistoryEntry]:
        query = (
            "SELECT message_id, peer_user_id, direction, sender_user_id, sender_device_id,"
            " plaintext, sent_at, state FROM messages"
            " WHERE ? IS NULL OR peer_user_id = ? ORDER BY sent_at, rowid"
        )
        rows = await self._run(lambda c: c.execute(query, (peer_user_id, peer_user_id)).fetchall())
        return [HistoryEntry(*r) for r in rows]
