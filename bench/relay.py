"""Message relay: chatd's server CPU per message and latency, against a bare relay.

Every run starts the real daemon (``chatd init`` into a temp dir, then
``chatd serve`` with NOTIFY_SOCKET, as systemd would) with ``relay.port = 0``,
``auth.require_mfa = "none"``, the login rate limits raised out of the way
(``login_rate_per_ip`` and ``login_rate_per_account`` 100000/min,
``rate_burst`` 10000), the per-account request rates (``relay.send_*``,
``relay.keys_claim_*``, ``relay.directory_*``) raised out of the way too
(``RELAXED_RELAY``), and a 10-minute ``relay.idle_timeout_seconds`` (so
clients waiting for the others' setup are not closed), or the bare relay
below. The data dir is in the system temp dir, which must not be tmpfs for
the durable figures to mean anything (the filesystem type is printed).
Everything goes through the documented client protocol (docs/PROTOCOL.md), so
the script measures any server that speaks it.

The script runs the SECTIONs named on its command line: ``targets`` (the
default), ``count``, ``duration``, ``idle``. ``--quick`` alone runs all four,
small and short, as a smoke test.

**Clients.** Accounts are made through the admin API (``POST /v1/users`` over
the admin unix socket), two per pair. Each client connects, logs in (one new
device per account), and publishes signed device keys, five one-time keys and
a fallback key made with vodozemac. Then every client sends to its partner's
one device: ``send`` frames with a 64-character opaque ciphertext (random
base64; nothing is encrypted), keeping a window of messages that have no
``sent`` reply yet. A receiver answers every ``deliver`` frame with ``ack
up_to`` its last envelope id (no ``id``, so no reply), which also covers the
``delivered`` receipts the server queues for the senders (one per message).

**Baseline.** The same client code, window and frames against a bare
trio-websocket relay written below (``--bare-server``, run as its own
process like the daemon): no auth (``login`` just names the connection), no
keys, no persistence, no receipts. It answers a ``send`` by queuing a
``deliver`` for the partner connection and a ``sent`` for the sender, each
connection with its own sender task and a bounded queue, like chatd.

**Server CPU.** The figure to steer by: on 2 cores the Python clients take
about half the machine, so message rates say as much about the clients as
about the server. The server's CPU is utime + stime of all its threads, from
/proc/PID/stat, over the measured window (10 ms ticks), divided by the
messages delivered in that window. For chatd it pays for the whole protocol
cycle: send, durable commit, deliver, the ack that deletes, the
``delivered`` receipt and its ack. The CPU of the clients (this process), of
other processes and of the whole machine is printed beside it, with a
warning when other processes competed (on 2 cores, rerun then).

**targets** (default): the issue's figures, each as fixed counts (below),
chatd and bare interleaved (chatd, bare, chatd, bare, ... for --rounds,
default 2), each run in a fresh server process, every round printed and then
the medians:

* Target 1: server CPU per delivered message at 5 pairs (10 clients) x
  --messages (default 5,000) messages per client, window 16, for chatd and
  the bare relay, and the ratio chatd/bare of the medians (target <= 0.75x,
  stretch 0.4x).
* Target 2: send->deliver latency p50 and p99, and send->sent p50, at 1 pair
  (2 clients) x --latency-messages (default 2,000) each, window 1 (each
  client waits for ``sent`` before its next ``send``). Target: chatd p50 <=
  1 ms while ``sent`` still comes only after a durable commit. A p50 is taken
  per run; the median of the rounds' p50s is printed.

**Fixed counts** (targets and ``count``): each client first sends
--warmup-messages (default 200), unmeasured, and the script waits until
every one is delivered (and, on chatd, its receipt back). Then the measured
phase: every client sends --messages through its window; it ends when every
message is answered with ``sent``, delivered, and (chatd) receipted, plus
0.3 s for the last acks to be handled (the window's CPU includes those; an
idle server spends nothing measurable in 0.3 s). msg/s counts from the first
measured send to the last delivery. A phase that does not finish within 60 s
plus 5 ms a message fails the run. ``count`` runs this for each --pairs
(default 5) at --window (default 16), --rounds times.

**duration** (the older timed mode; also what runs when --duration, --warmup
or --pairs is given without a SECTION): for each pair count (default 5 and
100 pairs, i.e. 10 and 200 clients), chatd then bare, window 16. After
--warmup seconds (default 2) the --duration window (default 10 s) is
measured, then senders stop and the script waits (at most 30 s) for every
accepted message to be delivered; a message that never arrives is reported
as lost. Figures per run: messages/s counted when the sender gets ``sent``
(durably queued) and, separately, end to end when the partner gets it in a
``deliver``; p50/p99/max latency from writing the ``send`` frame to reading
the ``deliver`` (and to reading ``sent``); receipts/s; CPU of the server,
the clients, other processes and the whole machine over the window; the
ratios chatd/bare.

**Store-writer timings.** In the duration section (and in every chatd run
with --writer-stats; never with --no-writer-stats) the daemon runs under this
script's ``--writer-stats-child`` mode, which calls ``chatd.cli.run`` exactly
as the ``chatd`` script does but times the store's writer thread (each write
job, each batch with its COMMIT), so the run also prints how busy that thread
was, commits/s, jobs per commit and the mean time of each kind of job. It
patches ``chatd.store.store.Store``; if that class or its methods are gone,
chatd runs unpatched and those figures are skipped with a note. The fixed
counts run plain chatd by default, since the timing costs server CPU.

**idle**: idle authenticated connections. A fresh daemon with ``relay``'s
idle and handshake timeouts at one hour, day-long access tokens (so a slow
login wave loses no connection to token expiry),
``devices.max_devices_per_user`` 1000 and RLIMIT_NOFILE raised (the daemon
inherits it). Accounts are seeded with the daemon stopped (``seed_users`` in
``bench/_daemon.py``: one Argon2id hash by chatd's own hasher, rows inserted
through chatd's own store code; each login still verifies a real Argon2id
hash). 20 warm-up connections log in (8 at a time) and close; then each
--idle-connections count (default 1000; several may be given, each in a
fresh daemon) logs in, 8 at a time, each a new device, and sits idle
reading (and counting) whatever is pushed (key_count, presence). With
--idle-users N (default 10) they log in round robin over N accounts; with
--idle-users 0 every connection is a different account and device (the
warm-up has accounts of its own), as in a real team: that is how Target 3 is
measured. VmRSS of the daemon is read after the warm-up, once half are
logged in and once all are (after a settle pause each). The figure per
connection is the growth over the second half divided by its size: memory
the first logins left in the allocator (Argon2 buffers, SQLite's page cache)
is reused by later connections and would otherwise flatter or blur a figure
taken from the start. The total RSS at the end is printed too, and with
--idle-users 0 the Target 3 verdicts (at most 16 KiB per connection at
5,000; at most 300 MB of daemon RSS at 10,000).

With --idle-mmap (and with the old --no-relay, which runs only this section)
each count runs again with ``MALLOC_MMAP_THRESHOLD_=1048576`` in the daemon's
environment for comparison. Each login runs Argon2id with a 19 MiB buffer in
a worker thread. glibc's dynamic mmap threshold rises to that size after the
first free, so later buffers come from the threads' malloc arenas and, once
freed, were mostly kept: the daemon's RSS grew by about 100 KiB per login,
which swamped the per-connection cost. chatd now caps malloc at one arena and
calls ``malloc_trim(0)`` after each hash (``chatd/memory.py``); a fixed mmap
threshold instead makes every buffer an mmap returned on free, at the cost of
slower logins (the login time is printed for both).

Each loop is bounded in count and time; everything is on loopback. Finally
each daemon gets SIGTERM and must exit 0; warning and error lines in its log
are shown.

    .venv/bin/python bench/relay.py                   # Target 1 and 2, a few minutes
    .venv/bin/python bench/relay.py targets --rounds 3 --messages 5000
    .venv/bin/python bench/relay.py count --pairs 5 100 --messages 2000 --window 16
    .venv/bin/python bench/relay.py duration --pairs 5 100 --duration 10
    .venv/bin/python bench/relay.py idle --idle-connections 5000 10000 --idle-users 0
    .venv/bin/python bench/relay.py --quick           # every section, small
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Final

import msgspec
import trio
import vodozemac
from _daemon import (
    RELAXED_ADDRESSES,
    RELAXED_AUTH,
    RELAXED_RELAY,
    Daemon,
    cpu_seconds,
    create_users,
    describe_process,
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
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    open_websocket_url,
    serve_websocket,
)

PASSWORD: Final = "plum orbit kettle sunrise"  # noqa: S105 - bench accounts
WINDOW: Final = 16  # messages per client without a `sent` reply yet
BODY_CHARS: Final = 64  # characters of each opaque ciphertext
SETUP_CONCURRENCY: Final = 8  # clients connecting and logging in at once
CONNECT_TIMEOUT: Final = 60.0  # seconds for one client's connect + login + keys
SETUP_ALL_TIMEOUT: Final = 300.0  # seconds for every client to be set up
DRAIN_TIMEOUT: Final = 30.0  # seconds after the window for accepted messages to arrive
CLOSE_TIMEOUT: Final = 5.0  # seconds for a closing handshake
SETTLE_SECONDS: Final = 1.0  # pause before reading RSS
IDLE_WARMUP: Final = 20  # warm-up logins before the RSS baseline
IDLE_LOGIN_TIMEOUT: Final = 300.0  # seconds for one idle login (a login storm is slow)
IDLE_PROGRESS: Final = 1_000  # idle logins between progress lines (from 2,000 connections)
BARE_QUEUE: Final = 256  # frames queued per bare-relay connection (chatd's default)
BARE_LIFETIME: Final = 3_600.0  # the bare relay exits by itself after this long
OUTSIDE_LOAD_WARNING: Final = 0.2  # cores used by other processes that taint a run
COMPLETE_POLL: Final = 0.005  # seconds between checks that a fixed-count phase is done
COUNT_SETTLE: Final = 0.3  # seconds after a fixed-count phase for its last acks

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


# -- small helpers ----------------------------------------------------------------------------


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}x" if b > 0 else "n/a"


def _fs_type(path: Path) -> str:
    """The filesystem type holding ``path`` (longest mount point in /proc/mounts)."""
    best, kind = "", "?"
    target = str(path.resolve())
    with open("/proc/mounts") as fh:
        for line in fh:
            parts = line.split()
            mount = parts[1]
            inside = target == mount or target.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) > len(best):
                best, kind = mount, parts[2]
    return kind


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _sign(account: vodozemac.Account, obj: dict[str, Any]) -> str:
    return str(account.sign(_canonical(obj)).to_base64())


def keys_upload(
    user_id: int, device_id: str, account: vodozemac.Account | None = None
) -> dict[str, Any]:
    """A ``keys_upload`` frame for a vodozemac account (a new one unless given):
    identity, 5 one-time keys, a fallback key."""
    account = account or vodozemac.Account()
    ed = account.ed25519_key.to_base64()
    curve = account.curve25519_key.to_base64()
    identity = {"curve25519": curve, "device_id": device_id, "ed25519": ed, "user_id": user_id}
    account.generate_one_time_keys(5)
    one_time = []
    for key_id, key in account.one_time_keys.items():
        obj = {"curve25519": key.to_base64(), "device_id": device_id, "key_id": key_id}
        one_time.append(
            {"key_id": key_id, "curve25519": key.to_base64(), "signature": _sign(account, obj)}
        )
    account.mark_keys_as_published()
    account.generate_fallback_key()
    [(fb_id, fb_key)] = account.fallback_key.items()
    fb = {
        "curve25519": fb_key.to_base64(),
        "device_id": device_id,
        "fallback": True,
        "key_id": fb_id,
    }
    return {
        "type": "keys_upload",
        "id": "keys",
        "device_keys": {"ed25519": ed, "curve25519": curve, "signature": _sign(account, identity)},
        "one_time_keys": one_time,
        "fallback_key": {
            "key_id": fb_id,
            "curve25519": fb_key.to_base64(),
            "signature": _sign(account, fb),
        },
    }


async def reply_to(ws: WebSocketConnection, request_id: str) -> dict[str, Any]:
    """Read frames until the one answering ``request_id`` (pushes in between are skipped)."""
    for _ in range(100_000):
        frame: dict[str, Any] = _decode(await ws.get_message())
        if frame.get("id") == request_id:
            return frame
    raise RuntimeError(f"no reply to {request_id} in 100000 frames")


async def login(ws: WebSocketConnection, username: str, device_name: str) -> dict[str, Any]:
    """hello, then login; the session frame."""
    hello = _decode(await ws.get_message())
    if hello.get("type") != "hello":
        raise RuntimeError(f"first frame is not hello: {hello!r}")
    frame = {
        "type": "login",
        "id": "login",
        "username": username,
        "password": PASSWORD,
        "device_name": device_name,
    }
    await ws.send_message(_encode(frame).decode())
    session = await reply_to(ws, "login")
    if session.get("type") != "session":
        raise RuntimeError(f"login as {username} refused: {session!r}")
    return session


# -- the relay clients (same code for chatd and the bare relay) -------------------------------


@dataclass(eq=False)
class Endpoint:
    index: int
    ws: WebSocketConnection
    user_id: int
    device_id: str
    window: trio.Semaphore  # sends without a reply allowed (Run.window)
    partner: Endpoint | None = None
    outstanding: int = 0  # sends without a reply


@dataclass
class Run:
    """One relay run: N clients in pairs, all in this process."""

    kind: str  # "chatd" or "bare"
    url: str
    clients: int
    window: int = WINDOW  # sends per client without a `sent` reply yet
    #: Fixed-count runs: messages per client in each phase (warm-up, measured),
    #: each phase started by its event. Empty: the run is timed (stop_at).
    phases: list[int] = field(default_factory=list)
    phase_go: list[trio.Event] = field(default_factory=list)
    endpoints: dict[int, Endpoint] = field(default_factory=dict)
    slots: trio.Semaphore = field(default_factory=lambda: trio.Semaphore(SETUP_CONCURRENCY))
    ready: int = 0
    all_ready: trio.Event = field(default_factory=trio.Event)
    start: trio.Event = field(default_factory=trio.Event)
    finished: trio.Event = field(default_factory=trio.Event)
    stop_at: float = math.inf  # trio time at which senders stop
    send_at: dict[str, float] = field(default_factory=dict)  # message id -> send written
    sent_at: dict[str, float] = field(default_factory=dict)  # -> `sent` read
    deliver_at: dict[str, float] = field(default_factory=dict)  # -> `deliver` read
    receipts: list[float] = field(default_factory=list)
    receipt_at: dict[str, float] = field(default_factory=dict)  # message id -> `delivered` read
    duplicates: int = 0
    unknown: int = 0
    refused: list[str] = field(default_factory=list)  # error / device_mismatch replies
    failures: list[str] = field(default_factory=list)  # setup failures, disconnects
    other_frames: dict[str, int] = field(default_factory=dict)
    setup_seconds: float = 0.0

    def body(self) -> str:
        return base64.b64encode(os.urandom(BODY_CHARS * 3 // 4)).decode()


async def setup_client(run: Run, ws: WebSocketConnection, index: int) -> Endpoint:
    name = f"u{index:04d}"
    session = await login(ws, name, f"bench {index}")
    user_id = int(session["user"]["id"])
    device_id = str(session["device_id"])
    if run.kind == "chatd":
        await ws.send_message(_encode(keys_upload(user_id, device_id)).decode())
        count = await reply_to(ws, "keys")
        if count.get("type") != "key_count":
            raise RuntimeError(f"keys_upload refused: {count!r}")
    return Endpoint(index, ws, user_id, device_id, trio.Semaphore(run.window))


async def send_one(run: Run, ep: Endpoint) -> None:
    """Write one ``send`` to the partner's device (the caller holds a window slot)."""
    partner = ep.partner
    assert partner is not None
    message_id = str(uuid.uuid4())
    frame = {
        "type": "send",
        "id": message_id,
        "message_id": message_id,
        "envelopes": [
            {
                "user_id": partner.user_id,
                "device_id": partner.device_id,
                "ciphertext": run.body(),
            }
        ],
    }
    data = _encode(frame).decode()
    ep.outstanding += 1
    run.send_at[message_id] = trio.current_time()
    await ep.ws.send_message(data)


