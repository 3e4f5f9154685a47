"""The disk-faults suite (issue 14): the real daemon on a disk that refuses writes.

The fault is a file-size limit set on the running ``chatd serve`` process
(RLIMIT_FSIZE through ``prlimit``, as root or as the daemon's own user): from
then on every write at an offset past 4 KiB fails with EFBIG, which sqlite
reports as SQLITE_FULL or SQLITE_IOERR, as on a full disk. Lifting the limit
is the space coming back. Python ignores SIGXFSZ, so the process lives on.
The daemon's stderr is a pipe (a log file would fall under the limit too, as
journald's socket does not).

What a user would notice is checked end to end with real clients: every
request that writes gets ``storage_unavailable`` with ``retry_after`` and the
connection stays open; a device with a session still resumes and receives
what was queued before the fault; health is 503 from the first failed
commit; the log names the cause once; and after the space returns, the
resent message is stored and every ``sent`` message is in the database.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from chatd.store.db import open_reader

from .conftest import DataDir
from .test_daemon import Daemon
from .test_daemon_messaging import PASSWORDS, create_users
from .test_keys import Device, login_device
from .test_relay_auth import Client

WAIT = 15.0  # seconds any one reply, state or log line may take
FAULT_OFFSET = 4096  # bytes: writes at or past this offset fail while the fault is on


def fill_disk(pid: int) -> None:
    """Every write of ``pid`` at an offset past FAULT_OFFSET fails from now on."""
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (FAULT_OFFSET, resource.RLIM_INFINITY))


def free_disk(pid: int) -> None:
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)


class Log:
    """The daemon's stderr lines, as they come, and a way to wait for one."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._changed = trio.Event()

    async def pump(self, stream: trio.abc.ReceiveStream) -> None:
        buffer = b""
        async for chunk in stream:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            self.lines += [line.decode(errors="replace") for line in lines]
            self._changed.set()
            self._changed = trio.Event()

    async def wait_for(self, text: str) -> str:
        with trio.fail_after(WAIT):
            while True:
                found = [line for line in self.lines if text in line]
                if found:
                    return found[0]
                await self._changed.wait()

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)


@asynccontextmanager
async def piped_daemon(data_dir: DataDir, short_tmp: Path) -> AsyncIterator[tuple[Daemon, Log]]:
    """``chatd serve`` with its stderr on a pipe (see the module docstring)."""
    notify_path = short_tmp / "notify.sock"
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(str(notify_path))
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "chatd", "serve", "--config", str(data_dir.config_path)],
        env=env,
        stderr=subprocess.PIPE,
    )
    log = Log()
    try:
        async with trio.open_nursery() as nursery:
            assert proc.stderr is not None
            nursery.start_soon(log.pump, proc.stderr)
            yield Daemon(proc, sock), log
            nursery.cancel_scope.cancel()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        sock.close()


def send_frame(to: dict[str, Any], message_id: str, text: str) -> dict[str, Any]:
    return {
        "message_id": message_id,
        "envelopes": [{"user_id": to["user_id"], "device_id": to["device_id"], "ciphertext": text}],
    }


async def next_frame(c: Client, frame_type: str) -> dict[str, Any]:
    """The next frame of that type, also among those ``request`` read past."""
    for n, frame in enumerate(c.skipped):
        if frame["type"] == frame_type:
            return c.skipped.pop(n)
    with trio.fail_after(WAIT):
        while True:
            frame = json.loads(await c.ws.get_message())
            if frame["type"] == frame_type:
                return frame


def assert_refused(reply: dict[str, Any]) -> None:
    assert reply["type"] == "error", reply
    assert reply["code"] == "storage_unavailable", reply
    assert reply["retry_after"] == 5.0


async def assert_open(c: Client) -> None:
    assert (await c.request("ping"))["type"] == "pong"


async def server_message_ids(data_dir: DataDir) -> set[str]:
    """The message ids queued in the server's database (a read-only look)."""

    def read() -> set[str]:
        conn = open_reader(data_dir.db, data_dir.key, busy_timeout_ms=5000)
        try:
            rows = conn.execute("SELECT message_id FROM envelopes WHERE kind = 'message'")
            return {row[0] for row in rows}
        finally:
            conn.close()

    return await trio.to_thread.run_sync(read)


