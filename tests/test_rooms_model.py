"""The room rules (chatd/rooms/model.py), without I/O."""

from __future__ import annotations

import pytest

from chatd.rooms import model as m
from chatd.rooms.model import Room, RoomError

OWNER, MOD, MEMBER, INVITEE, OUTSIDER = 1, 2, 3, 4, 5


def room(kind: str = "channel", invite_only: bool = False) -> Room:
    r = Room(1, kind, "r", "", invite_only or kind == "group", False, 0, 7)
    r.members = {OWNER: "owner", MOD: "moderator", MEMBER: "member"}
    r.invites = {INVITEE: (OWNER, 0)}
    r.devices = {"A": OWNER, "B": MOD, "C": MEMBER, "D": MEMBER}
    return r


def code(call: object, *args: object, **kw: object) -> str | None:
    try:
        call(*args, **kw)  # type: ignore[operator]
    except RoomError as exc:
        return exc.code
    return None


@pytest.mark.parametrize("kind", ["channel", "group"])
def test_outsiders_learn_nothing_of_a_group_and_only_that_a_channel_exists(kind: str) -> None:
    hidden = "room_not_found" if kind == "group" else "not_member"
    r = room(kind)
    assert code(m.member, r, OUTSIDER) == hidden
    assert code(m.member, None, OUTSIDER) == "room_not_found"
    assert code(m.member, r, INVITEE) == "not_member"
    assert code(m.visible, r, INVITEE) is None
    assert code(m.check_invite, r, OUTSIDER, 6, max_members=10) == hidden
    assert code(m.check_remove, r, OUTSIDER, MEMBER) == hidden
    assert code(m.check_set_role, r, OUTSIDER, MEMBER, "owner") == hidden
    assert code(m.check_leave, r, OUTSIDER) == hidden


def test_joining_needs_an_invitation_where_the_room_is_invite_only() -> None:
    assert code(m.check_join, room("channel"), OUTSIDER, max_members=10) is None
    assert code(m.check_join, room("channel", True), OUTSIDER, max_members=10) == "not_invited"
    assert code(m.check_join, room("channel", True), INVITEE, max_members=10) is None
    assert code(m.check_join, room("group"), OUTSIDER, max_members=10) == "room_not_found"
    assert code(m.check_join, room("group"), INVITEE, max_members=4) is None  # counted already
    assert code(m.check_join, room("channel"), OUTSIDER, max_members=4) == "room_full"
    assert code(m.check_join, room("channel"), MEMBER, max_members=1) is None  # already in


def test_who_removes_whom() -> None:
    r = room()
    assert code(m.check_remove, r, MEMBER, MOD) == "forbidden"
    assert code(m.check_remove, r, MOD, MEMBER) is None
    assert code(m.check_remove, r, MOD, INVITEE) is None  # revoking the invitation
    assert code(m.check_remove, r, MOD, MOD) == "forbidden"  # leaving is room_leave
    assert code(m.check_remove, r, MOD, OWNER) == "forbidden"
    assert code(m.check_remove, r, OWNER, MOD) is None
    assert code(m.check_remove, r, OWNER, OUTSIDER) == "user_not_found"
    assert code(m.check_remove, r, None, OWNER) is None  # a server admin
    assert code(m.check_remove, r, None, OUTSIDER) == "user_not_found"
    assert code(m.check_remove, None, None, OWNER) == "room_not_found"


def test_roles_and_the_last_owner() -> None:
    r = room()
    assert code(m.check_set_role, r, MOD, MEMBER, "moderator") == "forbidden"
    assert code(m.check_set_role, r, OWNER, MEMBER, "owner") is None
    assert code(m.check_set_role, r, OWNER, OWNER, "member") == "last_owner"
    assert code(m.check_set_role, r, OWNER, INVITEE, "member") == "user_not_found"
    assert code(m.check_set_role, r, None, MOD, "owner") is None
    assert code(m.check_leave, r, OWNER) == "last_owner"
    assert code(m.check_leave, r, MEMBER) is None
    assert code(m.check_leave, r, INVITEE) is None  # declining
    r.members = {OWNER: "owner"}
    assert code(m.check_leave, r, OWNER) is None  # the last member: the room goes


def test_invitations_are_capped_with_the_members() -> None:
    r = room()
    assert code(m.check_invite, r, MEMBER, 6, max_members=5) is None
    assert code(m.check_invite, r, MEMBER, 6, max_members=4) == "room_full"
    assert code(m.check_invite, r, MEMBER, INVITEE, max_members=4) is None  # already invited
    assert code(m.check_invite, r, MEMBER, MOD, max_members=9) == "already_member"


def test_targets_leave_out_the_sender_and_suspended_devices() -> None:
    r = room()
    r.suspended = {"D"}
    assert r.targets("A") == ["B", "C"]
    assert r.targets() == ["A", "B", "C"]
    assert r.info(OUTSIDER).role is None and r.info(OUTSIDER).epoch is None
    assert (r.info(MOD).role, r.info(MOD).epoch, r.info(MOD).member_count) == ("moderator", 7, 3)
