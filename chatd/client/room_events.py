"""What the client hands the application about rooms (``Client.room_events()``).

Each is a frozen dataclass; the channel carries them in delivery order:

* :class:`RoomMessage`: a room message, decrypted and stored. ``late`` when it
  was held for its key first (it may come after later messages).
* :class:`RoomUndecryptable`: a room message whose key did not come within
  ``key_wait_seconds``: show it as "cannot decrypt, ask the sender to
  resend". A ``room_key_request`` went to the sending device; if a key still
  comes, the same message arrives as a :class:`RoomMessage` with ``late``.
* :class:`RoomUpdate`: a room event the server made (someone joined, left,
  was removed, a role or the topic changed, a member's devices changed, the
  room was created or deleted), and the room's epoch after it.
* :class:`RoomInvitation`: someone invited us (a live push; ``list_rooms``
  shows invitations made while we were offline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from .attachments import Attachment
from .room_store import RoomInfo

CANNOT_DECRYPT: Final = "cannot decrypt, ask the sender to resend"


@dataclass(frozen=True)
class RoomMessage:
    room_id: int
    message_id: str
    sender_user_id: int
    sender_device_id: str
    text: str
    mentions: tuple[int, ...]  # user ids the message mentions (``@alice``)
    sent_at: int  # unix ms, as the server recorded it
    sender_verified: bool = False  # the sending device was verified when it arrived
    outgoing: bool = False  # sent by another of our own devices
    late: bool = False  # held until its key came
    attachment: Attachment | None = None  # a file it carries (save it with save_file)


@dataclass(frozen=True)
class RoomUndecryptable:
    room_id: int
    message_id: str
    sender_user_id: int
    sender_device_id: str
    sent_at: int
    reason: str = CANNOT_DECRYPT


@dataclass(frozen=True)
class RoomUpdate:
    """A ``room_event``: ``type`` is ``created``, ``joined``, ``invited``,
    ``invite_revoked``, ``declined``, ``left``, ``removed``, ``role``,
    ``topic``, ``devices``, ``deleted``, or a type this client does not know."""

    room_id: int
    message_id: str
    type: str
    epoch: int
    sent_at: int
    user_id: int | None = None
    by_user_id: int | None = None
    role: str | None = None
    topic: str | None = None
    name: str | None = None

    @classmethod
    def from_envelope(cls, env: dict[str, Any]) -> RoomUpdate:
        event = env["event"]

        def opt(name: str, kind: type) -> Any:
            value = event.get(name)
            return value if isinstance(value, kind) and not isinstance(value, bool) else None

        return cls(
            int(env["room_id"]),
            str(env["message_id"]),
            str(event.get("type", "")),
            int(event.get("epoch", 0)),
            int(env.get("sent_at", 0)),
            opt("user_id", int),
            opt("by_user_id", int),
            opt("role", str),
            opt("topic", str),
            opt("name", str),
        )


@dataclass(frozen=True)
class RoomInvitation:
    room: RoomInfo
    by_user_id: int | None


RoomEventItem = RoomMessage | RoomUndecryptable | RoomUpdate | RoomInvitation
