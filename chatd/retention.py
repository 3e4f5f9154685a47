"""The retention service: periodic jobs that purge what has expired.

Each :class:`Job` deletes expired rows in bounded batches, one write
transaction per batch, so a purge of a million rows is a series of short
writes interleaved with everyone else's, never one long lock. After a job's
batches, ``PRAGMA incremental_vacuum`` returns the freed pages to the
filesystem (``secure_delete`` has already zeroed them), and the run's
:class:`Report` (rows purged, bytes reclaimed, duration) is stored in
``retention_runs``, logged, and readable through the admin API.

Runs happen every ``retention.interval_seconds`` plus a random jitter, and on
demand (:meth:`Retention.run_now`, used by the admin API). Only one run goes
at a time. Cancelling a run between batches loses nothing: every committed
batch stays purged and the rest waits for the next run.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Literal

import msgspec
import trio

from chatd.config import (
    AttachmentSettings,
    AuthSettings,
    DeviceSettings,
    PrivacySettings,
    RetentionSettings,
)

if TYPE_CHECKING:  # pragma: no cover - annotations only (import cycle)
    from chatd.blobs.service import BlobService
    from chatd.e2ee.queues import QueueService
    from chatd.privacy.erasure import Erasure
from chatd.log import fields
from chatd.store import Store, now_ms

log = logging.getLogger("chatd.retention")

DAY_MS: Final = 86_400_000

_jitter = random.SystemRandom()


#: Every job name there is. The admin API's ``POST /v1/retention/run`` takes
#: these (its OpenAPI document lists them as an enum), so a new job adds its
#: name here; mypy refuses a :class:`Job` whose name is not one of them.
JobName = Literal[
    "retention_reports",
    "admin_audit",
    "sessions",
    "invites",
    "auth_audit",
    "envelopes",
    "rooms",
    "sends",
    "claimed_keys",
    "blobs",
    "erasure",
]


@dataclass(frozen=True, slots=True)
class Job:
    """A purge job. One batch is ``purge(conn, now=, limit=) -> rows deleted``
    (at most ``limit``), run as one write; or, for a service that writes
    through its own path, ``await run(now=, limit=) -> rows deleted``; or,
    for one that also frees files, ``await sweep(now=, limit=) -> (rows
    deleted, bytes freed)``."""

    name: JobName
    description: str
    purge: Callable[..., int] | None = None
    run: Callable[..., Awaitable[int]] | None = None
    sweep: Callable[..., Awaitable[tuple[int, int]]] | None = None


class Report(msgspec.Struct, frozen=True):
    """The outcome of one job in one run."""

    job: str
    started_at: int  # unix milliseconds
    duration_ms: int
    rows_purged: int
    bytes_reclaimed: int
    error: str | None = None
    id: int | None = None


def _purge_older_than(table: str, column: str, days: Callable[[], int]) -> Callable[..., int]:
    sql = (
        f"DELETE FROM {table} WHERE rowid IN "  # noqa: S608 - identifiers are constants
        f"(SELECT rowid FROM {table} WHERE {column} < ? ORDER BY {column} LIMIT ?)"
    )

    def purge(conn: Any, *, now: int, limit: int) -> int:
        cutoff = now - days() * DAY_MS
        return int(conn.execute(sql, (cutoff, limit)).rowcount)

    return purge


def default_jobs(settings: RetentionSettings) -> list[Job]:
    """The jobs for the current schema, with their retention from ``settings``."""
    return [
        Job(
            "retention_reports",
            f"retention run reports older than retention.report_days ({settings.report_days})",
            _purge_older_than("retention_runs", "started_at", lambda: settings.report_days),
        ),
        Job(
            "admin_audit",
            f"admin audit rows older than retention.admin_audit_days ({settings.admin_audit_days})",
            _purge_older_than("admin_audit", "at", lambda: settings.admin_audit_days),
        ),
    ]


def _purge_sessions(conn: Any, *, now: int, limit: int) -> int:
    # A session is gone for good once it expired or was revoked; keep it a
    # day longer so a client still holding its token gets a clear answer.
    cutoff = now - DAY_MS
    return int(
        conn.execute(
            "DELETE FROM sessions WHERE id IN (SELECT id FROM sessions WHERE expires_at < ?"
            " OR revoked_at < ? LIMIT ?)",
            (cutoff, cutoff, limit),
        ).rowcount
    )


def _purge_invites(conn: Any, *, now: int, limit: int) -> int:
    cutoff = now - 30 * DAY_MS
    return int(
        conn.execute(
            "DELETE FROM invites WHERE id IN (SELECT id FROM invites WHERE expires_at < ?"
            " OR used_at < ? OR revoked_at < ? LIMIT ?)",
            (cutoff, cutoff, cutoff, limit),
        ).rowcount
    )


def auth_jobs(settings: AuthSettings) -> list[Job]:
    """Purge jobs for accounts data: sessions, invites, the auth audit log."""
    return [
        Job(
            "sessions",
            "sessions expired or revoked more than a day ago (with their spent refresh tokens)",
            _purge_sessions,
        ),
        Job("invites", "invites expired, used or revoked more than 30 days ago", _purge_invites),
        Job(
            "auth_audit",
            f"auth audit rows older than auth.audit_days ({settings.audit_days})",
            _purge_older_than("auth_audit", "at", lambda: settings.audit_days),
        ),
    ]


def queue_jobs(settings: DeviceSettings, queues: QueueService) -> list[Job]:
    """Purge jobs for message queues: expired envelopes (with receipts, through
    the queue service, so live senders get theirs at once), old send ids."""
    from chatd.e2ee.keys import purge_claimed_keys
    from chatd.e2ee.queues import purge_sends

    return [
        Job(
            "envelopes",
            f"undelivered envelopes older than devices.envelope_days "
            f"({settings.envelope_days}); the sender gets an expired receipt",
            run=queues.expire,
        ),
        Job(
            "rooms",
            "room log entries no device waits for any more (their devices left the "
            "room or were removed), and the closed ranges of room log that devices "
            "have fully read",
            run=queues.sweep_rooms,
        ),
        Job(
            "sends",
            "message ids remembered for de-duplication, after devices.envelope_days",
            partial(purge_sends, days=settings.envelope_days),
        ),
        Job(
            "claimed_keys",
            "one-time keys handed out more than 30 days ago (kept until then "
            "so a replayed upload cannot offer them again)",
            purge_claimed_keys,
        ),
    ]


def blob_jobs(settings: AttachmentSettings, blobs: BlobService) -> list[Job]:
    """The attachments purge: blobs and their files (bytes freed are reported)."""
    return [
        Job(
            "blobs",
            f"attachments older than attachments.blob_days ({settings.blob_days}) or not "
            f"named by any message within attachments.unreferenced_minutes "
            f"({settings.unreferenced_minutes}), with their files; files left without a "
            "row by a crash",
            sweep=blobs.purge,
        )
    ]


def privacy_jobs(settings: PrivacySettings, erasure: Erasure) -> list[Job]:
    """The erasure purge: accounts past their grace period, with everything
    about them and their attachment files; each issues a signed receipt."""
    return [
        Job(
            "erasure",
            f"accounts whose erasure was requested more than privacy.erasure_grace_days "
            f"({settings.erasure_grace_days:g}) ago, with every row about them and the "
            "attachments they uploaded; a signed receipt each",
            sweep=erasure.purge,
        )
    ]


def _page_count(conn: Any) -> int:
    return int(conn.execute("PRAGMA page_count").fetchone()[0])


def _vacuum(conn: Any) -> int:
    """Return freed pages to the filesystem; the number of bytes given back."""
    page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    before = _page_count(conn)
    conn.execute("PRAGMA incremental_vacuum").fetchall()
    return (before - _page_count(conn)) * page_size


def _insert_report(conn: Any, report: Report) -> int:
    cur = conn.execute(
        "INSERT INTO retention_runs"
        " (job, started_at, duration_ms, rows_purged, bytes_reclaimed, error)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (
            report.job,
            report.started_at,
            report.duration_ms,
            report.rows_purged,
            report.bytes_reclaimed,
            report.error,
        ),
    )
    return int(cur.lastrowid)


class JobTotals:
    """One job's results summed over the runs since start."""

    __slots__ = ("rows_purged", "bytes_reclaimed", "failures")

    def __init__(self) -> None:
        self.rows_purged = 0
        self.bytes_reclaimed = 0
        self.failures = 0

    def add(self, report: Report) -> None:
        self.rows_purged += report.rows_purged
        self.bytes_reclaimed += report.bytes_reclaimed
        self.failures += report.error is not None


