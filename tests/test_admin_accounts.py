"""Account administration over the real admin unix socket, and through chatctl.

A real store, a real AuthService (real Argon2id at the default cost: each
test hashes only a handful of passwords) and the real admin app under
hypercorn. Logins and registrations go through AuthService directly, as the
relay would make them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from chatd.admin.api import ROUTES, AdminContext, Route
from chatd.admin.openapi import openapi_document
from chatd.admin.service import serve_admin
from chatd.auth.accounts import AccountAdmin
from chatd.auth.models import AuthError, Peer, SessionGrant
from chatd.auth.service import AuthService
from chatd.config import AuthSettings
from chatd.e2ee.current import CurrentDevices
from chatd.keyfiles import hash_admin_token
from chatd.retention import serve_retention
from chatd.store import now_ms, serve_store

from .conftest import DataDir
from .test_admin import assert_error

PASSWORD = "plum orbit kettle sunrise"
OTHER_PASSWORD = "seven quiet lanterns drift"
PEER = Peer(ip="192.0.2.0/24", device_name="laptop", network="192.0.2.1")
OTHER_PEER = Peer(ip="198.51.100.0/24", device_name="phone", network="198.51.100.1")

ACCOUNT_ROUTES = [r for r in ROUTES if r.handler.__module__ == "chatd.admin.accounts_api"]


def concrete(r: Route, ident: int = 1) -> str:
    path = r.path
    for name in r.path_params:
        path = path.replace("{" + name + "}", str(ident))
    return path


class Heard:
    """Stands in for the relay's registry: records the revocations it is told."""

    def __init__(self) -> None:
        self.revoked: list[int] = []

    def sessions_revoked(self, session_ids: Iterable[int]) -> None:
        self.revoked.extend(session_ids)


class Accounts:
    def __init__(
        self,
        client: httpx.AsyncClient,
        token: str,
        ctx: AdminContext,
        auth: AuthService,
        events: Heard,
    ) -> None:
        self.client = client
        self.token = token
        self.ctx = ctx
        self.auth = auth
        self.revoked = events.revoked  # what the auth service told the relay

    async def call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}"}
        return await self.client.request(method, path, headers=headers, **kw)

    async def ok(self, method: str, path: str, **kw: Any) -> Any:
        response = await self.call(method, path, **kw)
        assert response.status_code == 200, response.text
        return response.json()

    async def create(self, username: str, role: str = "user", password: str = PASSWORD) -> int:
        body = {"username": username, "password": password, "role": role}
        user = await self.ok("POST", "/v1/users", json=body)
        return int(user["id"])

    async def audit_rows(self) -> list[tuple[str, str, int]]:
        rows = await self.ctx.store.read(
            lambda c: c.execute(
                "SELECT method, path, status FROM admin_audit ORDER BY id"
            ).fetchall()
        )
        return [tuple(r) for r in rows]

    async def sql(self, statement: str, args: tuple[object, ...] = ()) -> None:
        await self.ctx.store.write(lambda c: c.execute(statement, args))


@asynccontextmanager
async def accounts_running(
    data_dir: DataDir, *, with_accounts: bool = True
) -> AsyncIterator[Accounts]:
    config = data_dir.configure(admin={"listen": "unix:a.sock"})
    stopping = trio.Event()
    async with trio.open_nursery() as nursery:
        store = await nursery.start(serve_store, config.database_path, data_dir.key, config.store)
        retention = await nursery.start(serve_retention, store, config.retention)
        # The real minimum cost (19 MiB, t=2): ~50 ms a hash, so tests keep hashes few.
        events = Heard()
        auth = AuthService(
            store, AuthSettings(argon2_memory_kib=19_456, argon2_time_cost=2), events=events
        )
        ctx = AdminContext(
            store=store,
            retention=retention,
            token_hash=hash_admin_token(data_dir.token),
            accounts=AccountAdmin(auth, current=CurrentDevices(store)) if with_accounts else None,
        )
        await nursery.start(serve_admin, config, ctx, stopping)
        transport = httpx.AsyncHTTPTransport(uds=str(config.admin_unix_socket))
        async with httpx.AsyncClient(transport=transport, base_url="http://chatd") as client:
            yield Accounts(client, data_dir.token, ctx, auth, events)
        stopping.set()
        nursery.cancel_scope.cancel()


