"""Prometheus metrics: what the services count, exported at scrape time.

Theory of operation
-------------------
The services keep plain counters of what they did (the store writer's
:class:`~chatd.store.store.StoreStats`, the relay's
:class:`~chatd.relay.registry.RelayStats`, the queue service's
``QueueStats`` and in-memory queue totals, the auth service's failure and
refusal counters, the retention service's latest reports). None of them
knows about Prometheus, and counting costs them an integer increment. A
:class:`Metrics` owns one :class:`prometheus_client.CollectorRegistry` per
daemon (never the process-global one, so several daemons in one test
process stay apart); its collector reads those counters when scraped and
``prometheus_client`` writes the text format.

Two gauges need the database: the age of the oldest queued envelope (the
first row by primary key of ``envelopes`` and of ``room_log``: two index
lookups) and the number of devices low on one-time keys (a scan of the
keys, so at most once a minute). :meth:`Metrics.refresh` reads them in a
reader thread before each scrape and caches them (:data:`OLDEST_CACHE_SECONDS`,
:data:`LOW_KEYS_CACHE_SECONDS`), so a scrape never waits on the writer and
a fast scraper cannot load the store.

Event-loop lag is measured by :func:`serve_loop_lag`: a task that sleeps a
fixed :data:`LAG_INTERVAL` and records how late it woke.

No metric carries a label that identifies a person or a device: label
values come from fixed sets in the code (a request kind, a failure reason,
a retention job name, the version), never from input. ``tests/test_metrics``
scrapes a daemon after real traffic and checks every label against
:data:`ALLOWED_LABELS`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import trio
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from chatd import __version__
from chatd.store import Store, now_ms
from chatd.store.store import Buckets

if TYPE_CHECKING:  # annotations only: the daemon builds the services
    from chatd.auth.service import AuthService
    from chatd.e2ee.queues import QueueService
    from chatd.relay.ratelimits import RequestLimits
    from chatd.relay.registry import Registry
    from chatd.relay.server import Relay
    from chatd.retention import Retention

#: The content type of a scrape: the Prometheus text format 0.0.4, which
#: every Prometheus version reads.
CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4

#: Every label name a chatd metric may carry. None of them names a user, a
#: device, a session, a room or an address; tests/test_metrics.py holds each
#: scrape to this list.
ALLOWED_LABELS: Final = frozenset(
    {"le", "state", "request", "reason", "queue", "retention_job", "version"}
)

OLDEST_CACHE_SECONDS: Final = 5.0  # the oldest envelope's time is read at most this often
LOW_KEYS_CACHE_SECONDS: Final = 60.0  # devices low on one-time keys: counted at most this often
LAG_INTERVAL: Final = 0.25  # seconds the loop-lag probe sleeps between two measurements
LAG_WINDOW: Final = 60.0  # seconds over which chatd_event_loop_lag_max_seconds is the max
LAG_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

_OLDEST_SQL: Final = (
    "SELECT (SELECT sent_at FROM envelopes ORDER BY id LIMIT 1),"
    " (SELECT sent_at FROM room_log ORDER BY id LIMIT 1)"
)
# A device is low when fewer than the threshold of its one-time keys are
# unclaimed (the same rule as key_count's upload_wanted); devices that never
# published identity keys are not counted.
_LOW_KEYS_SQL: Final = (
    "SELECT count(*) FROM devices AS d WHERE d.curve25519 IS NOT NULL AND"
    " (SELECT count(*) FROM one_time_keys AS k"
    "  WHERE k.device_id = d.id AND k.claimed_at IS NULL) < ?"
)


@dataclass(frozen=True, slots=True)
class Sources:
    """The services whose counters the metrics read; the daemon fills it in."""

    store: Store
    registry: Registry
    auth: AuthService
    queues: QueueService
    retention: Retention
    relay_limits: RequestLimits
    relay: Relay  # its address limits and accept-time refusals
    low_key_threshold: int  # devices.one_time_key_threshold


class LoopLag:
    """How late the event loop woke the probe: a histogram, and the largest
    lag over the last :data:`LAG_WINDOW` (at least) for a gauge."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.histogram = Histogram(
            "chatd_event_loop_lag_seconds",
            "How late the event loop woke a task that slept a fixed interval.",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self._window_start = 0.0
        self._current_max = 0.0
        self._previous_max = 0.0

    def observe(self, lag: float, now: float) -> None:
        self.histogram.observe(lag)
        if now - self._window_start >= LAG_WINDOW:
            self._previous_max, self._current_max = self._current_max, 0.0
            self._window_start = now
        self._current_max = max(self._current_max, lag)

    @property
    def recent_max(self) -> float:
        return max(self._previous_max, self._current_max)


