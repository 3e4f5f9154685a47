"""What a wake-up POST holds: headers and body, encrypted when the device has keys.

The body is always the same few bytes but for a random id::

    {"type":"wake_up","id":"<32 lowercase hex digits>"}

The id is new for every wake-up and means nothing to anyone: it ties the
wake-up to no device, user, room, envelope or earlier wake-up (a client
may log it). With the device's RFC 8291 keys the body is encrypted to them
(``Content-Encoding: aes128gcm``, RFC 8188 with the RFC 8291 key
derivation) by ``http_ece``, under a new P-256 key pair and salt each time.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass

import http_ece
from cryptography.hazmat.primitives.asymmetric import ec

from chatd.push.guard import PushRefused

ERR_BAD_PUSH_KEY = "bad_push_key"
RECORD_SIZE = 4096  # one record holds the whole body


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A device's push endpoint as stored: the URL, and its keys (both or none)."""

    url: str
    p256dh: str | None = None  # base64url, uncompressed P-256 point
    auth: str | None = None  # base64url, 16 bytes

    @property
    def encrypted(self) -> bool:
        return self.p256dh is not None


def b64url_decode(text: str) -> bytes:
    """Base64url with or without padding (RFC 8291 keys come both ways)."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def check_keys(p256dh: str | None, auth: str | None) -> None:
    """Both or neither, and ``p256dh`` a point on P-256. Raises PushRefused."""
    if (p256dh is None) != (auth is None):
        field = "$.auth" if auth is None else "$.p256dh"
        raise PushRefused(
            ERR_BAD_PUSH_KEY, "p256dh and auth go together: send both or neither", field=field
        )
    if p256dh is None or auth is None:
        return
    raw = b64url_decode(p256dh)
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
    except ValueError:
        raise PushRefused(
            ERR_BAD_PUSH_KEY,
            "p256dh is not an uncompressed P-256 public key (65 bytes, base64url)",
            field="$.p256dh",
        ) from None
    if len(b64url_decode(auth)) != 16:
        raise PushRefused(ERR_BAD_PUSH_KEY, "auth must be 16 bytes, base64url", field="$.auth")


def wake_up_body() -> bytes:
    """A new wake-up's plaintext body, with a new random id: the JSON
    ``{"type":"wake_up","id":"<32 hex digits>"}``, written out (the id is
    hex digits only, nothing to escape)."""
    return b'{"type":"wake_up","id":"%s"}' % secrets.token_hex(16).encode()


def wake_up_request(endpoint: Endpoint, ttl_seconds: int) -> tuple[dict[str, str], bytes]:
    """The headers and body of one wake-up POST to ``endpoint``."""
    body = wake_up_body()
    headers = {"TTL": str(ttl_seconds), "Urgency": "high"}
    if endpoint.p256dh is None or endpoint.auth is None:
        headers["Content-Type"] = "application/json"
        return headers, body
    sender_key = ec.generate_private_key(ec.SECP256R1())
    encrypted: bytes = http_ece.encrypt(
        body,
        salt=secrets.token_bytes(16),
        private_key=sender_key,
        dh=b64url_decode(endpoint.p256dh),
        auth_secret=b64url_decode(endpoint.auth),
        rs=RECORD_SIZE,
        version="aes128gcm",
    )
    headers["Content-Type"] = "application/octet-stream"
    headers["Content-Encoding"] = "aes128gcm"
    return headers, encrypted
