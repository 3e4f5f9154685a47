"""Hostile input for a running relay: Hypothesis strategies and a client
that checks what the server answers. Used by tests/test_fuzz.py (a bounded,
derandomized run in the suite) and bench/fuzz.py (the long run).

A *case* is what one hostile client sends on one connection, before or
after login (a session resumed by :class:`Fuzzer`):

* a **frame**: every client frame type of ``chatd.protocol.catalog``,
  built from its declared fields, each of them present with a value of the
  right shape, a hostile value (wrong type, out of range, huge, deep,
  unicode), or missing; sometimes with unknown fields or a foreign ``type``;
* **JSON**: arbitrary JSON values and text that is not JSON at all;
* **wire**: raw WebSocket frames: reserved opcodes and bits, unmasked
  frames, fragmented control frames, non-minimal and impossible lengths,
  invalid UTF-8, Close frames with bad codes, fragments interleaved with
  control frames and with other messages, messages over the size limit.

Text messages (frame and JSON cases) may go out in several fragments.
After the case the client sends a ``ping`` as a fence and reads until its
``pong`` or a Close. :meth:`Fuzzer.run_case` raises :class:`FuzzFailure`
unless what came back keeps the rules of docs/PROTOCOL.md sections 9 and 12:

* a Close frame always comes before the server hangs up, with a documented
  code (never 1011), or the echo of the client's own Close;
* a text message the strict decoder refuses gets an ``error`` frame;
* a connection that was not closed answers the fence.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Request,
    TextMessage,
)

from chatd.protocol import core
from chatd.protocol.catalog import ClientFrame

#: Close codes the server may send (docs/PROTOCOL.md section 12); 1011 is a bug.
DOCUMENTED_CLOSES: Final = frozenset(
    {
        core.CLOSE_NORMAL,
        core.CLOSE_GOING_AWAY,
        core.CLOSE_PROTOCOL_ERROR,
        core.CLOSE_UNSUPPORTED_DATA,
        core.CLOSE_INVALID_PAYLOAD,
        core.CLOSE_POLICY,
        core.CLOSE_TOO_BIG,
        core.CLOSE_SESSION_EXPIRED,
        core.CLOSE_SESSION_REVOKED,
    }
)
#: Error codes a frame the strict decoder refuses gets (before login, a frame
#: that decodes but is not an auth frame gets auth_required instead).
BAD_FRAME_CODES: Final = frozenset({"bad_frame", "unknown_type", "auth_required"})
MAX_MESSAGE: Final = 65_536  # relay.max_frame_bytes of the fuzzed daemon (its default)
MAX_LOGIN_WAIT: Final = 10.0  # seconds the fuzzer waits out a back-off before it gives up
ANSWER_TIMEOUT: Final = 15.0  # seconds a case may take to be answered (a login hashes)

_decoder: Final = msgspec.json.Decoder(ClientFrame)
_FRAME_TYPES: Final = [t for t in typing.get_args(ClientFrame) if isinstance(t, type)]


#: Closes a timer makes, which may come before a case's answer.
_TIMERS: Final = frozenset(
    {
        core.REASON_AUTH_TIMEOUT,
        core.REASON_IDLE_TIMEOUT,
        core.REASON_FIRST_FRAME_TIMEOUT,
        core.REASON_SHUTDOWN,
    }
)


class FuzzFailure(AssertionError):
    """The server broke a rule; the message says which, and what was sent."""


# -- strategies: values --------------------------------------------------------------

_INT64: Final = 2**63 - 1
hostile_scalars: Final = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, -1, 1, _INT64, _INT64 + 1, -(2**63) - 1, 2**64, 10**30]),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=80),
    st.sampled_from(["", "\x00", "\ud7ff\ue000", "\u202e", "A" * 65, "x" * 1025, "é" * 40000]),
)
json_values: Final = st.recursive(
    hostile_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _deep(depth: int, kind: str) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value] if kind == "array" else {"a": value}
    return value


hostile_values: Final = st.one_of(
    hostile_scalars,
    json_values,
    st.builds(_deep, st.sampled_from([31, 33, 200]), st.sampled_from(["array", "object"])),
)


def _meta(annotation: Any) -> tuple[Any, dict[str, Any]]:
    """The base type of an annotation and its msgspec.Meta constraints."""
    constraints: dict[str, Any] = {}
    if typing.get_origin(annotation) is typing.Annotated:
        annotation, *metas = typing.get_args(annotation)
        for meta in metas:
            if isinstance(meta, msgspec.Meta):
                for name in ("min_length", "max_length", "pattern", "ge", "le"):
                    if getattr(meta, name) is not None:
                        constraints[name] = getattr(meta, name)
    return annotation, constraints


def well_shaped(annotation: Any) -> st.SearchStrategy[Any]:
    """Values of the declared type, mostly inside its constraints."""
    base, c = _meta(annotation)
    origin = typing.get_origin(base)
    if origin is typing.Literal:
        return st.sampled_from(typing.get_args(base))
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(base) if a is not type(None)]
        return st.none() | st.one_of([well_shaped(m) for m in members])
    if origin is list:
        (item,) = typing.get_args(base)
        return st.lists(
            well_shaped(item),
            min_size=c.get("min_length", 0),
            max_size=min(c.get("max_length", 5), 5),
        )
    if isinstance(base, type) and issubclass(base, msgspec.Struct):
        return fields_of(base)
    if base is bool:
        return st.booleans()
    if base is int:
        return st.integers(min_value=c.get("ge", -(2**63)), max_value=c.get("le", _INT64))
    if base is float:
        return st.floats(allow_nan=False, allow_infinity=False)
    if "pattern" in c:
        return st.from_regex(c["pattern"], fullmatch=True)
    return st.text(min_size=c.get("min_length", 0), max_size=min(c.get("max_length", 64), 64))


def fields_of(struct: type[msgspec.Struct]) -> st.SearchStrategy[dict[str, Any]]:
    """A JSON object for ``struct``: each field well shaped, hostile or
    missing (optional ones more often missing), sometimes an unknown one."""
    hints = typing.get_type_hints(struct, include_extras=True)

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in msgspec.structs.fields(struct):
            choice = draw(st.sampled_from(["good", "good", "good", "hostile", "missing"]))
            if not f.required and draw(st.booleans()):
                choice = "missing"
            if choice == "good":
                out[f.encode_name] = draw(well_shaped(hints[f.name]))
            elif choice == "hostile":
                out[f.encode_name] = draw(hostile_values)
        if draw(st.integers(0, 9)) == 0:
            out[draw(st.text(min_size=1, max_size=8))] = draw(hostile_values)
        return out

    return build()


def frame_object(frame_type: type[msgspec.Struct]) -> st.SearchStrategy[dict[str, Any]]:
    tag = str(frame_type.__struct_config__.tag)
    tags = (
        st.just(tag)
        | st.sampled_from([tag.upper(), tag + " ", "pong", "hello", ""])
        | hostile_values
    )
    weighted = st.one_of(st.just(tag), st.just(tag), st.just(tag), tags)
    return st.tuples(fields_of(frame_type), weighted).map(lambda pair: {"type": pair[1], **pair[0]})


frame_objects: Final = st.sampled_from(_FRAME_TYPES).flatmap(frame_object)


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _deep_text(depth: int, kind: str) -> str:
    """Nested too deep for json.dumps: written out directly."""
    if kind == "array":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


json_texts: Final = st.one_of(
    frame_objects.map(_dump),
    frame_objects.map(_dump),
    json_values.map(_dump),
    st.text(max_size=200),
    st.builds(_deep_text, st.integers(1, 3000), st.sampled_from(["array", "object"])),
    st.sampled_from(
        ["", " ", "{", '{"type":"ping",}', '\ufeff{"type":"ping"}', '{"type":"ping"} x']
    ),
)


# -- strategies: the wire ------------------------------------------------------------


@dataclass(frozen=True)
class WireFrame:
    """One WebSocket frame as a client would write it, rules or not."""

    opcode: int
    payload: bytes
    fin: bool = True
    rsv: int = 0
    masked: bool = True
    length: str = "minimal"  # minimal, "16", "64", or "64-msb" (impossible)

    def encode(self) -> bytes:
        first = (0x80 if self.fin else 0) | (self.rsv << 4) | self.opcode
        n = len(self.payload)
        mask_bit = 0x80 if self.masked else 0
        form = self.length
        if form == "minimal":
            form = "7" if n < 126 else "16" if n < 65_536 else "64"
        if form == "7":
            header = bytes([first, mask_bit | n])
        elif form == "16" and n < 65_536:
            header = bytes([first, mask_bit | 126]) + struct.pack("!H", n)
        elif form == "64-msb":
            header = bytes([first, mask_bit | 127]) + struct.pack("!Q", n | (1 << 63))
        else:
            header = bytes([first, mask_bit | 127]) + struct.pack("!Q", n)
        if not self.masked:
            return header + self.payload
        key = os.urandom(4)
        return header + key + bytes(b ^ key[i % 4] for i, b in enumerate(self.payload))


def _close_payload(code: int, reason: bytes) -> bytes:
    return struct.pack("!H", code) + reason


payloads: Final = st.one_of(
    st.binary(max_size=64),
    json_texts.map(lambda t: t.encode()[:300]),
    st.sampled_from(
        [b"\xff\xfe", b'{"type":"ping","id":"\xc3"}', b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]
    ),
    st.builds(
        _close_payload,
        st.sampled_from(
            [0, 999, 1000, 1004, 1005, 1006, 1011, 1015, 2999, 3000, 4999, 5000, 65535]
        ),
        st.sampled_from([b"", b"bye", b"\xff"]),
    ),
)
opcodes: Final = st.one_of(st.sampled_from([0x0, 0x1, 0x2, 0x8, 0x9, 0xA]), st.integers(0, 15))
wire_frames: Final = st.builds(
    WireFrame,
    opcode=opcodes,
    payload=payloads,
    fin=st.booleans() | st.just(True),
    rsv=st.sampled_from([0, 0, 0, 0, 1, 2, 4, 7]),
    masked=st.booleans() | st.just(True) | st.just(True),
    length=st.sampled_from(["minimal"] * 6 + ["16", "64", "64-msb"]),
)


def _interleaved(text: bytes, control: list[WireFrame], second_message: bool) -> list[WireFrame]:
    """A text message in fragments, control frames (or another message) between them."""
    cut = max(1, len(text) // 2)
    frames = [WireFrame(0x1, text[:cut], fin=False)]
    frames += control
    if second_message:
        frames.append(WireFrame(0x1, b'{"type":"ping"}'))  # a new message inside a fragmented one
    frames.append(WireFrame(0x0, text[cut:]))
    return frames


control_frames: Final = st.builds(
    WireFrame,
    opcode=st.sampled_from([0x9, 0xA, 0x8]),
    payload=st.binary(max_size=8) | st.just(b"x" * 126),
    fin=st.booleans(),
)
wire_sequences: Final = st.one_of(
    st.lists(wire_frames, min_size=1, max_size=4),
    st.builds(
        _interleaved,
        json_texts.map(lambda t: t.encode()[:200] or b"{}"),
        st.lists(control_frames, max_size=2),
        st.booleans(),
    ),
    st.just([WireFrame(0x1, b"x" * (MAX_MESSAGE + 4_464))]),  # 70,000 bytes, one frame
    st.just([WireFrame(0x1, b"x" * 40_000, fin=False), WireFrame(0x0, b"x" * 30_000)]),
    st.just([WireFrame(0x1, b'{"type":"bye"}'), WireFrame(0x1, b"x" * 70_000)]),
)


# -- cases -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """What one hostile client sends, and on which kind of connection."""

    logged_in: bool
    frames: list[WireFrame]
    text: str | None = None  # the one text message it carries (frame and JSON cases)

    def describe(self) -> str:
        if self.text is not None:
            return f"text {self.text[:300]!r} in {len(self.frames)} fragment(s)"
        return "wire " + repr(self.frames)[:600]


def _fragments(text: str, parts: int) -> list[WireFrame]:
    data = text.encode()
    if parts <= 1 or len(data) < parts:
        return [WireFrame(0x1, data)]
    step = len(data) // parts
    cuts = [data[i * step : (i + 1) * step] for i in range(parts - 1)] + [
        data[(parts - 1) * step :]
    ]
    return [
        WireFrame(0x1 if i == 0 else 0x0, chunk, fin=i == parts - 1) for i, chunk in enumerate(cuts)
    ]


def _text_case(logged_in: bool, text: str, parts: int) -> Case:
    return Case(logged_in, _fragments(text, parts), text)


cases: Final = st.one_of(
    st.builds(_text_case, st.booleans(), json_texts, st.sampled_from([1, 1, 1, 2, 3])),
    st.builds(Case, st.booleans(), wire_sequences),
)


# -- the client ------------------------------------------------------------------------


def upgrade(sock: socket.socket, host: str) -> WSConnection:
    """Open a WebSocket on ``sock``; returns the client state after ``hello``."""
    ws = WSConnection(ConnectionType.CLIENT)
    sock.sendall(ws.send(Request(host=host, target="/v1/ws")))
    events = _read_events(sock, ws, lambda e: isinstance(e, TextMessage))
    if not isinstance(events[0], AcceptConnection) or '"hello"' not in getattr(
        events[-1], "data", ""
    ):
        raise FuzzFailure(f"no upgrade and hello: {events!r}")
    return ws


def _read_events(sock: socket.socket, ws: WSConnection, until: Any) -> list[Event]:
    """Events until one satisfies ``until``, the end of the stream (a None
    last), or the answer timeout (FuzzFailure)."""
    out: list[Any] = []
    deadline = time.monotonic() + ANSWER_TIMEOUT
    part = ""  # of a text message wsproto hands over in pieces (a long answer)
    while True:
        for event in ws.events():
            if isinstance(event, TextMessage):
                if not event.message_finished:
                    part += event.data
                    continue
                if part:
                    event, part = TextMessage(data=part + event.data), ""
            out.append(event)
            if until(event):
                return out
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FuzzFailure(f"no answer within {ANSWER_TIMEOUT} s; got {out!r}"[:800])
        sock.settimeout(remaining)
        try:
            data = sock.recv(65_536)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        except TimeoutError:
            continue
        if not data:
            out.append(None)
            return out
        ws.receive_data(data)


def text_frame(text: str) -> bytes:
    return WireFrame(0x1, text.encode()).encode()


@dataclass
class Stats:
    """What the cases got back, for the long run's report."""

    cases: int = 0
    closes: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    sessions: int = 0  # logins and resumes the fuzzer made for itself


