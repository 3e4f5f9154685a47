"""Accounts, sessions and MFA over the real relay: what a client sees, and the audit log."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pyotp
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from chatd.auth.accounts import AccountAdmin
from chatd.auth.models import AuthError
from chatd.auth.service import AuthService
from chatd.config import (
    AuthSettings,
    Config,
    DeviceSettings,
    RelaySettings,
    RoomSettings,
    StoreSettings,
)
from chatd.daemon import open_services
from chatd.e2ee.keys import KeyService
from chatd.e2ee.queues import QueueService
from chatd.relay import Relay, serve_relay
from chatd.rooms.service import RoomService
from chatd.store import Store, serve_store

KEY = bytes(range(32))
PASSWORD = "correct horse battery staple"
_ids = itertools.count(1)


@dataclasses.dataclass
class Server:
    relay: Relay
    auth: AuthService
    admin: AccountAdmin
    store: Store
    keys: KeyService
    queues: QueueService
    rooms: RoomService

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.relay.port}/v1/ws"

    async def audit(self) -> list[tuple[str, str]]:
        rows = await self.store.read(
            lambda c: c.execute("SELECT event, outcome FROM auth_audit ORDER BY id").fetchall()
        )
        return [tuple(r) for r in rows]  # type: ignore[misc]


@asynccontextmanager
async def server(
    tmp: Path,
    devices: DeviceSettings | None = None,
    relay: dict[str, Any] | None = None,
    rooms: RoomSettings | None = None,
    **auth_settings: Any,
) -> AsyncIterator[Server]:
    defaults = {"session_check_seconds": 0.2, "require_mfa": "none", "backoff_base_seconds": 1e-6}
    settings = AuthSettings(**{**defaults, **auth_settings})
    relay_settings = RelaySettings(
        **{"port": 0, "idle_timeout_seconds": 30, "handshake_timeout_seconds": 10, **(relay or {})}
    )
    config = Config(relay=relay_settings, auth=settings, path=tmp / "chatd.toml")
    if devices is not None:
        config = dataclasses.replace(config, devices=devices)
    if rooms is not None:
        config = dataclasses.replace(config, rooms=rooms)
    async with trio.open_nursery() as nursery:
        store = await nursery.start(serve_store, tmp / "c.db", KEY, StoreSettings())
        services = await open_services(nursery, store, config)
        relay = await nursery.start(
            partial(serve_relay, **services.for_relay()), config, trio.Event()
        )
        admin = AccountAdmin(services.auth, current=services.current)
        await create_once(admin, "alice", PASSWORD)
        yield Server(
            relay, services.auth, admin, store, services.keys, services.queues, services.rooms
        )
        nursery.cancel_scope.cancel()


async def create_once(admin: AccountAdmin, username: str, password: str) -> None:
    """Create a user unless the database (reopened by a test) already has them."""
    try:
        await admin.create_user(username, password, "user")
    except AuthError as exc:
        if exc.code != "username_taken":
            raise


class Client:
    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.skipped: list[dict[str, Any]] = []  # frames request() read past, in order

    async def request(self, frame_type: str, **fields: Any) -> dict[str, Any]:
        request_id = f"r{next(_ids)}"
        await self.ws.send_message(json.dumps({"type": frame_type, "id": request_id, **fields}))
        with trio.fail_after(10):
            while True:
                reply = json.loads(await self.ws.get_message())
                if reply.get("id") == request_id:
                    return reply  # type: ignore[no-any-return]
                self.skipped.append(reply)

    async def login(
        self, username: str = "alice", password: str = PASSWORD, **kw: Any
    ) -> dict[str, Any]:
        return await self.request(
            "login", username=username, password=password, device_name="laptop", **kw
        )

    async def closed(self) -> tuple[int, str | None]:
        with trio.fail_after(10):
            while True:
                try:
                    await self.ws.get_message()
                except ConnectionClosed as exc:
                    return exc.reason.code, exc.reason.reason


@asynccontextmanager
async def connect(srv: Server) -> AsyncIterator[Client]:
    async with open_websocket_url(srv.url) as ws:
        hello = json.loads(await ws.get_message())
        assert hello["type"] == "hello"
        yield Client(ws)


async def test_login_returns_a_session_with_tokens(short_tmp: Path) -> None:
    async with server(short_tmp) as srv, connect(srv) as c:
        session = await c.login()
        assert session["type"] == "session"
        assert session["user"] == {"id": 1, "username": "alice", "role": "user"}
        assert len(session["access_token"]) >= 43 and len(session["refresh_token"]) >= 43
        assert session["mfa_enrollment_required"] is False
        minutes = (session["access_expires_at"] - time.time() * 1000) / 60_000
        assert 14 < minutes <= 15
        sessions = await c.request("list_sessions")
        [entry] = sessions["sessions"]
        assert entry["device_name"] == "laptop" and entry["current"] is True
        assert entry["ip"] == "127.0.0.0/24"
        assert await srv.audit() == [("admin_create_user", "ok"), ("login", "ok")]
        stored = await srv.store.read(lambda c: c.execute("SELECT * FROM sessions").fetchall())
        assert session["access_token"] not in repr(stored)  # only hashes are stored


async def test_list_sessions_shows_the_live_ones_past_a_long_history(short_tmp: Path) -> None:
    """A long-lived account's revoked and ended sessions (more than the
    answer's cap of 1,000) do not push its live ones out of the list."""
    async with server(short_tmp) as srv, connect(srv) as c:
        await c.login()
        copy = (
            "INSERT INTO sessions (user_id, device_name, created_at, last_seen_at, ip,"
            " expires_at, access_hash, access_expires_at, refresh_hash, revoked_at)"
            " SELECT user_id, device_name, created_at, last_seen_at, ip, {expires},"
            " randomblob(32), access_expires_at, randomblob(32), {revoked}"
            " FROM sessions WHERE id = 1"
        )

        def history(conn: Any) -> None:
            for _ in range(1_000):
                conn.execute(copy.format(expires="expires_at", revoked="created_at"))
            for _ in range(5):
                conn.execute(copy.format(expires="1", revoked="NULL"))

        await srv.store.write(history)
        sessions = (await c.request("list_sessions"))["sessions"]
        assert [(s["session_id"], s["current"]) for s in sessions] == [(1, True)]


