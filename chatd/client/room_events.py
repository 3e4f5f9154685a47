"""What the client hands the application about rooms (``Client.room_events()``).

Each is a frozen dataclass; the channel carries them in delivery order:

* :class:`RoomMessage`: a room message, decrypted and stored. ``late`` when it
  was held for its key first (it may come after later messages).
* :class:`RoomUndecryptable`: a room message that cannot be decrypted: show
  it as "cannot decrypt, ask the sender to resend". ``cause`` says why:
  ``key_missing`` (its key did not come within ``key_wait_seconds``; a
  ``room_key_request`` went to the sending device, and if a key still comes
  the same message arrives as a :class:`RoomMessage` with ``late``), or one
  that no key will change: ``bad_ciphertext`` (malformed, or it does not
  decrypt with the sending device's session: damaged or forged),
  ``wrong_room`` (its plaintext names another room than the envelope),
  ``replay`` (its Megolm session and index were used by another message).
* :class:`RoomUpdate`: a room event the server made (someone joined, left,
  was removed, a role or the topic changed, a member's devices changed, the
  room was created or deleted), and the room's epoch after it.
* :class:`RoomInvitation`: someone invited us (a live push; ``list_rooms``
  shows invitations made while we were offline).
* :class:`RoomDeliveryChanged`: a receipt changed how far one of our room
  messages got (its counts or its state), once the message is ``sent``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from .attachments import Attachment
from .room_delivery import RoomDelivery
from .room_store import RoomInfo

CANNOT_DECRYPT: Final = "cannot decrypt, ask the sender to resend"

# Why a room message cannot be decrypted (RoomUndecryptable.cause).
KEY_MISSING: Final = "key_missing"  # its key has not come (yet): a key request went out
BAD_CIPHERTEXT: Final = "bad_ciphertext"  # malformed, or does not decrypt: damaged or forged
WRONG_ROOM: Final = "wrong_room"  # the plaintext names another room than the envelope
REPLAY: Final = "replay"  # its Megolm session and index were another message's


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
    """A room message stored without text: show ``reason`` in its room, from
    its sender. ``cause``: KEY_MISSING, BAD_CIPHERTEXT, WRONG_ROOM or REPLAY."""

    room_id: int
    message_id: str
    sender_user_id: int
    sender_device_id: str
    sent_at: int
    reason: str = CANNOT_DECRYPT
    cause: str = KEY_MISSING

    @property
    def may_decrypt_later(self) -> bool:
        """Only a message whose key is missing can still decrypt (when it comes)."""
        return self.cause == KEY_MISSING


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


@dataclass(frozen=True)
class RoomDeliveryChanged:
    """One of our room messages got further: ``delivery`` is its new count
    ("delivered to ``delivery.delivered`` of ``delivery.members``") and
    state (``delivery.state``: ``sent``, or the final ``delivered`` or
    ``expired``). Comes only for a message whose ``send`` returned: read
    :meth:`Rooms.delivery` then for how far it got up to that point."""

    room_id: int
    message_id: str
    delivery: RoomDelivery


RoomEventItem = RoomMessage | RoomUndecryptable | RoomUpdate | RoomInvitation | RoomDeliveryChanged
