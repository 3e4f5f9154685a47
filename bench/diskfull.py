"""Disk full under load: refusals, no lost acknowledgement, and recovery time.

Starts the real daemon (``chatd init`` into a temp dir, ``chatd serve`` with
NOTIFY_SOCKET) with the relaxed limits of ``bench/_daemon.py`` and its stderr
on a pipe. Then --senders connections of alice send messages to bob's device
as fast as their answers come (one in flight each), and one connection of bob
receives and acknowledges (``ack`` with an ``id``) every ``deliver``.

Each of --cycles cycles runs --load seconds on a free disk, then makes the
disk "full" for --full seconds: a file-size limit on the daemon process
(RLIMIT_FSIZE through ``prlimit``), so that every write at an offset past
4 KiB fails (EFBIG; sqlite says SQLITE_FULL or SQLITE_IOERR), exactly as the
CI suite ``tests/test_diskfaults.py`` does. Then the limit is lifted. A sender
refused with ``storage_unavailable`` sends the same message_id again after
--retry seconds (not the ``retry_after`` of 5 s, to time the recovery
closely). The health route is polled every 10 ms from the moment the disk
fills until it answers 503, and from the moment space returns until it
answers 200.

At the end the disk stays free until bob has received every message some
sender got ``sent`` for (bounded by 60 s), then the daemon is stopped.

Prints, per cycle and in total: sends answered ``sent`` and refused, acks
answered ``ok`` and refused, other error frames and closed connections (both
must be 0), the time from the fault to health 503 and to the first refusal,
the recovery time (space back to the first ``sent``) and to health 200, the
``store.write_failed`` warnings (one per episode) and error-level log lines
(must be 0), and **acks lost**: messages answered ``sent`` that bob never
received (must be 0).

    .venv/bin/python bench/diskfull.py [--cycles 20] [--load 2] [--full 3] [--senders 8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, connect_websocket_url

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _daemon import (  # noqa: E402 - after the path tweak
    RELAXED_AUTH,
    RELAXED_RELAY,
    Daemon,
    create_users,
    init_data_dir,
    set_settings,
)
from relay import keys_upload  # noqa: E402

from chatd.store.db import open_reader  # noqa: E402

FAULT_OFFSET = 4096  # bytes: writes at or past this offset fail while the disk is "full"
PASSWORD = "a long enough bench password"  # noqa: S105 - a throwaway bench account


class PipedDaemon(Daemon):
    """The daemon with stderr on a pipe: a log file would fall under the limit."""

    def __init__(self, config: Path, work_dir: Path) -> None:
        super().__init__(config, work_dir)
        self.lines: list[str] = []

    def start(self) -> None:
        self._notify_path.unlink(missing_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.bind(str(self._notify_path))
        env = {**os.environ, "NOTIFY_SOCKET": str(self._notify_path)}
        self._spawned_at = time.perf_counter()
        self.proc = subprocess.Popen(  # noqa: S603 - our own chatd
            [sys.executable, "-m", "chatd", "serve", "--config", str(self.config)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        threading.Thread(target=self._read_log, daemon=True).start()

    def _read_log(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))


def fill_disk(pid: int) -> None:
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (FAULT_OFFSET, resource.RLIM_INFINITY))


def free_disk(pid: int) -> None:
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)


@dataclass
class Cycle:
    sent: int = 0
    refused: int = 0
    acked: int = 0
    ack_refused: int = 0
    health_503: float | None = None  # seconds from the fault to health 503
    first_refusal: float | None = None  # seconds from the fault to the first refusal
    recovered: float | None = None  # seconds from space back to the first sent
    health_200: float | None = None  # seconds from space back to health 200


@dataclass
class Run:
    cycles: list[Cycle] = field(default_factory=list)
    other_errors: list[dict[str, Any]] = field(default_factory=list)
    closed: int = 0
    acknowledged: set[str] = field(default_factory=set)  # answered sent
    received: set[str] = field(default_factory=set)  # delivered to bob
    full: bool = False
    fault_at: float = 0.0
    free_at: float = 0.0
    stopping: bool = False
    phone = ""  # the offline device's id

    @property
    def cycle(self) -> Cycle:
        return self.cycles[-1]


async def hello_and_login(
    nursery: trio.Nursery, url: str, username: str
) -> tuple[WebSocketConnection, dict[str, Any]]:
    ws = await connect_websocket_url(nursery, url)
    await ws.get_message()
    await ws.send_message(
        json.dumps(
            {
                "type": "login",
                "id": "login",
                "username": username,
                "password": PASSWORD,
                "device_name": "bench",
            }
        )
    )
    while True:
        frame = json.loads(await ws.get_message())
        if frame.get("id") == "login":
            if frame["type"] != "session":
                raise SystemExit(f"login of {username} failed: {frame}")
            return ws, frame


async def sender(
    run: Run, nursery: trio.Nursery, url: str, to: list[dict[str, Any]], retry: float
) -> None:
    ws, _ = await hello_and_login(nursery, url, "alice")
    n = 0
    message_id = str(uuid.uuid4())
    try:
        while not run.stopping:
            n += 1
            body = {
                "type": "send",
                "id": f"s{n}",
                "message_id": message_id,
                "envelopes": [{**device, "ciphertext": f"bench {message_id}"} for device in to],
            }
            await ws.send_message(json.dumps(body))
            while True:
                frame = json.loads(await ws.get_message())
                if frame.get("id") == f"s{n}":
                    break
            if frame["type"] == "sent":
                cycle = run.cycle
                cycle.sent += 1
                run.acknowledged.add(message_id)
                if not run.full and cycle.recovered is None and run.free_at:
                    cycle.recovered = time.perf_counter() - run.free_at
                message_id = str(uuid.uuid4())
            elif frame.get("code") == "storage_unavailable" and "retry_after" in frame:
                cycle = run.cycle
                cycle.refused += 1
                if run.full and cycle.first_refusal is None:
                    cycle.first_refusal = time.perf_counter() - run.fault_at
                await trio.sleep(retry)  # then the same message_id again
            else:
                run.other_errors.append(frame)
                message_id = str(uuid.uuid4())
    except ConnectionClosed:
        if not run.stopping:
            run.closed += 1
    finally:
        await ws.aclose()


async def receiver(run: Run, ws: WebSocketConnection) -> None:
    n = 0
    try:
        while True:
            frame = json.loads(await ws.get_message())
            if frame["type"] == "deliver":
                run.received.update(
                    e["message_id"] for e in frame["envelopes"] if e["kind"] == "message"
                )
                n += 1
                up_to = frame["envelopes"][-1]["envelope_id"]
                await ws.send_message(json.dumps({"type": "ack", "id": f"a{n}", "up_to": up_to}))
            elif frame["type"] == "ok":
                run.cycle.acked += 1
            elif frame.get("code") == "storage_unavailable":
                run.cycle.ack_refused += 1
            elif frame["type"] == "error":
                run.other_errors.append(frame)
    except ConnectionClosed:
        if not run.stopping:
            run.closed += 1


async def publish(ws: WebSocketConnection, device: dict[str, Any]) -> None:
    """Upload the device's keys (a device without them gets no messages)."""
    upload = keys_upload(device["user_id"], device["device_id"])
    await ws.send_message(json.dumps(upload))
    while json.loads(await ws.get_message()).get("id") != upload["id"]:
        pass


