"""Floods from one address: each hits its limit, and others are still served.

The bounded part of the floods suite (docs/RELIABILITY.md section 4); the
long run with latency figures is ``bench/floods.py``. Floods come from
127.0.0.2 (loopback has all of 127/8, and 127.0.0.1 is a trusted proxy by
default), the well-behaved client from 127.0.0.3.
"""

from __future__ import annotations

import contextlib
import json
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import trio
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from chatd.protocol.delivery import Delivery
from chatd.protocol.frames import Envelope
from chatd.relay import Relay
from chatd.relay.addresses import (
    ANSWERED_BURST,
    ANSWERED_PER_SECOND,
    AddressLimits,
    address_key,
)
from chatd.relay.server import ADMITTING_AT_ONCE

from .test_relay import RawClient, relay_running, upgrade_request, wait_streams_closed, ws_frame
from .test_relay_auth import connect, server
from .test_syndrop import TCP_SYN_SENT, tcp_state

FLOODER = "127.0.0.2"
OTHER = "127.0.0.3"


async def open_from(relay: Relay, address: str) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", relay.port, local_address=address)


async def response_head(stream: trio.SocketStream) -> bytes:
    """The HTTP response head, or b"" if the server hung up without one."""
    data = b""
    with trio.fail_after(10):
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65_536)
            if not chunk:
                return data
            data += chunk
    return data.split(b"\r\n\r\n", 1)[0]


async def served_from(relay: Relay, address: str) -> None:
    """A client from ``address`` upgrades, gets hello and a pong."""
    client = RawClient(await open_from(relay, address))
    await client.stream.send_all(client.ws.send(Request(host="127.0.0.1", target="/v1/ws")))
    assert isinstance(await client.next_event(), AcceptConnection)
    hello = await client.next_event()
    assert isinstance(hello, TextMessage) and json.loads(hello.data)["type"] == "hello"
    await client.stream.send_all(ws_frame(0x1, b'{"type":"ping","id":"p"}'))
    pong = await client.next_event()
    assert isinstance(pong, TextMessage) and json.loads(pong.data) == {"type": "pong", "id": "p"}
    await trio.aclose_forcefully(client.stream)


async def test_one_address_cannot_take_every_connection_slot() -> None:
    """Defect 3: past its unauthenticated limit an address gets 429 with
    Retry-After before the upgrade; another address still gets in."""
    limit, extra = 5, int(ANSWERED_BURST)  # all of them answered
    async with relay_running(
        max_connections=20, max_unauthenticated_per_address=limit, idle_timeout_seconds=30
    ) as (relay, _):
        flood, heads = [], []
        for _ in range(limit + extra):
            stream = await open_from(relay, FLOODER)
            flood.append(stream)
            await stream.send_all(upgrade_request())
            heads.append(await response_head(stream))
        statuses = [head.split(b" ", 2)[1] for head in heads]
        assert statuses.count(b"101") == limit
        refused = [head for head in heads if b" 429 " in head]
        assert len(refused) == extra
        assert all(b"\r\nretry-after: 10" in head.lower() for head in refused)
        assert relay.addresses.connections_of(FLOODER) == limit
        await served_from(relay, OTHER)
        for stream in flood:
            await trio.aclose_forcefully(stream)
        await wait_streams_closed(relay)
        assert relay.addresses.connections_of(FLOODER) == 0  # every count given back


async def test_behind_a_trusted_proxy_the_forwarded_address_is_limited() -> None:
    """From a trusted proxy (127.0.0.1), X-Forwarded-For names the address
    that is counted: one forwarded client is refused, another is served."""
    async with relay_running(max_unauthenticated_per_address=2, idle_timeout_seconds=30) as (
        relay,
        _,
    ):

        def forwarded(client: str) -> bytes:
            head = upgrade_request()[:-2]
            return head + f"X-Forwarded-For: {client}\r\n\r\n".encode()

        streams = []
        statuses = []
        for client in ("203.0.113.7",) * 3 + ("203.0.113.8",):
            stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
            streams.append(stream)
            await stream.send_all(forwarded(client))
            statuses.append((await response_head(stream)).split(b" ", 2)[1])
        assert statuses == [b"101", b"101", b"429", b"101"]
        for stream in streams:
            await trio.aclose_forcefully(stream)


