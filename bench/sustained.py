"""Sustained load: many connections each sending one message a second, for a while.

One real ``chatd serve`` (``chatd init`` into a temp dir, started with
NOTIFY_SOCKET as systemd would; the helpers of ``bench/_daemon.py``; port 0,
no MFA, the per-account rates of ``RELAXED_RELAY`` so that no limit meant
for people throttles the load). --connections users (default 1,000) are
seeded with the daemon stopped; each logs in once (one Argon2id
verification, SETUP_CONCURRENCY at a time) as its own device and publishes
signed keys of a vodozemac account. The load clients are raw protocol
clients, all in this one process under Trio (a full ``chatd.client`` each
would be far heavier than the server).

Then for --seconds (default 60) every connection sends one ``send`` a second
to the next connection's device (connection i to i + 1, the last to the
first), at its own offset within the second so that the sends are spread
evenly, and acknowledges each ``deliver`` (``ack up_to`` its last envelope,
without ``id``). The first --warmup seconds (default 10) are not measured.

Printed:

* **errors**: ``error`` and ``device_mismatch`` answers, connections that
  closed, and messages answered ``sent`` that had not reached their device
  by the end (must all be 0);
* **send → deliver** p50 / p99 / max: from writing the ``send`` to reading
  its ``deliver`` on the recipient's connection, over the measured period
  (target p99 < 100 ms), and send → ``sent``;
* **the daemon's RSS**, sampled every second (VmRSS of /proc/PID/status),
  the samples, and the least-squares slope after the warm-up in MiB per
  minute (flat: near 0);
* **CPU**: the daemon's CPU seconds per message and in all (utime + stime of
  all its threads, /proc/PID/stat), this load process's, and the whole
  machine's, since the machine is shared: the load clients in Python take
  about as much CPU as the server, so read the server's share first.

    .venv/bin/python bench/sustained.py                      # 1,000 x 60 s
    .venv/bin/python bench/sustained.py --connections 100 --seconds 5 --warmup 1
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

_BENCH = str(Path(__file__).resolve().parent)
if _BENCH not in sys.path:  # imported by the test suite: last, so it shadows nothing
    sys.path.append(_BENCH)
from _daemon import (  # noqa: E402 - the bench directory is not a package
    RELAXED_ADDRESSES,
    RELAXED_AUTH,
    RELAXED_RELAY,
    Daemon,
    cpu_seconds,
    init_data_dir,
    machine_busy_seconds,
    percentile,
    raise_nofile,
    seed_users,
    set_settings,
    vm_rss_kib,
)
from _memtrace import FRAMES, top_growth  # noqa: E402
from relay import PASSWORD, keys_upload, log_findings, login, reply_to  # noqa: E402

SETUP_CONCURRENCY: Final = 8  # connections logging in at once
CONNECT_TIMEOUT: Final = 120.0  # seconds for one connection's connect, login and keys
DRAIN_TIMEOUT: Final = 10.0  # seconds after the load for the last deliveries
BODY_BYTES: Final = 96  # random bytes in each ciphertext (128 base64 characters)
SAMPLE_EVERY: Final = 1.0  # seconds between RSS samples
WINDOW: Final = 10.0  # seconds: p99 and RSS change are also reported per window
KEPT_UP: Final = 0.100  # seconds: a window whose p99 is under this had no backlog
MARK_EVERY: Final = 10.0  # seconds between memory marks with --memtrace-frames 0
LAG_TICK: Final = 0.01  # seconds the loop-lag watcher sleeps each time

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


@dataclass(eq=False)
class Conn:
    index: int
    ws: WebSocketConnection
    user_id: int
    device_id: str


@dataclass
class Sample:
    at: float  # seconds since the load started
    rss_kib: int
    anon_kib: int = 0  # RssAnon: heap, Python's arenas, thread stacks
    file_kib: int = 0  # RssFile: mapped files (code, the database's mmap if any)


def rss_parts(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and RssShmem of /proc/PID/status, in KiB."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                found[key] = int(value.split()[0])
    return found


def smaps_rollup(pid: int) -> dict[str, int]:
    """The KiB figures of /proc/PID/smaps_rollup (Rss, Pss_Anon, Private_Dirty, ...)."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            key, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                found[key] = int(parts[0])
    return found


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, KiB) points, in MiB per minute."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var / 1024 * 60 if var else 0.0


