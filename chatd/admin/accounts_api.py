"""Admin API routes for accounts: users, invites, sessions and the auth audit log.

Declared with the same :func:`~chatd.admin.api.route` as every other admin
route, so Quart and the OpenAPI document see them alike. Each route needs the
admin token and is written to the admin audit log: every change, and every
read of personal data (users, sessions, the auth audit log).

The work is done by :class:`chatd.auth.accounts.AccountAdmin`
(``AdminContext.accounts``); its :class:`~chatd.auth.models.AuthError` becomes
a JSON error in :mod:`chatd.admin.app` (404 ``not_found``, 409
``username_taken`` or ``invite_closed``, 400 otherwise, with the field).
Without an ``AccountAdmin`` these routes answer 503 ``service_unavailable``.

Passwords and invite codes arrive in request bodies only, never in a path or
query string, so they never reach the admin audit log (which keeps paths).
An invite code is in the one response that creates it, and nowhere after.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal, get_args

import msgspec

from chatd.admin.api import ERROR_CODE, MAX_INT, AdminContext, ApiError, Cursor, Limit, route
from chatd.auth.models import ROLES, AuditEvent, InviteInfo, SessionInfo, UserInfo
from chatd.auth.passwords import COMMON_PASSWORDS_CHECKED, PASSWORD_MAX, PASSWORD_MIN
from chatd.auth.usernames import USERNAME_MAX, USERNAME_MIN, USERNAME_PATTERN, USERNAME_RULES

if TYPE_CHECKING:
    from chatd.auth.accounts import AccountAdmin

Role = Literal["user", "moderator", "admin"]
if get_args(Role) != ROLES:  # pragma: no cover - a guard for whoever edits ROLES
    raise TypeError(f"accounts_api.Role {get_args(Role)} differs from auth ROLES {ROLES}")

#: A new account's name. The document can say the rules for the plain ASCII
#: spelling only, so that is all the admin API takes; its check of the
#: pattern answers invalid_username as the rules' own check does.
Username = Annotated[
    str,
    msgspec.Meta(
        min_length=USERNAME_MIN,
        max_length=USERNAME_MAX,
        pattern=USERNAME_PATTERN,
        description=f"{USERNAME_RULES}; in plain ASCII (not a fullwidth or other "
        "lookalike spelling). A name that folds to a taken one is taken (409).",
        extra={ERROR_CODE: "invalid_username"},
    ),
]

#: A new password. The length is checked against the document; the rest of
#: the policy (common passwords, the username) cannot be said in JSON Schema
#: and is refused by the handler, with the same code.
Password = Annotated[
    str,
    msgspec.Meta(
        min_length=PASSWORD_MIN,
        max_length=PASSWORD_MAX,
        description=f"{PASSWORD_MIN} to {PASSWORD_MAX} characters, not one of the "
        f"{COMMON_PASSWORDS_CHECKED:,} most common passwords and not the username "
        "(weak_password); never logged.",
        extra={ERROR_CODE: "weak_password"},
    ),
]

# Route-specific errors, for the OpenAPI document (app.py maps AuthError codes).
_UNAVAILABLE: Final = (503, "Account administration is not running (service_unavailable).")
_NO_USER: Final = (404, "No user with this id (not_found).")
_PASSWORD: Final = (
    400,
    "The password breaks the policy: 12 to 128 characters, not a common password, not "
    "the username (weak_password, error.field $.password).",
)


def _accounts(ctx: AdminContext) -> AccountAdmin:
    if ctx.accounts is None:
        raise ApiError(
            503, "service_unavailable", "account administration is not running on this server"
        )
    return ctx.accounts


# -- users ------------------------------------------------------------------------------------


class UsersQuery(msgspec.Struct, forbid_unknown_fields=True):
    limit: Limit = 50
    after_id: (
        Annotated[
            int,
            msgspec.Meta(ge=0, le=MAX_INT, description="Return users with an id above this one."),
        ]
        | None
    ) = None
    username: (
        Annotated[
            str,
            msgspec.Meta(
                min_length=1,
                max_length=64,
                description="Only the account of this name (case-free, as at login): "
                "one user or none.",
            ),
        ]
        | None
    ) = None


class UsersPage(msgspec.Struct):
    """Users in id order; pass ``next_after_id`` as ``after_id`` for the next page."""

    users: list[UserInfo]
    next_after_id: int | None


@route(
    "GET",
    "/v1/users",
    "Accounts in id order (personal data: audit-logged)",
    response=UsersPage,
    query=UsersQuery,
    tag="accounts",
    errors=(_UNAVAILABLE,),
)
async def list_users(ctx: AdminContext, query: UsersQuery, body: None) -> UsersPage:
    users = await _accounts(ctx).list_users(
        limit=query.limit, after_id=query.after_id, username=query.username
    )
    more = len(users) == query.limit and query.username is None
    return UsersPage(users=users, next_after_id=users[-1].id if more else None)


class NewUser(msgspec.Struct, forbid_unknown_fields=True):
    username: Username
    password: Password
    role: Role = "user"


@route(
    "POST",
    "/v1/users",
    "Create an account (no invite needed)",
    response=UserInfo,
    body=NewUser,
    tag="accounts",
    errors=(
        _UNAVAILABLE,
        _PASSWORD,
        (400, "The username breaks the rules (invalid_username, error.field $.username)."),
        (409, "The username, or one that looks the same, is taken (username_taken)."),
    ),
)
async def create_user(ctx: AdminContext, query: None, body: NewUser) -> UserInfo:
    return await _accounts(ctx).create_user(body.username, body.password, body.role)


@route(
    "GET",
    "/v1/users/{user_id}",
    "One account (personal data: audit-logged)",
    response=UserInfo,
    tag="accounts",
    errors=(_UNAVAILABLE, _NO_USER),
)
async def show_user(ctx: AdminContext, query: None, body: None, *, user_id: int) -> UserInfo:
    return await _accounts(ctx).get_user(user_id)


@route(
    "POST",
    "/v1/users/{user_id}/disable",
    "Disable an account and revoke all its sessions",
    response=UserInfo,
    tag="accounts",
    errors=(_UNAVAILABLE, _NO_USER),
)
async def disable_user(ctx: AdminContext, query: None, body: None, *, user_id: int) -> UserInfo:
    return await _accounts(ctx).set_disabled(user_id, True)


@route(
    "POST",
    "/v1/users/{user_id}/enable",
    "Enable a disabled account",
    response=UserInfo,
    tag="accounts",
    errors=(
        _UNAVAILABLE,
        _NO_USER,
        (409, "An erasure of the account is pending: cancel it first (erasure_pending)."),
    ),
)
async def enable_user(ctx: AdminContext, query: None, body: None, *, user_id: int) -> UserInfo:
    return await _accounts(ctx).set_disabled(user_id, False)


class RoleChange(msgspec.Struct, forbid_unknown_fields=True):
    role: Role


@route(
    "PUT",
    "/v1/users/{user_id}/role",
    "Change an account's role",
    response=UserInfo,
    body=RoleChange,
    tag="accounts",
    errors=(_UNAVAILABLE, _NO_USER),
)
async def set_user_role(
    ctx: AdminContext, query: None, body: RoleChange, *, user_id: int
) -> UserInfo:
    return await _accounts(ctx).set_role(user_id, body.role)


class PasswordReset(msgspec.Struct, forbid_unknown_fields=True):
    password: Password


@route(
    "POST",
    "/v1/users/{user_id}/password",
    "Reset an account's password: revokes its sessions, keeps its second factor",
    response=UserInfo,
    body=PasswordReset,
    tag="accounts",
    errors=(_UNAVAILABLE, _NO_USER, _PASSWORD),
)
async def reset_user_password(
    ctx: AdminContext, query: None, body: PasswordReset, *, user_id: int
) -> UserInfo:
    return await _accounts(ctx).reset_password(user_id, body.password)


class MfaReset(msgspec.Struct, forbid_unknown_fields=True):
    confirm: Annotated[
        Literal[True], msgspec.Meta(description="Must be true: you checked the person's identity.")
    ]


@route(
    "POST",
    "/v1/users/{user_id}/mfa/reset",
    "Remove a second factor after checking the person's identity out of band: clears "
    "TOTP and recovery codes and revokes every session; the user enrolls again",
    response=UserInfo,
    body=MfaReset,
    tag="accounts",
    errors=(_UNAVAILABLE, _NO_USER),
)
async def reset_user_mfa(
    ctx: AdminContext, query: None, body: MfaReset, *, user_id: int
) -> UserInfo:
    return await _accounts(ctx).reset_mfa(user_id)


# -- invites -----------------------------------------------------------------------------------


class InviteList(msgspec.Struct):
    """Invites, newest first (at most 1000). Codes are never listed."""

    invites: list[InviteInfo]


@route(
    "GET",
    "/v1/invites",
    "Invites, newest first, without their codes",
    response=InviteList,
    tag="invites",
    errors=(_UNAVAILABLE,),
)
async def list_invites(ctx: AdminContext, query: None, body: None) -> InviteList:
    return InviteList(invites=await _accounts(ctx).list_invites())


class NewInvite(msgspec.Struct, forbid_unknown_fields=True):
    role: Role = "user"
    days: (
        Annotated[
            float,
            msgspec.Meta(ge=0.01, le=90, description="Lifetime; default auth.invite_days."),
        ]
        | None
    ) = None
    note: Annotated[
        str, msgspec.Meta(max_length=200, description="For admins, e.g. who it is for.")
    ] = ""


class InviteCreated(msgspec.Struct):
    """The code is in this response only; the server keeps just its hash."""

    code: str
    invite: InviteInfo


@route(
    "POST",
    "/v1/invites",
    "Create a single-use invite code (shown once)",
    response=InviteCreated,
    body=NewInvite,
    tag="invites",
    errors=(_UNAVAILABLE,),
)
async def create_invite(ctx: AdminContext, query: None, body: NewInvite) -> InviteCreated:
    code, invite = await _accounts(ctx).create_invite(body.role, body.days, body.note)
    return InviteCreated(code=code, invite=invite)


@route(
    "DELETE",
    "/v1/invites/{invite_id}",
    "Revoke an unused invite",
    response=InviteInfo,
    tag="invites",
    errors=(
        _UNAVAILABLE,
        (404, "No invite with this id (not_found)."),
        (409, "The invite was already used or revoked (invite_closed)."),
    ),
)
async def revoke_invite(
    ctx: AdminContext, query: None, body: None, *, invite_id: int
) -> InviteInfo:
    return await _accounts(ctx).revoke_invite(invite_id)


# -- sessions ----------------------------------------------------------------------------------


class SessionsQuery(msgspec.Struct, forbid_unknown_fields=True):
    user_id: (
        Annotated[
            int,
            msgspec.Meta(
                ge=1, le=MAX_INT, description="This user's sessions, revoked ones included."
            ),
        ]
        | None
    ) = None


class SessionList(msgspec.Struct):
    """Sessions, newest first (at most 1000)."""

    sessions: list[SessionInfo]


class Revoked(msgspec.Struct):
    """Ids of the sessions this call revoked (already revoked ones are not listed)."""

    revoked: list[int]


@route(
    "GET",
    "/v1/sessions",
    "Live sessions, or all of one user's (personal data: audit-logged)",
    response=SessionList,
    query=SessionsQuery,
    tag="sessions",
    errors=(_UNAVAILABLE, (404, "No user with the given user_id (not_found).")),
)
async def list_sessions(ctx: AdminContext, query: SessionsQuery, body: None) -> SessionList:
    accounts = _accounts(ctx)
    if query.user_id is not None:
        await accounts.get_user(query.user_id)  # 404 for an unknown user, not an empty list
    return SessionList(sessions=await accounts.list_sessions(query.user_id))


def _session_exists(session_id: int, conn: Any) -> bool:
    return conn.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone() is not None


@route(
    "DELETE",
    "/v1/sessions/{session_id}",
    "Revoke one session (its connections close at once)",
    response=Revoked,
    tag="sessions",
    errors=(_UNAVAILABLE, (404, "No session with this id (not_found).")),
)
async def revoke_session(ctx: AdminContext, query: None, body: None, *, session_id: int) -> Revoked:
    accounts = _accounts(ctx)
    if not await accounts.store.read(partial(_session_exists, session_id)):
        raise ApiError(404, "not_found", "no such session")
    revoked = await accounts.revoke_sessions(user_id=None, session_id=session_id)
    return Revoked(revoked=revoked)


@route(
    "POST",
    "/v1/users/{user_id}/sessions/revoke",
    "Revoke all of one user's sessions",
    response=Revoked,
    tag="sessions",
    errors=(_UNAVAILABLE, _NO_USER),
)
async def revoke_user_sessions(
    ctx: AdminContext, query: None, body: None, *, user_id: int
) -> Revoked:
    accounts = _accounts(ctx)
    await accounts.get_user(user_id)
    return Revoked(revoked=await accounts.revoke_sessions(user_id=user_id, session_id=None))


class RevokeAll(msgspec.Struct, forbid_unknown_fields=True):
    confirm: Annotated[
        Literal[True], msgspec.Meta(description="Must be true: this logs every user out.")
    ]


@route(
    "POST",
    "/v1/sessions/revoke-all",
    'Revoke every session of every user (body {"confirm": true})',
    response=Revoked,
    body=RevokeAll,
    tag="sessions",
    errors=(
        _UNAVAILABLE,
        (400, "confirm is missing or not true (invalid_request, error.field $.confirm)."),
    ),
)
async def revoke_all_sessions(ctx: AdminContext, query: None, body: RevokeAll) -> Revoked:
    accounts = _accounts(ctx)
    return Revoked(revoked=await accounts.revoke_sessions(user_id=None, session_id=None))


# -- the auth audit log ------------------------------------------------------------------------


class AuthAuditQuery(msgspec.Struct, forbid_unknown_fields=True):
    limit: Limit = 50
    before_id: Cursor | None = None
    user_id: (
        Annotated[int, msgspec.Meta(ge=1, le=MAX_INT, description="Only this user's events.")]
        | None
    ) = None
    event: (
        Annotated[
            str,
            msgspec.Meta(min_length=1, max_length=64, description="Only this event, e.g. login."),
        ]
        | None
    ) = None
    since: (
        Annotated[
            int,
            msgspec.Meta(
                ge=0, le=MAX_INT, description="Only events at or after this unix millisecond."
            ),
        ]
        | None
    ) = None


class AuthAuditPage(msgspec.Struct):
    events: list[AuditEvent]
    next_before_id: int | None


@route(
    "GET",
    "/v1/auth-audit",
    "The authentication audit log, newest first (personal data: audit-logged)",
    response=AuthAuditPage,
    query=AuthAuditQuery,
    tag="audit",
    errors=(_UNAVAILABLE,),
)
async def list_auth_audit(ctx: AdminContext, query: AuthAuditQuery, body: None) -> AuthAuditPage:
    events = await _accounts(ctx).audit_page(
        limit=query.limit,
        before_id=query.before_id,
        user_id=query.user_id,
        event=query.event,
        since=query.since,
    )
    more = len(events) == query.limit
    return AuthAuditPage(events=events, next_before_id=events[-1].id if more else None)
