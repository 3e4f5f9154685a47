"""Relay latency and event-loop lag under 20 logins/s, as a ratio to no logins.

Starts the real daemon (``chatd init`` into a temp dir, then ``chatd serve``
with NOTIFY_SOCKET, as systemd would) with ``relay.port = 0``,
``auth.require_mfa = "none"`` and the login rate limits raised out of the way
(``login_rate_per_ip`` and ``login_rate_per_account`` 100000/min,
``rate_burst`` 10000, ``backoff_base_seconds`` 0.1 and ``backoff_max_seconds``
1, the smallest the config allows). The Argon2id cost stays at its default:
that cost is what is measured.

Accounts are made through the admin API: ``POST /v1/users`` over the admin
unix socket with the token from DATA/admin-token (the daemon hashes each
password, so this takes a few seconds before anything is timed).

Latency probe: --probes connections (default 20), each logged in once at the
start, send ``ping {id}`` and wait for the matching ``pong``, each every
--interval seconds (default 50 ms, staggered across connections; a late ping
is sent at once and the missed slots are skipped, never bunched). The client
records each round trip. Pings run throughout; each phase takes the pings
sent inside its window.

Event-loop lag is measured inside the daemon without changing chatd: the
daemon runs under ``bench/_lagmon.py``, which wraps ``trio.run`` with a
system task that sleeps 10 ms in a loop and records how late it wakes (the
loop's lag), and an instrument that records the longest single task step.
An idle loop shows 0-1 ms (epoll rounds timeouts to whole milliseconds).

* Phase A: --duration seconds (default 15; --quick: 3) of pings only.
* Phase B: the same pings while a load generator makes --login-rate logins a
  second (default 20), open loop on a fixed schedule, each on a new
  connection: connect, ``hello``, ``login``, reply, close. Of every five,
  two use a right password, two a wrong one and one an unknown username.
  Each login comes from its own loopback source address (127.N.M.1, a
  different /24 each time: the relay keys its per-address limits and its
  failure back-off by /24, and with every login from 127.0.0.1 the per-
  address back-off after each wrong password would refuse most of the load
  as ``rate_limited`` before any Argon2 work, which is not the load wanted).
  (``--one-source`` sends them all from 127.0.0.1 to show that.)
  The generator runs in a separate Python process (``--in-process-load`` runs
  it in the probe process instead), so its CPU does not delay the probe's
  own event loop; both processes report their CPU use and the probe process
  its own loop lag, to show whether the client limited the figures.

Prints ping round trips (p50/p99/max) for each phase and their ratios B/A,
the daemon's event-loop lag (p99/max) and longest task step in each phase,
the achieved login rate, login latency (p50/p99; the time from sending the
``login`` frame to its reply), the outcome counts, and the daemon's CPU time
(utime+stime from /proc/PID/stat, split into the event-loop thread and the
rest: Argon2 worker threads, store threads) in each phase. It also prints how
much CPU the whole machine used in each phase and how much of that was
outside chatd and this benchmark (from /proc/stat), with a warning when other
processes competed: on 2 cores that taints the figures, so rerun. Finally
SIGTERM, expecting exit 0. ``--no-lag-monitor`` runs plain ``chatd serve``
(no lag figures) to check the monitor's own cost against the daemon's CPU.

    .venv/bin/python bench/login_load.py [--duration 15] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import trio
from _daemon import (
    RELAXED_ADDRESSES,
    RELAXED_AUTH,
    Daemon,
    init_data_dir,
    ms,
    percentile,
    set_settings,
)
from trio_websocket import WebSocketConnection, open_websocket_url, wrap_client_stream

PASSWORD: Final = "plum orbit kettle sunrise"  # noqa: S105 - bench accounts
WRONG_PASSWORD: Final = "plum orbit kettle sunset"  # noqa: S105
CONNECT_TIMEOUT: Final = 30.0  # seconds for one probe's connect + hello + login
PING_TIMEOUT: Final = 10.0  # seconds a pong may take before the probe gives up
LOGIN_TIMEOUT: Final = 30.0  # seconds one load login (connect to reply) may take
CLOSE_TIMEOUT: Final = 2.0  # seconds for a closing handshake
WARMUP_SECONDS: Final = 2.0  # pings before phase A, not counted
LOADGEN_LEAD: Final = 3.0  # seconds between spawning the load generator and phase B
SETTLE_SECONDS: Final = 1.0  # pause between the phases' windows
MAX_IN_FLIGHT: Final = 400  # load logins open at once; beyond this, scheduled ones are skipped
CLIENT_LAG_INTERVAL: Final = 0.010  # the probe process's own lag sampler
LOAD_ACCOUNTS: Final = 40  # accounts the load logs in to, round robin
OUTSIDE_LOAD_WARNING: Final = 0.2  # cores used by other processes that taint a phase
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
PUSHED_FRAMES: Final = ("key_count", "presence", "deliver", "typing_notice")


# -- small helpers ----------------------------------------------------------------------------


def _ratio(b: float, a: float) -> str:
    return f"{b / a:.2f}x" if a > 0 else "n/a"


def _cpu_ticks(path: str) -> int:
    """utime + stime, in clock ticks, from a /proc .../stat file."""
    with open(path) as fh:
        fields_after_comm = fh.read().rpartition(")")[2].split()
    # fields 14 and 15 of stat(5); fields_after_comm[0] is field 3 (state)
    return int(fields_after_comm[11]) + int(fields_after_comm[12])


def daemon_cpu(pid: int) -> tuple[float, float]:
    """(whole process, main thread) CPU seconds; the main thread runs the event loop."""
    total = _cpu_ticks(f"/proc/{pid}/stat") / CLK_TCK
    loop = _cpu_ticks(f"/proc/{pid}/task/{pid}/stat") / CLK_TCK
    return total, loop


def machine_busy() -> float:
    """CPU seconds all cores have spent not idle since boot, from /proc/stat."""
    with open("/proc/stat") as fh:
        ticks = [int(v) for v in fh.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is inside user)
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / CLK_TCK


async def sleep_until_monotonic(when: float) -> None:
    """Sleep until ``time.monotonic()`` reaches ``when`` (trio's clock has its own offset)."""
    await trio.sleep(max(0.0, when - time.monotonic()))


# -- accounts -----------------------------------------------------------------------------------


def create_accounts(data_dir: Path, usernames: list[str]) -> float:
    """POST /v1/users for each name over the admin unix socket; seconds taken."""
    token = (data_dir / "admin-token").read_text().strip()
    transport = httpx.HTTPTransport(uds=str(data_dir / "admin.sock"))
    started = time.monotonic()
    with httpx.Client(transport=transport, base_url="http://chatd", timeout=30.0) as client:
        for name in usernames:
            response = client.post(
                "/v1/users",
                json={"username": name, "password": PASSWORD, "role": "user"},
                headers={"Authorization": f"Bearer {token}"},
            )
            if response.status_code != 200:
                raise SystemExit(f"creating {name}: HTTP {response.status_code} {response.text}")
    return time.monotonic() - started


# -- the latency probe --------------------------------------------------------------------------


@dataclass
class Probes:
    url: str
    usernames: list[str]
    interval: float
    samples: list[tuple[float, float]] = field(default_factory=list)  # (sent, round trip)
    logged_in: int = 0
    ready: trio.Event = field(default_factory=trio.Event)
    stop: trio.Event = field(default_factory=trio.Event)
    failures: list[str] = field(default_factory=list)
    skipped_slots: int = 0

    async def one(self, index: int) -> None:
        try:
            async with open_websocket_url(
                self.url, connect_timeout=CONNECT_TIMEOUT, disconnect_timeout=CLOSE_TIMEOUT
            ) as ws:
                with trio.fail_after(CONNECT_TIMEOUT):
                    hello = json.loads(await ws.get_message())
                    if hello.get("type") != "hello":
                        raise RuntimeError(f"first frame is not hello: {hello!r}")
                    login = {
                        "type": "login",
                        "id": "login",
                        "username": self.usernames[index],
                        "password": PASSWORD,
                        "device_name": f"probe {index}",
                    }
                    await ws.send_message(json.dumps(login))
                    session = json.loads(await ws.get_message())
                    if session.get("type") != "session":
                        raise RuntimeError(f"login refused: {session!r}")
                self.logged_in += 1
                if self.logged_in == len(self.usernames):
                    self.ready.set()
                await self.ready.wait()
                await self._ping_loop(ws, index)
        except Exception as exc:
            self.failures.append(f"probe {index}: {type(exc).__name__}: {exc}")
            self.ready.set()
            self.stop.set()

    async def _ping_loop(self, ws: WebSocketConnection, index: int) -> None:
        # Stagger the connections evenly across one interval.
        next_at = time.monotonic() + self.interval * index / len(self.usernames)
        seq = 0
        while not self.stop.is_set():
            await sleep_until_monotonic(next_at)
            if self.stop.is_set():
                return
            seq += 1
            ping_id = f"p{index}.{seq}"
            sent = time.monotonic()
            await ws.send_message(json.dumps({"type": "ping", "id": ping_id}))
            with trio.fail_after(PING_TIMEOUT):
                reply = json.loads(await ws.get_message())
                # Pushed frames (key_count, presence, deliver) may come between.
                while reply.get("type") in PUSHED_FRAMES:
                    reply = json.loads(await ws.get_message())
            rtt = time.monotonic() - sent
            if reply != {"type": "pong", "id": ping_id}:
                raise RuntimeError(f"expected pong {ping_id}, got {reply!r}")
            self.samples.append((sent, rtt))
            next_at += self.interval
            now = time.monotonic()
            if next_at < now:  # late: skip the missed slots rather than bunch them
                missed = math.ceil((now - next_at) / self.interval)
                self.skipped_slots += missed
                next_at += missed * self.interval

    def window(self, start: float, end: float) -> list[float]:
        return [rtt for sent, rtt in self.samples if start <= sent < end]


async def client_lag(samples: list[tuple[float, float]], stop: trio.Event) -> None:
    """This process's own event-loop lag: how late a 10 ms sleep wakes."""
    while not stop.is_set():
        before = time.monotonic()
        await trio.sleep(CLIENT_LAG_INTERVAL)
        woke = time.monotonic()
        samples.append((woke, woke - before - CLIENT_LAG_INTERVAL))


# -- the login load ---------------------------------------------------------------------------


def source_address(k: int) -> str:
    """A loopback address in a /24 of its own for attempt k (127.1.0.1 onwards)."""
    return f"127.{1 + (k // 250) % 200}.{k % 250}.1"


def attempt_kind(k: int) -> str:
    return ("right", "right", "wrong", "wrong", "unknown")[k % 5]


async def login_once(host: str, port: int, k: int, one_source: bool) -> dict[str, Any]:
    """One login on a new connection from its own source address; the outcome."""
    kind = attempt_kind(k)
    if kind == "unknown":
        username, password = f"ghost{k}", PASSWORD
    else:
        username = f"load{k % LOAD_ACCOUNTS:03d}"
        password = PASSWORD if kind == "right" else WRONG_PASSWORD
    result: dict[str, Any] = {"k": k, "kind": kind, "start": time.monotonic()}
    frame = json.dumps(
        {
            "type": "login",
            "id": f"l{k}",
            "username": username,
            "password": password,
            "device_name": "load",
        }
    )
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    stream: trio.SocketStream | None = None
    try:
        with trio.fail_after(LOGIN_TIMEOUT):
            await sock.bind(("127.0.0.1" if one_source else source_address(k), 0))
            await sock.connect((host, port))
            stream = trio.SocketStream(sock)
            async with trio.open_nursery() as nursery:
                ws = await wrap_client_stream(nursery, stream, host, "/v1/ws")
                try:
                    hello = json.loads(await ws.get_message())
                    if hello.get("type") != "hello":
                        raise RuntimeError(f"first frame is not hello: {hello!r}")
                    sent = time.monotonic()
                    await ws.send_message(frame)
                    reply = json.loads(await ws.get_message())
                    result["login_seconds"] = time.monotonic() - sent
                    result["end"] = time.monotonic()
                    if reply.get("type") == "session":
                        result["outcome"] = "session"
                    else:
                        result["outcome"] = str(reply.get("code", reply.get("type")))
                finally:
                    with trio.move_on_after(CLOSE_TIMEOUT) as closing:
                        closing.shield = True
                        await ws.aclose()
                    nursery.cancel_scope.cancel()
    except Exception as exc:
        result.setdefault("outcome", f"client error {type(exc).__name__}")
        result.setdefault("detail", str(exc)[:200])
    finally:
        if stream is not None:
            await stream.aclose()
        else:
            sock.close()
    return result


async def login_load(
    host: str, port: int, start_at: float, duration: float, rate: float, one_source: bool
) -> dict[str, Any]:
    """Open-loop logins on a fixed schedule from ``start_at`` (monotonic) for ``duration``."""
    results: list[dict[str, Any]] = []
    skipped = 0
    in_flight = 0

    async def run(k: int) -> None:
        nonlocal in_flight
        try:
            results.append(await login_once(host, port, k, one_source))
        finally:
            in_flight -= 1

    await sleep_until_monotonic(start_at)
    cpu_start = time.process_time()
    lag: list[tuple[float, float]] = []
    lag_stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client_lag, lag, lag_stop)
        for k in range(int(duration * rate)):
            await sleep_until_monotonic(start_at + k / rate)
            if in_flight >= MAX_IN_FLIGHT:
                skipped += 1
                continue
            in_flight += 1
            nursery.start_soon(run, k)
        with trio.move_on_after(LOGIN_TIMEOUT + CLOSE_TIMEOUT + 5):
            while in_flight:
                await trio.sleep(0.05)
        lag_stop.set()
        nursery.cancel_scope.cancel()
    window_lag = [v for t, v in lag if t < start_at + duration]
    return {
        "results": results,
        "skipped": skipped,
        "unfinished": in_flight,
        "cpu_seconds": time.process_time() - cpu_start,
        "client_lag_max": max(window_lag, default=0.0),
    }


