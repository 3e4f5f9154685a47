"""Per-account rate limits on send, room_send, keys_claim and directory, over
the real relay with a real SQLCipher store.

The limits are set low with a rate of 1 a minute, so that nothing refills
while a test runs and no test waits: a burst is used up, the next request is
refused with ``rate_limited`` and ``retry_after``, and nothing of it is done.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from chatd.config import RelaySettings, render_template

from .conftest import REPO
from .test_keys import BOB_PASSWORD, Device, login_device, team
from .test_relay_auth import PASSWORD, Server, connect

SLOW = 1.0  # requests a minute: nothing refills during a test


@asynccontextmanager
async def people(short_tmp: Path, **relay: Any) -> AsyncIterator[tuple[Server, list[Device]]]:
    """Alice on two devices and Bob on one, each with published keys."""
    async with team(short_tmp, relay=relay) as srv, AsyncExitStack() as stack:
        devices = []
        for username, password in (("alice", PASSWORD), ("alice", PASSWORD), ("bob", BOB_PASSWORD)):
            client = await stack.enter_async_context(connect(srv))
            device = await login_device(client, username, password)
            await device.publish(5)
            devices.append(device)
        yield srv, devices


def to_all(devices: list[Device], sender: Device) -> list[dict[str, Any]]:
    return [
        {"user_id": d.user_id, "device_id": d.device_id, "ciphertext": "opaque"}
        for d in devices
        if d is not sender
    ]


def assert_rate_limited(reply: dict[str, Any], what: str) -> None:
    assert reply["type"] == "error", reply
    assert reply["code"] == "rate_limited"
    assert 59 <= reply["retry_after"] <= 60  # 1 a minute, just used up
    assert reply["message"] == f"too many {what} from this account; retry after 60 s"
    assert "field" not in reply


async def rows(srv: Server, sql: str) -> int:
    return int(await srv.store.read(lambda conn: conn.execute(sql).fetchone()[0]))


async def test_sends_over_the_accounts_burst_are_refused_and_nothing_is_queued(
    short_tmp: Path,
) -> None:
    async with people(short_tmp, send_rate_per_user=SLOW, send_burst=3) as (srv, devices):
        alice1, alice2, bob = devices
        for device in (alice1, alice2, alice1):  # one bucket for all of alice's devices
            sent = await device.client.request(
                "send", message_id=str(uuid.uuid4()), envelopes=to_all(devices, device)
            )
            assert sent["type"] == "sent", sent
        await srv.queues.flush()
        queued = await rows(srv, "SELECT count(*) FROM envelopes")
        message_id = str(uuid.uuid4())
        for device in (alice1, alice2):
            refused = await device.client.request(
                "send", message_id=message_id, envelopes=to_all(devices, device)
            )
            assert_rate_limited(refused, "messages")
        await srv.queues.flush()
        assert await rows(srv, "SELECT count(*) FROM envelopes") == queued
        # Another account has its own bucket; the connections stay open.
        sent = await bob.client.request(
            "send", message_id=message_id, envelopes=to_all(devices, bob)
        )
        assert sent["type"] == "sent", sent
        assert (await alice1.client.request("list_sessions"))["type"] == "sessions"


async def test_room_sends_share_the_send_limit(short_tmp: Path) -> None:
    async with people(short_tmp, send_rate_per_user=SLOW, send_burst=2) as (srv, devices):
        alice1 = devices[0]
        room = await alice1.client.request("room_create", name="general", kind="channel")
        assert room["type"] == "room", room
        fields = {"room_id": room["room"]["room_id"], "epoch": room["room"]["epoch"]}
        sent = await alice1.client.request(
            "room_send", message_id=str(uuid.uuid4()), ciphertext="megolm", **fields
        )
        assert sent["type"] == "sent", sent
        sent = await alice1.client.request(
            "send", message_id=str(uuid.uuid4()), envelopes=to_all(devices, alice1)
        )
        assert sent["type"] == "sent", sent
        refused = await alice1.client.request(
            "room_send", message_id=str(uuid.uuid4()), ciphertext="megolm", **fields
        )
        assert_rate_limited(refused, "messages")
        await srv.queues.flush()
        messages = "SELECT count(*) FROM room_log WHERE kind = 'room_message'"
        assert await rows(srv, messages) == 1  # the refused one is not there


async def test_key_claims_and_directory_reads_are_limited_per_account(short_tmp: Path) -> None:
    limits = {
        "keys_claim_rate_per_user": SLOW,
        "keys_claim_burst": 2,
        "directory_rate_per_user": SLOW,
        "directory_burst": 1,
    }
    async with people(short_tmp, **limits) as (srv, devices):
        alice1, alice2, bob = devices
        claim = [{"user_id": bob.user_id, "device_id": bob.device_id}]
        for device in (alice1, alice2):
            claimed = await device.client.request("keys_claim", devices=claim)
            assert claimed["type"] == "keys_claimed", claimed
        refused = await alice1.client.request("keys_claim", devices=claim)
        assert_rate_limited(refused, "keys_claim requests")
        taken = "SELECT count(*) FROM one_time_keys WHERE claimed_at IS NOT NULL"
        assert await rows(srv, taken) == 2  # the refused claim took none of bob's keys
        assert (await bob.client.request("keys_claim", devices=claim))["type"] == "keys_claimed"

        assert (await alice1.client.request("directory"))["type"] == "members"
        assert_rate_limited(await alice2.client.request("directory"), "directory requests")
        assert (await bob.client.request("directory"))["type"] == "members"


async def test_push_endpoint_requests_are_limited_per_account(short_tmp: Path) -> None:
    async with people(short_tmp, push_rate_per_user=SLOW, push_burst=1) as (srv, devices):
        alice1, alice2, bob = devices
        assert (await alice1.client.request("push_remove"))["type"] == "ok"
        url = "https://push.example.org/up1"
        refused = await alice2.client.request("push_register", url=url)
        assert_rate_limited(refused, "push requests")
        assert await rows(srv, "SELECT count(*) FROM push_endpoints") == 0  # nothing stored
        assert (await bob.client.request("push_remove"))["type"] == "ok"  # bob's own bucket


async def test_a_refusal_is_logged_once_a_minute_per_account_and_request(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with people(short_tmp, directory_rate_per_user=SLOW, directory_burst=1) as (
        srv,
        devices,
    ):
        alice1 = devices[0]
        await alice1.client.request("directory")
        with caplog.at_level("WARNING", logger="chatd.relay"):
            for _ in range(3):
                reply = await alice1.client.request("directory")
                assert reply["code"] == "rate_limited"
        logged = [r for r in caplog.records if r.getMessage() == "relay.rate_limited"]
        assert len(logged) == 1
        del srv


def test_the_defaults_allow_bursts_and_are_documented() -> None:
    relay = RelaySettings()
    # An offline backlog or a room key for 10,000 devices (50 sends) at once; a
    # first message to a whole team (10,000 devices, 100 per claim).
    assert relay.send_burst >= 300 and relay.keys_claim_burst >= 100
    assert relay.send_rate_per_user >= 600
    protocol = (REPO / "docs" / "PROTOCOL.md").read_text()
    for name in (
        "send_rate_per_user",
        "send_burst",
        "keys_claim_rate_per_user",
        "keys_claim_burst",
        "directory_rate_per_user",
        "directory_burst",
        "push_rate_per_user",
        "push_burst",
    ):
        assert f"`relay.{name}`" in protocol, name
        assert f"\n{name} = " in render_template()


def test_the_benches_raise_the_limits_they_would_hit() -> None:
    daemon = (REPO / "bench" / "_daemon.py").read_text()
    assert "RELAXED_RELAY" in daemon
    for bench in ("relay.py", "rooms.py"):
        assert "RELAXED_RELAY" in (REPO / "bench" / bench).read_text(), bench
