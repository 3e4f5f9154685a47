"""Signed blob URLs: HMAC-SHA256 over the method, blob id, size, expiry and
the device the URL was issued to.

A URL looks like ``/v1/blobs/<blob_id>?size=N&exp=MS&u=USER&d=DEVICE&sig=SIG``
where ``SIG`` is the unpadded base64url HMAC-SHA256, under the server's blob
URL key, of ``"<METHOD>\\n<blob_id>\\n<size>\\n<exp>\\n<u>\\n<d>"``. Nothing
here does I/O; the key never leaves this object (not in ``repr`` either).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlencode

BLOB_ID: Final = re.compile(r"[0-9a-f]{64}")
_DEVICE: Final = re.compile(r"[A-Z2-7]{1,32}")
_MAX_INT_DIGITS: Final = 19  # fits a signed 64-bit integer


@dataclass(frozen=True, slots=True)
class SignedGrant:
    """What a valid signature vouches for."""

    method: str
    blob_id: str
    size: int
    expires_at: int  # unix ms
    user_id: int
    device_id: str


class SignatureError(Exception):
    """The URL's signature is missing, malformed or wrong (``expired`` False),
    or right but past its expiry (``expired`` True)."""

    def __init__(self, message: str, *, expired: bool = False) -> None:
        super().__init__(message)
        self.expired = expired


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _int(query: Mapping[str, str], name: str) -> int:
    text = query.get(name, "")
    if not text.isdigit() or len(text) > _MAX_INT_DIGITS:
        raise SignatureError(f"the URL's {name} is missing or malformed")
    return int(text)


class UrlSigner:
    """Makes and checks signed blob URLs with one key."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("a blob URL key has at least 256 bits")
        self._key = key

    def __repr__(self) -> str:  # never show the key
        return "UrlSigner(<key>)"

    def _mac(self, grant: SignedGrant) -> str:
        message = "\n".join(
            (
                grant.method,
                grant.blob_id,
                str(grant.size),
                str(grant.expires_at),
                str(grant.user_id),
                grant.device_id,
            )
        ).encode("ascii")
        return _b64(hmac.new(self._key, message, hashlib.sha256).digest())

    def path(self, grant: SignedGrant) -> str:
        """The URL's path and query (join it to the listener's base URL)."""
        query = {
            "size": grant.size,
            "exp": grant.expires_at,
            "u": grant.user_id,
            "d": grant.device_id,
            "sig": self._mac(grant),
        }
        return f"/v1/blobs/{grant.blob_id}?{urlencode(query)}"

    def check(self, method: str, blob_id: str, query: Mapping[str, str], now: int) -> SignedGrant:
        """The grant a URL's query carries for ``method`` on ``blob_id``, once
        its signature is right and ``now`` (unix ms) is before its expiry.
        Raises :class:`SignatureError`."""
        device_id = query.get("d", "")
        if not BLOB_ID.fullmatch(blob_id) or not _DEVICE.fullmatch(device_id):
            raise SignatureError("the URL is not a signed blob URL")
        grant = SignedGrant(
            method=method,
            blob_id=blob_id,
            size=_int(query, "size"),
            expires_at=_int(query, "exp"),
            user_id=_int(query, "u"),
            device_id=device_id,
        )
        given = query.get("sig", "")
        if not hmac.compare_digest(given.encode("ascii", "replace"), self._mac(grant).encode()):
            raise SignatureError("the URL's signature is wrong (ask the relay for a new URL)")
        if now >= grant.expires_at:
            raise SignatureError("the URL has expired (ask the relay for a new one)", expired=True)
        return grant


# -- account export URLs (chatd.privacy) ------------------------------------------------

EXPORT_PREFIX: Final = "/v1/exports/"


@dataclass(frozen=True, slots=True)
class ExportGrant:
    """What a valid export URL vouches for: this user's export, until then."""

    user_id: int
    device_id: str
    expires_at: int  # unix ms


def _export_mac(key: bytes, grant: ExportGrant) -> str:
    # "EXPORT" first: never the message of a blob URL (those start with a method).
    message = "\n".join(
        ("EXPORT", str(grant.user_id), str(grant.expires_at), grant.device_id)
    ).encode("ascii")
    return _b64(hmac.new(key, message, hashlib.sha256).digest())


def export_path(signer: UrlSigner, grant: ExportGrant) -> str:
    """``/v1/exports/<user_id>?exp=MS&d=DEVICE&sig=SIG``, signed with the blob URL key."""
    query = {"exp": grant.expires_at, "d": grant.device_id, "sig": _export_mac(signer._key, grant)}
    return f"{EXPORT_PREFIX}{grant.user_id}?{urlencode(query)}"


def check_export(signer: UrlSigner, path: str, query: Mapping[str, str], now: int) -> ExportGrant:
    """The grant of an export URL once its signature is right and ``now`` is
    before its expiry. Raises :class:`SignatureError`."""
    user = path.removeprefix(EXPORT_PREFIX)
    device_id = query.get("d", "")
    if not user.isdigit() or len(user) > _MAX_INT_DIGITS or not _DEVICE.fullmatch(device_id):
        raise SignatureError("the URL is not a signed export URL")
    grant = ExportGrant(user_id=int(user), device_id=device_id, expires_at=_int(query, "exp"))
    given = query.get("sig", "")
    expected = _export_mac(signer._key, grant)
    if not hmac.compare_digest(given.encode("ascii", "replace"), expected.encode()):
        raise SignatureError("the URL's signature is wrong (ask the relay for a new URL)")
    if now >= grant.expires_at:
        raise SignatureError("the URL has expired (ask the relay for a new one)", expired=True)
    return grant
