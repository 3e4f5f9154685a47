"""Attachments: files encrypted on this device, uploaded as ciphertext.

Sending a file (:meth:`Attachments.upload`):

1. The file is encrypted with a fresh random key by libsodium's
   ``crypto_secretstream_xchacha20poly1305`` (PyNaCl bindings): a 24-byte
   header, then one authenticated chunk per CHUNK_BYTES of plaintext, the
   last one tagged FINAL, so a truncated, reordered or altered ciphertext
   fails to decrypt. The ciphertext goes to a temporary file next to the
   destination, hashed (SHA-256) as it is written: the blob id.
2. The relay gives a signed upload URL (``blob_upload``) and the ciphertext
   is PUT there, streamed from the file.
3. The message that carries it holds, inside its end-to-end encryption, an
   :class:`Attachment` (blob id = SHA-256 of the ciphertext, key, sizes,
   declared media type, file name) and names the blob in ``blob_ids``.

Saving one (:meth:`Attachments.download`): a signed download URL
(``blob_download``), the ciphertext streamed into a temporary file and its
SHA-256 and size checked against the attachment *before* anything is
decrypted, then decrypted into a temporary file renamed to the destination.
Nothing is ever held whole in memory.

The media type is only what the sender declares; the server cannot check
it. The allowlist (``media_types``) is checked here, when sending and when
saving.
"""

from __future__ import annotations

import base64
import hashlib
import mimetypes
import os
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx
import trio
from nacl import bindings as sodium
from nacl.exceptions import CryptoError

from .connection import Connection
from .errors import ClientError, DecryptionError

CHUNK_BYTES: Final = 65_536  # plaintext bytes per secretstream message
_ABYTES: Final = sodium.crypto_secretstream_xchacha20poly1305_ABYTES
_HEADER: Final = sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES
_KEY: Final = sodium.crypto_secretstream_xchacha20poly1305_KEYBYTES
_TAG_MESSAGE: Final = sodium.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
_TAG_FINAL: Final = sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL
TRANSFER_TIMEOUT: Final = 60.0  # seconds without progress before an upload or download fails
MAX_NAME_CHARS: Final = 255

#: Media types sent and saved unless the client is given its own list.
DEFAULT_MEDIA_TYPES: Final = (
    "application/octet-stream",
    "application/pdf",
    "application/zip",
    "audio/mpeg",
    "audio/ogg",
    "image/gif",
    "image/jpeg",
    "image/png",
    "image/webp",
    "text/csv",
    "text/markdown",
    "text/plain",
    "video/mp4",
    "video/webm",
)


class AttachmentError(ClientError):
    """An attachment could not be sent or saved: a type not allowed, an
    upload or download refused, or a ciphertext that does not match."""


class AttachmentMismatchError(AttachmentError):
    """The downloaded ciphertext is not the one the message names (its
    SHA-256 or size differ): nothing was saved."""


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


@dataclass(frozen=True)
class Attachment:
    """What a message says about a file it carries (inside its encryption)."""

    blob_id: str  # hex SHA-256 of the ciphertext
    key: bytes  # the secretstream key: never leaves an encrypted payload
    size: int  # ciphertext bytes
    plain_size: int  # file bytes
    media_type: str  # as the sender declared it
    name: str  # the file's base name, as the sender had it

    def __repr__(self) -> str:  # never print the key
        return f"Attachment({self.name!r}, {self.media_type}, {self.plain_size} bytes)"

    def fields(self) -> dict[str, Any]:
        """The payload form (the ``attachment`` object of a message payload)."""
        return {
            "blob_id": self.blob_id,
            "sha256": self.blob_id,
            "key": _b64(self.key),
            "size": self.size,
            "plain_size": self.plain_size,
            "media_type": self.media_type,
            "name": self.name,
        }

    @classmethod
    def parse(cls, obj: Any) -> Attachment:
        """Read a payload's ``attachment`` object. Raises DecryptionError."""
        try:
            blob_id, key = str(obj["blob_id"]), _unb64(str(obj["key"]))
            size, plain_size = obj["size"], obj["plain_size"]
            media_type, name = str(obj["media_type"]), str(obj["name"])
            if obj.get("sha256", blob_id) != blob_id or len(blob_id) != 64:
                raise ValueError("blob_id and sha256 differ")
            int(blob_id, 16)
            if len(key) != _KEY:
                raise ValueError("the key has the wrong length")
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (size, plain_size)):
                raise ValueError("sizes must be integers")
        except (KeyError, TypeError, ValueError) as exc:
            raise DecryptionError(f"malformed attachment: {exc}") from None
        return cls(blob_id, key, size, plain_size, media_type, safe_name(name))


