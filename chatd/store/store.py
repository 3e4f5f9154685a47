"""The store service: one writer thread doing group commit, reads off the loop.

Theory of operation
-------------------
One thread owns the only write connection. Callers on the event loop submit a
*write job*, a plain function ``fn(conn) -> T``, and await its result. The
writer takes every job waiting in its queue (up to ``store.max_batch_writes``),
runs them in ONE transaction, each inside its own SAVEPOINT so that one job's
exception rolls back only that job, then COMMITs once with
``synchronous=FULL``. Only after that commit returns does it wake the callers,
all at once, with one ``run_sync_soon`` back into Trio. So a caller's ``await
store.write(fn)`` returning means its change is durable, and N concurrent
writers cost one fsync instead of N.

Bounds: at most ``store.max_pending_writes`` jobs are queued or running at
once; further callers wait on a semaphore (backpressure) instead of growing
memory. A slot is freed when its job completes, even if its caller was
cancelled meanwhile.

Reads run in worker threads (``store.read_threads``), each with its own keyed
read-only connection; WAL lets them proceed while the writer commits.

Storage faults: a commit that fails (a full disk: ``SQLITE_FULL``; an I/O
error: ``SQLITE_IOERR``) rolls the whole batch back and fails each of its
jobs with a :class:`StoreError` that names the cause, as does a job that hit
such an error itself (the transaction is gone with it). The writer records
the outcome of every commit (:class:`WriteHealth`): the first failure starts
an *episode*, logged once at warning with its cause, and the next successful
commit ends it, logged once with its length. The admin health route reads
it, so it turns 503 on the first failed commit. Nothing is acknowledged
unless its commit returned, so a fault loses nothing that was acknowledged.

Cancellation: cancelling a caller that awaits ``write`` stops the wait, not
the job: the job may still commit. Callers that must know (e.g. before sending
an acknowledgement) simply do not acknowledge when cancelled. Shutdown puts a
stop marker behind the queued jobs, so every job submitted before it commits
before the thread exits.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

import trio

from chatd.config import StoreSettings
from chatd.errors import StoreClosedError, StoreError
from chatd.log import fields
from chatd.store.db import (
    Connection,
    DatabaseError,
    close_quietly,
    open_reader,
    open_writer,
)

T = TypeVar("T")

log = logging.getLogger("chatd.store")

_STOP: Final = object()
#: Seconds after a failed commit during which check_writable answers False
#: without trying (the retry_after given to clients refused meanwhile is the same).
WRITE_RECHECK_SECONDS: Final = 5.0


class _Job(Generic[T]):
    __slots__ = ("fn", "result", "error", "done", "on_commit", "on_error", "bounded", "reads_only")

    def __init__(
        self,
        fn: Callable[[Connection], T],
        on_commit: Callable[[T], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        *,
        bounded: bool = True,
        reads_only: bool = False,
    ) -> None:
        self.fn = fn
        self.result: T | None = None
        self.error: BaseException | None = None
        self.done = trio.Event()
        self.on_commit = on_commit
        self.on_error = on_error
        self.bounded = bounded  # holds one of the max_pending_writes slots
        self.reads_only = reads_only  # writes nothing and may run twice (see _run_batch)


class PendingWrite(Generic[T]):
    """A submitted write job (see :meth:`Store.submit`)."""

    __slots__ = ("_job",)

    def __init__(self, job: _Job[T]) -> None:
        self._job = job

    @property
    def done(self) -> bool:
        return self._job.done.is_set()

    async def wait(self) -> T:
        """The job's result once committed; re-raises the job's exception."""
        await self._job.done.wait()
        if self._job.error is not None:
            raise self._job.error
        return self._job.result  # type: ignore[return-value]  # set when error is None


class Buckets:
    """A histogram kept by one thread: the count of observations per bucket.

    ``counts[i]`` holds the values in ``(bounds[i-1], bounds[i]]``; the last
    one those above every bound. Only the writer thread observes; a scrape
    reads the lists as they are (a value or two behind at worst), so the
    writer takes no lock. :mod:`chatd.metrics` exports it cumulatively.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


#: Jobs per writer batch: the group commit at work (bounded by store.max_batch_writes).
BATCH_SIZE_BUCKETS: Final = tuple(float(2**n) for n in range(13))  # 1 .. 4096
#: Seconds per writer batch, BEGIN to a durable COMMIT (one fsync and the jobs).
COMMIT_SECONDS_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip


class StoreStats:
    """Counters for benchmarks, health and metrics: what the writer did."""

    __slots__ = ("commits", "jobs", "largest_batch", "batch_sizes", "commit_seconds")

    def __init__(self) -> None:
        self.commits = 0
        self.jobs = 0
        self.largest_batch = 0
        self.batch_sizes = Buckets(BATCH_SIZE_BUCKETS)
        self.commit_seconds = Buckets(COMMIT_SECONDS_BUCKETS)


#: sqlite primary result codes that say the storage refused a write (not a bug
#: in a job): SQLITE_READONLY, SQLITE_IOERR (and its extended codes),
#: SQLITE_CORRUPT, SQLITE_CANTOPEN, SQLITE_FULL, SQLITE_NOLFS.
STORAGE_ERROR_CODES: Final = frozenset({8, 10, 11, 13, 14, 22})


def storage_cause(exc: BaseException) -> str | None:
    """``"SQLITE_FULL: database or disk is full"`` when ``exc`` is a storage
    fault reported by sqlite (see :data:`STORAGE_ERROR_CODES`), else None."""
    if not isinstance(exc, DatabaseError):
        return None
    code = getattr(exc, "sqlite_errorcode", None)
    if not isinstance(code, int) or code & 0xFF not in STORAGE_ERROR_CODES:
        return None
    return f"{getattr(exc, 'sqlite_errorname', 'SQLITE_ERROR')}: {exc}"


class WriteHealth:
    """The outcome of the writer's last commit, kept by the writer thread and
    read by health checks (a bool and two floats: no lock needed).

    ``failing_since`` is the monotonic time of the first failed commit of the
    current episode, None while commits succeed; ``cause`` names the last
    failure (an sqlite error name and message, never a value written).
    """

    __slots__ = ("failing_since", "last_failure", "cause", "refused_batches", "episodes")

    def __init__(self) -> None:
        self.failing_since: float | None = None
        self.last_failure = 0.0
        self.cause = ""
        self.refused_batches = 0  # batches failed, ever
        self.episodes = 0  # failure episodes, ever

    @property
    def failing(self) -> bool:
        return self.failing_since is not None

    def failed(self, cause: str) -> None:
        now = time.monotonic()
        self.last_failure = now
        self.cause = cause
        self.refused_batches += 1
        if self.failing_since is None:
            self.failing_since = now
            self.episodes += 1
            log.warning("store.write_failed", extra=fields(cause=cause))

    def committed(self) -> None:
        since = self.failing_since
        if since is not None:
            self.failing_since = None
            log.warning(
                "store.write_recovered",
                extra=fields(
                    failed_seconds=round(time.monotonic() - since, 3),
                    refused_batches=self.refused_batches,
                    cause=self.cause,
                ),
            )