@dataclass
class Result:
    connections: int
    seconds: float
    warmup: float
    messages: int = 0  # sends written in the measured period
    answered: int = 0
    errors: list[str] = field(default_factory=list)
    deliver_latency: list[float] = field(default_factory=list)
    #: (seconds into the load the send was written, send -> deliver seconds)
    deliver_by_second: list[tuple[float, float]] = field(default_factory=list)
    sent_latency: list[float] = field(default_factory=list)
    client_lag: list[float] = field(default_factory=list)  # the load process's loop lag
    samples: list[Sample] = field(default_factory=list)
    server_cpu: float = 0.0  # seconds over the measured period
    client_cpu: float = 0.0
    machine_cpu: float = 0.0
    measured_seconds: float = 0.0
    setup_seconds: float = 0.0
    exit_code: int | None = None
    log_findings: list[str] = field(default_factory=list)
    #: smaps_rollup at the end of the warm-up and at the end of the load
    rollups: list[dict[str, int]] = field(default_factory=list)
    memtrace: list[str] = field(default_factory=list)  # with --memtrace: its findings

    def after_warmup(self) -> list[Sample]:
        return [s for s in self.samples if s.at >= self.warmup]

    def rss_slope_mib_per_minute(self) -> float:
        """Least-squares slope of the RSS samples after the warm-up."""
        return slope_per_minute([(p.at, p.rss_kib) for p in self.after_warmup()])

    def rss_growth_kib(self) -> int:
        """RSS at the last sample minus RSS at the first sample after the warm-up."""
        points = self.after_warmup()
        return points[-1].rss_kib - points[0].rss_kib if points else 0


@dataclass
class Load:
    url: str
    result: Result
    conns: list[Conn] = field(default_factory=list)
    partner: dict[int, Conn] = field(default_factory=dict)  # connection index -> recipient
    slots: trio.Semaphore = field(default_factory=lambda: trio.Semaphore(SETUP_CONCURRENCY))
    go: trio.Event = field(default_factory=trio.Event)
    stop: trio.Event = field(default_factory=trio.Event)
    started_at: float = 0.0  # trio time the load began
    send_at: dict[str, float] = field(default_factory=dict)  # message id -> send written
    delivered: set[str] = field(default_factory=set)
    answered: set[str] = field(default_factory=set)
    ready: int = 0
    all_ready: trio.Event = field(default_factory=trio.Event)

    def measured(self, at: float) -> bool:
        return at - self.started_at >= self.result.warmup

    async def connection(self, index: int) -> None:
        try:
            async with open_websocket_url(
                self.url, connect_timeout=CONNECT_TIMEOUT, disconnect_timeout=5.0
            ) as ws:
                async with self.slots:
                    with trio.fail_after(CONNECT_TIMEOUT):
                        session = await login(ws, f"s{index:04d}", f"load {index}")
                        conn = Conn(index, ws, int(session["user"]["id"]), session["device_id"])
                        await ws.send_message(
                            _encode(keys_upload(conn.user_id, conn.device_id)).decode()
                        )
                        count = await reply_to(ws, "keys")
                        if count.get("type") != "key_count":
                            raise RuntimeError(f"keys_upload refused: {count!r}")
                self.conns.append(conn)
                self.ready += 1
                if self.ready == self.result.connections:
                    self.all_ready.set()
                await self.go.wait()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.reader, conn)
                    await self.sender(conn)
                    await self.stop.wait()
                    nursery.cancel_scope.cancel()
        except Exception as exc:  # one failed connection is an error, not a crash
            self.result.errors.append(f"connection {index}: {type(exc).__name__}: {exc}")
            self.all_ready.set()

    async def sender(self, conn: Conn) -> None:
        partner = self.partner[conn.index]
        n = self.result.connections
        offset = conn.index / n  # spread the sends evenly over each second
        end = self.started_at + self.result.seconds
        tick = 0
        while True:
            at = self.started_at + tick + offset
            if at >= end:
                return
            await trio.sleep_until(at)
            tick += 1
            message_id = str(uuid.uuid4())
            body = base64.b64encode(os.urandom(BODY_BYTES)).decode()
            frame: dict[str, Any] = {
                "type": "send",
                "id": message_id,
                "message_id": message_id,
                "envelopes": [
                    {"user_id": partner.user_id, "device_id": partner.device_id, "ciphertext": body}
                ],
            }
            now = trio.current_time()
            self.send_at[message_id] = now
            if self.measured(now):
                self.result.messages += 1
            await conn.ws.send_message(_encode(frame).decode())

    async def reader(self, conn: Conn) -> None:
        while True:
            try:
                raw = await conn.ws.get_message()
            except ConnectionClosed as exc:
                if not self.stop.is_set():
                    self.result.errors.append(f"connection {conn.index} closed: {exc.reason}")
                return
            now = trio.current_time()
            frame = _decode(raw)
            kind = frame.get("type")
            if kind == "deliver":
                for env in frame["envelopes"]:
                    if env["kind"] != "message":
                        continue  # delivered receipts
                    message_id = env["message_id"]
                    sent = self.send_at.get(message_id)
                    if sent is None or message_id in self.delivered:
                        continue
                    self.delivered.add(message_id)
                    if self.measured(sent):
                        self.result.deliver_latency.append(now - sent)
                        self.result.deliver_by_second.append((sent - self.started_at, now - sent))
                ack = {"type": "ack", "up_to": frame["envelopes"][-1]["envelope_id"]}
                await conn.ws.send_message(_encode(ack).decode())
            elif kind == "sent":
                message_id = frame["message_id"]
                self.answered.add(message_id)
                sent = self.send_at.get(message_id)
                if sent is not None and self.measured(sent):
                    self.result.sent_latency.append(now - sent)
            elif kind in ("error", "device_mismatch"):
                self.result.errors.append(f"connection {conn.index}: {raw[:300]!r}")