async def login(admin: Accounts, username: str, password: str = PASSWORD) -> SessionGrant:
    return await admin.auth.login(username, password, PEER)


# -- the declarations ---------------------------------------------------------------------------


def test_every_account_route_needs_the_token_and_is_audited() -> None:
    assert len(ACCOUNT_ROUTES) == 16
    for r in ACCOUNT_ROUTES:
        assert r.auth and r.audit, r.endpoint


def test_path_parameters_and_auth_errors_are_documented() -> None:
    paths = openapi_document()["paths"]
    for r in ACCOUNT_ROUTES:
        op = paths[r.path][r.method.lower()]
        documented = [p for p in op.get("parameters", []) if p["in"] == "path"]
        assert [p["name"] for p in documented] == r.path_params
        for p in documented:
            assert p["required"] is True and p["schema"]["type"] == "integer"
        assert {"401", "503"} <= set(op["responses"])
        if r.path_params:
            assert {"400", "404"} <= set(op["responses"])
    assert "username_taken" in paths["/v1/users"]["post"]["responses"]["409"]["description"]
    assert "weak_password" in paths["/v1/users"]["post"]["responses"]["400"]["description"]
    revoke = paths["/v1/invites/{invite_id}"]["delete"]["responses"]
    assert "invite_closed" in revoke["409"]["description"]


# -- users ----------------------------------------------------------------------------------------


async def test_create_list_and_show_users(data_dir: DataDir) -> None:
    async with accounts_running(data_dir) as admin:
        alice = await admin.ok(
            "POST",
            "/v1/users",
            json={"username": "Alice", "password": PASSWORD, "role": "moderator"},
        )
        assert alice["username"] == "Alice" and alice["role"] == "moderator"
        assert alice["mfa_enabled"] is False and alice["disabled"] is False
        assert PASSWORD not in json.dumps(alice)
        bob = await admin.create("bob")  # role defaults to user
        first = await admin.ok("GET", "/v1/users", params={"limit": 1})
        assert [u["username"] for u in first["users"]] == ["Alice"]
        assert first["next_after_id"] == alice["id"]
        rest = await admin.ok("GET", "/v1/users", params={"after_id": first["next_after_id"]})
        assert [(u["id"], u["role"]) for u in rest["users"]] == [(bob, "user")]
        assert rest["next_after_id"] is None
        assert await admin.ok("GET", f"/v1/users/{alice['id']}") == alice
        assert_error(await admin.call("GET", "/v1/users/999"), 404, "not_found")
        for bad in ("abc", "0", "-1", "1.5", "99999999999999999999"):
            error = assert_error(
                await admin.call("GET", f"/v1/users/{bad}"), 400, "invalid_request"
            )
            assert error["field"] == "user_id"
        error = assert_error(
            await admin.call("GET", "/v1/users", params={"limit": 0}), 400, "invalid_request"
        )
        assert error["field"] == "limit"


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ({"username": "ALICE", "password": OTHER_PASSWORD}, 409, "username_taken", "$.username"),
        # Folds to alice, but the admin API takes names in plain ASCII only.
        (
            {"username": "ＡＬＩＣＥ", "password": OTHER_PASSWORD},
            400,
            "invalid_username",
            "$.username",
        ),
        ({"username": "carol", "password": "short pass"}, 400, "weak_password", "$.password"),
        ({"username": "carol", "password": "1q2w3e4r5t6y"}, 400, "weak_password", "$.password"),
        (
            {"username": "carolinesmith1", "password": "CarolineSmith1"},
            400,
            "weak_password",
            "$.password",
        ),
        (
            {"username": "carol", "password": PASSWORD, "role": "root"},
            400,
            "invalid_request",
            "$.role",
        ),
        ({"username": "c a", "password": PASSWORD}, 400, "invalid_username", "$.username"),
        ({"username": "carol"}, 400, "invalid_request", "$.password"),
        (
            {"username": "carol", "password": PASSWORD, "admin": True},
            400,
            "invalid_request",
            "$.admin",
        ),
    ],
)
async def test_a_refused_user_gets_a_json_error_naming_the_field(
    data_dir: DataDir, body: dict[str, Any], status: int, code: str, field: str | None
) -> None:
    async with accounts_running(data_dir) as admin:
        await admin.create("alice")
        response = await admin.call("POST", "/v1/users", json=body)
        error = assert_error(response, status, code)
        assert error.get("field") == field
        if "password" in body:
            assert body["password"] not in response.text
        users = (await admin.ok("GET", "/v1/users"))["users"]
        assert [u["username"] for u in users] == ["alice"]