async def sender(run: Run, ep: Endpoint) -> None:
    """Timed runs: keep the window full until ``run.stop_at``."""
    for _ in range(10_000_000):
        acquired = False
        with trio.move_on_at(run.stop_at):
            await ep.window.acquire()
            acquired = True
        if trio.current_time() >= run.stop_at:
            if acquired:
                ep.window.release()
            return
        await send_one(run, ep)


async def count_sender(run: Run, ep: Endpoint) -> None:
    """Fixed-count runs: each phase, once started, sends its count through the window."""
    for count, go in zip(run.phases, run.phase_go, strict=True):
        await go.wait()
        for _ in range(count):
            await ep.window.acquire()
            await send_one(run, ep)


async def reader(run: Run, ep: Endpoint) -> None:
    for _ in range(100_000_000):
        try:
            raw = await ep.ws.get_message()
        except ConnectionClosed as exc:
            if not run.finished.is_set():
                reason = exc.reason
                run.failures.append(
                    f"client {ep.index} disconnected at {trio.current_time():.3f}: "
                    f"{getattr(reason, 'code', None)} {getattr(reason, 'reason', None)}"
                )
            return
        now = trio.current_time()
        frame = _decode(raw)
        kind = frame.get("type")
        if kind == "sent":
            run.sent_at[frame["message_id"]] = now
            ep.outstanding -= 1
            ep.window.release()
        elif kind == "deliver":
            envelopes = frame["envelopes"]
            for env in envelopes:
                if env["kind"] == "message":
                    message_id = env["message_id"]
                    if message_id in run.deliver_at:
                        run.duplicates += 1
                    elif message_id not in run.send_at:
                        run.unknown += 1
                    else:
                        run.deliver_at[message_id] = now
                elif env["kind"] == "delivered":
                    run.receipts.append(now)
                    run.receipt_at.setdefault(env["message_id"], now)
                else:
                    run.other_frames[f"envelope {env['kind']}"] = (
                        run.other_frames.get(f"envelope {env['kind']}", 0) + 1
                    )
            ack = {"type": "ack", "up_to": envelopes[-1]["envelope_id"]}
            try:
                await ep.ws.send_message(_encode(ack).decode())
            except ConnectionClosed:
                continue  # the next get_message reports it
        elif kind in ("error", "device_mismatch"):
            text = raw if isinstance(raw, str) else raw.decode(errors="replace")
            run.refused.append(f"client {ep.index}: {text[:300]}")
            if str(frame.get("id", "")) in run.send_at:
                ep.outstanding -= 1
                ep.window.release()
        else:
            run.other_frames[str(kind)] = run.other_frames.get(str(kind), 0) + 1


