"""The sans-I/O protocol core: pure, synchronous tests."""

from __future__ import annotations

import json
import subprocess
import sys
import typing

import msgspec
import pytest

from chatd.protocol import core
from chatd.protocol.catalog import ClientFrame
from chatd.protocol.frames import Limits
from chatd.protocol.validation import MAX_NESTING_DEPTH

LIMITS = Limits(
    handshake_timeout_seconds=10,
    max_frame_bytes=65_536,
    idle_timeout_seconds=60,
    send_queue_frames=8,
    max_bad_frames=3,
)


def started() -> core.ServerConnection:
    conn = core.ServerConnection(LIMITS, server_name="chatd")
    conn.start()
    return conn


def frames(actions: list[core.Action]) -> list[dict[str, object]]:
    return [json.loads(a.data) for a in actions if isinstance(a, core.Send)]


def closes(actions: list[core.Action]) -> list[core.Close]:
    return [a for a in actions if isinstance(a, core.Close)]


def test_hello_comes_first_and_names_version_and_limits() -> None:
    conn = core.ServerConnection(LIMITS, server_name="chatd")
    [hello] = frames(conn.start())
    assert hello == {
        "type": "hello",
        "protocol": 1,
        "server": "chatd",
        "limits": {
            "max_frame_bytes": 65_536,
            "handshake_timeout_seconds": 10,
            "idle_timeout_seconds": 60,
            "send_queue_frames": 8,
            "max_bad_frames": 3,
        },
        "features": [
            "who_is_online.user_ids",
            "rooms",
            "push",
            "attachments",
            "consent",
            "account_export",
        ],
    }
    assert conn.state is core.State.AWAITING_FIRST_FRAME
    with pytest.raises(RuntimeError):
        conn.start()


def test_ping_is_answered_with_pong_echoing_the_id() -> None:
    conn = started()
    assert frames(conn.receive_text('{"type":"ping","id":"abc"}')) == [
        {"type": "pong", "id": "abc"}
    ]
    assert frames(conn.receive_text(b'{"type":"ping"}')) == [{"type": "pong"}]
    assert conn.state is core.State.OPEN


@pytest.mark.parametrize(
    ("text", "code", "field"),
    [
        ("not json", "bad_frame", None),
        ("[1,2]", "bad_frame", None),
        ('{"id":"x"}', "bad_frame", "$.type"),
        ('{"type":"nope"}', "unknown_type", "$.type"),
        ('{"type":"ping","id":7}', "bad_frame", "$.id"),
        ('{"type":"ping","id":""}', "bad_frame", "$.id"),
        ('{"type":"ping","id":"' + "x" * 65 + '"}', "bad_frame", "$.id"),
        ('{"type":"ping","extra":1}', "bad_frame", "$.extra"),
    ],
)
def test_a_bad_frame_gets_an_error_naming_the_field_and_the_connection_stays(
    text: str, code: str, field: str | None
) -> None:
    conn = started()
    actions = conn.receive_text(text)
    [error] = frames(actions)
    assert error["type"] == "error"
    assert error["code"] == code
    assert error.get("field") == field
    assert error["message"]
    assert not closes(actions)
    # The connection still works.
    assert frames(conn.receive_text('{"type":"ping","id":"1"}')) == [{"type": "pong", "id": "1"}]


def test_unknown_field_is_named_in_the_message() -> None:
    [error] = frames(started().receive_text('{"type":"ping","extra":1}'))
    assert "extra" in str(error["message"])


def test_too_many_bad_frames_close_with_1008() -> None:
    conn = started()
    for _ in range(LIMITS.max_bad_frames - 1):
        assert not closes(conn.receive_text("{"))
    actions = conn.receive_text("{")
    assert len(frames(actions)) == 1  # the last error is still sent, before the close
    assert closes(actions) == [core.Close(1008, "too many bad frames")]
    assert conn.receive_text('{"type":"ping"}') == []  # closed: input ignored


def test_binary_message_closes_with_1003() -> None:
    conn = started()
    assert conn.receive_bytes(b"\x00\x01") == [core.Close(1003, "binary frames are not supported")]


def test_invalid_utf8_closes_with_1007() -> None:
    conn = started()
    [close] = closes(conn.receive_text(b'{"type":"ping","id":"\xff"}'))
    assert close.code == 1007


def test_timeouts_and_shutdown_give_documented_closes() -> None:
    conn = started()
    assert conn.first_frame_timeout() == [core.Close(1008, "first frame timeout")]
    conn = started()
    conn.receive_text('{"type":"ping"}')
    assert conn.first_frame_timeout() == []  # only before the first frame
    assert conn.idle_timeout() == [core.Close(1008, "idle timeout")]
    assert conn.idle_timeout() == []  # closed once
    assert started().shutdown() == [core.Close(1001, "server shutting down")]
    assert started().send_queue_full() == [core.Close(1008, "send queue full")]
    assert started().internal_error() == [core.Close(1011, "internal error")]


