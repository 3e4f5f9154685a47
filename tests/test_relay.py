"""The relay over real loopback sockets: lifecycle, limits, close codes.

Timeouts are set small here and every test waits on what the client sees (a
frame, a Close, end-of-stream), never on a sleep.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import struct
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from chatd.config import Config, RelaySettings, StoreSettings
from chatd.daemon import open_services
from chatd.errors import ListenError
from chatd.protocol import core
from chatd.protocol.frames import Limits
from chatd.relay import Relay, TrustedProxies, serve_relay
from chatd.relay.connection import Connection
from chatd.relay.ws import WebSocket
from chatd.store import serve_store

FAST = {
    "handshake_timeout_seconds": 0.5,
    "idle_timeout_seconds": 0.5,
    "max_frame_bytes": 2048,
    "max_bad_frames": 3,
}


@asynccontextmanager
async def relay_running(**settings: Any) -> AsyncIterator[tuple[Relay, trio.Event]]:
    relay_settings = RelaySettings(**{"port": 0, **FAST, **settings})
    stopping = trio.Event()
    with tempfile.TemporaryDirectory() as tmp:
        config = Config(relay=relay_settings, path=Path(tmp) / "chatd.toml")
        try:
            async with trio.open_nursery() as nursery:
                store = await nursery.start(
                    serve_store, Path(tmp) / "c.db", bytes(range(32)), StoreSettings()
                )
                services = await open_services(nursery, store, config)
                relay = await nursery.start(
                    partial(serve_relay, **services.for_relay()), config, stopping
                )
                yield relay, stopping
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1 and isinstance(group.exceptions[0], ListenError):
                raise group.exceptions[0] from None
            raise


def url(relay: Relay, path: str = "/v1/ws") -> str:
    return f"ws://127.0.0.1:{relay.port}{path}"


async def hello_of(ws: Any) -> dict[str, Any]:
    hello = json.loads(await ws.get_message())
    assert hello["type"] == "hello"
    return hello  # type: ignore[no-any-return]


async def closed_with(ws: Any) -> tuple[int, str | None]:
    """Read until the server closes; return its close code and reason."""
    with trio.fail_after(10):
        while True:
            try:
                await ws.get_message()
            except ConnectionClosed as exc:
                return exc.reason.code, exc.reason.reason


# -- a raw client for what a well-behaved library would never send ------------


def ws_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    mask: bool = True,
    rsv: int = 0,
    declared: int | None = None,
) -> bytes:
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    length = len(payload) if declared is None else declared
    mask_bit = 0x80 if mask else 0
    if length < 126:
        header = bytes([first, mask_bit | length])
    elif length < 65_536:
        header = bytes([first, mask_bit | 126]) + struct.pack("!H", length)
    else:
        header = bytes([first, mask_bit | 127]) + struct.pack("!Q", length)
    if not mask:
        return header + payload
    key = os.urandom(4)
    return header + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class RawClient:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: list[Any] = []

    @classmethod
    async def connect(cls, relay: Relay) -> RawClient:
        client = cls(await trio.open_tcp_stream("127.0.0.1", relay.port))
        await client.stream.send_all(client.ws.send(Request(host="127.0.0.1", target="/v1/ws")))
        assert isinstance(await client.next_event(), AcceptConnection)
        hello = await client.next_event()
        assert isinstance(hello, TextMessage) and '"hello"' in hello.data
        return client

    async def next_event(self) -> Any:
        """The next event from the server; None at end-of-stream."""
        with trio.fail_after(10):
            while not self.events:
                data = await self.stream.receive_some(65_536)
                if not data:
                    return None
                self.ws.receive_data(data)
                self.events.extend(self.ws.events())
            return self.events.pop(0)

    async def close_event(self) -> CloseConnection | None:
        """Read until a Close frame (returned) or a bare hang-up (None)."""
        while True:
            event = await self.next_event()
            if event is None or isinstance(event, CloseConnection):
                return event

    async def wait_eof(self) -> None:
        with trio.fail_after(10):
            while await self.stream.receive_some(65_536):
                pass


# -- tasks -------------------------------------------------------------------------


def _task_tree(task: trio.lowlevel.Task) -> list[trio.lowlevel.Task]:
    tasks = [task]
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            tasks.extend(_task_tree(child))
    return tasks


def relay_tasks(relay: Relay) -> tuple[list[int], list[str]]:
    """How many tasks each open connection runs (its own and all below it), and
    the names of the relay's other tasks. Call after wait_all_tasks_blocked."""
    assert relay.nursery is not None
    per_connection, others = [], []
    for task in relay.nursery.child_tasks:
        if task.name.endswith(".handle_stream"):  # chatd.relay.accept's task per stream
            per_connection.append(len(_task_tree(task)))
        else:
            others.append(task.name.rpartition(".")[2])
    return sorted(per_connection), sorted(others)