async def test_a_full_disk_refuses_each_write_clearly_keeps_serving_and_recovers(
    data_dir: DataDir, short_tmp: Path
) -> None:
    data_dir.configure(auth={"require_mfa": "none"})
    async with piped_daemon(data_dir, short_tmp) as (d, log):
        await d.wait_notify("READY")
        await create_users(data_dir)
        url = d.relay_url()
        transport = httpx.AsyncHTTPTransport(uds=str(data_dir.path / "a.sock"))
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://chatd") as admin,
            open_websocket_url(url) as alice_ws,
        ):
            # Bob's device has a session (its access token is kept), then goes away.
            async with open_websocket_url(url) as ws:
                await ws.get_message()
                session = await Client(ws).login("bob", PASSWORDS["bob"])
                assert session["type"] == "session", session
                await next_frame(Client(ws), "key_count")
                bob = Device(Client(ws), session["user"]["id"], session["device_id"])
                await bob.publish(5)
            to_bob = {"user_id": bob.user_id, "device_id": bob.device_id}
            await alice_ws.get_message()
            alice = Client(alice_ws)
            alice_device = await login_device(alice, "alice", PASSWORDS["alice"])
            sent: list[str] = []
            for n in range(3):  # queued for bob before the fault
                message_id = str(uuid.uuid4())
                reply = await alice.request("send", **send_frame(to_bob, message_id, f"m{n}"))
                assert reply["type"] == "sent", reply
                sent.append(message_id)

            fill_disk(d.proc.pid)
            late = str(uuid.uuid4())
            assert_refused(await alice.request("send", **send_frame(to_bob, late, "late")))
            # Health says so from the first failed commit on.
            health = await admin.get("/v1/health")
            assert health.status_code == 503, health.text
            assert health.json()["store_writable"] is False
            cause = await log.wait_for("msg=store.write_failed")
            assert "level=warning" in cause
            assert "SQLITE_FULL" in cause or "SQLITE_IOERR" in cause, cause
            # Every other kind of write is refused the same way; the connection stays.
            assert_refused(
                await alice.request(
                    "keys_upload",
                    device_keys=alice_device.device_keys(),
                    one_time_keys=alice_device.one_time_keys(5),
                    fallback_key=alice_device.fallback_key(),
                )
            )
            assert_refused(await alice.request("room_create", name="ops", kind="group"))
            await assert_open(alice)
            assert (await alice.request("list_rooms"))["type"] == "rooms"  # reads work
            data = os.urandom(50_000)
            signed = await alice.request(
                "blob_upload", sha256=hashlib.sha256(data).hexdigest(), size=len(data)
            )
            assert signed["type"] == "blob_url", signed
            async with httpx.AsyncClient() as http:
                put = await http.put(signed["url"], content=data)
            assert put.status_code == 503, put.text
            assert put.json()["error"] == "storage_unavailable"
            assert put.headers["retry-after"] == "5"
            created = await admin.post(
                "/v1/users",
                headers={"Authorization": f"Bearer {data_dir.token}"},
                json={"username": "carol", "password": "carol's long password", "role": "user"},
            )
            assert created.status_code == 503, created.text
            assert created.json()["error"]["code"] == "storage_unavailable"
            async with open_websocket_url(url) as ws:
                await ws.get_message()
                newcomer = Client(ws)
                assert_refused(await newcomer.login("bob", PASSWORDS["bob"]))  # a new session
                await assert_open(newcomer)
            # Bob's device resumes its session and receives what was queued.
            async with open_websocket_url(url) as bob_ws:
                await bob_ws.get_message()
                bob_client = Client(bob_ws)
                resumed = await bob_client.request("resume", access_token=session["access_token"])
                assert resumed["type"] == "session", resumed
                delivered = await next_frame(bob_client, "deliver")
                envelopes = delivered["envelopes"]
                assert [e["message_id"] for e in envelopes] == sent
                last = envelopes[-1]["envelope_id"]
                assert_refused(await bob_client.request("ack", up_to=last))
                await assert_open(bob_client)
                # One warning for the episode, not one per refused request.
                assert log.count("msg=store.write_failed") == 1
                assert health.status_code == 503

                free_disk(d.proc.pid)
                # The resend with the same message_id is stored, health is back.
                again = await alice.request("send", **send_frame(to_bob, late, "late"))
                assert again["type"] == "sent", again
                sent.append(late)
                recovered = await log.wait_for("msg=store.write_recovered")
                assert "level=warning" in recovered
                health = await admin.get("/v1/health")
                assert health.status_code == 200 and health.json()["store_writable"] is True
                # Nothing was falsely acknowledged: every sent message is stored.
                assert set(sent) <= await server_message_ids(data_dir)
                late_frame = await next_frame(bob_client, "deliver")
                assert [e["message_id"] for e in late_frame["envelopes"]] == [late]
                up_to = late_frame["envelopes"][-1]["envelope_id"]
                assert (await bob_client.request("ack", up_to=up_to))["type"] == "ok"
            # The envelopes of the refused ack come again on the next connection
            # (the client drops repeats by message_id); acked, the queue is empty.
            async with open_websocket_url(url) as bob_ws:
                await bob_ws.get_message()
                bob_client = Client(bob_ws)
                resumed = await bob_client.request("resume", access_token=session["access_token"])
                assert resumed["type"] == "session", resumed
                again_frame = await next_frame(bob_client, "deliver")
                assert [e["message_id"] for e in again_frame["envelopes"]] == sent[:3]
                up_to = again_frame["envelopes"][-1]["envelope_id"]
                assert (await bob_client.request("ack", up_to=up_to))["type"] == "ok"
            assert await server_message_ids(data_dir) == set()
        assert not [line for line in log.lines if "level=error" in line]


