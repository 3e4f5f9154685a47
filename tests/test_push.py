"""Push wake-ups over real sockets: the relay, a real SQLCipher file, and an
allowlisted loopback HTTP receiver (raw h11 on Trio) that records every byte
it got. Nothing here sleeps to wait: it waits on the receiver's and the
notifier's events."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import h11
import http_ece
import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from chatd.auth.accounts import AccountAdmin
from chatd.config import AuthSettings, Config, PushSettings, RelaySettings, StoreSettings
from chatd.daemon import Services, open_services
from chatd.push import Notifier, PushRefused
from chatd.push.guard import checked_addresses, parse_target
from chatd.push.notifier import OpenSender, SenderLink
from chatd.push.sender import LineReader, LinkError, Setup, serve_sender
from chatd.relay import serve_relay
from chatd.store import serve_store

from .test_keys import BOB_PASSWORD, Device, login_device
from .test_relay_auth import KEY, PASSWORD, Server, connect, create_once
from .test_rooms import create, room_send

LOOPBACK = ("127.0.0.1/32",)


# -- the receiver ---------------------------------------------------------------------


@dataclasses.dataclass
class Received:
    raw: bytes  # every byte of the request as it came off the socket
    method: bytes
    target: bytes
    headers: dict[bytes, bytes]
    body: bytes
    at: float  # trio time


class Receiver:
    """A push distributor stand-in: answers each POST with the next of
    ``statuses`` (then 201), after ``hold`` is set if there is one."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.statuses: list[int] = []
        self.location = b""
        self.hold: trio.Event | None = None
        self.port = 0
        self.connections = 0
        self.close_after_answer = False  # close the connection after the next answer
        self._changed = trio.Event()
        self._closed = trio.Event()

    def url(self, path: str = "/up/topic?up=1", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    async def wait_count(self, count: int) -> list[Received]:
        with trio.fail_after(10):
            while len(self.received) < count:
                await self._changed.wait()
        return self.received

    async def wait_closed(self) -> None:
        """Until a connection closed because of ``close_after_answer``."""
        with trio.fail_after(10):
            await self._closed.wait()

    async def handle(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        async with stream:
            while True:
                raw, body = bytearray(), bytearray()
                request: h11.Request | None = None
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        raw += data
                        conn.receive_data(data)
                    elif isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    else:
                        return
                assert request is not None
                headers = {k.lower(): v for k, v in request.headers}
                self.received.append(
                    Received(
                        bytes(raw),
                        request.method,
                        request.target,
                        headers,
                        bytes(body),
                        trio.current_time(),
                    )
                )
                self._changed.set()
                self._changed = trio.Event()
                status = self.statuses.pop(0) if self.statuses else 201
                if self.hold is not None:
                    await self.hold.wait()
                answer = [(b"content-length", b"0")]
                closing, self.close_after_answer = self.close_after_answer, False
                if closing:
                    answer.append((b"connection", b"close"))
                if 300 <= status < 400:
                    answer.append((b"location", self.location))
                await stream.send_all(
                    conn.send(h11.Response(status_code=status, headers=answer))
                    + conn.send(h11.EndOfMessage())
                )
                if closing:
                    # Half-close, and wait for the client to close its end:
                    # a full close at once could reset the connection (RST)
                    # before the client has read the answer.
                    assert isinstance(stream, trio.SocketStream)
                    await stream.send_eof()
                    while await stream.receive_some(65536):
                        pass
                    self._closed.set()
                    return
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()


@asynccontextmanager
async def receiver() -> AsyncIterator[Receiver]:
    rx = Receiver()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, rx.handle, 0, host="127.0.0.1"))
        rx.port = listeners[0].socket.getsockname()[1]
        yield rx
        nursery.cancel_scope.cancel()


# -- the server -------------------------------------------------------------------------


@dataclasses.dataclass
class Team:
    srv: Server
    services: Services

    @property
    def push(self) -> Notifier:
        return self.services.push

    async def endpoints(self) -> list[tuple[Any, ...]]:
        rows = await self.srv.store.read(
            lambda c: c.execute(
                "SELECT device_id, url, p256dh, auth FROM push_endpoints"
            ).fetchall()
        )
        return [tuple(r) for r in rows]


