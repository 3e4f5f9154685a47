"""Room cryptography without I/O: Megolm sessions, the rules for when a room
gets a new one and who may have it, and the wire encodings of room payloads.

Theory of operation
-------------------
A room message is encrypted once, with the sending device's *outbound Megolm
session* for that room (vodozemac ``GroupSession``): a ratchet that moves one
step per message. A key exported at step ``i`` opens messages ``i``, ``i+1``,
... and none before. Each device that may read the room holds the matching
*inbound session* (``InboundGroupSession``), keyed by (room, sender user,
sender device, session id).

* **Sharing.** The sender gives its session to member devices in a
  ``room_key`` payload carried by Olm (the to-device channel of
  :mod:`chatd.client.crypto`), exported at the ratchet's current index, so a
  device that joins later cannot read what was sent before it. The sender
  keeps an inbound copy of its own session from index 0: it exports from any
  index with it, answers key requests, and shares history keys.
* **Trust.** A ``room_key`` is taken only as a session *of the device whose
  Olm channel carried it*; sessions are never forwarded. The inbound session
  is stored with that device's Curve25519 and Ed25519 keys, and a room message
  is decrypted only with a session of the device the envelope names. Of two
  copies of one session the one that starts earlier is kept.
* **Rotation** (:meth:`OutboundSession.rotation_reason`): a new outbound
  session on the room's first message, when a device it was shared with is no
  longer a member device (a member left or was removed, a device went away or
  changed keys), and after ``rotation_messages`` messages or
  ``rotation_seconds``, whichever comes first. A new member device just gets
  the current session from its current index.
* **Key requests** (:func:`reshare_index`): the sender re-shares a session
  with a device only if it is a member device now, and it was given that
  session before (then from the index it was given) or the room has
  ``share_history`` on (then from the first index the sender knows).

The wire encodings of room payloads are in :mod:`chatd.client.room_payloads`.

Nothing here imports trio or sqlite. Callers persist :meth:`MegolmMachine.take_dirty`
after every operation that changed state, before any ciphertext it made
leaves the device.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, NamedTuple

import vodozemac

from .errors import ClientError, DecryptionError
from .room_payloads import RoomKey, decode_room_ciphertext, encode_room_ciphertext

ROTATION_MESSAGES: Final = 100  # messages per outbound session, at most
ROTATION_SECONDS: Final = 7 * 24 * 3600.0  # age of an outbound session, at most
KEY_WAIT_SECONDS: Final = 10.0  # a held message waits this long for its key


@dataclass(frozen=True)
class RoomSettings:
    """The client's room-key policy (``open_client`` keyword arguments)."""

    rotation_messages: int = ROTATION_MESSAGES
    rotation_seconds: float = ROTATION_SECONDS
    key_wait_seconds: float = KEY_WAIT_SECONDS

    def __post_init__(self) -> None:
        if self.rotation_messages < 1:
            raise ClientError("rotation_messages must be at least 1")
        if not self.rotation_seconds > 0:
            raise ClientError("rotation_seconds must be more than 0")
        if not self.key_wait_seconds >= 0:
            raise ClientError("key_wait_seconds must be 0 or more")


class MemberDevice(NamedTuple):
    """A device with its identity keys, as ``room_members`` and the directory list it."""

    user_id: int
    device_id: str
    curve25519: str
    ed25519: str


class Share(NamedTuple):
    """An outbound session given to one device: its Curve25519 key then, and from which index."""

    curve25519: str
    first_index: int


#: (room id, sender user id, sender device id, session id)
InboundKey = tuple[int, int, str, str]


# -- sessions -----------------------------------------------------------------


class OutboundSession:
    """This device's current Megolm session for one room, and who has it."""

    def __init__(
        self,
        room_id: int,
        session: vodozemac.GroupSession,
        created_at: int,
        messages: int = 0,
        shared: dict[tuple[int, str], Share] | None = None,
    ) -> None:
        self.room_id = room_id
        self.session = session
        self.created_at = created_at  # unix ms
        self.messages = messages  # messages encrypted with it
        #: (user id, device id) -> how it was given to that device
        self.shared: dict[tuple[int, str], Share] = dict(shared or {})

    @property
    def session_id(self) -> str:
        return self.session.session_id

    @property
    def index(self) -> int:
        """The index of the next message: what a device given the session now can read from."""
        return self.session.message_index

    def rotation_reason(
        self, members: Iterable[MemberDevice], settings: RoomSettings, now_ms: int
    ) -> str | None:
        """Why this session must not encrypt another message, or None.
        ``members``: the room's member devices now (ours included or not)."""
        if self.messages >= settings.rotation_messages:
            return "messages"
        if now_ms - self.created_at >= settings.rotation_seconds * 1000:
            return "age"
        current = {(d.user_id, d.device_id): d.curve25519 for d in members}
        for device, share in self.shared.items():
            if current.get(device) != share.curve25519:
                return "device_gone"
        return None

    def unshared(self, members: Iterable[MemberDevice]) -> list[MemberDevice]:
        """Member devices that do not have this session (with their current keys)."""
        return [
            d
            for d in members
            if (share := self.shared.get((d.user_id, d.device_id))) is None
            or share.curve25519 != d.curve25519
        ]


