"""chatd's client library: an end-to-end encrypted Trio client (see docs/CLIENT.md).

``open_client`` connects a device and yields a :class:`Client`; the Olm
cryptography lives in :mod:`chatd.client.crypto`, the encrypted local store in
:mod:`chatd.client.store`, and the connection (login, keepalive, token refresh,
reconnects) in :mod:`chatd.client.connection`, and interactive device
verification (SAS emoji) in :mod:`chatd.client.sas` and
:mod:`chatd.client.verification`.
"""

from .client import Client, Member, ReceivedMessage
from .crypto import fingerprint
from .errors import (
    ClientError,
    ClientStoreError,
    ConnectionLostError,
    DecryptionError,
    IdentityChangedError,
    KeyClaimError,
    LoginError,
    SendError,
    ServerRefusedError,
    VerificationError,
)
from .opening import key_from_passphrase, open_client
from .sas import SAS_EMOJI, ShortAuthString
from .store import DeviceRecord, HistoryEntry
from .verification import Verification

__all__ = [
    "Client",
    "ClientError",
    "ClientStoreError",
    "ConnectionLostError",
    "DecryptionError",
    "DeviceRecord",
    "HistoryEntry",
    "IdentityChangedError",
    "KeyClaimError",
    "LoginError",
    "Member",
    "ReceivedMessage",
    "SAS_EMOJI",
    "SendError",
    "ServerRefusedError",
    "ShortAuthString",
    "Verification",
    "VerificationError",
    "fingerprint",
    "key_from_passphrase",
    "open_client",
]
