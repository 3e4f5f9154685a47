"""Wire frames of the account export (docs/PROTOCOL.md, section "Account export").

A logged-in user asks for the export of their own account with
``export_account``, re-authenticated like a password change (the password,
and the TOTP or a recovery code when MFA is on). The answer, ``export_url``,
is a short-lived signed URL on the blob listener; a plain HTTP GET of it
streams the ZIP (``application/zip``). These frames are announced by
``account_export`` in ``hello.features``.
"""

from __future__ import annotations

from typing import Final

from chatd.protocol.frames import Code, Frame, Password, RequestId

FEATURE: Final = "account_export"

# -- client -> server ---------------------------------------------------------------


class ExportAccount(Frame, tag="export_account"):
    """Ask for a URL to download everything the server holds about this account."""

    id: RequestId
    password: Password
    totp: Code | None = None  # or a recovery code, when MFA is on


# -- server -> client ---------------------------------------------------------------


class ExportUrl(Frame, tag="export_url"):
    """A signed URL, valid until ``expires_at`` (unix ms), to GET the export once
    or more; it works only while the account is enabled."""

    id: str
    url: str
    expires_at: int


EXPORT_REQUESTS: Final = (ExportAccount,)
