"""Wire frames of consent (docs/PROTOCOL.md, section 8.15).

An admin sets the current version of the terms of service and of the privacy
notice. A session whose user has not accepted a current version is *gated*:
``session`` (or ``tokens``) lists the documents in ``consent_required``, and
the server refuses every request but the few in :data:`GATE_OPEN_FRAMES`
with the error code ``consent_required`` until the user accepts them with
``consent_accept``. When the admin sets a new version, or the user revokes
an acceptance, live sessions are told with a pushed ``consent_required``.
These frames are announced by ``consent`` in ``hello.features``.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

from chatd.protocol import frames as f
from chatd.protocol.frames import ConsentDocument, Frame, RequestId

#: The documents a user may be asked to accept.
ConsentKind = Literal["terms", "privacy"]
KINDS: Final = ("terms", "privacy")
#: A version label chosen by the admin, e.g. ``2026-12`` or ``v3``.
Version = Annotated[
    str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
]

# -- client -> server ---------------------------------------------------------------


class ConsentAccept(Frame, tag="consent_accept"):
    """Accept this version of a document. It must be the current one (else
    ``consent_version_mismatch``). Answered by ``ok``; once nothing is left
    to accept, the session works again."""

    id: RequestId
    kind: ConsentKind
    version: Version


class ConsentRevoke(Frame, tag="consent_revoke"):
    """Withdraw your acceptance of a document. Answered by ``ok``; the session
    is then gated again (a ``consent_required`` push follows) until you accept."""

    id: RequestId
    kind: ConsentKind


class ConsentStatus(Frame, tag="consent_status"):
    """The current documents and which of them you still have to accept.
    Answered by ``consent``. Allowed while gated."""

    id: RequestId


# -- server -> client ---------------------------------------------------------------


class Consent(Frame, tag="consent"):
    """Answer to ``consent_status``: every current document, and the kinds
    this user has not accepted in their current version."""

    id: str
    documents: list[ConsentDocument]
    required: list[str]


class ConsentRequired(Frame, tag="consent_required"):
    """Pushed when what a live session must accept changes: an admin set a new
    version, or the user revoked an acceptance (``documents`` lists what to
    accept; requests are refused from now on), or the user accepted on
    another connection (``documents`` is empty: the gate is lifted)."""

    documents: list[ConsentDocument]


#: Frames a gated session may still send (with ping and bye): the consent
#: frames, ending or refreshing the session, acknowledging what it was
#: already delivered, and looking after its own sessions and password.
GATE_OPEN_FRAMES: Final = (
    ConsentAccept,
    ConsentRevoke,
    ConsentStatus,
    f.Refresh,
    f.Logout,
    f.Ack,
    f.ListSessions,
    f.RevokeSessions,
    f.ChangePassword,
)
