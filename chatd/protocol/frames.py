"""Wire frames of the client protocol, version 1 (see docs/PROTOCOL.md).

Every frame is one WebSocket *text* message holding one JSON object whose
``type`` field names the frame. Frames are strict msgspec structs: decoding
rejects unknown fields, wrong types and out-of-range values, and reports the
JSON path of the offending field.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec

PROTOCOL_VERSION: Final = 1

#: Longest client-chosen request id, in characters.
MAX_ID_CHARS: Final = 64

RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]


class Frame(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, tag_field="type"):
    """Base of every frame; ``type`` is the tag."""


# -- client -> server ---------------------------------------------------------


class Ping(Frame, tag="ping"):
    """Keeps the connection alive; answered by ``pong`` with the same id."""

    id: RequestId | None = None


class Bye(Frame, tag="bye"):
    """The client is leaving; the server closes with 1000."""


# Field limits (characters). Long enough for every legitimate value, short
# enough that nothing unbounded reaches Argon2 or the database.
Username = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Password = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
Token = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Code = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
DeviceName = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
SessionIds = Annotated[list[int], msgspec.Meta(max_length=100)]
DeviceId = Annotated[str, msgspec.Meta(min_length=1, max_length=32, pattern=r"^[A-Z2-7]+$")]
#: Unpadded standard base64 of a 32-byte public key, and of a 64-byte signature.
PublicKey = Annotated[
    str, msgspec.Meta(min_length=43, max_length=44, pattern=r"^[A-Za-z0-9+/]{43}=?$")
]
Signature = Annotated[
    str, msgspec.Meta(min_length=86, max_length=88, pattern=r"^[A-Za-z0-9+/]{86}(==)?$")
]
KeyId = Annotated[str, msgspec.Meta(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9+/=_-]+$")]
UserId = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
MAX_KEYS_PER_UPLOAD: Final = 100
MAX_CLAIMS: Final = 100


class Login(Frame, tag="login"):
    """Password login; ``totp`` or ``recovery_code`` when the account has MFA."""

    id: RequestId
    username: Username
    password: Password
    device_name: DeviceName
    totp: Code | None = None
    recovery_code: Code | None = None
    device_id: DeviceId | None = None  # log in again as this existing device of yours


class Register(Frame, tag="register"):
    """Redeem an invite code: create the account and log in."""

    id: RequestId
    invite_code: Token
    username: Username
    password: Password
    device_name: DeviceName


class Resume(Frame, tag="resume"):
    """Continue a session on a new connection with its access token."""

    id: RequestId
    access_token: Token


class Refresh(Frame, tag="refresh"):
    """Rotate tokens; allowed before and after authentication."""

    id: RequestId
    refresh_token: Token


class Logout(Frame, tag="logout"):
    id: RequestId


class ListSessions(Frame, tag="list_sessions"):
    id: RequestId


class RevokeSessions(Frame, tag="revoke_sessions"):
    """Revoke some of your sessions by id, or all but this one."""

    id: RequestId
    session_ids: SessionIds = []
    all_others: bool = False


class ChangePassword(Frame, tag="change_password"):
    id: RequestId
    current_password: Password
    new_password: Password
    totp: Code | None = None


class MfaEnroll(Frame, tag="mfa_enroll"):
    id: RequestId
    password: Password
    totp: Code | None = None


class MfaConfirm(Frame, tag="mfa_confirm"):
    id: RequestId
    code: Code


class MfaDisable(Frame, tag="mfa_disable"):
    id: RequestId
    password: Password
    code: Code


class NewRecoveryCodes(Frame, tag="new_recovery_codes"):
    id: RequestId
    password: Password
    code: Code


class DeviceKeys(msgspec.Struct, forbid_unknown_fields=True):
    """A device's identity keys, self-signed (see ``chatd.e2ee.signing``)."""

    ed25519: PublicKey
    curve25519: PublicKey
    signature: Signature


class SignedKey(msgspec.Struct, forbid_unknown_fields=True):
    """A one-time or fallback Curve25519 key, signed by the device's Ed25519 key."""

    key_id: KeyId
    curve25519: PublicKey
    signature: Signature


class KeysUpload(Frame, tag="keys_upload"):
    """Publish this device's identity keys (once), one-time keys and fallback key."""

    id: RequestId
    device_keys: DeviceKeys | None = None
    one_time_keys: Annotated[list[SignedKey], msgspec.Meta(max_length=MAX_KEYS_PER_UPLOAD)] = []
    fallback_key: SignedKey | None = None


class DeviceRef(msgspec.Struct, forbid_unknown_fields=True):
    user_id: UserId
    device_id: DeviceId


