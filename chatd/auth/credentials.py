"""Credential changes: password, TOTP enrollment and removal, recovery codes.

Each change asks for full re-authentication first (the current password, and
the TOTP code when MFA is on), is audited, and never bypasses the second
factor.
"""

from __future__ import annotations

import time
from typing import Any, Final

import trio

from chatd.auth.base import AuthBase, fail
from chatd.auth.models import Peer, SessionGrant
from chatd.auth.passwords import PasswordPolicyError, check_password_policy
from chatd.auth.queries import replace_recovery_codes
from chatd.auth.tokens import new_recovery_codes, normalize_recovery_code
from chatd.auth.totp import new_totp_secret, provisioning_uri, verify_totp
from chatd.store import now_ms

#: How long an enrollment may wait for its confirming code.
PENDING_ENROLLMENT_SECONDS: Final = 600.0


class CredentialFlows(AuthBase):
    async def _reauthenticate(
        self,
        grant: SessionGrant,
        password: str,
        totp: str | None,
        peer: Peer,
        event: str,
        *,
        first_factor_field: str = "$.password",
        code_field: str = "$.totp",
    ) -> dict[str, Any]:
        """Full re-authentication for sensitive changes: the password, and the second
        factor if enabled (a TOTP code, or a recovery code for a lost authenticator)."""
        user = await self.user_by_id(grant.user_id)
        if user is None:
            raise fail("invalid_token", "the account no longer exists")
        wait = self._limit((self.backoff, f"a:{user['username_key']}"))
        if wait:
            raise await self._rate_limited(event, peer, wait, user["id"])
        if not await self._verify(user["password_hash"], password):
            self._failed(f"a:{user['username_key']}")
            await self.audit(event, "bad_password", peer, user_id=user["id"])
            raise fail("reauth_failed", "the current password is wrong", field=first_factor_field)
        if user["mfa"]:
            recovery = totp if totp and normalize_recovery_code(totp) else None
            await self._second_factor(
                user, None if recovery else totp, recovery, peer, event, field=code_field
            )
        return user

    async def confirm_identity(
        self, grant: SessionGrant, password: str, totp: str | None, peer: Peer, event: str
    ) -> None:
        """Full re-authentication for a sensitive read (the account export),
        audited under ``event``; raises AuthError reauth_failed and the like."""
        user = await self._reauthenticate(grant, password, totp, peer, event)
        await self.audit(event, "ok", peer, user_id=user["id"], session_id=grant.session_id)

    async def change_password(
        self, grant: SessionGrant, current: str, new: str, totp: str | None, peer: Peer
    ) -> SessionGrant:
        """Change the password after full re-authentication. Other sessions are
        revoked; this one goes on with new tokens (returned)."""
        user = await self._reauthenticate(
            grant, current, totp, peer, "password_change", first_factor_field="$.current_password"
        )
        try:
            check_password_policy(new, username_key=user["username_key"])
        except PasswordPolicyError as exc:
            raise fail("weak_password", str(exc), field="$.new_password") from None
        new_hash = await self._hash(new)
        now = now_ms()
        await self.store.write(
            lambda conn: conn.execute(
                "UPDATE users SET password_hash = ?, password_changed_at = ? WHERE id = ?",
                (new_hash, now, user["id"]),
            )
        )
        others = await self.user_session_ids(user["id"], except_id=grant.session_id)
        await self.revoke_sessions(others, "password changed")
        fresh = await self.rotate_tokens(grant, peer)
        await self.audit(
            "password_change", "ok", peer, user_id=user["id"], session_id=grant.session_id
        )
        return fresh

    async def mfa_enroll(
        self, grant: SessionGrant, password: str, totp: str | None, peer: Peer
    ) -> tuple[str, str]:
        """Start TOTP enrollment, or the replacement of the current authenticator.

        The new secret is pending (in memory, for ``PENDING_ENROLLMENT_SECONDS``)
        until :meth:`mfa_confirm` proves the device has it; until then the
        current second factor, if any, stays in force. A user who lost the
        authenticator re-authenticates here with a recovery code.
        """
        user = await self._reauthenticate(grant, password, totp, peer, "mfa_enroll")
        secret = new_totp_secret()
        deadline = trio.current_time() + PENDING_ENROLLMENT_SECONDS
        self._pending_totp[user["id"]] = (secret, deadline)
        await self.audit("mfa_enroll", "ok", peer, user_id=user["id"], session_id=grant.session_id)
        return secret, provisioning_uri(secret, user["username"])

    async def mfa_confirm(
        self, grant: SessionGrant, code: str, peer: Peer
    ) -> tuple[list[str], SessionGrant]:
        """Activate the pending TOTP secret with a valid code; returns 10 new
        recovery codes, and this session with new tokens."""
        user = await self.user_by_id(grant.user_id)
        pending = self._pending_totp.get(grant.user_id)
        if user is None or pending is None or pending[1] < trio.current_time():
            self._pending_totp.pop(grant.user_id, None)
            raise fail("mfa_not_enrolling", "start (again) with mfa_enroll")
        secret = pending[0]
        wait = self._limit((self.totp_account, f"u{user['id']}"))
        if wait:
            raise await self._rate_limited("mfa_confirm", peer, wait, user["id"])
        step = verify_totp(secret, code, last_step=None, now=time.time())
        if step is None:
            await self.audit("mfa_confirm", "bad_second_factor", peer, user_id=user["id"])
            raise fail("mfa_failed", "wrong code; check the device clock", field="$.code")
        del self._pending_totp[grant.user_id]
        codes = new_recovery_codes(10)
        now = now_ms()

        def activate(conn: Any) -> None:
            conn.execute(
                "UPDATE users SET totp_secret = ?, totp_confirmed_at = ?, totp_last_step = ?"
                " WHERE id = ?",
                (secret, now, step, user["id"]),
            )
            replace_recovery_codes(conn, user["id"], codes)

        await self.store.write(activate)
        fresh = await self.rotate_tokens(grant, peer)
        await self.audit("mfa_confirm", "ok", peer, user_id=user["id"], session_id=grant.session_id)
        return codes, fresh

    async def mfa_disable(
        self, grant: SessionGrant, password: str, code: str, peer: Peer
    ) -> SessionGrant:
        """Remove TOTP and the recovery codes; this session goes on with new
        tokens (returned)."""
        user = await self._reauthenticate(
            grant, password, code, peer, "mfa_disable", code_field="$.code"
        )
        if not user["mfa"]:
            raise fail("mfa_not_enabled", "this account has no second factor")
        if self._mfa_required(user["role"]):
            raise fail("mfa_required_by_policy", "your role must keep a second factor")

        def disable(conn: Any) -> None:
            conn.execute(
                "UPDATE users SET totp_secret = NULL, totp_confirmed_at = NULL,"
                " totp_last_step = NULL WHERE id = ?",
                (user["id"],),
            )
            conn.execute("DELETE FROM recovery_codes WHERE user_id = ?", (user["id"],))

        await self.store.write(disable)
        fresh = await self.rotate_tokens(grant, peer)
        await self.audit("mfa_disable", "ok", peer, user_id=user["id"], session_id=grant.session_id)
        return fresh

    async def regenerate_recovery_codes(
        self, grant: SessionGrant, password: str, code: str, peer: Peer
    ) -> tuple[list[str], SessionGrant]:
        """Replace the recovery codes; returns them, and this session with new tokens."""
        user = await self._reauthenticate(
            grant, password, code, peer, "recovery_codes", code_field="$.code"
        )
        if not user["mfa"]:
            raise fail("mfa_not_enabled", "this account has no second factor")
        codes = new_recovery_codes(10)
        await self.store.write(lambda conn: replace_recovery_codes(conn, user["id"], codes))
        fresh = await self.rotate_tokens(grant, peer)
        await self.audit(
            "recovery_codes", "ok", peer, user_id=user["id"], session_id=grant.session_id
        )
        return codes, fresh
