"""The relay protocol core: bytes in, actions out. No sockets, no event loop.

Theory of operation
-------------------
One :class:`ServerConnection` per WebSocket connection holds the protocol
state of that connection. The I/O layer (``chatd.relay``) feeds it what
arrives and carries out what it returns:

* :meth:`ServerConnection.start` returns the ``hello`` frame to send first.
* :meth:`ServerConnection.receive_text` / :meth:`receive_bytes` take one
  complete WebSocket message and return a list of :data:`Action`\\ s: a
  :class:`Send` (an encoded frame), a :class:`Close` (code and reason), or a
  decoded client frame the core cannot answer itself (later capabilities:
  auth, messages), for the service layer.
* :meth:`ServerConnection.first_frame_timeout` and :meth:`idle_timeout` return
  the :class:`Close` to send when the I/O layer's timers fire.

A session may also be *gated* on consent (``consent_pending``, set by the
service layer: documents the user must accept first). While it is, every
frame but those in :data:`chatd.protocol.consent.GATE_OPEN_FRAMES` (and ping,
bye) is refused with ``consent_required``, which is not a bad frame.

The core never raises on peer input. A malformed frame becomes an ``error``
frame naming the field (and the connection stays open), until
``max_bad_frames`` of them close it with 1008. A binary message closes with
1003. Once closed, everything further is ignored.

Close codes (documented in docs/PROTOCOL.md) are the constants below.
"""

from __future__ import annotations

import enum
import typing
from dataclasses import dataclass
from typing import Final

import msgspec

from chatd.protocol.catalog import ClientFrame, ServerFrame
from chatd.protocol.consent import GATE_OPEN_FRAMES
from chatd.protocol.frames import (
    AUTH_FRAMES,
    ENROLLMENT_FRAMES,
    MAX_ID_CHARS,
    PROTOCOL_VERSION,
    Ack,
    Bye,
    Error,
    Hello,
    Limits,
    Login,
    Ping,
    Pong,
    Register,
    Resume,
)
from chatd.protocol.frames import Send as SendFrame
from chatd.protocol.rooms import RoomSend
from chatd.protocol.validation import ERR_BAD_FRAME, ERR_UNKNOWN_TYPE, Problem, explain

__all__ = ["ERR_BAD_FRAME", "ERR_UNKNOWN_TYPE"]

CLOSE_NORMAL: Final = 1000  # the client said goodbye
CLOSE_GOING_AWAY: Final = 1001  # the server is shutting down
CLOSE_PROTOCOL_ERROR: Final = 1002  # broken WebSocket framing
CLOSE_UNSUPPORTED_DATA: Final = 1003  # a binary message
CLOSE_INVALID_PAYLOAD: Final = 1007  # a text message that is not UTF-8
CLOSE_POLICY: Final = 1008  # timeouts, too many bad frames, slow consumer
CLOSE_TOO_BIG: Final = 1009  # a message over max_frame_bytes
CLOSE_INTERNAL_ERROR: Final = 1011  # a server bug; the client may reconnect
CLOSE_SESSION_EXPIRED: Final = 4001  # access token expired without a refresh
CLOSE_SESSION_REVOKED: Final = 4003  # logged out elsewhere, revoked, or account disabled

REASON_BYE: Final = "bye"
REASON_LOGGED_OUT: Final = "logged out"
REASON_SESSION_EXPIRED: Final = "session expired"
REASON_SESSION_REVOKED: Final = "session revoked"
REASON_AUTH_TIMEOUT: Final = "authentication timeout"
REASON_TOO_BIG: Final = "message too big"
REASON_FIRST_FRAME_TIMEOUT: Final = "first frame timeout"
REASON_IDLE_TIMEOUT: Final = "idle timeout"
REASON_TOO_MANY_BAD_FRAMES: Final = "too many bad frames"
REASON_SEND_QUEUE_FULL: Final = "send queue full"
REASON_BINARY: Final = "binary frames are not supported"
REASON_SHUTDOWN: Final = "server shutting down"
REASON_INTERNAL: Final = "internal error"

#: Error frame codes (and ERR_BAD_FRAME, ERR_UNKNOWN_TYPE from validation).
ERR_AUTH_REQUIRED: Final = "auth_required"  # log in (or resume) first
ERR_ALREADY_AUTHENTICATED: Final = "already_authenticated"  # one session per connection
ERR_MFA_ENROLLMENT_REQUIRED: Final = "mfa_enrollment_required"  # enroll TOTP first
ERR_CONSENT_REQUIRED: Final = "consent_required"  # accept the current terms first


