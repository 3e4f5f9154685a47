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
devices in order and POSTs each one's wake-up in its own task, at most
``push.concurrency`` at once, each bounded by ``push.timeout_seconds``
(resolving, connecting, the answer; the answer's body is never read). A
slow or dead endpoint thus holds one slot for at most the timeout, and the
relay never waits for any of it. The outcome of a POST is a tagged
:class:`Result`: 2xx sent; 404 or 410 drops the endpoint (memory and
store); a connection error, a timeout, 408, 429 or 5xx retries after
``retry_base_seconds * 2**n`` (capped, jittered) for up to
``retry_attempts`` retries, the device waiting in the heap meanwhile; a
redirect, a target the SSRF guard refuses (:mod:`chatd.push.guard`, checked
again before every POST) or another 4xx gives the wake-up up.

Cancellation: cancelling :meth:`serve` cancels the POSTs in flight; nothing
is persisted about wake-ups (after a restart, only envelopes queued from
then on wake devices).
"""

from __future__ import annotations

import enum
import heapq
import logging
import math
import random
from collections import deque
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Final

import httpx
import trio

from chatd.config import PushSettings
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
from chatd.push.wakeup import Endpoint, check_keys, wake_up_request
from chatd.store import Store, now_ms

log = logging.getLogger("chatd.push")

#: Envelope kinds that wake a device (receipts do not).
WAKING_KINDS: Final = frozenset(("message", "room_message", "room_event"))
ERR_PUSH_DISABLED: Final = "push_disabled"
USER_AGENT: Final = "chatd-push"
JITTER: Final = 0.1  # retry delays vary by up to this share, so retries spread
#: HTTP clients the POSTs are spread over. httpcore's pool scans its
#: connections for every request, so one pool of push.concurrency (1,000+)
#: connections costs O(n) per wake-up on the event loop; shards keep n small.
POOL_SHARDS: Final = 16


@dataclass(slots=True)
class Pool:
    """One HTTP client (connection pool) and the POSTs running on it."""

    client: httpx.AsyncClient
    busy: int = 0


class Result(enum.Enum):
    """The outcome of one wake-up POST."""

    SENT = "sent"  # 2xx
    GONE = "gone"  # 404 or 410: the endpoint is dropped
    RETRY = "retry"  # no connection, timeout, 408, 429, 5xx
    REFUSED = "refused"  # the SSRF guard, a redirect, another 4xx: given up
    SKIPPED = "skipped"  # the endpoint went away, or the device came back


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


class Notifier:
    """Push endpoints and the wake-ups sent to them. One per daemon; call
    :meth:`open` first, then start :meth:`serve` in the nursery."""

    def __init__(
        self,
        store: Store,
        settings: PushSettings,
        *,
        resolve: Resolver = resolve_host,
    ) -> None:
        self.store = store
        self.settings = settings
        self.stats = PushStats()
        self._resolve = resolve
        self._allowed = parse_networks(settings.allowed_networks)
        self._endpoints: dict[str, Endpoint] = {}
        self._now: deque[str] = deque()  # waiting devices due at once, in order
        self._later: list[tuple[float, str]] = []  # heap: (due, device) for the rest
        self._waiting: set[str] = set()  # in _now or _later
        self._in_flight: set[str] = set()
        self._again: set[str] = set()  # in flight, and another wake-up is wanted
        self._last_sent: dict[str, float] = {}  # device -> trio time of its last POST
        self._attempts: dict[str, int] = {}  # device -> failed POSTs of its wake-up
        self._due = trio.Event()
        self._settled = trio.Event()
        self._settled.set()

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
        if not self._waiting and not self._in_flight:
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
        Owns the HTTP clients (POOL_SHARDS connection pools; no proxies from
        the environment, no redirects) and one task per POST in flight, at
        most ``push.concurrency``.
        """
        s = self.settings
        shards = min(POOL_SHARDS, s.concurrency)
        per_shard = -(-s.concurrency // shards)  # ceil: the shards hold every slot
        limits = httpx.Limits(max_connections=per_shard, max_keepalive_connections=per_shard)
        async with AsyncExitStack() as stack:
            pools = [
                Pool(
                    await stack.enter_async_context(
                        httpx.AsyncClient(
                            timeout=httpx.Timeout(s.timeout_seconds),
                            limits=limits,
                            follow_redirects=False,
                            trust_env=False,
                            headers={"User-Agent": USER_AGENT},
                        )
                    )
                )
                for _ in range(shards)
            ]
            nursery = await stack.enter_async_context(trio.open_nursery())
            slots = trio.Semaphore(s.concurrency)
            task_status.started()
            while True:
                device_id = await self._next_due()
                endpoint = self._endpoints.get(device_id)
                if endpoint is None or is_live(device_id):
                    self._attempts.pop(device_id, None)
                    self._check_settled()
                    continue
                self._in_flight.add(device_id)  # before waiting: new envelopes coalesce
                self.stats.in_flight += 1
                await slots.acquire()
                pool = min(pools, key=lambda p: p.busy)  # never over its share of slots
                pool.busy += 1
                nursery.start_soon(self._attempt, pool, device_id, endpoint, slots)

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

    async def _attempt(
        self,
        pool: Pool,
        device_id: str,
        endpoint: Endpoint,
        slots: trio.Semaphore,
    ) -> None:
        self._last_sent[device_id] = trio.current_time()
        try:
            result = await self.post(pool.client, endpoint)
        finally:
            pool.busy -= 1
            slots.release()
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
            await self._drop(device_id, endpoint)
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
        """The endpoint answered 404/410: forget it, unless the device
        registered another meanwhile."""
        if self._endpoints.get(device_id) != endpoint:
            return
        self._forget(device_id)

        def delete(conn: Any) -> None:
            conn.execute(
                "DELETE FROM push_endpoints WHERE device_id = ? AND url = ?",
                (device_id, endpoint.url),
            )

        try:
            await self.store.write(delete)
        except Exception:
            log.warning("push.endpoint_not_deleted")  # it answers 404/410 again next time

    async def post(self, client: httpx.AsyncClient, endpoint: Endpoint) -> Result:
        """POST one wake-up to ``endpoint`` through the SSRF guard; never raises
        for anything the endpoint or the network does."""
        s = self.settings
        with trio.move_on_after(s.timeout_seconds):
            try:
                target = parse_target(endpoint.url)
                addresses = await checked_addresses(target, self._allowed, self._resolve)
            except PushRefused:
                log.warning("push.target_refused")
                return Result.REFUSED
            except OSError:
                return Result.RETRY  # no DNS answer now
            headers, body = wake_up_request(endpoint, s.ttl_seconds)
            headers["Host"] = target.host_header
            extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
            try:
                async with client.stream(
                    "POST",
                    target.url_for(addresses[0]),
                    headers=headers,
                    content=body,
                    extensions=extensions,
                ) as response:
                    status = response.status_code  # the body is never read
            except httpx.HTTPError:
                return Result.RETRY
            if 200 <= status < 300:
                return Result.SENT
            if status in (404, 410):
                return Result.GONE
            if status in (408, 429) or status >= 500:
                return Result.RETRY
            log.warning("push.refused_by_endpoint", extra=fields(status=status))
            return Result.REFUSED  # a redirect (never followed) or another 4xx
        return Result.RETRY  # timed out
