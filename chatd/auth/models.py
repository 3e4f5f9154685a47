"""Values the auth service hands out: sessions, users, invites, audit rows, errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import msgspec

from chatd.errors import RefusedError

ROLES: Final = ("user", "moderator", "admin")


class AuthError(RefusedError):
    """A refused auth request. ``code`` and ``message`` go to the client as is.

    Messages never say whether a username exists, and never carry a secret.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retry_after: float | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.field = field


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is asking: a masked address (stored, logged), the network rate limits
    key on, and a device name."""

    ip: str  # masked to /24 or /48 (log.mask_client_ips): what the audit log keeps
    device_name: str
    network: str = "-"  # IPv4 address or IPv6 /64: the rate-limit key


@dataclass(frozen=True, slots=True)
class SessionGrant:
    """A live session as a connection sees it. Tokens are set only when issued."""

    session_id: int
    user_id: int
    username: str
    role: str
    access_expires_at: int  # unix ms
    expires_at: int  # unix ms: the absolute end of the session
    mfa_enrollment_required: bool
    device_id: str = ""
    access_token: str | None = None
    refresh_token: str | None = None


class SessionInfo(msgspec.Struct, frozen=True):
    session_id: int
    user_id: int
    device_name: str
    created_at: int
    last_seen_at: int
    ip: str  # masked
    expires_at: int
    revoked: bool
    username: str = ""  # the user's, for people reading the list


class UserInfo(msgspec.Struct, frozen=True):
    id: int
    username: str
    role: str
    mfa_enabled: bool
    disabled: bool
    created_at: int
    password_changed_at: int


class InviteInfo(msgspec.Struct, frozen=True):
    id: int
    role: str
    note: str
    created_at: int
    expires_at: int
    used_at: int | None
    used_by: int | None
    revoked_at: int | None
    used_by_username: str | None = None


class AuditEvent(msgspec.Struct, frozen=True):
    id: int
    at: int
    event: str
    outcome: str
    user_id: int | None
    ip: str
    device_name: str | None
    session_id: int | None
    username: str | None = None  # the user's (null when no user, or the account is gone)
