"""chatd's client library: an end-to-end encrypted Trio client (see docs/CLIENT.md).

``open_client`` connects a device and yields a :class:`Client`; the Olm
cryptography lives in :mod:`chatd.client.crypto`, the encrypted local store in
:mod:`chatd.client.store`, and the connection (login, keepalive, token refresh,
reconnects) in :mod:`chatd.client.connection`, and interactive device
verification (SAS emoji) in :mod:`chatd.client.sas` and
:mod:`chatd.client.verification`. Rooms (Megolm) are ``client.rooms``
(:mod:`chatd.client.rooms`) and ``client.room_events()``. Attachments
(files encrypted here, uploaded as ciphertext) are ``client.send_file`` and
``client.save_file`` (:mod:`chatd.client.attachments`).
"""

from .account import Account, SessionInfo, TotpSecret
from .attachments import (
    DEFAULT_MEDIA_TYPES,
    Attachment,
    AttachmentError,
    AttachmentMismatchError,
)
from .client import Client, Member
from .consent import AcceptConsent, ConsentDocument, ConsentRequired, ConsentStatus
from .crypto import fingerprint
from .errors import (
    CertificateError,
    ClientError,
    ClientStoreError,
    ConnectionLostError,
    DecryptionError,
    IdentityChangedError,
    KeyClaimError,
    LoginError,
    RoomMismatchError,
    SendError,
    ServerRefusedError,
    VerificationError,
)
from .inbound import Activity, PresenceChange, ReceivedMessage, TypingNotice
from .megolm import RoomSettings
from .opening import EnrollTotp, check_transport, key_from_passphrase, open_client
from .room_delivery import RoomDelivery
from .room_events import (
    BAD_CIPHERTEXT,
    CANNOT_DECRYPT,
    KEY_MISSING,
    REPLAY,
    WRONG_ROOM,
    RoomDeliveryChanged,
    RoomEventItem,
    RoomInvitation,
    RoomMessage,
    RoomUndecryptable,
    RoomUpdate,
)
from .room_store import RoomInfo
from .rooms import RoomList, RoomMember, RoomMembers, Rooms
from .sas import SAS_EMOJI, ShortAuthString
from .store import DeviceRecord, HistoryEntry
from .verification import Verification

__all__ = [
    "AcceptConsent",
    "Account",
    "Activity",
    "Attachment",
    "AttachmentError",
    "AttachmentMismatchError",
    "BAD_CIPHERTEXT",
    "CANNOT_DECRYPT",
    "CertificateError",
    "DEFAULT_MEDIA_TYPES",
    "Client",
    "ConsentDocument",
    "ConsentRequired",
    "ConsentStatus",
    "ClientError",
    "ClientStoreError",
    "ConnectionLostError",
    "DecryptionError",
    "DeviceRecord",
    "EnrollTotp",
    "HistoryEntry",
    "IdentityChangedError",
    "KEY_MISSING",
    "KeyClaimError",
    "LoginError",
    "Member",
    "PresenceChange",
    "REPLAY",
    "ReceivedMessage",
    "RoomDelivery",
    "RoomDeliveryChanged",
    "RoomEventItem",
    "RoomInfo",
    "RoomInvitation",
    "RoomList",
    "RoomMember",
    "RoomMembers",
    "RoomMessage",
    "RoomMismatchError",
    "RoomSettings",
    "RoomUndecryptable",
    "RoomUpdate",
    "Rooms",
    "SAS_EMOJI",
    "SendError",
    "SessionInfo",
    "ServerRefusedError",
    "ShortAuthString",
    "TotpSecret",
    "TypingNotice",
    "Verification",
    "VerificationError",
    "WRONG_ROOM",
    "check_transport",
    "fingerprint",
    "key_from_passphrase",
    "open_client",
]
