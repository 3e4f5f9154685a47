"""Device verification (SAS), devices added mid-conversation, and fallback-key
rotation, through the client library: real relay, real Olm, real stores."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import vodozemac

from chatd.client import (
    SAS_EMOJI,
    Client,
    Verification,
    VerificationError,
    open_client,
)
from chatd.client.crypto import OlmMachine, encode_ciphertext, pre_key_one_time_key
from chatd.client.sas import Party, SasExchange, commitment, mac_info, sas_info
from chatd.client.verification import MAX_VERIFICATIONS, VERIFICATION_TIMEOUT, Verifications
from chatd.config import DeviceSettings

from .test_client import ALICE_KEY, BOB_KEY, RELAXED, device, next_message, relay
from .test_keys import team
from .test_relay_auth import PASSWORD, Server

PHONE_KEY = bytes([3]) * 32
TABLET_KEY = bytes([4]) * 32


async def incoming(client: Client) -> Verification:
    with trio.fail_after(10):
        return await client.verification_requests().receive()


async def verified(client: Client) -> dict[tuple[int, str], bool]:
    return {(d.user_id, d.device_id): d.verified for d in await client.devices()}


async def run_sas(starter: Client, responder: Client) -> tuple[Verification, Verification]:
    """Both sides up to the point where people compare the SAS."""
    with trio.fail_after(10):
        ours = await starter.start_verification(responder.user_id, responder.device_id)
        theirs = await incoming(responder)
        assert (theirs.user_id, theirs.device_id) == (starter.user_id, starter.device_id)
        assert theirs.incoming and not ours.incoming
        assert theirs.transaction_id == ours.transaction_id
        await theirs.accept()
        return ours, theirs


async def test_people_compare_the_same_emoji_and_both_devices_end_up_verified(
    short_tmp: Path,
) -> None:
    async with (
        relay(short_tmp) as srv,
        device(srv, short_tmp, "alice", "alice", ALICE_KEY) as alice,
        device(srv, short_tmp, "bob", "bob", BOB_KEY) as bob,
        device(srv, short_tmp, "bob", "bob-phone", PHONE_KEY) as bob_phone,
    ):
        await alice.directory()
        assert not (await verified(alice))[(bob.user_id, bob.device_id)]
        ours, theirs = await run_sas(alice, bob)
        with trio.fail_after(10):
            sas_alice, sas_bob = await ours.sas(), await theirs.sas()
        assert sas_alice == sas_bob
        assert len(sas_alice.emoji) == 7 and all(e in SAS_EMOJI for e in sas_alice.emoji)
        assert all(1000 <= n <= 9191 for n in sas_alice.decimals)
        with trio.fail_after(10):
            await ours.confirm()
            await theirs.confirm()
            await ours.done()
            await theirs.done()
        assert ours.state == theirs.state == "done"
        assert (await verified(alice))[(bob.user_id, bob.device_id)]
        assert (await verified(bob))[(alice.user_id, alice.device_id)]
        # Verification payloads are not chat messages.
        assert await alice.history() == [] and await bob.history() == []
        # Bob's phone received every payload (sends go to all of Bob's devices)
        # but they were not for it: no request, no history, nothing verified.
        sent = await alice.send_text(bob.user_id, "after the verification")
        assert (await next_message(bob_phone)).message_id == sent  # it is past them all now
        with pytest.raises(trio.WouldBlock):
            bob_phone.verification_requests().receive_nowait()
        assert [e.message_id for e in await bob_phone.history()] == [sent]
        assert not (await verified(bob_phone))[(alice.user_id, alice.device_id)]
        # Bob's own device shows the message as coming from a verified device.
        got = await next_message(bob)
        assert got.message_id == sent and got.sender_verified


async def test_two_devices_of_one_user_verify_each_other(short_tmp: Path) -> None:
    async with (
        relay(short_tmp) as srv,
        device(srv, short_tmp, "alice", "laptop", ALICE_KEY) as laptop,
        device(srv, short_tmp, "alice", "phone", PHONE_KEY) as phone,
    ):
        await laptop.directory()
        assert not (await verified(laptop))[(phone.user_id, phone.device_id)]
        ours, theirs = await run_sas(phone, laptop)
        with trio.fail_after(10):
            assert await ours.sas() == await theirs.sas()
            # The responder's person confirms first this time.
            await theirs.confirm()
            await ours.confirm()
            await theirs.done()
            await ours.done()
        assert (await verified(laptop))[(phone.user_id, phone.device_id)]
        assert (await verified(phone))[(laptop.user_id, laptop.device_id)]


async def test_a_mac_that_does_not_match_the_directory_key_verifies_nothing(
    short_tmp: Path,
) -> None:
    async with (
        relay(short_tmp) as srv,
        device(srv, short_tmp, "alice", "alice", ALICE_KEY) as alice,
        device(srv, short_tmp, "bob", "bob", BOB_KEY) as bob,
    ):
        await alice.directory()
        # What Alice's store holds if the server gave her the wrong signing key
        # for Bob's device (the Olm channel itself is Bob's real device).
        wrong = vodozemac.Account().ed25519_key.to_base64()
        await alice._store._write(
            lambda c: c.execute(
                "UPDATE devices SET ed25519 = ? WHERE device_id = ?", (wrong, bob.device_id)
            )
        )
        ours, theirs = await run_sas(alice, bob)
        with trio.fail_after(10):
            assert await ours.sas() == await theirs.sas()  # the people see the same emoji
            await ours.confirm()
            await theirs.confirm()
            with pytest.raises(VerificationError, match="does not match") as mine:
                await ours.done()
            with pytest.raises(VerificationError, match="mac_mismatch") as bobs:
                await theirs.done()
        assert mine.value.code == "mac_mismatch" and not mine.value.remote
        assert bobs.value.code == "mac_mismatch" and bobs.value.remote
        assert ours.state == theirs.state == "cancelled"
        assert not (await verified(alice))[(bob.user_id, bob.device_id)]
        assert not (await verified(bob))[(alice.user_id, alice.device_id)]


async def test_different_emoji_cancel_it_and_nothing_is_verified(short_tmp: Path) -> None:
    async with (
        relay(short_tmp) as srv,
        device(srv, short_tmp, "alice", "alice", ALICE_KEY) as alice,
        device(srv, short_tmp, "bob", "bob", BOB_KEY) as bob,
    ):
        ours, theirs = await run_sas(alice, bob)
        with trio.fail_after(10):
            await ours.sas()
            await theirs.sas()
            await ours.confirm()  # Alice's person clicked "they match" ...
            await theirs.cancel("the emoji differ", code="mismatched_sas")  # ... Bob's did not
            with pytest.raises(VerificationError) as raised:
                await ours.done()
            with pytest.raises(VerificationError, match="mismatched_sas"):
                await theirs.done()
        assert (raised.value.code, raised.value.reason) == ("mismatched_sas", "the emoji differ")
        assert raised.value.remote
        assert not (await verified(alice))[(bob.user_id, bob.device_id)]
        assert not (await verified(bob))[(alice.user_id, alice.device_id)]
        # A declined request ends the starter's wait at once, too.
        second = await alice.start_verification(bob.user_id, bob.device_id)
        await (await incoming(bob)).cancel()
        with trio.fail_after(10), pytest.raises(VerificationError, match=r"\(user\)"):
            await second.sas()


async def test_a_redelivered_verification_payload_is_skipped(short_tmp: Path) -> None:
    async with (
        relay(short_tmp) as srv,
        device(srv, short_tmp, "alice", "alice", ALICE_KEY) as alice,
        device(srv, short_tmp, "bob", "bob", BOB_KEY) as bob,
    ):
        conn = bob.connection
        real_send_frame = conn.send_frame

        async def lose_acks(frame_type: str, **fields: Any) -> None:
            pass  # the acks "get lost": the server will deliver everything again

        conn.send_frame = lose_acks  # type: ignore[method-assign]
        ours, theirs = await run_sas(alice, bob)
        with trio.fail_after(10):
            await ours.sas()
            await theirs.sas()
            await ours.confirm()
            await theirs.confirm()
            await ours.done()
            await theirs.done()
        conn.send_frame = real_send_frame  # type: ignore[method-assign]
        await conn.drop()  # reconnect: every envelope comes again
        sent = await alice.send_text(bob.user_id, "ping")
        assert (await next_message(bob)).message_id == sent  # all duplicates are behind us
        assert [(e.message_id, e.state) for e in await bob.history()] == [(sent, "received")]
        with pytest.raises(trio.WouldBlock):
            bob.verification_requests().receive_nowait()  # no second request
        assert (await verified(bob))[(alice.user_id, alice.device_id)]


async def test_a_device_added_in_the_middle_of_a_conversation(short_tmp: Path) -> None:
    async with (
        relay(short_tmp) as srv,
        device(srv, short_tmp, "alice", "laptop", ALICE_KEY) as laptop,
        device(srv, short_tmp, "bob", "bob", BOB_KEY) as bob,
    ):
        await laptop.send_text(bob.user_id, "hi bob")
        assert (await next_message(bob)).text == "hi bob"
        await bob.send_text(laptop.user_id, "hi alice")
        assert (await next_message(laptop)).text == "hi alice"
        await bob.verify_device(laptop.user_id, laptop.device_id, laptop.fingerprint)

        async with device(srv, short_tmp, "alice", "phone", PHONE_KEY) as phone:
            # Bob's directory predates the phone: his send meets device_mismatch,
            # refreshes, and then reaches both of Alice's devices.
            sent = await bob.send_text(laptop.user_id, "do you have your phone?")
            for mine in (laptop, phone):
                got = await next_message(mine)
                assert (got.message_id, got.text, got.outgoing) == (
                    sent,
                    "do you have your phone?",
                    False,
                )
            flags = await verified(bob)
            assert flags[(laptop.user_id, laptop.device_id)] is True
            assert flags[(phone.user_id, phone.device_id)] is False  # flagged, not trusted

            # Alice writes from either device: Bob and her other device get it.
            from_phone = await phone.send_text(bob.user_id, "yes, writing from it")
            got = await next_message(bob)
            assert (got.message_id, got.sender_device_id) == (from_phone, phone.device_id)
            assert not got.sender_verified
            copy = await next_message(laptop)
            assert (copy.message_id, copy.outgoing, copy.peer_user_id) == (
                from_phone,
                True,
                bob.user_id,
            )
            # The laptop's directory predates the phone too (device_mismatch, retry).
            from_laptop = await laptop.send_text(bob.user_id, "and from the laptop")
            assert (await next_message(bob)).message_id == from_laptop
            copy = await next_message(phone)
            assert (copy.message_id, copy.outgoing) == (from_laptop, True)

            # Bob verifies the new device (SAS); then it is no longer flagged.
            ours, theirs = await run_sas(bob, phone)
            with trio.fail_after(10):
                assert await ours.sas() == await theirs.sas()
                await ours.confirm()
                await theirs.confirm()
                await ours.done()
                await theirs.done()
            assert (await verified(bob))[(phone.user_id, phone.device_id)] is True
            again = await phone.send_text(bob.user_id, "verified now")
            got = await next_message(bob)
            assert got.message_id == again and got.sender_verified
            assert (await next_message(laptop)).message_id == again
            assert [e.text for e in await phone.history(bob.user_id)] == [
                "do you have your phone?",
                "yes, writing from it",
                "and from the laptop",
                "verified now",
            ]


async def fallback_row(srv: Server, device_id: str) -> tuple[str, int | None]:
    row = await srv.store.read(
        lambda c: c.execute(
            "SELECT curve25519, used_at FROM fallback_keys WHERE device_id = ?", (device_id,)
        ).fetchone()
    )
    return row[0], row[1]


@asynccontextmanager
async def sparse_relay(tmp: Path) -> AsyncIterator[Server]:
    """No key_count pushes: a device's one-time keys can run out while it is online."""
    async with team(tmp, devices=DeviceSettings(one_time_key_threshold=0), **RELAXED) as srv:
        yield srv


