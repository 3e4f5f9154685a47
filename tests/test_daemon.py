"""The real daemon as a subprocess: readiness, serving, clean stop, clear failures."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from .conftest import DataDir

CHATD = [sys.executable, "-m", "chatd"]


def run_chatd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CHATD, *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


class Daemon:
    def __init__(self, proc: trio.Process, notify: trio.socket.SocketType) -> None:
        self.proc = proc
        self.notify = notify
        self.messages: list[str] = []

    async def wait_notify(self, key: str) -> str:
        """Wait for a notify datagram holding ``KEY=``; return that datagram."""
        with trio.fail_after(30):
            while True:
                data = (await self.notify.recv(4096)).decode()
                self.messages.append(data)
                if any(line.startswith(f"{key}=") for line in data.splitlines()):
                    return data

    def relay_url(self) -> str:
        status = next(m for m in self.messages if "READY=1" in m)
        return status.split("serving relay ", 1)[1].split(",", 1)[0]


@asynccontextmanager
async def daemon(data_dir: DataDir, short_tmp: Path, **extra_env: str) -> AsyncIterator[Daemon]:
    notify_path = short_tmp / "notify.sock"
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(str(notify_path))
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), **extra_env}
    proc = await trio.lowlevel.open_process(
        [*CHATD, "serve", "--config", str(data_dir.config_path)],
        env=env,
        stderr=open(short_tmp / "stderr.log", "ab"),  # noqa: SIM115 - the child owns it
    )
    try:
        yield Daemon(proc, sock)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        sock.close()
        notify_path.unlink(missing_ok=True)  # a test may start the daemon again


async def test_the_daemon_starts_serves_and_stops_cleanly(
    data_dir: DataDir, short_tmp: Path
) -> None:
    async with daemon(data_dir, short_tmp) as d:
        ready = await d.wait_notify("READY")
        assert "STATUS=serving relay ws://127.0.0.1:" in ready
        # Health answers on the private unix socket.
        transport = httpx.AsyncHTTPTransport(uds=str(data_dir.path / "a.sock"))
        async with httpx.AsyncClient(transport=transport, base_url="http://chatd") as client:
            health = await client.get("/v1/health")
            assert health.status_code == 200
            assert health.json()["store_writable"] is True
            ran = await client.post(
                "/v1/retention/run", headers={"Authorization": f"Bearer {data_dir.token}"}
            )
            assert ran.status_code == 200
        # A WebSocket client gets hello, and SIGTERM closes it with 1001.
        async with open_websocket_url(d.relay_url()) as ws:
            hello = json.loads(await ws.get_message())
            assert hello["type"] == "hello" and hello["protocol"] == 1
            await ws.send_message('{"type":"ping","id":"1"}')
            assert json.loads(await ws.get_message())["type"] == "pong"
            d.proc.send_signal(signal.SIGTERM)
            await d.wait_notify("STOPPING")
            with trio.fail_after(30), pytest.raises(ConnectionClosed) as closed:
                while True:
                    await ws.get_message()
            assert closed.value.reason.code == 1001
        with trio.fail_after(30):
            assert await d.proc.wait() == 0
    log = (short_tmp / "stderr.log").read_text()
    assert "msg=daemon.ready" in log and "msg=daemon.stopped" in log
    # Secrets never reach the log.
    assert data_dir.token not in log
    assert data_dir.key_hex not in log
    # The database was written and checkpointed: no WAL left after a clean stop.
    assert data_dir.db.exists()
    assert not Path(f"{data_dir.db}-wal").exists() or Path(f"{data_dir.db}-wal").stat().st_size == 0


async def test_the_watchdog_is_fed_at_half_the_interval(data_dir: DataDir, short_tmp: Path) -> None:
    # systemd sets WATCHDOG_USEC (and WATCHDOG_PID, which we leave unset here).
    async with daemon(data_dir, short_tmp, WATCHDOG_USEC="400000") as d:
        await d.wait_notify("READY")
        for _ in range(3):
            assert (await d.wait_notify("WATCHDOG")).strip() == "WATCHDOG=1"
        d.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await d.proc.wait() == 0


async def test_client_addresses_are_masked_in_the_log(data_dir: DataDir, short_tmp: Path) -> None:
    data_dir.configure(relay={"allowed_origins": ["https://chat.example.org"]})
    async with daemon(data_dir, short_tmp) as d:
        await d.wait_notify("READY")
        headers = [(b"Origin", b"https://evil.example")]
        with pytest.raises(Exception, match="403"):
            async with open_websocket_url(d.relay_url(), extra_headers=headers):
                pass  # pragma: no cover - refused
        d.proc.send_signal(signal.SIGINT)
        with trio.fail_after(30):
            assert await d.proc.wait() == 0
    log = (short_tmp / "stderr.log").read_text()
    assert "msg=relay.origin_refused peer=127.0.0.0/24" in log
    assert "peer=127.0.0.1" not in log


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_database(data_dir: DataDir) -> None:
    result = run_chatd("check-config", "--config", str(data_dir.config_path))
    assert result.returncode == 0, result.stderr
    from chatd.store.db import open_writer

    open_writer(data_dir.db, data_dir.key, busy_timeout_ms=1000).close()


def test_a_wrong_key_exits_2_and_leaves_the_database_untouched(data_dir: DataDir) -> None:
    make_database(data_dir)
    before = digest(data_dir.db)
    listing = sorted(os.listdir(data_dir.path))
    key = data_dir.path / "db.key"
    key.write_text("ab" * 32 + "\n")
    for command in ("serve", "check-config"):
        result = run_chatd(command, "--config", str(data_dir.config_path))
        assert result.returncode == 2, result.stderr
        assert f"the database key does not match {data_dir.db}" in result.stderr
        assert "Traceback" not in result.stderr
        assert digest(data_dir.db) == before
        # Only the empty lock file serve holds (chatd.datalock) may be new.
        assert sorted(set(os.listdir(data_dir.path)) - {"chatd.lock"}) == listing


def test_a_bad_config_exits_3_naming_key_and_file(data_dir: DataDir) -> None:
    data_dir.config_path.write_text("[relay]\nport = 'eighty'\n")
    result = run_chatd("serve", "--config", str(data_dir.config_path))
    assert result.returncode == 3
    assert str(data_dir.config_path) in result.stderr
    assert "relay.port" in result.stderr
    assert not data_dir.db.exists()


def test_a_world_readable_key_file_exits_4(data_dir: DataDir) -> None:
    os.chmod(data_dir.path / "db.key", 0o644)
    result = run_chatd("serve", "--config", str(data_dir.config_path))
    assert result.returncode == 4
    assert "chmod 600" in result.stderr
    assert data_dir.key_hex not in result.stderr
    assert not data_dir.db.exists()


def test_a_port_in_use_exits_5(data_dir: DataDir) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data_dir.configure(relay={"port": port})
        result = run_chatd("serve", "--config", str(data_dir.config_path))
    assert result.returncode == 5
    assert f"127.0.0.1:{port} is already in use" in result.stderr
    assert "relay.port" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a directory away")
def test_a_data_dir_owned_by_someone_else_exits_6(data_dir: DataDir) -> None:
    os.chown(data_dir.path, 12345, 12345)
    try:
        result = run_chatd("serve", "--config", str(data_dir.config_path))
    finally:
        os.chown(data_dir.path, 0, 0)
    assert result.returncode == 6
    assert "owned by uid 12345" in result.stderr
    assert not data_dir.db.exists()


def test_usage_errors_exit_64() -> None:
    result = run_chatd("serve", "--bogus")
    assert result.returncode == 64
    assert "unrecognized arguments" in result.stderr


def test_init_creates_private_files_and_never_overwrites(short_tmp: Path) -> None:
    target = short_tmp / "data"
    first = run_chatd("init", "--data-dir", str(target))
    assert first.returncode == 0, first.stderr
    files = {name: (target / name).read_text() for name in ("db.key", "admin-token", "chatd.toml")}
    for name in files:
        assert (target / name).stat().st_mode & 0o777 == 0o600
    assert target.stat().st_mode & 0o777 == 0o700
    assert "(will be created by 'chatd serve')" in first.stdout
    from chatd.store.db import open_writer

    key = bytes.fromhex(files["db.key"].strip())
    open_writer(target / "chatd.db", key, busy_timeout_ms=1000).close()
    second = run_chatd("init", "--data-dir", str(target))
    assert second.returncode == 0
    assert "kept" in second.stdout
    assert f"database      {target / 'chatd.db'} (kept)" in second.stdout
    assert "will be created" not in second.stdout
    assert {name: (target / name).read_text() for name in files} == files
    check = run_chatd("check-config", "--config", str(target / "chatd.toml"))
    assert check.returncode == 0, check.stderr
    assert files["db.key"].strip() not in first.stdout + check.stdout


def test_version_names_the_protocol_and_sqlcipher() -> None:
    result = run_chatd("version")
    assert result.returncode == 0
    assert "client protocol 1" in result.stdout
    assert "SQLCipher 4." in result.stdout


def chatctl(*args: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from chatd.chatctl import main; sys.argv[0] = 'chatctl'; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60, check=False
    )


async def test_chatctl_administers_the_running_daemon(data_dir: DataDir, short_tmp: Path) -> None:
    config = str(data_dir.config_path)
    down = await trio.to_thread.run_sync(chatctl, "--config", config, "health")
    assert down.returncode == 5
    assert "is chatd running?" in down.stderr
    async with daemon(data_dir, short_tmp) as d:
        await d.wait_notify("READY")
        health = await trio.to_thread.run_sync(chatctl, "--config", config, "health")
        assert health.returncode == 0, health.stderr
        assert "status ok, store writable: True" in health.stdout
        ran = await trio.to_thread.run_sync(
            chatctl, "--config", config, "retention-run", "admin_audit"
        )
        assert ran.returncode == 0, ran.stderr
        assert "admin_audit" in ran.stdout and "bytes freed" in ran.stdout
        runs = await trio.to_thread.run_sync(
            chatctl, "--config", config, "--json", "retention-runs"
        )
        assert [r["job"] for r in json.loads(runs.stdout)["runs"]] == ["admin_audit"]
        audit = await trio.to_thread.run_sync(chatctl, "--config", config, "audit")
        assert "/v1/retention/run" in audit.stdout
        # The daemon hands its room service to the admin API.
        rooms = await trio.to_thread.run_sync(
            chatctl, "--config", config, "--json", "rooms", "list"
        )
        assert rooms.returncode == 0, rooms.stderr
        assert json.loads(rooms.stdout) == {"rooms": [], "next_after_id": None}
        bad_job = await trio.to_thread.run_sync(
            chatctl, "--config", config, "retention-run", "nope"
        )
        assert bad_job.returncode == 1
        assert "invalid_request: invalid body: Invalid enum value 'nope'" in bad_job.stderr
        assert "any of retention_reports, admin_audit" in bad_job.stderr  # what is allowed
        wrong = short_tmp / "wrong-token"
        wrong.write_text("x" * 43)
        denied = await trio.to_thread.run_sync(
            chatctl, "--config", config, "--token-file", str(wrong), "audit"
        )
        assert denied.returncode == 1
        assert "unauthorized" in denied.stderr
        d.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await d.proc.wait() == 0