@pytest.mark.parametrize(
    ("username", "password", "outcome"),
    [
        ("alice", PASSWORD + "!", "bad_password"),
        ("nobody", PASSWORD, "unknown_user"),
        ("ALICE", "x" * 200, "bad_password"),
        ("alice", PASSWORD.upper(), "bad_password"),
        ("alice", PASSWORD[:-1], "bad_password"),
    ],
)
async def test_a_failed_login_says_the_same_for_every_cause_and_is_audited(
    short_tmp: Path, username: str, password: str, outcome: str
) -> None:
    async with server(short_tmp) as srv, connect(srv) as c:
        reply = await c.login(username, password)
        assert reply == {
            "type": "error",
            "code": "login_failed",
            "id": reply["id"],
            "message": "wrong username or password",
        }
        assert (await srv.audit())[-1] == ("login", outcome)
        # The connection stays usable: the right password still works.
        assert (await c.login("Alice"))["type"] == "session"


async def test_unknown_usernames_cost_one_password_verification_too(short_tmp: Path) -> None:
    async with server(short_tmp) as srv, connect(srv) as c:
        calls = []
        real = srv.auth._verify

        async def counting(stored: str, password: str) -> bool:
            calls.append(stored == srv.auth.hasher.dummy_hash)
            return await real(stored, password)

        srv.auth._verify = counting  # type: ignore[method-assign]
        await c.login("nobody", PASSWORD)
        await c.login("alice", "wrong password!!")
        assert calls == [True, False]  # one Argon2 verification each way


async def test_an_oversize_password_is_refused_by_the_frame_and_not_hashed(short_tmp: Path) -> None:
    async with server(short_tmp) as srv, connect(srv) as c:
        reply = await c.login(password="x" * 1025)
        assert reply["code"] == "bad_frame" and reply["field"] == "$.password"
        assert await srv.audit() == [("admin_create_user", "ok")]


async def test_requests_before_login_are_refused(short_tmp: Path) -> None:
    async with server(short_tmp) as srv, connect(srv) as c:
        reply = await c.request("list_sessions")
        assert reply["code"] == "auth_required"


