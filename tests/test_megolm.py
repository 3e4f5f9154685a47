"""The Megolm layer without I/O (chatd/client/megolm.py): rotation rules, key
sharing and import, held keys, key requests, pickling, payload encodings."""

from __future__ import annotations

import json

import pytest
import vodozemac

from chatd.client.errors import ClientError, DecryptionError
from chatd.client.megolm import (
    KeyMissing,
    MegolmMachine,
    MemberDevice,
    RoomDecrypted,
    RoomSettings,
    Share,
    reshare_index,
)
from chatd.client.room_payloads import (
    RoomKey,
    RoomKeyRequest,
    decode_room_text,
    encode_room_ciphertext,
    encode_room_text,
)

KEY = bytes(range(32))
ROOM = 7
DAY_MS = 86_400_000


def device(user_id: int, name: str) -> tuple[MemberDevice, vodozemac.Account]:
    account = vodozemac.Account()
    keys = MemberDevice(
        user_id, name, account.curve25519_key.to_base64(), account.ed25519_key.to_base64()
    )
    return keys, account


ALICE, _ = device(1, "ALICELAPTOP00")
ALICE_PHONE, _ = device(1, "ALICEPHONE000")
BOB, _ = device(2, "BOBPHONE00000")
CAROL, _ = device(3, "CAROLDESK0000")
DAN, _ = device(4, "DANTABLET0000")


def machine(own: MemberDevice) -> MegolmMachine:
    return MegolmMachine(KEY, own)


def decrypted_text(m: MegolmMachine, sender: MemberDevice, ciphertext: str) -> str:
    result = m.decrypt(ROOM, sender.user_id, sender.device_id, ciphertext)
    assert isinstance(result, RoomDecrypted), result
    return decode_room_text(result.plaintext, ROOM).text


def send(m: MegolmMachine, text: str) -> str:
    return m.encrypt(ROOM, encode_room_text(ROOM, text))


# -- rotation -------------------------------------------------------------------


def test_the_first_message_makes_a_session_and_a_new_device_gets_it_without_rotation() -> None:
    alice = machine(ALICE)
    settings = RoomSettings()
    members = [ALICE_PHONE, BOB]
    session, why = alice.outbound_for(ROOM, members, settings, now_ms=0)
    assert why == "first"
    assert session.unshared(members) == members
    alice.mark_shared(ROOM, session.session_id, members, session.index)
    assert session.unshared(members) == []
    send(alice, "one")
    # Carol joins: the same session, shared with her from its current index.
    members = [ALICE_PHONE, BOB, CAROL]
    again, why = alice.outbound_for(ROOM, members, settings, now_ms=1)
    assert (again.session_id, why) == (session.session_id, None)
    assert again.unshared(members) == [CAROL]
    assert alice.current_key(ROOM).first_index == 1


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("bob_left", "device_gone"),
        ("bob_device_removed", "device_gone"),
        ("bob_device_new_keys", "device_gone"),
        ("messages", "messages"),
        ("age", "age"),
    ],
)
def test_a_new_session_when_a_device_goes_or_the_limits_are_reached(
    change: str, reason: str
) -> None:
    alice = machine(ALICE)
    settings = RoomSettings(rotation_messages=3, rotation_seconds=3600)
    members = [ALICE_PHONE, BOB, CAROL]
    first, _ = alice.outbound_for(ROOM, members, settings, now_ms=0)
    alice.mark_shared(ROOM, first.session_id, members, 0)
    now = 1000
    for n in range(2):
        send(alice, f"n{n}")
    if change == "bob_left":
        members = [ALICE_PHONE, CAROL]
    elif change == "bob_device_removed":
        members = [ALICE_PHONE, CAROL, DAN]  # another user joined, Bob's only device went
    elif change == "bob_device_new_keys":
        members = [ALICE_PHONE, BOB._replace(curve25519=device(2, "x")[0].curve25519), CAROL]
    elif change == "messages":
        send(alice, "the third and last one")
    else:
        now = 3600 * 1000
    # Just before the limits nothing rotates.
    if change not in ("messages", "age"):
        assert first.rotation_reason([ALICE_PHONE, BOB, CAROL], settings, 999) is None
    session, why = alice.outbound_for(ROOM, members, settings, now_ms=now)
    assert why == reason
    assert session.session_id != first.session_id
    assert session.messages == 0 and session.shared == {}
    assert session.unshared(members) == members


