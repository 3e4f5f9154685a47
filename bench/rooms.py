"""Rooms: fan-out latency, server CPU per delivered copy, storage, and churn.

One run of the real daemon (``chatd init`` into a temp dir, ``chatd serve``
with NOTIFY_SOCKET, as systemd would; the helpers of ``bench/_daemon.py``
and the relay settings of ``bench/relay.py``: port 0, 10-minute idle
timeout, no MFA, login limits and the per-account request rates
(``RELAXED_RELAY``: sends, key claims, directory reads) out of the way).
``relay.max_frame_bytes`` is raised to --max-frame-bytes (default 262,144)
so that one direct ``send`` can carry a ciphertext for every member device
(199 x ~460 characters is about 100 KB, above the default 65,536); the frame
size is printed.

**Devices.** --members users (default 200), one device each, seeded with the
daemon stopped (``seed_users``: one Argon2id hash, one row per account).
Each logs in once, SETUP_CONCURRENCY at a time (one Argon2id verification
each), and publishes signed identity keys, 5 one-time keys and a fallback key
of a vodozemac account this process keeps. The connections stay open; every
device answers each ``deliver`` with ``ack up_to`` its last envelope.

**The room.** Device 0 (the *sender*) creates a channel; the others join it,
so the room has --members member devices, all online. Then the sender shares
a Megolm session as a real client would (``keys_claim``, an outbound Olm
session per device, one ``room_key`` each in ``send`` frames split by frame
size; see "Churn"), unmeasured but printed.

**1. Fan-out latency** and **2. server CPU per delivered copy**, in --rounds
rounds (default 2), each a *room* phase then a *direct* phase (the baseline),
after a few unmeasured messages of each:

* room: --messages (default 100) ``room_send`` frames, one at a time, each a
  real Megolm ciphertext (vodozemac ``GroupSession``, a 100-character text,
  wrapped as the client library does: about 400 characters); the server
  stores it once and queues it for the other --members - 1 devices.
* direct: --messages ``send`` frames, one at a time, each naming the same
  --members - 1 devices with a ciphertext of the same length for each
  (random base64: the server never decrypts).

Each message is timed from writing its frame to the **last** device reading
it (and to the sender reading ``sent``); the next is sent once every device
has it and ``sent`` came. p50/p99 are taken over all rounds. The server's CPU
(utime + stime of all its threads, /proc/PID/stat) is read before the phase
and after every ``delivered`` receipt came back to the sender plus 0.3 s, so
it pays for the sends, the deliveries, the acks, the receipts and their
acks; divided by messages x (members - 1) delivered copies.

**3. Storage with members offline.** The members' connections close (the
sender's stays). --offline-messages (default 100) room messages, then as many
direct sends to the same devices; nothing is acknowledged, so each is
written. After each phase the script reads the database through chatd's own
store code (``chatd.store.db.connect`` with the key from the data dir,
concurrently with the running daemon: SQLite's WAL allows that) and reports
per message: rows and column bytes added to ``room_log`` / ``envelopes``,
the growth of the pages in use (``page_count - freelist_count``: freed pages
are reused, so the file alone can hide growth), and the growth of the main
file after a passive WAL checkpoint.

**4. Churn** (--churn rounds, default 3). The last member leaves
(``room_leave``); timed: the ``left`` event reaching the sender, the
sender's ``room_members`` (new epoch and devices), then on the client a new
Megolm session (vodozemac ``GroupSession``, ``session_key``), a ``room_key``
payload per remaining device (members - 2 of them) framed as the client
library's ``encode_control`` does, and ``Session.encrypt`` over the Olm
sessions the setup share established; the ``send`` frames (split as the
client library's ``OlmSender.send_split`` does, for --share-frame-bytes,
default 65,536, the default ``max_frame_bytes``), each answered by ``sent``;
the last device reading its share; and the first room message under the new
session reaching every remaining device. The server CPU over the sends is
printed too. One device decrypts its share to check it is the new key. The
member then joins again (unmeasured) for the next round.

Every wait has a timeout; everything is on loopback; the daemon gets SIGTERM
at the end and must exit 0. Warning and error lines of its log are shown.

    .venv/bin/python bench/rooms.py                         # the figures, a few minutes
    .venv/bin/python bench/rooms.py --members 200 --messages 100 --rounds 2 --churn 3
    .venv/bin/python bench/rooms.py --members 3 --messages 3 --rounds 1 --churn 1   # smoke
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import sys
import tempfile
import time
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec
import trio
import vodozemac
from _daemon import (
    RELAXED_ADDRESSES,
    Daemon,
    cpu_seconds,
    init_data_dir,
    ms,
    percentile,
    raise_nofile,
    seed_users,
    set_settings,
)
from relay import (
    CLOSE_TIMEOUT,
    CONNECT_TIMEOUT,
    COUNT_SETTLE,
    PASSWORD,
    SETUP_CONCURRENCY,
    Window,
    _fs_type,
    _snapshot,
    _window,
    configure,
    keys_upload,
    log_findings,
    login,
    reply_to,
)
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

REQUEST_TIMEOUT: Final = 60.0  # seconds for one request's answer
FANOUT_TIMEOUT: Final = 30.0  # seconds for one message to reach every device
SETTLE_TIMEOUT: Final = 120.0  # seconds for the room's events to reach every device
WARMUP: Final = 5  # unmeasured messages of each kind before the rounds
TEXT_CHARS: Final = 100  # characters of the text inside each Megolm ciphertext
MAX_CLAIMS: Final = 100  # devices per keys_claim (the server's limit)
MAX_ENVELOPES: Final = 200  # envelopes per send (the server's limit)
FRAME_SLACK: Final = 1_024  # bytes of a frame left free, as the client library does
LATENCY_TARGET: Final = 0.050  # seconds: fan-out p50 and p99 at most this

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode().rstrip("=")


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f} µs"


# -- the devices --------------------------------------------------------------------------------


@dataclass
class Tracker:
    """Who has read one message (by message id) so far, and when."""

    expected: int
    times: list[float] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)
    keep_for: int = -1  # the device index whose ciphertext is kept
    kept: str = ""

    def arrived(self, now: float) -> None:
        self.times.append(now)
        if len(self.times) >= self.expected:
            self.done.set()


@dataclass(eq=False)
class Device:
    index: int
    ws: WebSocketConnection
    user_id: int
    device_id: str
    account: vodozemac.Account
    bench: Bench
    release: trio.Event = field(default_factory=trio.Event)
    waiting: dict[str, trio.Event] = field(default_factory=dict)
    replies: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: int = 0
    epoch_seen: int = -1  # the highest room epoch in a room event read
    events: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    receipts: int = 0  # delivered receipts read
    inbound: vodozemac.Session | None = None  # the Olm session from the sender

    async def request(self, frame_type: str, /, **fields: Any) -> tuple[dict[str, Any], float]:
        """Send one request; its answer and the time it was read."""
        self.requests += 1
        request_id = str(fields.pop("id", f"r{self.requests}"))
        answered = self.waiting[request_id] = trio.Event()
        frame = {"type": frame_type, "id": request_id, **fields}
        await self.ws.send_message(_encode(frame).decode())
        with trio.fail_after(REQUEST_TIMEOUT):
            await answered.wait()
        reply = self.replies.pop(request_id)
        return reply, reply.pop("_read_at")

    async def expect(self, frame_type: str, want: str, /, **fields: Any) -> dict[str, Any]:
        reply, _ = await self.request(frame_type, **fields)
        if reply.get("type") != want:
            raise SystemExit(f"device {self.index}: {frame_type} answered {reply!r}")
        return reply

    async def read(self) -> None:
        """Read every frame: answers, deliveries (each acknowledged), pushes."""
        bench = self.bench
        for _ in range(100_000_000):
            try:
                raw = await self.ws.get_message()
            except ConnectionClosed as exc:
                if not self.release.is_set():
                    bench.failures.append(f"device {self.index} disconnected: {exc.reason}")
                return
            now = trio.current_time()
            frame: dict[str, Any] = _decode(raw)
            kind = frame.get("type")
            if kind == "deliver":
                envelopes = frame["envelopes"]
                for env in envelopes:
                    self.take(env, now)
                ack = {"type": "ack", "up_to": envelopes[-1]["envelope_id"]}
                try:
                    await self.ws.send_message(_encode(ack).decode())
                except ConnectionClosed:
                    continue  # the next read reports it
            elif "id" in frame and frame["id"] in self.waiting:
                frame["_read_at"] = now
                self.replies[frame["id"]] = frame
                self.waiting.pop(frame["id"]).set()
            else:
                bench.other[str(kind)] = bench.other.get(str(kind), 0) + 1

    def take(self, env: dict[str, Any], now: float) -> None:
        kind = env["kind"]
        if kind in ("message", "room_message"):
            tracker = self.bench.tracking.get(env["message_id"])
            if tracker is None:
                self.bench.untracked += 1
                return
            tracker.arrived(now)
            if tracker.keep_for == self.index:
                tracker.kept = env["ciphertext"]
        elif kind == "delivered":
            self.receipts += 1
        elif kind == "room_event":
            event = env["event"]
            self.epoch_seen = max(self.epoch_seen, int(event["epoch"]))
            self.events.append((now, event))
        else:
            self.bench.other[f"envelope {kind}"] = self.bench.other.get(f"envelope {kind}", 0) + 1


@dataclass
class Bench:
    url: str
    members: int
    slots: trio.Semaphore = field(default_factory=lambda: trio.Semaphore(SETUP_CONCURRENCY))
    devices: dict[int, Device] = field(default_factory=dict)
    all_ready: trio.Event = field(default_factory=trio.Event)
    tracking: dict[str, Tracker] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    other: dict[str, int] = field(default_factory=dict)
    untracked: int = 0

    @property
    def sender(self) -> Device:
        return self.devices[0]

    def track(self, message_id: str, expected: int, keep_for: int = -1) -> Tracker:
        tracker = self.tracking[message_id] = Tracker(expected, keep_for=keep_for)
        return tracker


async def device_task(bench: Bench, index: int) -> None:
    """Connect, log in, publish keys (SETUP_CONCURRENCY devices at a time); then
    read until released, and close."""
    try:
        async with AsyncExitStack() as stack:
            async with bench.slots:
                ws = await stack.enter_async_context(
                    open_websocket_url(
                        bench.url, connect_timeout=CONNECT_TIMEOUT, disconnect_timeout=CLOSE_TIMEOUT
                    )
                )
                with trio.fail_after(CONNECT_TIMEOUT):
                    session = await login(ws, f"m{index:04d}", f"rooms bench {index}")
                    user_id, device_id = int(session["user"]["id"]), str(session["device_id"])
                    account = vodozemac.Account()
                    upload = keys_upload(user_id, device_id, account)
                    await ws.send_message(_encode(upload).decode())
                    count = await reply_to(ws, "keys")
                    if count.get("type") != "key_count":
                        raise RuntimeError(f"keys_upload refused: {count!r}")
            device = Device(index, ws, user_id, device_id, account, bench)
            bench.devices[index] = device
            if len(bench.devices) == bench.members:
                bench.all_ready.set()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(device.read)
                await device.release.wait()
                nursery.cancel_scope.cancel()
    except Exception as exc:
        bench.failures.append(f"device {index}: {type(exc).__name__}: {exc}")
        bench.all_ready.set()


async def wait_for(what: str, done: Any, timeout: float, bench: Bench) -> None:
    """Poll ``done()`` every 5 ms until true; stop the script after ``timeout``."""
    with trio.move_on_after(timeout):
        while not done():
            if bench.failures:
                raise SystemExit(f"{what}: " + "; ".join(bench.failures[:5]))
            await trio.sleep(0.005)
        return
    raise SystemExit(f"{what}: not done after {timeout:.0f} s")


# -- the room and its keys ------------------------------------------------------------------------


@dataclass
class RoomState:
    room_id: int
    epoch: int
    devices: list[dict[str, Any]]  # the member devices but the sender's, as room_members lists them
    group: vodozemac.GroupSession = field(default_factory=vodozemac.GroupSession)
    #: The sender's own inbound copy of ``group``, which it exports keys from.
    own: vodozemac.InboundGroupSession | None = None
    olm: dict[str, vodozemac.Session] = field(default_factory=dict)  # device id -> outbound


async def read_members(bench: Bench, room_id: int) -> tuple[int, list[dict[str, Any]]]:
    reply = await bench.sender.expect("room_members", "room_members", room_id=room_id)
    devices = [
        {"user_id": member["user_id"], **device}
        for member in reply["members"]
        for device in member["devices"]
        if device["device_id"] != bench.sender.device_id
    ]
    return int(reply["epoch"]), devices


async def make_room(bench: Bench) -> RoomState:
    """The sender creates a channel, everyone else joins; wait until every
    device has read the room's last event."""
    room = (await bench.sender.expect("room_create", "room", name="bench", kind="channel"))["room"]
    room_id = int(room["room_id"])
    joins = trio.Semaphore(SETUP_CONCURRENCY)

    async def join(device: Device) -> None:
        async with joins:
            await device.expect("room_join", "room", room_id=room_id)

    async with trio.open_nursery() as nursery:
        for i in range(1, bench.members):
            nursery.start_soon(join, bench.devices[i])
    epoch, devices = await read_members(bench, room_id)
    everyone = list(bench.devices.values())
    await wait_for(
        "room events", lambda: all(d.epoch_seen >= epoch for d in everyone), SETTLE_TIMEOUT, bench
    )
    return RoomState(room_id, epoch, devices)