def loadgen_main(spec: str) -> None:
    """Child-process entry (``--loadgen SPEC``): run the load, print its results as JSON."""
    s = json.loads(spec)
    out = trio.run(
        login_load, s["host"], s["port"], s["start_at"], s["duration"], s["rate"], s["one_source"]
    )
    json.dump(out, sys.stdout)


async def spawn_loadgen(
    host: str, port: int, start_at: float, duration: float, rate: float, one_source: bool
) -> dict[str, Any]:
    spec = json.dumps(
        {
            "host": host,
            "port": port,
            "start_at": start_at,
            "duration": duration,
            "rate": rate,
            "one_source": one_source,
        }
    )
    command = [sys.executable, str(Path(__file__).resolve()), "--loadgen", spec]
    limit = start_at - time.monotonic() + duration + LOGIN_TIMEOUT + 30
    with trio.fail_after(limit):
        done = await trio.run_process(command, capture_stdout=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"load generator exited with {done.returncode}")
    return json.loads(done.stdout)  # type: ignore[no-any-return]


# -- the run ------------------------------------------------------------------------------------


@dataclass
class Phase:
    start: float = 0.0
    end: float = 0.0
    cpu_total: float = 0.0  # daemon CPU seconds in the window, all threads
    cpu_loop: float = 0.0  # of which the event-loop (main) thread
    client_cpu: float = 0.0  # the probe process's CPU seconds in the window
    machine: float = 0.0  # CPU seconds of every process on the machine in the window