def test_the_default_limits_are_a_hundred_messages_and_seven_days() -> None:
    settings = RoomSettings()
    assert (settings.rotation_messages, settings.rotation_seconds) == (100, 7 * 86400)
    assert settings.key_wait_seconds == 10
    alice = machine(ALICE)
    session, _ = alice.outbound_for(ROOM, [BOB], settings, now_ms=0)
    for n in range(99):
        send(alice, str(n))
    assert session.rotation_reason([], settings, 7 * DAY_MS - 1) is None
    assert session.rotation_reason([], settings, 7 * DAY_MS) == "age"
    send(alice, "the hundredth")
    assert session.rotation_reason([], settings, 0) == "messages"


@pytest.mark.parametrize(
    "kw", [{"rotation_messages": 0}, {"rotation_seconds": 0}, {"key_wait_seconds": -1}]
)
def test_settings_out_of_range_are_refused(kw: dict[str, float]) -> None:
    with pytest.raises(ClientError, match=next(iter(kw))):
        RoomSettings(**kw)  # type: ignore[arg-type]


# -- sharing and decrypting ------------------------------------------------------


def test_a_shared_key_decrypts_from_its_index_on_and_never_before() -> None:
    alice, bob, carol = machine(ALICE), machine(BOB), machine(CAROL)
    alice.outbound_for(ROOM, [BOB], RoomSettings(), now_ms=0)
    assert bob.add_room_key(ALICE, alice.current_key(ROOM))
    early = [send(alice, f"early {n}") for n in range(3)]
    late_key = alice.current_key(ROOM)
    assert late_key.first_index == 3
    # The key travels as an Olm payload (JSON) and parses back.
    assert carol.add_room_key(ALICE, RoomKey.parse(json.loads(json.dumps(late_key.fields()))))
    later = send(alice, "after Carol joined")
    assert [decrypted_text(bob, ALICE, c) for c in [*early, later]] == [
        "early 0",
        "early 1",
        "early 2",
        "after Carol joined",
    ]
    assert decrypted_text(carol, ALICE, later) == "after Carol joined"
    for ciphertext in early:
        assert isinstance(carol.decrypt(ROOM, 1, ALICE.device_id, ciphertext), KeyMissing)


def test_a_message_is_held_until_its_key_arrives() -> None:
    alice, bob = machine(ALICE), machine(BOB)
    alice.outbound_for(ROOM, [BOB], RoomSettings(), now_ms=0)
    key = alice.current_key(ROOM)
    ciphertext = send(alice, "overtook its key")
    missing = bob.decrypt(ROOM, ALICE.user_id, ALICE.device_id, ciphertext)
    assert missing == KeyMissing(key.session_id)
    assert bob.add_room_key(ALICE, key)
    assert decrypted_text(bob, ALICE, ciphertext) == "overtook its key"


def test_a_session_belongs_to_the_device_whose_olm_channel_carried_it() -> None:
    alice, bob = machine(ALICE), machine(BOB)
    alice.outbound_for(ROOM, [BOB], RoomSettings(), now_ms=0)
    key = alice.current_key(ROOM)
    ciphertext = send(alice, "from Alice's laptop")
    # Carol's device hands Bob Alice's session: it is taken as Carol's, so it
    # cannot open a message the envelope says Alice's laptop sent.
    assert bob.add_room_key(CAROL, key)
    assert isinstance(bob.decrypt(ROOM, 1, ALICE.device_id, ciphertext), KeyMissing)
    # And a message relabelled as Carol's is opened only as hers (the session's
    # signature still binds it to whoever holds the outbound session).
    assert decrypted_text(bob, CAROL, ciphertext) == "from Alice's laptop"
    # Another room's id in the envelope: Bob has no session there.
    assert isinstance(bob.decrypt(ROOM + 1, 1, ALICE.device_id, ciphertext), KeyMissing)