def safe_name(name: str) -> str:
    """A sender's file name made safe to save under: no directories, no
    hidden-file dot, no control characters, bounded length."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if c.isprintable()).strip().lstrip(".")
    return base[:MAX_NAME_CHARS] or "attachment"


def media_type_of(path: Path) -> str:
    guessed, _ = mimetypes.guess_type(path.name)
    return guessed or "application/octet-stream"


# -- the cipher (blocking: run in a thread) ------------------------------------------


def encrypt_file(source: Path, target: Path) -> tuple[bytes, str, int, int]:
    """Encrypt ``source`` into ``target`` (created 0600); returns (key,
    SHA-256 hex of the ciphertext, ciphertext size, plaintext size)."""
    key = secrets.token_bytes(_KEY)
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    header = sodium.crypto_secretstream_xchacha20poly1305_init_push(state, key)
    hasher = hashlib.sha256(header)
    size, plain = len(header), 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out, source.open("rb") as src:
        out.write(header)
        chunk = src.read(CHUNK_BYTES)
        while True:
            following = src.read(CHUNK_BYTES)
            tag = _TAG_MESSAGE if following else _TAG_FINAL
            sealed = sodium.crypto_secretstream_xchacha20poly1305_push(state, chunk, None, tag)
            out.write(sealed)
            hasher.update(sealed)
            size += len(sealed)
            plain += len(chunk)
            if not following:
                break
            chunk = following
        out.flush()
        os.fsync(out.fileno())
    return key, hasher.hexdigest(), size, plain


def decrypt_file(source: Path, target: Path, key: bytes) -> int:
    """Decrypt ``source`` into ``target`` (created 0600); the plaintext
    size. Raises DecryptionError for a wrong key, a damaged or truncated
    ciphertext, or bytes after the final chunk."""
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    plain = 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out, source.open("rb") as src:
        header = src.read(_HEADER)
        try:
            sodium.crypto_secretstream_xchacha20poly1305_init_pull(state, header, key)
            while True:
                sealed = src.read(CHUNK_BYTES + _ABYTES)
                if not sealed:
                    raise DecryptionError("the attachment is truncated (no final chunk)")
                chunk, tag = sodium.crypto_secretstream_xchacha20poly1305_pull(state, sealed, None)
                out.write(chunk)
                plain += len(chunk)
                if tag == _TAG_FINAL:
                    break
        except (CryptoError, ValueError) as exc:  # libsodium refused a chunk
            raise DecryptionError(f"the attachment does not decrypt: {exc}") from None
        if src.read(1):
            raise DecryptionError("the attachment has bytes after its final chunk")
        out.flush()
        os.fsync(out.fileno())
    return plain


def _sha256_of(path: Path) -> tuple[str, int]:
    hasher = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            hasher.update(block)
            size += len(block)
    return hasher.hexdigest(), size


# -- transfers ---------------------------------------------------------------------


class Attachments:
    """Upload and download of attachments for one client."""

    def __init__(
        self,
        conn: Connection,
        work_dir: Path,
        *,
        media_types: tuple[str, ...] = DEFAULT_MEDIA_TYPES,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._conn = conn
        self.work_dir = work_dir  # temporary files (ciphertext) live here
        self.media_types = media_types
        self._verify: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True

    def _check_type(self, media_type: str) -> None:
        if media_type not in self.media_types:
            raise AttachmentError(
                f"media type {media_type!r} is not allowed (allowed: {', '.join(self.media_types)})"
            )

    def _temp(self, what: str) -> Path:
        return self.work_dir / f".{what}-{secrets.token_hex(8)}"

    async def upload(self, path: Path, media_type: str | None = None) -> Attachment:
        """Encrypt ``path``, upload the ciphertext, and return what the
        message must carry. Raises AttachmentError, ServerRefusedError
        (``too_large``, ``quota_exceeded``), OSError for an unreadable file."""
        media_type = media_type or media_type_of(path)
        self._check_type(media_type)
        sealed = self._temp("upload")
        try:
            key, blob_id, size, plain = await trio.to_thread.run_sync(encrypt_file, path, sealed)
            signed = await self._conn.request("blob_upload", sha256=blob_id, size=size)
            await self._put(signed["url"], sealed, size)
        finally:
            sealed.unlink(missing_ok=True)
        return Attachment(blob_id, key, size, plain, media_type, safe_name(path.name))

    async def _put(self, url: str, sealed: Path, size: int) -> None:
        async def body() -> Any:
            async with await trio.open_file(sealed, "rb") as fh:
                while block := await fh.read(1 << 20):
                    yield block

        timeout = httpx.Timeout(TRANSFER_TIMEOUT)
        async with httpx.AsyncClient(verify=self._verify, timeout=timeout) as http:
            try:
                response = await http.put(
                    url, content=body(), headers={"content-length": str(size)}
                )
            except httpx.HTTPError as exc:
                raise AttachmentError(f"the upload failed: {type(exc).__name__}") from None
        if response.status_code not in (200, 201):
            raise AttachmentError(f"the upload was refused: {_reason(response)}")

    async def download(self, attachment: Attachment, target: Path) -> Path:
        """Fetch, check and decrypt ``attachment`` into ``target`` (a file
        that must not exist yet; a directory means a file in it under the
        sender's name). Returns the file written. Raises AttachmentError
        (type not allowed, download refused, hash or size mismatch),
        DecryptionError, ServerRefusedError (``blob_not_found``)."""
        self._check_type(attachment.media_type)
        target = await trio.to_thread.run_sync(_target, target, attachment.name)
        signed = await self._conn.request("blob_download", blob_id=attachment.blob_id)
        sealed = self._temp("download")
        opened = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
        try:
            await self._get(signed["url"], sealed)
            digest, size = await trio.to_thread.run_sync(_sha256_of, sealed)
            if digest != attachment.blob_id or size != attachment.size:
                raise AttachmentMismatchError(
                    "the downloaded ciphertext does not match the message (SHA-256 or size)"
                )
            await trio.to_thread.run_sync(decrypt_file, sealed, opened, attachment.key)
            await trio.to_thread.run_sync(os.link, opened, target)  # never replaces a file
        finally:
            sealed.unlink(missing_ok=True)
            opened.unlink(missing_ok=True)
        return target

    async def _get(self, url: str, sealed: Path) -> None:
        timeout = httpx.Timeout(TRANSFER_TIMEOUT)
        async with (
            httpx.AsyncClient(verify=self._verify, timeout=timeout) as http,
            await trio.open_file(sealed, "xb") as out,
        ):
            try:
                async with http.stream("GET", url) as response:
                    if response.status_code != 200:
                        await response.aread()
                        raise AttachmentError(f"the download was refused: {_reason(response)}")
                    async for block in response.aiter_bytes():
                        await out.write(block)
            except httpx.HTTPError as exc:
                raise AttachmentError(f"the download failed: {type(exc).__name__}") from None

    async def fetch(self, url: str, target: Path) -> Path:
        """GET a signed URL of the blob listener (an account export) into
        ``target``, a new file; nothing is left there when it fails."""
        if await trio.to_thread.run_sync(target.exists):
            raise AttachmentError(f"{target} exists already; choose another path")
        partial = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
        try:
            await self._get(url, partial)
            await trio.to_thread.run_sync(os.link, partial, target)  # never replaces a file
        finally:
            partial.unlink(missing_ok=True)
        return target


def _target(target: Path, name: str) -> Path:
    if target.is_dir():
        target = target / name
    if target.exists():
        raise AttachmentError(f"{target} exists already; choose another path")
    return target


def _reason(response: httpx.Response) -> str:
    try:
        body = response.json()
        return f"{response.status_code} {body['error']}: {body['message']}"
    except (ValueError, KeyError, TypeError):
        return str(response.status_code)
