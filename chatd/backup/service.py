"""Online backups inside ``chatd serve``: one job at a time, in a thread of its own.

A job (started by ``POST /v1/backups``) copies the live database into
``backup.directory`` with :func:`chatd.backup.copy.copy_database`: its own
keyed connection, one read transaction (a WAL snapshot), so the store's
writer thread keeps committing and is never blocked by it. The copy runs in
a dedicated thread, not Trio's worker pool, because it lowers its own
scheduling priority (``backup.nice``), which a pooled thread would keep for
the reads it serves later. Progress is read from the job while it runs.

Resources and cancellation: the jobs run in the nursery :func:`serve_backups`
opens. Cancelling it (daemon stop) sets the job's cancel flag; the thread
stops at its next chunk, deletes its temporary file, and is waited for
(shielded) before the service returns. Jobs are kept in memory (the last
:data:`KEEP_JOBS`); the files themselves are the record of finished backups.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, NoReturn

import trio

from chatd.backup.archive import backup_name
from chatd.backup.copy import CopyCancelled, Progress, copy_database
from chatd.backup.keys import key_id, load_backup_key
from chatd.config import Config
from chatd.errors import BackupError, ChatdError
from chatd.log import fields
from chatd.store import now_ms

log = logging.getLogger("chatd.backup")

KEEP_JOBS: Final = 50  # finished jobs remembered for GET /v1/backups/{id}


class BackupRunning(BackupError):
    """A backup is already running; one at a time."""


@dataclass
class BackupJob:
    id: int
    started_at: int  # unix ms
    file: str  # the backup's name in backup.directory
    key_id: str
    state: str = "running"  # running, done, failed, cancelled
    finished_at: int | None = None
    bytes: int = 0
    error: str | None = None  # what went wrong, for the admin (no secret)
    progress: Progress = field(default_factory=Progress)
    cancel: threading.Event = field(default_factory=threading.Event)


class Backups:
    """The backup jobs of one daemon. Made by :func:`serve_backups`."""

    def __init__(self, config: Config, db_path: Path, db_key: bytes, nursery: trio.Nursery) -> None:
        self.config = config
        self.directory = config.backups_dir
        self._db_path = db_path
        self._db_key = db_key
        self._nursery = nursery
        self._jobs: dict[int, BackupJob] = {}
        # GET /v1/backups/holding: one scan of the backups at a time.
        self.scan_limiter = trio.CapacityLimiter(1)
        self._next_id = 1

    @property
    def jobs(self) -> list[BackupJob]:
        """Jobs since start, newest first."""
        return sorted(self._jobs.values(), key=lambda j: j.id, reverse=True)

    def job(self, job_id: int) -> BackupJob | None:
        return self._jobs.get(job_id)

    @property
    def running(self) -> BackupJob | None:
        return next((j for j in self._jobs.values() if j.state == "running"), None)

    async def start(self) -> BackupJob:
        """Start a backup and return its job at once.

        Raises :class:`BackupRunning` while another runs, and
        :class:`BackupError` / :class:`SecretFileError` when the backup key or
        the backup directory cannot be used (nothing was written).
        """
        if self.running is not None:
            raise BackupRunning(f"backup {self.running.id} is still running; wait for it")
        key = await trio.to_thread.run_sync(self._prepare)
        if self.running is not None:  # another start won the race meanwhile
            raise BackupRunning(f"backup {self.running.id} is still running; wait for it")
        started = now_ms()
        kid = key_id(key)
        job = BackupJob(self._next_id, started, backup_name(started, kid), kid)
        self._next_id += 1
        self._jobs[job.id] = job
        for old in sorted(self._jobs)[:-KEEP_JOBS]:
            del self._jobs[old]
        self._nursery.start_soon(self._run, job, key)
        return job

    def _prepare(self) -> bytes:
        key = load_backup_key(self.config)
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise BackupError(
                f"cannot make the backup directory {self.directory}: {exc.strerror}"
            ) from None
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise BackupError(f"the backup directory {self.directory} is not writable")
        # One backup at a time: a temporary file here now was left by a crash.
        for stale in self.directory.glob(".chatd-backup-*.part"):
            stale.unlink(missing_ok=True)
        return key

    async def _run(self, job: BackupJob, key: bytes) -> None:
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()
        outcome: list[BaseException] = []
        settings = self.config.backup

        def work() -> None:
            try:
                # Linux: niceness is per thread; lower only this one's.
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), settings.nice)
                result = copy_database(
                    self._db_path,
                    self._db_key,
                    self.directory / job.file,
                    key,
                    progress=job.progress,
                    cancel=job.cancel,
                    chunk_rows=settings.chunk_rows,
                    pause_s=settings.pause_ms / 1000,
                )
                job.bytes = result.bytes
            except BaseException as exc:  # noqa: B036 - reported through the job
                outcome.append(exc)
            finally:
                try:
                    token.run_sync_soon(done.set)
                except trio.RunFinishedError:  # pragma: no cover - loop gone
                    pass

        log.info("backup.started", extra=fields(backup_id=job.id, file=job.file))
        threading.Thread(target=work, name="chatd-backup", daemon=True).start()
        try:
            await done.wait()
        finally:
            job.cancel.set()  # no-op when it finished; stops it at the next chunk otherwise
            with trio.CancelScope(shield=True):
                await done.wait()
            job.finished_at = now_ms()
            error = outcome[0] if outcome else None
            if error is None:
                job.state = "done"
            elif isinstance(error, CopyCancelled):
                job.state = "cancelled"
                job.error = str(error)
            else:
                job.state = "failed"
                job.error = str(error) if isinstance(error, ChatdError) else type(error).__name__
            log.info(
                "backup.finished",
                extra=fields(
                    backup_id=job.id,
                    state=job.state,
                    bytes=job.bytes,
                    duration_ms=job.finished_at - job.started_at,
                ),
            )

    def cancel(self, job_id: int) -> BackupJob | None:
        """Ask a running job to stop (at its next chunk); None if there is no such job."""
        job = self._jobs.get(job_id)
        if job is not None and job.state == "running":
            job.cancel.set()
        return job


async def serve_backups(
    config: Config,
    db_path: Path,
    db_key: bytes,
    *,
    task_status: trio.TaskStatus[Backups] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Run backup jobs until cancelled; reports the :class:`Backups` at once.

    On cancellation a running copy is told to stop and waited for; its
    temporary file is deleted, so no partial backup stays behind.
    """
    async with trio.open_nursery() as nursery:
        task_status.started(Backups(config, db_path, db_key, nursery))
        await trio.sleep_forever()
    raise AssertionError("unreachable")  # pragma: no cover - sleep_forever never returns