async def wait_health(admin: httpx.AsyncClient, status: int, since: float) -> float:
    with trio.fail_after(60):
        while (await admin.get("/v1/health")).status_code != status:
            await trio.sleep(0.01)
    return time.perf_counter() - since


async def bench(args: argparse.Namespace, daemon: PipedDaemon, data_dir: Path) -> Run:
    url, _ = daemon.relay_url()
    run = Run(cycles=[Cycle()])
    transport = httpx.AsyncHTTPTransport(uds=str(data_dir / "admin.sock"))
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://chatd", timeout=30) as admin,
        trio.open_nursery() as nursery,
    ):
        bob_ws, session = await hello_and_login(nursery, url, "bob")
        to = {"user_id": session["user"]["id"], "device_id": session["device_id"]}
        await publish(bob_ws, to)
        # Bob's phone is offline: every message must be stored for it.
        phone_ws, phone_session = await hello_and_login(nursery, url, "bob")
        phone = {"user_id": to["user_id"], "device_id": phone_session["device_id"]}
        await publish(phone_ws, phone)
        await phone_ws.aclose()
        run.phone = phone["device_id"]
        nursery.start_soon(receiver, run, bob_ws)
        for _ in range(args.senders):
            nursery.start_soon(sender, run, nursery, url, [to, phone], args.retry)
        for number in range(args.cycles):
            if number:
                run.cycles.append(Cycle())
            await trio.sleep(args.load)
            run.full = True
            run.fault_at = time.perf_counter()
            fill_disk(daemon.pid)
            run.cycle.health_503 = await wait_health(admin, 503, run.fault_at)
            await trio.sleep(max(0.0, args.full - (time.perf_counter() - run.fault_at)))
            run.free_at = time.perf_counter()
            free_disk(daemon.pid)
            run.full = False
            run.cycle.health_200 = await wait_health(admin, 200, run.free_at)
            cycle = run.cycle
            print(
                f"cycle {number + 1}: sent {cycle.sent}, refused {cycle.refused}, "
                f"acks ok {cycle.acked}, refused {cycle.ack_refused}; "
                f"health 503 after {_ms(cycle.health_503)}, first refusal after "
                f"{_ms(cycle.first_refusal)}; recovered after {_ms(cycle.recovered)}, "
                f"health 200 after {_ms(cycle.health_200)}",
                flush=True,
            )
        run.stopping = True
        with trio.move_on_after(60):
            while not run.acknowledged <= run.received:
                await trio.sleep(0.05)
        # Redeliveries after a refused ack come on a new connection: one more look.
        if not run.acknowledged <= run.received:
            await bob_ws.aclose()
            bob_ws, _ = await hello_and_login(nursery, url, "bob")
            nursery.start_soon(receiver, run, bob_ws)
            with trio.move_on_after(30):
                while not run.acknowledged <= run.received:
                    await trio.sleep(0.05)
        await bob_ws.aclose()
        nursery.cancel_scope.cancel()
    return run


