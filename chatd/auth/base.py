"""Shared parts of the auth service: hashing off the loop, limits, audit, revocation."""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any, Final

import trio

from chatd.auth.models import AuthError, Peer, SessionGrant
from chatd.auth.passwords import (
    Argon2Params,
    PasswordHasher,
    PasswordPolicyError,
    check_password_policy,
    load_common_passwords,
)
from chatd.auth.queries import rotate_session_tokens, select_user
from chatd.auth.ratelimit import FailureBackoff, RateLimiter
from chatd.auth.tokens import new_token, normalize_recovery_code, recovery_code_hash
from chatd.auth.totp import verify_totp
from chatd.auth.usernames import UsernameError, normalize_username
from chatd.config import AuthSettings, DeviceSettings
from chatd.events import UNHEARD, SessionEvents
from chatd.log import fields
from chatd.store import Store, now_ms

log = logging.getLogger("chatd.auth")

MINUTE_MS: Final = 60_000
DAY_MS: Final = 86_400_000


def fail(code: str, message: str, **kw: Any) -> AuthError:
    return AuthError(code, message, **kw)


#: The ``revoked_reason`` of the sessions an admin's password reset ended.
RESET_REASON: Final = "password reset"


def password_reset() -> AuthError:
    """What ``resume`` and ``refresh`` answer for a token of a session that an
    admin's password reset ended (instead of ``invalid_token``)."""
    return fail("password_reset", "your password was reset by an admin; log in with the new one")


class AuthBase:
    """State and helpers every auth flow uses. See :class:`chatd.auth.service.AuthService`."""

    def __init__(
        self,
        store: Store,
        settings: AuthSettings,
        devices: DeviceSettings | None = None,
        *,
        events: SessionEvents = UNHEARD,
    ) -> None:
        self.store = store
        self.events = events  # told which sessions were revoked
        self.settings = settings
        self.devices = devices or DeviceSettings()
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
        self._audit_throttle = RateLimiter(1.0, 1)
        #: user id -> (TOTP secret waiting for its confirming code, deadline)
        self._pending_totp: dict[int, tuple[str, float]] = {}
        self.backoff = FailureBackoff(settings.backoff_base_seconds, settings.backoff_max_seconds)
        # For chatd.metrics, by fixed reason only (never a user or an address):
        self.login_failures: Counter[str] = Counter()  # failed logins by audit outcome
        self.rate_limited: Counter[str] = Counter()  # refusals by event (login, refresh, ...)

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
        await self.audit_with(None, event, outcome, peer, user_id=user_id, session_id=session_id)

    async def audit_with(
        self,
        change: Callable[[Any], object] | None,
        event: str,
        outcome: str,
        peer: Peer,
        *,
        user_id: int | None = None,
        session_id: int | None = None,
    ) -> None:
        """Carry out ``change`` (a write, given the connection) and record the
        audit row in the same write job: one commit to wait for, not two."""
        if event == "login" and outcome not in ("ok", "rate_limited"):
            self.login_failures[outcome] += 1
        row = (now_ms(), event, outcome, user_id, peer.ip, peer.device_name or None, session_id)

        def write(conn: Any) -> None:
            if change is not None:
                change(conn)
            conn.execute(
                "INSERT INTO auth_audit (at, event, outcome, user_id, ip, device_name, session_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                row,
            )

        await self.store.write(write)
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
        self.rate_limited[event] += 1
        # One audit row per client network and event per minute is evidence
        # enough; a flood must not become a flood of rows.
        if not self._audit_throttle.check(f"{event}:{peer.network}", trio.current_time()):
            await self.audit(event, "rate_limited", peer, user_id=user_id)
        return fail(
            "rate_limited",
            f"too many attempts; retry after {math.ceil(wait)} s",
            retry_after=round(wait, 3),
        )

    def _failed(self, *keys: str) -> None:
        now = trio.current_time()
        for key in keys:
            self.backoff.failure(key, now)

    async def check_new_account(self, username: str, password: str) -> tuple[str, str]:
        """Validate a new account's name and password; return (username key, hash).

        Raises :class:`AuthError` naming the field. Hashing runs in a thread.
        """
        try:
            key = normalize_username(username)
        except UsernameError as exc:
            raise fail("invalid_username", str(exc), field="$.username") from None
        try:
            check_password_policy(password, username_key=key)
        except PasswordPolicyError as exc:
            raise fail("weak_password", str(exc), field="$.password") from None
        return key, await self._hash(password)

    def forget_pending_enrollment(self, user_id: int) -> None:
        """Drop a TOTP secret still waiting for its confirming code."""
        self._pending_totp.pop(user_id, None)

    def _mfa_required(self, role: str) -> bool:
        policy = self.settings.require_mfa
        return policy == "everyone" or (policy == "admins" and role in ("admin", "moderator"))

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
            self.events.sessions_revoked(revoked)
        return revoked

    def _access_expiry(self, now: int, session_expires: int) -> int:
        """When a new access token expires: ``auth.access_token_minutes`` from
        now, never after the session itself."""
        return min(now + int(self.settings.access_token_minutes * MINUTE_MS), session_expires)

    async def rotate_tokens(self, grant: SessionGrant, peer: Peer) -> SessionGrant:
        """New access and refresh tokens for a live session; the old ones stop
        working, and the old refresh token, presented again, is caught as reuse.
        Done after a re-authenticated change (password, second factor), so
        tokens from before it cannot go on (ASVS V7.2.4)."""
        access, refresh = new_token(), new_token()
        now = now_ms()

        def rotate(conn: Any) -> int | None:
            row = conn.execute(
                "SELECT refresh_hash, expires_at FROM sessions WHERE id = ? AND revoked_at IS NULL",
                (grant.session_id,),
            ).fetchone()
            if row is None:
                return None
            access_expires = self._access_expiry(now, int(row[1]))
            rotate_session_tokens(
                conn,
                grant.session_id,
                row[0],
                access,
                refresh,
                access_expires=access_expires,
                now=now,
                ip=peer.ip,
            )
            return access_expires

        access_expires = await self.store.write(rotate)
        if access_expires is None:
            raise fail("invalid_token", "this session has ended; log in again")
        return replace(
            grant, access_expires_at=access_expires, access_token=access, refresh_token=refresh
        )

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
        return await self.store.read(partial(select_user, "username_key = ?", key))

    async def user_by_id(self, user_id: int) -> dict[str, Any] | None:
        return await self.store.read(partial(select_user, "id = ?", user_id))

    async def _second_factor(
        self,
        user: dict[str, Any],
        totp: str | None,
        recovery_code: str | None,
        peer: Peer,
        event: str,
        *,
        field: str | None = None,
    ) -> None:
        """Check the TOTP code or a recovery code of a user with MFA; raise if wrong.
        A correct password without a second factor, and each recovery code used,
        get an audit row of their own (SECURITY.md F-6)."""
        if totp is None and recovery_code is None:
            await self.audit(event, "mfa_required", peer, user_id=user["id"])
            raise fail(
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
            where = field or ("$.totp" if totp is not None else "$.recovery_code")
            raise fail("mfa_failed", "wrong or already used code", field=where)
        self.backoff.success(f"mfa:u{user['id']}")
        if totp is None:
            # Alongside the row of the event itself: a recovery code stands in
            # for a lost authenticator, and its use should stand out.
            await self.audit("recovery_code_used", "ok", peer, user_id=user["id"])
