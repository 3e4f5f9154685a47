"""The store: real SQLCipher files, group commit, key checks, migrations."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from chatd.config import StoreSettings
from chatd.errors import KeyMismatchError, SchemaTooNewError, StoreClosedError, StoreError
from chatd.store import Store, serve_store
from chatd.store.db import PLAINTEXT_HEADER, connect, open_reader, open_writer
from chatd.store.migrations import MIGRATIONS, SCHEMA_VERSION, migrate, schema_version

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


@asynccontextmanager
async def open_store(path: Path, key: bytes = KEY, **settings: Any) -> AsyncIterator[Store]:
    try:
        async with trio.open_nursery() as nursery:
            store = await nursery.start(serve_store, path, key, StoreSettings(**settings))
            try:
                yield store
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # Startup failures arrive wrapped by the nursery; tests check the error itself.
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], StoreError):
            raise group.exceptions[0] from None
        raise


def insert_audit(path: str, status: int = 200) -> Any:
    def fn(conn: Any) -> int:
        cur = conn.execute(
            "INSERT INTO admin_audit (at, method, path, status) VALUES (1, 'GET', ?, ?)",
            (path, status),
        )
        return int(cur.lastrowid)

    return fn


def count_audit(conn: Any) -> int:
    return int(conn.execute("SELECT count(*) FROM admin_audit").fetchone()[0])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_a_write_is_readable_after_it_returns(short_tmp: Path) -> None:
    async with open_store(short_tmp / "c.db") as store:
        row_id = await store.write(insert_audit("/x"))
        assert row_id == 1
        assert await store.read(count_audit) == 1


async def test_concurrent_writes_share_commits(short_tmp: Path) -> None:
    async with open_store(short_tmp / "c.db") as store:
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(store.write, insert_audit(f"/{i}"))
        assert await store.read(count_audit) == 200
        assert store.stats.jobs >= 200
        assert store.stats.commits < store.stats.jobs  # grouped, not one commit each
        assert store.stats.largest_batch > 1


async def test_per_write_mode_commits_each_write_alone(short_tmp: Path) -> None:
    async with open_store(short_tmp / "c.db", group_commit=False) as store:
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(store.write, insert_audit(f"/{i}"))
        assert store.stats.largest_batch == 1
        assert await store.read(count_audit) == 20


async def test_a_failing_write_rolls_back_alone(short_tmp: Path) -> None:
    async with open_store(short_tmp / "c.db") as store:

        def half_then_fail(conn: Any) -> None:
            insert_audit("/doomed")(conn)
            raise ValueError("boom")

        results: list[Any] = []

        async def attempt(fn: Any) -> None:
            try:
                results.append(await store.write(fn))
            except ValueError as exc:
                results.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(attempt, insert_audit("/a"))
            nursery.start_soon(attempt, half_then_fail)
            nursery.start_soon(attempt, insert_audit("/b"))
        assert sum(isinstance(r, ValueError) for r in results) == 1
        paths = await store.read(
            lambda c: sorted(r[0] for r in c.execute("SELECT path FROM admin_audit"))
        )
        assert paths == ["/a", "/b"]


async def test_backpressure_bounds_pending_writes_without_losing_any(short_tmp: Path) -> None:
    async with open_store(short_tmp / "c.db", max_pending_writes=2, max_batch_writes=3) as store:
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(store.write, insert_audit(f"/{i}"))
        assert await store.read(count_audit) == 50
        assert store.stats.largest_batch <= 2


async def test_writes_after_shutdown_are_refused(short_tmp: Path) -> None:
    async with open_store(short_tmp / "c.db") as store:
        pass
    with pytest.raises(StoreClosedError):
        await store.write(insert_audit("/late"))


async def test_shutdown_commits_what_was_queued(short_tmp: Path) -> None:
    path = short_tmp / "c.db"
    async with trio.open_nursery() as nursery:
        store = await nursery.start(serve_store, path, KEY, StoreSettings())
        done = 0

        async def writer(i: int) -> None:
            nonlocal done
            await store.write(insert_audit(f"/{i}"))
            done += 1

        for i in range(100):
            nursery.start_soon(writer, i)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    conn = connect(path, KEY, busy_timeout_ms=1000)
    # Every write that was handed to the writer before shutdown is durable,
    # including those whose callers were cancelled while waiting.
    assert count_audit(conn) >= done
    assert count_audit(conn) == 100
    conn.close()


async def test_pragmas_are_set(short_tmp: Path) -> None:
    async with open_store(short_tmp / "c.db") as store:
        pragmas = await store.write(
            lambda c: {
                name: c.execute(f"PRAGMA {name}").fetchone()[0]
                for name in (
                    "journal_mode",
                    "synchronous",
                    "foreign_keys",
                    "secure_delete",
                    "auto_vacuum",
                )
            }
        )
    assert pragmas == {
        "journal_mode": "wal",
        "synchronous": 2,  # FULL
        "foreign_keys": 1,
        "secure_delete": 1,
        "auto_vacuum": 2,  # INCREMENTAL
    }


async def test_nothing_readable_in_the_database_files(short_tmp: Path) -> None:
    marker = "MARKER-7f3a9c-plaintext-must-not-appear"
    path = short_tmp / "c.db"
    files = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]

    def check(existing_only: bool) -> int:
        seen = 0
        for f in files:
            if existing_only and not f.exists():
                continue
            data = f.read_bytes()
            seen += 1
            assert marker.encode() not in data, f"{f.name} holds the marker in plaintext"
            assert marker.encode("utf-16-le") not in data
            assert PLAINTEXT_HEADER not in data, f"{f.name} has a plaintext SQLite header"
        return seen

    async with open_store(path) as store:
        for _ in range(20):
            await store.write(insert_audit(marker))
        # While open: the database, its WAL and its shared-memory index.
        assert check(existing_only=False) == 3
    check(existing_only=True)
    assert marker.encode() not in path.read_bytes()


async def test_a_wrong_key_is_refused_and_the_file_left_untouched(short_tmp: Path) -> None:
    path = short_tmp / "c.db"
    async with open_store(path) as store:
        await store.write(insert_audit("/x"))
    before = digest(path)
    mtime = path.stat().st_mtime_ns
    listing = sorted(os.listdir(short_tmp))
    with pytest.raises(KeyMismatchError) as info:
        async with open_store(path, OTHER_KEY):
            pass  # pragma: no cover - opening fails
    assert str(info.value).startswith(f"the database key does not match {path}")
    assert info.value.exit_code == 2
    assert digest(path) == before
    assert path.stat().st_mtime_ns == mtime
    assert sorted(os.listdir(short_tmp)) == listing  # no -wal or -journal left behind
    # The right key still opens it, with the data intact.
    async with open_store(path) as store:
        assert await store.read(count_audit) == 1


async def test_a_plaintext_sqlite_file_is_refused(short_tmp: Path) -> None:
    path = short_tmp / "plain.db"
    plain = sqlite3.connect(path)
    plain.execute("CREATE TABLE t (x)")
    plain.commit()
    plain.close()
    before = digest(path)
    with pytest.raises(StoreError, match="unencrypted SQLite"):
        async with open_store(path):
            pass  # pragma: no cover - opening fails
    assert digest(path) == before


def _sample_rows(conn: Any, version: int) -> dict[str, int]:
    """Put one row in every table that exists at ``version``; return table -> count."""
    rows = {}
    # Migration 7 renamed columns to their wire names: write the names of ``version``.
    renamed = version >= 7
    ip = "ip" if renamed else "last_ip"
    curve = "curve25519" if renamed else "curve25519_key"
    recipient, sender_user, sender_device, sent_at = (
        ("recipient_device_id", "sender_user_id", "sender_device_id", "sent_at")
        if renamed
        else ("recipient_device", "sender_user", "sender_device", "created_at")
    )
    if version >= 1:
        conn.execute(
            "INSERT INTO retention_runs"
            " (job, started_at, duration_ms, rows_purged, bytes_reclaimed)"
            " VALUES ('j', 1, 2, 3, 4)"
        )
        rows["retention_runs"] = 1
    if version >= 2:
        conn.execute(
            "INSERT INTO admin_audit (at, method, path, status) VALUES (1, 'GET', '/', 200)"
        )
        rows["admin_audit"] = 1
    if version >= 3:
        conn.execute(
            "INSERT INTO users (username, username_key, role, password_hash,"
            " password_changed_at, created_at) VALUES ('Al', 'al', 'user', 'h', 1, 1)"
        )
        conn.execute("INSERT INTO recovery_codes (user_id, code_hash) VALUES (1, x'00')")
        conn.execute(
            "INSERT INTO invites (code_hash, role, note, created_at, expires_at)"
            " VALUES (x'01', 'user', '', 1, 2)"
        )
        conn.execute(
            f"INSERT INTO sessions (user_id, device_name, created_at, last_seen_at, {ip},"  # noqa: S608 - column names
            " expires_at, access_hash, access_expires_at, refresh_hash)"
            " VALUES (1, 'd', 1, 1, '-', 2, x'02', 2, x'03')"
        )
        conn.execute(
            "INSERT INTO spent_refresh_tokens (token_hash, session_id, spent_at)"
            " VALUES (x'04', 1, 1)"
        )
        conn.execute(
            "INSERT INTO auth_audit (at, event, outcome, ip) VALUES (1, 'login', 'ok', '-')"
        )
        if version >= 4:
            conn.execute(
                "INSERT INTO devices (id, user_id, name, created_at, last_seen_at)"
                " VALUES ('DEV', 1, 'phone', 1, 1)"
            )
            conn.execute(
                f"INSERT INTO one_time_keys (device_id, key_id, {curve}, signature,"  # noqa: S608 - column names
                " uploaded_at) VALUES ('DEV', 'k', 'c', 's', 1)"
            )
            conn.execute(
                f"INSERT INTO fallback_keys (device_id, key_id, {curve}, signature,"  # noqa: S608 - column names
                " uploaded_at) VALUES ('DEV', 'f', 'c', 's', 1)"
            )
            for table in ("devices", "one_time_keys", "fallback_keys"):
                rows[table] = 1
        if version >= 5:
            conn.execute(
                f"INSERT INTO envelopes ({recipient}, kind, message_id, {sender_user},"  # noqa: S608 - column names
                f" {sender_device}, ciphertext, {sent_at}, expires_at)"
                " VALUES ('DEV', 'message', 'm', 1, 'DEV', x'00', 1, 2)"
            )
            conn.execute(
                f"INSERT INTO sends ({sender_device}, message_id, envelopes, created_at)"  # noqa: S608 - column names
                " VALUES ('DEV', 'm', 1, 1)"
            )
            rows["envelopes"] = rows["sends"] = 1
        if version >= 6:
            rows["queue_totals"] = 1  # made by a trigger for the envelope above
        if version >= 8:
            conn.execute(
                "INSERT INTO rooms (kind, name, topic, invite_only, share_history, created_at,"
                " epoch) VALUES ('group', 'ops', '', 1, 0, 1, 1)"
            )
            conn.execute(
                "INSERT INTO room_members (room_id, user_id, role, joined_at)"
                " VALUES (1, 1, 'owner', 1)"
            )
            conn.execute(
                "INSERT INTO room_invites (room_id, user_id, by_user_id, invited_at)"
                " VALUES (1, 1, 1, 1)"
            )
            conn.execute(
                "INSERT INTO room_log (id, room_id, kind, message_id, sender_user_id,"
                " sender_device_id, ciphertext, sent_at, expires_at)"
                " VALUES (10, 1, 'room_message', 'r', 1, 'DEV', x'00', 1, 2)"
            )
            conn.execute(
                "INSERT INTO room_devices (device_id, room_id, from_id) VALUES ('DEV', 1, 0)"
            )
            for table in ("rooms", "room_members", "room_invites", "room_log", "room_devices"):
                rows[table] = 1
        if version >= 9:
            conn.execute(
                "INSERT INTO push_endpoints (device_id, url, p256dh, auth, created_at)"
                " VALUES ('DEV', 'https://push.example/up', NULL, NULL, 1)"
            )
            rows["push_endpoints"] = 1
        for table in (
            "users",
            "recovery_codes",
            "invites",
            "sessions",
            "spent_refresh_tokens",
            "auth_audit",
        ):
            rows[table] = 1
    if version >= 10:
        conn.execute(
            "INSERT INTO blobs (blob_id, owner_user_id, size, created_at, expires_at)"
            " VALUES ('" + "ab" * 32 + "', 1, 10, 1, 2)"
        )
        conn.execute("INSERT INTO blob_devices VALUES ('" + "ab" * 32 + "', 'DEV')")
        conn.execute("INSERT INTO blob_rooms VALUES ('" + "ab" * 32 + "', 1)")
        for table in ("blobs", "blob_devices", "blob_rooms"):
            rows[table] = 1
    if version >= 11:
        conn.execute(
            "INSERT INTO consent_documents (kind, version, url, title, set_at)"
            " VALUES ('terms', '2026-12', 'https://example.org/terms', 'Terms', 1)"
        )
        conn.execute(
            "INSERT INTO consent_records (user_id, kind, version, action, at, session_id,"
            " device_id) VALUES (1, 'terms', '2026-12', 'accepted', 2, 1, 'DEV')"
        )
        for table in ("consent_documents", "consent_records"):
            rows[table] = 1
    # The erasure migration (by table, not number: migrations are renumbered on merge).
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'erasure_receipts'").fetchone():
        conn.execute("UPDATE users SET erase_after = 5 WHERE id = 1")
        conn.execute(
            "INSERT INTO erasure_receipts (user_id, erased_at, receipt) VALUES (7, 1, '{}')"
        )
        rows["erasure_receipts"] = 1
    # User ids never reused: its one row is made by the migration itself.
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'user_id_high_water'").fetchone():
        rows["user_id_high_water"] = 1
    return rows


@pytest.mark.parametrize("start", range(SCHEMA_VERSION))
def test_upgrade_from_every_earlier_schema_version(short_tmp: Path, start: int) -> None:
    path = short_tmp / "old.db"
    conn = connect(path, KEY, busy_timeout_ms=1000)
    conn.execute("PRAGMA journal_mode = WAL")
    migrate(conn, target=start)
    assert schema_version(conn) == start
    rows = _sample_rows(conn, start)
    conn.close()

    conn = open_writer(path, KEY, busy_timeout_ms=1000)
    assert schema_version(conn) == SCHEMA_VERSION
    for table, count in rows.items():
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == count  # noqa: S608
    # The upgraded schema is the same as a fresh one.
    fresh = open_writer(short_tmp / "fresh.db", KEY, busy_timeout_ms=1000)
    schema = "SELECT type, name, sql FROM sqlite_master ORDER BY name"
    assert conn.execute(schema).fetchall() == fresh.execute(schema).fetchall()
    conn.close()
    fresh.close()


def test_every_migration_is_covered_by_the_sample_rows() -> None:
    # A new migration must extend _sample_rows so upgrades are tested with data.
    conn = sqlite3.connect(":memory:")
    migrate(conn)
    tables = {
        r[0]
        for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        if not r[0].startswith("sqlite_")  # SQLite's own, e.g. sqlite_sequence
    }
    assert set(_sample_rows(conn, len(MIGRATIONS))) == tables


def test_a_database_from_a_newer_chatd_is_refused(short_tmp: Path) -> None:
    path = short_tmp / "new.db"
    conn = open_writer(path, KEY, busy_timeout_ms=1000)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(SchemaTooNewError, match="upgrade chatd"):
        open_writer(path, KEY, busy_timeout_ms=1000)


async def test_cancelled_callers_do_not_free_queue_slots_early(short_tmp: Path) -> None:
    running, release = threading.Event(), threading.Event()

    def blocker(conn: Any) -> None:
        running.set()
        release.wait(10)  # holds the writer busy, so queued jobs pile up

    async with open_store(short_tmp / "c.db", max_pending_writes=3) as store:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.write, blocker)
            await trio.to_thread.run_sync(running.wait)
            async with trio.open_nursery() as waiters:
                for i in range(10):
                    waiters.start_soon(store.write, insert_audit(f"/{i}"))
                await trio.testing.wait_all_tasks_blocked()
                waiters.cancel_scope.cancel()  # every waiter gives up
            # Their slots stay taken until their jobs complete, so the bound
            # holds: the blocker plus two queued jobs at most.
            assert store._pending.value == 0
            release.set()
        await store.write(lambda conn: None)  # FIFO: everything queued before is done
        assert await store.read(count_audit) == 2
        assert store._pending.value == 3


def test_an_unwritable_database_is_refused_at_open(short_tmp: Path) -> None:
    from chatd.store.db import prove_writable

    path = short_tmp / "c.db"
    open_writer(path, KEY, busy_timeout_ms=1000).close()
    # SQLite silently opens a file it may not write read-only; the writer
    # proves it can commit before chatd reports ready.
    conn = connect(path, KEY, busy_timeout_ms=1000, readonly=True)
    with pytest.raises(Exception, match="readonly"):
        prove_writable(conn)
    conn.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to a 0400 file")
def test_a_read_only_database_file_fails_to_open_for_writing(short_tmp: Path) -> None:
    path = short_tmp / "c.db"
    open_writer(path, KEY, busy_timeout_ms=1000).close()
    os.chmod(path, 0o400)
    with pytest.raises(StoreError, match="cannot use database"):
        open_writer(path, KEY, busy_timeout_ms=1000)


def test_checking_the_key_leaves_no_files_behind(short_tmp: Path) -> None:
    path = short_tmp / "c.db"
    open_writer(path, KEY, busy_timeout_ms=1000).close()
    listing = sorted(os.listdir(short_tmp))
    connect(path, KEY, busy_timeout_ms=1000, readonly=True).close()
    with pytest.raises(KeyMismatchError):
        connect(path, OTHER_KEY, busy_timeout_ms=1000, readonly=True)
    assert sorted(os.listdir(short_tmp)) == listing


def test_the_queue_totals_migration_counts_what_is_already_queued() -> None:
    """Version 6 fills queue_totals from the queues it finds, receipts (no
    ciphertext) included, and its triggers keep it right from there on."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    migrate(conn, target=5)
    _sample_rows(conn, 5)  # user 1 with device DEV, one 1-byte envelope for it
    conn.execute(
        "INSERT INTO devices (id, user_id, name, created_at, last_seen_at)"
        " VALUES ('TWO', 1, 'laptop', 1, 1)"
    )
    for recipient, kind, ciphertext in (
        ("TWO", "message", b"abc"),
        ("TWO", "message", b"defgh"),
        ("TWO", "delivered", None),
    ):
        conn.execute(
            "INSERT INTO envelopes (recipient_device, kind, message_id, ciphertext,"
            " created_at, expires_at) VALUES (?, ?, 'm', ?, 1, 2)",
            (recipient, kind, ciphertext),
        )
    migrate(conn, target=6)  # migration 7 renames the columns used below
    totals = "SELECT device_id, envelopes, bytes FROM queue_totals ORDER BY device_id"
    assert conn.execute(totals).fetchall() == [("DEV", 1, 1), ("TWO", 3, 8)]
    conn.execute("DELETE FROM envelopes WHERE recipient_device = 'TWO' AND kind = 'message'")
    conn.execute(
        "INSERT INTO envelopes (recipient_device, kind, message_id, ciphertext, created_at,"
        " expires_at) VALUES ('DEV', 'message', 'n', x'0102', 1, 2)"
    )
    assert conn.execute(totals).fetchall() == [("DEV", 2, 3), ("TWO", 1, 0)]
    conn.execute("DELETE FROM devices WHERE id = 'TWO'")
    assert conn.execute(totals).fetchall() == [("DEV", 2, 3)]


