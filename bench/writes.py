"""Durable write throughput of chatd.store: group commit against one commit per write.

For each mode (``StoreSettings(group_commit=True)`` and ``group_commit=False``)
and each writer count (1, 10, 100 trio tasks), the script opens a fresh
SQLCipher database in a temp dir (random 32-byte key, schema migrated by
``serve_store``). Each writer then loops on ``await store.write(fn)``, where
``fn`` is one small ``INSERT INTO admin_audit``. The writes are
``synchronous=FULL`` in WAL mode, so each commit is fsynced. A configuration
stops at --count writes or after --budget seconds, whichever comes first. A
write counts only once ``store.write`` has returned, which means it is durable.
At the end the script checks that the table holds exactly that many rows.

Prints one line per writer count (writes/s in each mode and their ratio), then
the writer's stats for each run (commits, jobs, largest batch), so the batching
is visible. Use --dir to measure on another filesystem: the default temp dir
can be tmpfs on some machines, where fsync costs nothing.

    .venv/bin/python bench/writes.py [--count 10000] [--budget 8] [--quick]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from chatd.config import StoreSettings
from chatd.store import serve_store
from chatd.store.store import now_ms

WRITER_COUNTS = (1, 10, 100)
INSERT = "INSERT INTO admin_audit (at, method, path, status) VALUES (?, ?, ?, ?)"


@dataclass
class Result:
    writers: int
    group_commit: bool
    writes: int
    seconds: float
    commits: int
    jobs: int
    largest_batch: int
    budget_hit: bool

    @property
    def rate(self) -> float:
        return self.writes / self.seconds if self.seconds > 0 else 0.0


def _insert(conn: Any) -> None:
    conn.execute(INSERT, (now_ms(), "POST", "/bench/writes", 200))


def _count_rows(conn: Any) -> int:
    return int(conn.execute("SELECT count(*) FROM admin_audit").fetchone()[0])


async def _run_one(
    directory: Path, writers: int, group_commit: bool, count: int, budget: float
) -> Result:
    settings = StoreSettings(group_commit=group_commit)
    with tempfile.TemporaryDirectory(prefix="chatd-writes-", dir=directory) as tmp:
        path = Path(tmp) / "bench.db"
        async with trio.open_nursery() as nursery:
            store = await nursery.start(serve_store, path, os.urandom(32), settings)
            await store.write(_insert)  # warm-up: first page allocations, not timed
            base_commits, base_jobs = store.stats.commits, store.stats.jobs

            remaining = count
            done = 0
            deadline = time.perf_counter() + budget

            async def writer() -> None:
                nonlocal remaining, done
                while remaining > 0 and time.perf_counter() < deadline:
                    remaining -= 1
                    await store.write(_insert)
                    done += 1

            started = time.perf_counter()
            async with trio.open_nursery() as writers_nursery:
                for _ in range(writers):
                    writers_nursery.start_soon(writer)
            seconds = time.perf_counter() - started

            rows = await store.read(_count_rows)
            if rows != done + 1:
                raise SystemExit(f"expected {done + 1} rows after the run, found {rows}")
            result = Result(
                writers=writers,
                group_commit=group_commit,
                writes=done,
                seconds=seconds,
                commits=store.stats.commits - base_commits,
                jobs=store.stats.jobs - base_jobs,
                largest_batch=store.stats.largest_batch,
                budget_hit=remaining > 0,
            )
            nursery.cancel_scope.cancel()
    return result


async def _main(directory: Path, count: int, budget: float) -> None:
    results: dict[tuple[int, bool], Result] = {}
    for writers in WRITER_COUNTS:
        for group_commit in (True, False):
            results[writers, group_commit] = await _run_one(
                directory, writers, group_commit, count, budget
            )

    print(f"database dir: {directory}")
    print(f"writes per configuration: up to {count}, time budget {budget:g} s each")
    print()
    print(f"{'writers':>7}  {'group commit':>16}  {'per-write commit':>16}  {'ratio':>7}")
    for writers in WRITER_COUNTS:
        group, single = results[writers, True], results[writers, False]
        ratio = group.rate / single.rate if single.rate > 0 else float("inf")
        print(
            f"{writers:>7}  {group.rate:>10,.0f} wr/s  {single.rate:>10,.0f} wr/s  {ratio:>6.1f}x"
        )
    print()
    print("store.stats per run (timed part; largest_batch includes the warm-up write):")
    for (writers, group_commit), r in results.items():
        mode = "group commit    " if group_commit else "per-write commit"
        note = "  (time budget hit)" if r.budget_hit else ""
        print(
            f"  {mode} writers={writers:<3} writes={r.writes} in {r.seconds:.2f} s: "
            f"commits={r.commits} jobs={r.jobs} largest_batch={r.largest_batch} "
            f"jobs/commit={r.jobs / max(r.commits, 1):.1f}{note}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000, help="writes per configuration")
    parser.add_argument(
        "--budget", type=float, default=8.0, help="seconds per configuration at most"
    )
    parser.add_argument(
        "--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the databases go"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 300 writes, 1 s each")
    args = parser.parse_args()
    count, budget = (300, 1.0) if args.quick else (args.count, args.budget)
    count = max(1, min(count, 10_000_000))
    budget = max(0.1, min(budget, 600.0))
    trio.run(_main, args.dir.absolute(), count, budget)


if __name__ == "__main__":
    main()