class Store:
    """Handle to an open database. Create with :func:`serve_store`."""

    def __init__(self, path: Path, key: bytes, settings: StoreSettings) -> None:
        self.path = path
        self._key = key
        self._settings = settings
        self._writer_conn: Connection | None = None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._pending = trio.Semaphore(settings.max_pending_writes)
        self._read_limiter = trio.CapacityLimiter(settings.read_threads)
        self._readers: queue.SimpleQueue[Connection] = queue.SimpleQueue()
        self._all_readers: list[Connection] = []
        self._readers_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._closed = False
        self.stats = StoreStats()
        self.write_health = WriteHealth()

    # -- lifecycle (called by serve_store) ---------------------------------

    def open_sync(self) -> None:
        """Blocking: open the writer connection (key check, pragmas, migrations)."""
        self._writer_conn = open_writer(
            self.path, self._key, busy_timeout_ms=self._settings.busy_timeout_ms
        )

    def start(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(target=self._writer_main, name="chatd-writer", daemon=True)
        self._thread.start()

    async def aclose(self) -> None:
        """Commit everything queued, stop the writer, close all connections."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._queue.put(_STOP)
            await trio.to_thread.run_sync(self._thread.join)
        for conn in self._all_readers:
            close_quietly(conn)

    @property
    def writer_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed

    # -- the public API ---------------------------------------------------

    async def write(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn(conn)`` in the writer's transaction; return once it is durable.

        ``fn`` runs in the writer thread and must not block on anything but the
        database. An exception from ``fn`` rolls back that job only and is
        re-raised here. Raises :class:`StoreClosedError` after shutdown and
        :class:`StoreError` if the commit itself fails.
        """
        return await (await self.submit(fn)).wait()

    async def submit(
        self, fn: Callable[[Connection], T], on_commit: Callable[[T], None] | None = None
    ) -> PendingWrite[T]:
        """Queue ``fn`` for the writer and return without waiting for it.

        Jobs run in the order they were submitted, so a connection can keep
        several writes in flight and still have them commit in order. Waits
        only for a queue slot (backpressure). ``await pending.wait()`` gives
        the result once durable, exactly like :meth:`write`.

        ``on_commit(result)``, if given, runs on the event loop right after the
        commit, before any waiter wakes, in commit order with the other jobs'.
        It must not block or raise.
        """
        if self._closed or self._thread is None:
            raise StoreClosedError("the store is shut down; the write was not made")
        # The slot is given back when the job completes, not when the caller
        # stops waiting, so cancelled callers cannot push the queue past its bound.
        await self._pending.acquire()
        job: _Job[T] = _Job(fn, on_commit)
        self._queue.put(job)
        return PendingWrite(job)

    def submit_nowait(
        self,
        fn: Callable[[Connection], T],
        on_commit: Callable[[T], None],
        on_error: Callable[[BaseException], None],
        *,
        reads_only: bool = False,
    ) -> None:
        """Queue ``fn`` for the writer at once, without waiting for a slot.

        For callers that keep a bounded number of such jobs in flight
        themselves (the queue service keeps one batch job queued at a time,
        and each connection at most one read of its queue): the job goes into
        the writer's queue before this returns, so it runs after every job
        queued before it and before every job queued after it. Exactly one of
        ``on_commit(result)`` and ``on_error(exception)`` runs on the event
        loop once the batch holding it has committed or failed, in commit
        order with the other jobs' callbacks; neither may block or raise.
        Raises :class:`StoreClosedError` after shutdown.

        ``reads_only`` declares that ``fn`` writes nothing and has no effect
        but its result, so it may run twice: if the batch it is in fails to
        commit (a full disk), it runs again on its own, and what is stored
        can still be read in order with the writes.
        """
        if self._closed or self._thread is None:
            raise StoreClosedError("the store is shut down; the write was not made")
        self._queue.put(_Job(fn, on_commit, on_error, bounded=False, reads_only=reads_only))

    async def read(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn(conn)`` on a read-only connection in a worker thread."""
        if self._closed:
            raise StoreClosedError("the store is shut down")
        return await trio.to_thread.run_sync(self._read_in_thread, fn, limiter=self._read_limiter)

    async def check_writable(self) -> bool:
        """True when the writer can commit a real write (one fsync).

        While commits fail, False at once for WRITE_RECHECK_SECONDS after the
        last failure, without a write of its own: a probe that changes one
        page may fit where real writes do not (a nearly full disk), and must
        not hide their failure. After that it probes again; the first commit
        that succeeds, the probe's or any other, ends the episode.
        """
        health = self.write_health
        if health.failing and time.monotonic() - health.last_failure < WRITE_RECHECK_SECONDS:
            return False
        try:
            await self.write(_rewrite_version)
        except (StoreError, DatabaseError):
            return False
        return True

    # -- threads ------------------------------------------------------------

    def _complete(self, batch: list[_Job[Any]]) -> None:
        """In the Trio thread: run the commit callbacks in order, then wake the
        batch's callers and free their slots."""
        for job in batch:
            try:
                if job.error is None:
                    if job.on_commit is not None:
                        job.on_commit(job.result)
                elif job.on_error is not None:
                    job.on_error(job.error)
            except Exception:
                log.exception("store.on_commit_failed")
        for job in batch:
            job.done.set()
            if job.bounded:
                self._pending.release()

    def _read_in_thread(self, fn: Callable[[Connection], T]) -> T:
        try:
            conn = self._readers.get_nowait()
        except queue.Empty:
            conn = open_reader(self.path, self._key, busy_timeout_ms=self._settings.busy_timeout_ms)
            with self._readers_lock:
                self._all_readers.append(conn)
        try:
            return fn(conn)
        finally:
            self._readers.put(conn)

    def _writer_main(self) -> None:
        conn = self._writer_conn
        if conn is None:  # pragma: no cover - start() follows open_sync()
            raise RuntimeError("open_sync() must run before the writer starts")
        limit = self._settings.max_batch_writes if self._settings.group_commit else 1
        stopping = False
        try:
            while not stopping:
                batch: list[_Job[Any]] = []
                item = self._queue.get()
                while True:
                    if item is _STOP:
                        stopping = True
                        break
                    batch.append(item)
                    if len(batch) >= limit:
                        break
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                if batch:
                    self._run_batch(conn, batch)
        finally:
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except DatabaseError:
                pass  # the WAL is still valid; the next open replays it
            close_quietly(conn)

    def _run_batch(self, conn: Connection, batch: list[_Job[Any]]) -> None:
        started = time.perf_counter()
        cause = self._attempt(conn, batch)
        reads = [job for job in batch if job.reads_only]
        if cause is not None and reads and len(reads) < len(batch):
            # The writes failed. The jobs that only read (a device's queue)
            # need no disk space: run them again on their own, so that what
            # is stored keeps being delivered during a fault.
            self._attempt(conn, reads)
        stats = self.stats
        stats.commit_seconds.observe(time.perf_counter() - started)
        stats.batch_sizes.observe(len(batch))
        stats.commits += 1
        stats.jobs += len(batch)
        stats.largest_batch = max(stats.largest_batch, len(batch))
        try:
            self._token.run_sync_soon(self._complete, batch)  # type: ignore[union-attr]  # set by start()
        except trio.RunFinishedError:  # pragma: no cover - loop gone; nobody to wake
            pass

    def _attempt(self, conn: Connection, jobs: list[_Job[Any]]) -> str | None:
        """Run ``jobs`` in one transaction and commit; the cause of a failure
        (every job then fails with a StoreError naming it), None on success."""
        changes = conn.total_changes
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in jobs:
                job.error = None
                conn.execute("SAVEPOINT job")
                try:
                    job.result = job.fn(conn)
                except BaseException as exc:  # noqa: B036 - handed back to the caller
                    job.error = exc
                    cause = storage_cause(exc)
                    if cause is not None:
                        # The transaction may be gone with it: fail the batch.
                        raise StorageFault(cause) from exc
                    conn.execute("ROLLBACK TO job")
                conn.execute("RELEASE job")
            conn.execute("COMMIT")
        except (DatabaseError, StorageFault) as exc:
            try:
                conn.execute("ROLLBACK")
            except DatabaseError:
                pass  # no transaction was open (sqlite rolled it back itself)
            cause = exc.cause if isinstance(exc, StorageFault) else storage_cause(exc)
            cause = cause or f"{type(exc).__name__}: {exc}"
            failure = StoreError(f"the database write failed and was rolled back ({cause})")
            for job in jobs:
                if job.error is None or storage_cause(job.error) is not None:
                    job.error = failure
            self.write_health.failed(cause)
            return cause
        # A batch that changed nothing (reads through the writer) proves
        # nothing about the disk; the health probe changes page 1 only.
        if conn.total_changes != changes or any(j.fn is _rewrite_version for j in jobs):
            self.write_health.committed()
        return None


class StorageFault(Exception):
    """Internal to the writer: a job hit a storage fault, so its batch fails."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


def _rewrite_version(conn: Connection) -> None:
    # Inside the writer's transaction: rewrite page 1 with the same value.
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    conn.execute(f"PRAGMA user_version = {version}")


def now_ms() -> int:
    """Wall-clock unix milliseconds, the unit of every timestamp column."""
    return time.time_ns() // 1_000_000


async def serve_store(
    path: Path,
    key: bytes,
    settings: StoreSettings,
    *,
    task_status: trio.TaskStatus[Store] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Open the database and run the writer until cancelled.

    Reports the :class:`Store` through ``task_status`` once the key is proven,
    migrations ran and the writer thread is up. Raises :class:`KeyMismatchError`
    or :class:`StoreError` before that if the database cannot be used. On
    cancellation it commits everything already queued (shielded), then closes.
    """
    store = Store(path, key, settings)
    await trio.to_thread.run_sync(store.open_sync)
    store.start()
    try:
        task_status.started(store)
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()
