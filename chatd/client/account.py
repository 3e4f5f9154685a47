"""Looking after one's own account: password, TOTP, sessions and devices.

:class:`Account` wraps the self-service requests of docs/PROTOCOL.md §6.7–6.10
and §8.7 on a device's connection. Get it as ``client.account``; during a
login that the server restricted until TOTP is set up
(``mfa_enrollment_required``), :func:`chatd.client.open_client` hands the same
object to its ``enroll_totp`` callback before the client starts.

Token rotation: ``change_password``, ``confirm_totp``, ``disable_totp`` and
``new_recovery_codes`` make the server replace this session's tokens; the
reply's new pair is stored in the connection's credentials at once, so a later
reconnect resumes with tokens that still work.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .connection import Connection


@dataclass(frozen=True)
class TotpSecret:
    """A pending TOTP secret (``mfa_enroll``): for an authenticator app.

    ``secret`` is base32, for typing in; ``provisioning_uri`` is the
    ``otpauth://`` URI, to show as a QR code. Neither belongs in a log.
    """

    secret: str
    provisioning_uri: str

    def __repr__(self) -> str:  # never print the secret
        return "TotpSecret(...)"


@dataclass(frozen=True)
class SessionInfo:
    """One live session of the user (``list_sessions``)."""

    session_id: int
    device_name: str
    created_at: int  # unix ms
    last_seen_at: int  # unix ms
    ip: str  # masked to its network by default
    expires_at: int  # unix ms
    current: bool  # the session of this connection


class Account:
    """The self-service requests of the logged-in user.

    Every method raises ServerRefusedError with the protocol's code when the
    server refuses (``reauth_failed`` for a wrong password, ``mfa_required``
    when a second factor is missing, ``mfa_failed`` for a wrong code,
    ``weak_password``, ``rate_limited``, ...), and ConnectionLostError or
    trio.TooSlowError like any request.
    """

    def __init__(
        self, conn: Connection, on_devices_changed: Callable[[], Awaitable[Any]] | None = None
    ) -> None:
        self._conn = conn
        self._on_devices_changed = on_devices_changed

    @property
    def enrollment_required(self) -> bool:
        """True while the server restricts this session until TOTP is set up."""
        return self._conn.restricted

    # -- password and second factor -------------------------------------------

    async def change_password(
        self, current_password: str, new_password: str, *, totp: str | None = None
    ) -> None:
        """Change the password. The server ends every other session of the
        user; this one goes on with new tokens. ``totp`` (a TOTP or recovery
        code) is needed when the account has TOTP."""
        fields: dict[str, Any] = {
            "current_password": current_password,
            "new_password": new_password,
        }
        if totp:
            fields["totp"] = totp
        reply = await self._conn.request("change_password", **fields)
        await self._conn.take_tokens(reply["tokens"])
        self._conn.credentials.password = new_password

    async def enroll_totp(self, password: str, *, totp: str | None = None) -> TotpSecret:
        """Start setting up TOTP (or replacing the authenticator: then
        ``totp`` is a current code or a recovery code). The secret takes effect
        only with :meth:`confirm_totp`, within 10 minutes."""
        fields: dict[str, Any] = {"password": password}
        if totp:
            fields["totp"] = totp
        reply = await self._conn.request("mfa_enroll", **fields)
        return TotpSecret(reply["secret"], reply["provisioning_uri"])

    async def confirm_totp(self, code: str) -> list[str]:
        """Turn TOTP on with a first code from the app. Returns the ten
        recovery codes: show them once. A restricted session becomes a full
        one. Raises ServerRefusedError ``mfa_failed`` for a wrong code (check
        the clock) or ``mfa_not_enrolling``."""
        reply = await self._conn.request("mfa_confirm", code=code)
        await self._conn.take_tokens(reply["tokens"])
        self._conn.restricted = False
        return list(reply["codes"])

    async def disable_totp(self, password: str, code: str) -> None:
        """Turn TOTP off (``code``: a TOTP or recovery code). Refused with
        ``mfa_required_by_policy`` when the user's role must keep it."""
        reply = await self._conn.request("mfa_disable", password=password, code=code)
        await self._conn.take_tokens(reply["tokens"])

    async def new_recovery_codes(self, password: str, code: str) -> list[str]:
        """Replace the recovery codes; returns the ten new ones."""
        reply = await self._conn.request("new_recovery_codes", password=password, code=code)
        await self._conn.take_tokens(reply["tokens"])
        return list(reply["codes"])

    # -- sessions -------------------------------------------------------------

    async def sessions(self) -> list[SessionInfo]:
        """The user's live sessions, newest first."""
        reply = await self._conn.request("list_sessions")
        return [
            SessionInfo(
                s["session_id"],
                s["device_name"],
                s["created_at"],
                s["last_seen_at"],
                s["ip"],
                s["expires_at"],
                s["current"],
            )
            for s in reply["sessions"]
        ]

    async def revoke_sessions(self, session_ids: list[int]) -> list[int]:
        """End other sessions of the user; returns those that were ended.
        ``use_logout`` if the list holds this session, ``unknown_session`` for
        an id that is not the user's (then nothing is ended)."""
        reply = await self._conn.request("revoke_sessions", session_ids=session_ids)
        return list(reply["session_ids"])

    async def revoke_other_sessions(self) -> list[int]:
        """End every session of the user but this one."""
        reply = await self._conn.request("revoke_sessions", all_others=True)
        return list(reply["session_ids"])

    async def logout(self) -> None:
        """End this session on the server; the connection closes and does not
        come back. The device and its keys stay: logging in again with the
        password reuses them."""
        await self._conn.logout()

    # -- devices --------------------------------------------------------------

    async def remove_device(self, device_id: str) -> None:
        """Remove another device of the user (a lost phone): its keys, queue
        and sessions go, and peers stop encrypting to it once they refresh
        their directory. ``use_logout`` for this device, ``unknown_device``
        for an id that is not the user's. The directory is fetched again."""
        await self._conn.request("remove_device", device_id=device_id)
        if self._on_devices_changed is not None:
            await self._on_devices_changed()