def room_key_payload(state: RoomState, key: str, message_id: str, to_user_id: int) -> bytes:
    """A ``room_key`` as the client library frames it (``encode_control``)."""
    fields = {
        "kind": "room_key",
        "room_id": state.room_id,
        "session_id": state.group.session_id,
        "session_key": key,
        "first_index": state.group.message_index,
        "v": 1,
        "message_id": message_id,
        "to_user_id": to_user_id,
    }
    return json.dumps(fields, ensure_ascii=False).encode()


def olm_ciphertext(message: vodozemac.AnyOlmMessage) -> str:
    """An Olm message as the client library puts it in an envelope."""
    message_type, body = message.to_parts()
    return json.dumps({"v": 1, "type": message_type, "body": _b64(body)})


async def open_olm_sessions(bench: Bench, state: RoomState) -> None:
    """Claim a one-time key of every member device the sender has no Olm session
    with, and open an outbound session to it (what a client does once)."""
    need = [d for d in state.devices if d["device_id"] not in state.olm]
    for i in range(0, len(need), MAX_CLAIMS):
        batch = need[i : i + MAX_CLAIMS]
        refs = [{"user_id": d["user_id"], "device_id": d["device_id"]} for d in batch]
        reply = await bench.sender.expect("keys_claim", "keys_claimed", devices=refs)
        by_id = {d["device_id"]: d for d in batch}
        for key in reply["keys"]:
            peer = by_id[key["device_id"]]
            state.olm[key["device_id"]] = bench.sender.account.create_outbound_session(
                vodozemac.Curve25519PublicKey.from_base64(peer["curve25519"]),
                vodozemac.Curve25519PublicKey.from_base64(key["curve25519"]),
            )
        if reply["missing"]:
            raise SystemExit(f"keys_claim: no keys for {reply['missing']!r}")