class InboundSession:
    """A Megolm session some device (maybe this one) sends a room's messages with."""

    def __init__(
        self, room_id: int, sender: MemberDevice, session: vodozemac.InboundGroupSession
    ) -> None:
        self.room_id = room_id
        self.sender = sender
        self.session = session

    @property
    def key(self) -> InboundKey:
        return (self.room_id, self.sender.user_id, self.sender.device_id, self.session.session_id)

    @property
    def first_index(self) -> int:
        return self.session.first_known_index

    def export(self, index: int | None = None) -> RoomKey:
        """A ``room_key`` for this session from ``index`` (default: the first known)."""
        at = self.first_index if index is None else max(index, self.first_index)
        exported = self.session.export_at(at)
        if exported is None:  # pragma: no cover - vodozemac exports any index from the first known
            raise ClientError(f"cannot export session {self.session.session_id} at {at}")
        return RoomKey(self.room_id, self.session.session_id, exported.to_base64(), at)


class RoomDecrypted(NamedTuple):
    plaintext: bytes
    session_id: str
    message_index: int  # the same session and index twice is a replay


class KeyMissing(NamedTuple):
    """No session to decrypt with (yet): hold the message until its key comes."""

    session_id: str


def reshare_index(
    share: Share | None,
    requester: MemberDevice,
    *,
    member_device: bool,
    share_history: bool,
    first_known: int,
) -> int | None:
    """From which index to give a session to ``requester`` on its key request, or None.

    Only a member device gets anything. One the session was shared with gets
    it again from the index it had (the same device keys only); with
    ``share_history`` any member device gets it from ``first_known``."""
    if not member_device:
        return None
    if share is not None and share.curve25519 == requester.curve25519:
        return share.first_index
    if share_history:
        return first_known
    return None


# -- the machine --------------------------------------------------------------


