"""Cost of a send to a device whose queue is already deep (an offline device).

A send checks the recipient queue's caps (``devices.max_queued_envelopes``
and ``max_queued_bytes``) in the store's writer thread. If that check reads
the queue, every message to someone away for a while costs more than the
last, and the writer (one thread for the whole server) slows for everyone.

For each depth (default 0, 2,000, 10,000 and 50,000 envelopes), the script
opens a fresh SQLCipher database in a temp dir (random 32-byte key, schema
migrated by ``serve_store``), makes two users with one device each (Alice
sends, Bob is offline), and fills Bob's queue to that depth in one write
(600-byte ciphertexts, through the envelopes table, as sends would leave
them). ``devices.max_queued_envelopes`` is raised to 1,000,000 so the caps
never refuse. Then --sends (default 2,000) sends from Alice to Bob go through
``QueueService.begin_send``, all submitted back to back so they share
commits like a busy server's, and the script waits for every one to be
durably queued. It times that, and separately the writer thread's time in the
send jobs themselves (the store's ``submit`` is wrapped to time each job).

Prints, per depth: sends/s, the mean writer time per send job, and both as a
ratio to depth 0 measured in the same run. At the end it checks that Bob's
queue holds exactly depth + sends envelopes.

    .venv/bin/python bench/deep_queue.py [--sends 2000] [--depths 0 2000 10000 50000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import trio

from chatd.config import DeviceSettings, StoreSettings
from chatd.e2ee.queues import QueueService
from chatd.protocol import frames as f
from chatd.store import Store, serve_store
from chatd.store.store import now_ms

CIPHERTEXT = "c" * 600
ALICE, BOB = "ALICEDEVICE01", "BOBDEVICE0001"


def _team(conn: Any) -> None:
    now = now_ms()
    for user_id, name, device in ((1, "alice", ALICE), (2, "bob", BOB)):
        conn.execute(
            "INSERT INTO users (id, username, username_key, role, password_hash,"
            " password_changed_at, created_at) VALUES (?, ?, ?, 'user', 'x', ?, ?)",
            (user_id, name, name, now, now),
        )
        conn.execute(
            "INSERT INTO devices (id, user_id, name, ed25519, curve25519,"
            " signature, created_at, last_seen_at) VALUES (?, ?, 'd', 'e', 'c', 's', ?, ?)",
            (device, user_id, now, now),
        )


def _fill(depth: int) -> Any:
    def fill(conn: Any) -> None:
        now = now_ms()
        conn.executemany(
            "INSERT INTO envelopes (recipient_device_id, kind, message_id, sender_user_id,"
            " sender_device_id, ciphertext, sent_at, expires_at)"
            " VALUES (?, 'message', ?, 1, ?, ?, ?, ?)",
            (
                (BOB, str(uuid.uuid4()), ALICE, CIPHERTEXT.encode(), now, now + 86_400_000)
                for _ in range(depth)
            ),
        )

    return fill


async def measure(depth: int, sends: int) -> tuple[float, float]:
    """(sends per second, mean writer seconds per send job) at this depth."""
    job_seconds: list[float] = []
    with tempfile.TemporaryDirectory(prefix="chatd-bench-") as tmp:
        async with trio.open_nursery() as nursery:
            store: Store = await nursery.start(
                serve_store, Path(tmp) / "chatd.db", os.urandom(32), StoreSettings()
            )
            await store.write(_team)
            await store.write(_fill(depth))
            queues = QueueService(store, DeviceSettings(max_queued_envelopes=1_000_000))
            submit = store.submit

            async def timed_submit(fn: Any, *args: Any) -> Any:
                def timed(conn: Any) -> Any:
                    started = time.perf_counter()
                    try:
                        return fn(conn)
                    finally:
                        job_seconds.append(time.perf_counter() - started)

                return await submit(timed, *args)

            store.submit = timed_submit  # type: ignore[method-assign]
            frames = [
                f.Send(
                    id=f"s{n}",
                    message_id=str(uuid.uuid4()),
                    envelopes=[f.OutgoingEnvelope(user_id=2, device_id=BOB, ciphertext=CIPHERTEXT)],
                )
                for n in range(sends)
            ]
            started = time.perf_counter()
            finishes = [await queues.begin_send(1, ALICE, frame) for frame in frames]
            for finish in finishes:
                result = await finish()
                if not isinstance(result, f.Sent):
                    raise SystemExit(f"a send was refused at depth {depth}: {result!r}")
            elapsed = time.perf_counter() - started
            queued = await store.read(
                lambda conn: conn.execute(
                    "SELECT count(*) FROM envelopes WHERE recipient_device_id = ?", (BOB,)
                ).fetchone()[0]
            )
            if queued != depth + sends:
                raise SystemExit(f"Bob's queue holds {queued}, expected {depth + sends}")
            nursery.cancel_scope.cancel()
    return sends / elapsed, sum(job_seconds) / len(job_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sends", type=int, default=2_000)
    parser.add_argument("--depths", type=int, nargs="+", default=[0, 2_000, 10_000, 50_000])
    args = parser.parse_args()
    print(f"deep queue: {args.sends} sends of 600-byte ciphertexts to one offline device")
    base: tuple[float, float] | None = None
    for depth in args.depths:
        rate, job = trio.run(measure, depth, args.sends)
        base = base or (rate, job)
        print(
            f"depth {depth:>7,}: {rate:8,.0f} sends/s ({rate / base[0]:.2f}x depth "
            f"{args.depths[0]}), writer {job * 1000:.3f} ms per send job "
            f"({job / base[1]:.2f}x)"
        )


if __name__ == "__main__":
    main()