@asynccontextmanager
async def team(tmp: Path, **push: Any) -> AsyncIterator[Team]:
    settings = {"allowed_networks": LOOPBACK, "retry_base_seconds": 0.01, **push}
    config = Config(
        relay=RelaySettings(port=0, idle_timeout_seconds=30, handshake_timeout_seconds=10),
        auth=AuthSettings(require_mfa="none", backoff_base_seconds=1e-6),
        push=PushSettings(**settings),
        path=tmp / "chatd.toml",
    )
    async with trio.open_nursery() as nursery:
        store = await nursery.start(serve_store, tmp / "c.db", KEY, StoreSettings())
        services = await open_services(nursery, store, config)
        relay = await nursery.start(
            partial(serve_relay, **services.for_relay()), config, trio.Event()
        )
        admin = AccountAdmin(services.auth, current=services.current)
        await create_once(admin, "alice", PASSWORD)
        await create_once(admin, "bob", BOB_PASSWORD)
        srv = Server(
            relay, services.auth, admin, store, services.keys, services.queues, services.rooms
        )
        yield Team(srv, services)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def alice_and_offline_bob(
    t: Team, url: str, **keys: str
) -> AsyncIterator[tuple[Device, Device]]:
    """Alice online; Bob registered ``url`` and logged out (no live connection)."""
    async with connect(t.srv) as bc:
        bob = await login_device(bc, "bob", BOB_PASSWORD)
        await bob.publish(2)
        reply = await bc.request("push_register", url=url, **keys)
        assert reply["type"] == "ok", reply
        assert (await bc.request("logout"))["type"] == "ok"  # detached once answered
    assert not t.services.registry.has_device(bob.device_id)
    async with connect(t.srv) as ac:
        alice = await login_device(ac, "alice", PASSWORD)
        await alice.publish(2)
        yield alice, bob


async def send_to(sender: Device, to: Device, ciphertext: str, message_id: str = "") -> None:
    reply = await sender.client.request(
        "send",
        message_id=message_id or str(uuid.uuid4()),
        envelopes=[{"user_id": to.user_id, "device_id": to.device_id, "ciphertext": ciphertext}],
    )
    assert reply["type"] == "sent", reply


# -- what a wake-up carries -----------------------------------------------------------


async def test_an_offline_device_gets_a_wake_up_that_carries_nothing_about_the_message(
    short_tmp: Path,
) -> None:
    async with team(short_tmp) as t, receiver() as rx:
        async with alice_and_offline_bob(t, rx.url()) as (alice, bob):
            message_id = str(uuid.uuid4())
            await send_to(alice, bob, "SECRET-CIPHERTEXT-1234", message_id)
            [got] = await rx.wait_count(1)
            await t.push.wait_settled()
        assert got.method == b"POST" and got.target == b"/up/topic?up=1"
        assert got.headers[b"host"] == f"127.0.0.1:{rx.port}".encode()
        assert got.headers[b"ttl"] == b"86400"
        assert got.headers[b"content-type"] == b"application/json"
        assert set(got.headers) == {  # exactly PROTOCOL 8.14's table, nothing more
            b"host",
            b"user-agent",
            b"ttl",
            b"urgency",
            b"content-type",
            b"content-length",
        }
        assert got.headers[b"user-agent"] == b"chatd-push"
        body = json.loads(got.body)
        assert set(body) == {"type", "id"} and body["type"] == "wake_up"
        assert len(body["id"]) == 32 and int(body["id"], 16) >= 0
        raw = got.raw.lower()
        for secret in (
            "alice",
            "bob",
            "laptop",  # the device name the test clients log in with
            alice.device_id,
            bob.device_id,
            "secret-ciphertext",
            message_id,
        ):
            assert secret.lower().encode() not in raw, secret
        assert t.push.stats.sent == 1