async def test_when_one_time_keys_run_out_the_fallback_key_is_used_then_replaced(
    short_tmp: Path,
) -> None:
    async with (
        sparse_relay(short_tmp) as srv,
        device(srv, short_tmp, "alice", "alice", ALICE_KEY, one_time_keys=2) as alice,
        device(srv, short_tmp, "bob", "bob", BOB_KEY) as bob,
        device(srv, short_tmp, "bob", "bob-phone", PHONE_KEY) as bob_phone,
    ):
        first, used_at = await fallback_row(srv, alice.device_id)
        assert used_at is None
        ref = {"user_id": alice.user_id, "device_id": alice.device_id}
        for _ in range(2):  # someone takes both one-time keys
            claimed = await bob.connection.request("keys_claim", devices=[ref])
            assert claimed["keys"][0]["fallback"] is False
        # Bob's first message needs an Olm channel: only the fallback key is left.
        sent = await bob.send_text(alice.user_id, "via the fallback key")
        got = await next_message(alice)
        assert (got.message_id, got.text) == (sent, "via the fallback key")
        assert (await next_message(bob_phone)).outgoing  # the copy for Bob's other device
        # Alice noticed and published a new fallback key (before handing the
        # message over); the server has it, unused.
        second, used_at = await fallback_row(srv, alice.device_id)
        assert second != first and used_at is None
        # The next claim gets the new key, and it works too.
        sent = await bob_phone.send_text(alice.user_id, "via the new fallback key")
        assert (await next_message(alice)).message_id == sent
        assert (await next_message(bob)).outgoing  # Bob's copy from his phone
        third, _ = await fallback_row(srv, alice.device_id)
        assert third not in (first, second)
        # The Olm channels keep working in both directions.
        await alice.send_text(bob.user_id, "thanks")
        assert (await next_message(bob)).text == "thanks"
        assert (await next_message(bob_phone)).text == "thanks"
    # Across a restart Alice still knows which fallback key is hers on the server.
    async with (
        team(short_tmp, devices=DeviceSettings(one_time_key_threshold=0), **RELAXED) as srv,
        device(srv, short_tmp, "alice", "alice", ALICE_KEY, one_time_keys=2) as alice,
    ):
        assert (await fallback_row(srv, alice.device_id))[0] == third


