"""Errors of the client library::

ChatdError
└── ClientError                 anything the client library raises on purpose
    ├── ClientStoreError        the local store cannot be opened (wrong key?) or used
    ├── ServerRefusedError      the server answered a request with an error frame
    │   └── LoginError          login/resume/refresh refused: log in again
    ├── ConnectionLostError     the connection dropped before the reply came
    │   └── CertificateError    the server's TLS certificate is not trusted (not retried)
    ├── DecryptionError         a ciphertext could not be decrypted or parsed
    │   └── RoomMismatchError   a room message's plaintext names another room
    ├── KeyClaimError           a peer device's keys could not be claimed or checked
    ├── IdentityChangedError    a known device now shows different identity keys
    ├── SendError               a message could not be sent to every device
    └── VerificationError       a device verification failed or was cancelled (``code``)
"""

from __future__ import annotations

from chatd.errors import ChatdError


class ClientError(ChatdError):
    """Root of the client library's errors. ``str(err)`` never holds a secret."""


class ClientStoreError(ClientError):
    pass


class ServerRefusedError(ClientError):
    """An ``error`` frame; ``code`` is the protocol error code."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        self.code = code
        self.message = message  # the server's text for people (never a secret)
        self.field = field
        super().__init__(f"{code}: {message}" + (f" ({field})" if field else ""))


class LoginError(ServerRefusedError):
    pass


class ConnectionLostError(ClientError):
    pass


class CertificateError(ConnectionLostError):
    """The server's TLS certificate failed verification (unknown issuer,
    expired, another host name...). The message names the problem; trust the
    server's CA with ``ssl_context`` (``chat --ca FILE``) if it is right."""


class DecryptionError(ClientError):
    pass


class RoomMismatchError(DecryptionError):
    """A room message decrypted, but its plaintext names another room than
    its envelope: it was moved (by the server, or a member replaying it)."""


class KeyClaimError(ClientError):
    pass


class IdentityChangedError(ClientError):
    pass


class SendError(ClientError):
    pass


class VerificationError(ClientError):
    """A SAS verification ended without marking the device verified.

    ``code`` says why (``mac_mismatch``, ``mismatched_sas``, ``timeout``,
    ``user``, ... see docs/CLIENT.md); ``remote`` is True when the other
    device cancelled. ``reason`` is text for people, from us or from the peer.
    """

    def __init__(self, code: str, reason: str, *, remote: bool = False) -> None:
        self.code = code
        self.reason = reason
        self.remote = remote
        who = "the other device cancelled the verification" if remote else "verification failed"
        super().__init__(f"{who} ({code})" + (f": {reason}" if reason else ""))
