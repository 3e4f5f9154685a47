"""Push wake-ups under load: does a slow push endpoint slow the relay?

While about 1,000 wake-ups a second go to a receiver that answers each one
after 1 s, the relay's p99 send->deliver latency for live messages must stay
within 1.5x of the same run without push.

Each run starts the real daemon (``chatd init`` + ``chatd serve`` with
NOTIFY_SOCKET, bench/_daemon.py) on one data dir, seeded before the first
start with --devices offline devices (10 per user, with identity-key
columns set so they are current devices) and a push endpoint each, on an
allowlisted loopback receiver (``[push] allowed_networks =
["127.0.0.1/32"]``). The receiver is its own process (a bare epoll loop): it
answers every POST with 201 after --answer-after seconds (default 1.0), and
counts them.

The two kinds of run differ only in ``push.enabled``, and are interleaved
(off, on, off, on ... for --rounds): in both, a *loader* client sends
``send`` frames of 200 envelopes (20 users x 10 devices) at --rate/200
frames a second, round robin over the --devices offline devices (default
2,000 devices, 1,000 envelopes a second: each device gets one every 2 s).
With push on (``push.interval_seconds = 1``, ``push.concurrency`` raised to
--concurrency so that 1,000 one-second POSTs fit) each envelope makes a
wake-up: --rate wake-ups a second. (With as many devices as envelopes a
second, a device's next envelope comes while its 1 s POST is in flight and
is coalesced into one more wake-up after the answer, so a device cannot be
woken more than once per 1 s + the sender's delay: that design offered
fewer than --rate wake-ups a second by construction.) Meanwhile
a live pair (alice -> bob, window 1, bob acks each delivery) measures
send->deliver latency for --seconds after a 2 s warm-up. Figures per run
and the medians are printed; the target is p99(on) <= 1.5 x p99(off).

CPU use over the measuring window (daemon, its sender child, receiver,
load clients) is printed per run, in cores.

Usage: ``.venv/bin/python bench/push.py [--devices 2000] [--rate 1000] [--receiver-idle]
[--seconds 15] [--rounds 1]``. ``--quick`` is a smoke run (400 devices,
200 envelopes/s, 4 s).
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, deque
from functools import partial
from pathlib import Path
from typing import Any

import trio
import vodozemac
from trio_websocket import open_websocket_url

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _daemon import (  # noqa: E402 - after the path tweak
    RELAXED_AUTH,
    RELAXED_RELAY,
    Daemon,
    init_data_dir,
    ms,
    percentile,
    raise_nofile,
    seed_users,
    set_settings,
)
from relay import PASSWORD, keys_upload, login, reply_to  # noqa: E402

PER_USER = 10  # devices per seeded user
PER_SEND = 200  # envelopes per load frame (the protocol's maximum)
WARMUP = 2.0  # seconds of load before latencies count
ANSWER = b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n"


# -- the slow receiver (its own process) -------------------------------------------------------


def receiver_main(stats_path: Path, answer_after: float, nice: int, idle: bool = False) -> None:
    # The receiver stands in for a distributor on another machine: by
    # default (--receiver-nice 19) it takes the CPU the daemon and the load
    # clients leave, not theirs.
    os.nice(nice)
    if idle:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    # A bare epoll loop, no Trio and no HTTP library: it shares the machine's
    # cores with the relay under test, so every microsecond it spends per
    # POST is taken from what is measured (Trio with a bare reader: about
    # 110-150 us a POST; h11 on Trio: about 250 us; this loop: see the
    # "receiver CPU" line of bench/push_sender.py). It reads a header
    # block and a Content-Length body, and answers each POST with 201 after
    # answer_after seconds (one delay for all, so the answers owed fall due
    # in the order they were asked for: a FIFO, not a heap).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    poll = select.epoll()
    poll.register(listener.fileno(), select.EPOLLIN)
    conns: dict[int, tuple[socket.socket, bytearray]] = {}
    owed: deque[tuple[float, socket.socket]] = deque()  # (when, connection)
    count = most_open = 0

    def write_stats() -> None:
        tmp = stats_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"port": port, "requests": count, "most_open": most_open}))
        tmp.replace(stats_path)

    def close(fd: int) -> None:
        sock, _ = conns.pop(fd)
        poll.unregister(fd)
        sock.close()

    write_stats()
    next_stats = time.monotonic() + 0.25
    while True:
        now = time.monotonic()
        wake = min(owed[0][0], next_stats) if owed else next_stats
        for fd, _events in poll.poll(max(0.0, wake - now)):
            if fd == listener.fileno():
                while True:
                    try:
                        sock, _ = listener.accept()
                    except BlockingIOError:
                        break
                    sock.setblocking(False)
                    conns[sock.fileno()] = (sock, bytearray())
                    poll.register(sock.fileno(), select.EPOLLIN)
                most_open = max(most_open, len(conns))
                continue
            sock, buffer = conns[fd]
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                close(fd)
                continue
            buffer += data
            while (end := buffer.find(b"\r\n\r\n")) >= 0:
                head = bytes(buffer[:end]).lower()
                at = head.find(b"\r\ncontent-length:")
                length = int(head[at + 17 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
                if len(buffer) < end + 4 + length:
                    break
                del buffer[: end + 4 + length]
                count += 1
                owed.append((now + answer_after, sock))
        now = time.monotonic()
        while owed and owed[0][0] <= now:
            _, sock = owed.popleft()
            if sock.fileno() >= 0:  # not closed meanwhile
                try:
                    sock.send(ANSWER)
                except OSError:
                    close(sock.fileno())
        if now >= next_stats:
            write_stats()
            next_stats = now + 0.25


def read_stats(path: Path) -> dict[str, int]:
    for _ in range(100):
        try:
            return json.loads(path.read_text())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            time.sleep(0.05)
    raise SystemExit(f"no receiver stats in {path}")


# -- CPU accounting ------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(pid: int, tid: int) -> float:
    """User + system CPU of one thread (the daemon's event loop is its main thread)."""
    try:
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


def thread_names_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of the daemon's other threads, by thread name ("t:chatd" is
    the store writer; Python does not name its threads in the kernel)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
        except OSError:
            continue
        if int(task.name) == pid:
            continue
        key = "t:" + name
        out[key] = out.get(key, 0.0) + thread_cpu_seconds(pid, int(task.name))
    return out


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out += [int(c) for c in task.read_text().split()]
        except OSError:
            pass
    return out