def test_a_channel_opened_with_the_previous_fallback_key_still_decrypts() -> None:
    key = bytes(32)
    alice = OlmMachine(vodozemac.Account(), key)
    fallback = alice.new_fallback_key("ALICE")
    alice.mark_published()
    peers = [vodozemac.Account(), vodozemac.Account()]
    channels = [
        p.create_outbound_session(
            alice.account.curve25519_key,
            vodozemac.Curve25519PublicKey.from_base64(fallback["curve25519"]),
        )
        for p in peers
    ]
    messages = [c.encrypt(b"hello") for c in channels]
    first = alice.decrypt(peers[0].curve25519_key.to_base64(), encode_ciphertext(messages[0]))
    assert first == (b"hello", fallback["curve25519"])
    rotated = alice.new_fallback_key("ALICE")
    assert rotated["curve25519"] != fallback["curve25519"]
    # Until it is published, asking again gives the same new key (an upload
    # that failed is retried with it, so the published one is not dropped).
    assert alice.new_fallback_key("ALICE") == rotated
    alice.mark_published()
    late = alice.decrypt(peers[1].curve25519_key.to_base64(), encode_ciphertext(messages[1]))
    assert late == (b"hello", fallback["curve25519"])


def test_the_one_time_key_is_read_from_a_pre_key_message() -> None:
    bob, alice = vodozemac.Account(), vodozemac.Account()
    bob.generate_one_time_keys(1)
    [otk] = bob.one_time_keys.values()
    channel = alice.create_outbound_session(bob.curve25519_key, otk)
    _, body = channel.encrypt(b"x").to_parts()
    assert pre_key_one_time_key(body, channel.session_id) == otk.to_base64()
    assert pre_key_one_time_key(body, "another channel id") is None
    assert pre_key_one_time_key(body[:40], channel.session_id) is None
    assert pre_key_one_time_key(b"\x04" + body[1:], channel.session_id) is None
    assert pre_key_one_time_key(b"", channel.session_id) is None