async def sample_rss(load: Load, pid: int) -> None:
    while not load.stop.is_set():
        parts = rss_parts(pid)
        at = trio.current_time() - load.started_at
        load.result.samples.append(
            Sample(at, vm_rss_kib(pid), parts.get("RssAnon", 0), parts.get("RssFile", 0))
        )
        with trio.move_on_after(SAMPLE_EVERY):
            await load.stop.wait()


async def watch_lag(load: Load) -> None:
    """This process's own event-loop lag: how late a 10 ms sleep wakes up. A late
    load client reads deliveries late, which would look like server latency."""
    while not load.stop.is_set():
        before = trio.current_time()
        await trio.sleep(LAG_TICK)
        if load.measured(before):
            load.result.client_lag.append(trio.current_time() - before - LAG_TICK)


async def drive(load: Load, pid: int, mark: Callable[[], None] | None = None) -> None:
    """Log every connection in, run the load, wait for the last deliveries.
    ``mark`` (with --memtrace) is called at the start of the load, at the end
    of the warm-up and at the end of the load."""
    result = load.result
    setup_started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for i in range(result.connections):
            nursery.start_soon(load.connection, i)
        with trio.fail_after(CONNECT_TIMEOUT * result.connections / SETUP_CONCURRENCY + 60):
            await load.all_ready.wait()
        result.setup_seconds = time.monotonic() - setup_started
        if result.errors:
            load.stop.set()
            load.go.set()
            return
        by_index = sorted(load.conns, key=lambda c: c.index)
        for i, conn in enumerate(by_index):
            load.partner[conn.index] = by_index[(i + 1) % len(by_index)]
        load.started_at = trio.current_time()
        nursery.start_soon(sample_rss, load, pid)
        nursery.start_soon(watch_lag, load)
        load.go.set()
        if mark is not None:
            mark()
        await trio.sleep_until(load.started_at + result.warmup)
        result.rollups.append(smaps_rollup(pid))
        if mark is not None:
            mark()
        cpu0 = (
            cpu_seconds(pid),
            cpu_seconds(os.getpid()),
            machine_busy_seconds(),
            time.monotonic(),
        )
        await trio.sleep_until(load.started_at + result.seconds)
        cpu1 = (
            cpu_seconds(pid),
            cpu_seconds(os.getpid()),
            machine_busy_seconds(),
            time.monotonic(),
        )
        result.rollups.append(smaps_rollup(pid))
        if mark is not None:
            mark()
        result.server_cpu = cpu1[0] - cpu0[0]
        result.client_cpu = cpu1[1] - cpu0[1]
        result.machine_cpu = cpu1[2] - cpu0[2]
        result.measured_seconds = cpu1[3] - cpu0[3]
        with trio.move_on_after(DRAIN_TIMEOUT):
            while load.answered - load.delivered or len(load.answered) < len(load.send_at):
                await trio.sleep(0.05)
        missing = load.answered - load.delivered
        if missing:
            result.errors.append(f"{len(missing)} messages answered sent and not delivered")
        unanswered = set(load.send_at) - load.answered
        if unanswered:
            result.errors.append(f"{len(unanswered)} sends not answered sent")
        result.answered = len(load.answered)
        load.stop.set()