class MegolmMachine:
    """One device's Megolm sessions, all rooms. Not thread-safe; no I/O."""

    def __init__(self, key: bytes, own: MemberDevice) -> None:
        self._key = key
        self.own = own
        self.outbound: dict[int, OutboundSession] = {}
        self.inbound: dict[InboundKey, InboundSession] = {}
        self._dirty_outbound: set[int] = set()
        self._dirty_inbound: set[InboundKey] = set()

    # -- persistence ----------------------------------------------------------

    @classmethod
    def restore(
        cls,
        key: bytes,
        own: MemberDevice,
        outbound: Iterable[tuple[int, str, int, int, dict[tuple[int, str], Share]]],
        inbound: Iterable[tuple[int, MemberDevice, str]],
    ) -> MegolmMachine:
        """From stored rows: outbound (room id, pickle, created_at, messages,
        shares) and inbound (room id, sender, pickle)."""
        machine = cls(key, own)
        for room_id, pickled, created_at, messages, shared in outbound:
            session = vodozemac.GroupSession.from_pickle(pickled, key)
            machine.outbound[room_id] = OutboundSession(
                room_id, session, created_at, messages, shared
            )
        for room_id, sender, pickled in inbound:
            restored = InboundSession(
                room_id, sender, vodozemac.InboundGroupSession.from_pickle(pickled, key)
            )
            machine.inbound[restored.key] = restored
        return machine

    def take_dirty(self) -> tuple[list[OutboundRow], list[InboundRow]]:
        """Changed sessions, pickled, to persist (then forgotten as changed)."""
        outbound = [
            OutboundRow(
                o.room_id, o.session_id, o.session.pickle(self._key), o.created_at, o.messages
            )
            for room_id in sorted(self._dirty_outbound)
            if (o := self.outbound.get(room_id)) is not None
        ]
        inbound = [
            InboundRow(
                i.room_id,
                i.sender,
                i.session.session_id,
                i.first_index,
                i.session.pickle(self._key),
            )
            for key in sorted(self._dirty_inbound)
            if (i := self.inbound.get(key)) is not None
        ]
        self._dirty_outbound.clear()
        self._dirty_inbound.clear()
        return outbound, inbound

    # -- sending --------------------------------------------------------------

    def outbound_for(
        self, room_id: int, members: Iterable[MemberDevice], settings: RoomSettings, now_ms: int
    ) -> tuple[OutboundSession, str | None]:
        """The session to encrypt the room's next message with, and why it is new
        (``first``, ``messages``, ``age``, ``device_gone``), or None if it is not."""
        current = self.outbound.get(room_id)
        reason = "first" if current is None else current.rotation_reason(members, settings, now_ms)
        if current is not None and reason is None:
            return current, None
        session = vodozemac.GroupSession()
        fresh = OutboundSession(room_id, session, now_ms)
        own_copy = InboundSession(
            room_id, self.own, vodozemac.InboundGroupSession(session.session_key)
        )
        self.outbound[room_id] = fresh
        self.inbound[own_copy.key] = own_copy
        self._dirty_outbound.add(room_id)
        self._dirty_inbound.add(own_copy.key)
        return fresh, reason

    def current_key(self, room_id: int) -> RoomKey:
        """The room's outbound session, exported at its current index."""
        outbound = self.outbound[room_id]
        return self.own_session(room_id, outbound.session_id).export(outbound.index)

    def own_session(self, room_id: int, session_id: str) -> InboundSession:
        return self.inbound[(room_id, self.own.user_id, self.own.device_id, session_id)]

    def own_sessions(self, room_id: int) -> list[InboundSession]:
        """Every session this device has sent the room's messages with."""
        return [
            s
            for (room, user, device, _), s in self.inbound.items()
            if (room, user, device) == (room_id, self.own.user_id, self.own.device_id)
        ]

    def mark_shared(
        self, room_id: int, session_id: str, devices: Iterable[MemberDevice], first_index: int
    ) -> None:
        """Remember that the room's current session went to ``devices`` (after the send)."""
        outbound = self.outbound.get(room_id)
        if outbound is None or outbound.session_id != session_id:
            return  # rotated meanwhile: the old session's shares live in the store only
        for d in devices:
            old = outbound.shared.get((d.user_id, d.device_id))
            if old is None or old.curve25519 != d.curve25519 or old.first_index > first_index:
                outbound.shared[(d.user_id, d.device_id)] = Share(d.curve25519, first_index)

    def encrypt(self, room_id: int, plaintext: bytes) -> str:
        """Encrypt with the room's outbound session (one must exist); advances it."""
        outbound = self.outbound[room_id]
        message = outbound.session.encrypt(plaintext)
        outbound.messages += 1
        self._dirty_outbound.add(room_id)
        return encode_room_ciphertext(outbound.session_id, message)

    def discard_outbound(self, room_id: int) -> None:
        """Forget the room's outbound session (we left): the next one is new."""
        self.outbound.pop(room_id, None)
        self._dirty_outbound.discard(room_id)

    # -- receiving ------------------------------------------------------------

    def add_room_key(self, sender: MemberDevice, key: RoomKey) -> bool:
        """Take a session from the device whose Olm channel carried ``key``.
        True when it is new or starts earlier than the copy we had (then it
        replaces it); False when we had it already from as early. Raises
        DecryptionError for a key that does not match what it claims."""
        try:
            session = vodozemac.InboundGroupSession.import_session(
                vodozemac.ExportedSessionKey(key.session_key)
            )
        except ValueError as exc:
            raise DecryptionError(f"malformed room_key session_key: {exc}") from None
        if session.session_id != key.session_id or session.first_known_index != key.first_index:
            raise DecryptionError("the room_key's session id or first index does not match its key")
        incoming = InboundSession(key.room_id, sender, session)
        old = self.inbound.get(incoming.key)
        if old is not None and (
            (old.sender.curve25519, old.sender.ed25519) != (sender.curve25519, sender.ed25519)
        ):
            raise DecryptionError("a room_key for a session another device key holds")
        if old is not None and old.first_index <= incoming.first_index:
            return False
        self.inbound[incoming.key] = incoming
        self._dirty_inbound.add(incoming.key)
        return True

    def decrypt(
        self, room_id: int, sender_user_id: int, sender_device_id: str, ciphertext: str
    ) -> RoomDecrypted | KeyMissing:
        """Decrypt a room message from the device the envelope names. Returns
        KeyMissing when that device's session is not here (or starts too late).
        Raises DecryptionError for a malformed or forged message."""
        session_id, message = decode_room_ciphertext(ciphertext)
        inbound = self.inbound.get((room_id, sender_user_id, sender_device_id, session_id))
        if inbound is None or message.message_index() < inbound.first_index:
            return KeyMissing(session_id)
        try:
            decrypted = inbound.session.decrypt(message)
        except ValueError as exc:
            raise DecryptionError(f"the room message does not decrypt: {exc}") from None
        self._dirty_inbound.add(inbound.key)
        return RoomDecrypted(decrypted.plaintext, session_id, decrypted.message_index)


class OutboundRow(NamedTuple):
    room_id: int
    session_id: str
    pickle: str
    created_at: int
    messages: int


class InboundRow(NamedTuple):
    room_id: int
    sender: MemberDevice
    session_id: str
    first_index: int
    pickle: str
