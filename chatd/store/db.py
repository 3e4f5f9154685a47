"""Opening SQLCipher connections: key check, pragmas and migrations.

Everything here is synchronous and blocking; callers run it in a thread.

The key check happens before anything can write: a connection is keyed, then
one read of ``sqlite_master`` proves the key decrypts page 1. A wrong key (or
a file that is not an SQLCipher database) fails there, and the file and its
directory are left exactly as they were.

The check for a read-write connection runs first on an *immutable* read-only
connection, which reads the main file alone: no lock, no ``-shm``, no WAL
recovery. That matters after a crash. A read-write connection that finds a
``-wal`` left behind checkpoints it into the main file and deletes the
``-wal`` and ``-shm`` when it closes, even when its key was wrong (the frames
are copied as they are, undecrypted). Page 1 always lives in the main file
(switching to WAL writes it there), so the immutable check proves the key
before any connection that could write is opened.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Final

import sqlcipher3

from chatd.errors import KeyMismatchError, StoreError
from chatd.store.migrations import migrate

#: The first 16 bytes of every *unencrypted* SQLite file.
PLAINTEXT_HEADER: Final = b"SQLite format 3\x00"

Connection = Any  # sqlcipher3 ships no type stubs; this names what we pass around.
DatabaseError = sqlcipher3.dbapi2.DatabaseError


def _looks_plaintext(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(16) == PLAINTEXT_HEADER
    except OSError:
        return False


def connect(path: Path, key: bytes, *, busy_timeout_ms: int, readonly: bool = False) -> Connection:
    """Open and key one connection to ``path``, proving the key is right.

    Raises :class:`KeyMismatchError` when the key does not decrypt the file and
    :class:`StoreError` when the file is a plaintext SQLite database or cannot
    be opened. A ``readonly`` one writes nothing in either case. A read-write
    one is for a file whose key is proven already (:func:`open_writer`
    proves it first, untouched): after a crash with a ``-wal`` left behind,
    a wrong key on it could modify the files.
    """
    if readonly:
        # immutable: no locks, no -wal/-shm files created; enough to prove the key.
        uri = f"file:{path}?mode=ro&immutable=1"
    else:
        uri = f"file:{path}"
    try:
        conn = sqlcipher3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    except sqlcipher3.dbapi2.OperationalError as exc:
        raise StoreError(f"cannot open database {path}: {exc}") from None
    try:
        # SQLCipher logs decryption failures to stderr by default; the error we
        # raise says it better, and journald should not see library noise.
        conn.execute("PRAGMA cipher_log_level = NONE")
        # The key is a hex blob literal: a raw key, no KDF. The statement is
        # never logged.
        conn.execute(f"PRAGMA key = \"x'{key.hex()}'\"")
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except DatabaseError as exc:
        conn.close()
        if _looks_plaintext(path):
            raise StoreError(
                f"{path} is an unencrypted SQLite database; chatd only opens "
                "SQLCipher files (the file was left untouched)"
            ) from None
        if "not a database" in str(exc) or "encrypted" in str(exc):
            raise KeyMismatchError(path) from None
        raise StoreError(f"cannot read database {path}: {exc}") from None
    return conn


def _prove_key_untouched(path: Path, key: bytes) -> None:
    """Before the first read-write open: prove ``key`` on page 1 of the main
    file through an immutable connection, which writes nothing anywhere.
    Raises as :func:`connect` does. A missing or empty file has nothing to
    prove, unless a ``-wal`` is left beside it (which only a foreign tool
    could leave: chatd's first write puts page 1 in the main file).

    Only while nothing writes the file: an immutable read takes no lock, so
    beside a running writer's checkpoint it can read a page mid-write and
    fail the key's check. Connections opened while the store runs (readers,
    an online backup) rely on the writer's proof instead."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        size = 0
    if size > 0:
        close_quietly(connect(path, key, busy_timeout_ms=0, readonly=True))
        return
    wal = path.with_name(path.name + "-wal")
    if wal.exists() and wal.stat().st_size > 0:
        raise StoreError(
            f"{path} is empty but {wal} is not; chatd will not open it (the files were "
            "left untouched): restore the database from a backup"
        )


def open_writer(path: Path, key: bytes, *, busy_timeout_ms: int) -> Connection:
    """Open the single write connection: pragmas, then migrations to the latest schema."""
    new = not path.exists() or path.stat().st_size == 0
    _prove_key_untouched(path, key)
    conn = connect(path, key, busy_timeout_ms=busy_timeout_ms)
    try:
        if new:
            # Must precede the first table to take effect without a VACUUM.
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise StoreError(f"cannot switch {path} to WAL mode (got {mode!r})")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA secure_delete = ON")
        migrate(conn)
        prove_writable(conn)
    except DatabaseError as exc:
        conn.close()
        raise StoreError(f"cannot use database {path} for writing: {exc}") from None
    except BaseException:
        conn.close()
        raise
    return conn


def prove_writable(conn: Connection) -> None:
    """Commit a real (idempotent) write: SQLite opens an unwritable file read-only
    without complaint, and we want to know at start, not at the first write."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        conn.execute(f"PRAGMA user_version = {version}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def open_reader(path: Path, key: bytes, *, busy_timeout_ms: int) -> Connection:
    """A read-only connection of a running store (its writer proved the key)."""
    conn = connect(path, key, busy_timeout_ms=busy_timeout_ms)
    conn.execute("PRAGMA query_only = ON")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def close_quietly(conn: Connection) -> None:
    with contextlib.suppress(Exception):
        conn.close()
