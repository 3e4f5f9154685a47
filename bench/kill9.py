"""kill -9 under load: no acknowledged message lost, none stored twice, a sound database.

One real ``chatd serve`` (``chatd init`` into a temp dir, started with
NOTIFY_SOCKET as systemd would; the helpers of ``bench/_daemon.py``) and
--devices raw protocol clients in this process (one user and one device each,
seeded with the daemon stopped; a vodozemac account publishes each device's
signed keys once). Every device is a member of one channel. Each cycle:

1. start the daemon, wait for READY=1 (the relay's port comes from its STATUS);
2. every device connects and resumes its session (``resume``, no password
   hash), then sends again, under the same ``message_id``, every message whose
   ``sent`` it has not yet read, and then sends new ones, WINDOW at a time:
   one in ROOM_EVERY is a ``room_send`` to the channel, the others a ``send``
   to one other device (a ciphertext naming the message and the device);
3. every ``deliver`` is de-duplicated by ``message_id`` as ``chatd.client``
   does (its store keeps one row per message id) and answered with
   ``ack up_to`` its last envelope, with an ``id``: the ``ok`` says the
   deletes are durable;
4. ``kill -9`` the daemon: in odd cycles at a random moment of the traffic,
   in even cycles at the moment a device has read a ``deliver`` with messages
   and is about to acknowledge it (it sends the ack only after the kill).

After the last kill the daemon starts once more, the devices send again what
is unanswered and send nothing new, and every message the server answered
``sent`` for must reach each of its recipient devices. Then SIGTERM (exit 0)
and ``PRAGMA integrity_check`` and ``PRAGMA cipher_integrity_check`` on the
database with chatd's own store code.

The figures: kills, messages sent / answered ``sent`` / delivered to every
recipient, **lost** (answered ``sent``, never delivered to some recipient),
**duplicates** (a message id the client would store twice: 0 by its
de-duplication rule, counted from the store this client keeps), **re-delivered
after a durable ack** (a message delivered again after its device's ``ack``
was answered ``ok``, which the protocol forbids, among messages never sent
twice), raw re-deliveries before de-duplication (expected after kills:
at-least-once delivery), integrity results, and time.

    .venv/bin/python bench/kill9.py --kills 1000
    .venv/bin/python bench/kill9.py --kills 5        # smoke
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec
import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

_BENCH = str(Path(__file__).resolve().parent)
if _BENCH not in sys.path:  # imported by the test suite: last, so it shadows nothing
    sys.path.append(_BENCH)
from _daemon import (  # noqa: E402 - the bench directory is not a package
    RELAXED_AUTH,
    RELAXED_RELAY,
    Daemon,
    init_data_dir,
    seed_users,
    set_settings,
)
from relay import PASSWORD, keys_upload, log_findings  # noqa: E402

WINDOW: Final = 4  # sends per device without a `sent` yet
ROOM_EVERY: Final = 4  # one send in this many is a room_send
BODY_BYTES: Final = 48  # random bytes in each ciphertext
CONNECT_TIMEOUT: Final = 5.0  # seconds for one device to connect and resume
DRAIN_TIMEOUT: Final = 60.0  # seconds for the final delivery of everything answered `sent`
RANDOM_KILL_MAX: Final = 0.3  # seconds of traffic at most before a random kill
BEFORE_ACK_WAIT: Final = 2.0  # seconds to wait for a deliver to kill before its ack

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


@dataclass(eq=False)
class Device:
    index: int
    username: str
    user_id: int = 0
    device_id: str = ""
    access_token: str = ""
    ws: WebSocketConnection | None = None
    #: message_id -> the frame, for sends whose `sent` has not been read
    unanswered: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the client's store: message ids it keeps (one row each, as chatd.client)
    stored: set[str] = field(default_factory=set)
    stored_twice: int = 0
    redelivered: int = 0
    #: message ids this device acknowledged with an `ok` (the delete is durable)
    acked_durable: set[str] = field(default_factory=set)
    after_durable_ack: list[str] = field(default_factory=list)
    in_batch: dict[str, list[str]] = field(default_factory=dict)  # ack id -> message ids
    seq: int = 0

    def next_id(self, prefix: str) -> str:
        self.seq += 1
        return f"{prefix}{self.seq}"


@dataclass
class Figures:
    kills: int = 0
    kills_before_ack: int = 0
    sends: int = 0  # send / room_send frames written, resends included
    resent: int = 0
    messages: int = 0  # distinct messages
    answered_sent: int = 0
    errors: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    duplicates: int = 0
    after_durable_ack: int = 0
    redelivered: int = 0
    delivered_copies: int = 0
    integrity: str = ""
    cipher_integrity: str = ""
    exit_code: int | None = None
    stop_seconds: float = 0.0
    handshake_failures: list[str] = field(default_factory=list)
    log_findings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    starts: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            not self.lost
            and self.duplicates == 0
            and self.after_durable_ack == 0
            and not self.errors
            and self.integrity == "ok"
            and self.cipher_integrity == "ok"
            and self.exit_code == 0
        )


@dataclass
class Harness:
    work: Path
    config: Path
    devices: list[Device]
    rng: random.Random
    figures: Figures = field(default_factory=Figures)
    daemon: Daemon | None = None
    url: str = ""
    room_id: int = 0
    epoch: int = 0
    #: message_id -> recipient device ids
    recipients: dict[str, set[str]] = field(default_factory=dict)
    resent_ids: set[str] = field(default_factory=set)
    answered: set[str] = field(default_factory=set)
    cycle_started: float = 0.0
    sending: bool = True
    #: set while a kill waits for a device that has read a deliver and not acked it
    want_before_ack: trio.Event | None = None
    before_ack_hit: trio.Event = field(default_factory=trio.Event)
    killed: trio.Event = field(default_factory=trio.Event)
    progress: trio.Event = field(default_factory=trio.Event)

    # -- the daemon ---------------------------------------------------------------------------

    async def start(self) -> None:
        self.daemon = Daemon(self.config, self.work)
        self.daemon.start()
        self.figures.starts.append(await trio.to_thread.run_sync(self.daemon.wait_ready))
        self.url = self.daemon.relay_url()[0]

    def kill(self) -> None:
        assert self.daemon is not None
        self.daemon.kill()
        self.figures.kills += 1
        self.killed.set()

    # -- one device's connection ------------------------------------------------------------------

    async def request(self, dev: Device, frame: dict[str, Any]) -> dict[str, Any]:
        """Send a request and read frames until its answer (setup only: nothing else flows)."""
        assert dev.ws is not None
        await dev.ws.send_message(_encode(frame).decode())
        while True:
            reply: dict[str, Any] = _decode(await dev.ws.get_message())
            if reply.get("id") == frame["id"]:
                return reply
            if reply.get("type") == "deliver":
                await self.on_deliver(dev, reply)

    async def login_first(self, dev: Device) -> None:
        frame = {
            "type": "login",
            "id": "login",
            "username": dev.username,
            "password": PASSWORD,
            "device_name": "kill9",
        }
        session = await self.request(dev, frame)
        if session.get("type") != "session":
            raise RuntimeError(f"login refused: {session!r}")
        dev.user_id = int(session["user"]["id"])
        dev.device_id = str(session["device_id"])
        dev.access_token = str(session["access_token"])
        count = await self.request(dev, keys_upload(dev.user_id, dev.device_id))
        if count.get("type") != "key_count":
            raise RuntimeError(f"keys_upload refused: {count!r}")

    async def resume(self, dev: Device) -> None:
        frame = {"type": "resume", "id": dev.next_id("r"), "access_token": dev.access_token}
        session = await self.request(dev, frame)
        if session.get("type") != "session":
            raise RuntimeError(f"resume refused: {session!r}")

    async def on_deliver(self, dev: Device, frame: dict[str, Any]) -> None:
        assert dev.ws is not None
        envelopes = frame["envelopes"]
        batch = []
        for env in envelopes:
            if env["kind"] not in ("message", "room_message"):
                continue  # receipts and room events are acknowledged, nothing more
            message_id = env["message_id"]
            self.figures.delivered_copies += 1
            if message_id in dev.acked_durable and message_id not in self.resent_ids:
                dev.after_durable_ack.append(message_id)
            if message_id in dev.stored:
                dev.redelivered += 1
                continue
            expected = f"{message_id}:{dev.device_id}:" if env["kind"] == "message" else None
            if expected is not None and not env["ciphertext"].startswith(expected):
                self.figures.errors.append(f"{dev.username}: wrong ciphertext for {message_id}")
            dev.stored.add(message_id)
            batch.append(message_id)
            self.progress.set()
        ack_id = dev.next_id("a")
        dev.in_batch[ack_id] = batch
        if batch and self.want_before_ack is not None and not self.want_before_ack.is_set():
            # Delivered and stored, about to acknowledge: kill the daemon now.
            self.want_before_ack.set()
            self.before_ack_hit.set()
            await self.killed.wait()
        ack = {"type": "ack", "id": ack_id, "up_to": envelopes[-1]["envelope_id"]}
        await dev.ws.send_message(_encode(ack).decode())

    async def reader(self, dev: Device, window: trio.Semaphore) -> None:
        assert dev.ws is not None
        while True:
            frame: dict[str, Any] = _decode(await dev.ws.get_message())
            kind = frame.get("type")
            if kind == "deliver":
                await self.on_deliver(dev, frame)
            elif kind == "ok" and frame["id"] in dev.in_batch:
                for message_id in dev.in_batch.pop(frame["id"]):
                    dev.acked_durable.add(message_id)
                # earlier batches are covered by the ack cut as well
                for older in [k for k in dev.in_batch if int(k[1:]) < int(frame["id"][1:])]:
                    dev.acked_durable.update(dev.in_batch.pop(older))
            elif kind == "sent":
                message_id = frame["message_id"]
                if dev.unanswered.pop(message_id, None) is not None:
                    self.answered.add(message_id)
                    window.release()
                    self.progress.set()
            elif kind in ("error", "device_mismatch"):
                self.figures.errors.append(f"{dev.username}: {json.dumps(frame)[:300]}")

    async def write_send(self, dev: Device, frame: dict[str, Any]) -> None:
        assert dev.ws is not None
        frame = {**frame, "id": dev.next_id("s")}
        self.figures.sends += 1
        await dev.ws.send_message(_encode(frame).decode())

    def new_message(self, dev: Device) -> dict[str, Any]:
        message_id = str(uuid.uuid4())
        body = base64.b64encode(os.urandom(BODY_BYTES)).decode()
        others = [d for d in self.devices if d is not dev]
        frame: dict[str, Any]
        if self.rng.randrange(ROOM_EVERY) == 0:
            frame = {
                "type": "room_send",
                "room_id": self.room_id,
                "message_id": message_id,
                "epoch": self.epoch,
                "ciphertext": f"{message_id}:room:{body}",
            }
            self.recipients[message_id] = {d.device_id for d in others}
        else:
            to = self.rng.choice(others)
            frame = {
                "type": "send",
                "message_id": message_id,
                "envelopes": [
                    {
                        "user_id": to.user_id,
                        "device_id": to.device_id,
                        "ciphertext": f"{message_id}:{to.device_id}:{body}",
                    }
                ],
            }
            self.recipients[message_id] = {to.device_id}
        self.figures.messages += 1
        dev.unanswered[message_id] = frame
        return frame

    async def sender(self, dev: Device, window: trio.Semaphore) -> None:
        for message_id, frame in list(dev.unanswered.items()):
            await window.acquire()
            self.resent_ids.add(message_id)
            self.figures.resent += 1
            await self.write_send(dev, frame)
        while self.sending:
            await window.acquire()
            await self.write_send(dev, self.new_message(dev))

    async def run_device(self, dev: Device, connected: list[int]) -> None:
        """One connection's life: resume, resend, send; ends when the daemon dies."""
        try:
            async with open_websocket_url(
                self.url, connect_timeout=CONNECT_TIMEOUT, disconnect_timeout=0.5
            ) as ws:
                dev.ws = ws
                await ws.get_message()  # hello
                await self.resume(dev)
                dev.in_batch.clear()  # an ack covers only what this connection was sent
                connected.append(dev.index)
                window = trio.Semaphore(WINDOW)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.reader, dev, window)
                    await self.sender(dev, window)
        except* HandshakeError:
            # Cut off by the kill while connecting is expected; before it, a failure.
            at = time.monotonic() - self.cycle_started
            note = f"{dev.username} could not connect ({at:.2f} s into the cycle)"
            if self.killed.is_set():
                self.figures.handshake_failures.append(note)
            else:
                self.figures.errors.append(note)
        except* (ConnectionClosed, OSError, trio.BrokenResourceError):
            pass  # the daemon died (kill -9, or stopped at the end): the next cycle reconnects
        finally:
            dev.ws = None

    # -- cycles -----------------------------------------------------------------------------------

    async def cycle(self, before_ack: bool) -> None:
        await self.start()
        self.cycle_started = time.monotonic()
        self.killed = trio.Event()
        self.before_ack_hit = trio.Event()
        self.want_before_ack = trio.Event() if before_ack else None
        connected: list[int] = []
        async with trio.open_nursery() as nursery:
            for dev in self.devices:
                nursery.start_soon(self.run_device, dev, connected)
            if before_ack:
                with trio.move_on_after(BEFORE_ACK_WAIT):
                    await self.before_ack_hit.wait()
                if self.before_ack_hit.is_set():
                    self.figures.kills_before_ack += 1
                elif self.want_before_ack is not None:
                    self.want_before_ack.set()  # no deliver came: kill anyway
            else:
                await trio.sleep(self.rng.uniform(0.0, RANDOM_KILL_MAX))
            self.kill()
        self.want_before_ack = None

    async def setup(self) -> None:
        await self.start()
        async with trio.open_nursery() as nursery:
            for dev in self.devices:
                nursery.start_soon(self.connect_first, dev)
        owner = self.devices[0]
        async with open_websocket_url(self.url) as ws:
            owner.ws = ws
            await ws.get_message()
            await self.resume(owner)
            room = await self.request(
                owner, {"type": "room_create", "id": "c", "name": "kill9", "kind": "channel"}
            )
            self.room_id = int(room["room"]["room_id"])
        async with trio.open_nursery() as nursery:
            for dev in self.devices[1:]:
                nursery.start_soon(self.join, dev)
        async with open_websocket_url(self.url) as ws:
            owner.ws = ws
            await ws.get_message()
            await self.resume(owner)
            members = await self.request(
                owner, {"type": "room_members", "id": "m", "room_id": self.room_id}
            )
            self.epoch = int(members["epoch"])
        owner.ws = None
        code, _ = self.daemon.stop() if self.daemon else (0, 0.0)
        if code != 0:
            raise RuntimeError(f"setup daemon exited {code}")

    async def connect_first(self, dev: Device) -> None:
        async with open_websocket_url(self.url) as ws:
            dev.ws = ws
            await ws.get_message()
            await self.login_first(dev)
        dev.ws = None

    async def join(self, dev: Device) -> None:
        async with open_websocket_url(self.url) as ws:
            dev.ws = ws
            await ws.get_message()
            await self.resume(dev)
            reply = await self.request(
                dev, {"type": "room_join", "id": "j", "room_id": self.room_id}
            )
            if reply.get("type") != "room":
                raise RuntimeError(f"room_join refused: {reply!r}")
        dev.ws = None

    def undelivered(self) -> list[str]:
        by_device = {d.device_id: d for d in self.devices}
        missing = []
        for message_id in self.answered:
            for device_id in self.recipients[message_id]:
                if message_id not in by_device[device_id].stored:
                    missing.append(f"{message_id} -> {device_id}")
        return missing

    async def final(self) -> None:
        """Start once more, send what is unanswered, and wait for every delivery."""
        await self.start()
        self.killed = trio.Event()
        self.sending = False
        connected: list[int] = []
        async with trio.open_nursery() as nursery:
            for dev in self.devices:
                nursery.start_soon(self.run_device, dev, connected)
            with trio.move_on_after(DRAIN_TIMEOUT):
                while self.undelivered() or any(d.unanswered for d in self.devices):
                    self.progress = trio.Event()
                    with trio.move_on_after(0.2):
                        await self.progress.wait()
            # let the last acks be answered before the clean stop
            await trio.sleep(0.3)
            assert self.daemon is not None
            code, self.figures.stop_seconds = await trio.to_thread.run_sync(self.daemon.stop)
            self.figures.exit_code = code
            self.killed.set()
            nursery.cancel_scope.cancel()
        self.figures.log_findings = log_findings(self.daemon.log_path.read_text(errors="replace"))

    def tally(self) -> None:
        f = self.figures
        f.answered_sent = len(self.answered)
        f.lost = self.undelivered()
        f.duplicates = sum(d.stored_twice for d in self.devices)
        f.after_durable_ack = sum(len(d.after_durable_ack) for d in self.devices)
        f.redelivered = sum(d.redelivered for d in self.devices)
        f.errors += [
            f"{d.username}: {len(d.unanswered)} sends unanswered"
            for d in self.devices
            if d.unanswered
        ]