async def client_task(run: Run, index: int) -> None:
    released = False
    await run.slots.acquire()
    try:
        async with open_websocket_url(
            run.url, connect_timeout=CONNECT_TIMEOUT, disconnect_timeout=CLOSE_TIMEOUT
        ) as ws:
            with trio.fail_after(CONNECT_TIMEOUT):
                ep = await setup_client(run, ws, index)
            run.slots.release()
            released = True
            run.endpoints[index] = ep
            run.ready += 1
            if run.ready == run.clients:
                run.all_ready.set()
            await run.start.wait()
            if ep.partner is None:
                return  # the run was called off
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader, run, ep)
                await (count_sender if run.phases else sender)(run, ep)
                await run.finished.wait()
                nursery.cancel_scope.cancel()
    except Exception as exc:
        run.failures.append(f"client {index}: {type(exc).__name__}: {exc}")
        run.all_ready.set()
    finally:
        if not released:
            run.slots.release()


@dataclass
class Window:
    start: float = 0.0
    end: float = 0.0
    server_cpu: float = 0.0
    server_loop_cpu: float = 0.0
    client_cpu: float = 0.0
    machine: float = 0.0
    others: float = 0.0  # user-space processes other than the server and this one
    busiest_other: str = ""  # the one of them that used the most CPU
    mono_start: float = 0.0  # the window in time.monotonic(), comparable across processes
    mono_end: float = 0.0


def _snapshot(server_pid: int) -> tuple[float, float, float, float, float, dict[int, float]]:
    return (
        trio.current_time(),
        cpu_seconds(server_pid),
        cpu_seconds(server_pid, server_pid),
        time.process_time(),
        machine_busy_seconds(),
        other_processes_cpu({server_pid, os.getpid()}),
    )


async def set_up_clients(run: Run, nursery: trio.Nursery) -> bool:
    """Start every client (connect, log in, keys) and pair them; False if one failed."""
    started = time.monotonic()
    for i in range(run.clients):
        nursery.start_soon(client_task, run, i)
    with trio.move_on_after(SETUP_ALL_TIMEOUT):
        await run.all_ready.wait()
    run.setup_seconds = time.monotonic() - started
    if run.failures or run.ready < run.clients:
        run.finished.set()
        run.start.set()
        nursery.cancel_scope.cancel()
        return False
    for i, ep in run.endpoints.items():
        ep.partner = run.endpoints[i ^ 1]
    return True


def _window(a: tuple[Any, ...], b: tuple[Any, ...], mono_start: float, mono_end: float) -> Window:
    """CPU figures between two :func:`_snapshot` readings."""
    used = {pid: cpu - a[5].get(pid, 0.0) for pid, cpu in b[5].items()}  # new: all of it
    return Window(
        start=a[0],
        end=b[0],
        server_cpu=b[1] - a[1],
        server_loop_cpu=b[2] - a[2],
        client_cpu=b[3] - a[3],
        machine=b[4] - a[4],
        others=sum(used.values()),
        busiest_other=describe_process(max(used, key=used.__getitem__), used) if used else "",
        mono_start=mono_start,
        mono_end=mono_end,
    )


async def drive(run: Run, server_pid: int, warmup: float, duration: float) -> Window:
    """Set up every client, run the window, drain; CPU figures of the window."""
    window = Window()
    async with trio.open_nursery() as nursery:
        if not await set_up_clients(run, nursery):
            return window
        begin = trio.current_time()
        run.stop_at = begin + warmup + duration
        run.start.set()
        await trio.sleep_until(begin + warmup)
        a = _snapshot(server_pid)
        mono_start = time.monotonic()
        await trio.sleep_until(run.stop_at)
        b = _snapshot(server_pid)
        window = _window(a, b, mono_start, time.monotonic())
        # Drain: every send answered, every accepted message delivered.
        with trio.move_on_after(DRAIN_TIMEOUT):
            while True:
                waiting = sum(ep.outstanding for ep in run.endpoints.values())
                if not waiting and len(run.deliver_at) >= len(run.sent_at):
                    break
                await trio.sleep(0.05)
        run.finished.set()
    return window


def count_timeout(messages: int) -> float:
    """Seconds a fixed-count phase may take: 60 s plus 5 ms a message, at most 30 min."""
    return min(60.0 + messages * 0.005, 1_800.0)


async def wait_complete(run: Run, total: int, timeout: float) -> bool:
    """Wait until ``total`` sends are written and answered, every accepted one is
    delivered and (chatd) its ``delivered`` receipt came back; False on timeout."""
    with trio.move_on_after(timeout):
        while True:
            answered = len(run.sent_at) + len(run.refused)
            done = len(run.send_at) >= total and answered >= len(run.send_at)
            done = done and len(run.deliver_at) >= len(run.sent_at)
            if run.kind == "chatd":
                done = done and len(run.receipt_at) >= len(run.deliver_at)
            if done or run.failures:
                return not run.failures
            await trio.sleep(COMPLETE_POLL)
    return False


