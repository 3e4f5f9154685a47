"""The account export of a user with a deep queue: time, and memory that
does not grow with the queue.

For each depth (default 10,000, 50,000 and 200,000 envelopes) the script
opens a fresh SQLCipher database in a temp dir (random key, schema migrated
by ``serve_store``), makes one user with one device, fills the device's
queue to that depth in one write (600-byte ciphertexts), and then streams
the user's export with :func:`chatd.privacy.export.stream_export`, the code
behind ``GET /v1/users/{id}/export``, dropping each piece as it comes.
``tracemalloc`` tracks the Python heap during the export only (it slows
Python down; ``--no-heap`` times without it, and prints a peak of 0).

Prints, per depth: seconds, rows/s, ZIP bytes, the largest piece, and the
peak heap above the start of the export. The export streams if the peak
stays flat while the depth grows twentyfold.

    .venv/bin/python bench/export.py [--depths 10000 50000 200000] [--no-heap]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import trio

from chatd.config import StoreSettings
from chatd.privacy.export import stream_export
from chatd.store import serve_store

DEVICE = "EXPORTDEVICE1"


def _fill(depth: int, conn: Any) -> None:
    conn.execute(
        "INSERT INTO users (id, username, username_key, role, password_hash,"
        " password_changed_at, created_at) VALUES (1, 'dora', 'dora', 'user', 'h', 0, 0)"
    )
    conn.execute(
        "INSERT INTO devices (id, user_id, name, created_at, last_seen_at)"
        " VALUES (?, 1, 'phone', 0, 0)",
        (DEVICE,),
    )
    conn.executemany(
        "INSERT INTO envelopes (recipient_device_id, kind, message_id, sender_user_id,"
        " sender_device_id, ciphertext, sent_at, expires_at)"
        " VALUES (?, 'message', ?, 2, 'SENDERDEVICE1', ?, ?, ?)",
        ((DEVICE, f"m-{i:09d}", b"c" * 600, i, i + 1) for i in range(depth)),
    )


async def _one(depth: int, directory: Path, heap: bool) -> None:
    async with trio.open_nursery() as nursery:
        store = await nursery.start(
            serve_store, directory / "x.db", os.urandom(32), StoreSettings()
        )
        await store.write(lambda conn: _fill(depth, conn))
        if heap:
            tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        started = time.perf_counter()
        total = largest = 0
        async for piece in await stream_export(store, 1, server="bench"):
            total += len(piece)
            largest = max(largest, len(piece))
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        nursery.cancel_scope.cancel()
    print(
        f"{depth:>9,} envelopes  {elapsed:6.2f} s  {depth / elapsed:>9,.0f} rows/s"
        f"  zip {total / 1e6:7.2f} MB  largest piece {largest / 1e3:6.1f} kB"
        f"  peak heap +{peak / 1e6:5.2f} MB"
    )


async def main(depths: list[int], heap: bool) -> None:
    for depth in depths:
        with tempfile.TemporaryDirectory() as tmp:
            await _one(depth, Path(tmp), heap)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    parser.add_argument(
        "--no-heap", action="store_true", help="time without tracemalloc (it slows Python)"
    )
    args = parser.parse_args()
    trio.run(main, args.depths, not args.no_heap)