def share_batches(count: int, plaintext_bytes: int, frame_bytes: int) -> int:
    """Devices per ``send`` of a room key share: the client library's estimate
    of one envelope's frame bytes (``estimate_envelope_bytes``), within the
    frame and the 200-envelope limit."""
    envelope = (plaintext_bytes + 220) * 4 // 3 + 160
    return max(1, min(MAX_ENVELOPES, (frame_bytes - FRAME_SLACK) // envelope, count))


@dataclass
class Share:
    """One room key share to every member device, timed."""

    encrypt_wall: float = 0.0  # seconds: new session, payloads, Olm encryption
    encrypt_cpu: float = 0.0  # CPU seconds of this process in that
    sends: int = 0
    frame_bytes: list[int] = field(default_factory=list)
    to_sent: float = 0.0  # seconds from the first send written to the last `sent` read
    to_last_device: float = 0.0  # seconds from the first send written to the last device
    server_cpu: float = 0.0  # daemon CPU seconds from the first send to the last device
    check: str = ""


async def share_key(
    bench: Bench, state: RoomState, pid: int, frame_bytes: int, *, rotate: bool
) -> Share:
    """(Rotate and) share the sender's Megolm session with every member device."""
    out = Share()
    wall, cpu = time.perf_counter(), time.process_time()
    if rotate or state.own is None:
        # As the client library rotates: a new outbound session and its own
        # inbound copy, exported at the current index for the share.
        state.group = vodozemac.GroupSession()
        state.own = vodozemac.InboundGroupSession(state.group.session_key)
    key = state.own.export_at(state.group.message_index).to_base64()
    sample = len(room_key_payload(state, key, str(uuid.UUID(int=0)), 2**63 - 1))
    per_send = share_batches(len(state.devices), sample, frame_bytes)
    frames: list[tuple[str, list[dict[str, Any]]]] = []
    for i in range(0, len(state.devices), per_send):
        message_id = str(uuid.uuid4())
        envelopes = []
        for d in state.devices[i : i + per_send]:
            plaintext = room_key_payload(state, key, message_id, int(d["user_id"]))
            message = state.olm[d["device_id"]].encrypt(plaintext)
            envelopes.append(
                {
                    "user_id": d["user_id"],
                    "device_id": d["device_id"],
                    "ciphertext": olm_ciphertext(message),
                }
            )
        frames.append((message_id, envelopes))
    out.encrypt_wall = time.perf_counter() - wall
    out.encrypt_cpu = time.process_time() - cpu
    out.sends = len(frames)
    checked = bench.devices[1] if bench.members > 1 else None
    trackers = [
        bench.track(mid, len(envs), keep_for=checked.index if checked else -1)
        for mid, envs in frames
    ]
    cpu_before = cpu_seconds(pid)
    started = trio.current_time()
    last_sent = started
    for message_id, envelopes in frames:
        frame = {"type": "send", "id": message_id, "message_id": message_id}
        out.frame_bytes.append(len(_encode({**frame, "envelopes": envelopes})))
        reply, read_at = await bench.sender.request(
            "send", id=message_id, message_id=message_id, envelopes=envelopes
        )
        if reply.get("type") != "sent":
            raise SystemExit(f"room key share refused: {str(reply)[:500]}")
        last_sent = max(last_sent, read_at)
    for tracker in trackers:
        with trio.fail_after(FANOUT_TIMEOUT):
            await tracker.done.wait()
    out.server_cpu = cpu_seconds(pid) - cpu_before
    out.to_sent = last_sent - started
    out.to_last_device = max(max(t.times) for t in trackers) - started
    if checked is not None:
        kept = next(t.kept for t in trackers if t.kept)
        out.check = decrypt_check(checked, bench.sender, kept, state)
    return out


def decrypt_check(device: Device, sender: Device, ciphertext: str, state: RoomState) -> str:
    """Decrypt one device's share; its session key must be the sender's."""
    obj = json.loads(ciphertext)
    body = base64.b64decode(obj["body"] + "=" * (-len(obj["body"]) % 4))
    message = vodozemac.AnyOlmMessage.from_parts(obj["type"], body)
    started = time.perf_counter()
    if device.inbound is None:
        device.inbound, plaintext = device.account.create_inbound_session(
            sender.account.curve25519_key, message.to_pre_key()
        )
    else:
        plaintext = device.inbound.decrypt(message)
    took = time.perf_counter() - started
    fields = json.loads(plaintext)
    ok = fields["session_id"] == state.group.session_id
    exported = vodozemac.ExportedSessionKey(fields["session_key"])
    inbound = vodozemac.InboundGroupSession.import_session(exported)
    ok = ok and inbound.session_id == state.group.session_id
    return f"device {device.index} decrypted its share in {ms(took)}: " + (
        "the new session key" if ok else "WRONG KEY"
    )


def megolm_ciphertext(group: vodozemac.GroupSession, room_id: int) -> str:
    """A room ciphertext as the client library makes it (room_payloads)."""
    text = base64.b64encode(os.urandom(TEXT_CHARS)).decode()[:TEXT_CHARS]
    plain = {"v": 1, "kind": "text", "room_id": room_id, "text": text, "mentions": []}
    message = group.encrypt(json.dumps(plain).encode())
    return json.dumps({"v": 1, "session_id": group.session_id, "body": _b64(message.to_bytes())})


# -- phases of messages ---------------------------------------------------------------------------


@dataclass
class Phase:
    kind: str  # "room" or "direct"
    messages: int
    copies: int  # devices each message is for
    to_last: list[float] = field(default_factory=list)  # send -> last device, seconds
    to_first: list[float] = field(default_factory=list)  # send -> first device
    to_sent: list[float] = field(default_factory=list)  # send -> `sent`
    window: Window = field(default_factory=Window)
    skipped: int = 0

    @property
    def cpu_per_copy(self) -> float:
        return self.window.server_cpu / (self.messages * self.copies)


def direct_bodies(state: RoomState, length: int) -> list[dict[str, Any]]:
    chars = length * 3 // 4 + 3
    return [
        {
            "user_id": d["user_id"],
            "device_id": d["device_id"],
            "ciphertext": base64.b64encode(os.urandom(chars)).decode()[:length],
        }
        for d in state.devices
    ]


async def send_one(bench: Bench, state: RoomState, kind: str, body: Any, phase: Phase) -> None:
    """One message, one at a time: sent, and read by every member device."""
    message_id = str(uuid.uuid4())
    tracker = bench.track(message_id, len(state.devices))
    started = trio.current_time()
    if kind == "room":
        reply, read_at = await bench.sender.request(
            "room_send",
            id=message_id,
            room_id=state.room_id,
            message_id=message_id,
            epoch=state.epoch,
            ciphertext=body,
        )
    else:
        reply, read_at = await bench.sender.request(
            "send", id=message_id, message_id=message_id, envelopes=body
        )
    if reply.get("type") != "sent" or reply.get("envelopes") != len(state.devices):
        raise SystemExit(f"{kind} send: {str(reply)[:500]}")
    phase.skipped += len(reply.get("skipped", ()))
    if phase.copies:
        with trio.fail_after(FANOUT_TIMEOUT):
            await tracker.done.wait()
        phase.to_last.append(max(tracker.times) - started)
        phase.to_first.append(min(tracker.times) - started)
    phase.to_sent.append(read_at - started)
    del bench.tracking[message_id]


async def run_phase(
    bench: Bench, state: RoomState, pid: int, kind: str, count: int, copies: int
) -> Phase:
    """``count`` messages of this kind, one at a time, with the server's CPU over
    them and until every ``delivered`` receipt is back (plus COUNT_SETTLE)."""
    phase = Phase(kind, count, copies)
    if kind == "room":
        bodies: list[Any] = [megolm_ciphertext(state.group, state.room_id) for _ in range(count)]
    else:
        length = len(megolm_ciphertext(state.group, state.room_id))
        bodies = [direct_bodies(state, length) for _ in range(count)]
    sender = bench.sender
    receipts = sender.receipts + count * copies
    a = _snapshot(pid)
    mono = time.monotonic()
    for body in bodies:
        await send_one(bench, state, kind, body, phase)
    if copies:
        await wait_for(f"{kind} receipts", lambda: sender.receipts >= receipts, 60.0, bench)
        await trio.sleep(COUNT_SETTLE)
    phase.window = _window(a, _snapshot(pid), mono, time.monotonic())
    return phase


# -- storage with the members offline ------------------------------------------------------------


@dataclass
class Usage:
    room_rows: int
    room_bytes: int  # ciphertext and other column bytes of room_log
    room_ciphertext: int
    envelope_rows: int
    envelope_bytes: int
    envelope_ciphertext: int
    used_bytes: int  # (page_count - freelist_count) * page_size
    file_bytes: int  # the main file after a passive checkpoint
    wal_bytes: int

    def minus(self, other: Usage) -> Usage:
        return Usage(*(a - b for a, b in zip(self.row(), other.row(), strict=True)))

    def row(self) -> tuple[int, ...]:
        return (
            self.room_rows,
            self.room_bytes,
            self.room_ciphertext,
            self.envelope_rows,
            self.envelope_bytes,
            self.envelope_ciphertext,
            self.used_bytes,
            self.file_bytes,
            self.wal_bytes,
        )


#: Column bytes of a row: texts and blobs at their length, integers at 8 (at most).
_ROOM_USAGE: Final = (
    "SELECT count(*), coalesce(sum(length(message_id) + coalesce(length(sender_device_id), 0)"
    " + coalesce(length(ciphertext), 0) + coalesce(length(event), 0) + length(kind) + 8 * 5), 0),"
    " coalesce(sum(length(ciphertext)), 0) FROM room_log"
)


def read_usage(config: Path) -> Usage:
    """Read the database through chatd's store code, beside the running daemon."""
    from chatd.config import load_config
    from chatd.keyfiles import load_db_key
    from chatd.store.db import close_quietly, connect

    settings = load_config(config)
    path = settings.database_path
    conn = connect(path, load_db_key(settings), busy_timeout_ms=10_000)
    try:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(envelopes)")]
        texts = [c for c in columns if c not in ("id", "created_at", "expires_at", "sent_at")]
        size = " + ".join(f"coalesce(length({c}), 0)" for c in texts)
        envelope_usage = (
            f"SELECT count(*), coalesce(sum({size} + 8 * 3), 0),"  # noqa: S608 - column names
            " coalesce(sum(length(ciphertext)), 0) FROM envelopes"
        )
        room = conn.execute(_ROOM_USAGE).fetchone()
        envelopes = conn.execute(envelope_usage).fetchone()
        page = int(conn.execute("PRAGMA page_size").fetchone()[0])
        used = int(conn.execute("PRAGMA page_count").fetchone()[0])
        used -= int(conn.execute("PRAGMA freelist_count").fetchone()[0])
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    finally:
        close_quietly(conn)
    wal = Path(f"{path}-wal")
    return Usage(
        *room,
        *envelopes,
        used * page,
        path.stat().st_size,
        wal.stat().st_size if wal.exists() else 0,
    )


@dataclass
class Offline:
    messages: int
    copies: int
    ciphertext_chars: int
    room: Usage
    direct: Usage
    room_phase: Phase
    direct_phase: Phase


async def offline_storage(
    bench: Bench, state: RoomState, pid: int, config: Path, count: int
) -> Offline:
    for i in range(1, bench.members):
        bench.devices[i].release.set()
    await trio.sleep(1.0)  # the closes reach the daemon; hot entries are written
    before = await trio.to_thread.run_sync(read_usage, config)
    room_phase = await run_phase(bench, state, pid, "room", count, 0)
    await trio.sleep(COUNT_SETTLE)
    middle = await trio.to_thread.run_sync(read_usage, config)
    direct_phase = await run_phase(bench, state, pid, "direct", count, 0)
    await trio.sleep(COUNT_SETTLE)
    after = await trio.to_thread.run_sync(read_usage, config)
    return Offline(
        count,
        len(state.devices),
        len(megolm_ciphertext(state.group, state.room_id)),
        middle.minus(before),
        after.minus(middle),
        room_phase,
        direct_phase,
    )


# -- churn -------------------------------------------------------------------------------------


@dataclass
class Churn:
    leave: float  # room_leave -> `ok`
    left_event: float  # room_leave written -> the sender reads the `left` event
    members: float  # the sender's room_members round trip
    share: Share
    first_message: float  # room_send under the new session -> the last device
    remaining: int


async def churn_round(bench: Bench, state: RoomState, pid: int, frame_bytes: int) -> Churn:
    leaver = bench.devices[bench.members - 1]
    sender = bench.sender
    seen = len(sender.events)
    started = trio.current_time()
    await leaver.expect("room_leave", "ok", room_id=state.room_id)
    leave = trio.current_time() - started
    await wait_for("the left event", lambda: len(sender.events) > seen, 30.0, bench)
    left_at, event = sender.events[seen]
    if event["type"] != "left":
        raise SystemExit(f"the sender read {event!r}, not a left event")
    asked = trio.current_time()
    state.epoch, state.devices = await read_members(bench, state.room_id)
    members = trio.current_time() - asked
    share = await share_key(bench, state, pid, frame_bytes, rotate=True)
    phase = Phase("room", 1, len(state.devices))
    body = megolm_ciphertext(state.group, state.room_id)
    await send_one(bench, state, "room", body, phase)
    churn = Churn(leave, left_at - started, members, share, phase.to_last[0], len(state.devices))
    # Unmeasured: the member joins again (a new member device gets the current
    # session from its current index; no rotation) and every device hears it.
    await leaver.expect("room_join", "room", room_id=state.room_id)
    state.epoch, state.devices = await read_members(bench, state.room_id)
    epoch, everyone = state.epoch, list(bench.devices.values())
    await wait_for(
        "the join", lambda: all(d.epoch_seen >= epoch for d in everyone), SETTLE_TIMEOUT, bench
    )
    await share_key(bench, state, pid, frame_bytes, rotate=False)
    return churn


# -- the run --------------------------------------------------------------------------------------


@dataclass
class Results:
    setup: dict[str, float] = field(default_factory=dict)
    first_share: Share | None = None
    phases: list[Phase] = field(default_factory=list)
    churn: list[Churn] = field(default_factory=list)
    offline: Offline | None = None


async def drive(bench: Bench, pid: int, config: Path, args: argparse.Namespace) -> Results:
    results = Results()
    async with trio.open_nursery() as nursery:
        started = time.monotonic()
        for i in range(bench.members):
            nursery.start_soon(device_task, bench, i)
        with trio.move_on_after(600.0):
            await bench.all_ready.wait()
        if bench.failures or len(bench.devices) < bench.members:
            raise SystemExit(
                f"{len(bench.devices)} of {bench.members} devices set up: "
                + "; ".join(bench.failures[:5])
            )
        results.setup["logins"] = time.monotonic() - started
        started = time.monotonic()
        state = await make_room(bench)
        results.setup["room"] = time.monotonic() - started
        started = time.monotonic()
        await open_olm_sessions(bench, state)
        results.setup["olm"] = time.monotonic() - started
        results.first_share = await share_key(
            bench, state, pid, args.share_frame_bytes, rotate=True
        )
        copies = len(state.devices)
        for kind in ("room", "direct"):
            await run_phase(bench, state, pid, kind, WARMUP, copies)
        for _ in range(args.rounds):
            for kind in args.kinds:
                results.phases.append(
                    await run_phase(bench, state, pid, kind, args.messages, copies)
                )
        if bench.members > 2:
            for _ in range(args.churn):
                results.churn.append(await churn_round(bench, state, pid, args.share_frame_bytes))
        if args.offline_messages:
            results.offline = await offline_storage(
                bench, state, pid, config, args.offline_messages
            )
        for device in bench.devices.values():
            device.release.set()
    return results


def run(args: argparse.Namespace) -> None:
    raise_nofile(4 * args.members + 1_024)
    names = [f"m{i:04d}" for i in range(args.members)]
    with tempfile.TemporaryDirectory(prefix="chatd-bench-") as tmp:
        work = Path(tmp)
        data = work / "data"
        config = init_data_dir(data)
        configure(config, idle=False, clients=args.members)
        set_settings(
            config, "relay", {**RELAXED_ADDRESSES, "max_frame_bytes": args.max_frame_bytes}
        )
        set_settings(config, "auth", {"access_token_minutes": 120.0})
        seeded = seed_users(config, names, PASSWORD)
        daemon = Daemon(config, work, lag_log=work / "lag.log" if args.lag else None)
        daemon.start()
        try:
            daemon.wait_ready()
            url, _port = daemon.relay_url()
            bench = Bench(url, args.members)
            results = trio.run(drive, bench, daemon.pid, config, args)
        except BaseException:
            daemon.kill()
            print(f"daemon log tail:\n{daemon.log_tail()}", file=sys.stderr)
            raise
        code, _ = daemon.stop()
        log = daemon.log_path.read_text(errors="replace")
        lag = (work / "lag.log").read_text() if args.lag else ""
        fs = _fs_type(data)
    report(args, results, bench, seeded, fs, lag)
    findings = log_findings(log)
    print(f"daemon log: {len(log.splitlines())} lines, {len(findings)} warning/error")
    for line in findings[:5]:
        print(f"  {line[:300]}")
    print(f"SIGTERM to exit {code}")
    if code != 0:
        raise SystemExit(f"chatd exited with {code} after SIGTERM, expected 0")


# -- the report -----------------------------------------------------------------------------------


def _pooled(phases: list[Phase], kind: str, attr: str) -> list[float]:
    return [v for p in phases if p.kind == kind for v in getattr(p, attr)]


def _q(values: list[float], q: float) -> float:
    return percentile(values, q) if values else math.nan


def _cpu(phases: list[Phase], kind: str) -> float:
    chosen = [p for p in phases if p.kind == kind]
    copies = sum(p.messages * p.copies for p in chosen)
    return sum(p.window.server_cpu for p in chosen) / copies if copies else math.nan


def lag_summary(lag: str, window: Window) -> str:
    """The worst event-loop lag and longest task step of the daemon in a window."""
    worst, step, task = 0.0, 0.0, "-"
    for line in lag.splitlines():
        parts = line.split(" ", 6)
        if len(parts) < 7 or not window.mono_start <= float(parts[0]) <= window.mono_end:
            continue
        worst = max(worst, float(parts[1]))
        if float(parts[2]) > step:
            step, task = float(parts[2]), parts[6]
    return f"loop lag max {ms(worst)}, longest step {ms(step)} ({task})"


def report(
    args: argparse.Namespace, res: Results, bench: Bench, seeded: float, fs: str, lag: str
) -> None:
    n = args.members
    print(
        f"rooms bench: {n} users with one device each, all in one channel; the sender is "
        f"device 0, so each message is for {n - 1} devices; data dir on {fs}; "
        f"relay.max_frame_bytes {args.max_frame_bytes:,}"
    )
    print(
        f"setup: {n} accounts seeded in {seeded:.1f} s; {n} logins with keys in "
        f"{res.setup['logins']:.1f} s; room made and joined in {res.setup['room']:.1f} s; "
        f"{n - 1} Olm sessions opened (keys_claim) in {res.setup['olm']:.2f} s"
    )
    if res.first_share is not None:
        print("setup: first room key share: " + describe_share(res.first_share))
    for i, phase in enumerate(res.phases):
        w = phase.window
        label = i // len(args.kinds) + 1
        line = (
            f"  round {label} {phase.kind:6}: {phase.messages} x {phase.copies} copies; "
            f"send->last device p50 {ms(percentile(phase.to_last, 50))} "
            f"p99 {ms(percentile(phase.to_last, 99))}; send->sent p50 "
            f"{ms(percentile(phase.to_sent, 50))}; server CPU {w.server_cpu:.2f} s "
            f"(loop thread {w.server_loop_cpu:.2f} s) = {_us(phase.cpu_per_copy)} per copy; "
            f"clients {w.client_cpu:.2f} s; window {w.end - w.start:.2f} s"
        )
        if args.lag:
            line += "; " + lag_summary(lag, w)
        print(line)
        if phase.skipped:
            print(f"  round {label} {phase.kind}: PROBLEM: {phase.skipped} skipped devices")
        if w.others / max(w.end - w.start, 1e-9) > 0.2:
            print(f"  WARNING: other processes competed for the CPU ({w.busiest_other})")
    phases = res.phases
    table: list[tuple[str, str, str, str]] = []

    def row(name: str, room: float, direct: float, show: Any) -> None:
        table.append((name, show(room), show(direct), _ratio(room, direct)))

    if phases:
        for q in (50, 99):
            row(
                f"1. fan-out send->last device p{q}",
                _q(_pooled(phases, "room", "to_last"), q),
                _q(_pooled(phases, "direct", "to_last"), q),
                ms,
            )
        for attr, name in (("to_first", "send->first device"), ("to_sent", "send->sent")):
            room_q = _q(_pooled(phases, "room", attr), 50)
            row(f"   {name} p50", room_q, _q(_pooled(phases, "direct", attr), 50), ms)
        row("2. server CPU per delivered copy", _cpu(phases, "room"), _cpu(phases, "direct"), _us)
        copies = max(p.copies for p in phases)
        row(
            f"   server CPU per message (x{copies} copies)",
            _cpu(phases, "room") * copies,
            _cpu(phases, "direct") * copies,
            _us,
        )
    off = res.offline
    if off is not None:
        m, c = off.messages, off.copies
        room, direct = off.room, off.direct

        def size(v: float) -> str:
            return f"{v:,.0f} B"

        def rows(v: float) -> str:
            return f"{v:,.1f}"

        row(
            f"3. stored ciphertext per message (x{c} devices)",
            room.room_ciphertext / m,
            direct.envelope_ciphertext / m,
            size,
        )
        row(
            "   rows per message (room_log / envelopes)",
            room.room_rows / m,
            direct.envelope_rows / m,
            rows,
        )
        row("   row column bytes per message", room.room_bytes / m, direct.envelope_bytes / m, size)
        row("   pages in use, growth per message", room.used_bytes / m, direct.used_bytes / m, size)
        row(
            "   file growth per message (checkpointed)",
            room.file_bytes / m,
            direct.file_bytes / m,
            size,
        )
        row(
            "   server CPU per stored message",
            off.room_phase.window.server_cpu / m,
            off.direct_phase.window.server_cpu / m,
            _us,
        )
        row(
            "   send->sent p50 (durable)",
            _q(off.room_phase.to_sent, 50),
            _q(off.direct_phase.to_sent, 50),
            ms,
        )
    if table:
        width = max(len(row[0]) for row in table)
        print(f"{'summary':{width}}  {'room':>18}  {'direct (baseline)':>20}  {'room/direct':>11}")
        for name, a, b, r in table:
            print(f"{name:{width}}  {a:>18}  {b:>20}  {r:>11}")
    if off is not None:
        print(
            f"3. offline: {off.messages} messages of each kind with {off.copies} member devices "
            f"offline; the ciphertext is {off.ciphertext_chars} characters; WAL "
            f"{off.direct.wal_bytes + off.room.wal_bytes:+,} bytes over both phases"
        )
    for i, churn in enumerate(res.churn):
        print(
            f"4. churn round {i + 1}: leave->ok {ms(churn.leave)}; leave->sender reads `left` "
            f"{ms(churn.left_event)}; room_members {ms(churn.members)}; share with "
            f"{churn.remaining} devices: "
            + describe_share(churn.share)
            + f"; first message under the new session to the last device "
            f"{ms(churn.first_message)}"
        )
    if res.churn:
        total = [
            c.left_event
            + c.members
            + c.share.encrypt_wall
            + c.share.to_last_device
            + c.first_message
            for c in res.churn
        ]
        print(
            f"4. churn: from the leave to the new key at every device and the first message "
            f"under it read by all (sequentially): median {ms(sorted(total)[len(total) // 2])}"
        )
    if phases:
        room_p50 = _q(_pooled(phases, "room", "to_last"), 50)
        room_p99 = _q(_pooled(phases, "room", "to_last"), 99)
        met = room_p50 <= LATENCY_TARGET and room_p99 <= LATENCY_TARGET
        print(
            f"target: room fan-out p50/p99 <= {ms(LATENCY_TARGET)}: {ms(room_p50)} / "
            f"{ms(room_p99)}: {'met' if met else 'NOT met'}"
        )
        room_cpu, direct_cpu = _cpu(phases, "room"), _cpu(phases, "direct")
        print(
            f"target: room CPU per copy clearly below direct: {_ratio(room_cpu, direct_cpu)}: "
            + ("met" if room_cpu < 0.8 * direct_cpu else "NOT met")
        )
    others = ", ".join(f"{k} {v}" for k, v in sorted(bench.other.items())) or "none"
    print(f"other frames read: {others}; untracked messages {bench.untracked}")


def describe_share(share: Share) -> str:
    sizes = ", ".join(f"{b:,}" for b in share.frame_bytes)
    text = (
        f"client rotate + Olm-encrypt {ms(share.encrypt_wall)} (CPU {ms(share.encrypt_cpu)}); "
        f"{share.sends} send(s) of {sizes} bytes; send->sent {ms(share.to_sent)}; "
        f"send->last device {ms(share.to_last_device)}; server CPU {ms(share.server_cpu)}"
    )
    return text + (f"; {share.check}" if share.check else "")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=200, help="member devices (users)")
    parser.add_argument("--messages", type=int, default=100, help="messages per phase")
    parser.add_argument("--rounds", type=int, default=2, help="room + direct phases")
    parser.add_argument("--churn", type=int, default=3, help="leave + rotate rounds")
    parser.add_argument(
        "--offline-messages", type=int, default=100, help="messages of each kind stored (0: skip)"
    )
    parser.add_argument("--max-frame-bytes", type=int, default=262_144)
    parser.add_argument("--share-frame-bytes", type=int, default=65_536)
    parser.add_argument("--lag", action="store_true", help="run the daemon under _lagmon.py")
    parser.add_argument(
        "--kinds",
        nargs="+",
        choices=("room", "direct"),
        default=["room", "direct"],
        help="the phases of each round (one kind alone: e.g. to profile the daemon)",
    )
    args = parser.parse_args()
    args.members = max(2, min(args.members, 1_000))
    args.messages = max(1, min(args.messages, 10_000))
    args.rounds = max(1, min(args.rounds, 20))
    args.churn = max(0, min(args.churn, 20))
    args.offline_messages = max(0, min(args.offline_messages, 10_000))
    return args


if __name__ == "__main__":
    run(parse_args())
