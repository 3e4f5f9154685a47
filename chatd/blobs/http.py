"""The blob listener: attachment ciphertext over HTTP, behind signed URLs.

A minimal ASGI app under hypercorn (inside the daemon's nursery) that serves
exactly two things and nothing else:

* ``PUT /v1/blobs/<blob_id>?<signed query>``: an upload. Refused before a
  byte of the body is read when the signature is wrong or expired (403),
  the declared ``Content-Length`` differs from the signed size (413 if
  larger, 400 if smaller), or the uploader's quota would be exceeded (413).
  The body streams into a ``.part-`` file (at most ``FLUSH_BYTES`` in
  memory), hashed as it goes; more bytes than signed are refused at once
  (413), fewer (400) or another SHA-256 (422) when the body ends. Only a
  body that matches is fsynced, renamed to its blob id and recorded (201;
  200 when it was stored already). A connection lost mid-way leaves nothing.
* ``GET /v1/blobs/<blob_id>?<signed query>``: a download, streamed from the
  file (200), or 404 when it is gone.
* ``GET /v1/exports/<user_id>?<signed query>``: a user's own account export
  (ZIP, chunked), behind a URL the relay signs after re-authentication
  (``export_account``); 404 once the account is disabled.

Every refusal is a JSON body ``{"error": CODE, "message": TEXT}``; the same
answer for a missing and a forbidden blob. Hypercorn bounds the request
queue (``max_app_queue_size`` chunks), so a fast uploader waits for the disk
instead of filling memory; ``attachments.read_timeout_seconds`` ends a
stalled connection. TLS 1.3 with the relay's certificate when it has one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from functools import partial
from typing import Any, Final
from urllib.parse import parse_qsl

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from chatd.blobs.service import BlobError, BlobService
from chatd.blobs.signing import (
    BLOB_ID,
    EXPORT_PREFIX,
    SignatureError,
    SignedGrant,
    check_export,
)
from chatd.config import Config
from chatd.errors import ListenError, StoreError, exception_leaves
from chatd.log import fields
from chatd.privacy.export import stream_export
from chatd.store import now_ms
from chatd.store.store import WRITE_RECHECK_SECONDS

log = logging.getLogger("chatd.blobs")

PATH_PREFIX: Final = "/v1/blobs/"
FLUSH_BYTES: Final = 1_048_576  # upload bytes gathered before one write (bytes)
READ_BYTES: Final = 262_144  # download bytes per read and send (bytes)
KEEP_ALIVE_SECONDS: Final = 5.0
APP_QUEUE_CHUNKS: Final = 8  # request body chunks hypercorn queues for us at most

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class _Refused(Exception):
    def __init__(
        self, status: int, code: str, message: str, *, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after  # seconds, sent as Retry-After


#: errno values that say the disk refused a write: full, over quota or a file
#: size limit, an I/O error, a read-only filesystem.
DISK_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS})


def _storage_unavailable() -> _Refused:
    return _Refused(
        503,
        "storage_unavailable",
        "the server cannot write to its storage right now; upload again later",
        retry_after=WRITE_RECHECK_SECONDS,
    )


_BLOB_STATUS: Final = {"quota_exceeded": 413, "too_large": 413, "blob_exists": 409}


class BlobApp:
    """The ASGI app of the blob listener."""

    def __init__(self, blobs: BlobService) -> None:
        self.blobs = blobs
        self.files = blobs.files
        self.uploads = 0  # finished uploads, for tests and logs
        self.exports = 0  # account exports sent in full
        self.server_name = socket.gethostname()  # named in an export's manifest
        self.refused = 0
        self.disk_failing = False  # the last upload failed on a disk error (logged once)
        self.ended = 0  # uploads over, however they ended (their part file is gone)
        self._ended = trio.Event()

    async def wait_uploads_ended(self, count: int) -> None:
        """Wait until ``count`` uploads have ended since start, whatever their outcome."""
        while self.ended < count:
            await self._ended.wait()

    def _upload_ended(self) -> None:
        self.ended += 1
        self._ended.set()
        self._ended = trio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            await self._http(scope, receive, send)
        except _Refused as refused:
            self.refused += 1
            await _answer(send, refused.status, refused.code, refused.message, refused.retry_after)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if path.startswith(EXPORT_PREFIX):
            await self._export(scope, send)
            return
        blob_id = path.removeprefix(PATH_PREFIX)
        if not path.startswith(PATH_PREFIX) or not BLOB_ID.fullmatch(blob_id):
            raise _Refused(
                404, "not_found", "not found: this listener serves /v1/blobs/ and /v1/exports/"
            )
        method: str = scope["method"]
        if method not in ("PUT", "GET"):
            raise _Refused(405, "method_not_allowed", "use PUT to upload and GET to download")
        pairs = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
        query = dict(pairs)
        if len(query) != len(pairs):
            raise _Refused(403, "bad_signature", "the URL repeats a parameter")
        try:
            grant = self.blobs.signer.check(method, blob_id, query, now_ms())
        except SignatureError as exc:
            code = "url_expired" if exc.expired else "bad_signature"
            raise _Refused(403, code, str(exc)) from None
        if method == "PUT":
            try:
                await self._upload(grant, scope, receive, send)
            except StoreError:
                raise _storage_unavailable() from None  # the store logged the cause
            except OSError as exc:
                if exc.errno not in DISK_ERRNOS:
                    raise
                if not self.disk_failing:
                    self.disk_failing = True
                    log.warning(
                        "blobs.write_failed",
                        extra=fields(cause=errno.errorcode.get(exc.errno, str(exc.errno))),
                    )
                raise _storage_unavailable() from None
            finally:
                self._upload_ended()
        else:
            await self._download(grant, send)

    # -- account export (chatd.privacy) ---------------------------------------------------

    async def _export(self, scope: Scope, send: Send) -> None:
        """Stream a user's own account export, behind an export URL the relay
        signed after re-authentication; chunked, a page at a time."""
        if scope["method"] != "GET":
            raise _Refused(405, "method_not_allowed", "use GET to download an export")
        pairs = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
        query = dict(pairs)
        if len(query) != len(pairs):
            raise _Refused(403, "bad_signature", "the URL repeats a parameter")
        try:
            grant = check_export(self.blobs.signer, scope["path"], query, now_ms())
        except SignatureError as exc:
            code = "url_expired" if exc.expired else "bad_signature"
            raise _Refused(403, code, str(exc)) from None
        store = self.blobs.store
        enabled = await store.read(
            lambda conn: conn.execute(
                "SELECT 1 FROM users WHERE id = ? AND disabled_at IS NULL", (grant.user_id,)
            ).fetchone()
        )
        if enabled is None:
            raise _Refused(404, "not_found", "no such account (or it is disabled)")
        chunks = await stream_export(store, grant.user_id, server=self.server_name)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/zip"),
                    (b"content-disposition", b'attachment; filename="chatd-export.zip"'),
                    (b"cache-control", b"no-store"),
                    (b"x-content-type-options", b"nosniff"),
                ],
            }
        )
        async for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        self.exports += 1

    # -- upload ------------------------------------------------------------------------

    async def _upload(self, grant: SignedGrant, scope: Scope, receive: Receive, send: Send) -> None:
        length = _content_length(scope)
        if length is not None and length > grant.size:
            raise _Refused(413, "too_large", f"the URL allows {grant.size} bytes, not {length}")
        if length is not None and length < grant.size:
            raise _Refused(400, "size_mismatch", f"the URL is for {grant.size} bytes, not {length}")
        try:
            stored = await self.blobs.check_upload(grant)
        except BlobError as exc:
            raise _Refused(_BLOB_STATUS.get(exc.code, 403), exc.code, exc.message) from None
        if stored:
            await _drain(receive, grant.size)
            await self.blobs.add_reader(grant.blob_id, grant.device_id)
            await _answer(send, 200, "stored", "the blob is stored already")
            return
        part, fd = await trio.to_thread.run_sync(self.files.new_part)
        placed = False  # the part became the blob file (and its fd is closed)

        def place() -> None:
            nonlocal placed
            self.files.finish(part, fd, grant.blob_id)
            placed = True

        try:
            digest = await self._receive_body(grant, fd, receive)
            if digest is None:
                log.info("blobs.upload_cut_off", extra=fields(size=grant.size))
                return  # the peer left: no answer can reach it
            if digest != grant.blob_id:
                raise _Refused(422, "hash_mismatch", "the body's SHA-256 is not the blob id")
            try:
                await self.blobs.store_upload(grant, place)
            except BlobError as exc:
                raise _Refused(_BLOB_STATUS.get(exc.code, 403), exc.code, exc.message) from None
            self.uploads += 1
            if self.disk_failing:
                self.disk_failing = False
                log.warning("blobs.write_recovered")
            await _answer(send, 201, "created", "stored")
        finally:
            if not placed:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self.files.discard, part, fd)

    async def _receive_body(self, grant: SignedGrant, fd: int, receive: Receive) -> str | None:
        """Stream the body into ``fd``; its SHA-256 (hex), or None when the
        peer disconnected. Raises _Refused for too many or too few bytes."""
        hasher = hashlib.sha256()
        total = 0
        pending: list[bytes] = []
        pending_bytes = 0

        def flush(chunks: list[bytes]) -> None:
            for chunk in chunks:
                hasher.update(chunk)
                self.files.write_all(fd, chunk)

        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body: bytes = message.get("body", b"")
            total += len(body)
            if total > grant.size:
                raise _Refused(413, "too_large", f"the body is longer than the {grant.size} signed")
            if body:
                pending.append(body)
                pending_bytes += len(body)
            more = bool(message.get("more_body", False))
            if pending_bytes >= FLUSH_BYTES or not more:
                chunks, pending, pending_bytes = pending, [], 0
                await trio.to_thread.run_sync(flush, chunks)
            if not more:
                break
        if total != grant.size:
            raise _Refused(400, "size_mismatch", f"the body has {total} of {grant.size} bytes")
        return hasher.hexdigest()

    # -- download ----------------------------------------------------------------------

    async def _download(self, grant: SignedGrant, send: Send) -> None:
        path = self.files.path(grant.blob_id)
        try:
            fh = await trio.open_file(path, "rb")
        except FileNotFoundError:
            raise _Refused(404, "not_found", "the blob is gone (expired or deleted)") from None
        async with fh:
            size = os.fstat(fh.fileno()).st_size
            if size != grant.size:
                raise _Refused(404, "not_found", "the blob is gone (expired or deleted)")
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"application/octet-stream"),
                        (b"content-length", str(size).encode()),
                        (b"cache-control", b"no-store"),
                        (b"x-content-type-options", b"nosniff"),
                    ],
                }
            )
            left = size
            while left > 0:
                chunk = await fh.read(min(READ_BYTES, left))
                if not chunk:
                    break
                left -= len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": left > 0})
            if left:  # pragma: no cover - the file shrank under us (it never does)
                log.error("blobs.download_short", extra=fields(missing=left))


def _content_length(scope: Scope) -> int | None:
    for key, value in scope["headers"]:
        if key.lower() == b"content-length":
            text = value.decode("latin-1").strip()
            if not text.isdigit() or len(text) > 19:
                raise _Refused(400, "bad_request", "Content-Length is not a number")
            return int(text)
    return None


async def _drain(receive: Receive, limit: int) -> None:
    """Read and drop a body we do not need (a repeated upload), up to ``limit``."""
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        total += len(message.get("body", b""))
        if total > limit:
            raise _Refused(413, "too_large", f"the body is longer than the {limit} signed")
        if not message.get("more_body", False):
            return


async def _answer(
    send: Send, status: int, code: str, message: str, retry_after: float | None = None
) -> None:
    key = "status" if status < 300 else "error"
    body = json.dumps({key: code, "message": message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    if status >= 400:
        headers.append((b"connection", b"close"))  # an unread body must not be parsed next
    if retry_after is not None:
        headers.append((b"retry-after", str(math.ceil(retry_after)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class _HypercornConfig(HypercornConfig):
    """Hypercorn's config with our TLS context (TLS 1.3 only, as the relay)."""

    tls: ssl.SSLContext | None = None

    @property
    def ssl_enabled(self) -> bool:
        return self.tls is not None

    def create_ssl_context(self) -> ssl.SSLContext | None:
        return self.tls