def prepare(work: Path, connections: int) -> Path:
    config = init_data_dir(work / "data")
    set_settings(
        config,
        "relay",
        {
            **RELAXED_ADDRESSES,
            "port": 0,
            "idle_timeout_seconds": 600.0,
            "handshake_timeout_seconds": 120.0,
            "max_connections": max(10_000, 2 * connections),
            **RELAXED_RELAY,
        },
    )
    set_settings(config, "auth", {**RELAXED_AUTH, "access_token_minutes": 1_440.0})
    set_settings(config, "attachments", {"port": 0})
    seed_users(config, [f"s{i:04d}" for i in range(connections)], PASSWORD)
    return config


async def run(
    work: Path,
    *,
    connections: int,
    seconds: float,
    warmup: float,
    memtrace: Path | None = None,
    memtrace_frames: int = FRAMES,
) -> Result:
    """Start the daemon, run the load, stop the daemon (SIGTERM, exit code kept).
    With ``memtrace`` (a directory), the daemon runs under bench/_memtrace.py
    and marks its memory at the start, the end of the warm-up and the end."""
    raise_nofile(connections + 1_000)
    config = prepare(work, connections)
    command = None
    if memtrace is not None:
        memtrace_py = str(Path(_BENCH) / "_memtrace.py")
        command = [sys.executable, memtrace_py, str(memtrace), str(memtrace_frames)]
    daemon = Daemon(config, work, command=command)
    daemon.start()
    result = Result(connections, seconds, warmup)
    try:
        await trio.to_thread.run_sync(daemon.wait_ready)
        load = Load(daemon.relay_url()[0], result)
        pid = daemon.pid

        def mark() -> None:
            os.kill(pid, signal.SIGUSR1)

        async with trio.open_nursery() as nursery:
            if memtrace is not None and memtrace_frames == 0:
                nursery.start_soon(mark_every, load, mark)  # cheap: a time series
            await drive(load, pid, mark if memtrace is not None else None)
            nursery.cancel_scope.cancel()
        result.exit_code, _ = await trio.to_thread.run_sync(daemon.stop)
    finally:
        daemon.kill()
    result.log_findings = log_findings(daemon.log_path.read_text(errors="replace"))
    if memtrace is not None:
        result.memtrace = memtrace_report(memtrace)
    return result


async def mark_every(load: Load, mark: Callable[[], None]) -> None:
    """Without tracemalloc: a memory mark every MARK_EVERY seconds of the load."""
    await load.go.wait()
    while not load.stop.is_set():
        with trio.move_on_after(MARK_EVERY):
            await load.stop.wait()
        mark()


