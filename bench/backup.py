"""Online backup under live traffic: does a backup of a 1 GB database stall the relay?

Target (issue 13): the p99 send->deliver latency of live messages while a
backup of a 1 GB database runs stays within 2x of the same pair's p99
without a backup, measured in the same run.

Setup: ``chatd init`` in a fresh data dir under --dir (default: a temporary
dir under /var/tmp, on disk rather than tmpfs), two seeded accounts (alice,
bob), then --size-mb of filler rows written straight into the database with
chatd's own store code while the daemon is stopped: ``admin_audit`` rows
with 800-character paths (an admin table nothing reads at start, so start-up
does not change with the size). Then the real daemon starts (bench/_daemon.py).

Measurement: a live pair, alice -> bob, each with one device on the relay;
alice sends one message every --interval-ms, bob acks each delivery, and
each message's send->deliver time is recorded. First --seconds without a
backup (after a 2 s warm-up), then ``POST /v1/backups`` on the admin socket
and the same pair measured until the backup is done (polled through
``GET /v1/backups/{id}``). Printed: both p50/p99, the ratio of the p99s,
the backup's duration, size and MB/s, and the CPU the daemon used.

Usage: ``.venv/bin/python bench/backup.py [--size-mb 1024] [--seconds 20]
[--interval-ms 20] [--dir DIR] [--keep] [--cpu-hogs N] [--chunk-rows N]
[--nice N] [--pause-ms MS]``. A quick run: ``--size-mb 64 --seconds 5``.
``--cpu-hogs 2`` adds two busy-loop processes through both windows, as on a
2-core machine that something else keeps busy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import trio
import vodozemac
from trio_websocket import open_websocket_url

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _daemon import (  # noqa: E402 - after the path tweak
    RELAXED_AUTH,
    RELAXED_RELAY,
    Daemon,
    cpu_seconds,
    init_data_dir,
    ms,
    percentile,
    seed_users,
    set_settings,
)
from relay import PASSWORD, keys_upload, login, reply_to  # noqa: E402

WARMUP = 2.0  # seconds of the pair before latencies count
ROW_TEXT = 400  # random bytes per filler row, stored as 800 hex characters
ROWS_PER_COMMIT = 50_000


def fill(config: Path, size_mb: int) -> tuple[float, int]:
    """Grow the database to about ``size_mb`` MiB of admin_audit rows; (seconds, bytes)."""
    from chatd.config import load_config
    from chatd.keyfiles import load_db_key
    from chatd.store import now_ms
    from chatd.store.db import close_quietly, open_writer

    settings = load_config(config)
    started = time.monotonic()
    conn = open_writer(settings.database_path, load_db_key(settings), busy_timeout_ms=5_000)
    conn.execute("PRAGMA synchronous = OFF")  # setup only; what is measured runs as shipped
    try:
        target = size_mb * 1_048_576
        now = now_ms()
        while settings.database_path.stat().st_size < target:
            conn.execute("BEGIN")
            conn.execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
                " INSERT INTO admin_audit (at, method, path, status)"
                " SELECT ?, 'GET', '/v1/' || hex(randomblob(?)), 200 FROM n",
                (ROWS_PER_COMMIT, now, ROW_TEXT),
            )
            conn.execute("COMMIT")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        close_quietly(conn)
    return time.monotonic() - started, settings.database_path.stat().st_size


async def connect_device(url: str, username: str, stack: Any) -> tuple[Any, dict[str, Any]]:
    ws = await stack.enter_async_context(open_websocket_url(url, max_message_size=1 << 22))
    session = await login(ws, username, "bench")
    frame = keys_upload(session["user"]["id"], session["device_id"], vodozemac.Account())
    await ws.send_message(json.dumps(frame))
    await reply_to(ws, "keys")
    return ws, session


async def measure(
    url: str, socket_path: Path, token: str, seconds: float, interval: float
) -> dict[str, Any]:
    quiet: list[float] = []
    busy: list[float] = []
    job: dict[str, Any] = {}
    async with AsyncExitStack() as stack:
        alice, _ = await connect_device(url, "alice", stack)
        bob, bob_session = await connect_device(url, "bob", stack)
        bob_ref = {"user_id": bob_session["user"]["id"], "device_id": bob_session["device_id"]}
        admin = await stack.enter_async_context(
            httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=str(socket_path)),
                base_url="http://chatd",
                headers={"Authorization": f"Bearer {token}"},
                timeout=30,
            )
        )
        sent_at: dict[str, float] = {}
        sink: list[list[float] | None] = [None]  # where latencies go now (None: warm-up)

        async def bob_reads() -> None:
            while True:
                frame = json.loads(await bob.get_message())
                if frame.get("type") != "deliver":
                    continue
                now = time.perf_counter()
                for e in frame["envelopes"]:
                    started = sent_at.pop(e["message_id"], None)
                    if started is not None and sink[0] is not None:
                        sink[0].append(now - started)
                last = frame["envelopes"][-1]["envelope_id"]
                await bob.send_message(json.dumps({"type": "ack", "up_to": last}))

        async def alice_sends() -> None:
            n = 0
            next_at = trio.current_time()
            while True:
                message_id = str(uuid.uuid4())
                sent_at[message_id] = time.perf_counter()
                envelope = {**bob_ref, "ciphertext": "y" * 64}
                frame = {"type": "send", "id": f"a{n}", "message_id": message_id}
                await alice.send_message(json.dumps({**frame, "envelopes": [envelope]}))
                n += 1
                next_at += interval
                await trio.sleep_until(max(next_at, trio.current_time()))

        async def alice_drains() -> None:
            while True:
                await alice.get_message()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(bob_reads)
            nursery.start_soon(alice_drains)
            nursery.start_soon(alice_sends)
            await trio.sleep(WARMUP)
            sink[0] = quiet
            await trio.sleep(seconds)
            sink[0] = busy
            reply = await admin.post("/v1/backups")
            reply.raise_for_status()
            job = reply.json()
            while job["state"] == "running":
                await trio.sleep(0.5)
                job = (await admin.get(f"/v1/backups/{job['id']}")).json()
            sink[0] = None
            nursery.cancel_scope.cancel()
    return {"quiet": quiet, "busy": busy, "job": job}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=20.0, help="baseline window")
    parser.add_argument("--interval-ms", type=float, default=20.0, help="between live messages")
    parser.add_argument("--dir", type=Path, help="where the data dir goes (default /var/tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the data dir")
    parser.add_argument(
        "--cpu-hogs",
        type=int,
        default=0,
        help="busy-loop processes running through both windows (a machine with no spare CPU)",
    )
    parser.add_argument("--chunk-rows", type=int, help="backup.chunk_rows (default: chatd's)")
    parser.add_argument("--nice", type=int, help="backup.nice (default: chatd's)")
    parser.add_argument("--pause-ms", type=float, help="backup.pause_ms (default: chatd's)")
    args = parser.parse_args()
    backup_settings = {
        name: value
        for name, value in (
            ("chunk_rows", args.chunk_rows),
            ("nice", args.nice),
            ("pause_ms", args.pause_ms),
        )
        if value is not None
    }
    base = Path(tempfile.mkdtemp(prefix="chatd-bench-backup-", dir=args.dir or "/var/tmp"))  # noqa: S108 - mkdtemp: private
    try:
        config = init_data_dir(base / "data")
        set_settings(config, "auth", RELAXED_AUTH)
        set_settings(config, "relay", {**RELAXED_RELAY, "port": 0})
        set_settings(config, "attachments", {"port": 0})
        if backup_settings:
            set_settings(config, "backup", backup_settings)
        seed_users(config, ["alice", "bob"], PASSWORD)
        took, size = fill(config, args.size_mb)
        print(f"database: {size / 1_048_576:.0f} MiB of rows written in {took:.1f} s")
        daemon = Daemon(config, base)
        daemon.start()
        daemon.wait_ready()
        url, _ = daemon.relay_url()
        token = (base / "data" / "admin-token").read_text().strip()
        hogs = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(args.cpu_hogs)
        ]
        try:
            cpu_before = cpu_seconds(daemon.pid)
            started = time.monotonic()
            result = trio.run(
                measure,
                url,
                base / "data" / "admin.sock",
                token,
                args.seconds,
                args.interval_ms / 1000,
            )
            cpu = (cpu_seconds(daemon.pid) - cpu_before) / (time.monotonic() - started)
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()
        code, _ = daemon.stop()
        if code != 0:
            raise SystemExit(f"chatd exited with {code}:\n{daemon.log_tail()}")
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"kept {base}")
    job, quiet, busy = result["job"], result["quiet"], result["busy"]
    if job["state"] != "done":
        raise SystemExit(f"the backup ended {job['state']}: {job['error']}")
    seconds = (job["finished_at"] - job["started_at"]) / 1000
    print(
        f"backup: {job['bytes'] / 1_048_576:.0f} MiB in {seconds:.1f} s "
        f"({job['bytes'] / 1_048_576 / seconds:.0f} MiB/s), {job['progress']['rows_done']} rows"
    )
    for label, values in (("without backup", quiet), ("during backup ", busy)):
        print(
            f"live pair {label}: {len(values)} messages, p50 {ms(percentile(values, 50))}, "
            f"p99 {ms(percentile(values, 99))}, max {ms(max(values))}"
        )
    ratio = percentile(busy, 99) / percentile(quiet, 99)
    print(f"p99 during / without backup: {ratio:.2f}x (target <= 2x)")
    print(f"daemon CPU over the run: {cpu:.2f} cores; settings {backup_settings or 'default'}")
    if args.cpu_hogs:
        print(f"with {args.cpu_hogs} busy-loop process(es) through both windows")


if __name__ == "__main__":
    main()
