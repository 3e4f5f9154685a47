"""The account export on the relay: ``export_account`` -> ``export_url``.

The user re-authenticates (password, and TOTP or a recovery code when MFA is
on, with the same backoff as a password change); the answer is a URL on the
blob listener, signed with the blob URL key for this user and device, valid
for ``privacy.export_url_seconds``. The download itself is
:meth:`chatd.blobs.http.BlobApp._export`.
"""

from __future__ import annotations

from typing import Final

from chatd.auth.models import Peer, SessionGrant
from chatd.auth.service import AuthService
from chatd.blobs.service import BlobService
from chatd.blobs.signing import ExportGrant, export_path
from chatd.protocol import export as x
from chatd.relay.blobs import unavailable
from chatd.store import now_ms

EXPORT_REQUESTS: Final = x.EXPORT_REQUESTS


async def serve_export_request(
    auth: AuthService,
    blobs: BlobService | None,
    grant: SessionGrant,
    frame: x.ExportAccount,
    peer: Peer,
    *,
    lifetime_seconds: float,
) -> x.ExportUrl:
    """Re-authenticate, then sign the export URL. Raises AuthError (a wrong
    password: reauth_failed, naming $.password) or BlobError (no listener)."""
    if blobs is None:
        raise unavailable()
    await auth.confirm_identity(grant, frame.password, frame.totp, peer, "account_export")
    expires_at = now_ms() + int(lifetime_seconds * 1000)
    path = export_path(
        blobs.signer,
        ExportGrant(user_id=grant.user_id, device_id=grant.device_id, expires_at=expires_at),
    )
    return x.ExportUrl(id=frame.id, url=blobs.base_url + path, expires_at=expires_at)