async def test_resume_and_refresh_on_a_new_connection(short_tmp: Path) -> None:
    async with server(short_tmp) as srv:
        async with connect(srv) as first:
            session = await first.login()
        async with connect(srv) as second:
            resumed = await second.request("resume", access_token=session["access_token"])
            assert resumed["type"] == "session" and resumed["session_id"] == session["session_id"]
            assert "access_token" not in resumed
            assert (await second.request("list_sessions"))["type"] == "sessions"
            tokens = await second.request("refresh", refresh_token=session["refresh_token"])
            assert tokens["type"] == "tokens"
            assert tokens["refresh_token"] != session["refresh_token"]
        async with connect(srv) as third:
            # A refresh as the first frame authenticates the connection too.
            again = await third.request("refresh", refresh_token=tokens["refresh_token"])
            assert again["type"] == "tokens"
            assert (await third.request("list_sessions"))["type"] == "sessions"


async def test_a_reused_refresh_token_revokes_the_session_and_closes_its_connections(
    short_tmp: Path,
) -> None:
    async with server(short_tmp) as srv, connect(srv) as victim, connect(srv) as thief:
        session = await victim.login()
        stolen = session["refresh_token"]
        assert (await victim.request("refresh", refresh_token=stolen))["type"] == "tokens"
        reply = await thief.request("refresh", refresh_token=stolen)
        assert reply["code"] == "invalid_token"
        assert await victim.closed() == (4003, "session revoked")
        assert ("refresh", "token_reused") in await srv.audit()
        async with connect(srv) as later:
            expired = await later.request("resume", access_token=session["access_token"])
            assert expired["code"] == "invalid_token"


async def test_an_expired_access_token_closes_the_connection_with_4001(short_tmp: Path) -> None:
    async with server(short_tmp, access_token_minutes=0.005) as srv, connect(srv) as c:
        session = await c.login()
        assert await c.closed() == (4001, "session expired")
        async with connect(srv) as again:
            reply = await again.request("resume", access_token=session["access_token"])
            assert reply["code"] == "token_expired"
            tokens = await again.request("refresh", refresh_token=session["refresh_token"])
            assert tokens["type"] == "tokens"


async def test_refreshing_in_time_keeps_the_connection(short_tmp: Path) -> None:
    async with server(short_tmp, access_token_minutes=0.01) as srv, connect(srv) as c:
        session = await c.login()
        refresh = session["refresh_token"]
        for _ in range(3):  # well past the first access token's 0.6 s
            tokens = await c.request("refresh", refresh_token=refresh)
            refresh = tokens["refresh_token"]
            # Let real time pass, as a client would between refreshes: the
            # server's clock decides expiry, so there is no event to wait on.
            await trio.sleep(0.3)
        assert (await c.request("list_sessions"))["type"] == "sessions"


async def test_revoking_another_session_closes_it_within_seconds(short_tmp: Path) -> None:
    async with server(short_tmp) as srv, connect(srv) as phone, connect(srv) as laptop:
        other = await phone.login()
        await laptop.login()
        reply = await laptop.request("revoke_sessions", session_ids=[other["session_id"]])
        assert reply == {"type": "revoked", "id": reply["id"], "session_ids": [other["session_id"]]}
        assert await phone.closed() == (4003, "session revoked")
        own = await laptop.request("revoke_sessions", session_ids=[999])
        assert own["code"] == "unknown_session"


async def test_logout_ends_the_session_on_the_server(short_tmp: Path) -> None:
    async with server(short_tmp) as srv:
        async with connect(srv) as c:
            session = await c.login()
            assert (await c.request("logout"))["type"] == "ok"
            assert await c.closed() == (1000, "logged out")
        async with connect(srv) as again:
            reply = await again.request("resume", access_token=session["access_token"])
            assert reply["code"] == "invalid_token"
            reply = await again.request("refresh", refresh_token=session["refresh_token"])
            assert reply["code"] == "invalid_token"
        assert ("logout", "ok") in await srv.audit()


async def enroll(c: Client) -> tuple[str, list[str]]:
    enrollment = await c.request("mfa_enroll", password=PASSWORD)
    assert enrollment["provisioning_uri"].startswith("otpauth://totp/")
    secret = enrollment["secret"]
    confirmed = await c.request("mfa_confirm", code=pyotp.TOTP(secret).now())
    assert len(confirmed["codes"]) == 10
    return secret, confirmed["codes"]


async def only_the_new_token_resumes(srv: Server, old: list[str], new: str) -> None:
    """Access tokens from before a rotation are refused by resume; the new one works."""
    for token in old:
        async with connect(srv) as stale:
            assert (await stale.request("resume", access_token=token))["code"] == "invalid_token"
    async with connect(srv) as fresh:
        assert (await fresh.request("resume", access_token=new))["type"] == "session"


