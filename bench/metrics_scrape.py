"""What a Prometheus scrape costs chatd at the design size, and what the writer pays.

Fills a fresh SQLCipher database (random key, temp dir) with the design size:
1,000 users, 10,000 devices with published identity keys and --keys one-time
keys each (a quarter of the devices below devices.one_time_key_threshold),
and --envelopes queued envelopes. Then times, each the median of several runs:

* the oldest-entry read (two primary-key lookups; cached 5 s in chatd),
* the devices-low-on-keys count (a scan of the keys; cached 60 s in chatd),
* rendering the text (``Metrics.render``) with 10,000 devices in the
  in-memory queue totals and 10,000 open connections in the registry's
  index (stand-ins for the services' counters: the collector only reads them),
* ``Buckets.observe``, twice per writer transaction on the writer thread.

    .venv/bin/python bench/metrics_scrape.py [--keys 50] [--envelopes 100000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import timeit
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import trio

from chatd.config import StoreSettings
from chatd.metrics import _LOW_KEYS_SQL, _OLDEST_SQL, Metrics
from chatd.store import serve_store
from chatd.store.store import BATCH_SIZE_BUCKETS, Buckets, StoreStats, now_ms

USERS = 1_000
DEVICES = 10_000
THRESHOLD = 20  # devices.one_time_key_threshold's default


def fill(conn: Any, keys: int, envelopes: int) -> None:
    now = now_ms()
    conn.executemany(
        "INSERT INTO users (id, username, username_key, role, password_hash,"
        " password_changed_at, created_at) VALUES (?, ?, ?, 'user', 'x', ?, ?)",
        [(u, f"user{u}", f"user{u}", now, now) for u in range(1, USERS + 1)],
    )
    conn.executemany(
        "INSERT INTO devices (id, user_id, name, ed25519, curve25519, signature,"
        " created_at, last_seen_at) VALUES (?, ?, 'bench', 'e', 'c', 's', ?, ?)",
        [(f"D{d:012d}", d % USERS + 1, now, now) for d in range(DEVICES)],
    )
    conn.executemany(
        "INSERT INTO one_time_keys (device_id, key_id, curve25519, signature, uploaded_at)"
        " VALUES (?, ?, 'c', 's', ?)",
        (
            (f"D{d:012d}", f"k{k}", now)
            for d in range(DEVICES)
            for k in range(keys if d % 4 else THRESHOLD // 2)  # every 4th device is low
        ),
    )
    conn.executemany(
        "INSERT INTO envelopes (recipient_device_id, kind, message_id, ciphertext, sent_at,"
        " expires_at) VALUES (?, 'message', ?, ?, ?, ?)",
        (
            (f"D{n % DEVICES:012d}", f"m{n}", b"x" * 200, now - n, now + 86_400_000)
            for n in range(envelopes)
        ),
    )


def median_ms(fn: Any, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def stand_in_metrics(store: Any) -> Metrics:
    """A Metrics whose sources hold design-size counters (the collector reads only these)."""
    registry = SimpleNamespace(
        connections=set(range(DEVICES)),
        by_session={s: [s] for s in range(DEVICES)},
        by_device={d: None for d in range(DEVICES)},
        stats=SimpleNamespace(sends=1, room_sends=1, acks=1, delivered=1),
    )
    queues = SimpleNamespace(
        state=SimpleNamespace(totals={f"D{d}": [10, 2_000] for d in range(DEVICES)}),
        stats=SimpleNamespace(accepted=1, room_accepted=1),
    )
    sources = SimpleNamespace(
        store=store,
        registry=registry,
        auth=SimpleNamespace(login_failures=Counter(bad_password=3), rate_limited=Counter()),
        queues=queues,
        retention=SimpleNamespace(totals={}, latest={}),
        relay_limits=SimpleNamespace(refused=Counter(send=2)),
        low_key_threshold=THRESHOLD,
    )
    return Metrics(sources)  # type: ignore[arg-type]  # stand-ins with the same attributes


async def main(keys: int, envelopes: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with trio.open_nursery() as nursery:
            store = await nursery.start(
                serve_store, Path(tmp) / "bench.db", os.urandom(32), StoreSettings()
            )
            start = time.perf_counter()
            await store.write(lambda conn: fill(conn, keys, envelopes))
            print(
                f"filled {USERS} users, {DEVICES} devices, {keys} one-time keys each "
                f"(every 4th: {THRESHOLD // 2}), {envelopes} envelopes "
                f"in {time.perf_counter() - start:.1f} s"
            )

            def oldest(conn: Any) -> float:
                return median_ms(lambda: conn.execute(_OLDEST_SQL).fetchone(), 200)

            def low(conn: Any) -> tuple[float, int]:
                count = int(conn.execute(_LOW_KEYS_SQL, (THRESHOLD,)).fetchone()[0])
                return median_ms(
                    lambda: conn.execute(_LOW_KEYS_SQL, (THRESHOLD,)).fetchone(), 5
                ), count

            print(f"oldest queue entry read:    {await store.read(oldest):8.3f} ms (median of 200)")
            low_ms, low_count = await store.read(low)
            assert low_count == DEVICES // 4, low_count
            print(f"devices low on keys count:  {low_ms:8.3f} ms (median of 5; {low_count} low)")
            metrics = stand_in_metrics(store)
            await metrics.refresh()
            render_ms = median_ms(metrics.render, 20)
            size = len(metrics.render())
            print(f"render (10k devices/conns): {render_ms:8.3f} ms (median of 20; {size} bytes)")
            nursery.cancel_scope.cancel()
    stats = StoreStats()
    buckets = Buckets(BATCH_SIZE_BUCKETS)
    per_call = min(timeit.repeat(lambda: buckets.observe(17), number=100_000, repeat=5)) / 100_000
    print(
        f"Buckets.observe:            {per_call * 1e6:8.3f} us per call, "
        f"2 per writer transaction ({len(stats.commit_seconds.counts)} commit buckets)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=50, help="one-time keys per device")
    parser.add_argument("--envelopes", type=int, default=100_000, help="queued envelopes")
    args = parser.parse_args()
    trio.run(main, args.keys, args.envelopes)