async def test_disable_revokes_sessions_and_enable_lets_the_user_back(data_dir: DataDir) -> None:
    async with accounts_running(data_dir) as admin:
        alice = await admin.create("alice")
        grant = await login(admin, "alice")
        user = await admin.ok("POST", f"/v1/users/{alice}/disable")
        assert user["disabled"] is True
        assert admin.revoked == [grant.session_id]  # the relay closes its connections
        sessions = (await admin.ok("GET", "/v1/sessions", params={"user_id": alice}))["sessions"]
        assert [(s["session_id"], s["revoked"]) for s in sessions] == [(grant.session_id, True)]
        with pytest.raises(AuthError) as refused:
            await login(admin, "alice")
        assert refused.value.code == "account_disabled"
        assert (await admin.ok("POST", f"/v1/users/{alice}/enable"))["disabled"] is False
        assert (await login(admin, "alice")).user_id == alice
        for action in ("disable", "enable"):
            assert_error(await admin.call("POST", f"/v1/users/999/{action}"), 404, "not_found")


async def test_set_role(data_dir: DataDir) -> None:
    async with accounts_running(data_dir) as admin:
        alice = await admin.create("alice")
        user = await admin.ok("PUT", f"/v1/users/{alice}/role", json={"role": "admin"})
        assert user["role"] == "admin"
        assert (await admin.ok("GET", f"/v1/users/{alice}"))["role"] == "admin"
        error = assert_error(
            await admin.call("PUT", f"/v1/users/{alice}/role", json={"role": "god"}),
            400,
            "invalid_request",
        )
        assert error["field"] == "$.role"
        assert_error(
            await admin.call("PUT", "/v1/users/999/role", json={"role": "user"}), 404, "not_found"
        )
        assert_error(await admin.call("PUT", f"/v1/users/{alice}/role"), 400, "invalid_request")


async def test_a_password_reset_revokes_sessions_and_keeps_mfa(data_dir: DataDir) -> None:
    async with accounts_running(data_dir) as admin:
        alice = await admin.create("alice")
        grant = await login(admin, "alice")
        # MFA as if enrolled and confirmed: the reset must leave it alone.
        await admin.sql(
            "UPDATE users SET totp_secret = ?, totp_confirmed_at = ? WHERE id = ?",
            ("JBSWY3DPEHPK3PXP", now_ms(), alice),
        )
        weak = await admin.call("POST", f"/v1/users/{alice}/password", json={"password": "abc"})
        assert assert_error(weak, 400, "weak_password")["field"] == "$.password"
        assert admin.revoked == []  # a refused reset changes nothing
        user = await admin.ok(
            "POST", f"/v1/users/{alice}/password", json={"password": OTHER_PASSWORD}
        )
        assert user["mfa_enabled"] is True
        assert user["password_changed_at"] >= user["created_at"]
        assert admin.revoked == [grant.session_id]
        # The new password first: a failed login would start the failure backoff.
        with pytest.raises(AuthError) as new:
            await login(admin, "alice", OTHER_PASSWORD)
        assert new.value.code == "mfa_required"  # password accepted; the second factor stays
        with pytest.raises(AuthError) as old:
            await login(admin, "alice", PASSWORD)
        assert old.value.code == "login_failed"
        assert_error(
            await admin.call("POST", "/v1/users/999/password", json={"password": OTHER_PASSWORD}),
            404,
            "not_found",
        )


