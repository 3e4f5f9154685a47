"""The client's cryptography, without I/O: an Olm account, its Olm channels,
and the wire encodings of what the server relays but cannot read.

Theory of operation
-------------------
A device owns one vodozemac ``Account`` (its Ed25519 and Curve25519 identity
keys, plus one-time and fallback keys) and one or more *Olm channels* per peer
device, keyed by the peer's Curve25519 identity key. An Olm channel is our name
for a pairwise vodozemac ``Session`` (the double ratchet between two devices);
in chatd "session" means only a login session.

* **Publishing keys.** Every key object is signed with the account's Ed25519 key
  over its canonical JSON (``chatd.e2ee.signing.canonical_json``: the object
  without ``signature``, keys sorted, no whitespace, UTF-8). The identity object
  is ``{curve25519, device_id, ed25519, user_id}``; a one-time key object is
  ``{curve25519, device_id, key_id}``; the fallback key adds ``"fallback": true``.
* **Sending.** For a peer device without a channel the sender claims one of its
  one-time keys, checks the claim's signature against the peer's Ed25519 key
  from the directory, and opens an outbound channel. Each message is then
  encrypted once per device.
* **Receiving.** A pre-key message (type 0) either matches an existing channel
  or opens an inbound channel (which uses up one of our one-time keys); a
  normal message (type 1) is tried against the sender device's channels, most
  recently used first.

* **Fallback key.** When a pre-key message opens a new inbound channel,
  :meth:`OlmMachine.decrypt` reports which of our one-time keys it used (read
  from the message and checked against the new channel's id), so the client
  can tell when its published fallback key was used and replace it.

The *ciphertext* string inside an envelope is the JSON object
``{"v":1,"type":0|1,"body":"<standard base64, unpadded>"}`` of the Olm message.
The *plaintext* inside Olm is the JSON object
``{"v":1,"kind":"text","message_id":...,"to_user_id":...,"text":...}``, or a
device verification payload (``"kind":"verify_..."``, see
:mod:`chatd.client.sas`); the ``message_id`` must equal the envelope's, so the
server cannot relabel a message.

Nothing here imports trio or sqlite. Callers persist :meth:`OlmMachine.pickles`
after every operation that changed state (see :mod:`chatd.client.client`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import vodozemac

from chatd.e2ee.signing import canonical_json, verify

from .errors import DecryptionError, IdentityChangedError, KeyClaimError
from .store import DeviceRecord

PAYLOAD_VERSION: Final = 1
#: One-time keys a device tries to keep on the server (vodozemac's recommended
#: maximum); ``open_client(one_time_keys=...)`` changes it. It uploads more when
#: fewer than half are left unclaimed, or when the server asks.
ONE_TIME_KEY_TARGET: Final = 50


def fingerprint(ed25519: str) -> str:
    """A device's fingerprint for people to compare: its Ed25519 key (unpadded
    base64, as on the wire) as upper-case hex in groups of four, 16 groups."""
    raw = base64.b64decode(ed25519 + "=" * (-len(ed25519) % 4))
    text = raw.hex().upper()
    return " ".join(text[i : i + 4] for i in range(0, len(text), 4))


def pickle_key(store_key: bytes) -> bytes:
    """The 32-byte key vodozemac pickles are sealed with, derived from the store key."""
    return hashlib.blake2b(store_key, digest_size=32, person=b"chatd-olm-pickle").digest()


def encode_ciphertext(message: vodozemac.AnyOlmMessage) -> str:
    message_type, body = message.to_parts()
    encoded = base64.b64encode(body).decode().rstrip("=")
    return json.dumps({"v": PAYLOAD_VERSION, "type": message_type, "body": encoded})


def decode_ciphertext(ciphertext: str) -> tuple[int, bytes]:
    """``(type, body)`` of an envelope's ciphertext. Raises DecryptionError."""
    try:
        obj = json.loads(ciphertext)
        message_type, body = obj["type"], obj["body"]
        if obj.get("v") != PAYLOAD_VERSION or message_type not in (0, 1):
            raise ValueError("unsupported ciphertext version or type")
        return message_type, base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise DecryptionError(f"malformed ciphertext: {exc}") from None


