"""Copying one SQLCipher database into a new file under another key, and
reading what a backup holds.

Everything here is synchronous and blocking; callers run it in a thread.

Theory of operation
-------------------
SQLCipher cannot run SQLite's backup API between files with different keys,
so a copy is made with SQL on ONE connection to the source: the target is
``ATTACH``-ed with its own key, then, inside one read transaction on the
source, the schema is re-created and each table is copied in chunks of
``chunk_rows`` rows by ``INSERT INTO target.t SELECT ... WHERE key > last
ORDER BY key LIMIT n`` (the key is the rowid, or the primary key of a
``WITHOUT ROWID`` table). Because every chunk is read in the same transaction,
the copy is a snapshot: in WAL mode the writer keeps committing meanwhile and
none of its later commits shows up in the copy. Each chunk is one
``sqlite3_step``, during which Python's GIL is released, so a chunk costs the
event loop one GIL hand-off, not one per row. Between chunks the copy reports
progress, may pause, and checks whether it was cancelled.

Indexes and triggers are made after the data (triggers must not fire on the
copied rows); ``sqlite_sequence`` and ``PRAGMA user_version`` (the schema
version) are copied as they are.

The target is written to a temporary name beside it without a journal
(nothing else reads it), fsync-ed, then renamed into place and its directory
fsync-ed. A failure or cancellation deletes the temporary file: there is
never a partial file under the target's name.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from chatd.errors import BackupError, KeyMismatchError, StoreError
from chatd.store.db import Connection, DatabaseError, close_quietly, connect

ATTACHED: Final = "target"
_CACHE_KIB: Final = 8_192  # page cache of the target while copying (KiB)
_SYNC_EVERY_PAGES: Final = 16_384  # fsync the target every this many pages (64 MiB at 4 KiB)


class CopyCancelled(BackupError):
    """The copy was cancelled; its temporary file is gone."""


@dataclass
class Progress:
    """How far a copy is. Written by the copying thread, read by anyone
    (each field is one int or str: a read sees a recent value)."""

    phase: str = "starting"  # starting, copying, indexing, syncing, done
    table: str = ""
    tables_done: int = 0
    tables_total: int = 0
    rows_done: int = 0
    rows_total: int = 0  # the tables' row counts in the snapshot
    pages_written: int = 0  # pages of the target so far
    pages_synced: int = 0  # of which fsync-ed


@dataclass(frozen=True)
class CopyResult:
    schema_version: int
    rows: dict[str, int] = field(default_factory=dict)  # table -> rows copied
    bytes: int = 0


def quote(name: str) -> str:
    """An SQL identifier, quoted."""
    return '"' + name.replace('"', '""') + '"'


def _key_literal(key: bytes) -> str:
    # The raw-key form SQLCipher takes as the KEY of an ATTACH (never logged).
    return f"x'{key.hex()}'"


def fsync_path(path: Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class _Table:
    name: str
    sql: str
    columns: tuple[str, ...]
    order: tuple[str, ...]  # the chunking key: ("rowid",) or the primary key's columns


def _tables(conn: Connection) -> list[_Table]:
    listed = {
        row[1]: bool(row[4])  # name -> WITHOUT ROWID
        for row in conn.execute("PRAGMA main.table_list").fetchall()
        if row[2] == "table"
    }
    rows = conn.execute(
        "SELECT name, sql FROM main.sqlite_master WHERE type = 'table'"
        " AND name NOT LIKE 'sqlite_%' ORDER BY rowid"
    ).fetchall()
    tables = []
    for name, sql in rows:
        info = conn.execute(f"PRAGMA main.table_info({quote(name)})").fetchall()
        columns = tuple(row[1] for row in info)
        if listed.get(name, False):
            order = tuple(row[1] for row in sorted(info, key=lambda r: r[5]) if row[5] > 0)
        else:
            order = ("rowid",)
        tables.append(_Table(name, sql, columns, order))
    return tables


def _copy_table(
    conn: Connection,
    table: _Table,
    progress: Progress,
    cancel: threading.Event,
    *,
    chunk_rows: int,
    pause_s: float,
    part: Path,
) -> int:
    src, dst = f"main.{quote(table.name)}", f"{ATTACHED}.{quote(table.name)}"
    keyed = table.order == ("rowid",)
    cols = ", ".join(map(quote, table.columns))
    key = ["rowid"] if keyed else [quote(c) for c in table.order]
    key_cols = ", ".join(key)
    copied_cols = f"rowid, {cols}" if keyed else cols
    marks = ", ".join("?" * len(key))
    # Names come from sqlite_master and are quoted; values are ? parameters.
    first = f"INSERT INTO {dst} ({copied_cols}) SELECT {copied_cols} FROM {src}"  # noqa: S608
    next_ = f"{first} WHERE ({key_cols}) > ({marks})"
    tail = f" ORDER BY {key_cols} LIMIT ?"
    # The last key copied so far: the largest in the target (a b-tree seek).
    desc = ", ".join(f"{c} DESC" for c in key)
    last_sql = f"SELECT {key_cols} FROM {dst} ORDER BY {desc} LIMIT 1"  # noqa: S608
    copied = 0
    last: tuple[object, ...] | None = None
    while True:
        if cancel.is_set():
            raise CopyCancelled("the backup was cancelled; no file was left")
        if last is None:
            cur = conn.execute(first + tail, (chunk_rows,))
        else:
            cur = conn.execute(next_ + tail, (*last, chunk_rows))
        n = cur.rowcount
        if n <= 0:
            break
        copied += n
        progress.rows_done += n
        last = tuple(conn.execute(last_sql).fetchone())
        pages = int(conn.execute(f"PRAGMA {ATTACHED}.page_count").fetchone()[0])
        progress.pages_written = pages
        if pages - progress.pages_synced >= _SYNC_EVERY_PAGES:
            # Write back as we go rather than in one burst at the end, which
            # would queue the store writer's own fsyncs behind it.
            fsync_path(part)
            progress.pages_synced = pages
        if n < chunk_rows:
            break
        if pause_s:
            time.sleep(pause_s)
    return copied


@contextmanager
def _attached(
    source: Path, source_key: bytes, part: Path, target_key: bytes
) -> Iterator[Connection]:
    conn = connect(source, source_key, busy_timeout_ms=60_000)
    try:
        conn.execute(
            f"ATTACH DATABASE ? AS {ATTACHED} KEY ?", (str(part), _key_literal(target_key))
        )
        yield conn
    finally:
        close_quietly(conn)


def copy_database(
    source: Path,
    source_key: bytes,
    target: Path,
    target_key: bytes,
    *,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    chunk_rows: int = 2_000,
    pause_s: float = 0.0,
) -> CopyResult:
    """Copy ``source`` (opened with ``source_key``) to a new file ``target``
    encrypted with ``target_key``: a consistent snapshot (see the module
    docstring), with the same schema version.

    Raises :class:`KeyMismatchError` when ``source_key`` does not open the
    source, :class:`CopyCancelled` when ``cancel`` was set, and
    :class:`BackupError` when ``target`` exists or cannot be written or the
    source cannot be read. In every failure no file is left at ``target``
    nor at its temporary name.
    """
    progress = progress or Progress()
    cancel = cancel or threading.Event()
    if target.exists():
        raise BackupError(f"{target} already exists; it was left as it is")
    part = target.with_name(f".{target.name}.part")
    try:
        part.unlink(missing_ok=True)  # left by a crash (never by a failure: see below)
    except OSError as exc:
        raise BackupError(f"cannot write to {target.parent}: {exc.strerror}") from None
    try:
        result = _copy(source, source_key, part, target_key, progress, cancel, chunk_rows, pause_s)
        progress.phase = "syncing"
        fsync_path(part)
        if target.exists():
            raise BackupError(f"{target} appeared while copying; it was left as it is")
        os.rename(part, target)
        fsync_path(target.parent, directory=True)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    progress.phase = "done"
    return CopyResult(result.schema_version, result.rows, target.stat().st_size)


def _copy(
    source: Path,
    source_key: bytes,
    part: Path,
    target_key: bytes,
    progress: Progress,
    cancel: threading.Event,
    chunk_rows: int,
    pause_s: float,
) -> CopyResult:
    if not source.is_file():
        raise BackupError(f"{source} does not exist")
    try:
        with _attached(source, source_key, part, target_key) as conn:
            conn.execute(f"PRAGMA {ATTACHED}.journal_mode = OFF")  # a failed copy is deleted
            conn.execute(f"PRAGMA {ATTACHED}.synchronous = OFF")  # fsync-ed once, at the end
            conn.execute(f"PRAGMA {ATTACHED}.cache_size = -{_CACHE_KIB}")
            vacuum = int(conn.execute("PRAGMA main.auto_vacuum").fetchone()[0])
            conn.execute(f"PRAGMA {ATTACHED}.auto_vacuum = {vacuum}")  # before the first table
            conn.execute("BEGIN")
            try:
                result = _copy_snapshot(conn, progress, cancel, chunk_rows, pause_s, part)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute(f"DETACH DATABASE {ATTACHED}")
            return result
    except KeyMismatchError:
        raise
    except StoreError as exc:
        raise BackupError(str(exc)) from None
    except DatabaseError as exc:
        raise BackupError(f"the copy of {source} failed and was deleted: {exc}") from None


def _copy_snapshot(
    conn: Connection,
    progress: Progress,
    cancel: threading.Event,
    chunk_rows: int,
    pause_s: float,
    part: Path,
) -> CopyResult:
    # The first read opens the snapshot every later read sees.
    version = int(conn.execute("PRAGMA main.user_version").fetchone()[0])
    tables = _tables(conn)
    progress.tables_total = len(tables)
    progress.rows_total = sum(
        int(conn.execute(f"SELECT count(*) FROM main.{quote(t.name)}").fetchone()[0])  # noqa: S608
        for t in tables
    )
    for t in tables:
        conn.execute(_in_target(t.sql, "TABLE", t.name))
    progress.phase = "copying"
    rows: dict[str, int] = {}
    for t in tables:
        progress.table = t.name
        rows[t.name] = _copy_table(
            conn, t, progress, cancel, chunk_rows=chunk_rows, pause_s=pause_s, part=part
        )
        progress.tables_done += 1
    if conn.execute("SELECT 1 FROM main.sqlite_master WHERE name = 'sqlite_sequence'").fetchone():
        conn.execute(f"DELETE FROM {ATTACHED}.sqlite_sequence")  # noqa: S608 - a constant
        conn.execute(
            f"INSERT INTO {ATTACHED}.sqlite_sequence SELECT * FROM main.sqlite_sequence"  # noqa: S608
        )
    progress.phase = "indexing"
    later = conn.execute(
        "SELECT type, name, sql FROM main.sqlite_master WHERE type IN ('index', 'trigger', 'view')"
        " AND sql IS NOT NULL ORDER BY type = 'trigger', rowid"
    ).fetchall()
    for kind, name, sql in later:
        if cancel.is_set():
            raise CopyCancelled("the backup was cancelled; no file was left")
        conn.execute(_in_target(sql, kind.upper(), name))
    conn.execute(f"PRAGMA {ATTACHED}.user_version = {version}")
    progress.pages_written = int(conn.execute(f"PRAGMA {ATTACHED}.page_count").fetchone()[0])
    return CopyResult(version, rows)


def _in_target(sql: str, kind: str, name: str) -> str:
    """``CREATE <kind> name ...`` made to create it in the attached target.

    The statement comes from sqlite_master, which stores it as written; the
    object name is the first thing after the kind (and ``UNIQUE``/``IF NOT
    EXISTS``), so the schema prefix goes right before it.
    """
    at = sql.upper().find(kind)
    if at < 0:
        raise BackupError(f"cannot copy the schema of {name!r}")
    head, rest = sql[:at], sql[at + len(kind) :].lstrip()
    if rest.upper().startswith("IF NOT EXISTS"):
        return f"{head}{kind} IF NOT EXISTS {ATTACHED}.{rest[len('IF NOT EXISTS') :].lstrip()}"
    return f"{head}{kind} {ATTACHED}.{rest}"