async def _phase(pid: int, start: float, duration: float) -> Phase:
    await sleep_until_monotonic(start)
    phase = Phase(start=time.monotonic())
    total0, loop0 = daemon_cpu(pid)
    client0 = time.process_time()
    machine0 = machine_busy()
    await sleep_until_monotonic(phase.start + duration)
    phase.end = time.monotonic()
    total1, loop1 = daemon_cpu(pid)
    phase.machine = machine_busy() - machine0
    phase.cpu_total, phase.cpu_loop = total1 - total0, loop1 - loop0
    phase.client_cpu = time.process_time() - client0
    return phase


async def run_phases(
    daemon: Daemon, url: str, port: int, probe_names: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    probes = Probes(url, probe_names, args.interval)
    lag: list[tuple[float, float]] = []
    out: dict[str, Any] = {"probes": probes, "client_lag": lag}
    async with trio.open_nursery() as nursery:
        for i in range(len(probe_names)):
            nursery.start_soon(probes.one, i)
        nursery.start_soon(client_lag, lag, probes.stop)
        with trio.move_on_after(CONNECT_TIMEOUT * 2):
            await probes.ready.wait()
        if probes.failures or probes.logged_in < len(probe_names):
            probes.stop.set()
            raise SystemExit(
                f"{probes.logged_in} of {len(probe_names)} probes logged in: "
                + "; ".join(probes.failures[:5])
                + f"\ndaemon log:\n{daemon.log_tail()}"
            )
        out["a"] = await _phase(daemon.pid, time.monotonic() + WARMUP_SECONDS, args.duration)
        b_start = time.monotonic() + SETTLE_SECONDS + LOADGEN_LEAD
        host = "127.0.0.1"
        if args.in_process_load:
            load = login_load(host, port, b_start, args.duration, args.login_rate, args.one_source)
        else:
            load = spawn_loadgen(
                host, port, b_start, args.duration, args.login_rate, args.one_source
            )

        async def collect() -> None:
            out["load"] = await load

        async with trio.open_nursery() as loading:
            loading.start_soon(collect)
            out["b"] = await _phase(daemon.pid, b_start, args.duration)
        probes.stop.set()
    if probes.failures:
        raise SystemExit("probe failed: " + "; ".join(probes.failures[:5]))
    return out


def read_lag(path: Path, start: float, end: float) -> dict[str, Any]:
    """Summarise bench/_lagmon.py samples taken between ``start`` and ``end``."""
    lags: list[float] = []
    longest, longest_cpu, longest_task, busy, gc_pause = 0.0, 0.0, "-", 0.0, 0.0
    with path.open() as fh:
        for line in fh:
            parts = line.split(maxsplit=6)
            if len(parts) < 7:
                continue
            t, lag, step, step_cpu, step_busy, gc_max = (float(v) for v in parts[:6])
            if not start <= t < end:
                continue
            lags.append(lag)
            busy += step_busy
            gc_pause = max(gc_pause, gc_max)
            if step > longest:
                longest, longest_cpu, longest_task = step, step_cpu, parts[6].strip()
    if not lags:
        raise SystemExit(f"no lag samples in {path} between {start} and {end}")
    return {
        "n": len(lags),
        "p50": percentile(lags, 50),
        "p99": percentile(lags, 99),
        "max": max(lags),
        "longest_step": longest,
        "longest_step_cpu": longest_cpu,
        "longest_task": longest_task,
        "busy": busy / (end - start),
        "gc_pause": gc_pause,
    }


def log_findings(log: str) -> list[str]:
    """Lines of the daemon log that look wrong: errors, tracebacks, failed handlers."""
    bad = []
    for line in log.splitlines():
        low = line.lower()
        if "level=error" in low or "traceback" in low or "level=critical" in low:
            bad.append(line)
    return bad


def report(out: dict[str, Any], lag_log: Path, args: argparse.Namespace) -> None:
    probes: Probes = out["probes"]
    a, b = out["a"], out["b"]
    rtt = {"A": probes.window(a.start, a.end), "B": probes.window(b.start, b.end)}
    lag: dict[str, dict[str, Any] | None] = {"A": None, "B": None}
    if not args.no_lag_monitor:
        lag = {"A": read_lag(lag_log, a.start, a.end), "B": read_lag(lag_log, b.start, b.end)}
    client_lag = {
        name: max((v for t, v in out["client_lag"] if p.start <= t < p.end), default=0.0)
        for name, p in (("A", a), ("B", b))
    }
    figures: dict[str, dict[str, float]] = {}
    print(
        f"probes: {len(probes.usernames)} logged-in connections, one ping each every "
        f"{args.interval * 1000:.0f} ms; phases of {args.duration:.0f} s"
    )
    for name, phase in (("A", a), ("B", b)):
        values = rtt[name]
        if not values:
            raise SystemExit(f"no pings in phase {name}")
        figures[name] = {
            "p50": percentile(values, 50),
            "p99": percentile(values, 99),
            "max": max(values),
        }
        label = "phase A (pings only)" if name == "A" else "phase B (pings + logins)"
        f = figures[name]
        print(
            f"{label}: {len(values)} pings, RTT p50 {ms(f['p50'])}, p99 {ms(f['p99'])}, "
            f"max {ms(f['max'])}"
        )
        d = lag[name]
        if d:
            print(
                f"  daemon event-loop lag (10 ms sleeper, {d['n']} samples): p50 {ms(d['p50'])}, "
                f"p99 {ms(d['p99'])}, max {ms(d['max'])}"
            )
            print(
                f"  daemon longest task step {ms(d['longest_step'])} wall, "
                f"{ms(d['longest_step_cpu'])} CPU ({d['longest_task']}); longest GC pause "
                f"{ms(d['gc_pause'])}; task steps {d['busy'] * 100:.0f}% of wall time"
            )
        else:
            print("  daemon event-loop lag: not measured (--no-lag-monitor)")
        span = phase.end - phase.start
        others = max(0.0, phase.cpu_total - phase.cpu_loop)  # two reads, ticks apart
        print(
            f"  daemon CPU: {phase.cpu_total:.2f} s in {span:.1f} s "
            f"({phase.cpu_total / span * 100:.0f}% of a core): event-loop thread "
            f"{phase.cpu_loop:.2f} s, other threads {others:.2f} s"
        )
        print(
            f"  probe client: CPU {phase.client_cpu:.2f} s, own loop lag max {ms(client_lag[name])}"
        )
        ours = phase.cpu_total + phase.client_cpu
        if name == "B":
            ours += out["load"]["cpu_seconds"]
        outside = max(0.0, phase.machine - ours) / span
        print(
            f"  whole machine: {phase.machine / span:.2f} of {os.cpu_count()} cores busy; "
            f"outside chatd and this benchmark: {outside:.2f} cores"
        )
        if outside > OUTSIDE_LOAD_WARNING:
            print(f"  WARNING: other processes competed for the CPU in phase {name}; rerun")
    fa, fb = figures["A"], figures["B"]
    line = (
        f"ratio B/A: RTT p50 {_ratio(fb['p50'], fa['p50'])}, p99 {_ratio(fb['p99'], fa['p99'])}, "
        f"max {_ratio(fb['max'], fa['max'])}"
    )
    if lag["A"] and lag["B"]:
        la, lb = lag["A"], lag["B"]
        line += (
            f"; daemon loop lag p99 {_ratio(lb['p99'], la['p99'])}, "
            f"max {_ratio(lb['max'], la['max'])}"
        )
    print(line)
    print(f"ping slots skipped (a pong came after the next slot): {probes.skipped_slots}")

    load = out["load"]
    results: list[dict[str, Any]] = load["results"]
    answered = [r for r in results if "login_seconds" in r]
    where = "in the probe process" if args.in_process_load else "in a separate process"
    print(
        f"login load ({where}): {len(results) + load['skipped']} scheduled at "
        f"{args.login_rate:g}/s, {len(answered)} answered, {load['skipped']} skipped "
        f"(over {MAX_IN_FLIGHT} in flight), {load['unfinished']} unfinished"
    )
    if answered:
        first = min(r["start"] for r in results)
        last = max(r["end"] for r in answered)
        print(f"achieved login rate: {len(answered) / (last - first):.1f}/s")
        times = [r["login_seconds"] for r in answered]
        print(
            f"login latency (login frame to reply): p50 {ms(percentile(times, 50))}, "
            f"p99 {ms(percentile(times, 99))}, max {ms(max(times))}"
        )
        for kind in ("right", "wrong", "unknown"):
            some = [r["login_seconds"] for r in answered if r["kind"] == kind]
            if some:
                label = {"right": "right password", "wrong": "wrong password"}.get(kind, kind)
                print(f"  {label}: n={len(some)}, p50 {ms(percentile(some, 50))}")
    outcomes: dict[str, int] = {}
    for r in results:
        key = f"{r['kind']}->{r.get('outcome', '?')}"
        outcomes[key] = outcomes.get(key, 0) + 1
    print("login outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    expected = {"right": "session", "wrong": "login_failed", "unknown": "login_failed"}
    odd = [r for r in results if r.get("outcome") != expected[r["kind"]]]
    for r in odd[:5]:
        print(f"  unexpected: {r}")
    print(
        f"load generator: CPU {load['cpu_seconds']:.2f} s, own loop lag max "
        f"{ms(load['client_lag_max'])}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per phase")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 s phases")
    parser.add_argument("--probes", type=int, default=20, help="ping connections")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between pings")
    parser.add_argument("--login-rate", type=float, default=20.0, help="logins per second")
    parser.add_argument(
        "--in-process-load", action="store_true", help="run the login load in the probe process"
    )
    parser.add_argument(
        "--no-lag-monitor",
        action="store_true",
        help="run plain chatd (no in-daemon lag figures), to see the monitor's own cost",
    )
    parser.add_argument(
        "--one-source",
        action="store_true",
        help="send every login from 127.0.0.1 (shows the per-address failure back-off)",
    )
    parser.add_argument("--loadgen", help=argparse.SUPPRESS)  # child-process mode
    args = parser.parse_args()
    if args.loadgen is not None:
        loadgen_main(args.loadgen)
        return
    args.duration = 3.0 if args.quick else max(1.0, min(args.duration, 600.0))
    args.probes = max(1, min(args.probes, 500))
    args.interval = max(0.005, min(args.interval, 10.0))
    args.login_rate = max(0.1, min(args.login_rate, 200.0))

    probe_names = [f"probe{i:03d}" for i in range(args.probes)]
    load_names = [f"load{i:03d}" for i in range(LOAD_ACCOUNTS)]
    with tempfile.TemporaryDirectory(prefix="chatd-bench-") as tmp:
        work = Path(tmp)
        data = work / "data"
        config = init_data_dir(data)
        set_settings(config, "relay", {**RELAXED_ADDRESSES, "port": 0})
        set_settings(config, "auth", RELAXED_AUTH)
        lag_log = work / "lag.txt"
        daemon = Daemon(config, work, lag_log=None if args.no_lag_monitor else lag_log)
        daemon.start()
        try:
            ready = daemon.wait_ready()
            url, port = daemon.relay_url()
            made = create_accounts(data, probe_names + load_names)
            out = trio.run(run_phases, daemon, url, port, probe_names, args)
        except BaseException:
            daemon.kill()
            print(f"daemon log tail:\n{daemon.log_tail()}", file=sys.stderr)
            raise
        code, stop_seconds = daemon.stop()
        log = daemon.log_path.read_text(errors="replace")
        print(
            f"relay: {url} (daemon ready in {ready * 1000:.0f} ms; "
            f"{len(probe_names) + len(load_names)} accounts made via the admin API in {made:.1f} s)"
        )
        report(out, lag_log, args)
        findings = log_findings(log)
        print(f"daemon log: {len(log.splitlines())} lines, {len(findings)} error lines")
        for line in findings[:5]:
            print(f"  {line[:300]}")
    print(f"SIGTERM to exit {code}: {stop_seconds * 1000:.0f} ms")
    if code != 0:
        raise SystemExit(f"chatd exited with {code} after SIGTERM, expected 0")


if __name__ == "__main__":
    main()