def encode_payload(
    message_id: str, to_user_id: int, text: str, *, attachment: dict[str, Any] | None = None
) -> bytes:
    payload: dict[str, Any] = {
        "v": PAYLOAD_VERSION,
        "kind": "text",
        "message_id": message_id,
        "to_user_id": to_user_id,
        "text": text,
    }
    if attachment is not None:
        payload["attachment"] = attachment  # chatd.client.attachments.Attachment.fields()
    return json.dumps(payload, ensure_ascii=False).encode()


def encode_control(message_id: str, to_user_id: int, fields: dict[str, Any]) -> bytes:
    """A payload that is not a chat message (``fields["kind"]``, e.g. ``verify_start``)."""
    payload = {**fields, "v": PAYLOAD_VERSION, "message_id": message_id, "to_user_id": to_user_id}
    return json.dumps(payload, ensure_ascii=False).encode()


@dataclass(frozen=True)
class Payload:
    message_id: str
    to_user_id: int
    text: str  # "" unless kind is "text"
    kind: str = "text"
    fields: dict[str, Any] = field(default_factory=dict)  # the whole object


def decode_payload(plaintext: bytes, message_id: str) -> Payload:
    """Parse a decrypted payload and check it belongs to envelope ``message_id``.
    Kinds other than ``text`` come back with their JSON object in ``fields``."""
    try:
        obj = json.loads(plaintext)
        if not isinstance(obj, dict) or obj.get("v") != PAYLOAD_VERSION:
            raise ValueError("unsupported payload version")
        kind = obj.get("kind")
        if not isinstance(kind, str):
            raise ValueError("no payload kind")
        text = str(obj["text"]) if kind == "text" else ""
        payload = Payload(str(obj["message_id"]), int(obj["to_user_id"]), text, kind, obj)
    except (ValueError, KeyError, TypeError) as exc:
        raise DecryptionError(f"malformed payload: {exc}") from None
    if payload.message_id != message_id:
        raise DecryptionError("the payload's message id differs from the envelope's")
    return payload


class Decrypted(NamedTuple):
    plaintext: bytes
    #: Our one-time (or fallback) key that a pre-key message used to open a new
    #: inbound channel; None when an existing channel decrypted it.
    one_time_key: str | None


def pre_key_one_time_key(body: bytes, channel_id: str) -> str | None:
    """The one-time key an Olm pre-key message names, or None if it cannot be read.

    The message is a version byte (3) and then protobuf fields, each
    length-delimited: 0x0A one-time key, 0x12 base key, 0x1A identity key,
    0x22 the inner message (vodozemac's ``PreKeyMessage`` doc). vodozemac's
    Python binding does not expose the one-time key, so it is read here and
    trusted only if the three keys give ``channel_id`` (vodozemac's
    ``Session.session_id``): SHA-256(identity key || base key || one-time key).
    """
    if not body or body[0] != 3:
        return None
    fields: dict[int, bytes] = {}
    i = 1
    while i < len(body):
        tag, i = body[i], i + 1
        length = shift = 0
        while True:
            if i >= len(body) or shift > 28:
                return None
            byte, i = body[i], i + 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        if tag & 0x07 != 2 or i + length > len(body):
            return None  # only length-delimited fields belong here
        fields[tag] = body[i : i + length]
        i += length
    keys = [fields.get(tag) for tag in (0x1A, 0x12, 0x0A)]
    if any(key is None or len(key) != 32 for key in keys):
        return None
    digest = hashlib.sha256(b"".join(k for k in keys if k is not None)).digest()
    if base64.b64encode(digest).decode().rstrip("=") != channel_id.rstrip("="):
        return None
    return base64.b64encode(fields[0x0A]).decode().rstrip("=")


def device_keys_object(
    user_id: int, device_id: str, ed25519: str, curve25519: str
) -> dict[str, Any]:
    return {
        "curve25519": curve25519,
        "device_id": device_id,
        "ed25519": ed25519,
        "user_id": user_id,
    }


def verify_device_keys(user_id: int, device: dict[str, Any]) -> bool:
    """True when a directory device's identity keys carry its own valid signature."""
    ed, curve, sig = device.get("ed25519"), device.get("curve25519"), device.get("signature")
    if not (isinstance(ed, str) and isinstance(curve, str) and isinstance(sig, str)):
        return False
    return verify(ed, device_keys_object(user_id, device["device_id"], ed, curve), sig)