async def test_an_mfa_reset_needs_confirmation_clears_the_factor_and_ends_sessions(
    data_dir: DataDir,
) -> None:
    async with accounts_running(data_dir) as admin:
        alice = await admin.create("alice")
        grant = await login(admin, "alice")
        await admin.sql(
            "UPDATE users SET totp_secret = ?, totp_confirmed_at = ? WHERE id = ?",
            ("JBSWY3DPEHPK3PXP", now_ms(), alice),
        )
        unconfirmed = await admin.call(
            "POST", f"/v1/users/{alice}/mfa/reset", json={"confirm": False}
        )
        assert assert_error(unconfirmed, 400, "invalid_request")["field"] == "$.confirm"
        assert admin.revoked == []
        user = await admin.ok("POST", f"/v1/users/{alice}/mfa/reset", json={"confirm": True})
        assert user["mfa_enabled"] is False
        assert admin.revoked == [grant.session_id]
        assert (await login(admin, "alice")).session_id != grant.session_id  # no factor asked
        assert_error(
            await admin.call("POST", "/v1/users/999/mfa/reset", json={"confirm": True}),
            404,
            "not_found",
        )


# -- invites --------------------------------------------------------------------------------------


async def test_invites_show_the_code_once_and_redeem_once(data_dir: DataDir) -> None:
    async with accounts_running(data_dir) as admin:
        created = await admin.ok(
            "POST", "/v1/invites", json={"role": "moderator", "days": 2, "note": "for dana"}
        )
        code, invite = created["code"], created["invite"]
        assert invite["role"] == "moderator" and invite["note"] == "for dana"
        assert invite["expires_at"] - invite["created_at"] == 2 * 86_400_000
        listed = await admin.call("GET", "/v1/invites")
        assert code not in listed.text
        assert listed.json()["invites"] == [invite]
        grant = await admin.auth.register(code, "dana", PASSWORD, PEER)
        assert grant.role == "moderator"
        with pytest.raises(AuthError) as again:
            await admin.auth.register(code, "erin", PASSWORD, PEER)
        assert again.value.code == "invalid_invite"
        used = (await admin.ok("GET", "/v1/invites"))["invites"][0]
        assert used["used_by"] == grant.user_id and used["used_at"] is not None
        closed = await admin.call("DELETE", f"/v1/invites/{invite['id']}")
        assert "already used" in assert_error(closed, 409, "invite_closed")["message"]

        default = await admin.ok("POST", "/v1/invites")  # role user, auth.invite_days
        assert default["invite"]["role"] == "user"
        assert default["invite"]["expires_at"] - default["invite"]["created_at"] == 7 * 86_400_000
        revoked = await admin.ok("DELETE", f"/v1/invites/{default['invite']['id']}")
        assert revoked["revoked_at"] is not None
        with pytest.raises(AuthError) as gone:
            # Another network: a failed redemption backs off further tries from PEER's.
            await admin.auth.register(default["code"], "erin", PASSWORD, OTHER_PEER)
        assert gone.value.code == "invalid_invite"
        assert_error(await admin.call("DELETE", "/v1/invites/999"), 404, "not_found")
        for bad in ({"days": 0}, {"days": 91}, {"role": "root"}, {"note": "x" * 201}):
            assert_error(await admin.call("POST", "/v1/invites", json=bad), 400, "invalid_request")


# -- sessions -------------------------------------------------------------------------------------