async def test_turning_mfa_on_and_new_recovery_codes_rotate_this_sessions_tokens(
    short_tmp: Path,
) -> None:
    """A change of second factor after re-authentication leaves the session
    on a new token pair (SECURITY.md F-5): the pair from before no longer
    resumes, and the new one does."""
    async with server(short_tmp) as srv, connect(srv) as c:
        before = await c.login()
        secret = (await c.request("mfa_enroll", password=PASSWORD))["secret"]
        confirmed = await c.request("mfa_confirm", code=pyotp.TOTP(secret).now())
        after_mfa = confirmed["tokens"]
        assert after_mfa["session_id"] == before["session_id"]
        code = pyotp.TOTP(secret).at(time.time() + 30)  # a step not used yet
        renewed = await c.request("new_recovery_codes", password=PASSWORD, code=code)
        assert len(renewed["codes"]) == 10
        latest = renewed["tokens"]
        assert (await c.request("ping"))["type"] == "pong"  # this connection goes on
        await only_the_new_token_resumes(
            srv, [before["access_token"], after_mfa["access_token"]], latest["access_token"]
        )


async def test_totp_enrollment_then_login_needs_a_fresh_code(short_tmp: Path) -> None:
    async with server(short_tmp) as srv, connect(srv) as c:
        await c.login()
        secret, codes = await enroll(c)
        async with connect(srv) as d:
            assert (await d.login())["code"] == "mfa_required"
            code = pyotp.TOTP(secret).at(time.time() + 30)  # next step: not used yet
            assert (await d.login(totp=code))["type"] == "session"
        async with connect(srv) as e:
            replay = await e.login(totp=code)
            assert replay["code"] == "mfa_failed"
            assert (await e.login(totp="12345"))["code"] == "mfa_failed"  # five digits
            recovered = await e.login(recovery_code=codes[0].upper().replace("-", " "))
            assert recovered["type"] == "session"
        async with connect(srv) as f:
            assert (await f.login(recovery_code=codes[0]))["code"] == "mfa_failed"
        audit = await srv.audit()
        assert ("mfa_enroll", "ok") in audit and ("mfa_confirm", "ok") in audit
        assert ("login", "bad_second_factor") in audit
        # The right password alone, and the recovery code used, have rows of their own.
        assert audit.count(("login", "mfa_required")) == 1
        assert audit.count(("recovery_code_used", "ok")) == 1


async def test_a_wrong_confirmation_code_does_not_activate_mfa(short_tmp: Path) -> None:
    async with server(short_tmp) as srv, connect(srv) as c:
        await c.login()
        await c.request("mfa_enroll", password=PASSWORD)
        assert (await c.request("mfa_confirm", code="000000"))["code"] == "mfa_failed"
        async with connect(srv) as d:
            assert (await d.login())["type"] == "session"  # no second factor yet


async def test_mfa_policy_restricts_admins_until_they_enroll(short_tmp: Path) -> None:
    async with server(short_tmp, require_mfa="admins") as srv, connect(srv) as c:
        await srv.admin.create_user("root-admin", PASSWORD, "admin")
        session = await c.login("root-admin")
        assert session["mfa_enrollment_required"] is True
        blocked = await c.request(
            "change_password", current_password=PASSWORD, new_password="another long password"
        )
        assert blocked["code"] == "mfa_enrollment_required"
        await enroll(c)
        # Enrolled: the same connection is now fully authenticated.
        assert (await c.request("revoke_sessions", all_others=True))["type"] == "revoked"


async def test_changing_the_password_needs_the_current_one_and_ends_other_sessions(
    short_tmp: Path,
) -> None:
    async with server(short_tmp) as srv, connect(srv) as c, connect(srv) as other:
        before = await c.login()
        await other.login()
        wrong = await c.request(
            "change_password",
            current_password="not the password",
            new_password="a brand new passphrase",
        )
        assert wrong["code"] == "reauth_failed"
        weak = await c.request(
            "change_password", current_password=PASSWORD, new_password="1q2w3e4r5t6y"
        )  # a top-10,000 password
        assert weak["code"] == "weak_password" and weak["field"] == "$.new_password"
        changed = await c.request(
            "change_password", current_password=PASSWORD, new_password="a brand new passphrase"
        )
        assert changed["type"] == "ok"  # with the new pair in an optional field
        tokens = changed["tokens"]
        assert tokens["session_id"] == before["session_id"]
        assert tokens["access_token"] != before["access_token"]
        assert tokens["refresh_token"] != before["refresh_token"]
        assert await other.closed() == (4003, "session revoked")
        # This session goes on, on the new tokens only (SECURITY.md F-5).
        assert (await c.request("ping"))["type"] == "pong"
        await only_the_new_token_resumes(srv, [before["access_token"]], tokens["access_token"])
        async with connect(srv) as again:
            assert (await again.login())["code"] == "login_failed"
            assert (await again.login(password="a brand new passphrase"))["type"] == "session"
        audit = await srv.audit()
        assert ("password_change", "bad_password") in audit and ("password_change", "ok") in audit


