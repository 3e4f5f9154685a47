"""Retention: batched purges of real rows, reports, periodic runs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
import trio.testing

from chatd.config import RetentionSettings, StoreSettings
from chatd.retention import DAY_MS, Job, Retention, serve_retention
from chatd.store import Store, now_ms, serve_store

KEY = bytes(32)


@asynccontextmanager
async def running(path: Path, **settings: Any) -> AsyncIterator[tuple[Store, Retention]]:
    async with trio.open_nursery() as nursery:
        store = await nursery.start(serve_store, path, KEY, StoreSettings())
        retention = await nursery.start(serve_retention, store, RetentionSettings(**settings))
        yield store, retention
        nursery.cancel_scope.cancel()


def add_audit_rows(conn: Any, *, count: int, age_days: float) -> None:
    at = now_ms() - int(age_days * DAY_MS)
    conn.executemany(
        "INSERT INTO admin_audit (at, method, path, status) VALUES (?, 'GET', ?, 200)",
        [(at, "/" + "x" * 500) for _ in range(count)],
    )


def audit_count(conn: Any) -> int:
    return int(conn.execute("SELECT count(*) FROM admin_audit").fetchone()[0])


async def test_expired_rows_are_purged_in_batches_and_reported(short_tmp: Path) -> None:
    async with running(short_tmp / "c.db", batch_size=7, admin_audit_days=30) as (store, retention):
        await store.write(lambda c: add_audit_rows(c, count=2000, age_days=31))
        await store.write(lambda c: add_audit_rows(c, count=5, age_days=29))
        commits_before = store.stats.commits
        [report] = await retention.run_now(["admin_audit"])
        assert report.rows_purged == 2000
        assert report.error is None
        assert report.bytes_reclaimed > 0  # pages went back to the filesystem
        assert store.stats.commits - commits_before >= 2000 // 7  # one short write per batch
        assert await store.read(audit_count) == 5  # the unexpired rows stay
        [stored] = await retention.list_reports(limit=10, before_id=None)
        assert stored == report


async def test_a_run_stops_after_max_batches_and_the_next_run_continues(short_tmp: Path) -> None:
    async with running(short_tmp / "c.db", batch_size=10, max_batches_per_run=2) as (
        store,
        retention,
    ):
        await store.write(lambda c: add_audit_rows(c, count=35, age_days=400))
        [first] = await retention.run_now(["admin_audit"])
        assert first.rows_purged == 20
        [second] = await retention.run_now(["admin_audit"])
        assert second.rows_purged == 15
        assert await store.read(audit_count) == 0


async def test_old_reports_are_purged_by_their_own_job(short_tmp: Path) -> None:
    async with running(short_tmp / "c.db", report_days=1) as (store, retention):
        old = now_ms() - 2 * DAY_MS
        await store.write(
            lambda c: c.execute(
                "INSERT INTO retention_runs (job, started_at, duration_ms, rows_purged,"
                " bytes_reclaimed) VALUES ('old', ?, 0, 0, 0)",
                (old,),
            )
        )
        [report] = await retention.run_now(["retention_reports"])
        assert report.rows_purged == 1
        jobs = [r.job for r in await retention.list_reports(limit=10, before_id=None)]
        assert jobs == ["retention_reports"]


async def test_a_failing_job_is_reported_and_the_others_still_run(short_tmp: Path) -> None:
    def broken(conn: Any, *, now: int, limit: int) -> int:
        conn.execute("DELETE FROM no_such_table")
        return 0  # pragma: no cover - the statement fails

    async with trio.open_nursery() as nursery:
        store = await nursery.start(serve_store, short_tmp / "c.db", KEY, StoreSettings())
        retention = Retention(
            store,
            RetentionSettings(),
            [Job("broken", "fails", broken), Job("fine", "ok", lambda c, now, limit: 0)],
        )
        failed, fine = await retention.run_now()
        assert failed.error == "OperationalError"
        assert fine.error is None
        nursery.cancel_scope.cancel()


async def test_runs_repeat_on_the_interval(
    short_tmp: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(short_tmp / "c.db", interval_seconds=600, jitter_seconds=60) as (
        _,
        retention,
    ):
        assert retention.runs_completed == 0
        await retention.wait_runs_completed(3)
        # Three intervals of 600 s, each with up to 60 s of jitter.
        assert 3 * 600 <= trio.current_time() <= 3 * 660


async def test_cancelling_mid_run_keeps_committed_batches(short_tmp: Path) -> None:
    path = short_tmp / "c.db"
    async with trio.open_nursery() as nursery:
        store = await nursery.start(serve_store, path, KEY, StoreSettings())
        await store.write(lambda c: add_audit_rows(c, count=100, age_days=999))
        retention = Retention(store, RetentionSettings(batch_size=1), [])
        from chatd.retention import default_jobs

        retention.jobs = [j for j in default_jobs(retention.settings) if j.name == "admin_audit"]
        with trio.move_on_after(0):
            await retention.run_now()
        remaining = await store.read(audit_count)
        assert 0 <= remaining <= 100
        await retention.run_now()
        assert await store.read(audit_count) == 0
        nursery.cancel_scope.cancel()