# -- the tests -------------------------------------------------------------------------


async def test_hello_then_ping_pong() -> None:
    async with relay_running() as (relay, _), open_websocket_url(url(relay)) as ws:
        hello = await hello_of(ws)
        assert hello["protocol"] == 1
        assert hello["limits"] == {
            "max_frame_bytes": 2048,
            "handshake_timeout_seconds": 0.5,
            "idle_timeout_seconds": 0.5,
            "send_queue_frames": 256,
            "max_bad_frames": 3,
        }
        await ws.send_message('{"type":"ping","id":"p1"}')
        assert json.loads(await ws.get_message()) == {"type": "pong", "id": "p1"}
        await ws.send_message('{"type":"bye"}')
        assert await closed_with(ws) == (1000, "bye")


async def test_an_idle_connection_is_one_task() -> None:
    """The handler's task reads its own socket: no reader task, no channel, and
    the sender task ends once its frames are out (memory per connection)."""
    async with relay_running() as (relay, _), trio.open_nursery() as nursery:
        opened = []
        for _ in range(3):
            ws = await nursery.start(_open_for_test, url(relay))
            await hello_of(ws)
            await ws.send_message('{"type":"ping","id":"p1"}')
            assert json.loads(await ws.get_message())["type"] == "pong"
            opened.append(ws)
        await trio.testing.wait_all_tasks_blocked()
        assert relay_tasks(relay) == ([1, 1, 1], [])
        await opened[0].aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert relay_tasks(relay) == ([1, 1], [])
        nursery.cancel_scope.cancel()


async def _open_for_test(url: str, task_status: trio.TaskStatus[Any]) -> None:
    async with open_websocket_url(url) as ws:
        task_status.started(ws)
        await trio.sleep_forever()


async def test_other_paths_are_refused_with_404() -> None:
    async with relay_running() as (relay, _):
        with pytest.raises(ConnectionRejected) as info:
            async with open_websocket_url(url(relay, "/ws")):
                pass  # pragma: no cover - rejected
        assert info.value.status_code == 404


@pytest.mark.parametrize(
    ("origin", "accepted"),
    [
        (None, True),
        ("https://chat.example.org", True),
        ("https://evil.example", False),
        ("null", False),
    ],
)
async def test_origin_is_checked_when_present(origin: str | None, accepted: bool) -> None:
    headers = [(b"Origin", origin.encode())] if origin else []
    async with relay_running(allowed_origins=("https://chat.example.org",)) as (relay, _):
        if accepted:
            async with open_websocket_url(url(relay), extra_headers=headers) as ws:
                await hello_of(ws)
        else:
            with pytest.raises(ConnectionRejected) as info:
                async with open_websocket_url(url(relay), extra_headers=headers):
                    pass  # pragma: no cover - rejected
            assert info.value.status_code == 403
        assert not relay.connections or accepted


async def test_an_oversize_message_closes_with_1009() -> None:
    async with relay_running() as (relay, _), open_websocket_url(url(relay)) as ws:
        await hello_of(ws)
        await ws.send_message('{"type":"ping","id":"' + "x" * 3000 + '"}')
        code, _ = await closed_with(ws)
        assert code == 1009


async def test_the_frame_limit_counts_utf8_bytes_not_characters() -> None:
    async with relay_running() as (relay, _), open_websocket_url(url(relay)) as ws:
        await hello_of(ws)
        # 1,000 characters but 4,000 bytes: over the 2,048-byte limit.
        await ws.send_message('{"type":"ping","id":"' + "\U0001f600" * 1000 + '"}')
        assert await closed_with(ws) == (1009, "message too big")