class Fuzzer:
    """Runs cases against the relay at ``host:port``; a session for the
    logged-in ones comes from logging in as ``username`` (again after a case
    logged it out), each login from another loopback address so the per-address
    login limit (kept for the hostile frames) does not stop it."""

    def __init__(self, host: str, port: int, username: str, password: str) -> None:
        self.host, self.port = host, port
        self.username, self.password = username, password
        self.stats = Stats()
        self._access_token: str | None = None
        self._conns: dict[bool, tuple[socket.socket, WSConnection]] = {}
        self._logins = 0
        self._device_id = ""
        self._waited = 0.0  # seconds waited out for the current login
        self._fences = 0

    def close(self) -> None:
        for sock, _ in self._conns.values():
            sock.close()
        self._conns.clear()

    def _connect(self, source: str = "127.0.0.1") -> tuple[socket.socket, WSConnection]:
        sock = socket.create_connection(
            (self.host, self.port), timeout=ANSWER_TIMEOUT, source_address=(source, 0)
        )
        return sock, upgrade(sock, self.host)

    def _request(
        self, sock: socket.socket, ws: WSConnection, frame: dict[str, Any]
    ) -> dict[str, Any]:
        sock.sendall(text_frame(json.dumps(frame)))
        for event in _read_events(
            sock,
            ws,
            lambda e: (
                e is None
                or isinstance(e, CloseConnection)
                or (isinstance(e, TextMessage) and f'"id":"{frame["id"]}"' in e.data)
            ),
        ):
            if isinstance(event, TextMessage) and f'"id":"{frame["id"]}"' in event.data:
                return json.loads(event.data)  # type: ignore[no-any-return]
        raise FuzzFailure(f"no answer to the fuzzer's own {frame['type']}")

    def _session(self) -> tuple[socket.socket, WSConnection]:
        """A connection with a session: resumed, or after a fresh login."""
        while True:
            if self._access_token is None:
                self._logins += 1
                source = f"127.0.{1 + self._logins // 250}.{1 + self._logins % 250}"
                sock, ws = self._connect(source)
                login = {
                    "type": "login",
                    "id": "fuzzer-login",
                    "username": self.username,
                    "password": self.password,
                    "device_name": "fuzzer",
                }
                if self._device_id:  # the same device again: devices per user are limited
                    login["device_id"] = self._device_id
                reply = self._request(sock, ws, login)
                sock.close()
                if reply.get("code") == "rate_limited" and self._waited < MAX_LOGIN_WAIT:
                    wait = min(float(reply.get("retry_after", 1.0)), MAX_LOGIN_WAIT)
                    self._waited += wait
                    time.sleep(wait)  # backed off by a case's wrong password: wait it out
                    continue
                if reply.get("type") != "session":
                    raise FuzzFailure(f"the fuzzer cannot log in: {reply}")
                self._waited = 0.0
                self._access_token = reply["access_token"]
                self._device_id = reply["device_id"]
            sock, ws = self._connect()
            reply = self._request(
                sock,
                ws,
                {"type": "resume", "id": "fuzzer-resume", "access_token": self._access_token},
            )
            self.stats.sessions += 1
            if reply.get("type") == "session":
                return sock, ws
            sock.close()
            self._access_token = None  # logged out by a case: log in again

    def _connection(self, logged_in: bool) -> tuple[socket.socket, WSConnection]:
        if logged_in not in self._conns:
            self._conns[logged_in] = self._session() if logged_in else self._connect()
        return self._conns[logged_in]

    def run_case(self, case: Case) -> None:
        """Send the case and a fence; raise FuzzFailure if a rule was broken."""
        self.stats.cases += 1
        sock, ws = self._connection(case.logged_in)
        self._fences += 1
        fence = f"fence-{self._fences}"
        data = b"".join(f.encode() for f in case.frames) + text_frame(
            f'{{"type":"ping","id":"{fence}"}}'
        )
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it closed early: what it sent before is read below
        ended = True
        try:
            events = _read_events(
                sock,
                ws,
                lambda e: (
                    e is None
                    or isinstance(e, CloseConnection)
                    or (isinstance(e, TextMessage) and fence in e.data)
                ),
            )
            ended = events[-1] is None or isinstance(events[-1], CloseConnection)
            self._check(case, events, sock, ws)
        finally:
            if ended:  # or no answer came: the connection is not used again
                sock.close()
                del self._conns[case.logged_in]

    def _check(self, case: Case, events: list[Any], sock: socket.socket, ws: WSConnection) -> None:
        answers = [json.loads(e.data) for e in events if isinstance(e, TextMessage)]
        for answer in answers:
            if answer.get("type") == "error":
                self.stats.errors[answer["code"]] = self.stats.errors.get(answer["code"], 0) + 1
        last = events[-1]
        if last is None:
            raise FuzzFailure(f"the server hung up without a Close frame after {case.describe()}")
        if isinstance(last, CloseConnection):
            code = int(last.code)
            self.stats.closes[code] = self.stats.closes.get(code, 0) + 1
            ours = {
                struct.unpack("!H", f.payload[:2])[0]
                for f in case.frames
                if f.opcode == 0x8 and len(f.payload) >= 2
            }
            if code not in DOCUMENTED_CLOSES and code not in ours:
                raise FuzzFailure(f"Close {code} {last.reason!r} after {case.describe()}")
            # Answer the Close and see the server hang up, within the timeout.
            try:
                sock.sendall(ws.send(last.response()))
            except OSError:
                pass  # it hung up already
            _read_events(sock, ws, lambda e: e is None)
            if last.reason in _TIMERS or case.text is None:
                return  # a timer closed it mid-case: the answer may never come
        if case.text is None:
            return
        too_big = len(case.text.encode()) > MAX_MESSAGE
        if too_big:
            if not isinstance(last, CloseConnection) or last.code != core.CLOSE_TOO_BIG:
                raise FuzzFailure(f"no 1009 for {len(case.text.encode())} bytes")
            return
        try:
            _decoder.decode(case.text)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
            refused = [
                a for a in answers if a.get("type") == "error" and a.get("code") in BAD_FRAME_CODES
            ]
            if not refused:
                raise FuzzFailure(
                    f"no error frame for {case.describe()}; got {answers!r}"[:1000]
                ) from None
