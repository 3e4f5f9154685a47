"""Wire frames of attachments (docs/PROTOCOL.md, section "Attachments").

An attachment is a file the sender's client encrypted (secretstream) and
uploads as ciphertext over HTTP to the blob listener, with a short-lived
signed URL it asks the relay for (``blob_upload``). The key travels inside
the end-to-end-encrypted message; the ``send`` or ``room_send`` that carries
it names the blob in ``blob_ids``, so the server learns which devices (or
which room) may ask for a download URL (``blob_download``). These frames are
announced by the ``attachments`` name in ``hello.features``.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

from chatd.protocol.frames import Frame, RequestId

#: The hex SHA-256 of an attachment's ciphertext: its id and its file name.
BlobId = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
#: Blobs one message may name.
MAX_BLOBS_PER_MESSAGE: Final = 16
BlobIds = Annotated[list[BlobId], msgspec.Meta(max_length=MAX_BLOBS_PER_MESSAGE)]
FEATURE: Final = "attachments"

# -- client -> server ---------------------------------------------------------------


class BlobUpload(Frame, tag="blob_upload"):
    """Ask for a signed URL to PUT ``size`` bytes of ciphertext whose SHA-256
    is ``sha256`` (the blob id). Answered by ``blob_url``."""

    id: RequestId
    sha256: BlobId
    size: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]


class BlobDownload(Frame, tag="blob_download"):
    """Ask for a signed URL to GET a blob that a message to this device (or to
    a room you are a member of) named. Answered by ``blob_url``."""

    id: RequestId
    blob_id: BlobId


# -- server -> client ---------------------------------------------------------------


class BlobUrl(Frame, tag="blob_url"):
    """A signed URL, valid until ``expires_at`` (unix ms), for one method on one blob."""

    # ``id`` is filled in by the relay, as for room answers.

    id: str
    blob_id: str
    method: Literal["PUT", "GET"]
    url: str
    size: int
    expires_at: int


BLOB_REQUESTS: Final = (BlobUpload, BlobDownload)