def syn_from(relay: Relay, address: str) -> socket.socket:
    """A non-blocking connect from ``address`` to the relay, under way."""
    sock = socket.socket()
    sock.bind((address, 0))
    sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        sock.connect(("127.0.0.1", relay.port))
    return sock


def test_an_ipv6_client_is_counted_by_its_64() -> None:
    """One IPv6 client has a /64 to pick addresses from: the limits count
    the /64, as the login rate limits do; IPv4 and mapped addresses count
    as themselves."""
    assert address_key("2001:db8:1:2:aaaa::7") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:2:bbbb::8") == "2001:db8:1:2::/64"
    assert address_key("203.0.113.7") == "203.0.113.7"
    assert address_key("::ffff:203.0.113.7") == "203.0.113.7"
    assert address_key("not an address") == "not an address"


async def test_addresses_of_one_ipv6_64_share_its_limits() -> None:
    """Forwarded by a trusted proxy: two addresses of one /64 share its
    limit of 2; an address in the next /64 is served."""
    async with relay_running(max_unauthenticated_per_address=2, idle_timeout_seconds=30) as (
        relay,
        _,
    ):
        streams, statuses = [], []
        for client in ("2001:db8:1:2::7", "2001:db8:1:2::8", "2001:db8:1:2::9", "2001:db8:1:3::1"):
            stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
            streams.append(stream)
            await stream.send_all(
                upgrade_request()[:-2] + f"X-Forwarded-For: {client}\r\n\r\n".encode()
            )
            statuses.append((await response_head(stream)).split(b" ", 2)[1])
        assert statuses == [b"101", b"101", b"429", b"101"]
        assert relay.addresses.connections_of("2001:db8:1:2::/64") == 2
        for stream in streams:
            await trio.aclose_forcefully(stream)


async def status_of(stream: trio.SocketStream) -> bytes:
    """The response's status, or b"hung up" if the server closed unanswered."""
    try:
        await stream.send_all(upgrade_request())
        head = await response_head(stream)
    except trio.BrokenResourceError:  # reset: it closed with our request unread
        head = b""
    return head.split(b" ", 2)[1] if head else b"hung up"


async def test_an_address_flooding_past_its_limit_is_hung_up_on_at_accept() -> None:
    """Past its limit an address is answered 429 ANSWERED_BURST times in a
    row (then at ANSWERED_PER_SECOND); its further connections are closed at
    accept, unread and without a task; another address is served, and the
    flooder again once its connections are gone."""
    limit = 2
    async with relay_running(max_unauthenticated_per_address=limit, idle_timeout_seconds=30) as (
        relay,
        _,
    ):
        held = [await open_from(relay, FLOODER) for _ in range(limit)]
        assert [await status_of(stream) for stream in held] == [b"101"] * limit
        statuses = []
        with trio.fail_after(10):
            while b"hung up" not in statuses:
                stream = await open_from(relay, FLOODER)
                statuses.append(await status_of(stream))
                await trio.aclose_forcefully(stream)
        # The first refusals are answered; more may be as the budget refills
        # while the test runs, hence "at least".
        assert statuses[: int(ANSWERED_BURST)] == [b"429"] * int(ANSWERED_BURST)
        assert relay.addresses.hung_up >= 1
        assert relay.addresses.connections_of(FLOODER) == limit  # none of them counted
        # Until the second ends the kernel drops the flooder's SYNs unanswered.
        assert relay.streams.drops.dropped >= 1
        unanswered = syn_from(relay, FLOODER)
        await served_from(relay, OTHER)
        if relay.streams.drops.dropping(FLOODER):  # not lifted at a second's turn meanwhile
            assert tcp_state(unanswered) == TCP_SYN_SENT
        unanswered.close()
        for stream in held:
            await trio.aclose_forcefully(stream)
        await wait_streams_closed(relay)
        await served_from(relay, FLOODER)


