"""The auth service: logins, sessions, tokens, MFA, on top of the store.

Theory of operation
-------------------
Passwords are verified with Argon2id in worker threads, at most
``auth.max_concurrent_hashes`` at once, so logins never stall the event loop.
A login for an unknown username verifies against a dummy hash made with the
same parameters, so both cost the same and usernames cannot be found by
timing.

A session is one login on one device. It holds two tokens, both 256 random
bits of which the database keeps only SHA-256 hashes: a short-lived access
token (``auth.access_token_minutes``), presented to resume a connection, and
a refresh token that rotates on every use, within the session's absolute
lifetime (``auth.refresh_token_days``). Each rotated refresh token is kept
(hashed) as *spent*; presenting a spent one means it was copied, so the whole
session is revoked and its live connections are closed (ASVS 10.4.5).

Every revocation calls :attr:`AuthService.on_revoked` with the session ids, so
the relay closes their connections at once; the relay also re-validates live
sessions every ``auth.session_check_seconds`` as a backstop.

Rate limits (token buckets) and exponential failure backoff are applied per
IP network and per account, before any password work; nothing locks an
account for good. Every login, logout, MFA change, password change and
revocation is written to ``auth_audit``, without passwords or tokens.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, Final

import trio

from chatd.auth.models import AuthError, Peer, SessionGrant, SessionInfo
from chatd.auth.passwords import (
    Argon2Params,
    PasswordHasher,
    PasswordPolicyError,
    check_password_policy,
    load_common_passwords,
)
from chatd.auth.ratelimit import FailureBackoff, RateLimiter
from chatd.auth.tokens import (
    TOKEN_MAX_CHARS,
    new_recovery_codes,
    new_token,
    normalize_recovery_code,
    recovery_code_hash,
    token_hash,
)
from chatd.auth.totp import new_totp_secret, provisioning_uri, verify_totp
from chatd.auth.usernames import UsernameError, normalize_username
from chatd.config import AuthSettings
from chatd.log import fields
from chatd.store import Store, now_ms

log = logging.getLogger("chatd.auth")

MINUTE_MS: Final = 60_000
DAY_MS: Final = 86_400_000
MAX_DEVICE_NAME: Final = 64  # characters

LOGIN_FAILED: Final = "wrong username or password"


def _fail(code: str, message: str, **kw: Any) -> AuthError:
    return AuthError(code, message, **kw)


class AuthService:
    """Accounts and sessions. One instance per daemon, shared by relay and admin."""

    def __init__(self, store: Store, settings: AuthSettings) -> None:
        self.store = store
        self.settings = settings
        self.hasher = PasswordHasher(
            Argon2Params(
                memory_kib=settings.argon2_memory_kib,
                time_cost=settings.argon2_time_cost,
                parallelism=settings.argon2_parallelism,
            )
        )
        self.hash_limiter = trio.CapacityLimiter(settings.max_concurrent_hashes)
        burst = settings.rate_burst
        self.login_ip = RateLimiter(settings.login_rate_per_ip, burst)
        self.login_account = RateLimiter(settings.login_rate_per_account, burst)
        self.refresh_ip = RateLimiter(settings.refresh_rate_per_ip, burst)
        self.invite_ip = RateLimiter(settings.invite_rate_per_ip, burst)
        self.totp_account = RateLimiter(settings.totp_rate_per_account, burst)
        self.backoff = FailureBackoff(settings.backoff_base_seconds, settings.backoff_max_seconds)
        #: Called with revoked session ids; the relay closes their connections.
        self.on_revoked: Callable[[Iterable[int]], None] = lambda ids: None

    # -- blocking work, off the loop -------------------------------------------

    async def _hash(self, password: str) -> str:
        return await trio.to_thread.run_sync(self.hasher.hash, password, limiter=self.hash_limiter)

    async def _verify(self, stored: str, password: str) -> bool:
        return await trio.to_thread.run_sync(
            self.hasher.verify, stored, password, limiter=self.hash_limiter
        )

    async def warm_up(self) -> None:
        """Make the dummy hash and load the common-password list now (in a thread),
        not during the first login or registration."""

        def prepare() -> None:
            _ = self.hasher.dummy_hash
            load_common_passwords()

        await trio.to_thread.run_sync(prepare)

    # -- audit ------------------------------------------------------------------------

    async def audit(
        self,
        event: str,
        outcome: str,
        peer: Peer,
        *,
        user_id: int | None = None,
        session_id: int | None = None,
    ) -> None:
        row = (now_ms(), event, outcome, user_id, peer.ip, peer.device_name or None, session_id)
        await self.store.write(
            lambda conn: conn.execute(
                "INSERT INTO auth_audit (at, event, outcome, user_id, ip, device_name, session_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                row,
            )
        )
        level = logging.INFO if outcome == "ok" else logging.WARNING
        log.log(
            level,
            "auth." + event,
            extra=fields(outcome=outcome, user_id=user_id, session_id=session_id, peer=peer.ip),
        )

    # -- limits -----------------------------------------------------------------------

    def _limit(self, *checks: tuple[RateLimiter | FailureBackoff, str]) -> float:
        now = trio.current_time()
        wait = 0.0
        for limiter, key in checks:
            if isinstance(limiter, FailureBackoff):
                wait = max(wait, limiter.retry_after(key, now))
            else:
                wait = max(wait, limiter.check(key, now))
        return wait

    async def _rate_limited(
        self, event: str, peer: Peer, wait: float, user_id: int | None
    ) -> AuthError:
        await self.audit(event, "rate_limited", peer, user_id=user_id)
        return _fail(
            "rate_limited",
            f"too many attempts; retry after {wait:.0f} s",
            retry_after=round(wait, 3),
        )

    def _failed(self, *keys: str) -> None:
        now = trio.current_time()
        for key in keys:
            self.backoff.failure(key, now)

    # -- sessions -----------------------------------------------------------------------

    def _mfa_required(self, role: str) -> bool:
        policy = self.settings.require_mfa
        return policy == "everyone" or (policy == "admins" and role in ("admin", "moderator"))

    async def _open_session(self, user: dict[str, Any], peer: Peer) -> SessionGrant:
        access, refresh = new_token(), new_token()
        now = now_ms()
        access_expires = now + int(self.settings.access_token_minutes * MINUTE_MS)
        expires = now + int(self.settings.refresh_token_days * DAY_MS)
        access_expires = min(access_expires, expires)
        row = (
            user["id"],
            peer.device_name,
            now,
            now,
            peer.ip,
            expires,
            token_hash(access),
            access_expires,
            token_hash(refresh),
        )

        def insert(conn: Any) -> int:
            cur = conn.execute(
                "INSERT INTO sessions (user_id, device_name, created_at, last_seen_at, last_ip,"
                " expires_at, access_hash, access_expires_at, refresh_hash)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            return int(cur.lastrowid)

        session_id = await self.store.write(insert)
        return SessionGrant(
            session_id=session_id,
            user_id=user["id"],
            username=user["username"],
            role=user["role"],
            access_expires_at=access_expires,
            expires_at=expires,
            mfa_enrollment_required=self._mfa_required(user["role"]) and not user["mfa"],
            access_token=access,
            refresh_token=refresh,
        )

    async def revoke_sessions(self, session_ids: list[int], reason: str) -> list[int]:
        """Revoke the given sessions (already revoked ones are skipped); notify the relay."""
        if not session_ids:
            return []
        now = now_ms()

        def revoke(conn: Any) -> list[int]:
            done = []
            for sid in session_ids:
                cur = conn.execute(
                    "UPDATE sessions SET revoked_at = ?, revoked_reason = ?"
                    " WHERE id = ? AND revoked_at IS NULL",
                    (now, reason, sid),
                )
                if cur.rowcount:
                    done.append(sid)
            return done

        revoked = await self.store.write(revoke)
        if revoked:
            self.on_revoked(revoked)
        return revoked

    async def user_session_ids(self, user_id: int, *, except_id: int | None = None) -> list[int]:
        rows = await self.store.read(
            lambda conn: conn.execute(
                "SELECT id FROM sessions WHERE user_id = ? AND revoked_at IS NULL AND id IS NOT ?",
                (user_id, except_id),
            ).fetchall()
        )
        return [r[0] for r in rows]

    # -- users -------------------------------------------------------------------------

    async def _user_by_key(self, key: str) -> dict[str, Any] | None:
        return await self.store.read(partial(_select_user, "username_key = ?", key))

    async def user_by_id(self, user_id: int) -> dict[str, Any] | None:
        return await self.store.read(partial(_select_user, "id = ?", user_id))

    async def _second_factor(
        self,
        user: dict[str, Any],
        totp: str | None,
        recovery_code: str | None,
        peer: Peer,
        event: str,
    ) -> None:
        """Check the TOTP code or a recovery code of a user with MFA; raise if wrong."""
        if totp is None and recovery_code is None:
            raise _fail(
                "mfa_required",
                "this account needs a TOTP code (or a recovery code)",
                field="$.totp",
            )
        wait = self._limit(
            (self.totp_account, f"u{user['id']}"), (self.backoff, f"mfa:u{user['id']}")
        )
        if wait:
            raise await self._rate_limited(event, peer, wait, user["id"])
        if totp is not None:
            step = verify_totp(
                user["totp_secret"], totp, last_step=user["totp_last_step"], now=time.time()
            )
            ok = step is not None and await self.store.write(
                lambda conn: (
                    conn.execute(
                        "UPDATE users SET totp_last_step = ? WHERE id = ?"
                        " AND (totp_last_step IS NULL OR totp_last_step < ?)",
                        (step, user["id"], step),
                    ).rowcount
                    == 1
                )
            )
        else:
            code = normalize_recovery_code(recovery_code or "")
            digest = recovery_code_hash(code) if code else b""
            now = now_ms()
            ok = bool(code) and await self.store.write(
                lambda conn: (
                    conn.execute(
                        "UPDATE recovery_codes SET used_at = ?"
                        " WHERE user_id = ? AND code_hash = ? AND used_at IS NULL",
                        (now, user["id"], digest),
                    ).rowcount
                    == 1
                )
            )
        if not ok:
            self._failed(f"mfa:u{user['id']}")
            await self.audit(event, "bad_second_factor", peer, user_id=user["id"])
            raise _fail("mfa_failed", "wrong or already used code", field="$.totp")
        self.backoff.success(f"mfa:u{user['id']}")

    # -- client flows ---------------------------------------------------------------------

    async def login(
        self,
        username: str,
        password: str,
        peer: Peer,
        *,
        totp: str | None = None,
        recovery_code: str | None = None,
    ) -> SessionGrant:
        """Password (and second factor) to a new session. Raises :class:`AuthError`."""
        try:
            key: str | None = normalize_username(username)
        except UsernameError:
            key = None
        account = f"a:{key or username[:64].casefold()}"
        wait = self._limit(
            (self.login_ip, peer.ip),
            (self.login_account, account),
            (self.backoff, f"ip:{peer.ip}"),
            (self.backoff, account),
        )
        user = await self._user_by_key(key) if key else None
        if wait:
            raise await self._rate_limited("login", peer, wait, user["id"] if user else None)
        if user is None or len(password) > 1024:
            await self._verify(self.hasher.dummy_hash, password[:1024])  # same cost as a real one
            self._failed(f"ip:{peer.ip}", account)
            await self.audit(
                "login",
                "unknown_user" if user is None else "bad_password",
                peer,
                user_id=user["id"] if user else None,
            )
            raise _fail("login_failed", LOGIN_FAILED)
        if not await self._verify(user["password_hash"], password):
            self._failed(f"ip:{peer.ip}", account)
            await self.audit("login", "bad_password", peer, user_id=user["id"])
            raise _fail("login_failed", LOGIN_FAILED)
        if user["disabled"]:
            await self.audit("login", "disabled", peer, user_id=user["id"])
            raise _fail("account_disabled", "this account is disabled; ask an admin")
        if user["mfa"]:
            await self._second_factor(user, totp, recovery_code, peer, "login")
        self.backoff.success(account)
        self.backoff.success(f"ip:{peer.ip}")
        if self.hasher.needs_rehash(user["password_hash"]):
            new_hash = await self._hash(password)
            await self.store.write(
                lambda conn: conn.execute(
                    "UPDATE users SET password_hash = ? WHERE id = ?", (new_hash, user["id"])
                )
            )
        grant = await self._open_session(user, peer)
        await self.audit("login", "ok", peer, user_id=user["id"], session_id=grant.session_id)
        return grant

    async def register(
        self, invite_code: str, username: str, password: str, peer: Peer
    ) -> SessionGrant:
        """Redeem an invite: create the account and log it in."""
        wait = self._limit((self.invite_ip, peer.ip), (self.backoff, f"invite:{peer.ip}"))
        if wait:
            raise await self._rate_limited("register", peer, wait, None)
        try:
            key = normalize_username(username)
        except UsernameError as exc:
            raise _fail("invalid_username", str(exc), field="$.username") from None
        try:
            check_password_policy(password, username_key=key)
        except PasswordPolicyError as exc:
            raise _fail("weak_password", str(exc), field="$.password") from None
        digest = token_hash(invite_code) if 0 < len(invite_code) <= TOKEN_MAX_CHARS else b""
        password_hash = await self._hash(password)
        now = now_ms()

        def redeem(conn: Any) -> int | str:
            invite = conn.execute(
                "SELECT id, role FROM invites WHERE code_hash = ? AND used_at IS NULL"
                " AND revoked_at IS NULL AND expires_at > ?",
                (digest, now),
            ).fetchone()
            if invite is None:
                return "invalid_invite"
            if conn.execute("SELECT 1 FROM users WHERE username_key = ?", (key,)).fetchone():
                return "username_taken"
            cur = conn.execute(
                "INSERT INTO users (username, username_key, role, password_hash,"
                " password_changed_at, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (username, key, invite[1], password_hash, now, now),
            )
            user_id = int(cur.lastrowid)
            conn.execute(
                "UPDATE invites SET used_at = ?, used_by = ? WHERE id = ?",
                (now, user_id, invite[0]),
            )
            return user_id

        result = await self.store.write(redeem)
        if result == "invalid_invite":
            self._failed(f"invite:{peer.ip}")
            await self.audit("register", "invalid_invite", peer)
            raise _fail(
                "invalid_invite",
                "this invite code is unknown, used, revoked or expired",
                field="$.invite_code",
            )
        if result == "username_taken":
            await self.audit("register", "username_taken", peer)
            raise _fail(
                "username_taken",
                "this username (or one that looks the same) is taken",
                field="$.username",
            )
        assert isinstance(result, int)  # noqa: S101 - the two strings are handled above
        user = await self.user_by_id(result)
        assert user is not None  # noqa: S101 - created in the same transaction
        await self.audit("register", "ok", peer, user_id=result)
        grant = await self._open_session(user, peer)
        await self.audit("login", "ok", peer, user_id=result, session_id=grant.session_id)
        return grant

    async def resume(self, access_token: str, peer: Peer) -> SessionGrant:
        """An access token back to its session (for a reconnecting client)."""
        session = await self._session_by("access_hash", access_token)
        now = now_ms()
        if session is None or session["access_expires_at"] <= now:
            code = "token_expired" if session is not None else "invalid_token"
            await self.audit("resume", code, peer, user_id=session["user_id"] if session else None)
            raise _fail(
                code,
                "the access token is expired; refresh it"
                if session
                else "unknown or revoked access token",
                field="$.access_token",
            )
        await self._touch(session["id"], peer)
        return self._grant(session)

    async def refresh(self, refresh_token: str, peer: Peer) -> SessionGrant:
        """Rotate a refresh token: new access and refresh tokens, same session.

        A refresh token that was already rotated revokes its whole session.
        """
        wait = self._limit((self.refresh_ip, peer.ip))
        if wait:
            raise await self._rate_limited("refresh", peer, wait, None)
        digest = token_hash(refresh_token) if 0 < len(refresh_token) <= TOKEN_MAX_CHARS else b""
        access, refresh = new_token(), new_token()
        now = now_ms()
        minutes = self.settings.access_token_minutes

        def rotate(conn: Any) -> tuple[str, dict[str, Any] | None]:
            session = _select_session(conn, "s.refresh_hash = ?", digest, now)
            if session is None:
                spent = conn.execute(
                    "SELECT session_id FROM spent_refresh_tokens WHERE token_hash = ?", (digest,)
                ).fetchone()
                if spent is None:
                    return "invalid_token", None
                conn.execute(
                    "UPDATE sessions SET revoked_at = ?, revoked_reason = 'refresh token reused'"
                    " WHERE id = ? AND revoked_at IS NULL",
                    (now, spent[0]),
                )
                return "token_reused", {"id": spent[0]}
            access_expires = min(now + int(minutes * MINUTE_MS), session["expires_at"])
            conn.execute(
                "INSERT INTO spent_refresh_tokens (token_hash, session_id, spent_at)"
                " VALUES (?, ?, ?)",
                (digest, session["id"], now),
            )
            conn.execute(
                "UPDATE sessions SET access_hash = ?, access_expires_at = ?, refresh_hash = ?,"
                " last_seen_at = ?, last_ip = ? WHERE id = ?",
                (
                    token_hash(access),
                    access_expires,
                    token_hash(refresh),
                    now,
                    peer.ip,
                    session["id"],
                ),
            )
            session["access_expires_at"] = access_expires
            return "ok", session

        outcome, session = await self.store.write(rotate)
        if outcome == "token_reused" and session is not None:
            self.on_revoked([session["id"]])
            await self.audit("refresh", "token_reused", peer, session_id=session["id"])
            raise _fail(
                "invalid_token",
                "this refresh token was already used; the session is revoked, log in again",
                field="$.refresh_token",
            )
        if session is None:
            await self.audit("refresh", outcome, peer)
            raise _fail(
                "invalid_token",
                "unknown, expired or revoked refresh token",
                field="$.refresh_token",
            )
        await self.audit(
            "refresh", "ok", peer, user_id=session["user_id"], session_id=session["id"]
        )
        grant = self._grant(session)
        return _with_tokens(grant, access, refresh)

    async def logout(self, grant: SessionGrant, peer: Peer) -> None:
        await self.revoke_sessions([grant.session_id], "logout")
        await self.audit("logout", "ok", peer, user_id=grant.user_id, session_id=grant.session_id)

    async def list_sessions(self, user_id: int) -> list[SessionInfo]:
        return await self.store.read(partial(_list_sessions, "user_id = ?", (user_id,)))

    async def revoke_own_sessions(
        self, grant: SessionGrant, peer: Peer, *, session_ids: list[int] | None, all_others: bool
    ) -> list[int]:
        """Revoke some of the user's own sessions, or all but the current one."""
        own = set(await self.user_session_ids(grant.user_id))
        if all_others:
            targets = sorted(own - {grant.session_id})
        else:
            unknown = sorted(set(session_ids or ()) - own)
            if unknown:
                raise _fail(
                    "unknown_session",
                    f"no live session of yours with id {unknown[0]}",
                    field="$.session_ids",
                )
            targets = sorted(set(session_ids or ()))
        revoked = await self.revoke_sessions(targets, "revoked by user")
        for sid in revoked:
            await self.audit("revoke_session", "ok", peer, user_id=grant.user_id, session_id=sid)
        return revoked

    async def _reauthenticate(
        self, grant: SessionGrant, password: str, totp: str | None, peer: Peer, event: str
    ) -> dict[str, Any]:
        """Full re-authentication for sensitive changes: password, and TOTP if enabled."""
        user = await self.user_by_id(grant.user_id)
        if user is None:
            raise _fail("invalid_token", "the account no longer exists")
        wait = self._limit((self.backoff, f"a:{user['username_key']}"))
        if wait:
            raise await self._rate_limited(event, peer, wait, user["id"])
        if not await self._verify(user["password_hash"], password):
            self._failed(f"a:{user['username_key']}")
            await self.audit(event, "bad_password", peer, user_id=user["id"])
            raise _fail("reauth_failed", "the current password is wrong", field="$.password")
        if user["mfa"]:
            await self._second_factor(user, totp, None, peer, event)
        return user

    async def change_password(
        self, grant: SessionGrant, current: str, new: str, totp: str | None, peer: Peer
    ) -> list[int]:
        """Change the password after full re-authentication; other sessions are revoked."""
        user = await self._reauthenticate(grant, current, totp, peer, "password_change")
        try:
            check_password_policy(new, username_key=user["username_key"])
        except PasswordPolicyError as exc:
            raise _fail("weak_password", str(exc), field="$.new_password") from None
        new_hash = await self._hash(new)
        now = now_ms()
        await self.store.write(
            lambda conn: conn.execute(
                "UPDATE users SET password_hash = ?, password_changed_at = ? WHERE id = ?",
                (new_hash, now, user["id"]),
            )
        )
        others = await self.user_session_ids(user["id"], except_id=grant.session_id)
        revoked = await self.revoke_sessions(others, "password changed")
        await self.audit(
            "password_change", "ok", peer, user_id=user["id"], session_id=grant.session_id
        )
        return revoked

    async def mfa_enroll(
        self, grant: SessionGrant, password: str, totp: str | None, peer: Peer
    ) -> tuple[str, str]:
        """Start (or restart) TOTP enrolment; active only after :meth:`mfa_confirm`."""
        user = await self._reauthenticate(grant, password, totp, peer, "mfa_enroll")
        if user["mfa"]:
            raise _fail("mfa_already_enabled", "disable the current second factor first")
        secret = new_totp_secret()
        await self.store.write(
            lambda conn: conn.execute(
                "UPDATE users SET totp_secret = ?, totp_confirmed_at = NULL, totp_last_step = NULL"
                " WHERE id = ?",
                (secret, user["id"]),
            )
        )
        await self.audit("mfa_enroll", "ok", peer, user_id=user["id"], session_id=grant.session_id)
        return secret, provisioning_uri(secret, user["username"])

    async def mfa_confirm(self, grant: SessionGrant, code: str, peer: Peer) -> list[str]:
        """Activate TOTP with a first valid code; returns 10 new recovery codes."""
        user = await self.user_by_id(grant.user_id)
        if user is None or not user["totp_secret"] or user["mfa"]:
            raise _fail("mfa_not_enrolling", "start with mfa_enroll")
        wait = self._limit((self.totp_account, f"u{user['id']}"))
        if wait:
            raise await self._rate_limited("mfa_confirm", peer, wait, user["id"])
        step = verify_totp(user["totp_secret"], code, last_step=None, now=time.time())
        if step is None:
            await self.audit("mfa_confirm", "bad_second_factor", peer, user_id=user["id"])
            raise _fail("mfa_failed", "wrong code; check the device clock", field="$.code")
        codes = new_recovery_codes(10)
        now = now_ms()

        def activate(conn: Any) -> None:
            conn.execute(
                "UPDATE users SET totp_confirmed_at = ?, totp_last_step = ? WHERE id = ?",
                (now, step, user["id"]),
            )
            _replace_recovery_codes(conn, user["id"], codes)

        await self.store.write(activate)
        await self.audit("mfa_confirm", "ok", peer, user_id=user["id"], session_id=grant.session_id)
        return codes

    async def mfa_disable(self, grant: SessionGrant, password: str, code: str, peer: Peer) -> None:
        user = await self._reauthenticate(grant, password, code, peer, "mfa_disable")
        if not user["mfa"]:
            raise _fail("mfa_not_enabled", "this account has no second factor")
        if self._mfa_required(user["role"]):
            raise _fail("mfa_required_by_policy", "your role must keep a second factor")

        def disable(conn: Any) -> None:
            conn.execute(
                "UPDATE users SET totp_secret = NULL, totp_confirmed_at = NULL,"
                " totp_last_step = NULL WHERE id = ?",
                (user["id"],),
            )
            conn.execute("DELETE FROM recovery_codes WHERE user_id = ?", (user["id"],))

        await self.store.write(disable)
        await self.audit("mfa_disable", "ok", peer, user_id=user["id"], session_id=grant.session_id)

    async def regenerate_recovery_codes(
        self, grant: SessionGrant, password: str, code: str, peer: Peer
    ) -> list[str]:
        user = await self._reauthenticate(grant, password, code, peer, "recovery_codes")
        if not user["mfa"]:
            raise _fail("mfa_not_enabled", "this account has no second factor")
        codes = new_recovery_codes(10)
        await self.store.write(lambda conn: _replace_recovery_codes(conn, user["id"], codes))
        await self.audit(
            "recovery_codes", "ok", peer, user_id=user["id"], session_id=grant.session_id
        )
        return codes

    # -- re-validation for the relay ---------------------------------------------------------

    async def invalid_sessions(self, session_ids: Iterable[int]) -> set[int]:
        """Of these sessions, those that must not stay connected any more."""
        ids = list(session_ids)
        if not ids:
            return set()
        now = now_ms()

        def query(conn: Any) -> set[int]:
            bad: set[int] = set()
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(
                    f"SELECT s.id FROM sessions s JOIN users u ON u.id = s.user_id"  # noqa: S608
                    f" WHERE s.id IN ({marks}) AND s.revoked_at IS NULL AND s.expires_at > ?"
                    " AND u.disabled_at IS NULL",
                    (*chunk, now),
                ).fetchall()
                bad |= set(chunk) - {r[0] for r in rows}
            return bad

        return await self.store.read(query)

    # -- helpers ------------------------------------------------------------------------------

    async def _session_by(self, column: str, token: str) -> dict[str, Any] | None:
        if not 0 < len(token) <= TOKEN_MAX_CHARS:
            return None
        digest = token_hash(token)
        now = now_ms()
        return await self.store.read(
            lambda conn: _select_session(conn, f"s.{column} = ?", digest, now)
        )

    async def _touch(self, session_id: int, peer: Peer) -> None:
        now = now_ms()
        await self.store.write(
            lambda conn: conn.execute(
                "UPDATE sessions SET last_seen_at = ?, last_ip = ? WHERE id = ?",
                (now, peer.ip, session_id),
            )
        )

    def _grant(self, session: dict[str, Any]) -> SessionGrant:
        return SessionGrant(
            session_id=session["id"],
            user_id=session["user_id"],
            username=session["username"],
            role=session["role"],
            access_expires_at=session["access_expires_at"],
            expires_at=session["expires_at"],
            mfa_enrollment_required=self._mfa_required(session["role"]) and not session["mfa"],
        )


