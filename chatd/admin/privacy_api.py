"""Admin API routes for privacy: account export, erasure, erasure receipts.

* ``GET /v1/users/{user_id}/export`` streams the account export
  (:mod:`chatd.privacy.export`) as ``application/zip``: chunked, a page of
  rows at a time, never the whole export in memory.
* ``DELETE /v1/users/{user_id}`` is step one of an erasure (disable, revoke,
  schedule the purge); ``POST /v1/users/{user_id}/erasure/cancel`` cancels
  it during the grace period.
* ``GET /v1/erasure-receipts`` lists the signed receipts the purge issued;
  ``GET /v1/server-key`` gives the public key they verify with.

All need the admin token and are audit-logged (the export and the receipts
are reads of personal data).
"""

from __future__ import annotations

from typing import Final

import msgspec
from quart import Response

from chatd.admin.api import AdminContext, ApiError, Cursor, Limit, route
from chatd.privacy.erasure import Erasure, ErasureState, ReceiptEntry
from chatd.privacy.export import ExportNotFound, stream_export

_UNAVAILABLE: Final = (503, "Erasure is not running (service_unavailable).")
_NO_USER: Final = (404, "No user with this id (not_found).")


def _erasure(ctx: AdminContext) -> Erasure:
    if ctx.erasure is None:
        raise ApiError(503, "service_unavailable", "erasure is not running on this server")
    return ctx.erasure


@route(
    "GET",
    "/v1/users/{user_id}/export",
    "Everything the server holds about an account, as a ZIP of JSON files with "
    "manifest.json, streamed (personal data: audit-logged)",
    response=bytes,
    media_type="application/zip",
    tag="privacy",
    errors=(_NO_USER,),
)
async def export_user(ctx: AdminContext, query: None, body: None, *, user_id: int) -> Response:
    try:
        chunks = await stream_export(ctx.store, user_id, server=ctx.server_name)
    except ExportNotFound:
        raise ApiError(404, "not_found", "no such user") from None
    if ctx.accounts is not None:
        from chatd.auth.accounts import ADMIN_PEER

        await ctx.accounts.auth.audit("admin_export_user", "ok", ADMIN_PEER, user_id=user_id)
    response = Response(chunks, content_type="application/zip")
    response.headers["Content-Disposition"] = f'attachment; filename="chatd-export-{user_id}.zip"'
    response.headers["Cache-Control"] = "no-store"
    response.timeout = None  # a large export may take longer than Quart's default
    return response


@route(
    "DELETE",
    "/v1/users/{user_id}",
    "Erase an account: disabled and logged out at once, purged with everything about "
    "it after privacy.erasure_grace_days (the purge issues a signed receipt)",
    response=ErasureState,
    tag="privacy",
    errors=(_UNAVAILABLE, _NO_USER),
)
async def erase_user(ctx: AdminContext, query: None, body: None, *, user_id: int) -> ErasureState:
    return await _erasure(ctx).request(user_id)


@route(
    "POST",
    "/v1/users/{user_id}/erasure/cancel",
    "Cancel a pending erasure during its grace period (the account stays disabled)",
    response=ErasureState,
    tag="privacy",
    errors=(
        _UNAVAILABLE,
        _NO_USER,
        (409, "No erasure of this account is pending (erasure_not_pending)."),
    ),
)
async def cancel_erasure(
    ctx: AdminContext, query: None, body: None, *, user_id: int
) -> ErasureState:
    return await _erasure(ctx).cancel(user_id)


class ReceiptsQuery(msgspec.Struct, forbid_unknown_fields=True):
    limit: Limit = 50
    before_id: Cursor | None = None


class ReceiptsPage(msgspec.Struct):
    """Signed erasure receipts, newest first; each verifies with GET /v1/server-key."""

    receipts: list[ReceiptEntry]
    next_before_id: int | None


@route(
    "GET",
    "/v1/erasure-receipts",
    "Signed erasure receipts, newest first",
    response=ReceiptsPage,
    query=ReceiptsQuery,
    tag="privacy",
    errors=(_UNAVAILABLE,),
)
async def list_erasure_receipts(
    ctx: AdminContext, query: ReceiptsQuery, body: None
) -> ReceiptsPage:
    receipts = await _erasure(ctx).receipts(limit=query.limit, before_id=query.before_id)
    more = len(receipts) == query.limit
    return ReceiptsPage(receipts=receipts, next_before_id=receipts[-1].id if more else None)


class ServerKey(msgspec.Struct):
    """The Ed25519 public key erasure receipts are signed with."""

    algorithm: str
    public_key: str  # base64, 32 bytes


@route(
    "GET",
    "/v1/server-key",
    "The server's Ed25519 public key, which erasure receipts verify with",
    response=ServerKey,
    tag="privacy",
    audit=False,
    errors=(_UNAVAILABLE,),
)
async def server_key(ctx: AdminContext, query: None, body: None) -> ServerKey:
    return ServerKey(algorithm="ed25519", public_key=_erasure(ctx).signer.public_key)
