"""Admin API routes for online backups: ``/v1/backups``.

``POST /v1/backups`` starts a backup and answers at once with its job; the
job's progress is followed with ``GET /v1/backups/{backup_id}`` until its
``state`` is no longer ``running``. ``GET /v1/backups`` lists the backup
files in ``backup.directory`` and the jobs since the daemon started. Backup
ids count from 1 at each start; the files are the lasting record.
``GET /v1/backups/holding`` says which backups still hold an account, live
or erased (:mod:`chatd.backup.holding`).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
import trio

from chatd.admin.api import MAX_INT, AdminContext, ApiError, route
from chatd.backup.archive import list_backups
from chatd.backup.holding import Account, accounts_from_receipts, scan_backups
from chatd.backup.service import BackupJob, BackupRunning, Backups
from chatd.errors import BackupError, SecretFileError


class BackupProgress(msgspec.Struct):
    phase: str  # starting, copying, indexing, syncing, done
    table: str  # the table being copied
    tables_done: int
    tables_total: int
    rows_done: int
    rows_total: int  # rows in the snapshot being copied
    pages_written: int  # pages of the new file so far


class BackupJobInfo(msgspec.Struct):
    id: int
    state: str  # running, done, failed, cancelled
    file: str  # name of the backup in backup.directory
    key_id: str  # id of the backup key that encrypts it
    started_at: int  # unix ms
    finished_at: int | None
    bytes: int  # size of the finished file
    error: str | None
    progress: BackupProgress


class BackupFileInfo(msgspec.Struct):
    file: str
    bytes: int
    created_at: int  # unix ms (from the name)
    key_id: str | None  # the backup key it needs; null for a file not named by chatd


class BackupList(msgspec.Struct):
    directory: str
    backups: list[BackupFileInfo]  # oldest first
    jobs: list[BackupJobInfo]  # since the daemon started, newest first


def job_info(job: BackupJob) -> BackupJobInfo:
    p = job.progress
    return BackupJobInfo(
        id=job.id,
        state=job.state,
        file=job.file,
        key_id=job.key_id,
        started_at=job.started_at,
        finished_at=job.finished_at,
        bytes=job.bytes,
        error=job.error,
        progress=BackupProgress(
            phase=p.phase,
            table=p.table,
            tables_done=p.tables_done,
            tables_total=p.tables_total,
            rows_done=p.rows_done,
            rows_total=p.rows_total,
            pages_written=p.pages_written,
        ),
    )


def _backups(ctx: AdminContext) -> Backups:
    if ctx.backups is None:
        raise ApiError(503, "service_unavailable", "backups are not available on this server")
    return ctx.backups


_UNAVAILABLE = (503, "Backups are not running in this process (service_unavailable).")


@route(
    "POST",
    "/v1/backups",
    "Start an online backup; follow it with GET /v1/backups/{backup_id}",
    response=BackupJobInfo,
    tag="backups",
    errors=(
        (409, "A backup is already running (backup_running)."),
        (
            503,
            "The backup key or directory cannot be used (backup_unavailable); or "
            "backups are not running in this process (service_unavailable).",
        ),
    ),
)
async def create_backup(ctx: AdminContext, query: None, body: None) -> BackupJobInfo:
    backups = _backups(ctx)
    try:
        job = await backups.start()
    except BackupRunning as exc:
        raise ApiError(409, "backup_running", str(exc)) from None
    except (BackupError, SecretFileError) as exc:
        raise ApiError(503, "backup_unavailable", str(exc)) from None
    return job_info(job)


@route(
    "GET",
    "/v1/backups",
    "Backup files in backup.directory, and backup jobs since the daemon started",
    response=BackupList,
    tag="backups",
    audit=False,
    errors=(_UNAVAILABLE,),
)
async def list_backup_files(ctx: AdminContext, query: None, body: None) -> BackupList:
    backups = _backups(ctx)
    files = await trio.to_thread.run_sync(list_backups, backups.directory)
    return BackupList(
        directory=str(backups.directory),
        backups=[BackupFileInfo(f.name, f.bytes, f.created_at, f.key_id) for f in files],
        jobs=[job_info(j) for j in backups.jobs],
    )


@route(
    "GET",
    "/v1/backups/{backup_id}",
    "One backup job: its state and progress",
    response=BackupJobInfo,
    tag="backups",
    audit=False,
    errors=((404, "No such backup job since the daemon started (not_found)."), _UNAVAILABLE),
)
async def show_backup(
    ctx: AdminContext, query: None, body: None, *, backup_id: int
) -> BackupJobInfo:
    job = _backups(ctx).job(backup_id)
    if job is None:
        raise ApiError(404, "not_found", f"no backup job {backup_id} since the daemon started")
    return job_info(job)


@route(
    "POST",
    "/v1/backups/{backup_id}/cancel",
    "Cancel a running backup; its partial file is deleted",
    response=BackupJobInfo,
    tag="backups",
    errors=((404, "No such backup job since the daemon started (not_found)."), _UNAVAILABLE),
)
async def cancel_backup(
    ctx: AdminContext, query: None, body: None, *, backup_id: int
) -> BackupJobInfo:
    job = _backups(ctx).cancel(backup_id)
    if job is None:
        raise ApiError(404, "not_found", f"no backup job {backup_id} since the daemon started")
    return job_info(job)


UserId = Annotated[
    int, msgspec.Meta(ge=1, le=MAX_INT, description="A live or an erased account's id.")
]
Erased = Annotated[
    bool,
    msgspec.Meta(
        description="Also every account an erasure receipt names (the default without user_id)."
    ),
]


class HoldingQuery(msgspec.Struct, forbid_unknown_fields=True):
    user_id: UserId | None = None
    erased: Erased = False


class HoldingAccount(msgspec.Struct):
    user_id: int
    account_created_at: int  # unix ms; with user_id it names one account
    receipt_id: int | None  # its erasure receipt; null for a live account
    backups: list[str]  # backup files that hold it, oldest first


class UncheckedBackup(msgspec.Struct):
    file: str
    error: str  # why it could not be read: key not at hand, corrupt, not a backup


class HoldingReport(msgspec.Struct):
    """The backups in backup.directory that still hold each account."""

    directory: str
    backups_checked: int
    accounts: list[HoldingAccount]
    unchecked: list[UncheckedBackup]  # not empty: the answer is incomplete


def _accounts_to_find(conn: Any, query: HoldingQuery) -> list[Account]:
    accounts: list[Account] = []
    if query.user_id is not None:
        live = conn.execute(
            "SELECT id, created_at FROM users WHERE id = ?", (query.user_id,)
        ).fetchall()
        accounts += [Account(int(r[0]), int(r[1])) for r in live]
    if query.erased or query.user_id is None:
        rows = conn.execute("SELECT id, receipt FROM erasure_receipts ORDER BY id").fetchall()
    else:
        rows = conn.execute(
            "SELECT id, receipt FROM erasure_receipts WHERE user_id = ? ORDER BY id",
            (query.user_id,),
        ).fetchall()
    return accounts + accounts_from_receipts(rows)


@route(
    "GET",
    "/v1/backups/holding",
    "Which backups still hold an account: a live one (user_id), an erased one "
    "(user_id: found by its receipt), and every erased account (erased=true, or "
    "no user_id)",
    response=HoldingReport,
    query=HoldingQuery,
    tag="backups",
    errors=(
        (404, "No account and no erasure receipt with this user id (not_found)."),
        _UNAVAILABLE,
    ),
)
async def backups_holding(ctx: AdminContext, query: HoldingQuery, body: None) -> HoldingReport:
    backups = _backups(ctx)
    accounts = await ctx.store.read(lambda conn: _accounts_to_find(conn, query))
    if not accounts and query.user_id is not None and not query.erased:
        raise ApiError(
            404, "not_found", f"no account and no erasure receipt with user id {query.user_id}"
        )
    # Blocking SQLCipher opens, one scan at a time, off the event loop.
    found = await trio.to_thread.run_sync(
        scan_backups, backups.config, accounts, limiter=backups.scan_limiter
    )
    return HoldingReport(
        directory=str(backups.directory),
        backups_checked=found.checked,
        accounts=[
            HoldingAccount(a.user_id, a.created_at, a.receipt_id, files)
            for a, files in found.accounts.items()
        ],
        unchecked=[UncheckedBackup(name, why) for name, why in found.unchecked],
    )
