"""Interactive device verification (SAS), without I/O: the state machine, the
info strings, and the emoji table.

Theory of operation
-------------------
Two devices that can already send each other Olm messages check that each has
the other's real Ed25519 identity key, by letting their people compare a short
authentication string (SAS): seven emoji or three four-digit numbers. The
cryptography is vodozemac's ``Sas``: an ephemeral X25519 exchange, HKDF-SHA256
for the SAS bytes and HKDF + HMAC-SHA256 for the MACs. This module only
decides what is sent when, and what must hold before a device is marked
verified. Every payload travels Olm-encrypted through the normal ``send`` path
(see :mod:`chatd.client.verification`)::

    starter S                                          responder R
    verify_start  {commitment = C(K_S, txn)}    ──▶
                                                ◀──    verify_accept {key: K_R}
    verify_key    {key: K_S}                    ──▶    R checks the commitment
    both: SAS = Sas.diffie_hellman(other key).bytes(sas_info(...)); people compare
    after "they match", each side:
    verify_mac    {mac: MAC(own Ed25519, mac_info(own → other))}  ◀──▶
    once our MAC is sent and theirs verified:
    verify_done   {}                            ◀──▶
    verify_cancel {code, reason} ends it at any step, from either side.

A device is marked verified only when all three hold: our person confirmed
(our MAC went out), the other device's MAC verified against the Ed25519 key we
have for it from the directory, and its ``verify_done`` arrived (so it
verified our MAC too). A MAC that does not verify cancels the verification on
both sides: nothing is marked.

The commitment ``C`` is there because the SAS is short (42 bits of emoji): the
starter fixes its key before it sees the responder's, and the responder sends
its key before it sees the starter's, so a man in the middle cannot search for
a key pair that gives both victims the same emoji.

Strings, exactly (``|`` separated, user ids in decimal, keys in unpadded
standard base64 as vodozemac prints them; device ids are base32 and
transaction ids match ``[A-Za-z0-9-]{1,64}``, so no field can hold ``|``):

* commitment: unpadded base64 of SHA-256 over UTF-8 ``K_S|txn``.
* sas_info: ``CHATD_SAS_V1|{S user}|{S device}|{K_S}|{R user}|{R device}|{K_R}|{txn}``.
* mac_info: ``CHATD_SAS_MAC_V1|{sender user}|{sender device}|{receiver user}|``
  ``{receiver device}|{txn}`` (one string); the MAC input is the sender's own
  Ed25519 identity key.

Nothing here imports trio or sqlite.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Any, Final

import vodozemac

from .errors import VerificationError

#: The Matrix SAS emoji table (index → emoji, English name); vodozemac gives indices.
SAS_EMOJI: Final[tuple[tuple[str, str], ...]] = (
    ("🐶", "Dog"),
    ("🐱", "Cat"),
    ("🦁", "Lion"),
    ("🐎", "Horse"),
    ("🦄", "Unicorn"),
    ("🐷", "Pig"),
    ("🐘", "Elephant"),
    ("🐰", "Rabbit"),
    ("🐼", "Panda"),
    ("🐓", "Rooster"),
    ("🐧", "Penguin"),
    ("🐢", "Turtle"),
    ("🐟", "Fish"),
    ("🐙", "Octopus"),
    ("🦋", "Butterfly"),
    ("🌷", "Flower"),
    ("🌳", "Tree"),
    ("🌵", "Cactus"),
    ("🍄", "Mushroom"),
    ("🌏", "Globe"),
    ("🌙", "Moon"),
    ("\u2601\ufe0f", "Cloud"),
    ("🔥", "Fire"),
    ("🍌", "Banana"),
    ("🍎", "Apple"),
    ("🍓", "Strawberry"),
    ("🌽", "Corn"),
    ("🍕", "Pizza"),
    ("🎂", "Cake"),
    ("\u2764\ufe0f", "Heart"),
    ("😀", "Smiley"),
    ("🤖", "Robot"),
    ("🎩", "Hat"),
    ("👓", "Glasses"),
    ("🔧", "Spanner"),
    ("🎅", "Santa"),
    ("👍", "Thumbs Up"),
    ("\u2602\ufe0f", "Umbrella"),
    ("⌛", "Hourglass"),
    ("⏰", "Clock"),
    ("🎁", "Gift"),
    ("💡", "Light Bulb"),
    ("📕", "Book"),
    ("\u270f\ufe0f", "Pencil"),
    ("📎", "Paperclip"),
    ("\u2702\ufe0f", "Scissors"),
    ("🔒", "Lock"),
    ("🔑", "Key"),
    ("🔨", "Hammer"),
    ("\u260e\ufe0f", "Telephone"),
    ("🏁", "Flag"),
    ("🚂", "Train"),
    ("🚲", "Bicycle"),
    ("\u2708\ufe0f", "Aeroplane"),
    ("🚀", "Rocket"),
    ("🏆", "Trophy"),
    ("⚽", "Ball"),
    ("🎸", "Guitar"),
    ("🎺", "Trumpet"),
    ("🔔", "Bell"),
    ("⚓", "Anchor"),
    ("🎧", "Headphones"),
    ("📁", "Folder"),
    ("📌", "Pin"),
)

SAS_INFO_PREFIX: Final = "CHATD_SAS_V1"
MAC_INFO_PREFIX: Final = "CHATD_SAS_MAC_V1"
KINDS: Final = frozenset(
    {"verify_start", "verify_accept", "verify_key", "verify_mac", "verify_done", "verify_cancel"}
)
#: Cancel codes this library sends (others are shown as received).
CANCEL_CODES: Final = frozenset(
    {
        "user",  # a person cancelled
        "mismatched_sas",  # the people saw different emoji or numbers
        "mac_mismatch",  # a MAC did not verify: keys differ from the directory's
        "commitment_mismatch",  # the starter's key does not match its commitment
        "bad_key",  # an unusable SAS public key
        "unexpected_message",  # a payload out of order
        "timeout",  # not finished within VERIFICATION_TIMEOUT
        "busy",  # too many verifications at once
    }
)
MAX_REASON_CHARS: Final = 200
_TRANSACTION_ID: Final = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_KEY: Final = re.compile(r"^[A-Za-z0-9+/]{43}=?$")
_MAC: Final = re.compile(r"^[A-Za-z0-9+/]{43}=?$")  # HMAC-SHA256: 32 bytes


@dataclass(frozen=True)
class Party:
    """One side of a verification: a device and the Ed25519 key we hold for it."""

    user_id: int
    device_id: str
    ed25519: str


@dataclass(frozen=True)
class ShortAuthString:
    """What the people compare: seven (emoji, name) pairs, or three numbers."""

    emoji: tuple[tuple[str, str], ...]
    decimals: tuple[int, int, int]


def valid_transaction_id(value: object) -> bool:
    return isinstance(value, str) and _TRANSACTION_ID.match(value) is not None


def commitment(starter_key: str, transaction_id: str) -> str:
    digest = hashlib.sha256(f"{starter_key}|{transaction_id}".encode()).digest()
    return base64.b64encode(digest).decode().rstrip("=")


def sas_info(
    starter: Party, starter_key: str, responder: Party, responder_key: str, transaction_id: str
) -> str:
    return "|".join(
        [
            SAS_INFO_PREFIX,
            str(starter.user_id),
            starter.device_id,
            starter_key,
            str(responder.user_id),
            responder.device_id,
            responder_key,
            transaction_id,
        ]
    )


def mac_info(sender: Party, receiver: Party, transaction_id: str) -> str:
    return "|".join(
        [
            MAC_INFO_PREFIX,
            str(sender.user_id),
            sender.device_id,
            str(receiver.user_id),
            receiver.device_id,
            transaction_id,
        ]
    )


class SasExchange:
    """One verification between ``us`` and ``them``; no I/O.

    The methods that make payloads return the payload fields to send (``kind``
    plus its own fields; the caller adds ``transaction_id``, the addressing and
    the message id). Anything the other side did wrong raises
    VerificationError with a cancel code; the caller then sends
    :meth:`cancel`'s payload. States: ``created`` → ``started`` (starter) or
    ``requested`` → ``accepted`` (responder), then ``keys_exchanged`` →
    ``confirmed`` → ``done``; or ``cancelled`` from anywhere.
    """

    def __init__(
        self,
        us: Party,
        them: Party,
        transaction_id: str,
        *,
        we_started: bool,
        their_commitment: str | None = None,
    ) -> None:
        if not valid_transaction_id(transaction_id):
            raise VerificationError("unexpected_message", "malformed transaction id")
        self.us = us
        self.them = them
        self.transaction_id = transaction_id
        self.we_started = we_started
        self.state = "created" if we_started else "requested"
        self.error: VerificationError | None = None
        self._sas: vodozemac.Sas | None = vodozemac.Sas()
        self._our_key = self._sas.public_key.to_base64()
        self._their_key: str | None = None
        self._their_commitment = their_commitment
        self._established: vodozemac.EstablishedSas | None = None
        self._their_mac_ok = False
        self._their_done = False

    # -- what we send ---------------------------------------------------------

    def start(self) -> dict[str, Any]:
        self._expect("created")
        self.state = "started"
        return {
            "kind": "verify_start",
            "commitment": commitment(self._our_key, self.transaction_id),
        }

    def accept(self) -> dict[str, Any]:
        self._expect("requested")
        self.state = "accepted"
        return {"kind": "verify_accept", "key": self._our_key}

    def confirm(self) -> list[dict[str, Any]]:
        """Our person saw the same SAS: send our MAC (and ``verify_done`` when
        their MAC has already verified)."""
        self._expect("keys_exchanged")
        assert self._established is not None  # noqa: S101 - set on entering keys_exchanged
        info = mac_info(self.us, self.them, self.transaction_id)
        mac = self._established.calculate_mac(self.us.ed25519, info)
        self.state = "confirmed"
        out = [{"kind": "verify_mac", "mac": mac}]
        if self._their_mac_ok:
            out.append({"kind": "verify_done"})
        return out

    def cancel(self, code: str, reason: str) -> dict[str, Any]:
        """End it here; the payload tells the other side why."""
        reason = reason[:MAX_REASON_CHARS]
        if self.state not in ("done", "cancelled"):
            self.state = "cancelled"
            self.error = VerificationError(code, reason)
        return {"kind": "verify_cancel", "code": code, "reason": reason}

    # -- what we receive ------------------------------------------------------

    def receive(self, kind: str, fields: dict[str, Any]) -> list[dict[str, Any]]:
        """Apply one payload from ``them``; returns the payloads to send back.
        Raises VerificationError (then send :meth:`cancel`), except for a
        ``verify_cancel``, which just ends the exchange."""
        if self.state in ("done", "cancelled"):
            return []
        if kind == "verify_cancel":
            code = str(fields.get("code", "user"))[:32]
            reason = str(fields.get("reason", ""))[:MAX_REASON_CHARS]
            self.state = "cancelled"
            self.error = VerificationError(code, reason, remote=True)
            return []
        if kind == "verify_accept" and self.state == "started":
            self._establish(fields.get("key"))
            return [{"kind": "verify_key", "key": self._our_key}]
        if kind == "verify_key" and self.state == "accepted":
            key = fields.get("key")
            expected = commitment(key, self.transaction_id) if isinstance(key, str) else ""
            if not hmac.compare_digest(expected.encode(), str(self._their_commitment).encode()):
                raise VerificationError(
                    "commitment_mismatch", "the starter's key does not match its commitment"
                )
            self._establish(key)
            return []
        if kind == "verify_mac" and self.state in ("keys_exchanged", "confirmed"):
            self._check_mac(fields.get("mac"))
            return [{"kind": "verify_done"}] if self.state == "confirmed" else []
        if kind == "verify_done" and self._their_mac_ok:
            self._their_done = True
            return []
        raise VerificationError("unexpected_message", f"{kind} was not expected now")

    # -- results --------------------------------------------------------------

    @property
    def sas(self) -> ShortAuthString | None:
        """The SAS to compare, once both keys are known (``keys_exchanged`` on)."""
        if self._established is None or self._their_key is None:
            return None
        starter, responder = (self.us, self.them) if self.we_started else (self.them, self.us)
        keys = (self._our_key, self._their_key)
        starter_key, responder_key = keys if self.we_started else keys[::-1]
        info = sas_info(starter, starter_key, responder, responder_key, self.transaction_id)
        sas_bytes = self._established.bytes(info)
        emoji = tuple(SAS_EMOJI[i] for i in sas_bytes.emoji_indices)
        first, second, third = sas_bytes.decimals
        return ShortAuthString(emoji, (int(first), int(second), int(third)))

    @property
    def verified(self) -> bool:
        """True once the other device may be marked verified (see the module doc)."""
        return self.state == "confirmed" and self._their_mac_ok and self._their_done

    def finish(self) -> None:
        """The caller stored the verified flag."""
        self.state = "done"

    # -- internals ------------------------------------------------------------

    def _expect(self, state: str) -> None:
        if self.state != state:
            if self.error is not None:
                raise self.error
            raise VerificationError(
                "unexpected_message", f"not possible in state {self.state} (needs {state})"
            )

    def _establish(self, key: object) -> None:
        if not isinstance(key, str) or _KEY.match(key) is None or self._sas is None:
            raise VerificationError("bad_key", "the other device sent a malformed SAS key")
        sas, self._sas = self._sas, None  # vodozemac's Sas is single use
        try:
            self._established = sas.diffie_hellman(vodozemac.Curve25519PublicKey.from_base64(key))
        except ValueError as exc:  # vodozemac.KeyException: not contributory
            raise VerificationError("bad_key", f"unusable SAS key: {exc}") from None
        self._their_key = key.rstrip("=")
        self.state = "keys_exchanged"

    def _check_mac(self, mac: object) -> None:
        assert self._established is not None  # noqa: S101 - set on entering keys_exchanged
        info = mac_info(self.them, self.us, self.transaction_id)
        try:
            if not isinstance(mac, str) or _MAC.match(mac) is None:
                raise ValueError("malformed MAC")
            self._established.verify_mac(self.them.ed25519, info, mac)
        except ValueError:  # vodozemac.SasException: the tag does not match
            raise VerificationError(
                "mac_mismatch",
                f"device {self.them.device_id}'s MAC does not match the Ed25519 key the"
                " directory gave for it: it is not the device it claims to be",
            ) from None
        self._their_mac_ok = True