class KeysClaim(Frame, tag="keys_claim"):
    """Take one one-time key (or the fallback key) of each listed device."""

    id: RequestId
    devices: Annotated[list[DeviceRef], msgspec.Meta(min_length=1, max_length=MAX_CLAIMS)]


class Directory(Frame, tag="directory"):
    """List the team: members, their devices and the devices' identity keys."""

    id: RequestId


MessageId = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
        description="A UUID in lowercase canonical form, chosen by the sender.",
    ),
]
MAX_ENVELOPES_PER_SEND: Final = 200
#: Characters of one ciphertext (opaque to the server; the whole frame is also
#: bounded by relay.max_frame_bytes).
MAX_CIPHERTEXT_CHARS: Final = 65_536


class OutgoingEnvelope(msgspec.Struct, forbid_unknown_fields=True):
    user_id: UserId
    device_id: DeviceId
    ciphertext: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_CIPHERTEXT_CHARS)]


class Send(Frame, tag="send"):
    """One message: a ciphertext for every current device of every recipient
    (and for the sender's own other devices). With ``skip_full``, devices whose
    queue is full are left out (listed in ``sent.skipped``) instead of the
    whole send being refused: for key shares, which must reach everyone else."""

    id: RequestId
    message_id: MessageId
    envelopes: Annotated[
        list[OutgoingEnvelope], msgspec.Meta(min_length=1, max_length=MAX_ENVELOPES_PER_SEND)
    ]
    skip_full: bool = False
    # Attachments (chatd.protocol.blobs): the blobs this message carries the keys of.
    blob_ids: Annotated[
        list[Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]],
        msgspec.Meta(max_length=16),
    ] = []


class Ack(Frame, tag="ack"):
    """Everything delivered to this device up to and including ``up_to`` is safe;
    the server deletes it. Answered with ``ok`` only when ``id`` is given."""

    up_to: Annotated[int, msgspec.Meta(ge=1)]
    id: RequestId | None = None


class RemoveDevice(Frame, tag="remove_device"):
    """Remove one of your devices (not the one sending this): its sessions end, its
    keys and queue are deleted, and peers see a new device_list_version."""

    id: RequestId
    device_id: DeviceId


class Typing(Frame, tag="typing"):
    """Tell one user's online devices that you are (or stopped) typing. Never stored."""

    to_user_id: UserId
    active: bool


MAX_WATCH_USERS: Final = 1_000


class WhoIsOnline(Frame, tag="who_is_online"):
    """Who is online: everyone, or (with ``user_ids``) which of these users,
    who are then watched: their presence changes are pushed from now on."""

    id: RequestId
    user_ids: Annotated[list[UserId], msgspec.Meta(max_length=MAX_WATCH_USERS)] | None = None


#: Frames that start a session: only these (and ping, bye, refresh) before one.
AUTH_FRAMES = (Login, Register, Resume, Refresh)
#: Frames a session that must still enroll a second factor may send.
ENROLLMENT_FRAMES = (Refresh, Logout, MfaEnroll, MfaConfirm, ListSessions)


# -- server -> client ---------------------------------------------------------


class Limits(msgspec.Struct, forbid_unknown_fields=True):
    """The limits a client must respect, announced in ``hello``."""

    max_frame_bytes: int
    handshake_timeout_seconds: float  # also the deadline for the first frame after hello
    idle_timeout_seconds: float
    send_queue_frames: int
    max_bad_frames: int


#: What this server supports beyond the protocol's first release (PROTOCOL §16).
FEATURES: Final = (
    "who_is_online.user_ids",
    "rooms",
    "push",
    "attachments",
    "consent",
    "account_export",
)


class Hello(Frame, tag="hello"):
    protocol: int
    server: str
    limits: Limits
    features: list[str] = msgspec.field(default_factory=lambda: list(FEATURES))


class Pong(Frame, tag="pong"):
    id: str | None = None


class Error(Frame, tag="error"):
    """A request could not be served. ``field`` is a JSON path like ``$.id``."""

    code: str
    message: str
    field: str | None = None
    id: str | None = None
    retry_after: float | None = None  # seconds, with code rate_limited


class User(msgspec.Struct):
    id: int
    username: str
    role: str


class ConsentDocument(msgspec.Struct, omit_defaults=True):
    """The current version of a document the user must accept (PROTOCOL §8.15)."""

    kind: str  # terms | privacy
    version: str
    url: str | None = None  # where to read it
    title: str | None = None


class Session(Frame, tag="session"):
    """Answer to login, register and resume: the connection is now authenticated.

    Tokens are present only when new ones were issued (login, register).
    """

    id: str
    session_id: int
    user: User
    access_expires_at: int  # unix ms
    expires_at: int  # unix ms: absolute end of the session
    mfa_enrollment_required: bool
    device_id: str = ""
    access_token: str | None = None
    refresh_token: str | None = None
    # Documents to accept before anything else (PROTOCOL §8.15); omitted when none.
    consent_required: list[ConsentDocument] = []