async def serve_blobs(
    config: Config,
    blobs: BlobService,
    stopping: trio.Event,
    *,
    task_status: trio.TaskStatus[BlobApp] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the blob listener until ``stopping`` is set, then drain and return.

    Makes the blob directory if missing, sets ``blobs.base_url`` (unless
    ``attachments.public_url`` gives one) and reports the app once
    listening. In-flight transfers get ``server.shutdown_grace_seconds``;
    an upload cut off by the drain leaves no file. Raises ListenError when
    the address is taken.
    """
    from chatd.relay.server import tls_context

    s = config.attachments
    await trio.to_thread.run_sync(blobs.files.ensure)
    hc = _HypercornConfig()
    host = f"[{s.host}]" if ":" in s.host else s.host
    hc.bind = [f"{host}:{s.port}"]
    if config.relay_tls:
        hc.tls = tls_context(config)
    hc.accesslog = None  # URLs carry signatures: never log them
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.include_server_header = False
    hc.graceful_timeout = config.server.shutdown_grace_seconds
    hc.keep_alive_timeout = KEEP_ALIVE_SECONDS
    hc.read_timeout = int(max(1, s.read_timeout_seconds))
    hc.max_app_queue_size = APP_QUEUE_CHUNKS
    app = BlobApp(blobs)
    try:
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(
                partial(serve, app, hc, shutdown_trigger=stopping.wait)  # type: ignore[arg-type]  # hypercorn's ASGI types are narrower than our app's mappings
            )
            if not blobs.base_url:
                blobs.base_url = binds[0].rstrip("/")
            log.info("blobs.listening", extra=fields(bind=binds[0], tls=config.relay_tls))
            task_status.started(app)
    except* OSError as group:
        exc = next(exception_leaves(group))
        where = hc.bind[0]
        if isinstance(exc, OSError) and exc.errno == 98:
            raise ListenError(
                f"blobs: address {where} is already in use "
                f"(change attachments.port in {config.path})"
            ) from None
        raise ListenError(f"blobs: cannot listen on {where}: {exc}") from None
    log.info("blobs.stopped", extra=fields(uploads=app.uploads))
