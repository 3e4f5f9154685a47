"""Attachments: ciphertext blobs behind expiring signed URLs.

* :mod:`chatd.blobs.signing`: the signed URLs (HMAC-SHA256), pure.
* :mod:`chatd.blobs.files`: the content-addressed files in ``<data_dir>/blobs``.
* :mod:`chatd.blobs.service`: who may upload and download what (quotas,
  references), for the relay and the listener, and the retention job.
* :mod:`chatd.blobs.http`: the blob listener (a minimal ASGI app on hypercorn).
"""

from chatd.blobs.service import BlobError, BlobService
from chatd.blobs.signing import UrlSigner

__all__ = ["BlobError", "BlobService", "UrlSigner"]