async def test_a_room_entry_wakes_an_offline_member_with_nothing_about_the_room(
    short_tmp: Path,
) -> None:
    async with team(short_tmp) as t, receiver() as rx:
        async with connect(t.srv) as bc:
            bob = await login_device(bc, "bob", BOB_PASSWORD)
            await bob.publish(1)  # a device is a member device once it has keys
            async with connect(t.srv) as ac:
                alice = await login_device(ac, "alice", PASSWORD)
                await alice.publish(1)
                room = await create(alice, "launch-plans")
                joined = await bc.request("room_join", room_id=room["room_id"])
                assert (await bc.request("push_register", url=rx.url()))["type"] == "ok"
                await bc.request("logout")
                sent = await room_send(
                    alice, room["room_id"], joined["room"]["epoch"], "MEGOLM-CIPHERTEXT"
                )
                assert sent["type"] == "sent", sent
                [got] = await rx.wait_count(1)
        raw = got.raw.lower()
        for secret in ("launch-plans", "megolm-ciphertext", "alice", "bob", bob.device_id.lower()):
            assert secret.encode() not in raw, secret
        assert set(json.loads(got.body)) == {"type", "id"}


async def test_a_device_with_a_live_connection_gets_no_wake_up(short_tmp: Path) -> None:
    async with team(short_tmp) as t, receiver() as rx:
        async with connect(t.srv) as bc, connect(t.srv) as ac:
            bob = await login_device(bc, "bob", BOB_PASSWORD)
            await bob.publish(1)
            assert (await bc.request("push_register", url=rx.url()))["type"] == "ok"
            alice = await login_device(ac, "alice", PASSWORD)
            await alice.publish(1)
            await send_to(alice, bob, "hello")
            with trio.fail_after(10):
                while True:
                    frame = json.loads(await bc.ws.get_message())
                    if frame["type"] == "deliver":
                        break
            await t.push.wait_settled()
        assert rx.received == []
        assert t.push.stats.woken == 0


async def test_the_body_is_encrypted_to_the_devices_keys(short_tmp: Path) -> None:
    device_key = ec.generate_private_key(ec.SECP256R1())
    public = device_key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    auth = bytes(range(16))
    keys = {
        "p256dh": base64.urlsafe_b64encode(public).decode().rstrip("="),
        "auth": base64.urlsafe_b64encode(auth).decode().rstrip("="),
    }
    async with team(short_tmp) as t, receiver() as rx:
        async with alice_and_offline_bob(t, rx.url(), **keys) as (alice, bob):
            await send_to(alice, bob, "opaque")
            [got] = await rx.wait_count(1)
        assert got.headers[b"content-encoding"] == b"aes128gcm"
        assert got.headers[b"content-type"] == b"application/octet-stream"
        assert b"wake_up" not in got.raw
        plain = http_ece.decrypt(
            got.body, private_key=device_key, auth_secret=auth, version="aes128gcm"
        )
        body = json.loads(plain)
        assert set(body) == {"type", "id"} and body["type"] == "wake_up"
        [(device_id, _url, p256dh, stored_auth)] = await t.endpoints()
        assert (device_id, p256dh, stored_auth) == (bob.device_id, keys["p256dh"], keys["auth"])


# -- bounded and polite -------------------------------------------------------------------


async def test_wake_ups_are_coalesced_to_one_per_interval(
    short_tmp: Path, mock_clock: trio.testing.MockClock
) -> None:
    async with team(short_tmp, interval_seconds=20.0) as t, receiver() as rx:
        t.push.due_linger = 0.0  # the clock moves only when the test jumps it
        rx.hold = trio.Event()  # the first POST stays in flight while more come
        async with alice_and_offline_bob(t, rx.url()) as (alice, bob):
            await send_to(alice, bob, "one")
            await rx.wait_count(1)
            for n in range(5):
                await send_to(alice, bob, f"more {n}")
            assert t.push.stats.coalesced == 5
            rx.hold.set()
            rx.hold = None
            # Only when the interval has passed does the one more wake-up go.
            await trio.testing.wait_all_tasks_blocked()
            assert len(rx.received) == 1
            mock_clock.jump(20.0)
            received = await rx.wait_count(2)
            await t.push.wait_settled()
        assert len(received) == 2
        assert received[1].at - received[0].at >= 20.0
        assert t.push.stats.sent == 2