def test_the_emoji_table_and_the_info_strings() -> None:
    assert len(SAS_EMOJI) == 64 and len(set(SAS_EMOJI)) == 64
    assert SAS_EMOJI[0] == ("🐶", "Dog") and SAS_EMOJI[63] == ("📌", "Pin")
    assert SAS_EMOJI[21] == ("\u2601\ufe0f", "Cloud")
    s, r = Party(1, "AAAA", "edS"), Party(2, "BBBB", "edR")
    assert sas_info(s, "kS", r, "kR", "t-1") == "CHATD_SAS_V1|1|AAAA|kS|2|BBBB|kR|t-1"
    assert mac_info(s, r, "t-1") == "CHATD_SAS_MAC_V1|1|AAAA|2|BBBB|t-1"
    assert len(commitment("kS", "t-1")) == 43


def test_the_sas_state_machine_refuses_payloads_out_of_order() -> None:
    alice, bob = Party(1, "AAAA", "edA"), Party(2, "BBBB", "edB")
    starter = SasExchange(alice, bob, "t-1", we_started=True)
    start = starter.start()
    responder = SasExchange(bob, alice, "t-1", we_started=False, their_commitment="x" * 43)
    accept = responder.accept()
    [key] = starter.receive("verify_accept", accept)
    # The starter's key does not match the (forged) commitment.
    with pytest.raises(VerificationError, match="commitment"):
        responder.receive("verify_key", key)
    honest = SasExchange(bob, alice, "t-1", we_started=False, **_commit(start))
    honest.accept()
    with pytest.raises(VerificationError, match="not expected"):
        honest.receive("verify_mac", {"mac": "A" * 43})  # before the keys
    with pytest.raises(VerificationError, match="malformed transaction"):
        SasExchange(alice, bob, "a|b", we_started=True)
    cancel = starter.cancel("user", "no")
    assert starter.state == "cancelled" and cancel["kind"] == "verify_cancel"
    assert starter.receive("verify_mac", {}) == []  # ignored once cancelled


