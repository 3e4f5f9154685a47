"""Wire frames of the client protocol, version 1 (see docs/PROTOCOL.md).

Every frame is one WebSocket *text* message holding one JSON object whose
``type`` field names the frame. Frames are strict msgspec structs: decoding
rejects unknown fields, wrong types and out-of-range values, and reports the
JSON path of the offending field.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec

PROTOCOL_VERSION: Final = 1

#: Longest client-chosen request id, in characters.
MAX_ID_CHARS: Final = 64

RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]


class Frame(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, tag_field="type"):
    """Base of every frame; ``type`` is the tag."""


# -- client -> server ---------------------------------------------------------


class Ping(Frame, tag="ping"):
    """Keeps the connection alive; answered by ``pong`` with the same id."""

    id: RequestId | None = None


class Bye(Frame, tag="bye"):
    """The client is leaving; the server closes with 1000."""


#: Every frame a client may send. Decoding a union makes ``type`` mandatory.
ClientFrame = Ping | Bye


# -- server -> client ---------------------------------------------------------


class Limits(msgspec.Struct, forbid_unknown_fields=True):
    """The limits a client must respect, announced in ``hello``."""

    max_frame_bytes: int
    handshake_timeout_seconds: float  # also the deadline for the first frame after hello
    idle_timeout_seconds: float
    send_queue_frames: int
    max_bad_frames: int


class Hello(Frame, tag="hello"):
    protocol: int
    server: str
    limits: Limits


class Pong(Frame, tag="pong"):
    id: str | None = None


class Error(Frame, tag="error"):
    """A request could not be served. ``field`` is a JSON path like ``$.id``."""

    code: str
    message: str
    field: str | None = None
    id: str | None = None


ServerFrame = Hello | Pong | Error
