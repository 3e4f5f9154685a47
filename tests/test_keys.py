"""Devices and keys over the real relay, with real vodozemac accounts."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import vodozemac
from nacl.signing import VerifyKey

from chatd.config import DeviceSettings

from .test_relay_auth import PASSWORD, Client, Server, connect, create_once, server

BOB_PASSWORD = "bob has a long password"


def canonical(obj: dict[str, Any]) -> bytes:
    # Written independently of chatd.e2ee.signing, as another client would.
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign(account: vodozemac.Account, obj: dict[str, Any]) -> str:
    return str(account.sign(canonical(obj)).to_base64())


class Device:
    """A client device: a vodozemac account plus its server identity."""

    def __init__(self, client: Client, user_id: int, device_id: str) -> None:
        self.client = client
        self.user_id = user_id
        self.device_id = device_id
        self.account = vodozemac.Account()

    def device_keys(self) -> dict[str, Any]:
        ed = self.account.ed25519_key.to_base64()
        curve = self.account.curve25519_key.to_base64()
        obj = {
            "curve25519": curve,
            "device_id": self.device_id,
            "ed25519": ed,
            "user_id": self.user_id,
        }
        return {"ed25519": ed, "curve25519": curve, "signature": sign(self.account, obj)}

    def one_time_keys(self, count: int) -> list[dict[str, Any]]:
        self.account.generate_one_time_keys(count)
        keys = []
        for key_id, key in self.account.one_time_keys.items():
            curve = key.to_base64()
            obj = {"curve25519": curve, "device_id": self.device_id, "key_id": key_id}
            keys.append(
                {"key_id": key_id, "curve25519": curve, "signature": sign(self.account, obj)}
            )
        self.account.mark_keys_as_published()
        return keys

    def fallback_key(self) -> dict[str, Any]:
        self.account.generate_fallback_key()
        [(key_id, key)] = self.account.fallback_key.items()
        curve = key.to_base64()
        obj = {"curve25519": curve, "device_id": self.device_id, "fallback": True, "key_id": key_id}
        return {"key_id": key_id, "curve25519": curve, "signature": sign(self.account, obj)}

    async def publish(self, count: int) -> dict[str, Any]:
        return await self.client.request(
            "keys_upload",
            device_keys=self.device_keys(),
            one_time_keys=self.one_time_keys(count),
            fallback_key=self.fallback_key(),
        )


async def login_device(c: Client, username: str = "alice", password: str = PASSWORD) -> Device:
    session = await c.login(username, password)
    assert session["type"] == "session", session
    count = json.loads(await c.ws.get_message())
    assert count == {
        "type": "key_count",
        "one_time_key_count": 0,
        "fallback_key": False,
        "upload_wanted": True,
    }
    return Device(c, session["user"]["id"], session["device_id"])


@asynccontextmanager
async def team(short_tmp: Path, **settings: Any) -> AsyncIterator[Server]:
    async with server(short_tmp, **settings) as srv:
        await create_once(srv.admin, "bob", BOB_PASSWORD)
        yield srv


def b64(value: str) -> bytes:
    return base64.b64decode(value + "=" * (-len(value) % 4))


async def test_a_device_publishes_signed_keys(short_tmp: Path) -> None:
    async with team(short_tmp) as srv, connect(srv) as c:
        alice = await login_device(c)
        count = await alice.publish(50)
        assert count == {
            "type": "key_count",
            "id": count["id"],
            "one_time_key_count": 50,
            "fallback_key": True,
            "upload_wanted": False,
        }
        again = await c.request("keys_upload", one_time_keys=alice.one_time_keys(5))
        assert again["one_time_key_count"] == 55


@pytest.mark.parametrize("target", ["device", "one_time", "fallback"])
async def test_a_bad_signature_refuses_the_whole_upload(short_tmp: Path, target: str) -> None:
    async with team(short_tmp) as srv, connect(srv) as c:
        alice = await login_device(c)
        upload = {
            "device_keys": alice.device_keys(),
            "one_time_keys": alice.one_time_keys(3),
            "fallback_key": alice.fallback_key(),
        }
        other = vodozemac.Account()
        if target == "device":
            upload["device_keys"]["curve25519"] = other.curve25519_key.to_base64()
            field = "$.device_keys.signature"
        elif target == "one_time":
            upload["one_time_keys"][1]["curve25519"] = other.curve25519_key.to_base64()
            field = "$.one_time_keys[1].signature"
        else:
            upload["fallback_key"]["signature"] = sign(other, {"x": 1})
            field = "$.fallback_key.signature"
        reply = await c.request("keys_upload", **upload)
        assert (reply["code"], reply["field"]) == ("bad_signature", field)
        count = await c.request("keys_upload", device_keys=alice.device_keys())
        assert count["one_time_key_count"] == 0 and count["fallback_key"] is False


async def test_identity_keys_come_first_and_never_change(short_tmp: Path) -> None:
    async with team(short_tmp) as srv, connect(srv) as c:
        alice = await login_device(c)
        early = await c.request("keys_upload", one_time_keys=alice.one_time_keys(1))
        assert early["code"] == "device_keys_required"
        await alice.publish(1)
        impostor = Device(c, alice.user_id, alice.device_id)
        changed = await c.request("keys_upload", device_keys=impostor.device_keys())
        assert changed["code"] == "device_keys_immutable"
        same = await c.request("keys_upload", device_keys=alice.device_keys())
        assert same["type"] == "key_count"  # re-sending the same identity is fine


async def test_malformed_keys_are_refused_by_the_frame(short_tmp: Path) -> None:
    async with team(short_tmp) as srv, connect(srv) as c:
        await login_device(c)
        reply = await c.request(
            "keys_upload",
            one_time_keys=[{"key_id": "a", "curve25519": "not base64!", "signature": "x" * 86}],
        )
        assert reply["code"] == "bad_frame" and reply["field"] == "$.one_time_keys[0].curve25519"


async def test_claims_hand_out_each_key_once_then_the_fallback(short_tmp: Path) -> None:
    async with team(short_tmp) as srv, connect(srv) as a, connect(srv) as b:
        alice = await login_device(a)
        await alice.publish(2)
        await login_device(b, "bob", BOB_PASSWORD)
        ref = {"user_id": alice.user_id, "device_id": alice.device_id}
        seen = []
        for _ in range(3):
            claimed = await b.request("keys_claim", devices=[ref])
            [key] = claimed["keys"]
            seen.append((key["curve25519"], key["fallback"]))
            obj = {
                "curve25519": key["curve25519"],
                "device_id": alice.device_id,
                "key_id": key["key_id"],
            }
            if key["fallback"]:
                obj["fallback"] = True
            VerifyKey(b64(alice.account.ed25519_key.to_base64())).verify(
                canonical(obj), b64(key["signature"])
            )
        assert [fallback for _, fallback in seen] == [False, False, True]
        assert len({curve for curve, _ in seen}) == 3  # three different keys
        unknown = await b.request("keys_claim", devices=[{"user_id": 1, "device_id": "AAAA"}])
        assert unknown["keys"] == [] and unknown["missing"] == [{"user_id": 1, "device_id": "AAAA"}]


async def test_concurrent_claims_never_hand_out_a_key_twice(short_tmp: Path) -> None:
    async with (
        team(
            short_tmp,
            rate_burst=1000,
            login_rate_per_ip=100_000.0,
            login_rate_per_account=100_000.0,
        ) as srv,
        connect(srv) as a,
    ):
        alice = await login_device(a)
        await alice.publish(40)
        ref = {"user_id": alice.user_id, "device_id": alice.device_id}
        results: list[dict[str, Any]] = []

        async def claimer() -> None:
            async with connect(srv) as c:
                await login_device(c, "bob", BOB_PASSWORD)
                for _ in range(5):
                    results.extend((await c.request("keys_claim", devices=[ref]))["keys"])

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(claimer)
        one_time = [k["curve25519"] for k in results if not k["fallback"]]
        assert len(results) == 50
        assert len(one_time) == 40 and len(set(one_time)) == 40  # each exactly once
        assert sum(k["fallback"] for k in results) == 10


async def test_a_device_is_told_when_its_keys_run_low(short_tmp: Path) -> None:
    settings = DeviceSettings(one_time_key_threshold=3)
    async with team(short_tmp) as srv:
        srv.keys.settings = settings
        async with connect(srv) as a, connect(srv) as b:
            alice = await login_device(a)
            await alice.publish(4)
            await login_device(b, "bob", BOB_PASSWORD)
            ref = {"user_id": alice.user_id, "device_id": alice.device_id}
            await b.request("keys_claim", devices=[ref])  # 3 left: not below 3
            await b.request("keys_claim", devices=[ref])  # 2 left: below
            with trio.fail_after(10):
                pushed = json.loads(await a.ws.get_message())
                while pushed["type"] != "key_count":  # presence changes may come first
                    pushed = json.loads(await a.ws.get_message())
            assert pushed == {
                "type": "key_count",
                "one_time_key_count": 2,
                "fallback_key": True,
                "upload_wanted": True,
            }


async def test_the_directory_lists_members_devices_and_keys(short_tmp: Path) -> None:
    async with team(short_tmp) as srv, connect(srv) as a, connect(srv) as b:
        alice = await login_device(a)
        before = await a.request("directory")
        await alice.publish(1)
        await login_device(b, "bob", BOB_PASSWORD)
        after = await a.request("directory")
        by_name = {m["username"]: m for m in after["members"]}
        assert set(by_name) == {"alice", "bob"}
        [device] = by_name["alice"]["devices"]
        assert device["device_id"] == alice.device_id
        assert device["ed25519"] == alice.account.ed25519_key.to_base64()
        old = {m["username"]: m["device_list_version"] for m in before["members"]}
        assert by_name["alice"]["device_list_version"] > old["alice"]


async def test_logging_in_again_as_the_same_device_and_the_device_limit(short_tmp: Path) -> None:
    async with team(short_tmp) as srv:
        srv.auth.devices = DeviceSettings(max_devices_per_user=2)
        async with connect(srv) as a:
            first = await login_device(a)
        async with connect(srv) as a:
            again = await a.login(device_id=first.device_id)
            assert again["device_id"] == first.device_id
        async with connect(srv) as a:
            await login_device(a)  # the second device
        async with connect(srv) as a:
            assert (await a.login())["code"] == "too_many_devices"
            assert (await a.login(device_id="AAAAAAAA"))["code"] == "unknown_device"


async def test_a_replayed_upload_cannot_offer_a_claimed_key_again(short_tmp: Path) -> None:
    async with team(short_tmp) as srv, connect(srv) as a, connect(srv) as b:
        alice = await login_device(a)
        keys = alice.one_time_keys(1)
        await a.request("keys_upload", device_keys=alice.device_keys(), one_time_keys=keys)
        await login_device(b, "bob", BOB_PASSWORD)
        ref = {"user_id": alice.user_id, "device_id": alice.device_id}
        first = await b.request("keys_claim", devices=[ref])
        assert first["keys"][0]["fallback"] is False
        replay = await a.request("keys_upload", one_time_keys=keys)
        assert replay["one_time_key_count"] == 0
        again = await b.request("keys_claim", devices=[ref])
        assert again["keys"] == [] and again["missing"] == [ref]


async def test_a_huge_user_id_is_a_bad_frame_not_a_crash(short_tmp: Path) -> None:
    async with team(short_tmp) as srv, connect(srv) as a:
        await login_device(a)
        reply = await a.request("keys_claim", devices=[{"user_id": 2**64, "device_id": "AAAA"}])
        assert reply["code"] == "bad_frame" and reply["field"] == "$.devices[0].user_id"
        assert (await a.request("directory"))["type"] == "members"


async def test_a_disabled_users_keys_cannot_be_claimed(short_tmp: Path) -> None:
    async with team(short_tmp) as srv, connect(srv) as a, connect(srv) as b:
        alice = await login_device(a)
        await alice.publish(2)
        await login_device(b, "bob", BOB_PASSWORD)
        await srv.admin.set_disabled(alice.user_id, True)
        ref = {"user_id": alice.user_id, "device_id": alice.device_id}
        claimed = await b.request("keys_claim", devices=[ref])
        assert claimed["keys"] == [] and claimed["missing"] == [ref]