async def test_new_connections_wait_their_turn_to_be_set_up_and_others_are_served_meanwhile() -> (
    None
):
    """Set-ups run ADMITTING_AT_ONCE at a time: while every turn is taken, a
    new connection's upgrade waits (its stream is open, its request read),
    a connection already set up still gets its pong, and the newcomer is
    answered 101 as soon as a turn is free."""
    async with relay_running(idle_timeout_seconds=30) as (relay, _):
        established = await RawClient.connect(relay)
        turns = [object() for _ in range(ADMITTING_AT_ONCE)]
        for turn in turns:
            relay.admitting.acquire_on_behalf_of_nowait(turn)
        newcomer = await open_from(relay, OTHER)
        await newcomer.send_all(upgrade_request())
        with trio.fail_after(10):
            while relay.admitting.statistics().tasks_waiting == 0:
                await trio.sleep(0)  # until its request is read and it waits for a turn
        await established.stream.send_all(ws_frame(0x1, b'{"type":"ping","id":"p"}'))
        pong = await established.next_event()
        assert isinstance(pong, TextMessage) and json.loads(pong.data)["type"] == "pong"
        relay.admitting.release_on_behalf_of(turns[0])
        assert (await response_head(newcomer)).startswith(b"HTTP/1.1 101 ")
        for turn in turns[1:]:
            relay.admitting.release_on_behalf_of(turn)
        await trio.aclose_forcefully(newcomer)
        await trio.aclose_forcefully(established.stream)


async def test_an_ending_connection_takes_a_turn_before_its_close() -> None:
    """Connections that end together (timeouts due at once) are closed a
    few at a time: with every turn taken, a client's Close is answered only
    once a turn is free."""
    async with relay_running(idle_timeout_seconds=30) as (relay, _):
        client = await RawClient.connect(relay)
        turns = [object() for _ in range(ADMITTING_AT_ONCE)]
        for turn in turns:
            relay.admitting.acquire_on_behalf_of_nowait(turn)
        await client.stream.send_all(client.ws.send(CloseConnection(code=1000)))
        with trio.fail_after(10):
            while relay.admitting.statistics().tasks_waiting == 0:
                await trio.sleep(0)  # until the server has read it and waits for a turn
        for turn in turns:
            relay.admitting.release_on_behalf_of(turn)
        close = await client.close_event()
        assert close is not None and close.code == 1000
        await trio.aclose_forcefully(client.stream)


async def test_a_trusted_proxy_is_never_hung_up_on_at_accept() -> None:
    """Its clients are only known from the request: a forwarded address over
    its limit is answered 429 each time, however often."""
    async with relay_running(max_unauthenticated_per_address=1, idle_timeout_seconds=30) as (
        relay,
        _,
    ):
        request = upgrade_request()[:-2] + b"X-Forwarded-For: 203.0.113.7\r\n\r\n"
        streams = []
        answered = int(ANSWERED_BURST + ANSWERED_PER_SECOND)
        for _ in range(answered + 1):
            stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
            streams.append(stream)
            await stream.send_all(request)
        statuses = [(await response_head(stream)).split(b" ", 2)[1] for stream in streams]
        assert statuses == [b"101"] + [b"429"] * answered
        assert relay.addresses.hung_up == 0 and relay.streams.drops.dropped == 0
        for stream in streams:
            await trio.aclose_forcefully(stream)