class Retention:
    """Runs the jobs; one instance per retention service."""

    def __init__(self, store: Store, settings: RetentionSettings, jobs: Sequence[Job]) -> None:
        self.store = store
        self.settings = settings
        self.jobs = list(jobs)
        self._lock = trio.Lock()
        self._run_done = trio.Event()
        self.runs_completed = 0
        # Per job since start, for chatd.metrics: the latest report, and
        # totals of rows purged, bytes reclaimed and failed runs.
        self.latest: dict[str, Report] = {}
        self.totals: dict[str, JobTotals] = {job.name: JobTotals() for job in self.jobs}

    @property
    def job_names(self) -> list[str]:
        return [job.name for job in self.jobs]

    async def run_now(self, names: Sequence[str] | None = None) -> list[Report]:
        """Run the named jobs (all when None) now; waits for a run in progress."""
        selected = [j for j in self.jobs if names is None or j.name in names]
        async with self._lock:
            reports = [await self._run_job(job) for job in selected]
        self.runs_completed += 1
        self._run_done.set()
        self._run_done = trio.Event()
        return reports

    async def wait_runs_completed(self, count: int) -> None:
        """Wait until at least ``count`` runs have completed since start."""
        while self.runs_completed < count:
            await self._run_done.wait()

    async def _run_job(self, job: Job) -> Report:
        started = now_ms()
        clock = trio.current_time()
        rows = 0
        reclaimed = 0
        error: str | None = None
        limit = self.settings.batch_size
        try:
            for _ in range(self.settings.max_batches_per_run):
                if job.sweep is not None:
                    deleted, freed = await job.sweep(now=now_ms(), limit=limit)
                    reclaimed += freed
                elif job.run is not None:
                    deleted = await job.run(now=now_ms(), limit=limit)
                elif job.purge is not None:
                    deleted = await self.store.write(partial(job.purge, now=now_ms(), limit=limit))
                else:
                    break
                rows += deleted
                if deleted < limit:
                    break
            if rows:
                reclaimed += await self.store.write(_vacuum)
        except trio.Cancelled:
            raise
        except Exception as exc:
            error = type(exc).__name__
            log.exception("retention.job_failed", extra=fields(job=job.name))
        report = Report(
            job=job.name,
            started_at=started,
            duration_ms=int((trio.current_time() - clock) * 1000),
            rows_purged=rows,
            bytes_reclaimed=reclaimed,
            error=error,
        )
        self.latest[job.name] = report
        self.totals.setdefault(job.name, JobTotals()).add(report)
        row_id: int | None = None
        try:
            row_id = await self.store.write(lambda conn: _insert_report(conn, report))
        except Exception:
            # The store is failing (that is likely why the job failed too); the
            # report is still logged and returned.
            log.exception("retention.report_not_stored", extra=fields(job=job.name))
        log.info(
            "retention.report",
            extra=fields(
                job=job.name,
                rows_purged=rows,
                bytes_reclaimed=reclaimed,
                duration_ms=report.duration_ms,
                error=error,
            ),
        )
        return msgspec.structs.replace(report, id=row_id)

    async def list_reports(self, *, limit: int, before_id: int | None) -> list[Report]:
        def query(conn: Any) -> list[Report]:
            rows = conn.execute(
                "SELECT id, job, started_at, duration_ms, rows_purged, bytes_reclaimed, error"
                " FROM retention_runs WHERE id < ? ORDER BY id DESC LIMIT ?",
                (before_id if before_id is not None else 2**63 - 1, limit),
            ).fetchall()
            return [
                Report(
                    id=r[0],
                    job=r[1],
                    started_at=r[2],
                    duration_ms=r[3],
                    rows_purged=r[4],
                    bytes_reclaimed=r[5],
                    error=r[6],
                )
                for r in rows
            ]

        return await self.store.read(query)


async def serve_retention(
    store: Store,
    settings: RetentionSettings,
    *,
    jobs: Sequence[Job] | None = None,
    task_status: trio.TaskStatus[Retention] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the retention jobs periodically until cancelled.

    Reports the :class:`Retention` (for on-demand runs) at once. The first run
    comes one interval (plus jitter) after start. Safe to cancel at any time.
    """
    retention = Retention(store, settings, default_jobs(settings) if jobs is None else jobs)
    task_status.started(retention)
    while True:
        await trio.sleep(settings.interval_seconds + _jitter.uniform(0, settings.jitter_seconds))
        await retention.run_now()