def _with_tokens(grant: SessionGrant, access: str, refresh: str) -> SessionGrant:
    from dataclasses import replace

    return replace(grant, access_token=access, refresh_token=refresh)


_USER_COLUMNS: Final = (
    "id, username, username_key, role, password_hash, totp_secret, totp_confirmed_at,"
    " totp_last_step, disabled_at, created_at, password_changed_at"
)


def _select_user(where: str, value: object, conn: Any) -> dict[str, Any] | None:
    row = conn.execute(f"SELECT {_USER_COLUMNS} FROM users WHERE {where}", (value,)).fetchone()  # noqa: S608
    if row is None:
        return None
    names = [n.strip() for n in _USER_COLUMNS.split(",")]
    user = dict(zip(names, row, strict=True))
    user["mfa"] = user["totp_confirmed_at"] is not None
    user["disabled"] = user["disabled_at"] is not None
    return user


def _select_session(conn: Any, where: str, value: object, now: int) -> dict[str, Any] | None:
    row = conn.execute(
        # ``where`` is always one of this module's constant fragments.
        "SELECT s.id, s.user_id, s.access_expires_at, s.expires_at, u.username, u.role,"  # noqa: S608
        " u.totp_confirmed_at IS NOT NULL FROM sessions s JOIN users u ON u.id = s.user_id"
        f" WHERE {where} AND s.revoked_at IS NULL AND s.expires_at > ?"
        " AND u.disabled_at IS NULL",
        (value, now),
    ).fetchone()
    if row is None:
        return None
    keys = ("id", "user_id", "access_expires_at", "expires_at", "username", "role", "mfa")
    session = dict(zip(keys, row, strict=True))
    session["mfa"] = bool(session["mfa"])
    return session


def _list_sessions(where: str, args: tuple[object, ...], conn: Any) -> list[SessionInfo]:
    rows = conn.execute(
        "SELECT id, user_id, device_name, created_at, last_seen_at, last_ip, expires_at,"  # noqa: S608
        f" revoked_at IS NOT NULL FROM sessions WHERE {where} ORDER BY id DESC LIMIT 1000",
        args,
    ).fetchall()
    return [
        SessionInfo(
            session_id=r[0],
            user_id=r[1],
            device_name=r[2],
            created_at=r[3],
            last_seen_at=r[4],
            ip=r[5],
            expires_at=r[6],
            revoked=bool(r[7]),
        )
        for r in rows
    ]


def _replace_recovery_codes(conn: Any, user_id: int, codes: list[str]) -> None:
    conn.execute("DELETE FROM recovery_codes WHERE user_id = ?", (user_id,))
    conn.executemany(
        "INSERT INTO recovery_codes (user_id, code_hash) VALUES (?, ?)",
        [(user_id, recovery_code_hash(code)) for code in codes],
    )