async def test_after_a_restart_devices_with_queued_envelopes_are_woken_again(
    short_tmp: Path,
) -> None:
    """Wake-ups are not stored: a server that starts wakes every device with
    an endpoint and a queue, once, so a wake-up lost with a restart is made
    good; a device with an endpoint and an empty queue is left alone."""
    async with receiver() as rx:
        async with team(short_tmp) as t:
            async with alice_and_offline_bob(t, rx.url()) as (alice, bob):
                await send_to(alice, bob, "queued across the restart")
                await rx.wait_count(1)
                await t.push.wait_settled()
            async with connect(t.srv) as ac:  # alice's own endpoint, empty queue
                await login_device(ac, "alice", PASSWORD)
                await ac.request("push_register", url=rx.url())
                await ac.request("logout")
            await t.srv.queues.flush()
        async with team(short_tmp) as t:
            await rx.wait_count(2)  # with no new envelope: bob's queue is not empty
            await t.push.wait_settled()
            assert t.push.stats.woken == 1 and t.push.stats.sent == 1  # not alice
        assert len(rx.received) == 2


async def test_a_failing_endpoint_is_retried_with_exponential_backoff(short_tmp: Path) -> None:
    async with team(short_tmp, retry_base_seconds=0.05) as t, receiver() as rx:
        rx.statuses = [500, 503]
        async with alice_and_offline_bob(t, rx.url()) as (alice, bob):
            await send_to(alice, bob, "x")
            first, second, third = await rx.wait_count(3)
            await t.push.wait_settled()
        assert second.at - first.at >= 0.05
        assert third.at - second.at >= 0.1  # twice the first delay
        assert (t.push.stats.retried, t.push.stats.sent) == (2, 1)


async def test_retries_end_after_the_configured_attempts(short_tmp: Path) -> None:
    async with team(short_tmp, retry_attempts=1) as t, receiver() as rx:
        rx.statuses = [500, 500, 500]
        async with alice_and_offline_bob(t, rx.url()) as (alice, bob):
            await send_to(alice, bob, "x")
            await rx.wait_count(2)
            await t.push.wait_settled()
        assert len(rx.received) == 2
        assert (t.push.stats.retried, t.push.stats.given_up, t.push.stats.sent) == (1, 1, 0)


@pytest.mark.parametrize("status", [404, 410])
async def test_an_endpoint_that_is_gone_is_dropped(short_tmp: Path, status: int) -> None:
    async with team(short_tmp) as t, receiver() as rx:
        rx.statuses = [status]
        async with alice_and_offline_bob(t, rx.url()) as (alice, bob):
            await send_to(alice, bob, "x")
            await rx.wait_count(1)
            await t.push.wait_settled()
            assert await t.endpoints() == []
            assert t.push.endpoint(bob.device_id) is None
            await send_to(alice, bob, "y")
            await t.push.wait_settled()
        assert len(rx.received) == 1 and t.push.stats.gone == 1


async def test_a_removed_endpoint_gets_nothing(short_tmp: Path) -> None:
    async with team(short_tmp) as t, receiver() as rx:
        async with connect(t.srv) as bc:
            bob = await login_device(bc, "bob", BOB_PASSWORD)
            await bob.publish(1)
            await bc.request("push_register", url=rx.url())
            assert len(await t.endpoints()) == 1
            assert (await bc.request("push_remove"))["type"] == "ok"
            assert (await bc.request("push_remove"))["type"] == "ok"  # none: still ok
            await bc.request("logout")
        assert await t.endpoints() == []
        async with connect(t.srv) as ac:
            alice = await login_device(ac, "alice", PASSWORD)
            await alice.publish(1)
            await send_to(alice, bob, "x")
        await t.push.wait_settled()
        assert rx.received == [] and t.push.stats.woken == 0