async def drive_count(run: Run, server_pid: int, warmup: int, messages: int) -> Window:
    """Fixed counts: a warm-up phase, then the measured one; CPU figures of the latter.

    The measured window runs from the first measured send until every message
    is delivered and receipted, plus COUNT_SETTLE for the last acks to be
    handled (the server is idle then; its timers cost ~nothing).
    """
    window = Window()
    run.phases = [warmup, messages] if warmup else [messages]
    run.phase_go = [trio.Event() for _ in run.phases]
    async with trio.open_nursery() as nursery:
        if not await set_up_clients(run, nursery):
            return window
        run.start.set()
        total = 0
        for phase, (count, go) in enumerate(zip(run.phases, run.phase_go, strict=True)):
            measured = phase == len(run.phases) - 1
            total += count * run.clients
            if measured:
                await trio.sleep(COUNT_SETTLE)  # the warm-up's last acks
                a = _snapshot(server_pid)
                mono_start = time.monotonic()
            go.set()
            complete = await wait_complete(run, total, count_timeout(count * run.clients))
            if not complete:
                run.failures.append(
                    f"phase {phase + 1}: not complete after "
                    f"{count_timeout(count * run.clients):.0f} s"
                )
                break
        if complete:
            await trio.sleep(COUNT_SETTLE)
            b = _snapshot(server_pid)
            window = _window(a, b, mono_start, time.monotonic())
        run.finished.set()
        if not complete:
            nursery.cancel_scope.cancel()  # senders may wait for replies that never come
    return window


def check_setup(run: Run) -> None:
    """Stop the script if a client could not be set up, or the run failed."""
    if run.ready < run.clients:
        raise SystemExit(
            f"{run.kind}: only {run.ready} of {run.clients} clients set up: "
            + "; ".join(run.failures[:5])
        )
    if run.failures:
        raise SystemExit(f"{run.kind}: the run failed: " + "; ".join(run.failures[:5]))


# -- the bare relay (child process) -----------------------------------------------------------


class BarePeer:
    def __init__(self) -> None:
        self.send_in, self.send_out = trio.open_memory_channel[str](BARE_QUEUE)
        self.next_envelope = 0
        self.overflows = 0

    def queue(self, frame: dict[str, Any]) -> None:
        try:
            self.send_in.send_nowait(_encode(frame).decode())
        except trio.WouldBlock:
            self.overflows += 1
        except trio.ClosedResourceError:
            pass


async def bare_server() -> None:
    """No auth, no keys, no store: forward each ``send`` to the partner connection."""
    peers: dict[str, BarePeer] = {}
    user_ids: dict[str, int] = {}

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        me = BarePeer()
        name = ""

        async def send_loop() -> None:
            async for data in me.send_out:
                try:
                    await ws.send_message(data)
                except ConnectionClosed:
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_loop)
            me.queue({"type": "hello", "protocol": 1, "server": "bare"})
            try:
                for _ in range(100_000_000):
                    frame = _decode(await ws.get_message())
                    kind = frame.get("type")
                    if kind == "send":
                        sent_at = time.time_ns() // 1_000_000
                        for env in frame["envelopes"]:
                            target = peers.get(env["device_id"])
                            if target is None:
                                continue
                            target.next_envelope += 1
                            envelope = {
                                "envelope_id": target.next_envelope,
                                "kind": "message",
                                "message_id": frame["message_id"],
                                "sent_at": sent_at,
                                "sender_user_id": user_ids[name],
                                "sender_device_id": name,
                                "ciphertext": env["ciphertext"],
                            }
                            target.queue({"type": "deliver", "envelopes": [envelope]})
                        me.queue(
                            {
                                "type": "sent",
                                "id": frame["id"],
                                "message_id": frame["message_id"],
                                "envelopes": len(frame["envelopes"]),
                            }
                        )
                    elif kind == "ack":
                        pass
                    elif kind == "login":
                        name = str(frame["username"])
                        user_ids.setdefault(name, len(user_ids) + 1)
                        peers[name] = me
                        me.queue(
                            {
                                "type": "session",
                                "id": frame["id"],
                                "user": {"id": user_ids[name], "username": name},
                                "device_id": name,
                            }
                        )
                    elif kind == "ping":
                        me.queue({"type": "pong", "id": frame.get("id")})
            except ConnectionClosed:
                pass
            finally:
                if peers.get(name) is me:
                    del peers[name]
                if me.overflows:
                    print(f"bare relay: {me.overflows} frames dropped for {name}", file=sys.stderr)
                nursery.cancel_scope.cancel()

    with trio.move_on_after(BARE_LIFETIME):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
            print(f"PORT {server.port}", flush=True)


class BareProcess:
    """The bare relay as a child process of this script."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--bare-server"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = ""
        readable, _, _ = select.select([self.proc.stdout], [], [], 30.0)
        if readable:
            line = self.proc.stdout.readline()  # the child prints one whole line, flushed
        if not line.startswith("PORT "):
            self.stop()
            raise SystemExit(f"the bare relay did not start: {line!r}")
        self.port = int(line.split()[1])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> list[str]:
        """SIGTERM (it has no clean shutdown to test); notes if it had to be killed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                return ["the bare relay ignored SIGTERM for 10 s and was killed"]
        return []


# -- the daemon, optionally with store-writer timings -------------------------------------------


