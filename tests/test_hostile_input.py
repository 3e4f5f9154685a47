"""Regression tests for the hostile input of issue 14 (defects 1, 2 and 7),
over real loopback sockets with the raw client of tests/test_relay.py.

Each test checks what the client sees on the wire (an error frame, or a
Close frame with the documented code and then the end of the stream) and
that nothing at error level reached the log.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import trio
from wsproto.events import CloseConnection, TextMessage

from .test_relay import (
    RawClient,
    read_to_eof,
    relay_running,
    upgrade_request,
    wait_streams_closed,
    ws_frame,
)
from .test_relay_auth import PASSWORD, server

TEXT, BINARY = 0x1, 0x2
#: The deployed limit (relay.max_frame_bytes' default), as the report had it.
LIMIT = 65_536


def nested(kind: str, depth: int) -> bytes:
    if kind == "array":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def log_in(client: RawClient) -> None:
    login = {
        "type": "login",
        "id": "l1",
        "username": "alice",
        "password": PASSWORD,
        "device_name": "laptop",
    }
    await client.stream.send_all(ws_frame(TEXT, json.dumps(login).encode()))
    while True:
        event = await client.next_event()
        assert isinstance(event, TextMessage), event
        if json.loads(event.data)["type"] == "session":
            return


async def answer_to(client: RawClient, payload: bytes, opcode: int) -> dict[str, object] | int:
    """Send one message; the error frame it gets, or the code of the Close
    frame it gets (after which the server must hang up)."""
    await client.stream.send_all(ws_frame(opcode, payload))
    while True:
        event = await client.next_event()
        if isinstance(event, CloseConnection):
            await client.wait_eof()
            return int(event.code)
        assert isinstance(event, TextMessage), f"no Close frame: {event!r}"
        frame = json.loads(event.data)
        if frame["type"] not in PUSHES:
            return frame  # type: ignore[no-any-return]


PUSHES = ("key_count", "presence")  # news a logged-in device may get at any time
DEEP_ERROR = {
    "type": "error",
    "code": "bad_frame",
    "message": "frame is nested deeper than 32 levels",
}


@pytest.mark.parametrize("logged_in", [False, True], ids=["before-login", "after-login"])
@pytest.mark.parametrize("depth", [900, 1_000, 100_000])
async def test_deep_nesting_gets_a_bad_frame_or_1003_never_1011(
    short_tmp: Path, caplog: pytest.LogCaptureFixture, depth: int, logged_in: bool
) -> None:
    """Defect 1: deep objects got 1011 (and RecursionError in the log) or no
    Close at all. Text: a bad_frame, the connection stays; binary: 1003."""
    relay_settings = {"max_frame_bytes": 1 << 20, "max_bad_frames": 16}
    async with server(short_tmp, relay=relay_settings) as srv:
        for kind in ("array", "object"):
            client = await RawClient.connect(srv.relay)
            if logged_in:
                await log_in(client)
            payload = nested(kind, depth)
            assert await answer_to(client, payload, TEXT) == DEEP_ERROR
            framed = b'{"type":"ping","id":' + payload + b"}"
            assert await answer_to(client, framed, TEXT) == DEEP_ERROR
            # Still served after two bad frames, then a binary one closes it.
            pong = await answer_to(client, b'{"type":"ping","id":"p"}', TEXT)
            assert pong == {"type": "pong", "id": "p"}
            assert await answer_to(client, payload, BINARY) == 1003
    assert errors_logged(caplog) == []


@pytest.mark.parametrize(
    "before",
    [
        ws_frame(TEXT, b'{"type":"bye"}'),
        b"".join(ws_frame(TEXT, b'{"type":"ping","id":5}') for _ in range(16)),
    ],
    ids=["bye", "16-bad-frames"],
)
@pytest.mark.parametrize("split", [False, True], ids=["one-write", "two-writes"])
async def test_a_message_over_the_limit_after_our_close_is_dropped_quietly(
    caplog: pytest.LogCaptureFixture, before: bytes, split: bool
) -> None:
    """Defect 2: a Close the server started (bye, or the 16th bad frame),
    then 70,000 bytes over a 65,536-byte limit: the server must not try a
    second Close (1009) while closing. One clean Close, then a hang-up."""
    async with relay_running(max_frame_bytes=LIMIT, max_bad_frames=16) as (relay, _):
        client = await RawClient.connect(relay)
        big = ws_frame(TEXT, b"x" * 70_000)
        if split:
            await client.stream.send_all(before)
            await client.stream.send_all(big)
        else:
            await client.stream.send_all(before + big)
        close = await client.close_event()
        assert close is not None, "the server hung up without a Close frame"
        assert close.code in (1000, 1008)
        await client.wait_eof()
        await client.stream.aclose()  # the server lingers until we hang up
        await wait_streams_closed(relay)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize(
    "key",
    [
        b"\xff\xfe",  # not base64 at all (the report's example)
        b"dGhlIHNhbXBsZSBub25jZQ",  # 16 bytes, but the padding is missing
        b"dGhlIHNhbXBsZQ==",  # base64 of 10 bytes
        b"dGhlIHNhbXBsZSBub25jZSBub25jZQ==",  # base64 of 22 bytes
        b"dGhlIHNhbXBsZSBub25j!Q==",  # a character outside the alphabet
    ],
    ids=["not-base64", "no-padding", "10-bytes", "22-bytes", "bad-character"],
)
async def test_a_websocket_key_that_is_not_base64_of_16_bytes_gets_400(key: bytes) -> None:
    """Defect 7: RFC 6455 4.2.1 requires 400 for such a key (it got 101)."""
    async with relay_running() as (relay, _):
        stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
        request = upgrade_request().replace(b"dGhlIHNhbXBsZSBub25jZQ==", key)
        await stream.send_all(request)
        response = await read_to_eof(stream)
        assert response.startswith(b"HTTP/1.1 400 ")
        assert response.endswith(b"\r\n\r\nSec-WebSocket-Key must be the base64 of 16 bytes\n")
        # A valid key is still upgraded.
        good = await trio.open_tcp_stream("127.0.0.1", relay.port)
        await good.send_all(upgrade_request())
        with trio.fail_after(10):
            assert (await good.receive_some(65_536)).startswith(b"HTTP/1.1 101 ")
        await good.aclose()