class Metrics:
    """The daemon's metrics registry; :meth:`render` is one scrape."""

    def __init__(self, sources: Sources) -> None:
        self.sources = sources
        self.registry = CollectorRegistry(auto_describe=False)
        self.lag = LoopLag(self.registry)
        self._oldest_ms: int | None = None  # unix ms of the oldest queued entry
        self._oldest_read_at = -math.inf
        self._low_keys = 0
        self._low_keys_read_at = -math.inf
        self.registry.register(_ChatdCollector(self))
        ProcessCollector(registry=self.registry)  # memory, CPU, open descriptors

    async def refresh(self) -> None:
        """Re-read the database-derived gauges whose cache expired (in a reader thread)."""
        now = trio.current_time()
        store = self.sources.store
        if now - self._oldest_read_at >= OLDEST_CACHE_SECONDS:
            self._oldest_read_at = now
            envelope, room = await store.read(lambda conn: conn.execute(_OLDEST_SQL).fetchone())
            times = [t for t in (envelope, room) if t is not None]
            self._oldest_ms = min(times) if times else None
        if now - self._low_keys_read_at >= LOW_KEYS_CACHE_SECONDS:
            self._low_keys_read_at = now
            threshold = self.sources.low_key_threshold
            self._low_keys = await store.read(
                lambda conn: int(conn.execute(_LOW_KEYS_SQL, (threshold,)).fetchone()[0])
            )

    def render(self) -> bytes:
        """The registry in the Prometheus text format (no I/O; a few ms at most)."""
        return generate_latest(self.registry)

    async def scrape(self) -> bytes:
        """Refresh what expired, then render: one scrape."""
        await self.refresh()
        return self.render()

    @property
    def oldest_age_seconds(self) -> float:
        if self._oldest_ms is None:
            return 0.0
        return max(0.0, (now_ms() - self._oldest_ms) / 1000)

    @property
    def devices_low_on_keys(self) -> int:
        return self._low_keys