async def test_a_binary_message_closes_with_1003() -> None:
    async with relay_running() as (relay, _), open_websocket_url(url(relay)) as ws:
        await hello_of(ws)
        await ws.send_message(b'{"type":"ping"}')
        assert await closed_with(ws) == (1003, "binary frames are not supported")


async def test_bad_frames_get_errors_then_1008() -> None:
    async with relay_running() as (relay, _), open_websocket_url(url(relay)) as ws:
        await hello_of(ws)
        for _ in range(3):
            await ws.send_message('{"type":"ping","id":5}')
        errors = [json.loads(await ws.get_message()) for _ in range(3)]
        assert all(e["type"] == "error" and e["field"] == "$.id" for e in errors)
        assert await closed_with(ws) == (1008, "too many bad frames")


async def test_a_silent_client_is_closed_after_the_first_frame_timeout() -> None:
    async with relay_running() as (relay, _), open_websocket_url(url(relay)) as ws:
        await hello_of(ws)
        assert await closed_with(ws) == (1008, "first frame timeout")


async def test_an_unauthenticated_client_is_closed_after_one_idle_period() -> None:
    async with relay_running() as (relay, _), open_websocket_url(url(relay)) as ws:
        await hello_of(ws)
        await ws.send_message('{"type":"ping"}')
        await ws.get_message()
        # Pings do not keep an unauthenticated connection open.
        assert await closed_with(ws) == (1008, "authentication timeout")


async def test_a_half_sent_frame_times_out_with_a_close_frame_and_a_hang_up() -> None:
    async with relay_running() as (relay, _):
        client = await RawClient.connect(relay)
        await client.stream.send_all(ws_frame(0x1, b'{"type":"pi', declared=100))
        close = await client.close_event()
        assert close is not None and (close.code, close.reason) == (1008, "first frame timeout")
        await client.wait_eof()  # the server hangs up even though we never answer the Close
        await wait_streams_closed(relay)
        assert not relay.connections


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (ws_frame(0x1, b'{"type":"ping"}', mask=False), 1002),  # client frames must be masked
        (ws_frame(0x3, b"x"), 1002),  # reserved opcode
        (ws_frame(0x1, b'{"type":"ping"}', rsv=4), 1002),  # RSV1 without an extension
        (ws_frame(0x9, b"x" * 126), 1002),  # control frame over 125 bytes
        (ws_frame(0x0, b"orphan"), 1002),  # continuation with nothing to continue
        (ws_frame(0x1, b'{"type":"ping","id":"\xff"}'), 1007),  # invalid UTF-8
        (ws_frame(0x1, b"x" * 70_000), 1009),  # one frame over max_frame_bytes
    ],
    ids=[
        "unmasked",
        "reserved-opcode",
        "rsv-bit",
        "long-control",
        "orphan-continuation",
        "invalid-utf8",
        "huge-frame",
    ],
)
async def test_protocol_errors_get_a_real_close_frame(frame: bytes, code: int) -> None:
    async with relay_running() as (relay, _):
        client = await RawClient.connect(relay)
        await client.stream.send_all(frame)
        close = await client.close_event()
        assert close is not None, "the server hung up without a Close frame"
        assert close.code == code
        await client.wait_eof()


async def test_a_peer_that_never_answers_our_close_is_hung_up_on() -> None:
    async with relay_running() as (relay, _):
        client = await RawClient.connect(relay)
        await client.stream.send_all(ws_frame(0x1, b'{"type":"bye"}'))
        close = await client.close_event()
        assert close is not None and close.code == 1000
        await client.wait_eof()


async def test_shutdown_closes_connections_with_1001_and_refuses_new_ones() -> None:
    async with relay_running() as (relay, stopping):
        async with open_websocket_url(url(relay)) as ws:
            await hello_of(ws)
            await ws.send_message('{"type":"ping"}')
            await ws.get_message()
            stopping.set()
            assert await closed_with(ws) == (1001, "server shutting down")
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", relay.port)


async def test_connections_over_the_limit_are_refused_with_503() -> None:
    async with relay_running(max_connections=1) as (relay, _), open_websocket_url(url(relay)) as ws:
        await hello_of(ws)
        with pytest.raises(ConnectionRejected) as info:
            async with open_websocket_url(url(relay)):
                pass  # pragma: no cover - rejected
        assert info.value.status_code == 503