def test_the_per_address_limit_counts_authenticated_connections_too() -> None:
    limits = AddressLimits(per_address=3, unauthenticated=2)

    class Conn:  # what AddressLimits reads of a connection
        def __init__(self, authenticated: bool) -> None:
            self.proto = SimpleNamespace(authenticated=authenticated)

    def conn(authenticated: bool) -> Any:
        return Conn(authenticated)

    a, b = conn(True), conn(True)
    for c in (a, b):
        assert limits.admit("203.0.113.9", 0.0) is None
        limits.bind("203.0.113.9", c)
    assert limits.unauthenticated_of("203.0.113.9") == 0
    assert limits.admit("203.0.113.9", 0.0) is None  # a third, still in its upgrade
    assert limits.admit("203.0.113.9", 0.0) == b"too many connections from this address\n"
    assert limits.admit("198.51.100.1", 0.0) is None  # another address is not affected
    limits.release("203.0.113.9", a)
    assert limits.connections_of("203.0.113.9") == 2


def test_an_address_over_its_limits_is_answered_at_a_steady_rate_and_hung_up_on_between() -> None:
    """Its first ANSWERED_BURST refusals are answered at once, then one each
    1/ANSWERED_PER_SECOND s; a connection in between is hung up on, and
    hang_up says when the next answer is due. Another address, or the same
    one back under its limits, goes on."""
    limits = AddressLimits(per_address=10, unauthenticated=1)

    class Conn:  # what AddressLimits reads of a connection
        proto = SimpleNamespace(authenticated=False)

    flooder, conn = "203.0.113.9", cast(Any, Conn())
    step = 1 / ANSWERED_PER_SECOND
    assert limits.hang_up(flooder, 5.0) is None
    assert limits.admit(flooder, 5.0) is None
    limits.bind(flooder, conn)
    assert limits.admit(flooder, 5.0) is not None  # its first 429: budgeted from now on
    for _ in range(int(ANSWERED_BURST) - 1):
        assert limits.hang_up(flooder, 5.0) is None  # each of these is answered 429
        assert limits.admit(flooder, 5.0) is not None
    assert limits.hang_up(flooder, 5.0) == pytest.approx(5.0 + step)
    assert limits.hang_up(flooder, 5.0 + step / 2) == pytest.approx(5.0 + step)
    assert limits.hang_up("198.51.100.1", 5.0) is None  # another address
    assert limits.hang_up(flooder, 5.0 + step) is None  # its next answer is due
    assert limits.hang_up(flooder, 5.0 + step) is not None
    assert limits.hung_up == 3
    limits.release(flooder, conn)  # no connection left: nothing budgeted
    assert limits.hang_up(flooder, 5.0 + step) is None
    assert limits.admit(flooder, 5.0 + step) is None
    assert limits.refused == ANSWERED_BURST


def test_an_address_back_under_its_limits_is_not_hung_up_on() -> None:
    limits = AddressLimits(per_address=10, unauthenticated=2)

    class Conn:
        proto = SimpleNamespace(authenticated=False)

    flooder, a, b = "203.0.113.9", cast(Any, Conn()), cast(Any, Conn())
    for conn in (a, b):
        assert limits.admit(flooder, 0.0) is None
        limits.bind(flooder, conn)
    for _ in range(int(ANSWERED_BURST)):
        assert limits.admit(flooder, 0.0) is not None
        limits.hang_up(flooder, 0.0)
    assert limits.hang_up(flooder, 0.0) is not None
    limits.release(flooder, a)  # one slot free again
    assert limits.hang_up(flooder, 0.0) is None
    assert limits.admit(flooder, 0.0) is None


