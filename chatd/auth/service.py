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

Every revocation tells the relay's registry (the ``events`` given at
construction) the session ids, so the relay closes their connections at
once; the relay also re-validates live sessions every
``auth.session_check_seconds`` as a backstop.

Rate limits (token buckets) and exponential failure backoff are applied per
IP network and per account, before any password work; nothing locks an
account for good. Every login, logout, MFA change, password change and
revocation is written to ``auth_audit``, without passwords or tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import replace
from functools import partial
from typing import Any, Final

from chatd.auth.base import DAY_MS, RESET_REASON, fail, password_reset
from chatd.auth.credentials import CredentialFlows
from chatd.auth.models import Peer, SessionGrant, SessionInfo
from chatd.auth.queries import list_sessions_where, rotate_session_tokens, select_session
from chatd.auth.tokens import TOKEN_MAX_CHARS, new_token, token_hash
from chatd.auth.user_ids import insert_user
from chatd.auth.usernames import UsernameError, normalize_username
from chatd.e2ee.keys import bind_device
from chatd.errors import StoreError
from chatd.log import fields
from chatd.store import now_ms

log = logging.getLogger("chatd.auth")

LOGIN_FAILED: Final = "wrong username or password"

__all__ = ["DAY_MS", "AuthService"]


class AuthService(CredentialFlows):
    """Accounts and sessions. One instance per daemon, shared by relay and admin."""

    async def _open_session(
        self, user: dict[str, Any], peer: Peer, device_id: str | None = None
    ) -> SessionGrant:
        access, refresh = new_token(), new_token()
        now = now_ms()
        expires = now + int(self.settings.refresh_token_days * DAY_MS)
        access_expires = self._access_expiry(now, expires)
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

        max_devices = self.devices.max_devices_per_user

        def insert(conn: Any) -> tuple[int, str]:
            bound = bind_device(conn, user["id"], device_id, peer.device_name, now, max_devices)
            cur = conn.execute(
                "INSERT INTO sessions (user_id, device_name, created_at, last_seen_at, ip,"
                " expires_at, access_hash, access_expires_at, refresh_hash, device_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*row, bound),
            )
            return int(cur.lastrowid), bound

        session_id, bound = await self.store.write(insert)
        return SessionGrant(
            session_id=session_id,
            user_id=user["id"],
            username=user["username"],
            role=user["role"],
            access_expires_at=access_expires,
            expires_at=expires,
            mfa_enrollment_required=self._mfa_required(user["role"]) and not user["mfa"],
            device_id=bound,
            access_token=access,
            refresh_token=refresh,
        )

    # -- client flows ---------------------------------------------------------------------

    async def login(
        self,
        username: str,
        password: str,
        peer: Peer,
        *,
        totp: str | None = None,
        recovery_code: str | None = None,
        device_id: str | None = None,
    ) -> SessionGrant:
        """Password (and second factor) to a new session on a new device, or on
        ``device_id`` (an existing device of this user). Raises :class:`AuthError`."""
        try:
            key: str | None = normalize_username(username)
        except UsernameError:
            key = None
        account = f"a:{key or username[:64].casefold()}"
        wait = self._limit(
            (self.login_ip, peer.network),
            (self.login_account, account),
            (self.backoff, f"ip:{peer.network}"),
            (self.backoff, account),
        )
        user = await self._user_by_key(key) if key else None
        if wait:
            raise await self._rate_limited("login", peer, wait, user["id"] if user else None)
        if user is None or len(password) > 1024:
            await self._verify(self.hasher.dummy_hash, password[:1024])  # same cost as a real one
            self._failed(f"ip:{peer.network}", account)
            await self.audit(
                "login",
                "unknown_user" if user is None else "bad_password",
                peer,
                user_id=user["id"] if user else None,
            )
            raise fail("login_failed", LOGIN_FAILED)
        if not await self._verify(user["password_hash"], password):
            self._failed(f"ip:{peer.network}", account)
            await self.audit("login", "bad_password", peer, user_id=user["id"])
            raise fail("login_failed", LOGIN_FAILED)
        if user["disabled"]:
            await self.audit("login", "disabled", peer, user_id=user["id"])
            raise fail("account_disabled", "this account is disabled; ask an admin")
        if user["mfa"]:
            await self._second_factor(user, totp, recovery_code, peer, "login")
        self.backoff.success(account)
        self.backoff.success(f"ip:{peer.network}")
        if self.hasher.needs_rehash(user["password_hash"]):
            new_hash = await self._hash(password)
            await self.store.write(
                lambda conn: conn.execute(
                    "UPDATE users SET password_hash = ? WHERE id = ?", (new_hash, user["id"])
                )
            )
        grant = await self._open_session(user, peer, device_id)
        await self.audit("login", "ok", peer, user_id=user["id"], session_id=grant.session_id)
        return grant

    async def register(
        self, invite_code: str, username: str, password: str, peer: Peer
    ) -> SessionGrant:
        """Redeem an invite: create the account and log it in."""
        wait = self._limit((self.invite_ip, peer.network), (self.backoff, f"invite:{peer.network}"))
        if wait:
            raise await self._rate_limited("register", peer, wait, None)
        key, password_hash = await self.check_new_account(username, password)
        digest = token_hash(invite_code) if 0 < len(invite_code) <= TOKEN_MAX_CHARS else b""
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
            user_id = insert_user(
                conn,
                username=username,
                username_key=key,
                role=invite[1],
                password_hash=password_hash,
                now=now,
            )
            conn.execute(
                "UPDATE invites SET used_at = ?, used_by = ? WHERE id = ?",
                (now, user_id, invite[0]),
            )
            return user_id

        result = await self.store.write(redeem)
        if result == "invalid_invite":
            self._failed(f"invite:{peer.network}")
            await self.audit("register", "invalid_invite", peer)
            raise fail(
                "invalid_invite",
                "this invite code is unknown, used, revoked or expired",
                field="$.invite_code",
            )
        if result == "username_taken":
            await self.audit("register", "username_taken", peer)
            raise fail(
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
        wait = self._limit(
            (self.refresh_ip, peer.network), (self.backoff, f"resume:{peer.network}")
        )
        if wait:
            raise await self._rate_limited("resume", peer, wait, None)
        session = await self._session_by("access_hash", access_token)
        now = now_ms()
        if session is None or session["access_expires_at"] <= now:
            code = "token_expired" if session is not None else "invalid_token"
            if session is None:
                self._failed(f"resume:{peer.network}")
            await self.audit("resume", code, peer, user_id=session["user_id"] if session else None)
            if session is None and await self._reset_by_admin("access_hash", access_token):
                raise password_reset()
            raise fail(
                code,
                "the access token is expired; refresh it"
                if session
                else "unknown or revoked access token",
                field="$.access_token",
            )
        try:
            # Last-seen and the audit row in one write job: one commit to wait for.
            await self.audit_with(
                _touch(session["id"], peer),
                "resume",
                "ok",
                peer,
                user_id=session["user_id"],
                session_id=session["id"],
            )
        except StoreError:
            # The disk refuses writes: last-seen and the audit row are
            # bookkeeping, and a device must still reach what is queued for
            # it (docs/PROTOCOL.md section 8.8). The log keeps the record.
            log.warning(
                "auth.resume",
                extra=fields(
                    outcome="ok",
                    user_id=session["user_id"],
                    session_id=session["id"],
                    peer=peer.ip,
                    audit="not_written",
                ),
            )
        return self._grant(session)

    async def refresh(self, refresh_token: str, peer: Peer) -> SessionGrant:
        """Rotate a refresh token: new access and refresh tokens, same session.

        A refresh token that was already rotated revokes its whole session.
        """
        wait = self._limit((self.refresh_ip, peer.network))
        if wait:
            raise await self._rate_limited("refresh", peer, wait, None)
        digest = token_hash(refresh_token) if 0 < len(refresh_token) <= TOKEN_MAX_CHARS else b""
        access, refresh = new_token(), new_token()
        now = now_ms()

        def rotate(conn: Any) -> tuple[str, dict[str, Any] | None]:
            session = select_session(conn, "s.refresh_hash = ?", digest, now)
            if session is None:
                spent = conn.execute(
                    "SELECT t.session_id, s.user_id FROM spent_refresh_tokens t"
                    " LEFT JOIN sessions s ON s.id = t.session_id WHERE t.token_hash = ?",
                    (digest,),
                ).fetchone()
                if spent is None:
                    return "invalid_token", None
                conn.execute(
                    "UPDATE sessions SET revoked_at = ?, revoked_reason = 'refresh token reused'"
                    " WHERE id = ? AND revoked_at IS NULL",
                    (now, spent[0]),
                )
                return "token_reused", {"id": spent[0], "user_id": spent[1]}
            access_expires = self._access_expiry(now, session["expires_at"])
            rotate_session_tokens(
                conn,
                session["id"],
                digest,
                access,
                refresh,
                access_expires=access_expires,
                now=now,
                ip=peer.ip,
            )
            session["access_expires_at"] = access_expires
            return "ok", session

        outcome, session = await self.store.write(rotate)
        if outcome == "token_reused" and session is not None:
            self.events.sessions_revoked([session["id"]])
            # The account is known: recorded, so that an admin who looks for this
            # user's events after a theft finds it (chatctl auth-audit --user).
            await self.audit(
                "refresh",
                "token_reused",
                peer,
                user_id=session["user_id"],
                session_id=session["id"],
            )
            raise fail(
                "invalid_token",
                "this refresh token was already used; the session is revoked, log in again",
                field="$.refresh_token",
            )
        if session is None:
            await self.audit("refresh", outcome, peer)
            if await self._reset_by_admin("refresh_hash", refresh_token):
                raise password_reset()
            raise fail(
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
        """The user's live sessions (neither revoked nor over), newest first:
        filtered in the query, so that its cap of 1,000 rows is not spent on
        history."""
        where = "user_id = ? AND revoked_at IS NULL AND expires_at > ?"
        return await self.store.read(partial(list_sessions_where, where, (user_id, now_ms())))

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
                raise fail(
                    "unknown_session",
                    f"no live session of yours with id {unknown[0]}",
                    field="$.session_ids",
                )
            targets = sorted(set(session_ids or ()))
        revoked = await self.revoke_sessions(targets, "revoked by user")
        for sid in revoked:
            await self.audit("revoke_session", "ok", peer, user_id=grant.user_id, session_id=sid)
        return revoked

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

    async def _reset_by_admin(self, column: str, token: str) -> bool:
        """Whether ``token`` is the current token of a session that ended
        because an admin reset the password (so the client can say so rather
        than try its old password)."""
        if not 0 < len(token) <= TOKEN_MAX_CHARS or column not in ("access_hash", "refresh_hash"):
            return False
        digest = token_hash(token)
        row = await self.store.read(
            lambda conn: conn.execute(
                # ``column`` is one of the two constant names checked above.
                f"SELECT revoked_reason FROM sessions WHERE {column} = ?",  # noqa: S608
                (digest,),
            ).fetchone()
        )
        return row is not None and row[0] == RESET_REASON

    async def _session_by(self, column: str, token: str) -> dict[str, Any] | None:
        if not 0 < len(token) <= TOKEN_MAX_CHARS:
            return None
        digest = token_hash(token)
        now = now_ms()
        return await self.store.read(
            lambda conn: select_session(conn, f"s.{column} = ?", digest, now)
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
            device_id=session["device_id"] or "",
        )


def _with_tokens(grant: SessionGrant, access: str, refresh: str) -> SessionGrant:
    return replace(grant, access_token=access, refresh_token=refresh)


def _touch(session_id: int, peer: Peer) -> Callable[[Any], object]:
    """The write that records a session's last use (time and address)."""
    now = now_ms()
    return lambda conn: conn.execute(
        "UPDATE sessions SET last_seen_at = ?, ip = ? WHERE id = ?", (now, peer.ip, session_id)
    )