def integrity(config: Path) -> tuple[str, str]:
    """``PRAGMA integrity_check`` and ``PRAGMA cipher_integrity_check`` with chatd's store code."""
    from chatd.config import load_config
    from chatd.keyfiles import load_db_key
    from chatd.store.db import close_quietly, connect

    settings = load_config(config)
    conn = connect(
        settings.database_path,
        load_db_key(settings),
        busy_timeout_ms=settings.store.busy_timeout_ms,
    )
    try:
        plain = "; ".join(str(r[0]) for r in conn.execute("PRAGMA integrity_check").fetchall())
        cipher_rows = conn.execute("PRAGMA cipher_integrity_check").fetchall()
        cipher = "ok" if not cipher_rows else "; ".join(str(r[0]) for r in cipher_rows[:5])
    finally:
        close_quietly(conn)
    return plain, cipher


def prepare(work: Path, devices: int) -> Path:
    config = init_data_dir(work / "data")
    set_settings(config, "server", {"shutdown_grace_seconds": 10.0})
    set_settings(config, "relay", {"port": 0, "idle_timeout_seconds": 600.0, **RELAXED_RELAY})
    set_settings(config, "auth", {**RELAXED_AUTH, "access_token_minutes": 1_440.0})
    set_settings(config, "attachments", {"port": 0})
    set_settings(config, "push", {"enabled": False})  # no sender process to start each cycle
    seed_users(config, [f"k{i:02d}" for i in range(devices)], PASSWORD)
    return config


