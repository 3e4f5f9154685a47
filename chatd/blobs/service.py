"""Who may upload and download which attachment, and the blobs retention job.

The server never sees inside an attachment: the client encrypts it and puts
the key in the end-to-end-encrypted message. What the server does know, and
keeps in the ``blobs``, ``blob_devices`` and ``blob_rooms`` tables, is
enough to decide who may fetch the ciphertext:

* the uploader's device holds a reference from the upload on;
* a ``send`` naming the blob in ``blob_ids`` gives a reference to every
  device it names; a ``room_send`` gives one to the room, whose members at
  download time may fetch it. Only a device that may read a blob may name it.
  The references are recorded before the message is queued (a recipient must
  never see it before it may fetch the blob); a message then refused
  (``device_mismatch``, ``queue_full``, a room refusal) has them withdrawn,
  as have the devices a ``skip_full`` send left out. Grants that existed
  before the message stay, and so do grants another message needs: two
  sends naming one blob for one device may run at once, and one refused
  must not take back what the other was accepted with. So the service
  counts, in memory, the pending messages that need each grant and which
  one created it; a refused message withdraws a grant only when it created
  it (or its creator was refused too) and no other pending message needs
  it, and a message accepted with a grant makes it nobody's to withdraw.

A download URL is issued only to a device with a reference (directly, or
through a room its user is a member of); anyone else, and a blob that does
not exist, get the same ``blob_not_found``, so existence is not revealed.

Upload order (:meth:`BlobService.store_upload`): the listener has checked the
size and the SHA-256 while streaming; under the blob's lock the file is
fsynced and renamed into place, and only then is its row written, with the
quota checked in the same write. A file whose row could not be written is
deleted; one a crash left without a row is deleted by the retention job.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, Final

import trio

from chatd.blobs.files import PART_PREFIX, BlobFiles
from chatd.blobs.grants import PendingGrants, Referral, needed
from chatd.blobs.signing import BLOB_ID, SignedGrant, UrlSigner
from chatd.config import AttachmentSettings
from chatd.errors import RefusedError
from chatd.log import fields
from chatd.protocol.blobs import BlobUrl
from chatd.store import Store, now_ms

log = logging.getLogger("chatd.blobs")

ERR_TOO_LARGE: Final = "too_large"
ERR_QUOTA_EXCEEDED: Final = "quota_exceeded"
ERR_BLOB_EXISTS: Final = "blob_exists"
ERR_BLOB_NOT_FOUND: Final = "blob_not_found"
ERR_UNAVAILABLE: Final = "attachments_unavailable"
ORPHAN_AGE_SECONDS: Final = 3_600.0  # a file without a row (or a part) older than this is junk

#: Whether a user is a current member of a room: (room_id, user_id) -> bool.
IsMember = Callable[[int, int], bool]


class BlobError(RefusedError):
    """A refused attachment request; ``code``, ``message`` and ``field`` go to
    the client as they are (an ``error`` frame, or the listener's JSON body)."""

    def __init__(self, code: str, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


def _owner_size(conn: Any, *, blob_id: str) -> tuple[int, int] | None:
    row = conn.execute(
        "SELECT owner_user_id, size FROM blobs WHERE blob_id = ?", (blob_id,)
    ).fetchone()
    return None if row is None else (int(row[0]), int(row[1]))


def _used(conn: Any, user_id: int) -> int:
    row = conn.execute(
        "SELECT COALESCE(SUM(size), 0) FROM blobs WHERE owner_user_id = ?", (user_id,)
    ).fetchone()
    return int(row[0])


class BlobService:
    """Attachment rules for the relay (URLs, references) and the listener
    (finishing uploads). One per daemon; ``base_url`` is set once the
    listener is bound."""

    def __init__(
        self,
        store: Store,
        settings: AttachmentSettings,
        signer: UrlSigner,
        files: BlobFiles,
        is_member: IsMember,
    ) -> None:
        self.store = store
        self.settings = settings
        self.signer = signer
        self.files = files
        self.is_member = is_member
        self.base_url = settings.public_url.rstrip("/")
        self._locks: dict[str, trio.Lock] = {}
        # Grants of messages not yet accepted or refused (chatd.blobs.grants).
        self.pending = PendingGrants()

    # -- URLs (relay) --------------------------------------------------------------

    def _url(self, grant: SignedGrant) -> BlobUrl:
        return BlobUrl(
            id="",
            blob_id=grant.blob_id,
            method="GET" if grant.method == "GET" else "PUT",
            url=self.base_url + self.signer.path(grant),
            size=grant.size,
            expires_at=grant.expires_at,
        )

    def _expiry(self) -> int:
        return now_ms() + math.ceil(self.settings.url_seconds * 1000)

    async def upload_url(self, user_id: int, device_id: str, sha256: str, size: int) -> BlobUrl:
        """A signed PUT URL for ``size`` bytes hashing to ``sha256``. Raises
        BlobError: too_large, quota_exceeded, blob_exists (another user's)."""
        s = self.settings
        if size > s.max_file_bytes:
            raise BlobError(
                ERR_TOO_LARGE,
                f"an attachment may have at most {s.max_file_bytes} bytes of ciphertext",
                field="$.size",
            )

        def check(conn: Any) -> None:
            found = _owner_size(conn, blob_id=sha256)
            if found is not None:
                if found[0] != user_id:
                    raise BlobError(
                        ERR_BLOB_EXISTS,
                        "a blob with this SHA-256 is stored already; encrypt the file again "
                        "(a fresh key gives a new ciphertext)",
                        field="$.sha256",
                    )
                return  # your own: uploading it again is harmless
            self._check_quota(conn, user_id, size)

        await self.store.read(check)
        grant = SignedGrant("PUT", sha256, size, self._expiry(), user_id, device_id)
        return self._url(grant)

    def _check_quota(self, conn: Any, user_id: int, size: int) -> None:
        quota = self.settings.quota_bytes_per_user
        used = _used(conn, user_id)
        if used + size > quota:
            raise BlobError(
                ERR_QUOTA_EXCEEDED,
                f"your attachments would take {used + size} bytes, over your quota of "
                f"{quota}; wait until older ones expire",
                field="$.size",
            )

    async def download_url(self, user_id: int, device_id: str, blob_id: str) -> BlobUrl:
        """A signed GET URL for a blob this device may read. Raises BlobError
        blob_not_found (also when it exists but is not for this device)."""
        size = await self._readable(user_id, device_id, blob_id)
        if size is None:
            raise BlobError(
                ERR_BLOB_NOT_FOUND,
                "no attachment with this id was sent to this device (or it has expired)",
                field="$.blob_id",
            )
        grant = SignedGrant("GET", blob_id, size, self._expiry(), user_id, device_id)
        return self._url(grant)

    async def _readable(self, user_id: int, device_id: str, blob_id: str) -> int | None:
        """The blob's size if this device may read it, else None."""

        def query(conn: Any) -> tuple[int | None, bool, list[int]]:
            found = _owner_size(conn, blob_id=blob_id)
            if found is None:
                return None, False, []
            direct = (
                conn.execute(
                    "SELECT 1 FROM blob_devices WHERE blob_id = ? AND device_id = ?",
                    (blob_id, device_id),
                ).fetchone()
                is not None
            )
            sql = "SELECT room_id FROM blob_rooms WHERE blob_id = ?"
            rooms = [int(r[0]) for r in conn.execute(sql, (blob_id,))]
            return found[1], direct, rooms

        size, direct, rooms = await self.store.read(query)
        if size is None:
            return None
        if direct or any(self.is_member(room_id, user_id) for room_id in rooms):
            return size
        return None

    # -- references (relay: send and room_send) --------------------------------------

    async def refer(
        self,
        user_id: int,
        device_id: str,
        blob_ids: Sequence[str],
        *,
        device_ids: Sequence[str] = (),
        room_id: int | None = None,
    ) -> Referral:
        """Record that a message naming ``blob_ids`` goes to ``device_ids`` (a
        send) or to ``room_id`` (a room send), before it is queued, so that a
        recipient never sees the message before it may fetch the blob. Returns
        what was new, for :meth:`withdraw` if the message is then refused.
        Raises BlobError blob_not_found (field ``$.blob_ids[i]``) when this
        device may not read one of them; then nothing is recorded."""
        unique = sorted(set(blob_ids))
        touched = needed(blob_ids, device_ids, room_id)
        self.pending.need(touched)  # before the first await (chatd.blobs.grants)
        try:
            referral = await self._record(
                user_id, device_id, blob_ids, unique, sorted(set(device_ids)), room_id
            )
        except BaseException:
            self.pending.forget(touched)
            raise
        referral = replace(referral, touched=touched)
        self.pending.recorded(referral)
        return referral

    async def _record(
        self,
        user_id: int,
        device_id: str,
        blob_ids: Sequence[str],
        unique: list[str],
        devices: list[str],
        room_id: int | None,
    ) -> Referral:
        for i, blob_id in enumerate(blob_ids):
            if await self._readable(user_id, device_id, blob_id) is None:
                raise BlobError(
                    ERR_BLOB_NOT_FOUND,
                    f"blob {blob_id[:12]}... is not an attachment this device uploaded or "
                    "received (upload it first)",
                    field=f"$.blob_ids[{i}]",
                )
        now = now_ms()

        def write(conn: Any) -> Referral:
            first: list[str] = []
            readers: list[tuple[str, str]] = []
            rooms: list[tuple[str, int]] = []
            for blob_id in unique:
                cur = conn.execute(
                    "UPDATE blobs SET referenced_at = ?"
                    " WHERE blob_id = ? AND referenced_at IS NULL",
                    (now, blob_id),
                )
                if cur.rowcount > 0:
                    first.append(blob_id)
                for device in devices:
                    cur = conn.execute(
                        "INSERT OR IGNORE INTO blob_devices (blob_id, device_id)"
                        " SELECT blob_id, ? FROM blobs WHERE blob_id = ?",
                        (device, blob_id),
                    )
                    if cur.rowcount > 0:
                        readers.append((blob_id, device))
                if room_id is not None:
                    cur = conn.execute(
                        "INSERT OR IGNORE INTO blob_rooms (blob_id, room_id)"
                        " SELECT blob_id, ? FROM blobs WHERE blob_id = ?",
                        (room_id, blob_id),
                    )
                    if cur.rowcount > 0:
                        rooms.append((blob_id, room_id))
            return Referral(tuple(first), tuple(readers), tuple(rooms))

        return await self.store.write(write)

    def confirm(self, referral: Referral, *, except_devices: Sequence[str] = ()) -> None:
        """The message of ``referral`` was accepted (but for ``except_devices``,
        whose grants were withdrawn): the grants it needs stay."""
        self.pending.confirm(referral, except_devices)

    def release(self, referral: Referral) -> None:
        """The message of ``referral`` is done with (accepted, refused or
        abandoned); call it last, after :meth:`confirm` or :meth:`withdraw`."""
        self.pending.release(referral)

    async def withdraw(
        self, referral: Referral, *, device_ids: Sequence[str] | None = None
    ) -> None:
        """Undo what :meth:`refer` recorded for a message that was then refused
        (all of it), or that left some devices out (``device_ids``: only their
        read access). References that existed before the message are kept."""
        # Only what is this message's to take back (chatd.blobs.grants).
        mine = self.pending.withdrawn(referral, device_ids)
        readers = [(b, d) for kind, b, d in mine if kind == "device"]
        rooms = [(b, r) for kind, b, r in mine if kind == "room"]
        first = [(b,) for kind, b, _ in mine if kind == "first"]
        if not (readers or first or rooms):
            return

        def write(conn: Any) -> None:
            conn.executemany(
                "DELETE FROM blob_devices WHERE blob_id = ? AND device_id = ?", readers
            )
            conn.executemany("DELETE FROM blob_rooms WHERE blob_id = ? AND room_id = ?", rooms)
            conn.executemany("UPDATE blobs SET referenced_at = NULL WHERE blob_id = ?", first)

        await self.store.write(write)

    # -- uploads (listener) -------------------------------------------------------------

    def _lock(self, blob_id: str) -> trio.Lock:
        lock = self._locks.get(blob_id)
        if lock is None:
            lock = self._locks[blob_id] = trio.Lock()
        return lock

    async def check_upload(self, grant: SignedGrant) -> bool:
        """Before the body is read: whether the blob is stored already (for
        this uploader). Raises BlobError blob_exists, quota_exceeded."""

        def check(conn: Any) -> bool:
            found = _owner_size(conn, blob_id=grant.blob_id)
            if found is not None:
                if found[0] != grant.user_id:
                    raise BlobError(ERR_BLOB_EXISTS, "a blob with this SHA-256 is stored already")
                return True
            self._check_quota(conn, grant.user_id, grant.size)
            return False

        return await self.store.read(check)

    async def store_upload(self, grant: SignedGrant, place: Callable[[], None]) -> bool:
        """Finish a checked upload: ``place()`` (run in a thread) makes the
        file durable under its blob id, then the row is written. Returns False
        when the blob was stored already (the upload is then not placed).
        Raises BlobError quota_exceeded or blob_exists; the file is then gone."""
        blob_id = grant.blob_id
        lock = self._lock(blob_id)
        try:
            async with lock:
                if await self.check_upload(grant):
                    await self.add_reader(blob_id, grant.device_id)
                    return False
                await trio.to_thread.run_sync(place)
                now = now_ms()
                expires = now + math.ceil(self.settings.blob_days * 86_400_000)

                def insert(conn: Any) -> None:
                    self._check_quota(conn, grant.user_id, grant.size)
                    conn.execute(
                        "INSERT INTO blobs (blob_id, owner_user_id, size, created_at, expires_at)"
                        " VALUES (?, ?, ?, ?, ?)",
                        (blob_id, grant.user_id, grant.size, now, expires),
                    )
                    conn.execute(
                        "INSERT INTO blob_devices (blob_id, device_id) VALUES (?, ?)",
                        (blob_id, grant.device_id),
                    )

                try:
                    await self.store.write(insert)
                except BaseException:
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(self.files.remove, blob_id)
                    raise
        finally:
            if not lock.statistics().tasks_waiting and not lock.locked():
                self._locks.pop(blob_id, None)
        log.info("blobs.stored", extra=fields(size=grant.size))
        return True

    async def add_reader(self, blob_id: str, device_id: str) -> None:
        """Let ``device_id`` read a stored blob (its uploader uploading it again)."""
        await self.store.write(
            lambda conn: conn.execute(
                "INSERT OR IGNORE INTO blob_devices (blob_id, device_id) VALUES (?, ?)",
                (blob_id, device_id),
            )
        )

    # -- retention -----------------------------------------------------------------------

    async def purge(self, *, now: int, limit: int) -> tuple[int, int]:
        """Delete up to ``limit`` blobs that expired, or that no message named
        within ``attachments.unreferenced_minutes``, with their files; on the
        last batch also files without a row (crash leftovers, cut-off parts).
        Returns (rows deleted, bytes freed)."""
        unreferenced = now - math.ceil(self.settings.unreferenced_minutes * 60_000)

        def take(conn: Any) -> list[str]:
            rows = conn.execute(
                "SELECT blob_id FROM blobs WHERE expires_at <= ?"
                " OR (referenced_at IS NULL AND created_at <= ?) LIMIT ?",
                (now, unreferenced, limit),
            ).fetchall()
            ids = [str(r[0]) for r in rows]
            conn.executemany("DELETE FROM blobs WHERE blob_id = ?", [(b,) for b in ids])
            return ids

        gone = await self.store.write(take)
        freed = 0
        for blob_id in gone:
            async with self._lock(blob_id):  # not while an upload of it finishes
                if await self.store.read(partial(_owner_size, blob_id=blob_id)) is None:
                    freed += await trio.to_thread.run_sync(self.files.remove, blob_id)
            self._locks.pop(blob_id, None)
        if len(gone) < limit:
            freed += await self._sweep_orphans()
        if gone:
            log.info("blobs.purged", extra=fields(blobs=len(gone), bytes=freed))
        return len(gone), freed

    async def remove_file(self, blob_id: str) -> int:
        """Delete the file of a blob whose row is gone (an erased account's
        attachment); the bytes freed (0 when it was not there)."""
        async with self._lock(blob_id):  # not while an upload of it finishes
            freed = 0
            if await self.store.read(partial(_owner_size, blob_id=blob_id)) is None:
                freed = await trio.to_thread.run_sync(self.files.remove, blob_id)
        self._locks.pop(blob_id, None)
        return freed

    async def _sweep_orphans(self) -> int:
        known = set(
            await self.store.read(
                lambda conn: [str(r[0]) for r in conn.execute("SELECT blob_id FROM blobs")]
            )
        )
        cutoff = time.time() - ORPHAN_AGE_SECONDS
        entries = await trio.to_thread.run_sync(lambda: list(self.files.entries()))
        freed = 0
        for name, mtime, _size in entries:
            if mtime > cutoff or name in known or self._locks.get(name) is not None:
                continue
            if name.startswith(PART_PREFIX) or BLOB_ID.fullmatch(name):
                freed += await trio.to_thread.run_sync(self.files.remove_name, name)
        return freed

    async def stored_bytes(self, user_id: int) -> int:
        """Attachment bytes ``user_id`` holds (counted against the quota)."""
        return await self.store.read(lambda conn: _used(conn, user_id))