async def test_sessions_list_and_revoke(data_dir: DataDir) -> None:
    async with accounts_running(data_dir) as admin:
        alice = await admin.create("alice")
        bob = await admin.create("bob")
        a1, a2, b1 = [await login(admin, name) for name in ("alice", "alice", "bob")]
        live = (await admin.ok("GET", "/v1/sessions"))["sessions"]
        assert [s["session_id"] for s in live] == [b1.session_id, a2.session_id, a1.session_id]
        assert live[0]["device_name"] == "laptop" and live[0]["ip"] == PEER.ip
        mine = (await admin.ok("GET", "/v1/sessions", params={"user_id": alice}))["sessions"]
        assert {s["session_id"] for s in mine} == {a1.session_id, a2.session_id}
        assert_error(
            await admin.call("GET", "/v1/sessions", params={"user_id": 999}), 404, "not_found"
        )

        assert await admin.ok("DELETE", f"/v1/sessions/{a1.session_id}") == {
            "revoked": [a1.session_id]
        }
        assert await admin.ok("DELETE", f"/v1/sessions/{a1.session_id}") == {"revoked": []}
        assert_error(await admin.call("DELETE", "/v1/sessions/999"), 404, "not_found")
        assert await admin.ok("POST", f"/v1/users/{alice}/sessions/revoke") == {
            "revoked": [a2.session_id]
        }
        assert_error(await admin.call("POST", "/v1/users/999/sessions/revoke"), 404, "not_found")

        for body in (None, {}, {"confirm": False}):
            refused = await admin.call("POST", "/v1/sessions/revoke-all", json=body)
            assert assert_error(refused, 400, "invalid_request")["field"] == "$.confirm"
        assert [s["session_id"] for s in (await admin.ok("GET", "/v1/sessions"))["sessions"]] == [
            b1.session_id
        ]
        b2 = await login(admin, "bob")
        everything = await admin.ok("POST", "/v1/sessions/revoke-all", json={"confirm": True})
        assert sorted(everything["revoked"]) == [b1.session_id, b2.session_id]
        assert (await admin.ok("GET", "/v1/sessions"))["sessions"] == []
        assert sorted(admin.revoked) == sorted(
            [a1.session_id, a2.session_id, b1.session_id, b2.session_id]
        )
        with pytest.raises(AuthError):
            await admin.auth.resume(b2.access_token or "", PEER)
        del bob


# -- the auth audit log --------------------------------------------------------------------------


async def test_the_auth_audit_log_pages_and_filters(data_dir: DataDir) -> None:
    async with accounts_running(data_dir) as admin:
        alice = await admin.create("alice")
        await admin.ok("POST", f"/v1/users/{alice}/disable")
        await admin.ok("POST", f"/v1/users/{alice}/enable")
        await admin.ok("POST", "/v1/invites")
        with pytest.raises(AuthError):
            await login(admin, "alice", OTHER_PASSWORD)
        events = (await admin.ok("GET", "/v1/auth-audit"))["events"]
        assert [(e["event"], e["outcome"]) for e in events] == [
            ("login", "bad_password"),
            ("admin_create_invite", "ok"),
            ("admin_enable_user", "ok"),
            ("admin_disable_user", "ok"),
            ("admin_create_user", "ok"),
        ]
        assert events[0]["ip"] == PEER.ip and events[1]["ip"] == "admin-api"
        assert OTHER_PASSWORD not in json.dumps(events)

        page = await admin.ok("GET", "/v1/auth-audit", params={"limit": 2})
        assert page["events"] == events[:2] and page["next_before_id"] == events[1]["id"]
        page = await admin.ok(
            "GET", "/v1/auth-audit", params={"limit": 2, "before_id": page["next_before_id"]}
        )
        assert page["events"] == events[2:4]
        page = await admin.ok(
            "GET", "/v1/auth-audit", params={"limit": 2, "before_id": page["next_before_id"]}
        )
        assert page["events"] == events[4:] and page["next_before_id"] is None

        by_user = (await admin.ok("GET", "/v1/auth-audit", params={"user_id": alice}))["events"]
        assert [e["id"] for e in by_user] == [e["id"] for e in events if e["user_id"] == alice]
        assert len(by_user) == 4  # the invite is nobody's yet
        logins = (await admin.ok("GET", "/v1/auth-audit", params={"event": "login"}))["events"]
        assert logins == events[:1]
        since = events[0]["at"] + 1
        later = await admin.ok("GET", "/v1/auth-audit", params={"since": since})
        assert later == {"events": [], "next_before_id": None}
        both = await admin.ok(
            "GET", "/v1/auth-audit", params={"user_id": alice, "event": "admin_create_user"}
        )
        assert [e["event"] for e in both["events"]] == ["admin_create_user"]
        for bad, field in (
            ("limit=501", "limit"),
            ("user_id=0", "user_id"),
            ("since=x", "since"),
            ("event=", "event"),
            ("who=1", "who"),
        ):
            error = assert_error(
                await admin.call("GET", f"/v1/auth-audit?{bad}"), 400, "invalid_request"
            )
            assert error.get("field") == field


