"""Rooms in the ``chat`` terminal client, driven through pseudo-terminals.

Same set-up as tests/test_chat.py: the relay runs in the test's Trio loop,
each ``chat`` is a subprocess on a pty, and :meth:`Terminal.expect` waits for
text on the screen (never a sleep).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from chatd.chat.cli import WarningLines
from chatd.chat.room_display import (
    BOLD,
    CANNOT_DECRYPT,
    PLAIN,
    delivery_notice,
    event_text,
    highlight,
    refusal,
    room_mark,
    room_message_lines,
    undecryptable_text,
)
from chatd.client import ServerRefusedError
from chatd.client.room_delivery import RoomDelivery
from chatd.client.room_events import BAD_CIPHERTEXT, KEY_MISSING, REPLAY, WRONG_ROOM, RoomUpdate
from chatd.client.room_store import RoomInfo

from .test_chat import chat, log_in, user_args
from .test_client import relay
from .test_keys import BOB_PASSWORD
from .test_relay_auth import PASSWORD


async def test_two_people_talk_in_a_channel_and_refusals_are_explained(short_tmp: Path) -> None:
    async with relay(short_tmp) as srv:
        alice_args = user_args(srv.url, short_tmp, "alice", key=bytes([1]) * 32)
        bob_args = user_args(srv.url, short_tmp, "bob", key=bytes([2]) * 32)
        async with chat(short_tmp, *alice_args) as alice, chat(short_tmp, *bob_args) as bob:
            await log_in(alice, "alice", PASSWORD)
            await log_in(bob, "bob", BOB_PASSWORD)

            await alice.type("/create general --topic launch plans")
            created = await alice.expect_line("-- created the channel #general (id ")
            room_id = re.match(r"(\d+)\)", created)
            assert room_id, created
            await alice.expect("-- room #general — topic: launch plans (what you type goes there)")
            await alice.expect("-- no messages yet")

            # Bob sees the channel, joins it by name; alice sees him join.
            await bob.type("/rooms")
            await bob.expect("Channels you can join (1):")
            await bob.expect(f"  #general (id {room_id[1]}): channel, 1 member — launch plans\n")
            await bob.type("/join #GENERAL")
            await bob.expect("-- you joined #general --")
            await bob.expect("-- room #general — topic: launch plans")
            await alice.expect("#general * bob joined")
            # (The room's first event may come before or after the room is shown.)
            assert "#general * you created the room (topic: launch plans)\n" in alice.output

            # Bob writes to the room, mentioning alice: her line is marked.
            await bob.type("morning all, @alice see the plan?")
            await bob.expect('✓ sent "morning all, @alice see the plan?"')
            line = await alice.expect_line("#general bob: morning all, @alice see the plan?")
            assert line == " (unverified device) (mentions you)"
            assert "\x1b" not in alice.output  # TERM=dumb: no bold
            await bob.expect('✓✓ delivered to 1 of 1 "morning all, @alice see the plan?"')

            # Alice answers; bob sees it with her name, without a mention.
            await alice.type("yes, all good")
            await alice.expect('✓ sent "yes, all good"')
            assert await bob.expect_line("#general alice: yes, all good") == " (unverified device)"
            await alice.expect('✓✓ delivered to 1 of 1 "yes, all good"')

            # The room's history, with the delivery counts of one's own messages.
            await alice.type("/history")
            await alice.expect("-- #general: messages 1–2 of 2 --")
            await alice.expect("bob: morning all, @alice see the plan? (mentions you)")
            assert (await alice.expect_line("] alice: yes, all good")).endswith("✓✓ 1 of 1")

            await bob.type("/members")
            await bob.expect("#general: 2 member(s)")
            await bob.expect("alice (owner)")
            await bob.expect("bob (member, you)")
            await bob.expect("this device")

            # Refusals say what is wrong in the command's terms.
            for typed, answer in [
                (
                    "/topic new plans",
                    "! /topic failed: setting the topic of #general needs the moderator role",
                ),
                ("/kick alice", "! /kick failed: removing someone from #general needs"),
                ("/room nowhere", "! you see no room called #nowhere (see /rooms)"),
                ("/create 123", "! a room name needs a letter"),
                ("/create", "! usage: /create <name> [--group] [--invite-only] [--topic <text>]"),
                ("/invite nobody", "! no user named 'nobody' on this server"),
                ("/role alice boss", "! usage: /role <username> <owner|moderator|member>"),
            ]:
                await bob.type(typed)
                await bob.expect(answer)

            # A moderator may set the topic; everyone sees it.
            await alice.type("/role bob moderator")
            await bob.expect("#general * you are now moderator (set by alice)")
            await bob.type("/topic launch on Thursday")
            await alice.expect("#general * topic: launch on Thursday (set by bob)")
            await alice.type("/topic")
            await alice.expect("#general topic: launch on Thursday")

            # With another conversation open, room messages are counted as new.
            await bob.type("/open alice")
            await bob.expect("-- conversation with alice --")
            await alice.type("one more thing")
            await bob.expect("#general alice: one more thing")
            await bob.type("/rooms")
            await bob.expect("#general (id ")
            assert (await bob.expect_line("you are moderator — launch on Thursday")) == (
                "  [1 new]"
            )
            await bob.type("/room general")
            await bob.expect("-- #general: messages 1–3 of 3 --")

            # Bob leaves: alice sees it, and bob can no longer read the members.
            await bob.type("/leave")
            await bob.expect("-- you left #general --")
            await alice.expect("#general * bob left")
            await bob.type("/members general")
            await bob.expect(
                "! /members failed: you are not a member of #general: /join general first"
            )
            await alice.type("/quit")
            await bob.type("/quit")
            assert await alice.exit_code() == 0
            assert await bob.exit_code() == 0


async def test_an_invitation_to_a_group_is_shown_and_joined(short_tmp: Path) -> None:
    async with relay(short_tmp) as srv:
        alice_args = user_args(srv.url, short_tmp, "alice", key=bytes([1]) * 32)
        bob_args = user_args(srv.url, short_tmp, "bob", key=bytes([2]) * 32)
        async with chat(short_tmp, *alice_args) as alice:
            await log_in(alice, "alice", PASSWORD)
            async with chat(short_tmp, *bob_args) as bob:
                await log_in(bob, "bob", BOB_PASSWORD)
                await bob.type("/quit")
                assert await bob.exit_code() == 0

            # Bob is offline when alice invites him.
            await alice.type("/create plans --group")
            await alice.expect("-- created the group #plans (id ")
            await alice.type("/invite bob")
            await alice.expect_all("-- invited bob to #plans --", "#plans * you invited bob")
            await alice.type("secret plans for @bob")
            await alice.expect('✓ sent "secret plans for @bob" (nobody else is in #plans yet)')

            async with chat(short_tmp, *bob_args) as bob:
                await log_in(bob, "bob", BOB_PASSWORD)
                await bob.expect("-- you have 1 room invitation(s): see /rooms --")
                await bob.type("/rooms")
                await bob.expect("Invitations (1): /join to accept, /leave to decline")
                await bob.expect("#plans (id ")
                await bob.expect("group, 1 member, from alice")
                await bob.type("/join plans")
                await bob.expect("-- you joined #plans --")
                await alice.expect("#plans * bob joined")

                # A second invitation comes live, and is declined.
                await alice.type("/create party --group")
                await alice.type("/invite bob party")
                await bob.expect(
                    "-- alice invited you to the group #party:"
                    " /join party to accept, /leave party to decline --"
                )
                await bob.type("/leave party")
                await bob.expect("-- declined the invitation to #party --")
                await alice.expect("#party * bob declined the invitation")

                # A line typed in the group reaches the other member.
                await alice.type("/open #plans")
                await alice.expect("-- room #plans")
                await alice.type("welcome @bob")
                assert await bob.expect_line("#plans alice: welcome @bob") == (
                    " (unverified device) (mentions you)"
                )
                await bob.type("/room #plans")
                await bob.type("thanks")
                await alice.expect("#plans bob: thanks")

                # The owner removes bob: both see it, and bob's room is closed.
                await alice.type("/kick bob")
                await alice.expect("#plans * bob was removed by you")
                await bob.expect("#plans * you were removed by alice")
                await bob.expect("-- #plans is closed: you are no longer in it --")
                await bob.type("/room plans")
                await bob.expect("! you see no room called #plans (see /rooms)")
                await bob.type("/quit")
                assert await bob.exit_code() == 0
            await alice.type("/quit")
            assert await alice.exit_code() == 0


def test_room_lines_say_what_happened() -> None:
    names = {1: "alice", 2: "bob"}

    def name_of(user_id: int | None) -> str:
        return "you" if user_id == 3 else names.get(user_id or 0, "?")

    def update(type_: str, **kw: object) -> RoomUpdate:
        return RoomUpdate(7, "m", type_, 1, 0, **kw)  # type: ignore[arg-type]

    assert event_text(update("removed", user_id=2, by_user_id=1), name_of) == (
        "bob was removed by alice"
    )
    assert event_text(update("removed", user_id=3), name_of) == (
        "you were removed by a server admin"
    )
    assert event_text(update("topic", topic="x\x1b[2J", by_user_id=1), name_of) == (
        "topic: x\\x1b[2J (set by alice)"
    )
    assert event_text(update("frobbed"), name_of) == "room event frobbed"
    # A message the key never came for is shown, never dropped.
    assert room_message_lines("bob: ", CANNOT_DECRYPT, "", mentioned=False, me="a", bold=False) == [
        "bob: ✗ cannot decrypt — ask the sender to resend"
    ]
    # Mentions: marked always, bold only on a terminal that can.
    assert room_message_lines(
        "bob: ", "hi @Alice, and @alicex", "", mentioned=True, me="alice", bold=True
    ) == [f"bob: hi {BOLD}@Alice{PLAIN}, and @alicex (mentions you)"]
    assert highlight("mail@alice.org", "alice") == "mail@alice.org"
    # Delivery counts.
    assert room_mark("sent", RoomDelivery(3, 2, 0, 4)) == "✓✓ 2 of 3"
    assert room_mark("sending", None) == "… not sent yet"
    assert delivery_notice(RoomDelivery(3, 1, 2, 4), "expired", '"hi"') == (
        '✗ delivered to 1 of 3 "hi": expired for the others (dropped unread)'
    )
    # Members whose every device had a full queue are not "expired".
    full = RoomDelivery(2, 1, 0, 1, unreachable=1, state="expired")
    assert delivery_notice(full, "expired", '"hi"') == (
        '✗ delivered to 1 of 2 "hi" (1 not reachable: queue full)'
    )
    assert room_mark("expired", full) == "✗ 1 of 2 (1 not reachable: queue full)"
    both = RoomDelivery(4, 1, 2, 3, unreachable=1, state="expired")
    assert delivery_notice(both, "expired", '"hi"') == (
        '✗ delivered to 1 of 4 "hi": expired for 2 (dropped unread) (1 not reachable: queue full)'
    )
    waiting = RoomDelivery(3, 1, 0, 2, unreachable=1)
    assert delivery_notice(waiting, "sent", '"hi"') == (
        '✓✓ delivered to 1 of 3 "hi" (1 not reachable: queue full)'
    )
    room = RoomInfo(7, "channel", "ops", "", False, False, 0, 2)
    assert refusal(ServerRefusedError("not_member", "x"), room) == (
        "you are not a member of #ops: /join ops first"
    )
    assert refusal(ServerRefusedError("bad_frame", "x"), room) is None


def test_a_room_message_no_key_opens_says_why_in_its_room(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert undecryptable_text(KEY_MISSING) == CANNOT_DECRYPT
    assert undecryptable_text(BAD_CIPHERTEXT) == (
        "✗ cannot decrypt — ask the sender to resend (it arrived damaged, or was forged)"
    )
    assert undecryptable_text(WRONG_ROOM).endswith("(it was written for another room)")
    assert undecryptable_text(REPLAY).endswith("(it repeats an earlier message)")
    # The library's warning about it is not printed again as a "!" line.
    record = logging.LogRecord("x", logging.WARNING, "", 0, "client.room_undecryptable", (), None)
    record.error = "malformed room ciphertext"
    WarningLines().emit(record)
    assert capsys.readouterr().out == ""
