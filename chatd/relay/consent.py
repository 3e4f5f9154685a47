"""Consent on the relay: each session's gate, and the consent frames.

Every connection with a session knows which version of each document its user
accepts (``Connection.accepted``, read when the session starts) and, in its
protocol core, the kinds still to accept (``consent_pending``: the core then
refuses every request but the few the gate leaves open, in O(1)). Both change
only here, on the event loop, without a read:

* a session starts (:func:`gate`): ``session`` or ``tokens`` lists what to
  accept, and the session's key count and deliveries wait until it has;
* an admin sets a version (:func:`recheck`, from the registry's
  ``consent_changed``): every live session that has not accepted it is told
  with a pushed ``consent_required`` and is gated from its next request
  (deliveries already under way go on, and may be acknowledged);
* the user accepts or revokes on one connection
  (:func:`serve_consent_request`): all their connections follow; one whose
  gate this lifts hears an empty ``consent_required``, and the dispatcher's
  ``lifted`` starts its deliveries.

A refusal is a :class:`~chatd.consent.ConsentError`, which the dispatcher
turns into an ``error`` frame naming the field.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from chatd.auth.models import SessionGrant
from chatd.consent import ConsentService, Document
from chatd.protocol import consent as c
from chatd.protocol import core
from chatd.protocol import frames as f
from chatd.relay.connection import Connection

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from chatd.relay.registry import Registry

ConsentRequest = c.ConsentAccept | c.ConsentRevoke | c.ConsentStatus
CONSENT_REQUESTS = (c.ConsentAccept, c.ConsentRevoke, c.ConsentStatus)


def gate(conn: Connection, consent: ConsentService, accepted: dict[str, str]) -> None:
    """A session started on ``conn`` and its user accepts ``accepted`` (kind
    -> version): gate it on the current documents it has not accepted."""
    conn.accepted = accepted
    conn.proto.consent_pending = frozenset(d.kind for d in consent.pending(accepted))


def recheck(conn: Connection, current: Mapping[str, Document]) -> bool:
    """Gate ``conn`` on the current documents its user has not accepted;
    True if that changed what it must accept."""
    kinds = frozenset(k for k, d in current.items() if conn.accepted.get(k) != d.version)
    if kinds == conn.proto.consent_pending:
        return False
    conn.proto.consent_pending = kinds
    return True


def documents(conn: Connection, current: Mapping[str, Document]) -> list[f.ConsentDocument]:
    """What ``conn`` must accept, as the protocol lists it (by kind)."""
    return [current[k].wire() for k in sorted(conn.proto.consent_pending) if k in current]


def _follow(
    registry: Registry,
    consent: ConsentService,
    origin: Connection,
    user_id: int,
    kind: str,
    version: str | None,
    lifted: Callable[[Connection], None],
) -> None:
    """Every connection of ``user_id`` now accepts ``version`` of ``kind``
    (None: nothing of it); tell those other than ``origin`` what changed."""
    for conn in list(registry.by_user.get(user_id, ())):
        if version is None:
            conn.accepted.pop(kind, None)
        else:
            conn.accepted[kind] = version
        was_gated = bool(conn.proto.consent_pending)
        if not recheck(conn, consent.current) or conn is origin:
            continue
        conn.push_frame(c.ConsentRequired(documents=documents(conn, consent.current)))
        if was_gated and not conn.proto.consent_pending:
            lifted(conn)


async def serve_consent_request(
    consent: ConsentService,
    registry: Registry,
    conn: Connection,
    grant: SessionGrant,
    frame: ConsentRequest,
    lifted: Callable[[Connection], None],
) -> list[core.Action]:
    """Show, accept or revoke; the answer (for ``consent_revoke``, with the
    ``consent_required`` that gates this connection again). Raises
    ConsentError (nothing recorded). ``lifted`` is called for the user's
    other connections whose gate this lifts."""
    proto = conn.proto
    match frame:
        case c.ConsentStatus():
            return proto.reply(
                c.Consent(
                    id=frame.id,
                    documents=[d.wire() for _, d in sorted(consent.current.items())],
                    required=sorted(proto.consent_pending),
                )
            )
        case c.ConsentAccept():
            consent.check_current(frame.kind, frame.version)
            if conn.accepted.get(frame.kind) != frame.version:  # else: already on record
                await consent.record(
                    grant.user_id,
                    frame.kind,
                    frame.version,
                    "accepted",
                    session_id=grant.session_id,
                    device_id=grant.device_id,
                )
            _follow(registry, consent, conn, grant.user_id, frame.kind, frame.version, lifted)
            return proto.reply(f.Ok(id=frame.id))
        case c.ConsentRevoke():
            document = consent.check_current(frame.kind)
            await consent.record(
                grant.user_id,
                frame.kind,
                conn.accepted.get(frame.kind, document.version),
                "revoked",
                session_id=grant.session_id,
                device_id=grant.device_id,
            )
            _follow(registry, consent, conn, grant.user_id, frame.kind, None, lifted)
            gated = c.ConsentRequired(documents=documents(conn, consent.current))
            return proto.reply(f.Ok(id=frame.id)) + proto.reply(gated)