async def test_a_disabled_account_is_disconnected_and_cannot_log_in(short_tmp: Path) -> None:
    async with server(short_tmp) as srv, connect(srv) as c:
        session = await c.login()
        await srv.admin.set_disabled(session["user"]["id"], True)
        assert await c.closed() == (4003, "session revoked")
        async with connect(srv) as again:
            assert (await again.login())["code"] == "account_disabled"


async def test_invites_work_once(short_tmp: Path) -> None:
    async with server(short_tmp) as srv, connect(srv) as c, connect(srv) as d:
        code, _ = await srv.admin.create_invite("user", 1, "for bob")
        joined = await c.request(
            "register",
            invite_code=code,
            username="Bob",
            password="bobs own long password",
            device_name="phone",
        )
        assert joined["type"] == "session" and joined["user"]["username"] == "Bob"
        again = await d.request(
            "register",
            invite_code=code,
            username="carol",
            password="carols long password",
            device_name="phone",
        )
        assert again["code"] == "invalid_invite"
        code2, _ = await srv.admin.create_invite("user", 1, "")
        lookalike = await d.request(
            "register",
            invite_code=code2,
            username="ＢＯＢ",
            password="another long password",
            device_name="x",
        )
        assert lookalike["code"] == "username_taken"
        short = await d.request(
            "register", invite_code=code2, username="carol", password="too short", device_name="x"
        )
        assert short["code"] == "weak_password"


async def test_floods_are_rate_limited_with_retry_after(short_tmp: Path) -> None:
    async with server(short_tmp, rate_burst=3, login_rate_per_ip=1.0) as srv, connect(srv) as c:
        replies = [await c.login(password="wrong password!") for _ in range(5)]
        codes = [r["code"] for r in replies]
        assert codes[:1] == ["login_failed"]
        assert "rate_limited" in codes
        limited = next(r for r in replies if r["code"] == "rate_limited")
        assert limited["retry_after"] > 0
        assert ("login", "rate_limited") in await srv.audit()


async def test_repeated_failures_back_off_exponentially_but_not_forever(short_tmp: Path) -> None:
    async with server(short_tmp, backoff_base_seconds=10, rate_burst=100) as srv, connect(srv) as c:
        assert (await c.login(password="wrong password!"))["code"] == "login_failed"
        first = await c.login(password="wrong password!")
        assert first["code"] == "rate_limited" and 0 < first["retry_after"] <= 10
        # The right password waits too: backoff does not reveal which guess was right.
        assert (await c.login())["code"] == "rate_limited"
        assert srv.auth.backoff.max_seconds == 900.0


async def test_a_hash_with_old_parameters_is_upgraded_at_login(short_tmp: Path) -> None:
    from chatd.auth.passwords import Argon2Params, PasswordHasher

    weak = PasswordHasher(Argon2Params(memory_kib=8, time_cost=1)).hash(PASSWORD)
    async with server(short_tmp) as srv, connect(srv) as c:
        await srv.store.write(
            lambda conn: conn.execute("UPDATE users SET password_hash = ? WHERE id = 1", (weak,))
        )
        assert (await c.login())["type"] == "session"
        stored = await srv.store.read(
            lambda conn: conn.execute("SELECT password_hash FROM users WHERE id = 1").fetchone()[0]
        )
        assert stored != weak
        assert "m=19456,t=2,p=1" in stored
        assert not srv.auth.hasher.needs_rehash(stored)