def test_core_imports_neither_trio_nor_sqlite() -> None:
    code = (
        "import sys, chatd.protocol.core, chatd.protocol.frames\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('trio', 'sqlite3', 'sqlcipher3', 'trio_websocket', 'chatd.store'))\n"
        "bad += [m for m in sys.modules if m.startswith(('chatd.store', 'chatd.relay'))]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_bye_closes_normally() -> None:
    conn = started()
    assert conn.receive_text('{"type":"bye"}') == [core.Close(1000, "bye")]


def test_a_missing_field_is_named() -> None:
    [error] = frames(
        started().receive_text('{"type":"login","id":"r7","username":"a","password":"x"}')
    )
    assert error["field"] == "$.device_name"
    assert error["id"] == "r7"


def nested(kind: str, depth: int) -> str:
    """``depth`` arrays or objects inside one another."""
    if kind == "array":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


#: Deep values in every shape: alone, as the frame, in a field, before the
#: tag, in an unknown field, in a list of a known frame.
SHAPES = [
    "{}",
    '{"type":"ping","id":{}}',
    '{"x":{},"type":"ping"}',
    '{"type":"ping","extra":{}}',
    '{"type":"send","id":"s","message_id":"m","envelopes":[{}]}',
    '{"type":"nope","id":{}}',
]


@pytest.mark.parametrize("depth", [900, 1_000, 100_000])
@pytest.mark.parametrize("kind", ["array", "object"])
def test_deeply_nested_json_is_a_bad_frame_not_a_crash(depth: int, kind: str) -> None:
    """Defect 1 of issue 14: deep objects made msgspec raise RecursionError
    (a 1011 on the wire); every shape now gets the same bad_frame."""
    conn = core.ServerConnection(
        Limits(
            max_frame_bytes=1 << 24,
            handshake_timeout_seconds=1.0,
            idle_timeout_seconds=1.0,
            send_queue_frames=8,
            max_bad_frames=100,
        ),
        server_name="chatd",
    )
    conn.start()
    value = nested(kind, depth)
    for shape in SHAPES:
        text = value if shape == "{}" else shape.replace("{}", value, 1)
        [error] = frames(conn.receive_text(text))
        assert error == {
            "type": "error",
            "code": "bad_frame",
            "message": "frame is nested deeper than 32 levels",
        }, shape
    assert conn.state is core.State.OPEN
    assert conn.bad_frames == len(SHAPES)


def test_the_nesting_limit_is_32_levels_and_strings_do_not_count() -> None:
    conn = started()
    [error] = frames(conn.receive_text(nested("array", 32)))
    assert error["message"] == "expected a JSON object, got array"
    [error] = frames(conn.receive_text(nested("array", 33)))
    assert error["message"] == "frame is nested deeper than 32 levels"
    [pong] = frames(conn.receive_text('{"type":"ping","id":"' + "[{" * 30 + '\\"[[["}'))
    assert pong["type"] == "pong"


def _declared_depth(annotation: object) -> int:
    """How deep a value of this declared type nests (a Struct is an object)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _declared_depth(args[0])
    if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
        hints = typing.get_type_hints(annotation)
        return 1 + max((_declared_depth(h) for h in hints.values()), default=0)
    if origin is list:
        return 1 + _declared_depth(args[0])
    assert origin is not dict, "a dict field: the nesting rule needs a look"
    return max((_declared_depth(a) for a in args), default=0)


def test_no_valid_frame_comes_near_the_nesting_limit() -> None:
    """Only frames that failed to decode are scanned for depth: sound only
    because every declared frame type nests far less than the limit."""
    deepest = max(_declared_depth(t) for t in typing.get_args(ClientFrame))
    assert deepest == 3  # docs/PROTOCOL.md section 4.2 says so
    assert deepest < MAX_NESTING_DEPTH


def test_the_field_is_found_without_reading_the_decoders_message() -> None:
    conn = started()
    text = (
        '{"type":"send","id":"s","message_id":"0b9d3c1e-5f7a-4c2b-9e8d-000000000001",'
        '"envelopes":[{"user_id":1,"device_id":"ABC","ciphertext":"x"},'
        '{"user_id":1,"device_id":"ABC","ciphertext":"x","extra":1}]}'
    )
    [error] = frames(conn.receive_text(text))
    assert (error["field"], error["id"]) == ("$.envelopes[1].extra", "s")


def test_a_gated_session_may_send_only_consent_and_account_frames() -> None:
    conn = started()
    conn.receive_text('{"type":"ping"}')
    conn.session_started(restricted=False)
    conn.consent_pending = frozenset({"terms"})
    send = {
        "type": "send",
        "id": "s1",
        "message_id": "0b0b0b0b-0000-4000-8000-000000000001",
        "envelopes": [{"user_id": 2, "device_id": "ABC", "ciphertext": "x"}],
    }
    for frame in (send, {"type": "directory", "id": "d1"}, {"type": "keys_upload", "id": "k"}):
        for _ in range(LIMITS.max_bad_frames + 1):  # not bad frames: never closes
            actions = conn.receive_text(json.dumps(frame))
            [error] = frames(actions)
            assert (error["code"], error["id"]) == ("consent_required", frame["id"])
            assert "terms" in str(error["message"]) and not closes(actions)
    for open_frame in (
        {"type": "consent_accept", "id": "a", "kind": "terms", "version": "1"},
        {"type": "consent_revoke", "id": "r", "kind": "terms"},
        {"type": "consent_status", "id": "c"},
        {"type": "logout", "id": "l"},
        {"type": "ack", "up_to": 3},
        {"type": "list_sessions", "id": "s"},
    ):
        [passed] = conn.receive_text(json.dumps(open_frame))
        assert not isinstance(passed, core.Send | core.Close), open_frame
    assert frames(conn.receive_text('{"type":"ping","id":"p"}')) == [{"type": "pong", "id": "p"}]
    conn.consent_pending = frozenset()
    [passed] = conn.receive_text(json.dumps(send))
    assert not isinstance(passed, core.Send)


def test_a_restricted_session_enrolls_before_the_consent_gate_applies() -> None:
    conn = started()
    conn.receive_text('{"type":"ping"}')
    conn.session_started(restricted=True)
    conn.consent_pending = frozenset({"privacy"})
    [passed] = conn.receive_text('{"type":"mfa_confirm","id":"m","code":"123456"}')
    assert not isinstance(passed, core.Send)
    [error] = frames(conn.receive_text('{"type":"consent_status","id":"c"}'))
    assert error["code"] == "mfa_enrollment_required"