# -- auth, availability and the admin audit log --------------------------------------------------


async def test_every_account_route_refuses_a_missing_token_and_audits_it(
    data_dir: DataDir,
) -> None:
    async with accounts_running(data_dir) as admin:
        alice = await admin.create("alice")
        expected = [("POST", "/v1/users", 200)]
        for r in ACCOUNT_ROUTES:
            path = concrete(r, alice)
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                response = await admin.client.request(r.method, path, headers=headers, json={})
                assert_error(response, 401, "unauthorized")
                expected.append((r.method, path, 401))
        assert await admin.audit_rows() == expected
        user = await admin.ok("GET", f"/v1/users/{alice}")
        assert user["disabled"] is False and user["role"] == "user"  # nothing changed


async def test_without_account_admin_the_routes_answer_503(data_dir: DataDir) -> None:
    async with accounts_running(data_dir, with_accounts=False) as admin:
        valid_bodies: dict[str, dict[str, Any]] = {
            "create_user": {"username": "alice", "password": PASSWORD},
            "reset_user_password": {"password": PASSWORD},
            "set_user_role": {"role": "user"},
            "revoke_all_sessions": {"confirm": True},
            "reset_user_mfa": {"confirm": True},
        }
        for r in ACCOUNT_ROUTES:
            body = valid_bodies.get(r.endpoint)
            response = await admin.call(r.method, concrete(r), json=body)
            assert_error(response, 503, "service_unavailable")
        assert (await admin.client.get("/v1/health")).status_code == 200


async def test_every_change_and_every_read_of_personal_data_is_in_the_admin_audit(
    data_dir: DataDir,
) -> None:
    async with accounts_running(data_dir) as admin:
        alice = await admin.create("alice")
        await login(admin, "alice")
        invite = (await admin.ok("POST", "/v1/invites"))["invite"]["id"]
        requests: list[tuple[str, str, dict[str, Any]]] = [
            ("GET", "/v1/users", {}),
            ("GET", f"/v1/users/{alice}", {}),
            ("PUT", f"/v1/users/{alice}/role", {"json": {"role": "moderator"}}),
            ("POST", f"/v1/users/{alice}/disable", {}),
            ("POST", f"/v1/users/{alice}/enable", {}),
            ("GET", "/v1/invites", {}),
            ("DELETE", f"/v1/invites/{invite}", {}),
            ("GET", "/v1/sessions", {}),
            ("GET", f"/v1/sessions?user_id={alice}", {}),
            ("DELETE", "/v1/sessions/1", {}),
            ("POST", f"/v1/users/{alice}/sessions/revoke", {}),
            ("POST", "/v1/sessions/revoke-all", {"json": {"confirm": True}}),
            ("GET", "/v1/auth-audit?event=login", {}),
            ("GET", "/v1/users/999", {}),
        ]
        for method, path, kw in requests:
            await admin.call(method, path, **kw)
        rows = await admin.audit_rows()
        assert rows[:2] == [("POST", "/v1/users", 200), ("POST", "/v1/invites", 200)]
        # Paths keep ids but never a query string, a password or an invite code.
        assert rows[2:] == [
            (method, path.split("?")[0], 404 if path.endswith("999") else 200)
            for method, path, _ in requests
        ]
        listed = (await admin.ok("GET", "/v1/admin-audit", params={"limit": 500}))["entries"]
        assert len(listed) == len(rows)