def phone_queue(data_dir: Path, device_id: str) -> set[str]:
    """The message ids queued for the offline device, read with the key."""
    key = bytes.fromhex((data_dir / "db.key").read_text().strip())
    conn = open_reader(data_dir / "chatd.db", key, busy_timeout_ms=5000)
    try:
        rows = conn.execute(
            "SELECT message_id FROM envelopes WHERE recipient_device_id = ? AND kind = 'message'",
            (device_id,),
        )
        return {row[0] for row in rows}
    finally:
        conn.close()


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def _spread(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    return f"median {_ms(statistics.median(known))}, max {_ms(max(known))}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=20, help="fault cycles")
    parser.add_argument("--load", type=float, default=2.0, help="seconds of load per free phase")
    parser.add_argument("--full", type=float, default=3.0, help="seconds the disk stays full")
    parser.add_argument("--senders", type=int, default=8, help="sending connections")
    parser.add_argument("--retry", type=float, default=0.05, help="seconds before a resend")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="chatd-diskfull-") as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir(mode=0o700)
        config = init_data_dir(data_dir)
        set_settings(config, "auth", RELAXED_AUTH)
        set_settings(config, "relay", {"port": 0, **RELAXED_RELAY})
        set_settings(config, "attachments", {"port": 0})
        # The offline phone keeps every message of the run.
        set_settings(
            config, "devices", {"max_queued_envelopes": 10_000_000, "max_queued_bytes": 1 << 34}
        )
        daemon = PipedDaemon(config, Path(tmp))
        daemon.start()
        try:
            daemon.wait_ready()
            create_users(data_dir, ["alice", "bob"], PASSWORD)
            started = time.perf_counter()
            run = trio.run(bench, args, daemon, data_dir)
            elapsed = time.perf_counter() - started
            free_disk(daemon.pid)
            code, _ = daemon.stop()
            stored = phone_queue(data_dir, run.phone)
        finally:
            daemon.kill()
    lines = daemon.lines
    lost = run.acknowledged - run.received
    unstored = run.acknowledged - stored
    total = Cycle(
        sent=sum(c.sent for c in run.cycles),
        refused=sum(c.refused for c in run.cycles),
        acked=sum(c.acked for c in run.cycles),
        ack_refused=sum(c.ack_refused for c in run.cycles),
    )
    print(
        f"\n{len(run.cycles)} cycles of {args.load:g} s free + {args.full:g} s full, "
        f"{args.senders} senders, {elapsed:.0f} s in all"
    )
    print(f"sends answered sent: {total.sent}; refused storage_unavailable: {total.refused}")
    print(f"acks answered ok: {total.acked}; refused storage_unavailable: {total.ack_refused}")
    print(f"other error frames: {len(run.other_errors)}; connections closed: {run.closed}")
    print(f"fault to health 503: {_spread([c.health_503 for c in run.cycles])}")
    print(f"fault to first refusal: {_spread([c.first_refusal for c in run.cycles])}")
    print(f"space back to first sent: {_spread([c.recovered for c in run.cycles])}")
    print(f"space back to health 200: {_spread([c.health_200 for c in run.cycles])}")
    print(
        f"log: store.write_failed {sum('msg=store.write_failed' in x for x in lines)}, "
        f"store.write_recovered {sum('msg=store.write_recovered' in x for x in lines)}, "
        f"error-level lines {sum('level=error' in x for x in lines)}"
    )
    print(f"acks lost (sent, never received): {len(lost)} of {len(run.acknowledged)}")
    print(f"sent but not stored for the offline device: {len(unstored)}")
    print(f"daemon exit code after SIGTERM: {code}")
    if run.other_errors:
        print("first other error:", run.other_errors[0])
    failed = lost or unstored or run.other_errors or run.closed or code != 0
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
