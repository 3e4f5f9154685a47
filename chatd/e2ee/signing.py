"""Signed key objects: canonical JSON and Ed25519 verification (PyNaCl).

A client signs a key object with its device's Ed25519 identity key (vodozemac
``Account.sign``). The signed message is the object's *canonical JSON*: the
object without its ``signature`` field, keys sorted, no whitespace, UTF-8
(docs/PROTOCOL.md, section on keys). Keys and signatures travel as unpadded
standard base64, as vodozemac prints them.

Pure functions: no I/O, no event loop.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Final

import msgspec
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

KEY_BYTES: Final = 32  # Ed25519 and Curve25519 public keys
SIGNATURE_BYTES: Final = 64  # Ed25519 signatures

_encoder: Final = msgspec.json.Encoder(order="sorted")


def canonical_json(obj: dict[str, Any]) -> bytes:
    """The bytes a signature covers: ``obj`` minus ``signature``, keys sorted."""
    return _encoder.encode({k: v for k, v in obj.items() if k != "signature"})


def decode_b64(value: str, length: int) -> bytes | None:
    """Unpadded (or padded) standard base64 of exactly ``length`` bytes, else None."""
    try:
        raw = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == length else None


def verify(ed25519: str, obj: dict[str, Any], signature: str) -> bool:
    """True when ``signature`` is ``ed25519``'s signature of ``obj``."""
    key = decode_b64(ed25519, KEY_BYTES)
    sig = decode_b64(signature, SIGNATURE_BYTES)
    if key is None or sig is None:
        return False
    try:
        VerifyKey(key).verify(canonical_json(obj), sig)
    except (BadSignatureError, ValueError):
        return False
    return True
