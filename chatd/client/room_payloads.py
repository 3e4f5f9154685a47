"""The wire encodings of rooms' end-to-end encrypted payloads (no I/O).

* room ciphertext (``room_send.ciphertext``): ``{"v":1,"session_id":...,"body":...}``,
  ``body`` being the Megolm message in standard base64 without padding. The
  session id is visible to the server, as the sender device already is; it
  tells the receiver which key to use.
* plaintext inside Megolm: ``{"v":1,"kind":"text","room_id":...,"text":...,"mentions":[...]}``.
  The receiver checks ``room_id`` against the envelope's.
* inside Olm (framed by :func:`chatd.client.crypto.encode_control`):
  ``room_key`` ``{room_id, session_id, session_key, first_index}`` and
  ``room_key_request`` ``{room_id, session_id}``.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import vodozemac

from .attachments import Attachment
from .errors import DecryptionError, RoomMismatchError

PAYLOAD_VERSION: Final = 1
MAX_MENTIONS: Final = 1000  # user ids in one message's mentions (rooms.max_members)
MAX_ID_CHARS: Final = 128  # a session id is 43 characters; anything longer is garbage


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


@dataclass(frozen=True)
class RoomKey:
    """A ``room_key`` payload: session ``session_id`` of ``room_id`` from ``first_index``."""

    room_id: int
    session_id: str
    session_key: str
    first_index: int

    def fields(self) -> dict[str, Any]:
        return {
            "kind": "room_key",
            "room_id": self.room_id,
            "session_id": self.session_id,
            "session_key": self.session_key,
            "first_index": self.first_index,
        }

    @classmethod
    def parse(cls, fields: dict[str, Any]) -> RoomKey:
        """From a decrypted Olm payload. Raises DecryptionError."""
        room_id, session_id = _room_and_session(fields)
        key, index = fields.get("session_key"), fields.get("first_index")
        if not isinstance(key, str) or not key:
            raise DecryptionError("malformed room_key: no session_key")
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise DecryptionError("malformed room_key: first_index")
        return cls(room_id, session_id, key, index)


@dataclass(frozen=True)
class RoomKeyRequest:
    """A ``room_key_request`` payload: the sender is asked to share a session again."""

    room_id: int
    session_id: str

    def fields(self) -> dict[str, Any]:
        return {"kind": "room_key_request", "room_id": self.room_id, "session_id": self.session_id}

    @classmethod
    def parse(cls, fields: dict[str, Any]) -> RoomKeyRequest:
        return cls(*_room_and_session(fields))


def _room_and_session(fields: dict[str, Any]) -> tuple[int, str]:
    room_id, session_id = fields.get("room_id"), fields.get("session_id")
    if not isinstance(room_id, int) or isinstance(room_id, bool) or room_id < 1:
        raise DecryptionError(f"malformed {fields.get('kind')}: room_id")
    if not isinstance(session_id, str) or not 0 < len(session_id) <= MAX_ID_CHARS:
        raise DecryptionError(f"malformed {fields.get('kind')}: session_id")
    return room_id, session_id


@dataclass(frozen=True)
class RoomText:
    text: str
    mentions: tuple[int, ...]
    attachment: Attachment | None = None  # a file the message carries


def encode_room_text(
    room_id: int,
    text: str,
    mentions: Iterable[int] = (),
    *,
    attachment: Attachment | None = None,
) -> bytes:
    payload: dict[str, Any] = {
        "v": PAYLOAD_VERSION,
        "kind": "text",
        "room_id": room_id,
        "text": text,
        "mentions": sorted(set(mentions)),
    }
    if attachment is not None:
        payload["attachment"] = attachment.fields()
    return json.dumps(payload, ensure_ascii=False).encode()


def decode_room_text(plaintext: bytes, room_id: int) -> RoomText:
    """Parse the plaintext of a room message and check it belongs to ``room_id``.
    Raises RoomMismatchError when it names another room, DecryptionError for
    anything else (also for kinds other than ``text``)."""
    try:
        obj = json.loads(plaintext)
        if not isinstance(obj, dict) or obj.get("v") != PAYLOAD_VERSION:
            raise ValueError("unsupported payload version")
        if obj.get("kind") != "text":
            raise ValueError(f"unsupported room payload kind {str(obj.get('kind'))[:32]!r}")
        text, mentions = obj["text"], obj.get("mentions", [])
        if not isinstance(text, str) or not isinstance(mentions, list):
            raise ValueError("text or mentions of the wrong type")
        if len(mentions) > MAX_MENTIONS or not all(
            isinstance(m, int) and not isinstance(m, bool) for m in mentions
        ):
            raise ValueError("mentions must be at most 1000 user ids")
        claimed = obj["room_id"]
        raw_attachment = obj.get("attachment")
    except (ValueError, KeyError, TypeError) as exc:
        raise DecryptionError(f"malformed room payload: {exc}") from None
    if claimed != room_id:
        raise RoomMismatchError("the payload's room id differs from the envelope's")
    attachment = None if raw_attachment is None else Attachment.parse(raw_attachment)
    return RoomText(text, tuple(mentions), attachment)


def encode_room_ciphertext(session_id: str, message: vodozemac.MegolmMessage) -> str:
    body = _b64(message.to_bytes())
    return json.dumps({"v": PAYLOAD_VERSION, "session_id": session_id, "body": body})


def decode_room_ciphertext(ciphertext: str) -> tuple[str, vodozemac.MegolmMessage]:
    """``(session id, Megolm message)`` of a room envelope. Raises DecryptionError."""
    try:
        obj = json.loads(ciphertext)
        session_id, body = obj["session_id"], obj["body"]
        if obj.get("v") != PAYLOAD_VERSION or not isinstance(session_id, str):
            raise ValueError("unsupported room ciphertext version")
        if not 0 < len(session_id) <= MAX_ID_CHARS:
            raise ValueError("bad session id")
        return session_id, vodozemac.MegolmMessage.from_bytes(_unb64(body))
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise DecryptionError(f"malformed room ciphertext: {exc}") from None


def room_ciphertext_session(ciphertext: str) -> str:
    """The session id a room ciphertext names. Raises DecryptionError."""
    return decode_room_ciphertext(ciphertext)[0]