async def serve_loop_lag(
    metrics: Metrics,
    interval: float = LAG_INTERVAL,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Sleep ``interval`` over and over and record how late each wake-up came.

    Runs until cancelled; it holds nothing.
    """
    task_status.started()
    while True:
        asleep = trio.current_time()
        await trio.sleep(interval)
        woke = trio.current_time()
        metrics.lag.observe(max(0.0, woke - asleep - interval), woke)


def _histogram(name: str, help_text: str, buckets: Buckets) -> HistogramMetricFamily:
    counts = list(buckets.counts)  # one copy: the writer thread may add meanwhile
    cumulative: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip(buckets.bounds, counts, strict=False):
        running += count
        cumulative.append((_bound(bound), running))
    running += counts[-1]
    cumulative.append(("+Inf", running))
    return HistogramMetricFamily(name, help_text, buckets=cumulative, sum_value=buckets.sum)


def _bound(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)


def _counter(name: str, help_text: str, label: str, values: Iterable[tuple[str, int]]) -> Metric:
    family = CounterMetricFamily(name, help_text, labels=[label])
    for key, count in sorted(values):
        family.add_metric([key], count)
    return family


class _ChatdCollector(Collector):
    """Reads the services' counters at scrape time (on the event loop)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        s = m.sources
        yield from self._connections(s.registry)
        yield from self._relayed(s)
        yield from self._queues(s.queues, m)
        keys = GaugeMetricFamily(
            "chatd_devices_low_on_one_time_keys",
            "Devices with fewer unclaimed one-time keys than devices.one_time_key_threshold "
            f"(counted at most every {LOW_KEYS_CACHE_SECONDS:g} s).",
        )
        keys.add_metric([], m.devices_low_on_keys)
        yield keys
        yield _counter(
            "chatd_login_failures",
            "Failed logins since start, by reason (the auth audit outcome).",
            "reason",
            s.auth.login_failures.items(),
        )
        refused = [(f"auth_{k}", v) for k, v in s.auth.rate_limited.items()]
        refused += list(s.relay_limits.refused.items())
        yield _counter(
            "chatd_rate_limited",
            "Requests refused by a rate limit since start, by request "
            "(auth_* are login, registration, resume, refresh and second-factor limits).",
            "request",
            refused,
        )
        yield from self._floods(s.relay)
        yield from self._retention(s.retention)
        stats = s.store.stats
        yield _histogram(
            "chatd_store_batch_writes",
            "Write jobs per store writer transaction (group commit).",
            stats.batch_sizes,
        )
        yield _histogram(
            "chatd_store_commit_seconds",
            "Store writer transaction time, BEGIN to a durable COMMIT.",
            stats.commit_seconds,
        )
        lag = GaugeMetricFamily(
            "chatd_event_loop_lag_max_seconds",
            f"Largest event-loop lag over the last {LAG_WINDOW:g} s or more.",
        )
        lag.add_metric([], m.lag.recent_max)
        yield lag
        info = GaugeMetricFamily(
            "chatd_build_info", "The running chatd version.", labels=["version"]
        )
        info.add_metric([__version__], 1)
        yield info

    def _connections(self, registry: Registry) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "chatd_connections",
            "Open relay connections: all of them, and those with a session.",
            labels=["state"],
        )
        family.add_metric(["open"], len(registry.connections))
        family.add_metric(
            ["authenticated"], sum(len(conns) for conns in registry.by_session.values())
        )
        yield family
        online = GaugeMetricFamily("chatd_devices_online", "Devices with a live connection.")
        online.add_metric([], len(registry.by_device))
        yield online

    def _floods(self, relay: Relay) -> Iterator[Metric]:
        yield _counter(
            "chatd_relay_connections_refused",
            "Connections refused since start by the per-address limits: answered 429"
            " (address_limit), closed at accept between those (address_hang_up), or past"
            " the handshakes one peer may have under way (handshake_cap).",
            "reason",
            [
                ("address_limit", relay.addresses.refused),
                ("address_hang_up", relay.addresses.hung_up),
                ("handshake_cap", relay.streams.hung_up),
            ],
        )
        dropped = CounterMetricFamily(
            "chatd_relay_addresses_dropped",
            "Times since start an address (an IPv6 one: its /64) had its SYNs dropped by"
            " the kernel for a moment, after a refusal at accept.",
        )
        dropped.add_metric([], relay.streams.drops.dropped)
        yield dropped

    def _relayed(self, s: Sources) -> Iterator[Metric]:
        r = s.registry.stats
        yield _counter(
            "chatd_relay_requests",
            "Message requests received by the relay since start, by request.",
            "request",
            [("send", r.sends), ("room_send", r.room_sends), ("ack", r.acks)],
        )
        delivered = CounterMetricFamily(
            "chatd_relay_envelopes_delivered",
            "Envelopes (messages, room entries, receipts) written to connections since start.",
        )
        delivered.add_metric([], r.delivered)
        yield delivered
        q = s.queues.stats
        yield _counter(
            "chatd_queue_entries_accepted",
            "Entries accepted into device queues since start: direct envelopes "
            "(messages and receipts) and room log entries.",
            "queue",
            [("direct", q.accepted), ("room", q.room_accepted)],
        )

    def _queues(self, queues: QueueService, m: Metrics) -> Iterator[Metric]:
        entries = 0
        size = 0
        for count, total in queues.state.totals.values():
            entries += count
            size += total
        depth = GaugeMetricFamily(
            "chatd_queue_entries", "Entries waiting in device queues, over all devices."
        )
        depth.add_metric([], entries)
        yield depth
        nbytes = GaugeMetricFamily(
            "chatd_queue_bytes", "Ciphertext bytes waiting in device queues, over all devices."
        )
        nbytes.add_metric([], size)
        yield nbytes
        oldest = GaugeMetricFamily(
            "chatd_queue_oldest_entry_age_seconds",
            "Age of the oldest stored queue entry (envelope or room log entry); 0 when "
            f"none waits (read at most every {OLDEST_CACHE_SECONDS:g} s).",
        )
        oldest.add_metric([], m.oldest_age_seconds)
        yield oldest

    def _retention(self, retention: Retention) -> Iterator[Metric]:
        last = GaugeMetricFamily(
            "chatd_retention_last_run_timestamp_seconds",
            "When each retention job last ran (unix time).",
            labels=["retention_job"],
        )
        rows = CounterMetricFamily(
            "chatd_retention_rows_purged",
            "Rows each retention job purged since start.",
            labels=["retention_job"],
        )
        freed = CounterMetricFamily(
            "chatd_retention_bytes_reclaimed",
            "Bytes each retention job gave back to the filesystem since start.",
            labels=["retention_job"],
        )
        failed = CounterMetricFamily(
            "chatd_retention_failures",
            "Retention job runs that failed since start.",
            labels=["retention_job"],
        )
        for name, totals in sorted(retention.totals.items()):
            report = retention.latest.get(name)
            if report is not None:
                last.add_metric([name], report.started_at / 1000)
            rows.add_metric([name], totals.rows_purged)
            freed.add_metric([name], totals.bytes_reclaimed)
            failed.add_metric([name], totals.failures)
        yield from (last, rows, freed, failed)