def test_the_renaming_migration_keeps_rows_and_queue_totals(short_tmp: Path) -> None:
    """Version 7 gives columns their wire names: an existing database keeps its
    rows under the new names, and the queue_totals triggers follow the rename."""
    path = short_tmp / "v6.db"
    conn = connect(path, KEY, busy_timeout_ms=1000)
    conn.execute("PRAGMA journal_mode = WAL")
    migrate(conn, target=6)
    _sample_rows(conn, 6)  # a message for device DEV from user 1 on DEV, 1 byte
    conn.execute(
        "UPDATE devices SET ed25519_key = 'ed', curve25519_key = 'cu', keys_signature = 'si'"
    )
    conn.execute(
        "INSERT INTO envelopes (recipient_device, kind, message_id, about_device, created_at,"
        " expires_at) VALUES ('DEV', 'delivered', 'm', 'DEV', 3, 4)"
    )
    conn.close()

    conn = open_writer(path, KEY, busy_timeout_ms=1000)
    assert schema_version(conn) == SCHEMA_VERSION
    assert conn.execute(
        "SELECT recipient_device_id, kind, sender_user_id, sender_device_id, device_id,"
        " ciphertext, sent_at FROM envelopes ORDER BY id"
    ).fetchall() == [
        ("DEV", "message", 1, "DEV", None, b"\x00", 1),
        ("DEV", "delivered", None, None, "DEV", None, 3),
    ]
    assert conn.execute("SELECT sender_device_id, message_id FROM sends").fetchall() == [
        ("DEV", "m")
    ]
    assert conn.execute("SELECT ed25519, curve25519, signature FROM devices").fetchall() == [
        ("ed", "cu", "si")
    ]
    assert conn.execute("SELECT key_id, curve25519 FROM one_time_keys").fetchall() == [("k", "c")]
    assert conn.execute("SELECT key_id, curve25519 FROM fallback_keys").fetchall() == [("f", "c")]
    assert conn.execute("SELECT ip FROM sessions").fetchall() == [("-",)]
    # The triggers of version 6 now read recipient_device_id.
    totals = "SELECT device_id, envelopes, bytes FROM queue_totals"
    assert conn.execute(totals).fetchall() == [("DEV", 2, 1)]
    conn.execute(
        "INSERT INTO envelopes (recipient_device_id, kind, message_id, ciphertext, sent_at,"
        " expires_at) VALUES ('DEV', 'message', 'n', x'010203', 5, 6)"
    )
    assert conn.execute(totals).fetchall() == [("DEV", 3, 4)]
    conn.execute("DELETE FROM envelopes WHERE recipient_device_id = 'DEV' AND kind = 'message'")
    assert conn.execute(totals).fetchall() == [("DEV", 1, 0)]
    conn.close()


def test_readers_open_beside_a_writer_that_checkpoints(tmp_path: Path) -> None:
    """A running store opens readers while its writer commits and
    checkpoints into the main file. Proving the key again through an
    immutable read of page 1 (no lock) could read the page mid-write and
    fail as a wrong key (about 1 open in 300 here, and 1 kill -9 run in
    ~10 of the suite); a reader relies on the writer's proof instead."""
    key = os.urandom(32)
    path = tmp_path / "c.db"
    writer = open_writer(path, key, busy_timeout_ms=5_000)
    writer.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
    stop = threading.Event()

    def write() -> None:
        n = 0
        while not stop.is_set():
            writer.execute("BEGIN IMMEDIATE")
            writer.execute("INSERT INTO t (v) VALUES (randomblob(3000))")
            writer.execute(f"PRAGMA user_version = {n % 1000}")  # page 1 changes
            writer.execute("COMMIT")
            n += 1
            if n % 20 == 0:
                writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    thread = threading.Thread(target=write)
    thread.start()
    try:
        for _ in range(3_000):
            open_reader(path, key, busy_timeout_ms=5_000).close()
    finally:
        stop.set()
        thread.join()
        writer.close()
