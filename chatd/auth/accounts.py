"""Account administration: users, invites, sessions and the audit log, for admins.

Used by the admin API. Every change is written to ``auth_audit`` with the
admin as actor (``admin`` event prefix, peer ``admin-api``); password resets
never touch the second factor, so a reset cannot bypass MFA (ASVS 6.4.3).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Final

from chatd.auth.base import DAY_MS, RESET_REASON
from chatd.auth.models import ROLES, AuditEvent, AuthError, InviteInfo, Peer, SessionInfo, UserInfo
from chatd.auth.passwords import PasswordPolicyError, check_password_policy
from chatd.auth.queries import list_sessions_where
from chatd.auth.service import AuthService
from chatd.auth.tokens import new_invite_code, token_hash
from chatd.auth.user_ids import insert_user
from chatd.auth.usernames import UsernameError, normalize_username
from chatd.e2ee.current import CurrentDevices
from chatd.store import now_ms

ADMIN_PEER: Final = Peer(ip="admin-api", device_name="")

_USER_SELECT: Final = (
    "SELECT id, username, role, totp_confirmed_at IS NOT NULL, disabled_at IS NOT NULL,"
    " created_at, password_changed_at FROM users"
)
_INVITE_SELECT: Final = (
    "SELECT id, role, note, created_at, expires_at, used_at, used_by, revoked_at,"
    " (SELECT username FROM users WHERE users.id = invites.used_by) FROM invites"
)


def _user_info(row: Any) -> UserInfo:
    return UserInfo(
        id=row[0],
        username=row[1],
        role=row[2],
        mfa_enabled=bool(row[3]),
        disabled=bool(row[4]),
        created_at=row[5],
        password_changed_at=row[6],
    )


class NotFound(AuthError):
    def __init__(self, what: str) -> None:
        super().__init__("not_found", f"no such {what}")


def _role(role: str) -> str:
    if role not in ROLES:
        raise AuthError("invalid_role", f"role must be one of {', '.join(ROLES)}", field="$.role")
    return role


class AccountAdmin:
    def __init__(self, auth: AuthService, *, current: CurrentDevices) -> None:
        self.auth = auth
        self.store = auth.store
        self.current = current  # a disabled user's devices are not current

    # -- users ------------------------------------------------------------------------------

    async def create_user(self, username: str, password: str, role: str) -> UserInfo:
        _role(role)
        key, password_hash = await self.auth.check_new_account(username, password)
        now = now_ms()

        def insert(conn: Any) -> int | None:
            if conn.execute("SELECT 1 FROM users WHERE username_key = ?", (key,)).fetchone():
                return None
            return insert_user(
                conn,
                username=username,
                username_key=key,
                role=role,
                password_hash=password_hash,
                now=now,
            )

        user_id = await self.store.write(insert)
        if user_id is None:
            raise AuthError(
                "username_taken",
                "this username (or one that looks the same) is taken",
                field="$.username",
            )
        await self.auth.audit("admin_create_user", "ok", ADMIN_PEER, user_id=user_id)
        return await self.get_user(user_id)

    async def get_user(self, user_id: int) -> UserInfo:
        row = await self.store.read(
            lambda conn: conn.execute(f"{_USER_SELECT} WHERE id = ?", (user_id,)).fetchone()
        )
        if row is None:
            raise NotFound("user")
        return _user_info(row)

    async def list_users(
        self, *, limit: int, after_id: int | None, username: str | None = None
    ) -> list[UserInfo]:
        """Users in id order; with ``username``, only the account of that name
        (case and lookalikes fold as at login), or none."""
        if username is not None:
            try:
                key = normalize_username(username)
            except UsernameError:
                return []  # no account can have a name that breaks the rules
            row = await self.store.read(
                lambda conn: conn.execute(
                    f"{_USER_SELECT} WHERE username_key = ? AND id > ?", (key, after_id or 0)
                ).fetchone()
            )
            return [_user_info(row)] if row is not None and limit >= 1 else []
        rows = await self.store.read(
            lambda conn: conn.execute(
                f"{_USER_SELECT} WHERE id > ? ORDER BY id LIMIT ?", (after_id or 0, limit)
            ).fetchall()
        )
        return [_user_info(r) for r in rows]

    async def _update_user(self, user_id: int, sql: str, args: tuple[object, ...]) -> None:
        changed = await self.store.write(lambda conn: conn.execute(sql, (*args, user_id)).rowcount)
        if not changed:
            raise NotFound("user")

    async def set_disabled(self, user_id: int, disabled: bool) -> UserInfo:
        """Disable (and revoke every session) or enable an account."""
        now = now_ms() if disabled else None
        if not disabled and await self._erasure_pending(user_id):
            raise AuthError(
                "erasure_pending",
                "this account is to be erased; cancel the erasure first "
                "(POST /v1/users/{id}/erasure/cancel)",
            )
        await self._update_user(user_id, "UPDATE users SET disabled_at = ? WHERE id = ?", (now,))
        self.current.changed((user_id,))
        if disabled:
            await self.auth.revoke_sessions(
                await self.auth.user_session_ids(user_id), "account disabled"
            )
        event = "admin_disable_user" if disabled else "admin_enable_user"
        await self.auth.audit(event, "ok", ADMIN_PEER, user_id=user_id)
        return await self.get_user(user_id)

    async def _erasure_pending(self, user_id: int) -> bool:
        row = await self.store.read(
            lambda conn: conn.execute(
                "SELECT erase_after IS NOT NULL FROM users WHERE id = ?", (user_id,)
            ).fetchone()
        )
        return row is not None and bool(row[0])

    async def set_role(self, user_id: int, role: str) -> UserInfo:
        await self._update_user(user_id, "UPDATE users SET role = ? WHERE id = ?", (_role(role),))
        # Live connections carry the role they logged in with: end them, so the
        # new role (and its MFA policy) applies from the next login.
        await self.auth.revoke_sessions(await self.auth.user_session_ids(user_id), "role changed")
        await self.auth.audit(f"admin_set_role_{role}", "ok", ADMIN_PEER, user_id=user_id)
        return await self.get_user(user_id)

    async def reset_password(self, user_id: int, password: str) -> UserInfo:
        """Set a new password and end every session. The second factor stays as is."""
        user = await self.get_user(user_id)
        try:
            check_password_policy(password, username_key=normalize_username(user.username))
        except PasswordPolicyError as exc:
            raise AuthError("weak_password", str(exc), field="$.password") from None
        password_hash = await self.auth._hash(password)
        await self._update_user(
            user_id,
            "UPDATE users SET password_hash = ?, password_changed_at = ? WHERE id = ?",
            (password_hash, now_ms()),
        )
        await self.auth.revoke_sessions(await self.auth.user_session_ids(user_id), RESET_REASON)
        await self.auth.audit("admin_reset_password", "ok", ADMIN_PEER, user_id=user_id)
        return await self.get_user(user_id)

    async def reset_mfa(self, user_id: int) -> UserInfo:
        """Clear the second factor (a person who lost the phone *and* every recovery
        code, identity checked out of band) and end every session. Under an MFA
        policy the next login can only enroll a new authenticator."""

        def clear(conn: Any) -> int:
            conn.execute("DELETE FROM recovery_codes WHERE user_id = ?", (user_id,))
            return int(
                conn.execute(
                    "UPDATE users SET totp_secret = NULL, totp_confirmed_at = NULL,"
                    " totp_last_step = NULL WHERE id = ?",
                    (user_id,),
                ).rowcount
            )

        if not await self.store.write(clear):
            raise NotFound("user")
        self.auth.forget_pending_enrollment(user_id)
        await self.auth.revoke_sessions(await self.auth.user_session_ids(user_id), "mfa reset")
        await self.auth.audit("admin_reset_mfa", "ok", ADMIN_PEER, user_id=user_id)
        return await self.get_user(user_id)

    # -- invites -----------------------------------------------------------------------------

    async def create_invite(
        self, role: str, days: float | None, note: str
    ) -> tuple[str, InviteInfo]:
        """A single-use invite code (returned once; only its hash is stored)."""
        _role(role)
        code = new_invite_code()
        now = now_ms()
        expires = now + int((days or self.auth.settings.invite_days) * DAY_MS)
        invite_id = await self.store.write(
            lambda conn: int(
                conn.execute(
                    "INSERT INTO invites (code_hash, role, note, created_at, expires_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (token_hash(code), role, note, now, expires),
                ).lastrowid
            )
        )
        await self.auth.audit("admin_create_invite", "ok", ADMIN_PEER)
        return code, (await self.list_invites(invite_id=invite_id))[0]

    async def list_invites(self, *, invite_id: int | None = None) -> list[InviteInfo]:
        where, args = ("WHERE id = ?", (invite_id,)) if invite_id else ("", ())
        rows = await self.store.read(
            lambda conn: conn.execute(
                f"{_INVITE_SELECT} {where} ORDER BY id DESC LIMIT 1000",  # noqa: S608
                args,
            ).fetchall()
        )
        return [InviteInfo(*r) for r in rows]

    async def revoke_invite(self, invite_id: int) -> InviteInfo:
        now = now_ms()
        changed = await self.store.write(
            lambda conn: (
                conn.execute(
                    "UPDATE invites SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL"
                    " AND used_at IS NULL",
                    (now, invite_id),
                ).rowcount
            )
        )
        invites = await self.list_invites(invite_id=invite_id)
        if not invites:
            raise NotFound("invite")
        if not changed:
            raise AuthError("invite_closed", "this invite was already used or revoked")
        await self.auth.audit("admin_revoke_invite", "ok", ADMIN_PEER)
        return invites[0]

    # -- sessions ----------------------------------------------------------------------------

    async def list_sessions(self, user_id: int | None) -> list[SessionInfo]:
        if user_id is None:
            query = partial(
                list_sessions_where, "revoked_at IS NULL AND expires_at > ?", (now_ms(),)
            )
        else:
            query = partial(list_sessions_where, "user_id = ?", (user_id,))
        return await self.store.read(query)

    async def revoke_sessions(self, *, user_id: int | None, session_id: int | None) -> list[int]:
        """Revoke one session, one user's sessions, or (both None) every session."""
        if session_id is not None:
            ids = [session_id]
        elif user_id is not None:
            ids = await self.auth.user_session_ids(user_id)
        else:
            rows = await self.store.read(
                lambda conn: conn.execute(
                    "SELECT id FROM sessions WHERE revoked_at IS NULL"
                ).fetchall()
            )
            ids = [r[0] for r in rows]
        revoked = await self.auth.revoke_sessions(ids, "revoked by admin")
        owners = await self._session_owners(revoked)
        for sid in revoked:
            await self.auth.audit(
                "admin_revoke_session", "ok", ADMIN_PEER, user_id=owners.get(sid), session_id=sid
            )
        return revoked

    async def _session_owners(self, session_ids: list[int]) -> dict[int, int]:
        """The user id of each of these sessions (for their audit rows)."""
        if not session_ids:
            return {}

        def read(conn: Any) -> dict[int, int]:
            owners: dict[int, int] = {}
            for start in range(0, len(session_ids), 500):  # bound-parameter limits
                chunk = session_ids[start : start + 500]
                marks = ", ".join("?" * len(chunk))
                rows = conn.execute(
                    f"SELECT id, user_id FROM sessions WHERE id IN ({marks})",  # noqa: S608 - only ? marks
                    chunk,
                ).fetchall()
                owners.update((row[0], row[1]) for row in rows)
            return owners

        return await self.store.read(read)

    # -- audit --------------------------------------------------------------------------------

    async def audit_page(
        self,
        *,
        limit: int,
        before_id: int | None,
        user_id: int | None,
        event: str | None,
        since: int | None,
    ) -> list[AuditEvent]:
        clauses: list[str] = ["id < ?"]
        args: list[object] = [before_id or 2**63 - 1]
        for clause, value in (("user_id = ?", user_id), ("event = ?", event), ("at >= ?", since)):
            if value is not None:
                clauses.append(clause)
                args.append(value)
        sql = (
            "SELECT id, at, event, outcome, user_id, ip, device_name, session_id,"  # noqa: S608 - constant clauses, values bound
            " (SELECT username FROM users WHERE users.id = auth_audit.user_id) FROM auth_audit"
            f" WHERE {' AND '.join(clauses)} ORDER BY id DESC LIMIT ?"
        )
        rows = await self.store.read(lambda conn: conn.execute(sql, (*args, limit)).fetchall())
        return [AuditEvent(*r) for r in rows]