async def test_slowloris_handshakes_from_one_address_are_bounded() -> None:
    """Upgrade requests sent a byte at a time: past the address's limit a
    stream is hung up on at once and the kernel drops the peer's SYNs
    meanwhile; the others are dropped at the handshake timeout; another
    address is served throughout, and the peer again once its handshakes
    have ended."""
    limit = 4
    async with relay_running(
        max_unauthenticated_per_address=limit, handshake_timeout_seconds=1.0
    ) as (relay, _):
        streams = [await open_from(relay, FLOODER) for _ in range(limit + 1)]
        for stream in streams:
            await stream.send_all(b"G")  # one byte of the request line, and then nothing
        assert await response_head(streams[limit]) == b""  # no answer, just EOF
        assert relay.streams.hung_up == 1 and relay.streams.drops.dropped == 1
        unanswered = syn_from(relay, FLOODER)
        await served_from(relay, OTHER)
        if relay.streams.drops.dropping(FLOODER):  # not lifted after its 0.1 s meanwhile
            assert tcp_state(unanswered) == TCP_SYN_SENT
        unanswered.close()
        started = trio.current_time()
        for stream in streams[:limit]:
            assert await response_head(stream) == b""  # dropped at the timeout
        assert trio.current_time() - started < 5
        await wait_streams_closed(relay)
        assert not relay.streams.drops.dropping(FLOODER)
        await served_from(relay, FLOODER)


async def test_half_sent_frames_from_one_address_time_out_and_others_are_served() -> None:
    """Frame headers promising 1,000 bytes, then a stall: each connection is
    closed at the first-frame timeout, with a Close frame; others are served."""
    async with relay_running(max_unauthenticated_per_address=8) as (relay, _):
        clients = []
        for _ in range(6):
            client = RawClient(await open_from(relay, FLOODER))
            await client.stream.send_all(client.ws.send(Request(host="127.0.0.1", target="/v1/ws")))
            assert isinstance(await client.next_event(), AcceptConnection)
            assert isinstance(await client.next_event(), TextMessage)  # hello
            await client.stream.send_all(ws_frame(0x1, b'{"type":"pi', declared=1_000))
            clients.append(client)
        await served_from(relay, OTHER)
        for client in clients:
            close = await client.close_event()
            assert close is not None and (close.code, close.reason) == (1008, "first frame timeout")
            await trio.aclose_forcefully(client.stream)
        await wait_streams_closed(relay)
        assert not relay.connections


def test_the_delivery_window_is_bounded_in_bytes_too() -> None:
    """Defect 8: a connection that does not read is handed about the
    window's bytes, not 1,000 envelopes of any size; an ack reopens it."""
    delivery = Delivery(window=1_000, window_bytes=20_000)
    delivery.start()
    rows = [
        Envelope(
            envelope_id=n,
            kind="message",
            message_id=f"m{n}",
            sent_at=0,
            sender_user_id=1,
            sender_device_id="SENDER",
            ciphertext="c" * 8_000,
        )
        for n in range(1, 11)
    ]
    limit = delivery.read_limit()
    handed = delivery.read_done(rows[:limit], through=10, complete=True, tail=())
    assert [e.envelope_id for e in handed] == [1, 2, 3]  # 24,000 bytes: one past the mark
    assert delivery.room == 0 and delivery.read_limit() == 0
    delivery.take_ready(range(100))
    assert delivery.room == 0  # written is not acknowledged: still held
    delivery.ack(2)
    assert delivery.handed_bytes == 8_000 and delivery.room > 0


async def test_a_device_keeps_at_most_its_limit_of_connections(tmp_path: Path) -> None:
    """The oldest connection of a device closes with 1008 when one more
    than max_connections_per_device gets its session."""
    async with server(tmp_path, relay={"max_connections_per_device": 2}) as srv:
        async with connect(srv) as first:
            session = await first.login()
            token = session["access_token"]
            async with connect(srv) as second, connect(srv) as third:
                assert (await second.request("resume", access_token=token))["type"] == "session"
                assert (await third.request("resume", access_token=token))["type"] == "session"
                assert await first.closed() == (1008, "too many connections for this device")
                pong = await third.request("ping")
                assert pong["type"] == "pong"
                assert len(srv.relay.registry.by_device[session["device_id"]].connections) == 2