async def run(work: Path, *, kills: int, devices: int, seed: int) -> Figures:
    """The whole run: setup, ``kills`` cycles, the final delivery, the checks."""
    config = prepare(work, devices)
    harness = Harness(
        work, config, [Device(i, f"k{i:02d}") for i in range(devices)], random.Random(seed)
    )
    started = time.monotonic()
    try:
        await harness.setup()
        for n in range(kills):
            await harness.cycle(before_ack=n % 2 == 1)
        await harness.final()
    finally:
        if harness.daemon is not None:
            harness.daemon.kill()
    harness.tally()
    f = harness.figures
    f.integrity, f.cipher_integrity = integrity(config)
    f.seconds = time.monotonic() - started
    return f


def report(f: Figures) -> str:
    starts = sorted(f.starts)
    lines = [
        f"kills: {f.kills} ({f.kills_before_ack} between a delivery and its ack)",
        f"messages: {f.messages} (send and room_send frames written: {f.sends},"
        f" {f.resent} of them resent after a kill)",
        f"answered sent: {f.answered_sent}",
        f"delivered copies read (before de-duplication): {f.delivered_copies},"
        f" re-delivered: {f.redelivered}",
        f"lost (answered sent, not delivered to a recipient): {len(f.lost)}",
        f"duplicates after de-duplication: {f.duplicates}",
        f"delivered again after a durable ack: {f.after_durable_ack}",
        f"integrity_check: {f.integrity}; cipher_integrity_check: {f.cipher_integrity}",
        f"final stop (SIGTERM): exit code {f.exit_code} in {f.stop_seconds:.2f} s",
        f"errors: {len(f.errors)}; connections cut off by a kill during their handshake:"
        f" {len(f.handshake_failures)}",
        f"daemon start to READY: median {starts[len(starts) // 2]:.2f} s, max {starts[-1]:.2f} s",
        f"time: {f.seconds:.1f} s",
    ]
    lines += [f"  handshake failed: {m}" for m in f.handshake_failures[:10]]
    lines += [f"  lost: {m}" for m in f.lost[:10]]
    lines += [f"  error: {e}" for e in f.errors[:10]]
    lines += [f"  log: {line}" for line in f.log_findings[:10]]
    lines.append("RESULT: " + ("pass" if f.ok else "FAIL"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=1000)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args()
    print(f"seed {args.seed}, {args.devices} devices", flush=True)
    with tempfile.TemporaryDirectory(prefix="kill9-") as tmp:
        figures = trio.run(
            lambda: run(Path(tmp), kills=args.kills, devices=args.devices, seed=args.seed)
        )
    print(report(figures))
    sys.exit(0 if figures.ok else 1)


if __name__ == "__main__":
    main()