class Tokens(Frame, tag="tokens"):
    """Answer to refresh: the new token pair (the old refresh token is spent)."""

    id: str
    session_id: int
    access_token: str
    access_expires_at: int
    refresh_token: str
    expires_at: int
    # As in ``session``: documents this connection must accept first; omitted when none.
    consent_required: list[ConsentDocument] = []


class NewTokens(msgspec.Struct):
    """A session's new token pair, in ``ok.tokens`` (the fields of ``tokens``)."""

    session_id: int
    access_token: str
    access_expires_at: int
    refresh_token: str
    expires_at: int


class Ok(Frame, tag="ok"):
    id: str
    # After change_password and mfa_disable: this session's new token pair
    # (an optional field, so clients that predate it still see a plain ok;
    # recovery_codes carries one the same way).
    tokens: NewTokens | None = None


class SessionEntry(msgspec.Struct):
    session_id: int
    device_name: str
    created_at: int
    last_seen_at: int
    ip: str  # masked
    expires_at: int
    current: bool


class Sessions(Frame, tag="sessions"):
    id: str
    sessions: list[SessionEntry]


class Revoked(Frame, tag="revoked"):
    id: str
    session_ids: list[int]


class MfaEnrollment(Frame, tag="mfa_enrollment"):
    """The TOTP secret to put in an authenticator app; active after mfa_confirm."""

    id: str
    secret: str
    provisioning_uri: str


class RecoveryCodes(Frame, tag="recovery_codes"):
    """Ten single-use recovery codes, shown once; and this session's new
    token pair (optional field, as on ``ok``)."""

    id: str
    codes: list[str]
    tokens: NewTokens | None = None


class KeyCount(Frame, tag="key_count"):
    """This device's unclaimed one-time keys; answer to keys_upload, and pushed when
    claims take the count below the threshold (then without ``id``)."""

    one_time_key_count: int
    fallback_key: bool
    upload_wanted: bool
    id: str | None = None


class ClaimedKey(msgspec.Struct):
    user_id: int
    device_id: str
    key_id: str
    curve25519: str
    signature: str
    fallback: bool  # the device had no one-time key left: this is its fallback key


class KeysClaimed(Frame, tag="keys_claimed"):
    id: str
    keys: list[ClaimedKey]
    missing: list[DeviceRef]  # unknown devices, devices without keys


class DirectoryDevice(msgspec.Struct):
    device_id: str
    name: str
    ed25519: str | None
    curve25519: str | None
    signature: str | None


class Member(msgspec.Struct):
    user_id: int
    username: str
    device_list_version: int  # changes whenever a device is added, removed or keyed
    devices: list[DirectoryDevice]


class Members(Frame, tag="members"):
    id: str
    members: list[Member]


class Sent(Frame, tag="sent"):
    """The message is durably queued for (or already acknowledged by) every device."""

    id: str
    message_id: str
    envelopes: int
    # room_send, or send with skip_full: devices whose queue was full, which do not get it
    skipped: list[DeviceRef] = msgspec.field(default_factory=list)


class DeviceMismatch(Frame, tag="device_mismatch"):
    """The send did not name exactly the current devices: fix the list and resend."""

    id: str
    message_id: str
    missing: list[DeviceRef]  # current devices the send left out
    stale: list[DeviceRef]  # devices the send named that are not current


class Envelope(msgspec.Struct, omit_defaults=True):
    envelope_id: int  # queue position: acknowledge with ack up_to
    kind: str  # message | delivered | expired | room_message | room_event
    message_id: str
    sent_at: int  # unix ms
    sender_user_id: int | None = None  # message
    sender_device_id: str | None = None  # message
    ciphertext: str | None = None  # message
    device_id: str | None = None  # receipt: the recipient device it is about
    room_id: int | None = None  # room_message, room_event, and receipts about a room message
    event: msgspec.Raw | None = None  # room_event: a RoomEvent, encoded once by the server


class Deliver(Frame, tag="deliver"):
    """Queued envelopes for this device, in queue order."""

    envelopes: list[Envelope]


class TypingNotice(Frame, tag="typing_notice"):
    user_id: int
    active: bool


class Presence(Frame, tag="presence"):
    """Who is online: the answer to who_is_online (with ``id``), and pushed,
    coalesced, to the connections that watch a user when that user comes
    online or goes offline (PROTOCOL §8.6). Ephemeral: never stored."""

    online: list[int]
    offline: list[int] = []
    id: str | None = None
