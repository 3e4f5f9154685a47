"""Attachment requests on the relay: signed URLs for the blob listener.

``blob_upload`` and ``blob_download`` are answered with ``blob_url``; the
``blob_ids`` of a ``send`` or ``room_send`` are recorded as references
before the message is queued (:meth:`chatd.blobs.BlobService.refer`). A
refusal is a :class:`~chatd.blobs.BlobError`, which the dispatcher turns
into an ``error`` frame naming the field.
"""

from __future__ import annotations

from typing import Final

from chatd.auth.models import SessionGrant
from chatd.blobs.service import ERR_UNAVAILABLE, BlobError, BlobService
from chatd.protocol import blobs as b

BLOB_REQUESTS: Final = b.BLOB_REQUESTS


def unavailable(field: str | None = None) -> BlobError:
    return BlobError(
        ERR_UNAVAILABLE, "this server does not store attachments (no blob listener)", field=field
    )


async def serve_blob_request(
    blobs: BlobService | None, grant: SessionGrant, frame: b.BlobUpload | b.BlobDownload
) -> b.BlobUrl:
    """Carry out one attachment request for this session's device; its answer.
    Raises BlobError."""
    if blobs is None:
        raise unavailable()
    match frame:
        case b.BlobUpload():
            url = await blobs.upload_url(grant.user_id, grant.device_id, frame.sha256, frame.size)
        case b.BlobDownload():
            url = await blobs.download_url(grant.user_id, grant.device_id, frame.blob_id)
    url.id = frame.id
    return url