def test_of_two_copies_the_one_that_starts_earlier_is_kept() -> None:
    alice, bob = machine(ALICE), machine(BOB)
    alice.outbound_for(ROOM, [BOB], RoomSettings(), now_ms=0)
    early_key = alice.current_key(ROOM)
    first = send(alice, "zero")
    late_key = alice.current_key(ROOM)
    assert bob.add_room_key(ALICE, late_key)
    assert bob.add_room_key(ALICE, early_key)  # earlier: replaces it
    assert not bob.add_room_key(ALICE, late_key)  # later: ignored
    assert decrypted_text(bob, ALICE, first) == "zero"


def test_a_room_key_that_lies_about_itself_is_refused() -> None:
    alice, bob = machine(ALICE), machine(BOB)
    alice.outbound_for(ROOM, [BOB], RoomSettings(), now_ms=0)
    key = alice.current_key(ROOM)
    for bad in (
        RoomKey(ROOM, "another-session-id", key.session_key, 0),
        RoomKey(ROOM, key.session_id, key.session_key, 5),
        RoomKey(ROOM, key.session_id, "bm90IGEga2V5", 0),
    ):
        with pytest.raises(DecryptionError):
            bob.add_room_key(ALICE, bad)
    for fields in (
        {
            "kind": "room_key",
            "room_id": "7",
            "session_id": "s",
            "session_key": "k",
            "first_index": 0,
        },
        {"kind": "room_key", "room_id": 7, "session_id": "", "session_key": "k", "first_index": 0},
        {"kind": "room_key", "room_id": 7, "session_id": "s", "first_index": 0},
        {
            "kind": "room_key",
            "room_id": 7,
            "session_id": "s",
            "session_key": "k",
            "first_index": -1,
        },
        {
            "kind": "room_key",
            "room_id": 7,
            "session_id": "s",
            "session_key": "k",
            "first_index": True,
        },
    ):
        with pytest.raises(DecryptionError, match="malformed room_key"):
            RoomKey.parse(fields)
    request = RoomKeyRequest(ROOM, key.session_id)
    assert RoomKeyRequest.parse(request.fields()) == request


def test_a_forged_or_garbled_room_message_raises() -> None:
    alice, bob = machine(ALICE), machine(BOB)
    alice.outbound_for(ROOM, [BOB], RoomSettings(), now_ms=0)
    bob.add_room_key(ALICE, alice.current_key(ROOM))
    good = json.loads(send(alice, "hello"))
    mallory = vodozemac.GroupSession()  # another ratchet, signing key and all
    forged = {**good, "body": json.loads(send_with(mallory))["body"]}
    with pytest.raises(DecryptionError, match="does not decrypt"):
        bob.decrypt(ROOM, 1, ALICE.device_id, json.dumps(forged))
    for garbage in ("not json", '{"v":2,"session_id":"s","body":""}', '{"v":1,"body":"AA"}'):
        with pytest.raises(DecryptionError, match="malformed room ciphertext"):
            bob.decrypt(ROOM, 1, ALICE.device_id, garbage)


def send_with(session: vodozemac.GroupSession) -> str:
    return encode_room_ciphertext(session.session_id, session.encrypt(b"{}"))


def test_the_plaintext_must_name_the_envelopes_room() -> None:
    payload = encode_room_text(ROOM, "hi @bob", [2, 2, 3])
    assert json.loads(payload) == {
        "v": 1,
        "kind": "text",
        "room_id": ROOM,
        "text": "hi @bob",
        "mentions": [2, 3],
    }
    assert decode_room_text(payload, ROOM).mentions == (2, 3)
    with pytest.raises(DecryptionError, match="room id differs"):
        decode_room_text(payload, ROOM + 1)
    for bad in (
        {"v": 1, "kind": "reaction", "room_id": ROOM, "text": "x"},
        {"v": 1, "kind": "text", "room_id": ROOM, "text": 5},
        {"v": 1, "kind": "text", "room_id": ROOM, "text": "x", "mentions": ["bob"]},
        {"v": 2, "kind": "text", "room_id": ROOM, "text": "x"},
    ):
        with pytest.raises(DecryptionError, match="malformed room payload"):
            decode_room_text(json.dumps(bad).encode(), ROOM)