def memtrace_report(out: Path) -> list[str]:
    """What bench/_memtrace.py recorded: the marks, and the Python allocations
    that grew most after the warm-up (and during it) by traceback."""
    marks = [json.loads(line) for line in (out / "marks.jsonl").read_text().splitlines()]
    lines = [
        "memory marks (with tracemalloc: 0 load start, 1 warm-up end, 2 load end; without:"
        " every 10 s). MiB: traced Python, SQLite (its high-water), malloc in use + free"
        " (resident or given back: malloc_trim leaves it free) (heap, mmapped), Python's"
        " small-object arenas (1 MiB each, outside malloc) and what they hold, RssAnon;"
        " open database connections"
    ]
    first = marks[0]["at"] if marks else 0.0
    for m in marks:
        malloc = m.get("malloc", {})
        lines.append(
            f"  {m['at'] - first:5.0f} s: traced {m['traced'] / 2**20:.1f},"
            f" SQLite {m.get('sqlite_used', 0) / 2**20:.1f}"
            f" ({m.get('sqlite_highwater', 0) / 2**20:.1f}),"
            f" malloc {malloc.get('uordblks', 0) / 2**20:.1f}"
            f" + {malloc.get('fordblks', 0) / 2**20:.1f}"
            f" ({malloc.get('arena', 0) / 2**20:.1f}, {malloc.get('hblkhd', 0) / 2**20:.1f}),"
            f" pymalloc {m.get('pymalloc', {}).get('arenas', 0)} arenas"
            f" ({m.get('pymalloc', {}).get('used', 0) / 2**20:.1f} used),"
            f" RssAnon {m['status'].get('RssAnon', 0) / 1024:.1f},"
            f" connections {m.get('connections')}"
            + (f", gc objects {m['gc_objects']}" if m["gc_objects"] else "")
            + f"; took {m['took'] * 1000:.0f} ms"
        )
    for before, after, title in ((1, 2, "after the warm-up"), (0, 1, "during the warm-up")):
        old, new = out / f"snapshot-{before}.pickle", out / f"snapshot-{after}.pickle"
        if old.exists() and new.exists():
            lines.append(f"Python allocations that grew most {title} (mark {before} -> {after}):")
            lines += ["  " + line for line in top_growth(old, new, limit=10 if before else 6)]
    return lines


