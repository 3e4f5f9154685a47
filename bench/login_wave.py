"""The morning login wave: N different users log in, one connection each, and stay.

Starts the real daemon (``chatd init`` into a temp dir, then ``chatd serve``
with NOTIFY_SOCKET, as systemd would) with ``relay.port = 0``, a one-hour
``relay.idle_timeout_seconds`` and ``handshake_timeout_seconds``, room in
``relay.max_connections``, day-long access tokens (``auth.access_token_minutes``
1440, so no connection of a long wave is closed for an expired token), the
relaxed ``[auth]`` of ``bench/_daemon.py`` (no MFA, login rate limits out of
the way) and RLIMIT_NOFILE raised (the daemon and the clients inherit it).
The Argon2id cost stays at its default: that cost is what bounds the rate.

**Accounts.** --users accounts (default 5,000), all with the same password.
Setup is not what is measured, so by default they are seeded with the daemon
stopped (``seed_users`` in ``bench/_daemon.py``): one Argon2id hash made with
chatd's own hasher at the configured cost, and one ``users`` row per account
inserted through chatd's own store code (``open_writer``, the key from the
data dir). Each login then verifies a real Argon2id hash, exactly as for an
account made through the admin API; only the salt is shared. ``--admin-api``
makes them through ``POST /v1/users`` instead, 4 at a time (one hash each in
the daemon: a few minutes at 5,000), before the wave.

**Argon2 ceiling.** Before the daemon starts, a few hashes are timed with
chatd's own hasher in one thread and in two threads at once, so the rate that
Argon2 alone allows on this machine is printed next to the figures.

**The wave.** --workers client processes (default 2) share the users (user k
goes to worker k mod W) and each keeps its share of the --concurrency logins
in flight (default 12 in all). Each login opens a new WebSocket (trio-websocket)
to /v1/ws, reads ``hello``, sends ``login`` with a ``device_name`` and no
``device_id`` (so each connection is a new device of a different user), and
counts the time from the ``login`` frame to the ``session`` reply. Then the
connection stays open and keeps reading, counting every frame by type (and
the user ids in ``presence`` pushes), so the server's send queue never fills
on our account. A worker reports each login as it completes; the parent
prints a line per bucket of --bucket logins (default 500, or a tenth of
--users below 5,000) as the wave goes: the rate of that bucket (logins
completed / seconds since the previous bucket's last one), login time
p50/p99, the daemon's CPU per login and its RSS at the bucket's end, the
presence frames received so far, the cores other user-space processes used
(a warning above 0.2: other work on the machine then skewed that bucket) and
the rest of the machine's busy time outside the daemon and the clients (the
kernel: mostly loopback TCP for the frames sent, and processes that came and
went between readings). When every login is done (or --timeout passed), the
parent reads the daemon's CPU, waits a second (presence pushes are coalesced
per second) and reads its RSS, then tells the workers to close their
connections (each with a closing handshake bounded by 5 s) and collects
their frame counts and errors.

Prints: the buckets; the total time and mean rate; the rate of the last
bucket; presence frames (and user ids in them) received in total; other
frames by type; the daemon's CPU (all threads, and the event-loop thread)
over the wave; the clients' CPU and the whole machine's; the daemon's RSS at
the end; errors (refused logins, connections that failed, connections the
server closed early). Finally SIGTERM, expecting exit 0, and the daemon
log's warning and error lines.

The target (for the rebuilt relay): at 5,000 users every bucket keeps the
rate Argon2 allows, at least 20 logins/s on 2 cores, to the last one.

**The drain under load** (``--stop-connected``): after the wave, SIGTERM goes
to the daemon while every connection is still open. Printed: the time to
exit (the target: within the 10 s grace period, exit 0, no warning or error
line in the log, at 10,000 connections) and the close codes the clients saw
(1001 "server shutting down" for each).

    .venv/bin/python bench/login_wave.py [--users 5000] [--concurrency 12] [--stop-connected]
        [--workers 2] [--bucket 500] [--admin-api]
    .venv/bin/python bench/login_wave.py --users 500     # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import msgspec
import trio
from _daemon import (
    RELAXED_ADDRESSES,
    RELAXED_AUTH,
    Daemon,
    argon2_seconds,
    cpu_seconds,
    create_users,
    init_data_dir,
    machine_busy_seconds,
    ms,
    other_processes_cpu,
    percentile,
    raise_nofile,
    seed_users,
    set_settings,
    vm_rss_kib,
)
from trio_websocket import ConnectionClosed, open_websocket_url

PASSWORD: Final = "plum orbit kettle sunrise"  # noqa: S105 - bench accounts
LOGIN_TIMEOUT: Final = 300.0  # seconds for one connect + hello + login reply
CLOSE_TIMEOUT: Final = 5.0  # seconds for one closing handshake at the end
GRACE_SECONDS: Final = 10.0  # server.shutdown_grace_seconds (the default, not changed here)
STOP_TIMEOUT: Final = 120.0  # seconds for a worker to close everything and report
TARGET_RATE: Final = 20.0  # logins/s the issue asks for in every bucket
OUTSIDE_LOAD_WARNING: Final = 0.2  # cores used by other processes that taint a bucket
SETTLE_SECONDS: Final = 1.0  # after the last login: presence pushes are coalesced per second
MAX_USERS: Final = 20_000  # the hard RLIMIT_NOFILE here is 20,000 per process


# -- the client worker (a child process) --------------------------------------------------------


class _Frame(msgspec.Struct):
    """The parts of a server frame the worker looks at (other fields are skipped)."""

    type: str = ""
    id: str | None = None
    online: list[int] = []
    offline: list[int] = []
    code: str | None = None


_decode_frame = msgspec.json.Decoder(_Frame).decode


@dataclass
class Worker:
    url: str
    usernames: list[str]
    concurrency: int
    frames: dict[str, int] = field(default_factory=dict)
    presence_ids: int = 0
    done: int = 0  # logins that ended, either way
    logged_in: int = 0
    all_done: trio.Event = field(default_factory=trio.Event)
    stopping: bool = False
    closed_early: list[str] = field(default_factory=list)
    _scopes: list[trio.CancelScope] = field(default_factory=list)  # one per reading connection

    def count(self, frame: _Frame) -> None:
        self.frames[frame.type] = self.frames.get(frame.type, 0) + 1
        if frame.type == "presence":
            self.presence_ids += len(frame.online) + len(frame.offline)

    def emit(self, line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def finished_one(self) -> None:
        self.done += 1
        if self.done == len(self.usernames):
            self.all_done.set()

    async def one(self, index: int, slots: trio.Semaphore) -> None:
        username = self.usernames[index]
        await slots.acquire()
        in_slot = True
        try:
            async with open_websocket_url(
                self.url, connect_timeout=LOGIN_TIMEOUT, disconnect_timeout=CLOSE_TIMEOUT
            ) as ws:
                with trio.fail_after(LOGIN_TIMEOUT):
                    hello = _decode_frame(await ws.get_message())
                    if hello.type != "hello":
                        raise RuntimeError(f"first frame is {hello.type!r}, not hello")
                    login = {
                        "type": "login",
                        "id": "login",
                        "username": username,
                        "password": PASSWORD,
                        "device_name": f"wave {username}",
                    }
                    sent = time.monotonic()
                    await ws.send_message(json.dumps(login))
                    for _ in range(100_000):
                        reply = _decode_frame(await ws.get_message())
                        if reply.id == "login":
                            break
                        self.count(reply)
                    else:
                        raise RuntimeError("no reply to login in 100000 frames")
                    done = time.monotonic()
                slots.release()
                in_slot = False
                if reply.type != "session":
                    self.emit(f"E {username} login refused: {reply.type} {reply.code}")
                    self.finished_one()
                    return
                self.logged_in += 1
                self.emit(
                    f"S {done:.6f} {done - sent:.6f} "
                    f"{self.frames.get('presence', 0)} {self.presence_ids}"
                )
                self.finished_one()
                await self._read(ws, username)
        except Exception as exc:
            if in_slot or not self.stopping:
                self.emit(f"E {username} {type(exc).__name__}: {str(exc)[:200]}")
            if in_slot:
                self.finished_one()
        finally:
            if in_slot:
                slots.release()

    async def _read(self, ws: Any, username: str) -> None:
        """Count every frame until told to stop; the caller then closes."""
        with trio.CancelScope() as scope:
            self._scopes.append(scope)
            for _ in range(100_000_000):
                try:
                    frame = _decode_frame(await ws.get_message())
                except ConnectionClosed as exc:
                    if not self.stopping:
                        reason = exc.reason
                        self.closed_early.append(
                            f"{username}: {getattr(reason, 'code', None)} "
                            f"{getattr(reason, 'reason', None)}"
                        )
                        self.emit(f"C {username} {getattr(reason, 'code', None)}")
                    return
                self.count(frame)


async def _wait_for_stop(worker: Worker) -> None:
    """The parent writes STOP on our stdin once it has read its figures."""
    line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
    if line.strip() != "STOP":
        worker.emit(f"E - unexpected line on stdin: {line.strip()[:50]!r}")


async def worker_main(spec: dict[str, Any]) -> None:
    worker = Worker(spec["url"], spec["usernames"], spec["concurrency"])
    slots = trio.Semaphore(worker.concurrency)
    worker.emit("RUNNING")
    frames: dict[str, int] = {}  # as they were when STOP came
    presence_ids = 0
    with trio.move_on_after(spec["timeout"] + STOP_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for i in range(len(worker.usernames)):
                nursery.start_soon(worker.one, i, slots)
            with trio.move_on_after(spec["timeout"]):
                await worker.all_done.wait()
            worker.emit(f"READY {worker.logged_in}")
            await _wait_for_stop(worker)
            frames = dict(worker.frames)
            presence_ids = worker.presence_ids
            worker.stopping = True
            for scope in worker._scopes:
                scope.cancel()
            with trio.move_on_after(STOP_TIMEOUT):
                # Each connection now closes (handshake bounded by CLOSE_TIMEOUT).
                while len(nursery.child_tasks) > 0:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    result = {
        "frames": frames,
        "presence_ids": presence_ids,
    }
    worker.emit("RESULT " + json.dumps(result))


# -- the parent ---------------------------------------------------------------------------------


@dataclass
class Login:
    done: float  # time.monotonic() of the session reply
    seconds: float  # login frame to session reply


@dataclass
class WorkerProc:
    proc: subprocess.Popen[bytes]
    buffer: bytes = b""
    presence: int = 0  # presence frames received so far (its last report)
    presence_ids: int = 0
    ready: bool = False
    result: dict[str, Any] | None = None

    @property
    def stdout(self) -> IO[bytes]:
        assert self.proc.stdout is not None
        return self.proc.stdout


@dataclass
class Wave:
    workers: list[WorkerProc]
    server_pid: int
    bucket: int
    logins: list[Login] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    closed_early: list[str] = field(default_factory=list)
    buckets: list[dict[str, float]] = field(default_factory=list)
    started: float = 0.0
    server_cpu_start: float = 0.0
    #: The last reading: (monotonic, machine busy, clients' CPU, other processes' CPU).
    mark: tuple[float, float, float, dict[int, float]] = (0.0, 0.0, 0.0, {})

    def clients_cpu(self) -> float:
        return sum(_cpu_or_zero(w.proc.pid) for w in self.workers)

    def set_mark(self) -> None:
        ours = {self.server_pid, os.getpid(), *(w.proc.pid for w in self.workers)}
        self.mark = (
            time.monotonic(),
            machine_busy_seconds(),
            self.clients_cpu(),
            other_processes_cpu(ours),
        )

    def handle(self, w: WorkerProc, line: str) -> None:
        kind, _, rest = line.partition(" ")
        if kind == "S":
            done, seconds, presence, ids = rest.split()
            self.logins.append(Login(float(done), float(seconds)))
            w.presence, w.presence_ids = int(presence), int(ids)
            if len(self.logins) % self.bucket == 0:
                self.close_bucket()
        elif kind == "E":
            self.errors.append(rest)
        elif kind == "C":
            self.closed_early.append(rest)
        elif kind == "READY":
            w.ready = True
        elif kind == "RESULT":
            w.result = json.loads(rest)
        elif kind != "RUNNING":
            self.errors.append(f"worker said: {line[:200]}")

    def close_bucket(self) -> None:
        """Figures of the bucket that just filled (read as it happens)."""
        n = len(self.logins)
        ordered = sorted(self.logins[n - self.bucket :], key=lambda x: x.done)
        previous_end = self.buckets[-1]["end"] if self.buckets else self.started
        previous_cpu = self.buckets[-1]["cpu"] if self.buckets else self.server_cpu_start
        end = max(x.done for x in ordered)
        cpu = cpu_seconds(self.server_pid)
        then, machine_then, clients_then, others_then = self.mark
        self.set_mark()
        now, machine, clients, others_now = self.mark
        span = max(1e-9, now - then)
        others = sum(c - others_then.get(pid, 0.0) for pid, c in others_now.items()) / span
        # The rest of the machine's busy time: the kernel, and processes that exited.
        outside = (machine - machine_then - (cpu - previous_cpu) - (clients - clients_then)) / span
        times = [x.seconds for x in ordered]
        bucket = {
            "first": n - self.bucket + 1,
            "last": n,
            "end": end,
            "rate": len(ordered) / max(1e-9, end - previous_end),
            "p50": percentile(times, 50),
            "p99": percentile(times, 99),
            "cpu": cpu,
            "cpu_per_login": (cpu - previous_cpu) / len(ordered),
            "rss": vm_rss_kib(self.server_pid),
            "presence": sum(w.presence for w in self.workers),
            "others": others,
            "kernel": max(0.0, outside - others),
        }
        self.buckets.append(bucket)
        print_bucket(bucket)

    def pump(self, deadline: float, until: str) -> None:
        """Read worker lines until every worker is ``until`` ('ready' or 'result')."""
        for _ in range(100_000_000):
            open_pipes = [w for w in self.workers if not w.stdout.closed]
            if until == "result":
                waiting = [w for w in open_pipes if w.result is None]
            elif until == "closed":
                waiting = [] if len(self.closed_early) >= len(self.logins) else open_pipes
            else:
                waiting = [w for w in open_pipes if not w.ready]
            if not waiting:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            readable, _, _ = select.select([w.stdout for w in open_pipes], [], [], min(left, 1.0))
            for w in open_pipes:
                if w.stdout not in readable:
                    continue
                chunk = os.read(w.stdout.fileno(), 65_536)
                if not chunk:
                    w.stdout.close()
                    continue
                w.buffer += chunk
                *lines, w.buffer = w.buffer.split(b"\n")
                for raw in lines:
                    self.handle(w, raw.decode(errors="replace"))


def print_bucket(b: dict[str, float]) -> None:
    print(
        f"  logins {int(b['first']):>5}-{int(b['last']):<5}  {b['rate']:6.1f}/s   "
        f"login p50 {ms(b['p50']):>9}  p99 {ms(b['p99']):>9}   "
        f"server CPU {b['cpu_per_login'] * 1000:6.1f} ms/login   RSS {b['rss']:>9,} KiB   "
        f"presence frames so far {int(b['presence']):,}   "
        f"other processes {b['others']:.2f} cores, kernel {b['kernel']:.2f}",
        flush=True,
    )
    if b["others"] > OUTSIDE_LOAD_WARNING:
        print("    WARNING: other processes competed for the CPU in this bucket", flush=True)


def spawn_workers(
    url: str, usernames: list[str], workers: int, concurrency: int, timeout: float
) -> list[WorkerProc]:
    procs = []
    for w in range(workers):
        share = usernames[w::workers]
        if not share:
            continue
        slots = concurrency // workers + (1 if w < concurrency % workers else 0)
        spec = {
            "url": url,
            "usernames": share,
            "concurrency": max(1, slots),
            "timeout": timeout,
        }
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert proc.stdin is not None
        proc.stdin.write((json.dumps(spec) + "\n").encode())
        proc.stdin.flush()
        procs.append(WorkerProc(proc))
    return procs


def stop_workers(wave: Wave) -> None:
    for w in wave.workers:
        if w.proc.poll() is None and w.proc.stdin is not None:
            try:
                w.proc.stdin.write(b"STOP\n")
                w.proc.stdin.flush()
            except BrokenPipeError:
                pass
    wave.pump(time.monotonic() + STOP_TIMEOUT + CLOSE_TIMEOUT, "result")
    for w in wave.workers:
        try:
            w.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait(timeout=10)
            wave.errors.append(f"worker {w.proc.pid} did not exit; killed")


def log_findings(log: str) -> list[str]:
    """Lines of the daemon log that look wrong: errors, warnings, tracebacks."""
    bad = []
    for line in log.splitlines():
        low = line.lower()
        if any(w in low for w in ("level=error", "level=warn", "level=critical", "traceback")):
            bad.append(line)
    return bad


def configure(config: Path, users: int) -> None:
    set_settings(
        config,
        "relay",
        {
            **RELAXED_ADDRESSES,
            "port": 0,
            "idle_timeout_seconds": 3_600.0,
            "handshake_timeout_seconds": 300.0,
            "max_connections": max(10_000, 2 * users),
        },
    )
    set_settings(config, "auth", {**RELAXED_AUTH, "access_token_minutes": 1_440.0})


def run(args: argparse.Namespace) -> int:
    users = args.users
    usernames = [f"wave{i:05d}" for i in range(users)]
    limit = raise_nofile(users + users // max(1, args.workers) + 2_048)
    if limit < users + 512:
        raise SystemExit(f"RLIMIT_NOFILE is {limit}; need at least {users + 512}")
    timeout = args.timeout
    with tempfile.TemporaryDirectory(prefix="chatd-bench-") as tmp:
        work = Path(tmp)
        data = work / "data"
        config = init_data_dir(data)
        configure(config, users)
        one, parallel = argon2_seconds(config)
        print(
            f"login wave: {users:,} users, one connection and a new device each; "
            f"{args.concurrency} logins in flight over {args.workers} client processes; "
            f"RLIMIT_NOFILE {limit}"
        )
        print(
            f"Argon2id at the configured cost, chatd's own hasher on this machine: "
            f"{ms(one)} per hash in one thread, {parallel:.0f} hashes/s in two threads at once: "
            f"a ceiling of about {parallel:.0f} logins/s with both cores doing nothing else "
            f"(a login verifies once)"
        )
        if not args.admin_api:
            made = seed_users(config, usernames, PASSWORD)
            how = "seeded with the daemon stopped (one Argon2id hash, rows inserted)"
        daemon = Daemon(config, work)
        daemon.start()
        try:
            daemon.wait_ready()
            url, _port = daemon.relay_url()
            if args.admin_api:
                made = create_users(data, usernames, PASSWORD, workers=4)
                how = "made through the admin API, 4 at a time"
            print(f"accounts: {users:,} {how} in {made:.1f} s")
            rss_start = vm_rss_kib(daemon.pid)
            print(f"daemon RSS before the wave: {rss_start:,} KiB")
            figures = drive(
                daemon.pid,
                url,
                usernames,
                args,
                timeout,
                daemon.stop if args.stop_connected else None,
            )
        except BaseException:
            daemon.kill()
            print(f"daemon log tail:\n{daemon.log_tail()}", file=sys.stderr)
            raise
        if "stopped" in figures:
            code, stop_seconds = figures["stopped"]
        else:
            code, stop_seconds = daemon.stop()
        log = daemon.log_path.read_text(errors="replace")
    report(figures, args)
    findings = log_findings(log)
    print(f"daemon log: {len(log.splitlines())} lines, {len(findings)} warning/error")
    for line in findings[:10]:
        print(f"  {line[:300]}")
    connected = " with every connection open" if args.stop_connected else ""
    print(f"SIGTERM{connected} to exit {code}: {stop_seconds * 1000:.0f} ms")
    if args.stop_connected:
        codes: dict[str, int] = {}
        for line in figures["wave"].closed_early:
            code_seen = line.split()[1] if len(line.split()) > 1 else "?"
            codes[code_seen] = codes.get(code_seen, 0) + 1
        seen = ", ".join(f"{c}: {n:,}" for c, n in sorted(codes.items())) or "none"
        print(f"close codes the clients saw at the shutdown: {seen}")
        grace = GRACE_SECONDS
        within = stop_seconds <= grace and code == 0 and not findings
        print(
            f"target: drain within the {grace:g} s grace with no error lines: "
            f"{'met' if within else 'NOT met'}"
        )
    if code != 0:
        print(f"ERROR: chatd exited with {code} after SIGTERM, expected 0")
        return 1
    return 0


def drive(
    pid: int,
    url: str,
    usernames: list[str],
    args: argparse.Namespace,
    timeout: float,
    stop: Callable[[], tuple[int, float]] | None = None,
) -> dict[str, Any]:
    procs = spawn_workers(url, usernames, args.workers, args.concurrency, timeout)
    wave = Wave(procs, pid, args.bucket)
    try:
        wave.started = time.monotonic()
        wave.server_cpu_start = cpu_seconds(pid)
        loop_start = cpu_seconds(pid, pid)
        machine_start = machine_busy_seconds()
        wave.set_mark()
        clients_start, others_start = wave.mark[2], wave.mark[3]
        print(
            f"{'':2}{'bucket':<17}{'rate':>8}   login time p50 / p99"
            f"{'':21}daemon CPU per login, RSS at the bucket's end"
        )
        wave.pump(wave.started + timeout, "ready")
        ended = time.monotonic()
        if len(wave.logins) % wave.bucket:
            partial = len(wave.logins) % wave.bucket
            saved, wave.bucket = wave.bucket, partial
            wave.close_bucket()
            wave.bucket = saved
        figures: dict[str, Any] = {
            "wave": wave,
            "span": (max(x.done for x in wave.logins) if wave.logins else ended) - wave.started,
            "server_cpu": cpu_seconds(pid) - wave.server_cpu_start,
            "server_loop_cpu": cpu_seconds(pid, pid) - loop_start,
            "machine": machine_busy_seconds() - machine_start,
            "client_cpu": wave.clients_cpu() - clients_start,
            "others": sum(
                c - others_start.get(pid, 0.0)
                for pid, c in other_processes_cpu(
                    {pid, os.getpid(), *(w.proc.pid for w in wave.workers)}
                ).items()
            ),
            "wall": ended - wave.started,
            "users": len(usernames),
            "timed_out": not all(w.ready for w in wave.workers),
        }
        time.sleep(SETTLE_SECONDS)  # the last logins' pushes; then the RSS
        figures["rss_end"] = vm_rss_kib(pid)
        if stop is not None:
            # SIGTERM with every connection still open: the drain under load.
            figures["stopped"] = stop()
            wave.pump(time.monotonic() + STOP_TIMEOUT, "closed")
    finally:
        stop_workers(wave)
    return figures


def _cpu_or_zero(pid: int) -> float:
    try:
        return cpu_seconds(pid)
    except OSError:
        return 0.0


def report(f: dict[str, Any], args: argparse.Namespace) -> None:
    wave: Wave = f["wave"]
    n = len(wave.logins)
    users = f["users"]
    span = f["span"]
    print(
        f"logged in: {n:,} of {users:,} in {span:.1f} s ({n / span if span > 0 else 0:.1f}/s)"
        + (f"; STOPPED at --timeout {args.timeout:.0f} s" if f["timed_out"] else "")
    )
    if wave.buckets:
        last = wave.buckets[-1]
        slowest = min(wave.buckets, key=lambda b: b["rate"])
        print(
            f"last bucket (logins {int(last['first'])}-{int(last['last'])}): "
            f"{last['rate']:.1f}/s; slowest bucket {int(slowest['first'])}-"
            f"{int(slowest['last'])}: {slowest['rate']:.1f}/s"
        )
        met = n == users and all(b["rate"] >= TARGET_RATE for b in wave.buckets)
        print(
            f"target: every bucket at >= {TARGET_RATE:g} logins/s to the last one: "
            f"{'met' if met else 'NOT met'}"
        )
    if wave.logins:
        times = [x.seconds for x in wave.logins]
        print(
            f"login time (login frame to session): p50 {ms(percentile(times, 50))}, "
            f"p99 {ms(percentile(times, 99))}, max {ms(max(times))}"
        )
    frames: dict[str, int] = {}
    presence_ids = 0
    for w in wave.workers:
        if w.result is None:
            wave.errors.append(f"worker {w.proc.pid} sent no result")
            continue
        for kind, count in w.result["frames"].items():
            frames[kind] = frames.get(kind, 0) + count
        presence_ids += w.result["presence_ids"]
    presence = frames.pop("presence", 0)
    print(
        f"presence frames received in all: {presence:,} ({presence / max(1, n):.1f} per "
        f"connection), carrying {presence_ids:,} user ids"
    )
    others = ", ".join(f"{k} {v:,}" for k, v in sorted(frames.items())) or "none"
    print(f"other frames received after hello: {others}")
    wall = f["wall"]
    print(
        f"daemon CPU over the wave: {f['server_cpu']:.1f} s "
        f"({f['server_cpu'] / wall * 100:.0f}% of a core; "
        f"{f['server_cpu'] / max(1, n) * 1000:.1f} ms per login), "
        f"event-loop thread {f['server_loop_cpu']:.1f} s"
    )
    others = f["others"] / wall
    kernel = max(0.0, f["machine"] - f["server_cpu"] - f["client_cpu"] - f["others"]) / wall
    print(
        f"client processes CPU: {f['client_cpu']:.1f} s over the wave; whole machine "
        f"{f['machine'] / wall:.2f} of {os.cpu_count()} cores busy, of which other processes "
        f"{others:.2f} and the kernel (loopback TCP, processes that exited) {kernel:.2f}"
    )
    if others > OUTSIDE_LOAD_WARNING:
        print("WARNING: other processes competed for the CPU during the wave; rerun when idle")
    print(f"daemon RSS at the end: {f['rss_end']:,} KiB ({f['rss_end'] / 1024:.0f} MiB)")
    closed = len(wave.closed_early)
    print(
        f"errors: {len(wave.errors)} (refused or failed logins, worker trouble), "
        f"{closed} connections closed by the server before the end"
    )
    for line in (wave.errors + wave.closed_early)[:10]:
        print(f"  {line[:300]}")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        spec = json.loads(sys.stdin.readline())
        trio.run(worker_main, spec)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=5_000, help="users, one connection each")
    parser.add_argument("--concurrency", type=int, default=12, help="logins in flight in all")
    parser.add_argument("--workers", type=int, default=2, help="client processes")
    parser.add_argument(
        "--bucket", type=int, help="logins per printed bucket (500; a tenth below 5,000 users)"
    )
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds for the whole wave (default scales)"
    )
    parser.add_argument(
        "--stop-connected",
        action="store_true",
        help="send SIGTERM while every connection is open (the drain under load)",
    )
    parser.add_argument(
        "--admin-api",
        action="store_true",
        help="make the accounts through the admin API (one Argon2 hash each; minutes)",
    )
    args = parser.parse_args()
    args.users = max(1, min(args.users, MAX_USERS))
    args.concurrency = max(1, min(args.concurrency, 256))
    args.workers = max(1, min(args.workers, 16, args.users))
    if args.bucket is None:
        args.bucket = 500 if args.users >= 5_000 else max(1, args.users // 10)
    args.bucket = max(1, min(args.bucket, args.users))
    if args.timeout is None:
        args.timeout = 300.0 + args.users * 0.5  # 2 logins/s at worst, plus margin
    args.timeout = max(10.0, min(args.timeout, 7_200.0))
    sys.exit(run(args))


if __name__ == "__main__":
    main()