# -- chatctl ----------------------------------------------------------------------------------


def chatctl(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    code = "import sys; from chatd.chatctl import main; sys.argv[0] = 'chatctl'; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        start_new_session=True,  # no controlling terminal: getpass cannot ask
    )


async def test_chatctl_administers_accounts(data_dir: DataDir, short_tmp: Path) -> None:
    async with accounts_running(data_dir) as admin:
        base = [
            "--socket",
            str(data_dir.path / "a.sock"),
            "--token-file",
            str(data_dir.path / "admin-token"),
        ]

        async def ctl(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
            return await trio.to_thread.run_sync(lambda: chatctl(*base, *args, stdin=stdin))

        # Spaces are part of a password: only the line end is dropped.
        spaced = f" {PASSWORD} "
        made = await ctl(
            "users",
            "create",
            "carol",
            "--role",
            "moderator",
            "--password-stdin",
            stdin=spaced + "\n",
        )
        assert made.returncode == 0, made.stderr
        assert "carol" in made.stdout and "moderator" in made.stdout
        assert PASSWORD not in made.stdout + made.stderr
        carol = (await login(admin, "carol", spaced)).user_id

        listed = await ctl("--json", "users", "list")
        assert [u["username"] for u in json.loads(listed.stdout)["users"]] == ["carol"]
        shown = await ctl("users", "show", str(carol))
        assert shown.stdout.splitlines()[0].split() == [
            "id",
            "username",
            "role",
            "mfa",
            "status",
            "created",
            "password",
            "set",
        ]
        assert (await ctl("users", "set-role", str(carol), "admin")).returncode == 0
        assert "disabled" in (await ctl("users", "disable", str(carol))).stdout
        assert "active" in (await ctl("users", "enable", str(carol))).stdout

        no_tty = await ctl("users", "reset-password", str(carol))
        assert no_tty.returncode == 64 and "--password-stdin" in no_tty.stderr
        reset = await ctl(
            "users", "reset-password", str(carol), "--password-stdin", stdin=OTHER_PASSWORD + "\n"
        )
        assert reset.returncode == 0, reset.stderr
        await login(admin, "carol", OTHER_PASSWORD)
        weak = await ctl("users", "reset-password", str(carol), "--password-stdin", stdin="abc\n")
        assert weak.returncode == 1 and "weak_password" in weak.stderr
        assert "field $.password" in weak.stderr
        missing = await ctl("users", "show", "999")
        assert missing.returncode == 1 and "not_found" in missing.stderr
        assert (await ctl("users", "show", "0")).returncode == 64
        unknown = await ctl("users", "show", "abc")  # a username: none by that name
        assert unknown.returncode == 1 and "no user named 'abc'" in unknown.stderr

        invite = await ctl("--json", "invites", "create", "--days", "1", "--note", "for dave")
        created = json.loads(invite.stdout)
        assert created["invite"]["note"] == "for dave" and created["code"]
        table = await ctl("invites", "list")
        assert "for dave" in table.stdout and "open" in table.stdout
        assert created["code"] not in table.stdout
        assert "revoked" in (await ctl("invites", "revoke", str(created["invite"]["id"]))).stdout

        sessions = await ctl("sessions", "list", "--user", str(carol))
        assert "laptop" in sessions.stdout and "live" in sessions.stdout
        unconfirmed = await ctl("sessions", "revoke-all")
        assert unconfirmed.returncode == 64 and "--yes" in unconfirmed.stderr
        assert (await admin.ok("GET", "/v1/sessions"))["sessions"]  # still logged in
        everything = await ctl("sessions", "revoke-all", "--yes")
        assert everything.returncode == 0 and "revoked 1 session(s)" in everything.stdout

        audit = await ctl("auth-audit", "--user", str(carol), "--event", "admin_create_user")
        assert audit.returncode == 0, audit.stderr
        assert audit.stdout.count("admin_create_user") == 1
        paged = await ctl("auth-audit", "--limit", "1")
        assert "(more: --before " in paged.stdout