def writer_stats_child(out: str, argv: list[str]) -> int:
    """``relay.py --writer-stats-child OUT serve --config ...``: run ``chatd.cli.run`` as
    the ``chatd`` script would, timing the store's writer thread (chatd unchanged).

    Every write job's function is timed (by its qualified name), and every batch
    (BEGIN, the jobs in savepoints, COMMIT with its fsync). At exit the samples go
    to OUT as JSON, with time.monotonic() end times for windowing.

    This patches ``chatd.store.store.Store.submit`` and ``Store._run_batch``. If a
    rebuilt chatd has no such class or methods, chatd runs unpatched and OUT
    says why, so the run's other figures stand and the writer's are skipped.
    """
    import atexit

    from chatd import cli

    try:
        from chatd.store.store import Store

        submit, run_batch = Store.submit, Store._run_batch
    except (ImportError, AttributeError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        with open(out, "w") as fh:
            json.dump({"skipped": f"cannot patch chatd.store.store.Store ({reason})"}, fh)
        return int(cli.run(argv) or 0)

    jobs: list[tuple[float, str, float]] = []  # appended by the writer thread only
    batches: list[tuple[float, int, float]] = []

    async def timed_submit(self: Store, fn: Any, *args: Any) -> Any:
        name = str(getattr(fn, "__qualname__", "?")).replace(".<locals>", "")

        def timed(conn: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(conn)
            finally:
                jobs.append((time.monotonic(), name, time.perf_counter() - started))

        return await submit(self, timed, *args)

    def timed_batch(self: Store, conn: Any, batch: list[Any]) -> None:
        started = time.perf_counter()
        run_batch(self, conn, batch)
        batches.append((time.monotonic(), len(batch), time.perf_counter() - started))

    def dump() -> None:
        with open(out, "w") as fh:
            json.dump({"jobs": jobs, "batches": batches}, fh)

    Store.submit = timed_submit  # type: ignore[method-assign]
    Store._run_batch = timed_batch  # type: ignore[method-assign]
    atexit.register(dump)
    return int(cli.run(argv) or 0)


def writer_summary(path: Path, window: Window) -> list[str]:
    """What the store's writer thread did inside the window, from the child's samples."""
    try:
        samples = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return [f"store writer: no timings ({exc})"]
    if "skipped" in samples:
        return [f"store writer: figures skipped: {samples['skipped']}"]
    span = window.mono_end - window.mono_start
    inside = [b for b in samples["batches"] if window.mono_start <= b[0] < window.mono_end]
    if not inside or span <= 0:
        return ["store writer: no batches in the window"]
    busy = sum(b[2] for b in inside)
    jobs = sum(b[1] for b in inside)
    per: dict[str, list[float]] = {}
    for end, name, seconds in samples["jobs"]:
        if window.mono_start <= end < window.mono_end:
            per.setdefault(name, []).append(seconds)
    job_time = sum(sum(v) for v in per.values())
    lines = [
        f"store writer thread busy {busy / span * 100:.0f}% of the window: "
        f"{len(inside) / span:,.0f} commits/s, {jobs / span:,.0f} write jobs/s, "
        f"{jobs / len(inside):.1f} jobs per commit"
    ]
    for name, times in sorted(per.items(), key=lambda kv: -sum(kv[1])):
        lines.append(
            f"  write job {name}: {len(times) / span:,.0f}/s, mean {ms(sum(times) / len(times))}"
        )
    lines.append(
        "  BEGIN, savepoints and COMMIT (fsync): mean "
        f"{ms((busy - job_time) / len(inside))} per commit"
    )
    return lines


# -- the daemon -------------------------------------------------------------------------------


def configure(config: Path, *, idle: bool, clients: int) -> None:
    set_settings(
        config,
        "relay",
        {
            **RELAXED_ADDRESSES,
            "port": 0,
            "idle_timeout_seconds": 3_600.0 if idle else 600.0,
            "handshake_timeout_seconds": 300.0 if idle else 30.0,
            "max_connections": max(10_000, 2 * clients),
            **RELAXED_RELAY,  # a few accounts send thousands of messages a second
        },
    )
    if idle:
        # Day-long access tokens: a slow login wave must not see its first
        # connections closed for an expired token (4001) before the last logs in.
        set_settings(config, "auth", {**RELAXED_AUTH, "access_token_minutes": 1_440.0})
        set_settings(config, "devices", {"max_devices_per_user": 1_000})
    else:
        set_settings(config, "auth", RELAXED_AUTH)


def log_findings(log: str) -> list[str]:
    """Lines of the daemon log that look wrong: errors, warnings, tracebacks."""
    bad = []
    for line in log.splitlines():
        low = line.lower()
        if any(w in low for w in ("level=error", "level=warn", "level=critical", "traceback")):
            bad.append(line)
    return bad


@dataclass
class Result:
    kind: str
    pairs: int
    run: Run
    window: Window
    notes: list[str] = field(default_factory=list)

    @property
    def span(self) -> float:
        return self.window.end - self.window.start

    def in_window(self, times: Any) -> int:
        return sum(1 for t in times if self.window.start <= t < self.window.end)

    @property
    def sent_rate(self) -> float:
        return self.in_window(self.run.sent_at.values()) / self.span

    @property
    def delivered_rate(self) -> float:
        return self.in_window(self.run.deliver_at.values()) / self.span

    def latencies(self, reply: dict[str, float]) -> list[float]:
        w = self.window
        return [
            reply[m] - t for m, t in self.run.send_at.items() if w.start <= t < w.end and m in reply
        ]

    # Fixed-count runs: the window ends COUNT_SETTLE after the last arrival.

    @property
    def delivered(self) -> int:
        return self.in_window(self.run.deliver_at.values())

    @property
    def cpu_per_message(self) -> float:
        """Server CPU seconds per message delivered in the window."""
        return self.window.server_cpu / self.delivered if self.delivered else math.nan

    @property
    def count_rate(self) -> float:
        """Messages delivered per second, first measured send to last delivery."""
        w = self.window
        last = max((t for t in self.run.deliver_at.values() if w.start <= t < w.end), default=0.0)
        return self.delivered / (last - w.start) if last > w.start else 0.0


#: Runs the clients of one relay run against a server process and returns the
#: CPU figures of the measured window: ``partial(drive, warmup=, duration=)``
#: (timed) or ``partial(drive_count, warmup=, messages=)`` (fixed counts).
Driver = Callable[[Run, int], Awaitable[Window]]


def run_chatd(pairs: int, driver: Driver, writer_stats: bool, *, window: int = WINDOW) -> Result:
    clients = 2 * pairs
    with tempfile.TemporaryDirectory(prefix="chatd-bench-") as tmp:
        work = Path(tmp)
        data = work / "data"
        config = init_data_dir(data)
        configure(config, idle=False, clients=clients)
        stats = work / "writer.json"
        wrapper = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--writer-stats-child",
            str(stats),
        ]
        daemon = Daemon(config, work, command=wrapper if writer_stats else None)
        daemon.start()
        try:
            daemon.wait_ready()
            url, _port = daemon.relay_url()
            made = create_users(data, [f"u{i:04d}" for i in range(clients)], PASSWORD)
            run = Run("chatd", url, clients, window=window)
            measured = trio.run(driver, run, daemon.pid)
            check_setup(run)
            rss = vm_rss_kib(daemon.pid)
        except BaseException:
            daemon.kill()
            print(f"daemon log tail:\n{daemon.log_tail()}", file=sys.stderr)
            raise
        code, _stop = daemon.stop()
        log = daemon.log_path.read_text(errors="replace")
        notes = [
            f"data dir on {_fs_type(data)}; {clients} accounts made in {made:.1f} s; "
            f"daemon RSS at the end {rss:,} KiB"
        ]
        findings = log_findings(log)
        notes.append(f"daemon log: {len(log.splitlines())} lines, {len(findings)} warning/error")
        notes += [f"  {line[:300]}" for line in findings[:5]]
        notes += [f"  {line[:300]}" for line in log.splitlines() if "queues.stopped" in line]
        if writer_stats:
            notes += writer_summary(stats, measured)
        notes.append(f"SIGTERM to exit {code}")
        if code != 0:
            notes.append(f"ERROR: chatd exited with {code} after SIGTERM, expected 0")
    return Result("chatd", pairs, run, measured, notes)


def run_bare(pairs: int, driver: Driver, *, window: int = WINDOW) -> Result:
    bare = BareProcess()
    try:
        run = Run("bare", f"ws://127.0.0.1:{bare.port}/", 2 * pairs, window=window)
        measured = trio.run(driver, run, bare.pid)
        check_setup(run)
    finally:
        notes = bare.stop()
    return Result("bare", pairs, run, measured, notes)


def report_run(res: Result) -> None:
    run, w = res.run, res.window
    label = f"{res.kind} {res.pairs} pairs ({run.clients} clients)"
    span = res.span
    print(f"{label}: setup {run.setup_seconds:.1f} s, window {span:.1f} s")
    print(f"{label}: sent (durably queued) {res.sent_rate:,.0f} msg/s")
    print(f"{label}: delivered end to end {res.delivered_rate:,.0f} msg/s")
    if res.kind == "chatd":
        print(f"{label}: delivered receipts {res.in_window(run.receipts) / span:,.0f}/s")
    e2e = res.latencies(run.deliver_at)
    if e2e:
        print(
            f"{label}: send->deliver latency p50 {ms(percentile(e2e, 50))}, "
            f"p99 {ms(percentile(e2e, 99))}, "
            f"max {ms(max(e2e))} (n={len(e2e)})"
        )
    acked = res.latencies(run.sent_at)
    if acked:
        print(
            f"{label}: send->sent latency p50 {ms(percentile(acked, 50))}, "
            f"p99 {ms(percentile(acked, 99))}, max {ms(max(acked))}"
        )
    lost = [m for m in run.sent_at if m not in run.deliver_at]
    unanswered = len(run.send_at) - len(run.sent_at) - len(run.refused)
    print(
        f"{label}: {len(run.send_at)} sends in all, {len(run.sent_at)} sent, "
        f"{len(run.deliver_at)} delivered, {len(lost)} sent but not delivered after "
        f"{DRAIN_TIMEOUT:.0f} s, {unanswered} unanswered, {len(run.refused)} refused, "
        f"{run.duplicates} duplicates, {run.unknown} unknown"
    )
    others = ", ".join(f"{k} {v}" for k, v in sorted(run.other_frames.items())) or "none"
    print(f"{label}: other frames received: {others}")
    loop = f" (event-loop thread {w.server_loop_cpu / span * 100:.0f}%)"
    print(
        f"{label}: CPU server {w.server_cpu / span * 100:.0f}% of a core{loop}, "
        f"clients {w.client_cpu / span * 100:.0f}%, machine {w.machine / span:.2f} of "
        f"{os.cpu_count()} cores"
    )
    kernel = max(0.0, w.machine - w.server_cpu - w.client_cpu - w.others) / span
    print(
        f"{label}: CPU elsewhere: other processes {w.others / span:.2f} cores, "
        f"kernel threads, interrupts (loopback, journal) and processes that exited "
        f"meanwhile {kernel:.2f} cores"
    )
    if w.others / span > OUTSIDE_LOAD_WARNING:
        print(
            f"{label}: WARNING: other processes competed for the CPU; rerun "
            f"(busiest: {w.busiest_other})"
        )
    for line in (run.failures + run.refused)[:5]:
        print(f"{label}: problem: {line}")
    for note in res.notes:
        print(f"{label}: {note}")


def report_ratio(chatd: Result, bare: Result) -> None:
    pairs = chatd.pairs
    a_e2e, b_e2e = chatd.latencies(chatd.run.deliver_at), bare.latencies(bare.run.deliver_at)
    line = (
        f"ratio chatd/bare at {pairs} pairs: sent msg/s {_ratio(chatd.sent_rate, bare.sent_rate)}, "
        f"delivered msg/s {_ratio(chatd.delivered_rate, bare.delivered_rate)}"
    )
    if a_e2e and b_e2e:
        line += (
            f", latency p50 {_ratio(percentile(a_e2e, 50), percentile(b_e2e, 50))}, "
            f"p99 {_ratio(percentile(a_e2e, 99), percentile(b_e2e, 99))}"
        )
    print(line)


# -- fixed counts: chatd and the bare relay interleaved ----------------------------------------


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f} µs"


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def report_count_run(label: str, res: Result) -> None:
    """One fixed-count run in a few lines: CPU per message first."""
    run, w = res.run, res.window
    e2e, acked = res.latencies(run.deliver_at), res.latencies(run.sent_at)
    line = (
        f"{label}: server CPU {w.server_cpu:.2f} s for {res.delivered:,} delivered = "
        f"{_us(res.cpu_per_message)} per message; {res.count_rate:,.0f} msg/s"
    )
    if e2e and acked:
        line += (
            f"; send->deliver p50 {ms(percentile(e2e, 50))}, p99 {ms(percentile(e2e, 99))}; "
            f"send->sent p50 {ms(percentile(acked, 50))}"
        )
    print(line)
    span = res.span
    print(
        f"{label}:   event-loop thread {w.server_loop_cpu:.2f} s; clients {w.client_cpu:.2f} s; "
        f"other processes {w.others / span:.2f} cores; machine {w.machine / span:.2f} of "
        f"{os.cpu_count()} cores over {span:.2f} s"
    )
    if w.others / span > OUTSIDE_LOAD_WARNING:
        print(f"{label}:   WARNING: other processes competed for the CPU ({w.busiest_other})")
    lost = len(run.sent_at) - sum(1 for m in run.sent_at if m in run.deliver_at)
    if lost or run.refused or run.duplicates or run.unknown or run.failures:
        print(
            f"{label}:   PROBLEM: {lost} sent but not delivered, {len(run.refused)} refused, "
            f"{run.duplicates} duplicates, {run.unknown} unknown"
        )
    for line in (run.failures + run.refused)[:5]:
        print(f"{label}:   problem: {line}")
    for note in res.notes:
        print(f"{label}:   {note}")


