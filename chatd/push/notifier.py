"""The notifier: content-free wake-ups to devices without a live connection.

Theory of operation
-------------------
Devices register a push endpoint over the relay (:meth:`Notifier.register`,
:meth:`Notifier.remove`); the endpoints live in the ``push_endpoints`` table
and, all of them, in memory (one small entry per device), so that the hot
path never touches the store.

The hot path is :meth:`Notifier.queued_offline`. The relay's registry calls
it, on the event loop, when the queue service (or the room log) accepts an
envelope for a device that has **no live connection** (``daemon.py`` hands
the notifier to the registry as its offline sink). It does a dict lookup, a
set lookup and an append to a deque, and never blocks, awaits or allocates
a task: a device without an endpoint costs one dict lookup. Receipts
(``delivered``, ``expired``) wake nobody: they wait for the device's next
connection anyway.

Coalescing: a device is in at most one of three places: *waiting* (in the
due-now deque, or in the heap of later wake-ups), *in flight* (its POST
running), or nowhere. A new envelope for a waiting device adds nothing; for
a device in flight it asks for one more wake-up after this one; otherwise
the device starts waiting, due at once unless its last wake-up went out
less than ``push.interval_seconds`` ago (then due when the interval ends).
So a device gets at most one wake-up per interval, and the last envelope
queued is never left without one. At most ``push.max_queued`` devices wait;
beyond that wake-ups are dropped and counted.

:meth:`Notifier.serve` (a service in the daemon's nursery) takes due
devices in order and hands each one's wake-up, as a job (job id, URL,
keys), to the **sender**, a child process (:mod:`chatd.push.sender`) that
does the CPU-heavy part: the SSRF guard's check with its own DNS lookup
(:mod:`chatd.push.guard`, before every POST), the RFC 8291 encryption and
the POST (:mod:`chatd.push.poster`, libcurl), each bounded by
``push.timeout_seconds`` (resolving, connecting, the answer). So
handing a wake-up over costs the event loop one encoded line, and the
relay never waits for any of it. At most ``push.concurrency`` jobs are
outstanding; a slow or dead endpoint holds one slot for at most the
timeout. The sender answers each job with its tagged :class:`Result`: 2xx
sent; 404 or 410 drops the endpoint (memory and store); a connection
error, a timeout, 408, 429 or 5xx retries after
``retry_base_seconds * 2**n`` (capped, jittered) for up to
``retry_attempts`` retries, the device waiting in the heap meanwhile; a
redirect, a target the SSRF guard refuses or another 4xx gives the wake-up
up. The retries are decided here, where the coalescing state lives, so a
device is never both waiting here and retried there.

The sender is started when the first job is made (a server whose devices
register no endpoint never runs it), restarted with backoff
(``RESTART_BASE`` doubling to ``RESTART_MAX``) if it dies, its unanswered
jobs counting as failed POSTs (retried).

Cancellation: cancelling :meth:`serve` closes the sender's stdin, which
stops it (the POSTs in flight are cancelled; it is killed after
``STOP_GRACE`` seconds if it has not exited). Nothing is persisted about
wake-ups; instead, at start, every device with an endpoint and something
in its queue is woken once (:meth:`Notifier.wake_waiting`).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import random
import subprocess
import sys
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgspec
import trio

from chatd.config import LogSettings, PushSettings
from chatd.log import fields
from chatd.protocol import frames as f
from chatd.push.guard import (
    PushRefused,
    Resolver,
    checked_addresses,
    parse_networks,
    parse_target,
    resolve_host,
)
from chatd.push.sender import Job, LineReader, LinkError, Outbox, Outcome, Result, Setup, encode
from chatd.push.wakeup import Endpoint, check_keys
from chatd.store import Store, now_ms

log = logging.getLogger("chatd.push")

#: Envelope kinds that wake a device (receipts do not).
WAKING_KINDS: Final = frozenset(("message", "room_message", "room_event"))
ERR_PUSH_DISABLED: Final = "push_disabled"
YIELD_EVERY: Final = 64  # due wake-ups taken between two checkpoints, at most
#: Seconds the service waits, once woken, for more wake-ups to fall due, so
#: that under load it hands jobs to the sender tens at a time (one wake of
#: this task and one pipe write for all) instead of one by one.
DUE_LINGER: Final = 0.01
JITTER: Final = 0.1  # retry delays vary by up to this share, so retries spread
STOP_GRACE: Final = 5.0  # seconds the sender has to exit after its stdin closes
RESTART_BASE: Final = 0.5  # seconds before restarting a sender that died; doubles
RESTART_MAX: Final = 60.0  # seconds between restarts, at most
HEALTHY_AFTER: Final = 60.0  # seconds a sender ran before its death resets the backoff
#: Variables of the daemon's environment the sender does not get.
PRIVATE_ENV: Final = ("NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC", "CREDENTIALS_DIRECTORY")

PACKAGE_ROOT: Final = str(Path(__file__).resolve().parent.parent.parent)  # chatd imports from here
#: Opens a link to a sender set up with the given Setup: (its jobs, its outcomes).
SenderLink = tuple[trio.abc.SendStream, trio.abc.ReceiveStream]
OpenSender = Callable[[Setup], AbstractAsyncContextManager[SenderLink]]


def sender_command() -> list[str]:
    return [sys.executable, "-m", "chatd.push", "sender"]


@asynccontextmanager
async def open_sender_process(setup: Setup) -> AsyncIterator[SenderLink]:
    """Start ``python -m chatd.push sender`` (same interpreter, same
    sandbox, none of the daemon's descriptors, none of PRIVATE_ENV), send it
    ``setup``, and yield its stdin and stdout. On exit, closing its stdin
    tells it to stop; it is killed if it has not within STOP_GRACE seconds.
    Raises OSError if it cannot be started."""
    env = {k: v for k, v in os.environ.items() if k not in PRIVATE_ENV}
    root = PACKAGE_ROOT
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    process = await trio.lowlevel.open_process(
        sender_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    assert process.stdin is not None and process.stdout is not None  # noqa: S101 - PIPE asked
    try:
        await process.stdin.send_all(encode(setup) + b"\n")
        yield process.stdin, process.stdout
    finally:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(STOP_GRACE):
                try:
                    await process.stdin.aclose()
                finally:
                    await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.stdout.aclose()
        if process.returncode != 0:
            log.warning("push.sender_exited", extra=fields(status=process.returncode))


@dataclass(slots=True)
class PushStats:
    """Counters since start (for tests, benches and the logs)."""

    woken: int = 0  # wake-ups asked for (offline device with an endpoint)
    coalesced: int = 0  # folded into one already waiting or in flight
    overflow: int = 0  # dropped: push.max_queued devices were waiting
    sent: int = 0
    retried: int = 0
    given_up: int = 0  # retries used up
    refused: int = 0
    gone: int = 0  # endpoints dropped on 404/410
    in_flight: int = 0
    sender_starts: int = 0  # sender processes started


class Notifier:
    """Push endpoints and the wake-ups sent to them. One per daemon; call
    :meth:`open` first, then start :meth:`serve` in the nursery."""

    def __init__(
        self,
        store: Store,
        settings: PushSettings,
        *,
        log_settings: LogSettings | None = None,
        resolve: Resolver = resolve_host,
        open_sender: OpenSender = open_sender_process,
    ) -> None:
        self.store = store
        self.settings = settings
        self.stats = PushStats()
        self._log_settings = log_settings or LogSettings()
        self._resolve = resolve  # at registration; the sender resolves for itself
        self._open_sender = open_sender
        self._allowed = parse_networks(settings.allowed_networks)
        self._endpoints: dict[str, Endpoint] = {}
        self._now: deque[str] = deque()  # waiting devices due at once, in order
        self._later: list[tuple[float, str]] = []  # heap: (due, device) for the rest
        self._waiting: set[str] = set()  # in _now or _later
        self._in_flight: set[str] = set()
        self._again: set[str] = set()  # in flight, and another wake-up is wanted
        self._last_sent: dict[str, float] = {}  # device -> trio time of its last POST
        self._attempts: dict[str, int] = {}  # device -> failed POSTs of its wake-up
        self._jobs: dict[int, tuple[str, Endpoint]] = {}  # job id -> (device, endpoint)
        self._job_ids = itertools.count(1)
        self._outbox = Outbox()  # job lines for the sender
        self._has_jobs = trio.Event()
        self._slots = trio.Semaphore(settings.concurrency)
        self._dropping = 0  # endpoints being deleted from the store
        self._due = trio.Event()
        self._settled = trio.Event()
        self._settled.set()
        self.due_linger = DUE_LINGER  # 0 for tests that drive a MockClock by hand

    async def open(self) -> None:
        """Load every registered endpoint into memory."""

        def load(conn: Any) -> list[tuple[str, str, str | None, str | None]]:
            rows = conn.execute("SELECT device_id, url, p256dh, auth FROM push_endpoints")
            return [tuple(r) for r in rows]

        for device_id, url, p256dh, auth in await self.store.read(load):
            self._endpoints[device_id] = Endpoint(url, p256dh, auth)

    # -- endpoints (from the relay's requests) ------------------------------------------

    def endpoint(self, device_id: str) -> Endpoint | None:
        return self._endpoints.get(device_id)

    async def register(
        self, device_id: str, url: str, p256dh: str | None = None, auth: str | None = None
    ) -> None:
        """Check and store ``device_id``'s endpoint, replacing an earlier one.
        Raises :class:`PushRefused` (nothing stored) for a disabled notifier,
        a URL the SSRF guard refuses (also after resolving it) or bad keys."""
        if not self.settings.enabled:
            raise PushRefused(ERR_PUSH_DISABLED, "push wake-ups are turned off on this server")
        target = parse_target(url)
        check_keys(p256dh, auth)
        try:
            with trio.fail_after(self.settings.timeout_seconds):
                await checked_addresses(target, self._allowed, self._resolve)
        except (OSError, trio.TooSlowError):
            raise PushRefused(
                "push_url_refused", "the URL's host name does not resolve", field="$.url"
            ) from None
        endpoint = Endpoint(url, p256dh, auth)

        def write(conn: Any) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO push_endpoints (device_id, url, p256dh, auth, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (device_id, url, p256dh, auth, now_ms()),
            )

        await self.store.write(write)
        self._endpoints[device_id] = endpoint
        self._attempts.pop(device_id, None)

    async def remove(self, device_id: str) -> None:
        """Forget ``device_id``'s endpoint (if any): no more wake-ups."""
        await self.store.write(
            lambda conn: conn.execute(
                "DELETE FROM push_endpoints WHERE device_id = ?", (device_id,)
            )
        )
        self._forget(device_id)

    def forget_device(self, device_id: str) -> None:
        """The device was removed (its row, with its endpoint's, is gone)."""
        self._forget(device_id)

    def _forget(self, device_id: str) -> None:
        self._endpoints.pop(device_id, None)
        self._last_sent.pop(device_id, None)
        self._attempts.pop(device_id, None)
        self._again.discard(device_id)
        # A waiting entry stays in its deque or heap; it is skipped when due.

    # -- the hot path (from the relay's registry) -------------------------------------

    def queued_offline(self, device_id: str, envelope: f.Envelope) -> None:
        """An envelope was queued for a device with no live connection: wake
        it, unless it has no endpoint or this is a receipt. O(1), never blocks."""
        if device_id not in self._endpoints or envelope.kind not in WAKING_KINDS:
            return
        self.wake(device_id)

    def wake_waiting(self, queued: dict[str, list[int]]) -> None:
        """At start: wake every device with an endpoint that has entries
        queued (``queued``: device -> [entries, bytes], the queue service's
        totals), since the wake-ups of a server that stopped were lost with
        it. No live connection exists yet; coalescing and the bound apply."""
        for device_id, (entries, _size) in queued.items():
            if entries > 0 and device_id in self._endpoints:
                self.wake(device_id)

    def wake(self, device_id: str) -> None:
        """Ask for a wake-up of ``device_id`` (coalesced; see the module docstring)."""
        if not self.settings.enabled:
            return
        self.stats.woken += 1
        if device_id in self._waiting:
            self.stats.coalesced += 1
        elif device_id in self._in_flight:
            self.stats.coalesced += 1
            self._again.add(device_id)
        elif len(self._waiting) >= self.settings.max_queued:
            self.stats.overflow += 1
        else:
            last = self._last_sent.get(device_id)
            due = -math.inf if last is None else last + self.settings.interval_seconds
            self._enqueue(device_id, due)

    def _enqueue(self, device_id: str, due: float) -> None:
        self._waiting.add(device_id)
        if due <= trio.current_time():
            self._now.append(device_id)
        else:
            heapq.heappush(self._later, (due, device_id))  # only within an interval
        if self._settled.is_set():
            self._settled = trio.Event()
        self._due.set()

    # -- the service ---------------------------------------------------------------------

    async def wait_settled(self) -> None:
        """Wait until no wake-up is waiting or in flight (for tests and benches)."""
        await self._settled.wait()

    def _check_settled(self) -> None:
        if not self._waiting and not self._in_flight and not self._dropping:
            self._settled.set()

    async def serve(
        self,
        *,
        is_live: Callable[[str], bool] = lambda device_id: False,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Send wake-ups as they fall due, until cancelled.

        ``is_live`` says whether a device has a live connection now: a
        wake-up that falls due after its device came back is not sent.
        Each due wake-up becomes a job for the sender process
        (:mod:`chatd.push.sender`), at most ``push.concurrency`` outstanding.
        The sender is started when the first job is made, restarted with
        backoff if it dies (its outstanding jobs count as failed: retried),
        and stopped when this is cancelled (stdin closed, killed after
        STOP_GRACE seconds).
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._supervise_sender, nursery)
            task_status.started()
            handed = 0
            while True:
                device_id = await self._next_due()  # no checkpoint if one is due
                handed += 1
                if handed % YIELD_EVERY == 0:
                    await trio.lowlevel.checkpoint()  # a long burst lets the relay in
                endpoint = self._endpoints.get(device_id)
                if endpoint is None or is_live(device_id):
                    self._attempts.pop(device_id, None)
                    self._check_settled()
                    continue
                self._in_flight.add(device_id)  # before waiting: new envelopes coalesce
                self.stats.in_flight += 1
                try:
                    self._slots.acquire_nowait()
                except trio.WouldBlock:
                    await self._slots.acquire()
                self._last_sent[device_id] = trio.current_time()
                job_id = next(self._job_ids)
                self._jobs[job_id] = (device_id, endpoint)
                self._outbox.put(encode(Job(job_id, endpoint.url, endpoint.p256dh, endpoint.auth)))
                self._has_jobs.set()

    async def _next_due(self) -> str:
        while True:
            self._due = trio.Event()
            device_id: str | None = None
            if self._now:
                device_id = self._now.popleft()
            elif self._later and self._later[0][0] <= trio.current_time():
                device_id = heapq.heappop(self._later)[1]
            if device_id is not None:
                self._waiting.discard(device_id)
                return device_id
            deadline = self._later[0][0] if self._later else math.inf
            with trio.move_on_at(deadline):
                await self._due.wait()
                if self.due_linger:
                    await trio.sleep(self.due_linger)

    # -- the sender process ---------------------------------------------------------------

    def _setup(self) -> Setup:
        s = self.settings
        return Setup(
            timeout_seconds=s.timeout_seconds,
            ttl_seconds=s.ttl_seconds,
            concurrency=s.concurrency,
            allowed_networks=tuple(s.allowed_networks),
            log_level=self._log_settings.level,
            log_format=self._log_settings.format,
        )

    async def _supervise_sender(self, nursery: trio.Nursery) -> None:
        """Run a sender while there are jobs; restart it with backoff if it dies."""
        failures = 0
        while True:
            while not self._jobs:
                self._has_jobs = trio.Event()
                await self._has_jobs.wait()
            started = trio.current_time()
            self.stats.sender_starts += 1
            try:
                async with self._open_sender(self._setup()) as (jobs, outcomes):
                    await self._exchange(jobs, outcomes, nursery)
                log.warning("push.sender_ended")
            except (OSError, trio.BrokenResourceError, LinkError) as exc:
                log.warning("push.sender_failed", extra=fields(error=type(exc).__name__))
            # Whatever the sender had not answered counts as a failed POST.
            self._outbox.clear()
            for job_id in list(self._jobs):
                self._finish(job_id, Result.RETRY, nursery)
            if trio.current_time() - started >= HEALTHY_AFTER:
                failures = 0
            await trio.sleep(min(RESTART_BASE * 2**failures, RESTART_MAX))
            failures += 1

    async def _exchange(
        self, jobs: trio.abc.SendStream, outcomes: trio.abc.ReceiveStream, nursery: trio.Nursery
    ) -> None:
        """Write jobs, read outcomes, until the sender closes its stdout."""
        decoder = msgspec.json.Decoder(Outcome)
        reader = LineReader(outcomes)
        async with trio.open_nursery() as link:
            link.start_soon(self._outbox.serve, jobs)
            while lines := await reader.receive_lines():
                for line in lines:
                    try:
                        outcome = decoder.decode(line)
                        result = Result(outcome.result)
                    except (msgspec.ValidationError, ValueError):
                        raise LinkError("not an outcome from the sender") from None
                    self._finish(outcome.id, result, nursery)
            link.cancel_scope.cancel()

    def _finish(self, job_id: int, result: Result, nursery: trio.Nursery) -> None:
        """Job ``job_id`` ended with ``result``: count it, and retry, drop or
        wake again as it says."""
        job = self._jobs.pop(job_id, None)
        if job is None:
            return  # not ours (a sender answering twice): ignored
        device_id, endpoint = job
        self._slots.release()
        self._in_flight.discard(device_id)
        self.stats.in_flight -= 1
        again = device_id in self._again
        self._again.discard(device_id)
        if result is Result.SENT:
            self.stats.sent += 1
            self._attempts.pop(device_id, None)
        elif result is Result.GONE:
            self.stats.gone += 1
            log.info("push.endpoint_gone")
            if self._endpoints.get(device_id) == endpoint:  # not replaced meanwhile
                self._forget(device_id)
                self._dropping += 1
                nursery.start_soon(self._drop, device_id, endpoint)
            again = False
        elif result is Result.RETRY:
            failures = self._attempts.get(device_id, 0) + 1
            if failures > self.settings.retry_attempts:
                self.stats.given_up += 1
                self._attempts.pop(device_id, None)
                log.info("push.given_up", extra=fields(attempts=failures))
            else:
                self.stats.retried += 1
                self._attempts[device_id] = failures
                delay = min(
                    self.settings.retry_base_seconds * 2 ** (failures - 1),
                    self.settings.retry_max_seconds,
                )
                delay *= 1 + JITTER * random.random()  # noqa: S311 - spreading, not secrecy
                if device_id not in self._waiting:
                    self._enqueue(device_id, trio.current_time() + delay)
                again = False  # the retry is the next wake-up
        elif result is Result.REFUSED:
            self.stats.refused += 1
            self._attempts.pop(device_id, None)
        if again and device_id in self._endpoints and device_id not in self._waiting:
            self._enqueue(device_id, self._last_sent[device_id] + self.settings.interval_seconds)
        self._check_settled()

    async def _drop(self, device_id: str, endpoint: Endpoint) -> None:
        """Delete an endpoint that answered 404/410 from the store."""

        def delete(conn: Any) -> None:
            conn.execute(
                "DELETE FROM push_endpoints WHERE device_id = ? AND url = ?",
                (device_id, endpoint.url),
            )

        try:
            await self.store.write(delete)
        except Exception:
            log.warning("push.endpoint_not_deleted")  # it answers 404/410 again next time
        finally:
            self._dropping -= 1
            self._check_settled()
