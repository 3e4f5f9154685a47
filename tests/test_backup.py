"""Backups, verify, restore and key rotation, end to end.

Online backups of the real daemon while messages flow, restored with the real
``chatd restore``; verify, holding, rotate-key and rekey through ``chatd``'s
command line, on real SQLCipher files in temp dirs.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from chatd import cli
from chatd.auth.user_ids import insert_user
from chatd.backup.archive import list_backups
from chatd.backup.copy import CopyCancelled, Progress, copy_database
from chatd.backup.keys import key_id, load_backup_key
from chatd.ctl_backup import bar
from chatd.errors import KeyMismatchError
from chatd.keyfiles import new_db_key, write_private_file
from chatd.store.db import close_quietly, connect, open_writer
from chatd.store.migrations import SCHEMA_VERSION

from .conftest import DataDir
from .test_daemon import chatctl, daemon
from .test_daemon_messaging import PASSWORDS, create_users
from .test_keys import login_device
from .test_relay_auth import Client


def chatd(data_dir: DataDir, *args: str) -> int:
    return cli.run([*args[:2], "--config", str(data_dir.config_path), *args[2:]])


def add_user(data_dir: DataDir, name: str) -> None:
    conn = open_writer(data_dir.db, data_dir.key, busy_timeout_ms=1000)
    try:
        insert_user(conn, username=name, username_key=name, role="user", password_hash="x", now=0)
    finally:
        close_quietly(conn)


def usernames(path: Path, key: bytes) -> list[str]:
    conn = connect(path, key, busy_timeout_ms=1000, readonly=True)
    try:
        return [r[0] for r in conn.execute("SELECT username FROM users ORDER BY id")]
    finally:
        close_quietly(conn)


def make_backup(data_dir: DataDir) -> Path:
    """A backup made the way the daemon makes one (same code, no daemon)."""
    config = data_dir.config
    key = load_backup_key(config)
    config.backups_dir.mkdir(mode=0o700, exist_ok=True)
    from chatd.backup.archive import backup_name
    from chatd.store import now_ms

    target = config.backups_dir / backup_name(now_ms(), key_id(key))
    copy_database(data_dir.db, data_dir.key, target, key, chunk_rows=10)
    return target


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- online backup while messages flow, then restore ------------------------------------


async def _send(ws: Any, bob: Any, n: int) -> str:
    message_id = str(uuid.uuid4())
    envelope = {"user_id": bob.user_id, "device_id": bob.device_id, "ciphertext": f"opaque {n}"}
    frame = {"type": "send", "id": f"s{n}", "message_id": message_id, "envelopes": [envelope]}
    await ws.send_message(json.dumps(frame))
    while True:
        reply = json.loads(await ws.get_message())
        if reply.get("id") == f"s{n}":
            assert reply["type"] == "sent", reply
            return message_id


async def test_a_backup_taken_while_messages_flow_restores_every_acknowledged_message(
    data_dir: DataDir, short_tmp: Path
) -> None:
    # Small chunks: the backup takes many steps while the sender keeps going.
    data_dir.configure(
        auth={"require_mfa": "none"},
        relay={"port": 0, "send_rate_per_user": 1e6, "send_burst": 100_000},
        backup={"chunk_rows": 10},
    )
    acknowledged: list[str] = []
    async with daemon(data_dir, short_tmp) as d:
        await d.wait_notify("READY")
        await create_users(data_dir)
        url = d.relay_url()
        async with open_websocket_url(url) as bob_ws:
            await bob_ws.get_message()  # hello
            bob = await login_device(Client(bob_ws), "bob", PASSWORDS["bob"])
            await bob.publish(1)
        transport = httpx.AsyncHTTPTransport(uds=str(data_dir.path / "a.sock"))
        headers = {"Authorization": f"Bearer {data_dir.token}"}
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://chatd") as admin,
            open_websocket_url(url) as ws,
        ):
            await ws.get_message()
            alice = await login_device(Client(ws), "alice", PASSWORDS["alice"])
            await alice.publish(1)
            for n in range(300):  # enough rows for many chunks
                acknowledged.append(await _send(ws, bob, n))
            before_backup = list(acknowledged)
            reply = await admin.post("/v1/backups", headers=headers)
            assert reply.status_code == 200, reply.text
            job = reply.json()
            assert job["state"] == "running"
            again = await admin.post("/v1/backups", headers=headers)
            assert again.status_code in (200, 409)  # 409 while the first runs
            n = 300
            with trio.fail_after(60):
                while job["state"] == "running":
                    acknowledged.append(await _send(ws, bob, n))  # messages keep flowing
                    n += 1
                    job = (await admin.get(f"/v1/backups/{job['id']}", headers=headers)).json()
            assert job["state"] == "done", job
            assert job["progress"]["rows_done"] == job["progress"]["rows_total"] > 300
            listed = (await admin.get("/v1/backups", headers=headers)).json()
            assert job["file"] in [b["file"] for b in listed["backups"]]
        d.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await d.proc.wait() == 0
    backup = data_dir.config.backups_dir / job["file"]
    assert (backup.stat().st_mode & 0o777) == 0o600
    assert not list(backup.parent.glob(".*part"))
    # The backup does not open with the database key: it has its own.
    with pytest.raises(KeyMismatchError):
        connect(backup, data_dir.key, busy_timeout_ms=0, readonly=True)

    assert chatd(data_dir, "restore", str(backup)) == 0
    assert list(data_dir.path.glob("chatd.db.before-restore-*"))
    async with daemon(data_dir, short_tmp) as d:
        await d.wait_notify("READY")
        async with open_websocket_url(d.relay_url()) as ws:
            await ws.get_message()
            session = await Client(ws).login("bob", PASSWORDS["bob"], device_id=bob.device_id)
            assert session["device_id"] == bob.device_id
            received: set[str] = set()
            with trio.fail_after(30):
                while not set(before_backup) <= received:
                    frame = json.loads(await ws.get_message())
                    if frame["type"] == "deliver":
                        received |= {e["message_id"] for e in frame["envelopes"]}
                        last = frame["envelopes"][-1]["envelope_id"]
                        await ws.send_message(json.dumps({"type": "ack", "up_to": last}))
        d.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await d.proc.wait() == 0


async def test_a_backup_into_an_unusable_directory_fails_clearly_and_leaves_nothing(
    data_dir: DataDir, short_tmp: Path
) -> None:
    # A path under a regular file can be made by no one (root included).
    (data_dir.path / "not-a-dir").write_text("")
    data_dir.configure(backup={"directory": "not-a-dir/backups"})
    async with daemon(data_dir, short_tmp) as d:
        await d.wait_notify("READY")
        transport = httpx.AsyncHTTPTransport(uds=str(data_dir.path / "a.sock"))
        headers = {"Authorization": f"Bearer {data_dir.token}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://chatd") as admin:
            reply = await admin.post("/v1/backups", headers=headers)
            assert reply.status_code == 503
            assert reply.json()["error"]["code"] == "backup_unavailable"
            assert "cannot make the backup directory" in reply.json()["error"]["message"]
            missing = await admin.get("/v1/backups/7", headers=headers)
            assert missing.status_code == 404
        d.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await d.proc.wait() == 0
    assert (data_dir.path / "not-a-dir").read_text() == ""


class CancelAfterFirstChunk(Progress):
    """Progress that cancels the copy once rows were written (mid-copy)."""

    def __init__(self, cancel: threading.Event) -> None:
        super().__init__()
        self.cancel = cancel

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "rows_done" and value > 0:
            self.cancel.set()


def test_a_cancelled_or_failed_copy_leaves_no_file(data_dir: DataDir) -> None:
    for n in range(50):
        add_user(data_dir, f"user{n}")
    target = data_dir.path / "copy.db"
    cancel = threading.Event()
    progress = CancelAfterFirstChunk(cancel)
    with pytest.raises(CopyCancelled):
        copy_database(
            data_dir.db,
            data_dir.key,
            target,
            b"\x01" * 32,
            cancel=cancel,
            progress=progress,
            chunk_rows=10,
        )
    assert 0 < progress.rows_done < 50
    assert [p.name for p in data_dir.path.iterdir() if "copy" in p.name] == []
    # A wrong source key: refused before anything is written.
    with pytest.raises(KeyMismatchError):
        copy_database(data_dir.db, b"\x02" * 32, target, b"\x01" * 32)
    assert [p.name for p in data_dir.path.iterdir() if "copy" in p.name] == []


# -- verify -------------------------------------------------------------------------


def test_verify_reports_schema_and_rows_and_refuses_bad_files(
    data_dir: DataDir, capsys: pytest.CaptureFixture[str]
) -> None:
    add_user(data_dir, "alice")
    backup = make_backup(data_dir)
    assert chatd(data_dir, "backup", "verify", str(backup)) == 0
    out = capsys.readouterr().out
    assert f"schema  version {SCHEMA_VERSION}" in out
    assert "integrity_check ok" in out
    assert any(line.split() == ["users", "1"] for line in out.splitlines())

    # Wrong key (a file named like a backup of another key).
    other = data_dir.path / "other.key"
    write_private_file(other, new_db_key())
    assert chatd(data_dir, "backup", "verify", str(backup), "--key-file", str(other)) == 8
    assert "was made with backup key" in capsys.readouterr().err
    renamed = backup.with_name("renamed.db")
    renamed.write_bytes(backup.read_bytes())
    assert chatd(data_dir, "backup", "verify", str(renamed), "--key-file", str(other)) == 8
    assert "does not open" in capsys.readouterr().err

    # Corrupt: one byte flipped in the middle of a page.
    damaged = data_dir.path / "damaged"
    damaged.mkdir()
    corrupt = damaged / backup.name
    data = bytearray(backup.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    assert chatd(data_dir, "backup", "verify", str(corrupt)) == 8
    assert "corrupt" in capsys.readouterr().err

    # Truncated: half the file.
    truncated = damaged / "truncated.db"  # not named by chatd: the keys at hand are tried
    truncated.write_bytes(backup.read_bytes()[: len(data) // 2])
    assert chatd(data_dir, "backup", "verify", str(truncated)) == 8
    assert "corrupt" in capsys.readouterr().err

    # Not a backup at all.
    junk = backup.with_name("junk.db")
    junk.write_bytes(os.urandom(8192))
    assert chatd(data_dir, "backup", "verify", str(junk)) == 8
    assert "none of the backup keys" in capsys.readouterr().err
    assert chatd(data_dir, "backup", "verify", str(backup.with_name("missing.db"))) == 8
    assert digest(backup) == digest(renamed)  # verify changed nothing


# -- restore ----------------------------------------------------------------------


def test_restore_keeps_the_current_database_aside_and_opens_with_the_db_key(
    data_dir: DataDir, capsys: pytest.CaptureFixture[str]
) -> None:
    add_user(data_dir, "alice")
    backup = make_backup(data_dir)
    add_user(data_dir, "bob")  # after the backup
    assert chatd(data_dir, "restore", str(backup)) == 0
    assert "previous database is kept as" in capsys.readouterr().out
    assert usernames(data_dir.db, data_dir.key) == ["alice"]
    (aside,) = data_dir.path.glob("chatd.db.before-restore-*[!lm]")
    assert usernames(aside, data_dir.key) == ["alice", "bob"]
    assert not list(data_dir.path.glob("*.restoring*"))


def test_restore_refuses_a_newer_schema_and_a_running_daemon(
    data_dir: DataDir, capsys: pytest.CaptureFixture[str]
) -> None:
    add_user(data_dir, "alice")
    backup = make_backup(data_dir)
    conn = connect(backup, load_backup_key(data_dir.config), busy_timeout_ms=0)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    close_quietly(conn)
    before = digest(data_dir.db)
    assert chatd(data_dir, "restore", str(backup)) == 8
    assert f"schema version {SCHEMA_VERSION + 1}" in capsys.readouterr().err
    assert digest(data_dir.db) == before
    assert not list(data_dir.path.glob("chatd.db.*"))

    good = make_backup(data_dir)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(data_dir.path / "a.sock"))  # "chatd" answers on its admin socket
        listener.listen()
        assert chatd(data_dir, "restore", str(good)) == 8
        assert chatd(data_dir, "rekey", "--generate") == 8
    assert "chatd is running" in capsys.readouterr().err
    assert digest(data_dir.db) == before


# -- holding, rotate-key ----------------------------------------------------------------


def test_holding_lists_backups_with_the_account_across_a_key_rotation(
    data_dir: DataDir, capsys: pytest.CaptureFixture[str]
) -> None:
    add_user(data_dir, "alice")
    old = make_backup(data_dir)
    old_id = key_id(load_backup_key(data_dir.config))
    assert chatd(data_dir, "backup", "rotate-key") == 0
    capsys.readouterr()
    new_id = key_id(load_backup_key(data_dir.config))
    assert new_id != old_id
    add_user(data_dir, "carol")
    new = make_backup(data_dir)
    assert new_id in new.name and old_id in old.name
    assert chatd(data_dir, "backup", "holding", "alice") == 0
    out = capsys.readouterr().out
    assert "2 of 2 backup(s)" in out and old.name in out and new.name in out
    assert chatd(data_dir, "backup", "holding", "Carol") == 0
    out = capsys.readouterr().out
    assert "1 of 2 backup(s)" in out and new.name in out and old.name not in out
    # Without the retired key, the old backup cannot be read, and says which key it needs.
    (data_dir.path / f"backup-{old_id}.key").unlink()
    assert chatd(data_dir, "backup", "verify", str(old)) == 8
    assert f"needs backup key {old_id}" in capsys.readouterr().err
    assert chatd(data_dir, "backup", "holding", "alice") == 8
    assert "could not be checked" in capsys.readouterr().out
    assert [b.name for b in list_backups(data_dir.config.backups_dir)] == [old.name, new.name]
    assert chatd(data_dir, "backup", "list") == 0
    out = capsys.readouterr().out
    assert "backups in" in out and f"key {old_id}" in out and f"key {new_id}" in out


def test_rotate_key_refuses_a_backup_key_from_a_systemd_credential(
    data_dir: DataDir, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    creds = data_dir.path / "creds"
    creds.mkdir()
    (creds / "chatd-backup-key").write_text(new_db_key())
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert chatd(data_dir, "backup", "rotate-key") == 4
    assert "systemd credential chatd-backup-key" in capsys.readouterr().err
    assert not (data_dir.path / "backup.key").exists()


# -- rekey --------------------------------------------------------------------------


async def test_rekey_then_serve_works_with_the_new_key_only(
    data_dir: DataDir, short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    add_user(data_dir, "alice")
    old_key = data_dir.key
    assert chatd(data_dir, "rekey", "--generate") == 0
    out = capsys.readouterr().out
    assert "now holds the new key" in out
    new_key = bytes.fromhex((data_dir.path / "db.key").read_text().strip())
    assert new_key != old_key
    (retired,) = data_dir.path.glob("db.key.retired-*")
    assert bytes.fromhex(retired.read_text().strip()) == old_key
    assert (retired.stat().st_mode & 0o777) == 0o600
    assert not (data_dir.path / "db.key.new").exists()
    with pytest.raises(KeyMismatchError):
        connect(data_dir.db, old_key, busy_timeout_ms=0, readonly=True)
    assert usernames(data_dir.db, new_key) == ["alice"]
    async with daemon(data_dir, short_tmp) as d:
        await d.wait_notify("READY")
        d.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await d.proc.wait() == 0
    # The old key no longer opens it: chatd refuses with exit 2 and changes nothing.
    os.replace(retired, data_dir.path / "db.key")
    assert chatd(data_dir, "check-config") == 2


# -- chatctl ----------------------------------------------------------------------------


async def test_chatctl_creates_and_lists_backups(data_dir: DataDir, short_tmp: Path) -> None:
    config = str(data_dir.config_path)
    async with daemon(data_dir, short_tmp) as d:
        await d.wait_notify("READY")
        made = await trio.to_thread.run_sync(chatctl, "--config", config, "backup", "create")
        assert made.returncode == 0, made.stderr
        assert "backup 1 done: chatd-backup-" in made.stdout
        listed = await trio.to_thread.run_sync(
            chatctl, "--config", config, "--json", "backup", "list"
        )
        body = json.loads(listed.stdout)
        assert [j["state"] for j in body["jobs"]] == ["done"]
        assert body["backups"][0]["file"] == body["jobs"][0]["file"]
        gone = await trio.to_thread.run_sync(chatctl, "--config", config, "backup", "cancel", "9")
        assert gone.returncode == 1 and "not_found" in gone.stderr
        d.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await d.proc.wait() == 0
    (backup,) = data_dir.config.backups_dir.iterdir()
    assert chatd(data_dir, "backup", "verify", str(backup)) == 0


def test_the_progress_bar_shows_rows_and_phase() -> None:
    job = {
        "state": "running",
        "progress": {"rows_done": 50, "rows_total": 200, "phase": "copying", "table": "users"},
    }
    assert bar(job).startswith("[" + "#" * 7 + "." * 23 + "]  25%  50/200 rows  copying users")


def test_rekey_with_systemd_credentials_moves_no_file(
    data_dir: DataDir, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    add_user(data_dir, "alice")
    creds = data_dir.path / "creds"
    creds.mkdir()
    old_key, new_hex = data_dir.key, new_db_key()
    (creds / "chatd-db-key").write_text(data_dir.key_hex)
    (creds / "chatd-db-key-new").write_text(new_hex)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert chatd(data_dir, "rekey") == 0
    assert "systemd credentials, which chatd cannot move" in capsys.readouterr().out
    assert sorted(p.name for p in creds.iterdir()) == ["chatd-db-key", "chatd-db-key-new"]
    assert (data_dir.path / "db.key").read_text().strip() == old_key.hex()  # untouched
    assert usernames(data_dir.db, bytes.fromhex(new_hex)) == ["alice"]
    # Killed after the rekey, before the key files were swapped: running it again finishes.
    assert chatd(data_dir, "rekey") == 0
    # Without a new key anywhere: a usage error, and nothing changes.
    (creds / "chatd-db-key-new").unlink()
    assert chatd(data_dir, "rekey") == 64
    assert "--new-key-file" in capsys.readouterr().err


def test_a_backup_of_an_older_schema_is_migrated_by_the_restore(
    data_dir: DataDir, capsys: pytest.CaptureFixture[str]
) -> None:
    from chatd.store.migrations import migrate

    conn = connect(data_dir.db, data_dir.key, busy_timeout_ms=1000)
    migrate(conn, target=SCHEMA_VERSION - 1)
    close_quietly(conn)
    backup = make_backup(data_dir)
    data_dir.db.unlink()  # a new machine: no database yet
    assert chatd(data_dir, "restore", str(backup)) == 0
    assert f"schema version {SCHEMA_VERSION - 1} -> {SCHEMA_VERSION}" in capsys.readouterr().out
    conn = connect(data_dir.db, data_dir.key, busy_timeout_ms=1000, readonly=True)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    close_quietly(conn)


def test_a_restore_that_cannot_open_its_copy_puts_the_previous_database_back(
    data_dir: DataDir, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from chatd.backup import commands
    from chatd.errors import StoreError

    add_user(data_dir, "alice")
    backup = make_backup(data_dir)
    add_user(data_dir, "bob")
    before = digest(data_dir.db)

    def fails(*args: Any, **kw: Any) -> Any:
        raise StoreError("disk full (simulated)")

    monkeypatch.setattr(commands, "open_writer", fails)
    assert chatd(data_dir, "restore", str(backup)) == 7
    assert "disk full" in capsys.readouterr().err
    assert digest(data_dir.db) == before
    assert sorted(p.name for p in data_dir.path.glob("chatd.db*")) == ["chatd.db"]