@dataclass
class Comparison:
    """Fixed-count runs of chatd and the bare relay, interleaved round by round."""

    chatd: list[Result] = field(default_factory=list)
    bare: list[Result] = field(default_factory=list)

    def cpu(self, kind: str) -> list[float]:
        return [r.cpu_per_message for r in getattr(self, kind)]

    def latency(self, kind: str, reply: str, q: float) -> list[float]:
        out = []
        for r in getattr(self, kind):
            values = r.latencies(getattr(r.run, reply))
            if values:
                out.append(percentile(values, q))
        return out


def compare_counts(
    title: str,
    *,
    pairs: int,
    window: int,
    messages: int,
    warmup: int,
    rounds: int,
    writer_stats: bool,
) -> Comparison:
    """chatd, bare, chatd, bare...: each in a fresh server; per-round lines and medians."""
    print(
        f"{title}: {_n(pairs, 'pair')} ({2 * pairs} clients) x {messages:,} messages each, "
        f"window {window}, after {warmup:,} warm-up messages each; {_n(rounds, 'round')}, "
        f"chatd and bare interleaved, each in a fresh server process"
    )
    driver = partial(drive_count, warmup=warmup, messages=messages)
    out = Comparison()
    for i in range(rounds):
        chatd = run_chatd(pairs, driver, writer_stats, window=window)
        report_count_run(f"  round {i + 1} chatd", chatd)
        out.chatd.append(chatd)
        bare = run_bare(pairs, driver, window=window)
        report_count_run(f"  round {i + 1} bare ", bare)
        out.bare.append(bare)
    for kind in ("chatd", "bare"):
        runs: list[Result] = getattr(out, kind)
        per_round = ", ".join(_us(v) for v in out.cpu(kind))
        e2e = out.latency(kind, "deliver_at", 50)
        print(
            f"  {kind:5} median: {_us(_median(out.cpu(kind)))} server CPU per delivered "
            f"message (rounds: {per_round}); "
            f"{_median([r.count_rate for r in runs]):,.0f} msg/s; "
            f"send->deliver p50 {ms(_median(e2e))}"
        )
    return out


def report_targets(t1: Comparison | None, t2: Comparison | None) -> None:
    if t1 is not None:
        ratios = [a / b for a, b in zip(t1.cpu("chatd"), t1.cpu("bare"), strict=True)]
        ratio = _median(t1.cpu("chatd")) / _median(t1.cpu("bare"))
        met = "met" if ratio <= 0.75 else "NOT met"
        stretch = " (stretch 0.4x met too)" if ratio <= 0.4 else ""
        print(
            f"Target 1: server CPU per delivered message, chatd/bare = {ratio:.2f}x "
            f"(medians: {_us(_median(t1.cpu('chatd')))} / {_us(_median(t1.cpu('bare')))}; "
            f"per round {', '.join(f'{r:.2f}x' for r in ratios)}); target <= 0.75x: "
            f"{met}{stretch}"
        )
    if t2 is not None:
        parts = []
        for kind in ("chatd", "bare"):
            parts.append(
                f"{kind} send->deliver p50 {ms(_median(t2.latency(kind, 'deliver_at', 50)))} "
                f"p99 {ms(_median(t2.latency(kind, 'deliver_at', 99)))}, "
                f"send->sent p50 {ms(_median(t2.latency(kind, 'sent_at', 50)))}"
            )
        p50 = _median(t2.latency("chatd", "deliver_at", 50))
        print(
            f"Target 2: at window 1, {'; '.join(parts)}; target chatd p50 <= 1 ms "
            f"(with sent after a durable commit): {'met' if p50 <= 0.001 else 'NOT met'}"
        )


# -- idle authenticated connections -----------------------------------------------------------


class _Kind(msgspec.Struct):
    type: str = ""  # other fields of a pushed frame are skipped


_decode_kind = msgspec.json.Decoder(_Kind).decode


@dataclass
class Idle:
    """``n`` connections; connection i logs in as ``names[i % len(names)]``, a new device."""

    url: str
    names: list[str]
    n: int
    timeout: float  # seconds for all n to be logged in
    slots: trio.Semaphore = field(default_factory=lambda: trio.Semaphore(SETUP_CONCURRENCY))
    opened: int = 0
    all_open: trio.Event = field(default_factory=trio.Event)
    release: trio.Event = field(default_factory=trio.Event)
    failures: list[str] = field(default_factory=list)
    closed_early: list[str] = field(default_factory=list)
    frames: dict[str, int] = field(default_factory=dict)  # pushed frames read, by type
    progress: str = ""  # a label: a line every IDLE_PROGRESS logins (long runs)
    started: float = field(default_factory=time.monotonic)

    async def one(self, index: int) -> None:
        await self.slots.acquire()
        logging_in = True
        try:
            async with open_websocket_url(
                self.url, connect_timeout=IDLE_LOGIN_TIMEOUT, disconnect_timeout=CLOSE_TIMEOUT
            ) as ws:
                with trio.fail_after(IDLE_LOGIN_TIMEOUT):
                    await login(ws, self.names[index % len(self.names)], f"idle {index}")
                self.slots.release()
                logging_in = False
                self.opened += 1
                if self.opened == self.n:
                    self.all_open.set()
                if self.progress and self.opened % IDLE_PROGRESS == 0:
                    print(
                        f"{self.progress}: {self.opened:,} of {self.n:,} logged in after "
                        f"{time.monotonic() - self.started:.0f} s",
                        flush=True,
                    )
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._discard, ws, index)
                    await self.release.wait()
                    nursery.cancel_scope.cancel()
        except Exception as exc:
            self.failures.append(f"connection {index}: {type(exc).__name__}: {exc}")
            self.all_open.set()
        finally:
            if logging_in:
                self.slots.release()

    async def _discard(self, ws: WebSocketConnection, index: int) -> None:
        """Read and count pushes (key_count, presence), as a real client would."""
        for _ in range(10_000_000):
            try:
                kind = _decode_kind(await ws.get_message()).type
            except ConnectionClosed as exc:
                if not self.release.is_set():
                    self.closed_early.append(f"connection {index}: {exc.reason}")
                return
            self.frames[kind] = self.frames.get(kind, 0) + 1


