"""SQL the auth flows share. Each function runs inside a store job (a thread)."""

from __future__ import annotations

from typing import Any, Final

from chatd.auth.models import SessionInfo
from chatd.auth.tokens import recovery_code_hash, token_hash

SPENT_TOKENS_KEPT: Final = 50  # rotated refresh tokens remembered per session, for reuse detection

_USER_COLUMNS: Final = (
    "id, username, username_key, role, password_hash, totp_secret, totp_confirmed_at,"
    " totp_last_step, disabled_at, created_at, password_changed_at"
)


def select_user(where: str, value: object, conn: Any) -> dict[str, Any] | None:
    row = conn.execute(f"SELECT {_USER_COLUMNS} FROM users WHERE {where}", (value,)).fetchone()  # noqa: S608
    if row is None:
        return None
    names = [n.strip() for n in _USER_COLUMNS.split(",")]
    user = dict(zip(names, row, strict=True))
    user["mfa"] = user["totp_confirmed_at"] is not None
    user["disabled"] = user["disabled_at"] is not None
    return user


def select_session(conn: Any, where: str, value: object, now: int) -> dict[str, Any] | None:
    row = conn.execute(
        # ``where`` is always one of this module's constant fragments.
        "SELECT s.id, s.user_id, s.access_expires_at, s.expires_at, u.username, u.role,"  # noqa: S608
        " u.totp_confirmed_at IS NOT NULL, s.device_id"
        " FROM sessions s JOIN users u ON u.id = s.user_id"
        f" WHERE {where} AND s.revoked_at IS NULL AND s.expires_at > ?"
        " AND u.disabled_at IS NULL",
        (value, now),
    ).fetchone()
    if row is None:
        return None
    keys = (
        "id",
        "user_id",
        "access_expires_at",
        "expires_at",
        "username",
        "role",
        "mfa",
        "device_id",
    )
    session = dict(zip(keys, row, strict=True))
    session["mfa"] = bool(session["mfa"])
    return session


def list_sessions_where(where: str, args: tuple[object, ...], conn: Any) -> list[SessionInfo]:
    rows = conn.execute(
        "SELECT id, user_id, device_name, created_at, last_seen_at, ip, expires_at,"  # noqa: S608
        " revoked_at IS NOT NULL, (SELECT username FROM users WHERE users.id = sessions.user_id)"
        f" FROM sessions WHERE {where} ORDER BY id DESC LIMIT 1000",
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
            username=r[8],
        )
        for r in rows
    ]


def replace_recovery_codes(conn: Any, user_id: int, codes: list[str]) -> None:
    conn.execute("DELETE FROM recovery_codes WHERE user_id = ?", (user_id,))
    conn.executemany(
        "INSERT INTO recovery_codes (user_id, code_hash) VALUES (?, ?)",
        [(user_id, recovery_code_hash(code)) for code in codes],
    )


def rotate_session_tokens(
    conn: Any,
    session_id: int,
    spent_refresh_hash: bytes,
    access: str,
    refresh: str,
    *,
    access_expires: int,
    now: int,
    ip: str,
) -> None:
    """Put a new token pair on a session (refresh, and re-authenticated
    changes). The refresh token it replaces joins the spent ones, so presenting
    it again is caught as reuse (theft); only the latest SPENT_TOKENS_KEPT per
    session are kept (an older one is then refused as unknown, just not
    detected as reuse)."""
    conn.execute(
        "INSERT INTO spent_refresh_tokens (token_hash, session_id, spent_at) VALUES (?, ?, ?)",
        (spent_refresh_hash, session_id, now),
    )
    conn.execute(
        "DELETE FROM spent_refresh_tokens WHERE session_id = ? AND token_hash NOT IN"
        " (SELECT token_hash FROM spent_refresh_tokens WHERE session_id = ?"
        " ORDER BY spent_at DESC LIMIT ?)",
        (session_id, session_id, SPENT_TOKENS_KEPT),
    )
    conn.execute(
        "UPDATE sessions SET access_hash = ?, access_expires_at = ?, refresh_hash = ?,"
        " last_seen_at = ?, ip = ? WHERE id = ?",
        (token_hash(access), access_expires, token_hash(refresh), now, ip, session_id),
    )