async def test_a_redirect_is_not_followed(short_tmp: Path) -> None:
    async with team(short_tmp) as t, receiver() as rx, receiver() as elsewhere:
        rx.statuses = [307]
        rx.location = elsewhere.url("/stolen").encode()
        async with alice_and_offline_bob(t, rx.url()) as (alice, bob):
            await send_to(alice, bob, "x")
            await rx.wait_count(1)
            await t.push.wait_settled()
        assert elsewhere.received == []
        assert len(rx.received) == 1 and t.push.stats.refused == 1


# -- the SSRF guard -------------------------------------------------------------------------


async def register_refused(t: Team, **fields: Any) -> dict[str, Any]:
    async with connect(t.srv) as bc:
        await login_device(bc, "bob", BOB_PASSWORD)
        reply = await bc.request("push_register", **fields)
    assert reply["type"] == "error", reply
    assert await t.endpoints() == []  # nothing stored
    return reply


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://127.0.0.1/up", "loopback"),
        ("https://127.9.9.9:8443/up", "loopback"),
        ("https://[::1]/up", "loopback"),
        ("https://localhost/up", "loopback"),  # a host name that resolves to loopback
        ("https://10.1.2.3/up", "private"),
        ("https://192.168.0.10/up", "private"),
        ("https://[fd00::5]/up", "private"),
        ("https://[::ffff:10.0.0.1]/up", "private"),
        ("https://169.254.169.254/latest/meta-data", "link-local"),
        ("https://[fe80::1]/up", "link-local"),
        ("https://100.64.0.1/up", "non-public"),
        ("https://0.0.0.0/up", "unspecified"),
    ],
)
async def test_private_loopback_and_link_local_targets_are_refused(
    short_tmp: Path, url: str, why: str
) -> None:
    async with team(short_tmp, allowed_networks=()) as t:
        reply = await register_refused(t, url=url)
    assert (reply["code"], reply["field"]) == ("push_url_refused", "$.url")
    assert why in reply["message"] and "push.allowed_networks" in reply["message"]


@pytest.mark.parametrize(
    ("fields", "code", "field"),
    [
        ({"url": "not a url"}, "push_url_refused", "$.url"),
        ({"url": "ftp://93.184.216.34/up"}, "push_url_refused", "$.url"),
        ({"url": "https:///up"}, "push_url_refused", "$.url"),
        ({"url": "https://user:pw@93.184.216.34/up"}, "push_url_refused", "$.url"),
        ({"url": "https://93.184.216.34:99999/up"}, "push_url_refused", "$.url"),
        ({"url": "http://93.184.216.34/up"}, "push_url_refused", "$.url"),  # http, not allowed
        ({"url": "https://" + "a" * 2100 + ".org/"}, "bad_frame", "$.url"),
        ({"url": ""}, "bad_frame", "$.url"),
        (
            {"url": "https://93.184.216.34/", "p256dh": "A" * 200, "auth": "A" * 22},
            "bad_frame",
            "$.p256dh",
        ),
        (
            {"url": "https://93.184.216.34/", "p256dh": "B" * 87, "auth": "A" * 400},
            "bad_frame",
            "$.auth",
        ),
        (
            {"url": "https://93.184.216.34/", "p256dh": "A" * 87, "auth": "A" * 22},
            "bad_push_key",
            "$.p256dh",
        ),  # the right length, but not a point on P-256
        ({"url": "https://93.184.216.34/", "p256dh": "A" * 87}, "bad_push_key", "$.auth"),
        ({"url": "https://93.184.216.34/", "auth": "A" * 22}, "bad_push_key", "$.p256dh"),
    ],
)
async def test_bad_input_gets_a_clear_error_and_stores_nothing(
    short_tmp: Path, fields: dict[str, str], code: str, field: str
) -> None:
    async with team(short_tmp) as t:
        reply = await register_refused(t, **fields)
    assert (reply["code"], reply["field"]) == (code, field), reply


async def test_http_is_refused_without_the_allowlist(short_tmp: Path) -> None:
    async with team(short_tmp, allowed_networks=()) as t, receiver() as rx:
        reply = await register_refused(t, url=rx.url())
    assert reply["code"] == "push_url_refused" and "loopback" in reply["message"]