def checked_devices(
    user_id: int,
    listed: list[dict[str, Any]],
    known: dict[tuple[int, str], DeviceRecord],
    own: tuple[int, str],
) -> list[DeviceRecord]:
    """One user's devices as the server listed them (``directory`` or
    ``room_members``): those whose keys carry their own valid signature, as
    records; one not in ``known`` is unverified (but ``own``, this device).
    Raises IdentityChangedError if a known device shows new identity keys."""
    records = []
    for d in listed:
        if d.get("ed25519") is None or not verify_device_keys(user_id, d):
            continue
        old = known.get((user_id, d["device_id"]))
        if old is not None and (old.ed25519, old.curve25519) != (d["ed25519"], d["curve25519"]):
            raise IdentityChangedError(
                f"device {d['device_id']} of user {user_id} shows new identity keys;"
                " refusing to use it (verify the device again)"
            )
        mine = (user_id, d["device_id"]) == own
        records.append(
            DeviceRecord(
                user_id,
                d["device_id"],
                d["name"],
                d["ed25519"],
                d["curve25519"],
                verified=old.verified if old else mine,
                current=True,
            )
        )
    return records


class OlmMachine:
    """One device's account and Olm channels. Not thread-safe; no I/O."""

    def __init__(self, account: vodozemac.Account, key: bytes) -> None:
        self.account = account
        self._key = key
        #: peer device Curve25519 key -> channels, most recently used first
        self.channels: dict[str, list[vodozemac.Session]] = {}
        #: channels changed since the last :meth:`take_dirty`
        self._dirty: dict[str, tuple[str, vodozemac.Session]] = {}

    @classmethod
    def restore(
        cls, account_pickle: str | None, channel_rows: list[tuple[str, str]], key: bytes
    ) -> OlmMachine:
        """From pickles (``channel_rows``: (peer curve25519, pickle), most recent first)."""
        account = (
            vodozemac.Account.from_pickle(account_pickle, key)
            if account_pickle
            else vodozemac.Account()
        )
        machine = cls(account, key)
        for curve, pickled in channel_rows:
            channel = vodozemac.Session.from_pickle(pickled, key)
            machine.channels.setdefault(curve, []).append(channel)
        return machine

    @property
    def ed25519(self) -> str:
        return self.account.ed25519_key.to_base64()

    @property
    def curve25519(self) -> str:
        return self.account.curve25519_key.to_base64()

    def account_pickle(self) -> str:
        return self.account.pickle(self._key)

    def take_dirty(self) -> list[tuple[str, str, str]]:
        """Changed channels as (channel id, peer curve25519, pickle), to persist."""
        rows = [(sid, curve, s.pickle(self._key)) for sid, (curve, s) in self._dirty.items()]
        self._dirty.clear()
        return rows

    def _touch(self, curve: str, channel: vodozemac.Session) -> None:
        channels = self.channels.setdefault(curve, [])
        if channel in channels:
            channels.remove(channel)
        channels.insert(0, channel)
        self._dirty[channel.session_id] = (curve, channel)

    # -- keys -----------------------------------------------------------------

    def _sign(self, obj: dict[str, Any]) -> str:
        return self.account.sign(canonical_json(obj)).to_base64()

    def device_keys(self, user_id: int, device_id: str) -> dict[str, Any]:
        obj = device_keys_object(user_id, device_id, self.ed25519, self.curve25519)
        return {
            "ed25519": self.ed25519,
            "curve25519": self.curve25519,
            "signature": self._sign(obj),
        }

    def new_one_time_keys(self, device_id: str, count: int) -> list[dict[str, Any]]:
        """``count`` signed one-time keys to upload: first any that were made
        earlier but never published (an upload that failed), then new ones.
        Call :meth:`mark_published` once the server has accepted them."""
        have = len(self.account.one_time_keys)
        if count > have:
            self.account.generate_one_time_keys(count - have)
        keys = []
        for key_id, key in list(self.account.one_time_keys.items())[:count]:
            curve = key.to_base64()
            obj = {"curve25519": curve, "device_id": device_id, "key_id": key_id}
            keys.append({"key_id": key_id, "curve25519": curve, "signature": self._sign(obj)})
        return keys

    def new_fallback_key(self, device_id: str) -> dict[str, Any]:
        """A signed fallback key to upload. A key made earlier but never published
        is reused rather than replaced: vodozemac keeps only the current and the
        previous fallback key, and the previous one must stay the key the server
        handed out, so that channels peers opened with it still work. Call
        :meth:`mark_published` once the server has accepted it."""
        # The stubs of vodozemac 0.10 lack the fallback-key methods the binding has.
        fallback: dict[str, vodozemac.Curve25519PublicKey] = self.account.fallback_key  # type: ignore[attr-defined]
        if not fallback:
            self.account.generate_fallback_key()  # type: ignore[attr-defined]
            fallback = self.account.fallback_key  # type: ignore[attr-defined]
        [(key_id, key)] = fallback.items()
        curve = key.to_base64()
        obj = {"curve25519": curve, "device_id": device_id, "fallback": True, "key_id": key_id}
        return {"key_id": key_id, "curve25519": curve, "signature": self._sign(obj)}

    def mark_published(self) -> None:
        """The server accepted the keys from :meth:`new_one_time_keys` and
        :meth:`new_fallback_key`: vodozemac stops offering them as new."""
        self.account.mark_keys_as_published()

    # -- channels -------------------------------------------------------------

    def has_channel(self, curve25519: str) -> bool:
        return bool(self.channels.get(curve25519))

    def open_channel(
        self, peer_ed25519: str, peer_curve25519: str, claimed: dict[str, Any]
    ) -> None:
        """Open an outbound channel from a claimed one-time (or fallback) key,
        after checking the claim is signed by the peer device. Raises KeyClaimError."""
        obj = {
            "curve25519": claimed["curve25519"],
            "device_id": claimed["device_id"],
            "key_id": claimed["key_id"],
        }
        if claimed.get("fallback"):
            obj["fallback"] = True
        if not verify(peer_ed25519, obj, claimed["signature"]):
            raise KeyClaimError(
                f"the claimed key of device {claimed['device_id']} is not signed by that device"
            )
        channel = self.account.create_outbound_session(
            vodozemac.Curve25519PublicKey.from_base64(peer_curve25519),
            vodozemac.Curve25519PublicKey.from_base64(claimed["curve25519"]),
        )
        self._touch(peer_curve25519, channel)

    def encrypt(self, peer_curve25519: str, plaintext: bytes) -> str:
        """Encrypt with the peer's most recently used channel (one must exist)."""
        channel = self.channels[peer_curve25519][0]
        message = channel.encrypt(plaintext)
        self._touch(peer_curve25519, channel)
        return encode_ciphertext(message)

    def decrypt(self, peer_curve25519: str, ciphertext: str) -> Decrypted:
        """Decrypt a message from the device with this Curve25519 key. A pre-key
        message may open a channel (and use up a one-time key: persist the
        account too; ``one_time_key`` then names the key). Raises DecryptionError."""
        message_type, body = decode_ciphertext(ciphertext)
        try:
            message = vodozemac.AnyOlmMessage.from_parts(message_type, body)
        except ValueError as exc:
            raise DecryptionError(f"malformed Olm message: {exc}") from None
        channels = self.channels.get(peer_curve25519, [])
        pre_key = message.to_pre_key() if message_type == 0 else None
        for channel in list(channels):
            if pre_key is not None and not channel.session_matches(pre_key):
                continue
            try:
                plaintext = channel.decrypt(message)
            except ValueError:
                continue
            self._touch(peer_curve25519, channel)
            return Decrypted(plaintext, None)
        if pre_key is None:
            raise DecryptionError("no Olm channel with this device can decrypt the message")
        try:
            channel, plaintext = self.account.create_inbound_session(
                vodozemac.Curve25519PublicKey.from_base64(peer_curve25519), pre_key
            )
        except ValueError as exc:
            raise DecryptionError(f"cannot open an Olm channel from this message: {exc}") from None
        self._touch(peer_curve25519, channel)
        return Decrypted(plaintext, pre_key_one_time_key(body, channel.session_id))