def idle_timeout(n: int) -> float:
    """Seconds for n idle logins: 300 s plus one second each (a slow server's login
    wave with distinct users ran at 2-6 logins/s), at most 4 hours."""
    return min(SETUP_ALL_TIMEOUT + n * 1.0, 14_400.0)


async def _open_idle(idle: Idle) -> dict[str, float]:
    figures: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        started = time.monotonic()
        for i in range(idle.n):
            nursery.start_soon(idle.one, i)
        with trio.move_on_after(idle.timeout):
            await idle.all_open.wait()
        figures["open_seconds"] = time.monotonic() - started
        if not idle.failures and idle.opened == idle.n:
            await trio.sleep(SETTLE_SECONDS)
        idle.release.set()
    return figures


@dataclass
class IdleAccounts:
    """Who logs in: the warm-up, then each half of the measured connections."""

    warmup: list[str]
    first: list[str]
    second: list[str]

    @classmethod
    def plan(cls, n: int, users: int) -> IdleAccounts:
        """users == 0: one account per connection (warm-up accounts apart), so every
        measured connection is a different user and device; else round robin."""
        if users == 0:
            names = [f"idle{i:05d}" for i in range(n)]
            warmup = [f"idlewarm{i:02d}" for i in range(IDLE_WARMUP)]
            return cls(warmup, names[: n // 2], names[n // 2 :])
        names = [f"idle{i:05d}" for i in range(users)]
        return cls(names, names, names)

    def all(self) -> list[str]:
        return list(dict.fromkeys(self.warmup + self.first + self.second))


async def measure_idle(
    daemon: Daemon, url: str, accounts: IdleAccounts, n: int
) -> tuple[dict[str, float], dict[str, int]]:
    warm = Idle(url, accounts.warmup, IDLE_WARMUP, idle_timeout(IDLE_WARMUP))
    await _open_idle(warm)
    if warm.failures or warm.opened < IDLE_WARMUP:
        raise SystemExit(f"idle warm-up failed: {warm.failures[:5]}")
    await trio.sleep(SETTLE_SECONDS)
    before = vm_rss_kib(daemon.pid)
    # Two halves, with the RSS read in between: the growth over the second
    # half is per connection alone, whatever the first logins left behind.
    half_n = n // 2
    label = f"idle {n}" if n >= 2 * IDLE_PROGRESS else ""
    first = Idle(
        url, accounts.first, half_n, idle_timeout(half_n), progress=label and f"{label}, first half"
    )
    second = Idle(
        url,
        accounts.second,
        n - half_n,
        idle_timeout(n - half_n),
        progress=label and f"{label}, second half",
    )
    figures: dict[str, float] = {"before": before}
    async with trio.open_nursery() as nursery:
        started = time.monotonic()
        ok = True
        for half, key in ((first, "half"), (second, "after")):
            for i in range(half.n):
                nursery.start_soon(half.one, i)
            with trio.move_on_after(half.timeout):
                await half.all_open.wait()
            ok = ok and not half.failures and half.opened == half.n
            if not ok:
                figures["rss_at_failure"] = vm_rss_kib(daemon.pid)
                break
            figures[f"{key}_seconds"] = time.monotonic() - started
            await trio.sleep(SETTLE_SECONDS)
            figures[key] = vm_rss_kib(daemon.pid)
        if ok:
            figures["open_seconds"] = time.monotonic() - started
            await trio.sleep(SETTLE_SECONDS)
            figures["after_settled"] = vm_rss_kib(daemon.pid)
        first.release.set()
        second.release.set()
    for name, idle in (("first", first), ("second", second)):
        if idle.failures or idle.closed_early or idle.opened < idle.n:
            known = ", ".join(f"{k} {v:,.1f}" for k, v in figures.items())
            raise SystemExit(
                f"idle {n}: {idle.opened} of the {name} half's {idle.n} connections logged in, "
                f"{len(idle.failures)} failed, {len(idle.closed_early)} closed early: "
                + "; ".join((idle.failures + idle.closed_early)[:5])
                + f"\nfigures so far (RSS in KiB, times in s): {known}"
                + f"\ndaemon log:\n{daemon.log_tail()}"
            )
    await trio.sleep(SETTLE_SECONDS)
    figures["closed"] = vm_rss_kib(daemon.pid)
    frames = dict(first.frames)
    for kind, count in second.frames.items():
        frames[kind] = frames.get(kind, 0) + count
    return figures, frames


#: Run the daemon with glibc's mmap threshold fixed at 1 MiB: each Argon2 buffer
#: (argon2_memory_kib, 19 MiB by default) is then mmapped and unmapped on free.
#: With the default dynamic threshold, freed buffers stay in the worker threads'
#: malloc arenas, and RSS grows with the number of logins, not connections.
FIXED_MMAP_ENV: Final = {"MALLOC_MMAP_THRESHOLD_": "1048576"}
IDLE_TARGET_KIB: Final = 16.0  # Target 3: RSS per idle connection at 5,000 distinct users
IDLE_TARGET_TOTAL_BYTES: Final = 300_000_000  # Target 3: daemon RSS at 10,000 connections


def run_idle(n: int, users: int, env: dict[str, str], allocator: str) -> None:
    limit = raise_nofile(2 * n + 1_024)
    if limit < n + 256:
        raise SystemExit(f"RLIMIT_NOFILE is {limit}; need at least {n + 256}")
    accounts = IdleAccounts.plan(n, users)
    names = accounts.all()
    with tempfile.TemporaryDirectory(prefix="chatd-bench-") as tmp:
        work = Path(tmp)
        data = work / "data"
        config = init_data_dir(data)
        configure(config, idle=True, clients=n)
        made = seed_users(config, names, PASSWORD)
        daemon = Daemon(config, work, env=env)
        daemon.start()
        try:
            daemon.wait_ready()
            url, _port = daemon.relay_url()
            start_rss = vm_rss_kib(daemon.pid)
            cpu_start = cpu_seconds(daemon.pid)
            figures, frames = trio.run(measure_idle, daemon, url, accounts, n)
            cpu = cpu_seconds(daemon.pid) - cpu_start
        except BaseException:
            daemon.kill()
            print(f"daemon log tail:\n{daemon.log_tail()}", file=sys.stderr)
            raise
        code, _stop = daemon.stop()
        log = daemon.log_path.read_text(errors="replace")
    before, after = figures["before"], figures["after"]
    distinct = users == 0
    label = f"idle {n} ({allocator})"
    who = (
        f"{n} different accounts, one connection and device each"
        if distinct
        else f"round robin over {users} accounts, a new device each"
    )
    print(
        f"{label}: {n} connections logged in ({who}) in {figures['open_seconds']:.1f} s "
        f"(first half {figures['half_seconds']:.1f} s, second half "
        f"{figures['after_seconds'] - figures['half_seconds']:.1f} s); "
        f"RLIMIT_NOFILE {limit}; daemon CPU {cpu:.1f} s"
    )
    print(
        f"{label}: {len(names)} accounts seeded in {made:.1f} s (one Argon2id hash, rows "
        f"inserted with the daemon stopped); daemon RSS once ready: {start_rss:,} KiB"
    )
    print(f"{label}: daemon RSS after {IDLE_WARMUP} warm-up logins (baseline): {before:,.0f} KiB")
    print(f"{label}: daemon RSS with {n // 2} logged in: {figures['half']:,.0f} KiB")
    print(
        f"{label}: daemon RSS with {n} logged in: {after:,.0f} KiB "
        f"({after / 1024:,.1f} MiB, {after * 1024 / 1e6:,.1f} MB)"
    )
    print(f"{label}: daemon RSS 1 s later: {figures['after_settled']:,.0f} KiB")
    per_connection = (after - figures["half"]) / (n - n // 2)
    print(
        f"{label}: RSS per idle authenticated connection, over the second half: "
        f"{per_connection:.1f} KiB"
    )
    print(f"{label}: the same over all {n}, from the warm-up: {(after - before) / n:.1f} KiB")
    # The warm-up's freed memory may be reused by the connections and flatter
    # the figure above; this one charges them everything since start-up.
    print(
        f"{label}: the same from the RSS once ready (charging them the warm-up too): "
        f"{(after - start_rss) / n:.1f} KiB"
    )
    print(f"{label}: daemon RSS after all closed: {figures['closed']:,.0f} KiB")
    pushed = ", ".join(f"{k} {v:,}" for k, v in sorted(frames.items())) or "none"
    print(f"{label}: frames the measured connections read after login: {pushed}")
    if distinct:
        judged = "met" if per_connection <= IDLE_TARGET_KIB else "NOT met"
        print(
            f"{label}: Target 3: <= {IDLE_TARGET_KIB:g} KiB per idle connection at 5,000 "
            f"distinct users: {per_connection:.1f} KiB at {n:,}: "
            + (judged if n >= 5_000 else "not judged below 5,000")
        )
        total = after * 1024
        judged = "met" if total <= IDLE_TARGET_TOTAL_BYTES else "NOT met"
        print(
            f"{label}: Target 3: 10,000 connections within 300 MB (300,000,000 bytes) of daemon "
            f"RSS: {total / 1e6:,.1f} MB at {n:,}: "
            + (judged if n >= 10_000 else "not judged below 10,000")
        )
    findings = log_findings(log)
    print(f"{label}: daemon log {len(log.splitlines())} lines, {len(findings)} warning/error")
    for line in findings[:5]:
        print(f"{label}:   {line[:300]}")
    print(f"{label}: SIGTERM to exit {code}")
    if code != 0:
        raise SystemExit(f"chatd exited with {code} after SIGTERM, expected 0")


SECTIONS: Final = ("targets", "count", "duration", "idle")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Sections: targets (the default), count, duration, idle; see the module docstring.",
    )
    parser.add_argument("sections", nargs="*", metavar="SECTION", help="what to run")
    parser.add_argument("--rounds", type=int, default=2, help="chatd/bare rounds (fixed counts)")
    parser.add_argument(
        "--messages", type=int, default=5_000, help="messages per client: Target 1 and count"
    )
    parser.add_argument(
        "--latency-messages", type=int, default=2_000, help="messages per client in Target 2"
    )
    parser.add_argument(
        "--warmup-messages", type=int, default=200, help="unmeasured messages per client first"
    )
    parser.add_argument("--window", type=int, default=WINDOW, help="window of the count section")
    parser.add_argument("--duration", type=float, help="measured seconds per timed run (10)")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds first (2)")
    parser.add_argument("--pairs", type=int, nargs="+", help="count: 5; duration: 5 100")
    parser.add_argument("--idle-connections", type=int, nargs="+", default=[1_000])
    parser.add_argument(
        "--idle-users", type=int, default=10, help="accounts to log in to; 0: one per connection"
    )
    parser.add_argument(
        "--idle-mmap",
        action="store_true",
        help="idle: run again with MALLOC_MMAP_THRESHOLD_=1048576 for comparison",
    )
    parser.add_argument(
        "--writer-stats",
        action="store_true",
        help="time the store's writer in every chatd run (default: timed runs only)",
    )
    parser.add_argument(
        "--no-writer-stats",
        action="store_true",
        help="run plain chatd in every run (no store-writer timings)",
    )
    parser.add_argument("--no-idle", action="store_true", help="skip the idle section")
    parser.add_argument(
        "--no-relay", action="store_true", help="only the idle section, with --idle-mmap"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: short, small")
    parser.add_argument("--bare-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = [x for x in args.sections if x not in SECTIONS]
    if unknown:
        parser.error(f"unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    timed_options = (args.duration, args.warmup, args.pairs)
    if args.no_relay:
        args.sections, args.idle_mmap = ["idle"], True
    elif not args.sections:
        if args.quick:
            args.sections = list(SECTIONS)
        elif any(v is not None for v in timed_options):
            args.sections = ["duration"]  # as the script ran before it had sections
        else:
            args.sections = ["targets"]
    if args.no_idle:
        args.sections = [x for x in args.sections if x != "idle"]
    if args.quick:
        args.rounds, args.messages, args.latency_messages = 1, 300, 200
        args.warmup_messages = min(args.warmup_messages, 50)
        args.duration, args.warmup = 2.0, 0.5
        args.pairs = args.pairs or [5, 20]
        args.idle_connections = [min(n, 100) for n in args.idle_connections]
    args.rounds = max(1, min(args.rounds, 20))
    args.messages = max(1, min(args.messages, 1_000_000))
    args.latency_messages = max(1, min(args.latency_messages, 1_000_000))
    args.warmup_messages = max(0, min(args.warmup_messages, 100_000))
    args.window = max(1, min(args.window, 200))
    args.duration = max(0.5, min(args.duration or 10.0, 600.0))
    args.warmup = max(0.0, min(2.0 if args.warmup is None else args.warmup, 60.0))
    args.idle_connections = [max(1, min(n, 20_000)) for n in args.idle_connections]
    args.idle_users = max(0, min(args.idle_users, 20_000))
    return args


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--writer-stats-child":
        sys.exit(writer_stats_child(sys.argv[2], sys.argv[3:]))
    args = parse_args()
    if args.bare_server:
        trio.run(bare_server)
        return
    timed_pairs = [max(1, min(p, 500)) for p in args.pairs or [5, 100]]
    count_pairs = [max(1, min(p, 500)) for p in args.pairs or [5]]
    raise_nofile(4 * max(timed_pairs + count_pairs) + 2 * max(args.idle_connections) + 1_024)

    def stats(timed: bool) -> bool:
        return not args.no_writer_stats and (args.writer_stats or timed)

    if "targets" in args.sections:
        t1 = compare_counts(
            "Target 1 (server CPU per message)",
            pairs=5,
            window=WINDOW,
            messages=args.messages,
            warmup=args.warmup_messages,
            rounds=args.rounds,
            writer_stats=stats(False),
        )
        t2 = compare_counts(
            "Target 2 (latency at window 1)",
            pairs=1,
            window=1,
            messages=args.latency_messages,
            warmup=args.warmup_messages,
            rounds=args.rounds,
            writer_stats=stats(False),
        )
        report_targets(t1, t2)
    if "count" in args.sections:
        for pairs in count_pairs:
            compare_counts(
                f"count at {pairs} pairs",
                pairs=pairs,
                window=args.window,
                messages=args.messages,
                warmup=args.warmup_messages,
                rounds=args.rounds,
                writer_stats=stats(False),
            )
    if "duration" in args.sections:
        print(
            f"relay: window {WINDOW} unanswered sends per client, {BODY_CHARS}-char "
            f"ciphertexts, warm-up {args.warmup:g} s, measured {args.duration:g} s per run"
        )
        driver = partial(drive, warmup=args.warmup, duration=args.duration)
        for pairs in timed_pairs:
            chatd = run_chatd(pairs, driver, stats(True))
            report_run(chatd)
            bare = run_bare(pairs, driver)
            report_run(bare)
            report_ratio(chatd, bare)
    if "idle" in args.sections:
        for n in args.idle_connections:
            run_idle(n, args.idle_users, {}, "chatd as it runs")
            if args.idle_mmap:
                run_idle(n, args.idle_users, FIXED_MMAP_ENV, "MALLOC_MMAP_THRESHOLD_=1048576")


if __name__ == "__main__":
    main()