def _commit(start: dict[str, Any]) -> dict[str, Any]:
    return {"their_commitment": start["commitment"]}


async def test_a_device_cannot_verify_itself_or_an_unknown_device(short_tmp: Path) -> None:
    async with (
        relay(short_tmp) as srv,
        device(srv, short_tmp, "alice", "alice", ALICE_KEY) as alice,
    ):
        with pytest.raises(Exception, match="itself"):
            await alice.start_verification(alice.user_id, alice.device_id)
        with pytest.raises(Exception, match="unknown device"):
            await alice.start_verification(alice.user_id, "AAAAAAAAAAAAA")
        with pytest.raises(Exception, match="one_time_keys"):
            async with open_client(
                srv.url,
                "alice",
                PASSWORD,
                device_name="x",
                store_path=short_tmp / "x.db",
                store_key=TABLET_KEY,
                one_time_keys=0,
            ):
                pass  # pragma: no cover - never reached


class FakeTransport:
    """What Verifications sends, recorded instead of encrypted and relayed."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, dict[str, Any]]] = []

    async def send(self, user_id: int, fields: dict[str, Any]) -> None:
        self.sent.append((user_id, fields))

    async def mark(self, device: Party) -> None:
        raise AssertionError(f"{device} must not be marked verified")

    @property
    def kinds(self) -> list[str]:
        return [fields["kind"] for _, fields in self.sent]


ME, PEER = Party(1, "AAAA", "A" * 43), Party(2, "BBBB", "B" * 43)


async def test_a_verification_nobody_answers_times_out(autojump_clock: Any) -> None:
    transport = FakeTransport()
    manager = Verifications(lambda: ME, transport.send, transport.mark)
    verification = await manager.start(PEER)
    with pytest.raises(VerificationError, match="timeout") as raised:
        await verification.sas()
    assert not raised.value.remote
    assert transport.kinds == ["verify_start", "verify_cancel"]
    user_id, cancel = transport.sent[1]
    assert user_id == PEER.user_id and cancel["code"] == "timeout"
    assert cancel["to_device_id"] == PEER.device_id
    assert cancel["transaction_id"] == verification.transaction_id
    assert trio.current_time() >= VERIFICATION_TIMEOUT


async def test_requests_beyond_the_limit_are_declined_as_busy() -> None:
    transport = FakeTransport()
    manager = Verifications(lambda: ME, transport.send, transport.mark)
    start = {"kind": "verify_start", "to_device_id": ME.device_id, "commitment": "C" * 43}
    for n in range(MAX_VERIFICATIONS + 1):
        await manager.handle(PEER, ME.user_id, {**start, "transaction_id": f"t-{n}"})
    assert transport.kinds == ["verify_cancel"]
    assert transport.sent[0][1]["code"] == "busy"
    assert transport.sent[0][1]["transaction_id"] == f"t-{MAX_VERIFICATIONS}"
    # Payloads for another device, or malformed ones, are ignored.
    await manager.handle(PEER, ME.user_id, {**start, "to_device_id": "CCCC", "transaction_id": "x"})
    await manager.handle(PEER, ME.user_id, {**start, "transaction_id": "a|b"})
    await manager.handle(PEER, ME.user_id + 1, {**start, "transaction_id": "y"})
    assert len(transport.sent) == 1
    waiting = [manager.requests.receive_nowait() for _ in range(MAX_VERIFICATIONS)]
    assert [v.transaction_id for v in waiting] == [f"t-{n}" for n in range(MAX_VERIFICATIONS)]