async def test_a_full_send_queue_closes_with_1008() -> None:
    limits = Limits(
        max_frame_bytes=1024,
        handshake_timeout_seconds=1,
        idle_timeout_seconds=1,
        send_queue_frames=2,
        max_bad_frames=3,
    )
    proto = core.ServerConnection(limits, server_name="chatd")
    stream_a, _ = trio.testing.memory_stream_pair()
    ws = WebSocket(stream_a, max_message=1024)
    async with trio.open_nursery() as nursery:
        conn = Connection(
            ws, proto, "127.0.0.1", nursery=nursery, send_queue_frames=2, send_timeout=1, window=10
        )
        conn.answer([a.data for a in proto.start() if isinstance(a, core.Send)])
        conn.answer([b"{}"])
        assert conn.closing is None
        conn.answer([b"{}"])
        assert conn.closing == core.Close(1008, "send queue full")
        nursery.cancel_scope.cancel()


async def test_a_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ListenError, match=f"127.0.0.1:{port} is already in use") as info:
            async with relay_running(port=port):
                pass  # pragma: no cover - cannot bind
        assert info.value.exit_code == 5


# -- TLS -----------------------------------------------------------------------------


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    try:
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                str(key),
                "-out",
                str(cert),
                "-days",
                "1",
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ],
            check=True,
            capture_output=True,
        )
    except (FileNotFoundError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"openssl cannot make a test certificate: {exc}")
    return cert, key


def client_context(cert: Path, **options: Any) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cert))
    for name, value in options.items():
        if name == "curve":
            ctx.set_ecdh_curve(value)
        else:
            setattr(ctx, name, value)
    return ctx


