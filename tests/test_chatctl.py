"""chatctl in week one: usernames wherever a user id goes, names beside ids in
its tables, and finding the config from any directory.

The admin API runs for real (store, auth service, hypercorn on a unix socket;
tests/test_admin_accounts.py's ``accounts_running``); chatctl runs as a
subprocess, as an admin would run it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from chatd.auth.models import AuthError
from chatd.chatctl import ConfigNotFound, find_config

from .conftest import DataDir
from .test_admin_accounts import PASSWORD, PEER, accounts_running, login

CHATCTL = "import sys; from chatd.chatctl import main; sys.argv[0] = 'chatctl'; main()"


def chatctl_in(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """chatctl run from ``cwd`` with only ``env`` added to a clean environment."""
    base = {k: v for k, v in os.environ.items() if k != "CHATD_CONFIG"}
    return subprocess.run(
        [sys.executable, "-c", CHATCTL, *args],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        start_new_session=True,
    )


async def test_users_are_named_or_numbered_and_tables_show_names(
    data_dir: DataDir, short_tmp: Path
) -> None:
    async with accounts_running(data_dir) as admin:
        alice = await admin.create("alice")
        digits = await admin.create("4242")  # a valid username made of digits
        await login(admin, "alice")
        base = ["--socket", str(data_dir.path / "a.sock")]
        base += ["--token-file", str(data_dir.path / "admin-token")]

        async def ctl(*args: str) -> subprocess.CompletedProcess[str]:
            return await trio.to_thread.run_sync(lambda: chatctl_in(short_tmp, *base, *args))

        shown = await ctl("--json", "users", "show", "Alice")  # case-free, as at login
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["id"] == alice
        assert json.loads((await ctl("--json", "users", "show", str(alice))).stdout)["id"] == alice
        assert json.loads((await ctl("--json", "users", "show", "@4242")).stdout)["id"] == digits
        as_id = await ctl("users", "show", "4242")  # digits are an id
        assert as_id.returncode == 1 and "not_found: no such user" in as_id.stderr
        missing = await ctl("users", "show", "nobody")
        assert missing.returncode == 1
        assert "not_found: no user named 'nobody'" in missing.stderr
        too_long = await ctl("users", "show", "x" * 65)
        assert too_long.returncode == 64 and "neither a user id nor a username" in too_long.stderr
        assert (await ctl("users", "show", "0")).returncode == 64

        assert "moderator" in (await ctl("users", "set-role", "alice", "moderator")).stdout
        await login(admin, "alice")  # the role change ended the first session
        sessions = await ctl("sessions", "list", "--user", "alice")
        assert sessions.returncode == 0, sessions.stderr
        header, _, *rows = sessions.stdout.splitlines()
        assert header.split()[:4] == ["id", "user", "username", "device"]
        assert rows and all(r.split()[1:4] == [str(alice), "alice", "laptop"] for r in rows)
        revoked = await ctl("sessions", "revoke-user", "alice")
        assert revoked.returncode == 0 and "revoked 1 session(s)" in revoked.stdout

        audit = await ctl("auth-audit", "--user", "alice", "--event", "admin_create_user")
        assert audit.returncode == 0, audit.stderr
        header, _, row = audit.stdout.splitlines()
        assert header.split()[4:6] == ["user", "username"]
        assert row.split()[5:7] == [str(alice), "alice"]  # the date takes two columns

        code = json.loads((await ctl("--json", "invites", "create")).stdout)["code"]
        await admin.auth.register(code, "bob", PASSWORD, PEER)
        invites = await ctl("invites", "list")
        assert "used by user 3 (bob)" in invites.stdout

        # The API behind it: one user by name, or none.
        found = await admin.ok("GET", "/v1/users", params={"username": "ALICE", "limit": 1})
        assert [u["id"] for u in found["users"]] == [alice] and found["next_after_id"] is None
        for name in ("nobody", "no such name!"):
            none = await admin.ok("GET", "/v1/users", params={"username": name})
            assert none == {"users": [], "next_after_id": None}


def test_find_config_looks_in_order_and_says_where(tmp_path: Path) -> None:
    system = tmp_path / "etc" / "chatd.toml"
    local = tmp_path / "chatd-data" / "chatd.toml"
    env_file = tmp_path / "elsewhere.toml"
    with pytest.raises(ConfigNotFound) as nowhere:
        find_config(None, {}, tmp_path, system)
    assert str(nowhere.value) == (
        f"no chatd config found; looked in $CHATD_CONFIG (not set), {local}, {system}. "
        "Pass --config PATH, set CHATD_CONFIG, or give --socket (or --url) and --token-file"
    )
    assert nowhere.value.exit_code == 3
    system.parent.mkdir()
    system.write_text("")
    assert find_config(None, {}, tmp_path, system) == system
    local.parent.mkdir()
    local.write_text("")
    assert find_config(None, {}, tmp_path, system) == local
    env_file.write_text("")
    assert find_config(None, {"CHATD_CONFIG": str(env_file)}, tmp_path, system) == env_file
    assert find_config("given.toml", {"CHATD_CONFIG": str(env_file)}, tmp_path) == Path(
        "given.toml"
    )
    with pytest.raises(ConfigNotFound) as wrong_env:
        find_config(None, {"CHATD_CONFIG": str(tmp_path / "gone.toml")}, tmp_path, system)
    assert f"$CHATD_CONFIG names {tmp_path / 'gone.toml'}, which is not a file" in str(
        wrong_env.value
    )


async def test_chatctl_finds_the_config_from_any_directory(
    data_dir: DataDir, short_tmp: Path, tmp_path: Path
) -> None:
    async with accounts_running(data_dir):
        config = str(data_dir.config_path)

        def run(cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
            return chatctl_in(cwd, "--json", "users", "list", env=env)

        from_env = await trio.to_thread.run_sync(run, tmp_path, {"CHATD_CONFIG": config})
        assert from_env.returncode == 0, from_env.stderr
        assert json.loads(from_env.stdout)["users"] == []
        # ./chatd-data/chatd.toml, as `bash scripts/serve.sh` makes it.
        project = short_tmp / "project"
        (project / "chatd-data").mkdir(parents=True)
        (project / "chatd-data" / "chatd.toml").write_text(
            data_dir.config_path.read_text().replace('data_dir = "."', f'data_dir = "{short_tmp}"')
        )
        from_cwd = await trio.to_thread.run_sync(run, project)
        assert from_cwd.returncode == 0, from_cwd.stderr
        if not Path("/etc/chatd/chatd.toml").exists():
            lost = await trio.to_thread.run_sync(run, tmp_path)
            assert lost.returncode == 3
            assert "looked in $CHATD_CONFIG (not set)" in lost.stderr
            assert str(tmp_path / "chatd-data" / "chatd.toml") in lost.stderr
            assert "/etc/chatd/chatd.toml" in lost.stderr


async def test_auth_audit_by_user_finds_a_reused_token_and_admin_revocations(
    data_dir: DataDir, short_tmp: Path
) -> None:
    async with accounts_running(data_dir) as admin:
        alice = await admin.create("alice")
        first = await login(admin, "alice")
        await admin.auth.refresh(first.refresh_token or "", PEER)
        with pytest.raises(AuthError) as reused:  # the old refresh token, stolen and replayed
            await admin.auth.refresh(first.refresh_token or "", PEER)
        assert reused.value.code == "invalid_token"
        second, third = await login(admin, "alice"), await login(admin, "alice")
        await admin.ok("DELETE", f"/v1/sessions/{second.session_id}")
        await admin.ok("POST", f"/v1/users/{alice}/sessions/revoke")
        await login(admin, "alice")
        await admin.ok("POST", "/v1/sessions/revoke-all", json={"confirm": True})

        base = ["--socket", str(data_dir.path / "a.sock")]
        base += ["--token-file", str(data_dir.path / "admin-token")]
        found = await trio.to_thread.run_sync(
            lambda: chatctl_in(short_tmp, *base, "--json", "auth-audit", "--user", "alice")
        )
        assert found.returncode == 0, found.stderr
        events = json.loads(found.stdout)["events"]
        assert {e["user_id"] for e in events} == {alice}
        assert {e["username"] for e in events} == {"alice"}
        revocations = [e["session_id"] for e in events if e["event"] == "admin_revoke_session"]
        assert len(revocations) == 3 and second.session_id in revocations
        assert third.session_id in revocations
        reuses = [(e["event"], e["session_id"]) for e in events if e["outcome"] == "token_reused"]
        assert reuses == [("refresh", first.session_id)]
        # Nothing about this user is left with a null user id.
        rows = await admin.ctx.store.read(
            lambda conn: conn.execute(
                "SELECT event, outcome FROM auth_audit WHERE user_id IS NULL"
            ).fetchall()
        )
        assert [tuple(r) for r in rows] == []


async def test_admin_usernames_follow_the_register_rules_the_docs_give(data_dir: DataDir) -> None:
    """docs/OPERATIONS.md section 6: POST /v1/users checks names like register."""
    from .test_admin import assert_error

    async with accounts_running(data_dir) as admin:
        for name in ("t1", "ann marie", "a..b", "-ann"):
            body = {"username": name, "password": PASSWORD}
            error = assert_error(
                await admin.call("POST", "/v1/users", json=body), 400, "invalid_username"
            )
            assert error["field"] == "$.username"
            assert "3 to 32 characters from a-z, 0-9" in error["message"]
        await admin.create("Alice")
        taken = {"username": "ALICE", "password": PASSWORD}  # case does not matter
        assert_error(await admin.call("POST", "/v1/users", json=taken), 409, "username_taken")
        # A lookalike spelling (fullwidth) folds to alice; the admin API takes plain ASCII.
        lookalike = {"username": "ａｌｉｃｅ", "password": PASSWORD}
        error = assert_error(
            await admin.call("POST", "/v1/users", json=lookalike), 400, "invalid_username"
        )
        assert "plain ASCII" in error["message"]
