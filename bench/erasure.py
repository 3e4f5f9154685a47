"""How long the erasure purge holds the store's writer for a heavy account.

The writer is shared by the whole server: every other write waits behind a
purge's transactions. The purge deletes the bulk of an account (its devices'
queues, its auth audit rows) in writes of at most retention.batch_size (500)
rows, then everything else in ONE transaction with the receipt. The script
opens a fresh SQLCipher database in a temp dir, makes one account with
--devices devices (default 2), fills each device's queue with --queued
envelopes (default 10,000, the default devices.max_queued_envelopes), gives
the account --auth-events auth audit rows (default 10,000) and --sent
envelopes it sent to another user's device (default 5,000), then runs the
purge's writes (``Erasure.delete_bulk`` and ``Erasure._purge_rows``, what the
erasure retention job runs, without the room, queue, push and file services
around them) and prints rows deleted, the number of writes, and the longest
time one of them held the writer.

    .venv/bin/python bench/erasure.py [--devices 2] [--queued 10000] [--auth-events 10000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from chatd.config import PrivacySettings, StoreSettings
from chatd.privacy.erasure import Erasure
from chatd.privacy.receipts import ReceiptSigner
from chatd.store import serve_store


def _fill(args: argparse.Namespace, conn: Any) -> None:
    for user_id, name in ((1, "erin"), (2, "other")):
        conn.execute(
            "INSERT INTO users (id, username, username_key, role, password_hash,"
            " password_changed_at, created_at) VALUES (?, ?, ?, 'user', 'h', 0, 0)",
            (user_id, name, name),
        )
    conn.execute(
        "INSERT INTO devices (id, user_id, name, created_at, last_seen_at)"
        " VALUES ('OTHERDEVICE', 2, 'phone', 0, 0)"
    )
    for d in range(args.devices):
        device = f"ERINDEVICE{d:03d}"
        conn.execute(
            "INSERT INTO devices (id, user_id, name, created_at, last_seen_at)"
            " VALUES (?, 1, 'phone', 0, 0)",
            (device,),
        )
        conn.executemany(
            "INSERT INTO envelopes (recipient_device_id, kind, message_id, sender_user_id,"
            " sender_device_id, ciphertext, sent_at, expires_at)"
            " VALUES (?, 'message', ?, 2, 'OTHERDEVICE', ?, 0, 1)",
            ((device, f"m{d}-{i}", b"c" * 600) for i in range(args.queued)),
        )
    conn.executemany(
        "INSERT INTO envelopes (recipient_device_id, kind, message_id, sender_user_id,"
        " sender_device_id, ciphertext, sent_at, expires_at)"
        " VALUES ('OTHERDEVICE', 'message', ?, 1, 'ERINDEVICE000', ?, 0, 1)",
        ((f"s{i}", b"c" * 600) for i in range(args.sent)),
    )
    conn.executemany(
        "INSERT INTO auth_audit (at, event, outcome, user_id, ip)"
        " VALUES (?, 'login', 'ok', 1, '-')",
        ((i,) for i in range(args.auth_events)),
    )


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with trio.open_nursery() as nursery:
            store = await nursery.start(
                serve_store, Path(tmp) / "x.db", os.urandom(32), StoreSettings()
            )
            await store.write(lambda conn: _fill(args, conn))
            erasure = Erasure.__new__(Erasure)  # only the row purge: no services around it
            erasure.signer = ReceiptSigner(os.urandom(32))
            erasure.settings = PrivacySettings()
            timing: list[float] = []
            submit = store.submit

            async def timed(fn: Any, on_commit: Any = None) -> Any:
                def run(conn: Any) -> Any:
                    started = time.perf_counter()
                    try:
                        return fn(conn)
                    finally:
                        timing.append(time.perf_counter() - started)

                return await submit(run, on_commit)

            store.submit = timed  # type: ignore[method-assign]
            erasure.store = store
            erasure.rooms = erasure.queues = erasure.push = erasure.blobs = None
            began = time.perf_counter()
            purged = await _purge(erasure, store)
            total = time.perf_counter() - began
            nursery.cancel_scope.cancel()
    print(
        f"{purged.rows:,} rows deleted or anonymised in {total:.2f} s, {len(timing)} writes;"
        f" the longest held the writer {max(timing) * 1000:.0f} ms"
        f" (the final transaction {timing[-1] * 1000:.0f} ms)"
    )


async def _purge(erasure: Erasure, store: Any) -> Any:
    """erase_now without the services around it (rooms, queues, push, files)."""
    now = 2**62  # the account below is due
    await store.write(lambda conn: conn.execute("UPDATE users SET erase_after = 0 WHERE id = 1"))
    bulk = await erasure.delete_bulk(1, batch=500, now=now)
    return await store.write(lambda conn: erasure._purge_rows(conn, 1, now, bulk))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--queued", type=int, default=10_000)
    parser.add_argument("--auth-events", type=int, default=10_000)
    parser.add_argument("--sent", type=int, default=5_000)
    trio.run(main, parser.parse_args())
