"""Consent: the server's terms and privacy notice, accepted before anything else.

When the operator has set a version of the terms or the privacy notice that
the user has not accepted, the server gates the session (docs/PROTOCOL.md
§8.15): it names the documents in the login answer, and refuses every other
request with ``consent_required`` until they are accepted. The connection
keeps what the server last said (``Connection.consent_required``), from the
login answer and from pushed ``consent_required`` frames.

:func:`chatd.client.open_client` calls its ``accept_consent`` callback with
the documents before the client starts; the callback shows them and returns
whether the user accepts them all. The running client offers
``client.consent_required``, ``client.consent_status()``,
``client.accept_consent(kind, version)`` and ``client.revoke_consent(kind)``,
and puts a :class:`ConsentRequired` in ``client.activity()`` when the server
asks again (a new version, or a revocation on another device).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import trio

from .connection import Connection
from .errors import ClientError, LoginError

LOGOUT_GRACE: Final = 2.0  # seconds


@dataclass(frozen=True)
class ConsentDocument:
    """One document to accept: its kind (``terms`` or ``privacy``), the
    current version, and where to read it (``url``) when the server says."""

    kind: str
    version: str
    url: str | None = None
    title: str | None = None

    @staticmethod
    def from_wire(fields: dict[str, Any]) -> ConsentDocument:
        return ConsentDocument(
            str(fields["kind"]), str(fields["version"]), fields.get("url"), fields.get("title")
        )


@dataclass(frozen=True)
class ConsentRequired:
    """Pushed: what this session must accept changed. Empty ``documents``:
    nothing is left (accepted on another device); else requests are refused
    until they are accepted."""

    documents: tuple[ConsentDocument, ...]


@dataclass(frozen=True)
class ConsentStatus:
    """Every current document on the server, and the kinds still to accept."""

    documents: list[ConsentDocument]
    required: list[str]


#: What ``open_client`` calls when the server asks the user to accept
#: documents before the session may be used: show them, and return True if
#: the user accepts them all (the library then accepts each), False if not.
AcceptConsent = Callable[[list[ConsentDocument]], Awaitable[bool]]


def required_documents(conn: Connection) -> list[ConsentDocument]:
    """What the server last said this session must accept."""
    return [ConsentDocument.from_wire(d) for d in conn.consent_required]


async def accept(conn: Connection, kind: str, version: str) -> None:
    """Accept ``version`` of ``kind``. Raises ServerRefusedError
    (``consent_version_mismatch``: not the current version; ``consent_not_set``)."""
    if "consent" not in conn.features:
        raise ClientError("this server does not ask for consent")
    await conn.request("consent_accept", kind=kind, version=version)
    conn.consent_required = [d for d in conn.consent_required if d.get("kind") != kind]


async def revoke(conn: Connection, kind: str) -> None:
    """Withdraw the acceptance of ``kind``: the session is refused everything
    but consent until it is accepted again."""
    if "consent" not in conn.features:
        raise ClientError("this server does not ask for consent")
    await conn.request("consent_revoke", kind=kind)


async def status(conn: Connection) -> ConsentStatus:
    """The current documents and the kinds still to accept (also while gated)."""
    if "consent" not in conn.features:
        return ConsentStatus([], [])
    reply = await conn.request("consent_status")
    documents = [ConsentDocument.from_wire(d) for d in reply["documents"]]
    return ConsentStatus(documents, [str(k) for k in reply["required"]])


async def consent_at_login(conn: Connection, prompt: AcceptConsent | None) -> None:
    """The session is gated: ask ``prompt`` and accept every document, or
    raise LoginError ``consent_required`` (the session is logged out, so it
    does not linger unusable; the next run logs in and asks again)."""
    documents = required_documents(conn)
    if prompt is not None and await prompt(documents):
        for document in documents:
            await accept(conn, document.kind, document.version)
        if not conn.consent_required:
            return
    with trio.move_on_after(LOGOUT_GRACE) as cleanup, contextlib.suppress(ClientError):
        cleanup.shield = True
        await conn.logout()
    raise LoginError(
        "consent_required",
        "the server's terms were not accepted: it serves nobody who has not accepted them",
    )