@dataclass(frozen=True, slots=True)
class Send:
    """Send this encoded frame (one text message)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """Send a Close frame with this code and reason, then hang up."""

    code: int
    reason: str


Action = Send | Close | ClientFrame


class State(enum.Enum):
    NEW = "new"  # hello not sent yet
    AWAITING_FIRST_FRAME = "awaiting_first_frame"
    OPEN = "open"  # not authenticated yet: auth frames, ping and bye only
    AUTHENTICATED = "authenticated"
    RESTRICTED = "restricted"  # authenticated, but must enroll a second factor first
    CLOSED = "closed"


_decoder: Final = msgspec.json.Decoder(ClientFrame)
#: What an authenticated connection sends most.
_MESSAGING: Final = frozenset((SendFrame, Ack, RoomSend))
_SESSION_STARTS: Final = (Login, Register, Resume)
_encoder: Final = msgspec.json.Encoder()


#: Each client frame type by its ``type`` tag, for explaining refusals.
_FRAME_TYPES: Final = {
    str(t.__struct_config__.tag): t
    for t in typing.get_args(ClientFrame)
    if isinstance(t, type) and issubclass(t, msgspec.Struct)
}


def encode(frame: ServerFrame) -> bytes:
    return _encoder.encode(frame)


class ServerConnection:
    """Protocol state of one client connection (server side)."""

    def __init__(self, limits: Limits, *, server_name: str) -> None:
        self.limits = limits
        self.server_name = server_name
        self.state = State.NEW
        self.bad_frames = 0
        #: Kinds of documents the session must accept before anything else
        #: (set by the service layer; empty: not gated). Checked per frame in O(1).
        self.consent_pending: frozenset[str] = frozenset()

    def start(self) -> list[Action]:
        """The frames to send as soon as the WebSocket is open."""
        if self.state is not State.NEW:
            raise RuntimeError("start() is called once, before anything else")
        self.state = State.AWAITING_FIRST_FRAME
        hello = Hello(protocol=PROTOCOL_VERSION, server=self.server_name, limits=self.limits)
        return [Send(encode(hello))]

    def receive_text(self, data: str | bytes) -> list[Action]:
        """Handle one complete text message (as str, or its UTF-8 bytes)."""
        if self.state is State.CLOSED:
            return []
        if self.state is State.AWAITING_FIRST_FRAME:
            self.state = State.OPEN
        if isinstance(data, bytes):
            # Checked here: newer msgspec (0.23) reports bad UTF-8 as a JSON
            # DecodeError, which would make it a tolerated bad frame.
            try:
                data = data.decode("utf-8")
            except UnicodeDecodeError:
                return self._close(CLOSE_INVALID_PAYLOAD, "text frame is not valid UTF-8")
        try:
            frame = _decoder.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
            # RecursionError: nested deeper than msgspec's stack allows (explain
            # refuses anything past MAX_NESTING_DEPTH, before decoding again).
            return self._bad_frame(explain(data, _FRAME_TYPES, max_id_chars=MAX_ID_CHARS))
        return self._dispatch(frame)

    def receive_bytes(self, data: bytes) -> list[Action]:
        """Handle one binary message: the protocol is text only."""
        if self.state is State.CLOSED:
            return []
        return self._close(CLOSE_UNSUPPORTED_DATA, REASON_BINARY)

    def first_frame_timeout(self) -> list[Action]:
        if self.state is not State.AWAITING_FIRST_FRAME:
            return []
        return self._close(CLOSE_POLICY, REASON_FIRST_FRAME_TIMEOUT)

    def idle_timeout(self) -> list[Action]:
        if self.state is State.CLOSED:
            return []
        return self._close(CLOSE_POLICY, REASON_IDLE_TIMEOUT)

    def send_queue_full(self) -> list[Action]:
        if self.state is State.CLOSED:
            return []
        return self._close(CLOSE_POLICY, REASON_SEND_QUEUE_FULL)

    def shutdown(self) -> list[Action]:
        if self.state is State.CLOSED:
            return []
        return self._close(CLOSE_GOING_AWAY, REASON_SHUTDOWN)

    def internal_error(self) -> list[Action]:
        if self.state is State.CLOSED:
            return []
        return self._close(CLOSE_INTERNAL_ERROR, REASON_INTERNAL)

    # -- internals -----------------------------------------------------------

    def _dispatch(self, frame: ClientFrame) -> list[Action]:
        if (
            self.state is State.AUTHENTICATED
            and not self.consent_pending
            and type(frame) in _MESSAGING
        ):
            return [frame]  # the common case, first
        if isinstance(frame, Ping):
            return [Send(encode(Pong(id=frame.id)))]
        if isinstance(frame, Bye):
            return self._close(CLOSE_NORMAL, REASON_BYE)
        request_id = getattr(frame, "id", None)
        if self.state is State.OPEN and not isinstance(frame, AUTH_FRAMES):
            return self._refuse(ERR_AUTH_REQUIRED, "log in, register or resume first", request_id)
        if self.state in (State.AUTHENTICATED, State.RESTRICTED) and isinstance(
            frame, _SESSION_STARTS
        ):
            return self._refuse(
                ERR_ALREADY_AUTHENTICATED, "this connection already has a session", request_id
            )
        if self.state is State.RESTRICTED and not isinstance(frame, ENROLLMENT_FRAMES):
            return self._refuse(
                ERR_MFA_ENROLLMENT_REQUIRED,
                "your role requires a second factor: enroll with mfa_enroll and mfa_confirm",
                request_id,
            )
        if (
            self.consent_pending
            and self.state is State.AUTHENTICATED
            and not isinstance(frame, GATE_OPEN_FRAMES)
        ):
            # Not a bad frame: the rule may have changed under the client.
            kinds = " and ".join(sorted(self.consent_pending))
            return self.error(
                ERR_CONSENT_REQUIRED,
                f"accept the current {kinds} first (consent_status lists them, consent_accept"
                " accepts)",
                request_id=request_id,
            )
        return [frame]  # for the service layer

    def _refuse(self, code: str, message: str, request_id: str | None) -> list[Action]:
        self.bad_frames += 1
        actions: list[Action] = [Send(encode(Error(code=code, message=message, id=request_id)))]
        if self.bad_frames >= self.limits.max_bad_frames:
            actions += self._close(CLOSE_POLICY, REASON_TOO_MANY_BAD_FRAMES)
        return actions

    # -- called by the service layer --------------------------------------------------

    @property
    def authenticated(self) -> bool:
        return self.state in (State.AUTHENTICATED, State.RESTRICTED)

    def session_started(self, *, restricted: bool) -> None:
        """A login, registration or resume succeeded on this connection."""
        if self.state is not State.CLOSED:
            self.state = State.RESTRICTED if restricted else State.AUTHENTICATED

    def reply(self, frame: ServerFrame) -> list[Action]:
        if self.state is State.CLOSED:
            return []
        return [Send(encode(frame))]

    def error(
        self,
        code: str,
        message: str,
        *,
        request_id: str | None,
        field: str | None = None,
        retry_after: float | None = None,
    ) -> list[Action]:
        """A refused request: the connection stays open (not a bad frame)."""
        frame = Error(
            code=code, message=message, field=field, id=request_id, retry_after=retry_after
        )
        return self.reply(frame)

    def logged_out(self) -> list[Action]:
        if self.state is State.CLOSED:
            return []
        return self._close(CLOSE_NORMAL, REASON_LOGGED_OUT)

    def session_expired(self) -> list[Action]:
        if self.state is State.CLOSED:
            return []
        return self._close(CLOSE_SESSION_EXPIRED, REASON_SESSION_EXPIRED)

    def session_revoked(self) -> list[Action]:
        if self.state is State.CLOSED:
            return []
        return self._close(CLOSE_SESSION_REVOKED, REASON_SESSION_REVOKED)

    def auth_timeout(self) -> list[Action]:
        if self.authenticated or self.state is State.CLOSED:
            return []
        return self._close(CLOSE_POLICY, REASON_AUTH_TIMEOUT)

    def _close(self, code: int, reason: str) -> list[Action]:
        self.state = State.CLOSED
        return [Close(code, reason)]

    def _bad_frame(self, problem: Problem) -> list[Action]:
        self.bad_frames += 1
        error = Error(
            code=problem.code, message=problem.message, field=problem.field, id=problem.request_id
        )
        actions: list[Action] = [Send(encode(error))]
        if self.bad_frames >= self.limits.max_bad_frames:
            actions += self._close(CLOSE_POLICY, REASON_TOO_MANY_BAD_FRAMES)
        return actions