class FakeDNS:
    """A resolver with answers the test sets (a fake, not a mock)."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        await trio.lowlevel.checkpoint()
        self.asked.append(host)
        if host not in self.answers:
            raise OSError("no such host")
        return self.answers[host]


async def test_a_host_name_resolving_to_a_private_address_is_refused() -> None:
    dns = FakeDNS({"push.example": ["93.184.216.34", "10.0.0.7"]})  # one bad address is enough
    with pytest.raises(PushRefused) as refused:
        await checked_addresses(parse_target("https://push.example/up"), (), dns)
    assert "resolves to a private address" in refused.value.message
    dns.answers["push.example"] = ["93.184.216.34", "2606:2800:220:1::1"]
    good = await checked_addresses(parse_target("https://push.example/up"), (), dns)
    assert good == ["93.184.216.34", "2606:2800:220:1::1"]


def sender_in_task(resolve: FakeDNS) -> OpenSender:
    """The sender's code in a task of this test, over memory streams, with
    the fake resolver (the real one runs in its own process)."""

    @asynccontextmanager
    async def open_sender(setup: Setup) -> AsyncIterator[SenderLink]:
        jobs_in, jobs_out = trio.testing.memory_stream_one_way_pair()
        outcomes_in, outcomes_out = trio.testing.memory_stream_one_way_pair()
        # Answers not kept (dns_keep=0): the test changes them between two
        # wake-ups (tests/test_push_resolver.py checks the keeping).
        run = partial(
            serve_sender, setup, LineReader(jobs_out), outcomes_in, resolve=resolve, dns_keep=0.0
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            yield jobs_in, outcomes_out
            nursery.cancel_scope.cancel()

    return open_sender


async def test_the_check_is_made_again_at_send_time(short_tmp: Path) -> None:
    """A name that resolved to an allowed address at registration and to a
    private one later (DNS rebinding) gets nothing; the POST goes to the
    checked address, under the name it was registered with. A loopback
    endpoint stored while the allowlist permitted it is refused once it no
    longer does."""
    async with team(short_tmp) as t, receiver() as rx:
        async with alice_and_offline_bob(t, rx.url()) as (_alice, bob):
            pass
        dns = FakeDNS({"push.test": ["127.0.0.1"]})
        settings = PushSettings(allowed_networks=LOOPBACK, retry_attempts=0, interval_seconds=0)
        notifier = Notifier(t.srv.store, settings, resolve=dns, open_sender=sender_in_task(dns))
        async with trio.open_nursery() as nursery:
            await nursery.start(notifier.serve)
            await notifier.register(bob.device_id, rx.url(host="push.test"))
            notifier.wake(bob.device_id)
            [got] = await rx.wait_count(1)
            assert got.headers[b"host"] == f"push.test:{rx.port}".encode()
            await notifier.wait_settled()
            dns.answers["push.test"] = ["10.0.0.7"]
            notifier.wake(bob.device_id)
            await notifier.wait_settled()
            nursery.cancel_scope.cancel()
        assert len(rx.received) == 1 and notifier.stats.refused == 1
        dns.answers["push.test"] = ["127.0.0.1"]
        strict = Notifier(
            t.srv.store,
            PushSettings(retry_attempts=0),
            resolve=dns,
            open_sender=sender_in_task(dns),
        )
        await strict.open()
        assert strict.endpoint(bob.device_id) is not None
        async with trio.open_nursery() as nursery:
            await nursery.start(strict.serve)
            strict.wake(bob.device_id)
            await strict.wait_settled()
            nursery.cancel_scope.cancel()
        assert len(rx.received) == 1 and strict.stats.refused == 1


async def test_the_client_library_registers_and_removes_an_endpoint(short_tmp: Path) -> None:
    from chatd.client import ServerRefusedError

    from .test_client import ALICE_KEY, device

    async with team(short_tmp, allowed_networks=()) as t:
        async with device(t.srv, short_tmp, "alice", "alice", ALICE_KEY) as alice:
            with pytest.raises(ServerRefusedError) as refused:
                await alice.register_push("https://127.0.0.1/up")
            assert (refused.value.code, refused.value.field) == ("push_url_refused", "$.url")
            url = "https://93.184.216.34/up/topic?up=1"  # public: no DNS, nothing sent
            await alice.register_push(url)
            assert await t.endpoints() == [(alice.device_id, url, None, None)]
            await alice.remove_push()
            assert await t.endpoints() == []


# -- the sender process ------------------------------------------------------------------------


def sender_pids() -> list[int]:
    """This test process's children that run the push sender (Linux /proc)."""
    pids = []
    for task in Path(f"/proc/{os.getpid()}/task").glob("*/children"):
        for pid in task.read_text().split():
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"-m\x00chatd.push\x00sender" in cmdline:
                pids.append(int(pid))
    return pids