def cpu_probe(daemon_pid: int, receiver_pid: int, stats_path: Path) -> dict[str, float]:
    """CPU seconds so far of the daemon, its sender child, the receiver and
    this process (the load clients); the POSTs the receiver got."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "requests": read_stats(stats_path)["requests"],
        "daemon": cpu_seconds(daemon_pid),
        "daemon loop": thread_cpu_seconds(daemon_pid, daemon_pid),
        **thread_names_cpu(daemon_pid),
        "sender": sum(cpu_seconds(c) for c in children(daemon_pid)),
        "receiver": cpu_seconds(receiver_pid),
        "load clients": me.ru_utime + me.ru_stime,
    }


# -- seeding -------------------------------------------------------------------------------


def device_id(n: int) -> str:
    return "PB" + base64.b32encode(n.to_bytes(5, "big")).decode()


def seed_devices(config: Path, users: list[str], port: int) -> dict[int, list[str]]:
    """Offline devices with keys and a push endpoint each, written with the
    daemon stopped (as bench/_daemon.py seed_users writes accounts)."""
    from chatd.config import load_config
    from chatd.keyfiles import load_db_key
    from chatd.store import now_ms
    from chatd.store.db import close_quietly, open_writer

    settings = load_config(config)
    conn = open_writer(settings.database_path, load_db_key(settings), busy_timeout_ms=5000)
    now = now_ms()
    out: dict[int, list[str]] = {}
    try:
        conn.execute("BEGIN IMMEDIATE")
        ids = dict(
            conn.execute(
                f"SELECT username, id FROM users WHERE username IN ({','.join('?' * len(users))})",  # noqa: S608
                users,
            ).fetchall()
        )
        n = 0
        for name in users:
            user_id = ids[name]
            for _ in range(PER_USER):
                device = device_id(n)
                n += 1
                out.setdefault(user_id, []).append(device)
                conn.execute(
                    "INSERT INTO devices (id, user_id, name, ed25519, curve25519, signature,"
                    " created_at, last_seen_at) VALUES (?, ?, 'sink', 'k', 'k', 's', ?, ?)",
                    (device, user_id, now, now),
                )
                conn.execute(
                    "INSERT INTO push_endpoints (device_id, url, created_at) VALUES (?, ?, ?)",
                    (device, f"http://127.0.0.1:{port}/up/{device}?up=1", now),
                )
        conn.execute("COMMIT")
    finally:
        close_quietly(conn)
    return out


# -- one run -----------------------------------------------------------------------------------


async def connect_device(
    url: str, username: str, stack: Any, *, keys: bool
) -> tuple[Any, dict[str, Any]]:
    ws = await stack.enter_async_context(open_websocket_url(url, max_message_size=1 << 22))
    session = await login(ws, username, "bench")
    if keys:
        frame = keys_upload(session["user"]["id"], session["device_id"], vodozemac.Account())
        await ws.send_message(json.dumps(frame))
        await reply_to(ws, "keys")
    return ws, session


async def run_once(
    url: str,
    names: tuple[str, str, str],
    sinks: dict[int, list[str]],
    seconds: float,
    rate: int,
    probe: Any,
) -> dict[str, Any]:
    from contextlib import AsyncExitStack

    latencies: list[float] = []
    loader_sent = loader_errors = 0
    cpu: dict[str, Any] = {}
    async with AsyncExitStack() as stack:
        alice, _ = await connect_device(url, names[0], stack, keys=True)
        bob, bob_session = await connect_device(url, names[1], stack, keys=True)
        loader, _ = await connect_device(url, names[2], stack, keys=False)
        bob_ref = {"user_id": bob_session["user"]["id"], "device_id": bob_session["device_id"]}
        users = list(sinks.items())
        groups = [
            users[i : i + PER_SEND // PER_USER] for i in range(0, len(users), PER_SEND // PER_USER)
        ]
        interval = PER_SEND / rate
        measuring = False
        done = trio.Event()
        delivered = trio.Event()
        sent_at: dict[str, float] = {}

        async def load() -> None:
            n = 0
            next_at = trio.current_time()
            while not done.is_set():
                group = groups[n % len(groups)]
                envelopes = [
                    {"user_id": u, "device_id": d, "ciphertext": "x" * 64}
                    for u, devices in group
                    for d in devices
                ]
                frame = {
                    "type": "send",
                    "id": f"l{n}",
                    "message_id": str(uuid.uuid4()),
                    "envelopes": envelopes,
                }
                await loader.send_message(json.dumps(frame))
                n += 1
                next_at += interval
                await trio.sleep_until(next_at)

        async def loader_replies() -> None:
            nonlocal loader_sent, loader_errors
            while True:
                reply = json.loads(await loader.get_message())
                if reply.get("type") == "sent":
                    loader_sent += 1
                elif reply.get("id", "").startswith("l"):
                    loader_errors += 1

        async def bob_reads() -> None:
            nonlocal delivered
            while True:
                frame = json.loads(await bob.get_message())
                if frame.get("type") != "deliver":
                    continue
                now = time.perf_counter()
                for e in frame["envelopes"]:
                    started = sent_at.pop(e["message_id"], None)
                    if started is not None and measuring:
                        latencies.append(now - started)
                await bob.send_message(
                    json.dumps({"type": "ack", "up_to": frame["envelopes"][-1]["envelope_id"]})
                )
                delivered.set()

        async def alice_replies() -> None:
            while True:
                await alice.get_message()  # sent, receipts: drained

        async with trio.open_nursery() as nursery:
            nursery.start_soon(loader_replies)
            nursery.start_soon(bob_reads)
            nursery.start_soon(alice_replies)
            nursery.start_soon(load)
            started = trio.current_time()
            n = 0
            while trio.current_time() - started < WARMUP + seconds:
                if not measuring and trio.current_time() - started >= WARMUP:
                    measuring = True
                    cpu["before"], cpu["t0"] = probe(), time.monotonic()
                message_id = str(uuid.uuid4())
                delivered = trio.Event()
                sent_at[message_id] = time.perf_counter()
                await alice.send_message(
                    json.dumps(
                        {
                            "type": "send",
                            "id": f"a{n}",
                            "message_id": message_id,
                            "envelopes": [{**bob_ref, "ciphertext": "y" * 64}],
                        }
                    )
                )
                n += 1
                with trio.fail_after(30):
                    await delivered.wait()
            after, window = probe(), time.monotonic() - cpu["t0"]
            done.set()
            nursery.cancel_scope.cancel()
    cores = {k: (after[k] - cpu["before"][k]) / window for k in after}
    wakeups_per_s = cores.pop("requests")
    return {
        "latencies": latencies,
        "loader_sent": loader_sent,
        "loader_errors": loader_errors,
        "cores": cores,
        "wakeups_per_s": wakeups_per_s,
        "window": (cpu["t0"], cpu["t0"] + window),
    }


def one_run(
    config: Path,
    work: Path,
    push_on: bool,
    names: tuple[str, str, str],
    sinks: dict[int, list[str]],
    seconds: float,
    stats_path: Path,
    receiver_pid: int,
    rate: int,
    lag: bool = False,
) -> dict[str, Any]:
    set_settings(config, "push", {"enabled": push_on})
    lag_log = work / "lag.log" if lag else None
    if lag_log is not None:
        lag_log.unlink(missing_ok=True)
    daemon = Daemon(config, work, lag_log=lag_log)
    daemon.start()
    try:
        daemon.wait_ready()
        url, _port = daemon.relay_url()
        t0 = time.monotonic()
        probe = partial(cpu_probe, daemon.pid, receiver_pid, stats_path)
        result = trio.run(run_once, url, names, sinks, seconds, rate, probe)
        elapsed = time.monotonic() - t0
    finally:
        daemon.stop()
    result["elapsed"] = elapsed
    result["push"] = push_on
    if lag_log is not None:
        result["loop"] = loop_figures(lag_log, *result["window"])
    return result


def loop_figures(lag_log: Path, start: float, end: float) -> str:
    """The daemon's event loop over the measuring window, from bench/_lagmon.py:
    how often and how long the loop was late, took a long step, or paused for
    the garbage collector; and the tasks of the long steps."""
    lags, steps, pauses, tasks = [], [], [], Counter[str]()
    for line in lag_log.read_text().splitlines():
        parts = line.split(" ", 6)
        if len(parts) < 7 or not start <= float(parts[0]) < end:
            continue
        lag, step, gc_pause = float(parts[1]), float(parts[2]), float(parts[5])
        lags.append(lag)
        steps.append(step)
        pauses.append(gc_pause)
        if step > 0.002:
            tasks[parts[6].strip()] += 1
    if not lags:
        return "no lag samples"
    longest = ", ".join(f"{name} x{n}" for name, n in tasks.most_common(4))
    return (
        f"loop lag p99 {ms(percentile(lags, 99))} max {ms(max(lags))}; "
        f"steps > 2 ms in {sum(s > 0.002 for s in steps)} of {len(steps)} samples, "
        f"longest {ms(max(steps))}; GC pauses > 1 ms in {sum(p > 0.001 for p in pauses)},"
        f" longest {ms(max(pauses))}; long steps by task: {longest or '-'}"
    )


def report(label: str, r: dict[str, Any], seconds: float) -> None:
    lat = r["latencies"]
    print(
        f"  {label:<9} live messages {len(lat):>6}  p50 {ms(percentile(lat, 50)):>9}"
        f"  p99 {ms(percentile(lat, 99)):>9}  max {ms(max(lat)):>9}"
        f"  | load frames sent {r['loader_sent']} ({r['loader_errors']} refused)"
        f"  | wake-ups received {r['wakeups_per_s']:.0f}/s"
    )
    cores = r["cores"]
    line = ", ".join(f"{k} {v:.2f}" for k, v in cores.items())
    # "daemon loop" and the "t:" threads are parts of "daemon".
    total = sum(v for k, v in cores.items() if k != "daemon loop" and not k.startswith("t:"))
    print(f"  {'':<9} CPU in cores over the window: {line}; total {total:.2f}")
    if "loop" in r:
        print(f"  {'':<9} {r['loop']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--rate", type=int, default=1000, help="envelopes a second to them")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--answer-after", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=1536)
    parser.add_argument("--receiver-nice", type=int, default=19)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--receiver-idle",
        action="store_true",
        help="run the receiver SCHED_IDLE: like a distributor on another machine, it takes "
        "only CPU nothing else wants",
    )
    parser.add_argument(
        "--lag",
        action="store_true",
        help="run the daemon under bench/_lagmon.py and print its event loop's lag, long "
        "steps and GC pauses per run (costs both kinds of run alike)",
    )
    parser.add_argument("--receiver", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receiver is not None:
        receiver_main(args.receiver, args.answer_after, args.receiver_nice, args.receiver_idle)
        return
    if args.quick:
        args.devices, args.rate, args.seconds = 400, 200, 4.0
    raise_nofile(65_536)
    devices = max(PER_SEND, args.devices // PER_SEND * PER_SEND)
    rate = max(PER_SEND, args.rate // PER_SEND * PER_SEND)
    with tempfile.TemporaryDirectory(prefix="chatd-push-bench-") as tmp:
        work = Path(tmp)
        data = work / "data"
        data.mkdir(mode=0o700)
        stats_path = work / "receiver.json"
        command = [
            sys.executable,
            __file__,
            "--receiver",
            str(stats_path),
            "--answer-after",
            str(args.answer_after),
            "--receiver-nice",
            str(args.receiver_nice),
            *(["--receiver-idle"] if args.receiver_idle else []),
        ]
        rx = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        try:
            port = read_stats(stats_path)["port"]
            config = init_data_dir(data)
            set_settings(config, "auth", RELAXED_AUTH)
            # A free port for the blob listener: the default may be taken by
            # another daemon on the machine.
            set_settings(config, "attachments", {"port": 0})
            # The loader sends 1,000 envelopes a second from one account: the
            # per-account send rate (relay.send_rate_per_user) out of the way.
            set_settings(config, "relay", {"idle_timeout_seconds": 600.0, **RELAXED_RELAY})
            set_settings(
                config,
                "push",
                {
                    "interval_seconds": 1.0,
                    "concurrency": args.concurrency,
                    "timeout_seconds": 10.0,
                },
            )
            # set_settings writes scalars only: the allowlist by hand.
            text = config.read_text()
            assert "\nallowed_networks = []\n" in text
            config.write_text(
                text.replace("\nallowed_networks = []\n", '\nallowed_networks = ["127.0.0.1/32"]\n')
            )
            sink_users = [f"sink{i}" for i in range(devices // PER_USER)]
            rounds = [(r, on) for r in range(args.rounds) for on in (False, True)]
            live = [
                (f"alice{r}{int(on)}", f"bob{r}{int(on)}", f"loader{r}{int(on)}")
                for r, on in rounds
            ]
            seed_users(config, sink_users + [n for trio_ in live for n in trio_], PASSWORD)
            sinks = seed_devices(config, sink_users, port)
            print(
                f"push bench: {devices} offline devices with endpoints, load {rate} envelopes/s"
                f" to them ({rate // PER_SEND} send frames/s), receiver answers after"
                f" {args.answer_after:.1f} s; push.interval_seconds 1, push.concurrency"
                f" {args.concurrency}; live pair window 1, {args.seconds:.0f} s after"
                f" {WARMUP:.0f} s warm-up; receiver niceness {args.receiver_nice};"
                f" os.cpu_count() {os.cpu_count()}"
            )
            results: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
            for (r, on), names in zip(rounds, live, strict=True):
                res = one_run(
                    config,
                    work,
                    on,
                    names,
                    sinks,
                    args.seconds,
                    stats_path,
                    rx.pid,
                    rate,
                    lag=args.lag,
                )
                results[on].append(res)
                report(f"r{r} {'push on' if on else 'push off'}", res, args.seconds)
            off = sorted(percentile(x["latencies"], 99) for x in results[False])
            on_ = sorted(percentile(x["latencies"], 99) for x in results[True])
            p99_off, p99_on = off[len(off) // 2], on_[len(on_) // 2]
            wake = sorted(x["wakeups_per_s"] for x in results[True])[len(on_) // 2]
            ratio = p99_on / p99_off if p99_off > 0 else math.inf
            verdict = "ok" if ratio <= 1.5 else "OVER TARGET"
            print(
                f"median p99 live latency: push off {ms(p99_off)}, push on {ms(p99_on)}"
                f" ({wake:.0f} wake-ups/s): ratio {ratio:.2f}x (target <= 1.5x: {verdict})"
            )
        finally:
            rx.send_signal(signal.SIGTERM)
            rx.wait(timeout=10)


if __name__ == "__main__":
    main()