# -- key requests ------------------------------------------------------------------


def test_a_key_request_is_answered_only_for_devices_that_had_the_session() -> None:
    shared = Share(BOB.curve25519, 4)
    ask = dict(member_device=True, share_history=False, first_known=0)
    assert reshare_index(shared, BOB, **ask) == 4  # from where Bob got it, not earlier
    assert reshare_index(None, CAROL, **ask) is None  # never had it
    new_keys = BOB._replace(curve25519=CAROL.curve25519)
    assert reshare_index(shared, new_keys, **ask) is None  # another device now
    assert reshare_index(shared, BOB, **{**ask, "member_device": False}) is None  # left
    history = {**ask, "share_history": True}
    assert reshare_index(None, CAROL, **history) == 0  # share_history: from the start
    assert reshare_index(None, CAROL, **{**history, "member_device": False}) is None


def test_own_sessions_export_from_any_index_for_re_shares() -> None:
    alice, bob = machine(ALICE), machine(BOB)
    first, _ = alice.outbound_for(ROOM, [BOB], RoomSettings(), now_ms=0)
    old = [send(alice, f"old {n}") for n in range(2)]
    alice.outbound_for(ROOM, [BOB], RoomSettings(rotation_messages=2), now_ms=0)
    assert [s.session.session_id for s in alice.own_sessions(ROOM)] == [
        first.session_id,
        alice.outbound[ROOM].session_id,
    ]
    again = alice.own_session(ROOM, first.session_id).export(1)
    assert (again.session_id, again.first_index) == (first.session_id, 1)
    bob.add_room_key(ALICE, again)
    assert isinstance(bob.decrypt(ROOM, 1, ALICE.device_id, old[0]), KeyMissing)
    assert decrypted_text(bob, ALICE, old[1]) == "old 1"


# -- persistence ---------------------------------------------------------------------


def test_sessions_survive_a_pickle_round_trip_and_the_ratchet_goes_on() -> None:
    alice, bob = machine(ALICE), machine(BOB)
    session, _ = alice.outbound_for(ROOM, [BOB, CAROL], RoomSettings(), now_ms=5)
    alice.mark_shared(ROOM, session.session_id, [BOB], 0)
    bob.add_room_key(ALICE, alice.current_key(ROOM))
    first = send(alice, "before the restart")
    outbound, inbound = alice.take_dirty()
    assert [r.room_id for r in outbound] == [ROOM] and outbound[0].messages == 1
    assert [(r.sender, r.first_index) for r in inbound] == [(ALICE, 0)]
    assert alice.take_dirty() == ([], [])  # nothing changed since
    restored = MegolmMachine.restore(
        KEY,
        ALICE,
        [(r.room_id, r.pickle, r.created_at, r.messages, dict(session.shared)) for r in outbound],
        [(r.room_id, r.sender, r.pickle) for r in inbound],
    )
    again = restored.outbound[ROOM]
    assert (again.session_id, again.index, again.messages, again.created_at) == (
        session.session_id,
        1,
        1,
        5,
    )
    assert again.unshared([BOB, CAROL]) == [CAROL]
    second = send(restored, "after the restart")
    assert [decrypted_text(bob, ALICE, c) for c in (first, second)] == [
        "before the restart",
        "after the restart",
    ]
    _, bob_inbound = bob.take_dirty()
    bob_again = MegolmMachine.restore(
        KEY, BOB, [], [(r.room_id, r.sender, r.pickle) for r in bob_inbound]
    )
    assert decrypted_text(bob_again, ALICE, second) == "after the restart"
    with pytest.raises(ValueError):
        MegolmMachine.restore(
            bytes(32), BOB, [], [(r.room_id, r.sender, r.pickle) for r in bob_inbound]
        )


def test_leaving_forgets_the_outbound_session() -> None:
    alice = machine(ALICE)
    first, _ = alice.outbound_for(ROOM, [BOB], RoomSettings(), now_ms=0)
    alice.discard_outbound(ROOM)
    again, why = alice.outbound_for(ROOM, [BOB], RoomSettings(), now_ms=0)
    assert why == "first" and again.session_id != first.session_id
