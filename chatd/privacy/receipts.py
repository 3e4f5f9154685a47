"""Erasure receipts: what a purge deleted, signed with the server's Ed25519 key.

A receipt file is one JSON object::

    {"receipt": {...}, "signature": "<base64>", "public_key": "<base64>"}

``signature`` is the Ed25519 signature (PyNaCl) of the receipt's canonical
bytes: ``json.dumps(receipt, sort_keys=True, separators=(",", ":"),
ensure_ascii=True)`` encoded as ASCII. Receipts hold only strings, integers,
lists and objects (no floats), so any JSON library re-creates the same bytes.
``public_key`` says which key signed it; a verifier compares it with the key
it trusts (``GET /v1/server-key``, ``chatctl receipts public-key``), because
a key carried in the file proves nothing by itself.

Nothing here does I/O; the signing key never leaves :class:`ReceiptSigner`.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Final

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from chatd.errors import InputError

FORMAT: Final = "chatd-erasure-receipt/1"


class ReceiptError(InputError):
    """A receipt that does not verify: malformed, signed by another key, or altered."""


def canonical(receipt: dict[str, Any]) -> bytes:
    """The bytes a receipt's signature covers."""
    return json.dumps(receipt, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode(
        "ascii"
    )


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


class ReceiptSigner:
    """Signs receipts with the server's key (from :func:`chatd.keyfiles.load_signing_seed`)."""

    __slots__ = ("_key",)

    def __init__(self, seed: bytes) -> None:
        self._key = SigningKey(seed)

    def __repr__(self) -> str:  # never show the key
        return "ReceiptSigner(<key>)"

    @property
    def public_key(self) -> str:
        """The verify key, base64 (32 bytes)."""
        return _b64(bytes(self._key.verify_key))

    def sign(self, receipt: dict[str, Any]) -> dict[str, Any]:
        """The signed receipt document (see the module docstring)."""
        signature = self._key.sign(canonical(receipt)).signature
        return {"receipt": receipt, "signature": _b64(signature), "public_key": self.public_key}


def verify(document: Any, public_key: str) -> dict[str, Any]:
    """Return the receipt of a signed receipt document once its signature
    verifies under ``public_key`` (base64). Raises :class:`ReceiptError`
    saying what is wrong."""
    if not isinstance(document, dict) or not isinstance(document.get("receipt"), dict):
        raise ReceiptError("not a chatd erasure receipt: no receipt object")
    receipt: dict[str, Any] = document["receipt"]
    if receipt.get("format") != FORMAT:
        raise ReceiptError(f"not a chatd erasure receipt: format is not {FORMAT}")
    try:
        key = VerifyKey(base64.b64decode(public_key, validate=True))
        signature = base64.b64decode(str(document.get("signature", "")), validate=True)
    except (binascii.Error, ValueError):
        raise ReceiptError(
            "the public key or the signature is not base64 of the right size"
        ) from None
    if document.get("public_key") not in (None, public_key):
        raise ReceiptError("the receipt was signed by another key than the one given")
    try:
        key.verify(canonical(receipt), signature)
    except (BadSignatureError, ValueError):
        raise ReceiptError("the signature does not match: the receipt was altered") from None
    return receipt
