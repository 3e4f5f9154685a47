"""Admin API routes for consent: the current documents, and a user's records.

``PUT /v1/consent`` makes a version of the terms or the privacy notice the
current one: every live session whose user has not accepted it is told and
gated at once (:mod:`chatd.relay.consent`). ``GET /v1/consent`` lists the
current versions, and ``GET /v1/users/{user_id}/consent`` one user's
acceptances and revocations (personal data). Like every admin route, each
call is written to the admin audit log. Without a consent service
(``AdminContext.consent``) these routes answer 503 ``service_unavailable``.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec

from chatd.admin.api import AdminContext, ApiError, route
from chatd.consent import ConsentRecord, ConsentService, Document
from chatd.protocol.consent import ConsentKind, Version

_UNAVAILABLE: Final = (503, "Consent is not running on this server (service_unavailable).")

Url = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=2048,
        pattern=r"^https?://[^\s]+$",
        description="Where users read this version (http or https).",
    ),
]
Title = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


def _consent(ctx: AdminContext) -> ConsentService:
    if ctx.consent is None:
        raise ApiError(503, "service_unavailable", "consent is not running on this server")
    return ctx.consent


class ConsentDocumentInfo(msgspec.Struct):
    """One version of a document, as set by an admin."""

    kind: str
    version: str
    url: str | None
    title: str | None
    set_at: int  # unix ms


def _info(document: Document) -> ConsentDocumentInfo:
    return ConsentDocumentInfo(
        document.kind, document.version, document.url, document.title, document.set_at
    )


class ConsentDocuments(msgspec.Struct):
    """The current version of each kind that has one, by kind. No documents:
    nobody is asked to accept anything."""

    documents: list[ConsentDocumentInfo]


@route(
    "GET",
    "/v1/consent",
    "The current versions of the terms and the privacy notice",
    response=ConsentDocuments,
    tag="consent",
    errors=(_UNAVAILABLE,),
)
async def show_consent(ctx: AdminContext, query: None, body: None) -> ConsentDocuments:
    current = _consent(ctx).current
    return ConsentDocuments(documents=[_info(d) for _, d in sorted(current.items())])


class NewConsentVersion(msgspec.Struct, forbid_unknown_fields=True):
    kind: Annotated[ConsentKind, msgspec.Meta(description="terms or privacy")]
    version: Annotated[Version, msgspec.Meta(description="A label such as 2026-12 or v3.")]
    url: Url | None = None
    title: Title | None = None


@route(
    "PUT",
    "/v1/consent",
    "Set the current version of a document; users must accept it before they continue",
    response=ConsentDocumentInfo,
    body=NewConsentVersion,
    tag="consent",
    errors=(_UNAVAILABLE,),
)
async def set_consent(
    ctx: AdminContext, query: None, body: NewConsentVersion
) -> ConsentDocumentInfo:
    document = await _consent(ctx).set_document(
        body.kind, body.version, url=body.url, title=body.title
    )
    return _info(document)


class UserConsent(msgspec.Struct):
    """A user's consent records, oldest first, and the kinds whose current
    version they have not accepted (they are asked at their next request)."""

    user_id: int
    records: list[ConsentRecord]
    required: list[str]


@route(
    "GET",
    "/v1/users/{user_id}/consent",
    "A user's consent records (personal data: audit-logged)",
    response=UserConsent,
    tag="consent",
    errors=(_UNAVAILABLE, (404, "No user with this id (not_found).")),
)
async def show_user_consent(
    ctx: AdminContext, query: None, body: None, *, user_id: int
) -> UserConsent:
    consent = _consent(ctx)
    if ctx.accounts is not None:
        await ctx.accounts.get_user(user_id)  # 404 not_found for no such user
    records = await consent.records(user_id)
    required = [d.kind for d in consent.pending(await consent.accepted(user_id))]
    return UserConsent(user_id=user_id, records=records, required=required)