def p99_by_window(r: Result, width: float = WINDOW) -> dict[int, float]:
    """Send -> deliver p99 (seconds) of the sends written in each window."""
    by_window: dict[int, list[float]] = {}
    for at, latency in r.deliver_by_second:
        by_window.setdefault(int(at // width), []).append(latency)
    return {k: percentile(v, 99) for k, v in sorted(by_window.items())}


def windows(r: Result, width: float = WINDOW) -> str:
    return ", ".join(
        f"{k * width:.0f}-{(k + 1) * width:.0f} s {p99 * 1000:.0f} ms"
        for k, p99 in p99_by_window(r, width).items()
    )


def rss_by_backlog(r: Result, width: float = WINDOW) -> tuple[float, int, float, int]:
    """RSS change (KiB) over the measured windows in which the daemon kept up
    (p99 under KEPT_UP in the window and the one before, whose backlog it
    may still be working off) and over those with a backlog, and how many of
    each. On a shared machine RSS rises in steps at backlogs (high-water marks
    the allocators keep); this says whether it also rises while keeping up."""
    p99 = p99_by_window(r, width)
    samples = {int(s.at // width): s for s in r.samples}  # the last sample of each window
    kept = backlog = 0.0
    n_kept = n_backlog = 0
    for k in sorted(p99):
        if k * width < r.warmup or k - 1 not in samples or k not in samples:
            continue
        change = samples[k].rss_kib - samples[k - 1].rss_kib
        if p99[k] < KEPT_UP and p99.get(k - 1, 0.0) < KEPT_UP:
            kept += change
            n_kept += 1
        else:
            backlog += change
            n_backlog += 1
    return kept, n_kept, backlog, n_backlog


def report(r: Result) -> str:
    def q(values: list[float], p: float) -> str:
        return f"{percentile(values, p) * 1000:.1f} ms" if values else "n/a"

    after = r.after_warmup()
    kept, n_kept, backlog, n_backlog = rss_by_backlog(r)
    lines = [
        f"connections: {r.connections}, one message a second each, {r.seconds:.0f} s"
        f" ({r.warmup:.0f} s warm-up not measured); setup {r.setup_seconds:.1f} s",
        f"messages measured: {r.messages} ({r.messages / max(r.measured_seconds, 1e-9):.0f}/s);"
        f" answered sent (whole run): {r.answered}",
        f"errors: {len(r.errors)}",
        f"send -> deliver: p50 {q(r.deliver_latency, 50)}, p99 {q(r.deliver_latency, 99)},"
        f" max {q(r.deliver_latency, 100)} (target p99 < 100 ms)",
        f"send -> sent: p50 {q(r.sent_latency, 50)}, p99 {q(r.sent_latency, 99)}",
        "send -> deliver p99 by 10 s of the load: " + windows(r),
        f"RSS change after warm-up by 10 s window: {kept / 1024:+.1f} MiB over {n_kept}"
        f" windows that kept up (p99 < 100 ms in it and the one before),"
        f" {backlog / 1024:+.1f} MiB over {n_backlog} with a backlog",
        f"load clients' own event-loop lag: p50 {q(r.client_lag, 50)}, p99 {q(r.client_lag, 99)}"
        " (a late client reads late: part of the latency above is the clients')",
        "daemon RSS samples (MiB, one a second): "
        + " ".join(f"{s.rss_kib / 1024:.0f}" for s in r.samples),
        f"RSS after warm-up: {after[0].rss_kib / 1024:.1f} -> {after[-1].rss_kib / 1024:.1f} MiB,"
        f" slope {r.rss_slope_mib_per_minute():+.2f} MiB/min"
        f" (RssAnon {after[0].anon_kib / 1024:.1f} -> {after[-1].anon_kib / 1024:.1f} MiB,"
        f" slope {slope_per_minute([(p.at, p.anon_kib) for p in after]):+.2f};"
        f" RssFile {after[0].file_kib / 1024:.1f} -> {after[-1].file_kib / 1024:.1f} MiB,"
        f" slope {slope_per_minute([(p.at, p.file_kib) for p in after]):+.2f})"
        if after
        else "RSS after warm-up: no samples",
        f"CPU over the measured {r.measured_seconds:.1f} s: daemon {r.server_cpu:.2f} s"
        f" ({r.server_cpu / max(r.measured_seconds, 1e-9):.2f} cores,"
        f" {r.server_cpu / max(r.messages, 1) * 1e6:.0f} us per message),"
        f" load clients {r.client_cpu:.2f} s, whole machine {r.machine_cpu:.2f} s",
        f"final stop (SIGTERM): exit code {r.exit_code}",
    ]
    if len(r.rollups) == 2:
        keys = ("Rss", "Anonymous", "Private_Dirty", "Private_Clean", "Shared_Clean", "Swap")
        lines.append(
            "smaps_rollup, warm-up end -> load end (MiB): "
            + ", ".join(
                f"{k} {r.rollups[0].get(k, 0) / 1024:.1f} -> {r.rollups[1].get(k, 0) / 1024:.1f}"
                for k in keys
            )
        )
    lines += r.memtrace
    lines += [f"  error: {e}" for e in r.errors[:10]]
    lines += [f"  log: {line}" for line in r.log_findings[:10]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1_000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument(
        "--memtrace",
        type=Path,
        help="run the daemon under bench/_memtrace.py (tracemalloc: slower, bigger),"
        " keep its snapshots in this directory, and print where memory grew",
    )
    parser.add_argument(
        "--memtrace-frames",
        type=int,
        default=FRAMES,
        help="frames per traceback; 0: no tracemalloc, just SQLite's and malloc's figures"
        " every 10 s (the daemon at its own speed and size)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sustained-") as tmp:
        result = trio.run(
            lambda: run(
                Path(tmp),
                connections=args.connections,
                seconds=args.seconds,
                warmup=args.warmup,
                memtrace=args.memtrace,
                memtrace_frames=args.memtrace_frames,
            )
        )
    print(report(result))
    sys.exit(0 if not result.errors and result.exit_code == 0 else 1)


if __name__ == "__main__":
    main()
