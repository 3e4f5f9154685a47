"""The local store's schema and its migrations (see :mod:`chatd.client.store`).

The schema version is ``PRAGMA user_version``. Opening a store first runs the
steps of :data:`_MIGRATIONS` it has not had yet, each in one transaction with
its version bump, and then ``_SCHEMA`` creates whatever table is missing (all
of them in a new file). Steps are append-only, like the server's migrations.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from .errors import ClientStoreError

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
    state TEXT NOT NULL,
    room_id INTEGER,
    mentions TEXT,
    megolm_session_id TEXT,
    megolm_index INTEGER,
    recipients INTEGER,
    envelopes INTEGER,
    unreachable INTEGER,
    attachment TEXT
);
CREATE INDEX IF NOT EXISTS messages_room ON messages (room_id, sent_at);
CREATE UNIQUE INDEX IF NOT EXISTS messages_megolm ON messages (megolm_session_id, megolm_index);
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
CREATE TABLE IF NOT EXISTS rooms (
    room_id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    topic TEXT NOT NULL,
    invite_only INTEGER NOT NULL,
    share_history INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    member_count INTEGER NOT NULL,
    role TEXT,
    epoch INTEGER
);
CREATE TABLE IF NOT EXISTS megolm_outbound (
    room_id INTEGER PRIMARY KEY,
    session_id TEXT NOT NULL,
    pickle TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    messages INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS megolm_inbound (
    room_id INTEGER NOT NULL,
    sender_user_id INTEGER NOT NULL,
    sender_device_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    sender_curve25519 TEXT NOT NULL,
    sender_ed25519 TEXT NOT NULL,
    first_index INTEGER NOT NULL,
    pickle TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (room_id, sender_user_id, sender_device_id, session_id)
);
CREATE TABLE IF NOT EXISTS megolm_shares (
    session_id TEXT NOT NULL,
    user_id INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    room_id INTEGER NOT NULL,
    curve25519 TEXT NOT NULL,
    first_index INTEGER NOT NULL,
    message_id TEXT NOT NULL,
    shared_at INTEGER NOT NULL,
    PRIMARY KEY (session_id, user_id, device_id)
);
CREATE INDEX IF NOT EXISTS megolm_shares_message ON megolm_shares (message_id);
CREATE TABLE IF NOT EXISTS held_messages (
    message_id TEXT PRIMARY KEY,
    room_id INTEGER NOT NULL,
    sender_user_id INTEGER NOT NULL,
    sender_device_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    ciphertext TEXT NOT NULL,
    held_at INTEGER NOT NULL,
    requested_at INTEGER
);
CREATE INDEX IF NOT EXISTS held_messages_session
    ON held_messages (room_id, sender_user_id, sender_device_id, session_id);
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


def _add_room_columns(conn: Any) -> None:
    # 2: rooms. The history holds room messages too (room_id NULL for direct
    # ones), with their mentions, the Megolm session and index that decrypted
    # them (a replay under another message id is refused) and, for our own,
    # how many member users and devices the server queued them for. The new
    # tables come from _SCHEMA.
    old = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'messages'"
    ).fetchone()
    if old is not None:
        have = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
        for column in ROOM_COLUMNS:
            if column.split()[0] not in have:
                conn.execute(f"ALTER TABLE messages ADD COLUMN {column}")


ROOM_COLUMNS: Final = (
    "room_id INTEGER",
    "mentions TEXT",
    "megolm_session_id TEXT",
    "megolm_index INTEGER",
    "recipients INTEGER",
    "envelopes INTEGER",
)


def _add_unreachable(conn: Any) -> None:
    # 3: for our own room messages, how many member users the server could not
    # queue them for (every device of theirs had a full queue: sent.skipped).
    _add_message_column(conn, "unreachable", "INTEGER")


def _add_attachment_column(conn: Any) -> None:
    # 4: attachments. A message that carries a file keeps what its payload
    # said about it (blob id, key, sizes, media type, name: JSON), so that it
    # can be saved after a restart. The key is as secret as the plaintext and
    # lives, like it, only inside the encrypted store.
    _add_message_column(conn, "attachment", "TEXT")


def _add_message_column(conn: Any, name: str, kind: str) -> None:
    """Add a column to an existing messages table (a new one is made with it)."""
    old = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'messages'"
    ).fetchone()
    if old is not None:
        have = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
        if name not in have:
            conn.execute(f"ALTER TABLE messages ADD COLUMN {name} {kind}")  # noqa: S608 - constants


#: Step ``n`` takes a store from schema version ``n - 1`` to ``n``.
_MIGRATIONS: Final[tuple[Callable[[Any], None], ...]] = (
    _rename_olm_sessions,
    _add_room_columns,
    _add_unreachable,
    _add_attachment_column,
)
SCHEMA_VERSION: Final = len(_MIGRATIONS)


def migrate(conn: Any, path: Path) -> None:
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
