"""Consent: the current terms and privacy notice, and who accepted which version.

Theory of operation
-------------------
An admin sets the current version of each document kind (``terms``,
``privacy``) with ``PUT /v1/consent``; every version ever set stays in
``consent_documents`` and the newest row of a kind is its current version.
The service keeps the current versions in memory (:attr:`ConsentService.current`),
read once at start, so checking a session costs no read.

Each user's acceptances and revocations are appended to ``consent_records``
(never updated: a trigger refuses it), with the time, the version, and the
session and device that sent them. What a user has accepted *now* is, per
kind, the version of their newest record if that record is an acceptance.

A session must accept every current version it has not accepted before it
may do anything else (the gate, enforced per frame by the protocol core;
:mod:`chatd.relay.consent` keeps it up to date). Setting a version tells the
``events`` sink (the relay's registry), which re-checks every live session
at once. With no version set (the default), nothing is gated and no read is
made at login.

Errors are :class:`ConsentError`, a refused request whose code and message go
to the client (or the admin) as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

import msgspec

from chatd.errors import RefusedError
from chatd.protocol.consent import KINDS
from chatd.protocol.frames import ConsentDocument
from chatd.store import Store, now_ms

ERR_NOT_SET: Final = "consent_not_set"  # no version of this kind is set
ERR_VERSION_MISMATCH: Final = "consent_version_mismatch"  # not the current version


class ConsentError(RefusedError):
    """A refused consent request: ``code``, ``message`` and the ``field`` at fault."""

    def __init__(self, code: str, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


@dataclass(frozen=True, slots=True)
class Document:
    """One version of a document, as the admin set it."""

    kind: str
    version: str
    url: str | None
    title: str | None
    set_at: int  # unix ms

    def wire(self) -> ConsentDocument:
        return ConsentDocument(kind=self.kind, version=self.version, url=self.url, title=self.title)


class ConsentRecord(msgspec.Struct, frozen=True):
    """One acceptance or revocation by a user."""

    id: int
    kind: str
    version: str
    action: str  # accepted | revoked
    at: int  # unix ms
    session_id: int | None
    device_id: str | None


class ConsentEvents(Protocol):
    """Hears that the current versions changed (the relay's registry). Called
    on the event loop; it must only record and push, never block."""

    def consent_changed(self, current: Mapping[str, Document]) -> None: ...


def _newest_documents(conn: Any) -> dict[str, Document]:
    rows = conn.execute(
        "SELECT kind, version, url, title, set_at FROM consent_documents"
        " WHERE id IN (SELECT max(id) FROM consent_documents GROUP BY kind)"
    ).fetchall()
    return {row[0]: Document(*row) for row in rows}


class ConsentService:
    """The current documents and the users' consent records. One per daemon."""

    def __init__(self, store: Store, events: ConsentEvents | None = None) -> None:
        self.store = store
        self.events = events
        self.current: dict[str, Document] = {}

    async def open(self) -> None:
        """Read the current versions (once, at start)."""
        self.current = await self.store.read(_newest_documents)

    # -- what a user must accept -----------------------------------------------------

    async def accepted(self, user_id: int) -> dict[str, str]:
        """The version of each kind this user accepts now (no read while no
        version is set)."""
        if not self.current:
            return {}

        def read(conn: Any) -> dict[str, str]:
            rows = conn.execute(
                "SELECT kind, version, action FROM consent_records WHERE id IN"
                " (SELECT max(id) FROM consent_records WHERE user_id = ? GROUP BY kind)",
                (user_id,),
            ).fetchall()
            return {kind: version for kind, version, action in rows if action == "accepted"}

        return dict(await self.store.read(read))

    def pending(self, accepted: Mapping[str, str]) -> list[Document]:
        """The current documents not accepted in ``accepted`` (kind -> version), by kind."""
        return [d for kind, d in sorted(self.current.items()) if accepted.get(kind) != d.version]

    def wire(self, kinds: frozenset[str]) -> list[ConsentDocument]:
        """The current documents of these kinds, as the protocol shows them."""
        return [d.wire() for kind, d in sorted(self.current.items()) if kind in kinds]

    # -- requests from users -----------------------------------------------------------

    def check_current(self, kind: str, version: str | None = None) -> Document:
        """The current document of ``kind``; ConsentError if none is set, or if
        ``version`` is given and is not the current one."""
        document = self.current.get(kind)
        if document is None:
            raise ConsentError(
                ERR_NOT_SET, f"no version of the {kind} is set on this server", field="$.kind"
            )
        if version is not None and version != document.version:
            raise ConsentError(
                ERR_VERSION_MISMATCH,
                f"version {version} of the {kind} is not the current one; read version"
                f" {document.version} and accept that",
                field="$.version",
            )
        return document

    async def record(
        self,
        user_id: int,
        kind: str,
        version: str,
        action: str,
        *,
        session_id: int | None,
        device_id: str | None,
    ) -> None:
        """Append one acceptance or revocation; returns once it is durable."""
        row = (user_id, kind, version, action, now_ms(), session_id, device_id or None)
        await self.store.write(
            lambda conn: conn.execute(
                "INSERT INTO consent_records (user_id, kind, version, action, at, session_id,"
                " device_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                row,
            )
        )

    # -- administration ----------------------------------------------------------------

    async def set_document(
        self, kind: str, version: str, *, url: str | None, title: str | None
    ) -> Document:
        """Make ``version`` the current one of ``kind`` (a new row, even for a
        version set before); live sessions that have not accepted it are gated
        from their next request."""
        if kind not in KINDS:  # pragma: no cover - the API's schema allows only KINDS
            raise ConsentError("invalid_request", f"unknown kind {kind}", field="$.kind")
        document = Document(kind, version, url, title, now_ms())
        await self.store.write(
            lambda conn: conn.execute(
                "INSERT INTO consent_documents (kind, version, url, title, set_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (kind, version, url, title, document.set_at),
            )
        )
        self.current = {**self.current, kind: document}
        if self.events is not None:
            self.events.consent_changed(self.current)
        return document

    async def records(self, user_id: int) -> list[ConsentRecord]:
        """Every consent record of a user, oldest first."""

        def read(conn: Any) -> list[ConsentRecord]:
            rows = conn.execute(
                "SELECT id, kind, version, action, at, session_id, device_id"
                " FROM consent_records WHERE user_id = ? ORDER BY id",
                (user_id,),
            ).fetchall()
            return [ConsentRecord(*row) for row in rows]

        return await self.store.read(read)