async def test_login_frames_never_put_secrets_in_the_log(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with server(short_tmp) as srv, connect(srv) as c, connect(srv) as other:
        session = await c.login()
        assert (await other.login(password="wrong password here"))["code"] == "login_failed"
        await c.request("refresh", refresh_token=session["refresh_token"])
    assert "auth.login" in caplog.text  # the events are logged...
    text = caplog.text + repr([r.__dict__ for r in caplog.records])
    for secret in (
        PASSWORD,
        "wrong password here",
        session["access_token"],
        session["refresh_token"],
    ):
        assert secret not in text


async def test_behind_a_proxy_each_client_has_its_own_limits(short_tmp: Path) -> None:
    async with server(short_tmp, backoff_base_seconds=60) as srv:
        headers = [(b"X-Forwarded-For", b"198.51.100.7")]
        async with open_websocket_url(srv.url, extra_headers=headers) as ws:
            await ws.get_message()
            attacker = Client(ws)
            assert (await attacker.login("nobody"))["code"] == "login_failed"
            assert (await attacker.login("nobody"))["code"] == "rate_limited"
        headers = [(b"X-Forwarded-For", b"203.0.113.9")]
        async with open_websocket_url(srv.url, extra_headers=headers) as ws:
            await ws.get_message()
            assert (await Client(ws).login())["type"] == "session"
        ips = await srv.store.read(
            lambda c: [r[0] for r in c.execute("SELECT ip FROM auth_audit WHERE event = 'login'")]
        )
        assert ips == ["198.51.100.0/24", "198.51.100.0/24", "203.0.113.0/24"]


async def test_a_recovery_code_replaces_a_lost_authenticator(short_tmp: Path) -> None:
    async with server(short_tmp) as srv, connect(srv) as c:
        before = await c.login()
        _, codes = await enroll(c)
        off = await c.request("mfa_disable", password=PASSWORD, code=codes[1])
        assert off["type"] == "ok"
        assert off["tokens"]["refresh_token"] != before["refresh_token"]
        async with connect(srv) as stale:
            # The refresh token from before is retired: presenting it is reuse,
            # which ends the session (section 6.7).
            reused = await stale.request("refresh", refresh_token=before["refresh_token"])
            assert reused["code"] == "invalid_token"
        assert await c.closed() == (4003, "session revoked")
        async with connect(srv) as d:
            assert (await d.login())["type"] == "session"  # no second factor any more
        audit = await srv.audit()
        assert ("mfa_disable", "ok") in audit and ("recovery_code_used", "ok") in audit


async def test_a_role_change_ends_live_sessions(short_tmp: Path) -> None:
    async with server(short_tmp) as srv, connect(srv) as c:
        session = await c.login()
        await srv.admin.set_role(session["user"]["id"], "moderator")
        assert await c.closed() == (4003, "session revoked")


async def test_resumes_are_audited_and_floods_write_few_rows(short_tmp: Path) -> None:
    async with server(short_tmp, rate_burst=5, refresh_rate_per_ip=1.0) as srv:
        async with connect(srv) as c:
            session = await c.login()
        async with connect(srv) as c:
            assert (await c.request("resume", access_token=session["access_token"]))["type"] == (
                "session"
            )
        async with connect(srv) as c:
            codes = [(await c.request("resume", access_token="x" * 43))["code"] for _ in range(40)]
        assert codes[0] == "invalid_token" and codes[-1] == "rate_limited"
        audit = await srv.audit()
        assert ("resume", "ok") in audit
        assert audit.count(("resume", "rate_limited")) == 1


async def test_spent_refresh_tokens_are_bounded_per_session(short_tmp: Path) -> None:
    from chatd.auth.queries import SPENT_TOKENS_KEPT

    async with server(short_tmp, refresh_rate_per_ip=100_000.0, rate_burst=1000) as srv:
        async with connect(srv) as c:
            refresh = (await c.login())["refresh_token"]
            for _ in range(SPENT_TOKENS_KEPT + 10):
                refresh = (await c.request("refresh", refresh_token=refresh))["refresh_token"]
        kept = await srv.store.read(
            lambda conn: conn.execute("SELECT count(*) FROM spent_refresh_tokens").fetchone()[0]
        )
        assert kept == SPENT_TOKENS_KEPT


async def test_a_refresh_extends_every_connection_of_the_session(short_tmp: Path) -> None:
    async with server(short_tmp, access_token_minutes=0.01) as srv:
        async with connect(srv) as a, connect(srv) as b:
            session = await a.login()
            assert (await b.request("resume", access_token=session["access_token"]))["type"] == (
                "session"
            )
            refresh = session["refresh_token"]
            for _ in range(3):  # past the first access token's 0.6 s, refreshed on `a` only
                refresh = (await a.request("refresh", refresh_token=refresh))["refresh_token"]
                await trio.sleep(0.3)  # real time must pass; no server event marks it
            assert (await b.request("list_sessions"))["type"] == "sessions"


async def test_wrong_reauthentication_names_the_field(short_tmp: Path) -> None:
    async with server(short_tmp) as srv, connect(srv) as c:
        await c.login()
        wrong = await c.request(
            "change_password",
            current_password="not the password",
            new_password="a brand new passphrase",
        )
        assert wrong["field"] == "$.current_password"


async def test_a_lost_authenticator_is_replaced_with_a_recovery_code(short_tmp: Path) -> None:
    async with server(short_tmp, require_mfa="everyone") as srv, connect(srv) as c:
        first = await c.login()
        assert first["mfa_enrollment_required"] is True
        old_secret, codes = await enroll(c)
        async with connect(srv) as d:
            # The phone is gone: log in and re-enroll with recovery codes.
            assert (await d.login(recovery_code=codes[0]))["type"] == "session"
            pending = await d.request("mfa_enroll", password=PASSWORD, totp=codes[1])
            new_secret = pending["secret"]
            async with connect(srv) as meanwhile:
                # Until confirmed, the old factor is still the one that counts.
                code = pyotp.TOTP(old_secret).at(time.time() + 30)
                assert (await meanwhile.login(totp=code))["type"] == "session"
            confirmed = await d.request("mfa_confirm", code=pyotp.TOTP(new_secret).now())
            assert len(confirmed["codes"]) == 10
        async with connect(srv) as e:
            stale = pyotp.TOTP(old_secret).at(time.time() - 30)
            assert (await e.login(totp=stale))["code"] == "mfa_failed"
            fresh = pyotp.TOTP(new_secret).at(time.time() + 30)
            assert (await e.login(totp=fresh))["type"] == "session"


async def test_after_a_refresh_the_old_access_token_stops_working(short_tmp: Path) -> None:
    """PROTOCOL section 6.7: both tokens are replaced; connections go on."""
    async with server(short_tmp) as srv, connect(srv) as c:
        session = await c.login()
        tokens = await c.request("refresh", refresh_token=session["refresh_token"])
        assert tokens["type"] == "tokens"
        await only_the_new_token_resumes(srv, [session["access_token"]], tokens["access_token"])
        assert (await c.request("list_sessions"))["type"] == "sessions"  # this one goes on


async def test_second_factor_and_reauthentication_errors_name_the_fields_the_docs_give(
    short_tmp: Path,
) -> None:
    """PROTOCOL sections 6.10 and 6.13: which field each refusal names."""
    async with server(short_tmp) as srv, connect(srv) as c:
        await c.login()
        wrong = await c.request("mfa_enroll", password="not the password")
        assert (wrong["code"], wrong["field"]) == ("reauth_failed", "$.password")
        await enroll(c)
        fields = []
        for frame, kw in (
            ("mfa_disable", {"password": PASSWORD, "code": "000000"}),
            ("new_recovery_codes", {"password": PASSWORD, "code": "000000"}),
            ("mfa_disable", {"password": "not the password", "code": "000000"}),
            ("mfa_confirm", {"code": "000000"}),
            ("mfa_enroll", {"password": PASSWORD}),
            ("mfa_enroll", {"password": PASSWORD, "totp": "000000"}),
            (
                "change_password",
                {"current_password": PASSWORD, "new_password": "a brand new passphrase"},
            ),
            (
                "change_password",
                {
                    "current_password": PASSWORD,
                    "new_password": "a brand new passphrase",
                    "totp": "000000",
                },
            ),
        ):
            reply = await c.request(frame, **kw)
            fields.append((frame, reply["code"], reply.get("field")))
        assert fields == [
            ("mfa_disable", "mfa_failed", "$.code"),
            ("new_recovery_codes", "mfa_failed", "$.code"),
            ("mfa_disable", "reauth_failed", "$.password"),
            ("mfa_confirm", "mfa_not_enrolling", None),
            ("mfa_enroll", "mfa_required", "$.totp"),
            ("mfa_enroll", "mfa_failed", "$.totp"),
            ("change_password", "mfa_required", "$.totp"),
            ("change_password", "mfa_failed", "$.totp"),
        ]
