"""Wire frames of push endpoints (docs/PROTOCOL.md, section 8.14).

A device registers where the server may send it *wake-ups* while it has no
live connection: a UnifiedPush endpoint URL (as a self-hosted ntfy serves),
optionally with its RFC 8291 Web Push key pair, to which each wake-up's body
is then encrypted. A wake-up carries no sender, no room and no content: only
an opaque id. These frames are announced by ``push`` in ``hello.features``.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec

from chatd.protocol.frames import Frame, RequestId

#: Longest endpoint URL, in characters (ntfy's are under 100).
MAX_URL_CHARS: Final = 2_048

PushUrl = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_URL_CHARS)]
#: Base64url (RFC 4648 §5, padding optional) of an uncompressed P-256 point (65 bytes).
P256dh = Annotated[
    str, msgspec.Meta(min_length=87, max_length=88, pattern=r"^[A-Za-z0-9_-]{87}=?$")
]
#: Base64url of the 16-byte authentication secret.
AuthSecret = Annotated[
    str, msgspec.Meta(min_length=22, max_length=24, pattern=r"^[A-Za-z0-9_-]{22}(==)?$")
]


class PushRegister(Frame, tag="push_register"):
    """Send this device's wake-ups to ``url`` from now on (replacing an earlier
    endpoint). With ``p256dh`` and ``auth`` (both or neither), each wake-up's
    body is encrypted to them (RFC 8291 ``aes128gcm``). Answered by ``ok``."""

    id: RequestId
    url: PushUrl
    p256dh: P256dh | None = None
    auth: AuthSecret | None = None


class PushRemove(Frame, tag="push_remove"):
    """Send this device no more wake-ups. Answered by ``ok`` (also with none registered)."""

    id: RequestId
