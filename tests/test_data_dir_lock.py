"""The data dir lock (chatd.datalock): one chatd process per data dir.

A real ``chatd serve`` holds ``<data_dir>/chatd.lock``; a second serve on the
same data dir and a restore or rekey while it runs are refused with exit 9
and a message saying why, and change nothing. Once it stops, restore works.
"""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest
import trio

from chatd.datalock import LOCK_FILE, hold_data_dir_lock
from chatd.errors import DataDirLockedError

from .conftest import DataDir
from .test_backup import add_user, chatd, make_backup, usernames
from .test_daemon import CHATD, daemon

WAIT = 30.0


async def test_a_second_serve_and_a_restore_are_refused_while_chatd_serves(
    data_dir: DataDir, short_tmp: Path
) -> None:
    add_user(data_dir, "alice")
    backup = make_backup(data_dir)
    add_user(data_dir, "bob")
    async with daemon(data_dir, short_tmp) as d:
        await d.wait_notify("READY")
        with trio.fail_after(WAIT):
            second = await trio.run_process(
                [*CHATD, "serve", "--config", str(data_dir.config_path)],
                capture_stderr=True,
                check=False,
            )
        assert second.returncode == 9
        err = second.stderr.decode()
        assert "another chatd process (serve, restore or rekey) is using the data dir" in err
        assert str(data_dir.path / LOCK_FILE) in err

        def offline(*args: str) -> int:
            return chatd(data_dir, *args)

        assert await trio.to_thread.run_sync(offline, "restore", str(backup)) == 9
        assert await trio.to_thread.run_sync(offline, "rekey", "--generate") == 9
        assert not (data_dir.path / "db.key.new").exists()  # refused before anything
        # The first daemon still serves, and nothing was changed.
        transport = httpx.AsyncHTTPTransport(uds=str(data_dir.path / "a.sock"))
        async with httpx.AsyncClient(transport=transport, base_url="http://chatd") as client:
            assert (await client.get("/v1/health")).status_code == 200
        d.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(WAIT):
            assert await d.proc.wait() == 0
    assert usernames(data_dir.db, data_dir.key) == ["alice", "bob"]
    assert not list(data_dir.path.glob("chatd.db.*"))
    # Stopped: the lock is free again and the restore goes through.
    assert chatd(data_dir, "restore", str(backup)) == 0
    assert usernames(data_dir.db, data_dir.key) == ["alice"]


def test_the_lock_is_exclusive_and_released_with_its_holder(tmp_path: Path) -> None:
    with hold_data_dir_lock(tmp_path, "a test") as path:
        assert path == tmp_path / LOCK_FILE
        assert path.stat().st_mode & 0o777 == 0o600
        with pytest.raises(DataDirLockedError) as refused:
            with hold_data_dir_lock(tmp_path, "a restore"):
                pass  # pragma: no cover - never entered
        assert refused.value.exit_code == 9
        assert "Stop it before a restore" in str(refused.value)
    with hold_data_dir_lock(tmp_path, "a test"):
        pass  # released: taken again at once