async def test_tls_1_3_with_x25519_is_served(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    async with relay_running(tls_certificate=str(cert), tls_private_key=str(key)) as (relay, _):
        ctx = client_context(cert)
        async with open_websocket_url(f"wss://127.0.0.1:{relay.port}/v1/ws", ssl_context=ctx) as ws:
            await hello_of(ws)
        ctx.set_alpn_protocols(["http/1.1"])
        tcp = await trio.open_tcp_stream("127.0.0.1", relay.port)
        tls = trio.SSLStream(tcp, ctx, server_hostname="127.0.0.1")
        await tls.do_handshake()
        assert tls.version() == "TLSv1.3"
        assert tls.selected_alpn_protocol() == "http/1.1"
        await trio.aclose_forcefully(tls)


@pytest.mark.parametrize(
    "options",
    [{"maximum_version": ssl.TLSVersion.TLSv1_2}, {"curve": "prime256v1"}],
    ids=["tls1.2", "p256-only"],
)
async def test_tls_below_1_3_or_without_x25519_is_refused(
    certificate: tuple[Path, Path], options: dict[str, Any]
) -> None:
    cert, key = certificate
    async with relay_running(tls_certificate=str(cert), tls_private_key=str(key)) as (relay, _):
        ctx = client_context(cert, **options)
        tcp = await trio.open_tcp_stream("127.0.0.1", relay.port)
        tls = trio.SSLStream(tcp, ctx, server_hostname="127.0.0.1")
        with trio.fail_after(10), pytest.raises(trio.BrokenResourceError):
            await tls.do_handshake()
        await trio.aclose_forcefully(tls)


def upgrade_request(path: str = "/v1/ws") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def read_to_eof(stream: trio.SocketStream) -> bytes:
    data = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some(65_536):
            data += chunk
    return data


async def test_a_rejected_handshake_is_answered_and_hung_up() -> None:
    async with relay_running() as (relay, _):
        stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
        await stream.send_all(upgrade_request("/nope"))
        response = await read_to_eof(stream)  # the server closes; we never do
        assert response.startswith(b"HTTP/1.1 404")
        await wait_streams_closed(relay)


async def test_a_client_that_never_handshakes_is_dropped() -> None:
    async with relay_running() as (relay, _):
        stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
        assert await read_to_eof(stream) == b""


async def test_concurrent_handshakes_cannot_exceed_the_connection_limit() -> None:
    async with relay_running(max_connections=3) as (relay, _):
        streams = [await trio.open_tcp_stream("127.0.0.1", relay.port) for _ in range(8)]
        for stream in streams:
            await stream.send_all(upgrade_request())
        statuses = []
        for stream in streams:
            with trio.fail_after(10):
                head = await stream.receive_some(65_536)
            statuses.append(head.split(b" ", 2)[1])
        assert statuses.count(b"101") == 3
        assert statuses.count(b"503") == 5
        for stream in streams:
            await trio.aclose_forcefully(stream)


async def wait_streams_closed(relay: Relay) -> None:
    with trio.fail_after(5):
        await relay.streams.wait_all_closed()


async def test_a_server_bug_closes_with_1011_without_details(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(self: core.ServerConnection, data: str | bytes) -> list[core.Action]:
        raise RuntimeError("internal detail")

    monkeypatch.setattr(core.ServerConnection, "receive_text", broken)
    async with relay_running() as (relay, _), open_websocket_url(url(relay)) as ws:
        await hello_of(ws)
        await ws.send_message('{"type":"ping"}')
        assert await closed_with(ws) == (1011, "internal error")


@pytest.mark.parametrize("path", ["flusher", "writer task"])
async def test_a_server_bug_in_the_sender_task_closes_with_1011_and_ends_cleanly(
    monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    send_all, try_send = WebSocket.send_all, WebSocket.try_send

    async def broken(self: WebSocket, data: bytes) -> None:
        if b'"pong"' in data:
            raise RuntimeError("internal detail")
        await send_all(self, data)

    def broken_at_once(self: WebSocket, data: bytes) -> int:
        if b'"pong"' not in data:
            return try_send(self, data)
        if path == "writer task":
            return 0  # the socket took nothing: the writer task writes it
        raise RuntimeError("internal detail")

    monkeypatch.setattr(WebSocket, "send_all", broken)
    monkeypatch.setattr(WebSocket, "try_send", broken_at_once)
    through_the_flusher(monkeypatch)
    async with relay_running() as (relay, _):
        client = await RawClient.connect(relay)
        await client.stream.send_all(ws_frame(0x1, b'{"type":"ping","id":"p"}'))
        close = await client.close_event()
        assert close is not None and (close.code, close.reason) == (1011, "internal error")
        await client.stream.aclose()
        await wait_streams_closed(relay)  # the connection ended, helpers and all
        async with open_websocket_url(url(relay)) as other:
            await hello_of(other)  # everyone else is still served
            await trio.testing.wait_all_tasks_blocked()
            assert relay_tasks(relay) == ([1], [])


async def test_no_close_frame_follows_a_frame_cut_off_mid_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The send queue fills while the sender is stuck writing a frame (the
    peer takes no data): the queued frames are dropped and the stuck write
    gets CLOSE_TIMEOUT to finish. It does not, so the stream may end in the
    middle of a frame, and the relay hangs up without a Close frame rather
    than write one after half a frame."""
    from chatd.relay import connection as connection_module

    send_all = WebSocket.send_all
    stuck = trio.Event()

    async def never_done(self: WebSocket, data: bytes) -> None:
        if b'"pong"' in data:
            stuck.set()
            await trio.sleep_forever()  # as a write to a peer that never reads
        await send_all(self, data)

    monkeypatch.setattr(WebSocket, "send_all", never_done)
    monkeypatch.setattr(WebSocket, "try_send", lambda self, data: 0)  # a peer that never reads
    monkeypatch.setattr(connection_module, "CLOSE_TIMEOUT", 0.2)
    async with relay_running(send_queue_frames=2) as (relay, _):
        client = await RawClient.connect(relay)
        await client.stream.send_all(ws_frame(0x1, b'{"type":"ping","id":"p0"}'))
        await stuck.wait()
        for n in range(1, 4):  # queued behind the stuck one: the queue fills
            await client.stream.send_all(ws_frame(0x1, b'{"type":"ping","id":"p%d"}' % n))
        assert await client.close_event() is None  # a bare hang-up, no Close frame
        await wait_streams_closed(relay)
        assert not relay.connections


async def test_a_flooding_client_that_does_not_read_is_closed_and_fully_released() -> None:
    async with relay_running(send_queue_frames=2, idle_timeout_seconds=30) as (relay, _):
        client = await RawClient.connect(relay)
        burst = ws_frame(0x1, b'{"type":"ping","id":"' + b"x" * 60 + b'"}') * 3000
        with trio.move_on_after(5):
            await client.stream.send_all(burst)  # may block once the server stops reading
        close = await client.close_event()
        assert close is not None and (close.code, close.reason) == (1008, "send queue full")
        await wait_streams_closed(relay)
        assert not relay.connections


async def test_peers_leaving_mid_handshake_are_released_at_once() -> None:
    async with relay_running(handshake_timeout_seconds=60) as (relay, _):
        stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
        await stream.send_all(b"GET /v1/ws HTTP/1.1\r\n")  # and never the rest
        await stream.aclose()
        await wait_streams_closed(relay)


async def test_shutdown_does_not_wait_for_stalled_handshakes() -> None:
    async with relay_running(handshake_timeout_seconds=60) as (relay, stopping):
        stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
        await stream.send_all(b"GET /v1/ws HTTP/1.1\r\n")
        await trio.testing.wait_all_tasks_blocked()  # the server is waiting for the rest
        assert relay.streams.open == 1
        stopping.set()
        assert await read_to_eof(stream) == b""
        await wait_streams_closed(relay)


async def test_a_websocket_ping_after_our_close_is_ignored_and_the_server_survives() -> None:
    async with relay_running() as (relay, _):
        client = await RawClient.connect(relay)
        await client.stream.send_all(ws_frame(0x1, b'{"type":"bye"}'))
        close = await client.close_event()
        assert close is not None and close.code == 1000
        # The server has sent its Close and waits for ours; a Ping instead
        # used to crash the whole relay.
        await client.stream.send_all(ws_frame(0x9, b"late"))
        await client.wait_eof()
        # Everyone else is still served.
        async with open_websocket_url(url(relay)) as ws:
            await hello_of(ws)


async def test_a_big_message_after_a_bye_is_dropped_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After the server's Close, what the peer still sends is read and dropped,
    a message over the limit too: no second Close, no error in the log."""
    async with relay_running() as (relay, _):
        client = await RawClient.connect(relay)
        await client.stream.send_all(
            ws_frame(0x1, b'{"type":"bye"}') + ws_frame(0x1, b"x" * 70_000)
        )
        close = await client.close_event()
        assert close is not None and close.code == 1000
        await client.wait_eof()
        await wait_streams_closed(relay)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_close_from_the_peer_with_answers_still_queued_is_quiet(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The peer closes right after many requests: answers not yet written are
    dropped (nothing may follow the peer's Close but ours), with no error."""
    async with relay_running() as (relay, _):
        client = await RawClient.connect(relay)
        pings = b"".join(ws_frame(0x1, b'{"type":"ping","id":"p%d"}' % n) for n in range(50))
        await client.stream.send_all(pings + ws_frame(0x8, struct.pack("!H", 1000)))
        close = await client.close_event()
        assert close is not None and close.code == 1000
        await client.stream.aclose()
        await wait_streams_closed(relay)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_pong_comes_after_the_answers_to_what_came_before_the_ping() -> None:
    async with relay_running() as (relay, _):
        client = await RawClient.connect(relay)
        frames = ws_frame(0x1, b'{"type":"ping","id":"first"}') + ws_frame(0x9, b"then")
        await client.stream.send_all(frames)
        first, second = await client.next_event(), await client.next_event()
        assert isinstance(first, TextMessage) and '"first"' in first.data
        assert type(second).__name__ == "Pong" and second.payload == b"then"


async def test_the_servers_close_echoes_the_peers_code() -> None:
    async with relay_running() as (relay, _):
        client = await RawClient.connect(relay)
        await client.stream.send_all(ws_frame(0x8, struct.pack("!H", 4000) + b"done"))
        close = await client.close_event()
        assert close is not None and close.code == 4000


async def test_websocket_pings_are_answered_while_open() -> None:
    async with relay_running() as (relay, _):
        client = await RawClient.connect(relay)
        await client.stream.send_all(ws_frame(0x9, b"are you there"))
        pong = await client.next_event()
        assert type(pong).__name__ == "Pong" and pong.payload == b"are you there"


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        ("203.0.113.5", "198.51.100.1", "203.0.113.5"),  # not a proxy: header ignored
        ("127.0.0.1", None, "127.0.0.1"),
        ("127.0.0.1", "198.51.100.1", "198.51.100.1"),
        ("127.0.0.1", "6.6.6.6, 198.51.100.1", "198.51.100.1"),  # the client may forge the left
        ("127.0.0.1", "198.51.100.1, 10.1.2.3", "198.51.100.1"),  # skip inner trusted proxies
        ("127.0.0.1", "not-an-ip", "127.0.0.1"),
        ("::1", "2001:db8::7", "2001:db8::7"),
    ],
)
def test_the_client_address_behind_trusted_proxies(
    peer: str, forwarded: str | None, client: str
) -> None:
    proxies = TrustedProxies(("127.0.0.1/32", "::1/128", "10.0.0.0/8"))
    headers = [(b"X-Forwarded-For", forwarded.encode())] if forwarded else []
    assert proxies.client_address(peer, headers) == client


async def test_accepted_connections_keep_no_handshake_state() -> None:
    """Once upgraded, a connection holds wsproto's post-handshake connection
    only: no HTTP parser, no request headers (memory per idle connection)."""
    async with relay_running() as (relay, _), open_websocket_url(url(relay)) as ws:
        await hello_of(ws)
        [conn] = relay.connections
        held = [getattr(conn.ws, name, None) for name in type(conn.ws).__slots__]
        assert not any(type(value).__module__.startswith("h11") for value in held)
        await ws.send_message('{"type":"ping","id":"p1"}')
        assert json.loads(await ws.get_message())["type"] == "pong"  # still speaks


async def test_a_frame_sent_with_the_upgrade_request_is_not_lost() -> None:
    """A client that does not wait for the 101 before its first frame: the
    bytes after the request reach the WebSocket layer."""
    async with relay_running() as (relay, _):
        stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
        await stream.send_all(upgrade_request() + ws_frame(0x1, b'{"type":"ping","id":"early"}'))
        client = WSConnection(ConnectionType.CLIENT)
        client.send(Request(host="127.0.0.1", target="/v1/ws"))  # to read the answer as a client
        data = b""
        with trio.fail_after(10):
            while b'"pong"' not in data:
                data += await stream.receive_some(65_536)
        assert b'"id":"early"' in data
        await trio.aclose_forcefully(stream)


async def test_websocket_pings_do_not_keep_a_connection_alive() -> None:
    """Control frames are not messages: a client that only sends WebSocket
    Pings is still closed at the first frame timeout (0.5 s here), long
    before the one idle period an unauthenticated connection may live."""
    async with relay_running(idle_timeout_seconds=30) as (relay, _):
        client = await RawClient.connect(relay)
        with trio.fail_after(5):
            while True:
                await client.stream.send_all(ws_frame(0x9, b"still here"))
                event = await client.next_event()
                if isinstance(event, CloseConnection):
                    break
        assert (event.code, event.reason) == (1008, "first frame timeout")


async def test_a_frame_the_socket_took_only_in_part_is_finished_by_a_writer_task(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The flusher's write takes what the socket takes at once; the rest of a
    frame cut there is written by a writer task before anything else."""
    try_send = WebSocket.try_send

    def half(self: WebSocket, data: bytes) -> int:
        return try_send(self, data[: max(1, len(data) // 2)])

    monkeypatch.setattr(WebSocket, "try_send", half)
    through_the_flusher(monkeypatch)
    async with relay_running() as (relay, _), open_websocket_url(url(relay)) as ws:
        await hello_of(ws)
        for n in range(5):
            await ws.send_message(json.dumps({"type": "ping", "id": f"p{n}"}))
        for n in range(5):
            assert json.loads(await ws.get_message()) == {"type": "pong", "id": f"p{n}"}
        await trio.testing.wait_all_tasks_blocked()
        assert relay_tasks(relay) == ([1], [])  # the writer task ended


def through_the_flusher(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every wake goes to the flusher (as a room entry's does), not to a writer task."""
    from chatd.relay.connection import Connection

    wake = Connection.wake

    def fanned_out(self: Connection, *, fan_out: bool = False) -> None:
        wake(self, fan_out=True)

    monkeypatch.setattr(Connection, "wake", fanned_out)