async def test_the_sender_is_a_process_restarted_when_it_dies_and_stopped_at_shutdown(
    short_tmp: Path,
) -> None:
    async with team(short_tmp, interval_seconds=0) as t, receiver() as rx:
        assert sender_pids() == []  # started with the first wake-up, not before
        async with alice_and_offline_bob(t, rx.url()) as (alice, bob):
            await send_to(alice, bob, "one")
            await rx.wait_count(1)
            await t.push.wait_settled()
            [first] = sender_pids()
            # It took the lowest CPU priority for itself: the relay comes first.
            assert os.sched_getscheduler(first) == os.SCHED_IDLE
            os.kill(first, signal.SIGKILL)
            await send_to(alice, bob, "two")  # a new sender takes it, after a short backoff
            await rx.wait_count(2)
            await t.push.wait_settled()
            [second] = sender_pids()
        assert second != first
        assert (t.push.stats.sender_starts, t.push.stats.sent) == (2, 2)
    assert sender_pids() == []  # the daemon's shutdown stopped (and reaped) it


async def test_wake_ups_a_dying_sender_had_taken_are_retried(short_tmp: Path) -> None:
    """The first sender dies (closes its end) once it has read a job; the
    job counts as a failed POST and its retry goes out through the next."""
    starts = 0

    @asynccontextmanager
    async def open_sender(setup: Setup) -> AsyncIterator[SenderLink]:
        nonlocal starts
        starts += 1
        jobs_in, jobs_out = trio.testing.memory_stream_one_way_pair()
        outcomes_in, outcomes_out = trio.testing.memory_stream_one_way_pair()

        async def dies_after_one_job() -> None:
            await LineReader(jobs_out).receive_lines()
            await outcomes_in.aclose()

        run = partial(serve_sender, setup, LineReader(jobs_out), outcomes_in)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dies_after_one_job if starts == 1 else run)
            yield jobs_in, outcomes_out
            nursery.cancel_scope.cancel()

    async with team(short_tmp) as t, receiver() as rx:
        async with alice_and_offline_bob(t, rx.url()) as (_alice, bob):
            pass
        settings = PushSettings(allowed_networks=LOOPBACK, retry_base_seconds=0.01)
        notifier = Notifier(t.srv.store, settings, open_sender=open_sender)
        await notifier.open()
        async with trio.open_nursery() as nursery:
            await nursery.start(notifier.serve)
            notifier.wake(bob.device_id)
            await rx.wait_count(1)
            await notifier.wait_settled()
            nursery.cancel_scope.cancel()
        assert (starts, notifier.stats.retried, notifier.stats.sent) == (2, 1, 1)


@pytest.mark.parametrize("line", [b"{not json", b'{"type":"job","id":"x","url":"u"}', b"[]"])
async def test_a_line_that_is_not_a_job_ends_the_sender_with_a_link_error(line: bytes) -> None:
    jobs_in, jobs_out = trio.testing.memory_stream_one_way_pair()
    outcomes_in, _outcomes_out = trio.testing.memory_stream_one_way_pair()
    setup = Setup(timeout_seconds=1, ttl_seconds=60, concurrency=4, allowed_networks=LOOPBACK)
    await jobs_in.send_all(line + b"\n")
    with pytest.RaisesGroup(LinkError):  # raised in the sender's nursery
        await serve_sender(setup, LineReader(jobs_out), outcomes_in)
