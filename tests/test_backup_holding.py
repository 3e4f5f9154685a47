"""After an erasure: user ids are never reused, and the backups that still
hold the erased account are found (``GET /v1/backups/holding``, ``chatctl
backup holding``), on a real daemon with real SQLCipher backups.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import trio

from chatd.auth.user_ids import next_user_id
from chatd.store.db import close_quietly, open_writer
from chatd.store.migrations import SCHEMA_VERSION, migrate

from .conftest import DataDir
from .test_backup import add_user, chatd, make_backup, usernames
from .test_chatctl import chatctl_in
from .test_gdpr import ERASED, WAIT, scene


async def test_an_erased_accounts_id_is_never_given_to_a_new_account(
    data_dir: DataDir, short_tmp: Path
) -> None:
    async with scene(data_dir, short_tmp, erasure_grace_days=0) as s:
        her = s.ids[ERASED]
        assert her == max(s.ids.values())  # the highest id: the one a rowid would reuse
        await s.ok("DELETE", f"/v1/users/{her}")
        run = await s.ok("POST", "/v1/retention/run", json={"jobs": ["erasure"]})
        assert run["reports"][0]["rows_purged"] > 0
        assert await s.rows("SELECT id FROM users WHERE id = ?", her) == []
        carol = await s.ok(
            "POST", "/v1/users", json={"username": "carol", "password": "carol's long password"}
        )
        assert carol["id"] == her + 1
        (mark,) = await s.rows("SELECT last_id FROM user_id_high_water")
        assert mark == (her + 1,)


def test_the_migration_seeds_the_high_water_mark_from_receipts_and_users() -> None:
    """An old database whose highest id was already erased (and maybe reused):
    the mark starts above every id a receipt or an account names."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    migrate(conn, target=SCHEMA_VERSION - 1)
    conn.execute(
        "INSERT INTO users (id, username, username_key, role, password_hash,"
        " password_changed_at, created_at) VALUES (3, 'a', 'a', 'user', 'h', 0, 0)"
    )
    conn.execute("INSERT INTO erasure_receipts (user_id, erased_at, receipt) VALUES (7, 1, '{}')")
    migrate(conn)
    assert next_user_id(conn) == 8
    # An insert made elsewhere (a hand-made row, an old tool) still moves the mark.
    conn.execute(
        "INSERT INTO users (id, username, username_key, role, password_hash,"
        " password_changed_at, created_at) VALUES (20, 'b', 'b', 'user', 'h', 0, 0)"
    )
    conn.execute("DELETE FROM users WHERE id = 20")
    assert next_user_id(conn) == 21


async def test_chatctl_lists_the_backups_still_holding_an_erased_account(
    data_dir: DataDir, short_tmp: Path
) -> None:
    async with scene(data_dir, short_tmp, erasure_grace_days=0) as s:
        alice, her = s.ids["alice"], s.ids[ERASED]
        base = ["--socket", str(data_dir.path / "a.sock")]
        base += ["--token-file", str(data_dir.path / "admin-token")]

        async def ctl(*args: str) -> subprocess.CompletedProcess[str]:
            done = await trio.to_thread.run_sync(lambda: chatctl_in(short_tmp, *base, *args))
            assert done.returncode == 0, done.stderr
            return done

        made = await ctl("--json", "backup", "create")
        before = json.loads(made.stdout)["file"]
        live = json.loads((await ctl("--json", "backup", "holding", ERASED)).stdout)
        assert [(a["user_id"], a["receipt_id"], a["backups"]) for a in live["accounts"]] == [
            (her, None, [before])
        ]
        await s.ok("DELETE", f"/v1/users/{her}")
        await s.ok("POST", "/v1/retention/run", json={"jobs": ["erasure"]})
        (receipt,) = (await s.ok("GET", "/v1/erasure-receipts"))["receipts"]
        created = receipt["receipt"]["receipt"]["account_created_at"]
        after = json.loads((await ctl("--json", "backup", "create")).stdout)["file"]
        assert after != before

        erased = await ctl("backup", "holding", "--erased")
        assert f"user {her} (erased, receipt {receipt['id']}, created" in erased.stdout
        assert f"in 1 backup(s)\n  {before}\n" in erased.stdout + "\n"
        assert after not in erased.stdout  # made after the purge: holds nothing of her
        assert ERASED not in erased.stdout  # the receipt names no one
        by_id = await s.ok("GET", "/v1/backups/holding", params={"user_id": her})
        assert by_id["backups_checked"] == 2 and by_id["unchecked"] == []
        assert by_id["accounts"] == [
            {
                "user_id": her,
                "account_created_at": created,
                "receipt_id": receipt["id"],
                "backups": [before],
            }
        ]
        # A live account is in both backups.
        alice_in = await s.ok("GET", "/v1/backups/holding", params={"user_id": alice})
        assert alice_in["accounts"][0]["backups"] == [before, after]


async def test_holding_refuses_bad_questions_and_reports_unreadable_backups(
    data_dir: DataDir, short_tmp: Path
) -> None:
    async with scene(data_dir, short_tmp) as s:
        for params in ({"user_id": 0}, {"who": "x"}, {"erased": "maybe"}):
            answer = await s.call("GET", "/v1/backups/holding", params=params)
            assert answer.status_code == 400, (params, answer.text)
        missing = await s.call("GET", "/v1/backups/holding", params={"user_id": 999})
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "not_found"
        for params in ({}, {"erased": "true"}, {"user_id": 999, "erased": "true"}):
            none = await s.ok("GET", "/v1/backups/holding", params=params)  # every erased one
            assert none["accounts"] == [] and none["backups_checked"] == 0, params
        # A backup whose key is gone is reported, not skipped; nothing is touched.
        job = await s.ok("POST", "/v1/backups")
        with trio.fail_after(WAIT):
            while job["state"] == "running":
                job = await s.ok("GET", f"/v1/backups/{job['id']}")
        backup = data_dir.config.backups_dir / job["file"]
        stray = backup.with_name(backup.name.replace(job["key_id"], "0" * 16))
        stray.write_bytes(backup.read_bytes())
        report = await s.ok("GET", "/v1/backups/holding", params={"user_id": s.ids["alice"]})
        assert report["accounts"][0]["backups"] == [job["file"]]
        assert [u["file"] for u in report["unchecked"]] == [stray.name]
        assert "needs backup key 0000000000000000" in report["unchecked"][0]["error"]
        base = ["--socket", str(data_dir.path / "a.sock")]
        base += ["--token-file", str(data_dir.path / "admin-token")]
        done = await trio.to_thread.run_sync(
            lambda: chatctl_in(short_tmp, *base, "backup", "holding", "alice")
        )
        assert done.returncode == 1
        assert "1 backup(s) could not be checked" in done.stderr
        assert stray.read_bytes() == backup.read_bytes()


def test_a_restore_never_hands_out_again_the_ids_issued_since_the_backup(
    data_dir: DataDir,
) -> None:
    add_user(data_dir, "alice")
    backup = make_backup(data_dir)
    add_user(data_dir, "bob")  # id 2: issued after the backup, maybe erased since
    assert chatd(data_dir, "restore", str(backup)) == 0
    assert usernames(data_dir.db, data_dir.key) == ["alice"]
    conn = open_writer(data_dir.db, data_dir.key, busy_timeout_ms=1000)
    try:
        assert next_user_id(conn) == 3
    finally:
        close_quietly(conn)