@asynccontextmanager
async def small_tmpfs(short_tmp: Path, size: str) -> AsyncIterator[Path]:
    """A tmpfs of ``size`` mounted inside ``short_tmp`` (needs CAP_SYS_ADMIN;
    the suite runs as root in CI and here, and says so if it cannot)."""
    mountpoint = short_tmp / "fs"
    mountpoint.mkdir()
    mounted = await trio.run_process(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mountpoint)],
        check=False,
        capture_stderr=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        await trio.run_process(["umount", "-l", str(mountpoint)], check=False)


def fill_up(directory: Path) -> Path:
    """Write a filler file until the filesystem is full; return it."""
    filler = directory / "filler"
    with filler.open("wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


async def test_a_full_filesystem_refuses_sends_and_recovers_when_space_returns(
    short_tmp: Path,
) -> None:
    """The same on a real full filesystem (ENOSPC): a small tmpfs under the
    data dir, filled with a file, then freed by deleting it. Writes that fit
    in pages the WAL already has may still succeed on a full disk; the first
    refusal must come, with health 503 and the cause in the log."""
    async with small_tmpfs(short_tmp, "24m") as fs:
        data_dir = DataDir(fs)
        data_dir.configure(auth={"require_mfa": "none"})
        async with piped_daemon(data_dir, short_tmp) as (d, log):
            await d.wait_notify("READY")
            await create_users(data_dir)
            url = d.relay_url()
            transport = httpx.AsyncHTTPTransport(uds=str(data_dir.path / "a.sock"))
            async with (
                httpx.AsyncClient(transport=transport, base_url="http://chatd") as admin,
                open_websocket_url(url) as ws,
            ):
                await ws.get_message()
                session = await Client(ws).login("bob", PASSWORDS["bob"])
                await next_frame(Client(ws), "key_count")
                bob = Device(Client(ws), session["user"]["id"], session["device_id"])
                await bob.publish(5)
                to_bob = {"user_id": bob.user_id, "device_id": bob.device_id}
            async with (
                httpx.AsyncClient(transport=transport, base_url="http://chatd") as admin,
                open_websocket_url(url) as alice_ws,
            ):
                await alice_ws.get_message()
                alice = Client(alice_ws)
                await login_device(alice, "alice", PASSWORDS["alice"])
                filler = await trio.to_thread.run_sync(fill_up, fs)
                sent: list[str] = []
                for n in range(2000):  # bob is offline: each message must be written
                    message_id = str(uuid.uuid4())
                    text = f"{n} " + "x" * 16_000
                    reply = await alice.request("send", **send_frame(to_bob, message_id, text))
                    if reply["type"] == "error":
                        break
                    assert reply["type"] == "sent", reply
                    sent.append(message_id)
                assert_refused(reply)
                health = await admin.get("/v1/health")
                assert health.status_code == 503, health.text
                cause = await log.wait_for("msg=store.write_failed")
                assert "SQLITE_FULL" in cause, cause
                await assert_open(alice)

                filler.unlink()
                again = await alice.request("send", **send_frame(to_bob, message_id, text))
                assert again["type"] == "sent", again
                sent.append(message_id)
                await log.wait_for("msg=store.write_recovered")
                assert (await admin.get("/v1/health")).status_code == 200
                assert set(sent) <= await server_message_ids(data_dir)
        assert not [line for line in log.lines if "level=error" in line]
