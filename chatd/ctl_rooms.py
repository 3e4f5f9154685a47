"""``chatctl rooms``: list, show, remove, set-role, delete (the admin API's /v1/rooms).

Hooked into :mod:`chatd.chatctl` by :func:`add_commands` and :func:`run`.
"""

from __future__ import annotations

import argparse
from typing import Any, get_args

from chatd.ctl_text import Call, more, named, positive_id, table, when, yes_no
from chatd.errors import UsageError
from chatd.protocol.rooms import Role as RoomRole


def add_commands(sub: Any) -> None:
    """The ``rooms`` command and its actions."""
    rooms = sub.add_parser("rooms", help="rooms: list, show, remove, set-role, delete")
    r = rooms.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = r.add_parser("list", help="rooms in id order, channels and groups")
    ls.add_argument(
        "--limit", type=positive_id, default=100, help="rows (default 100, at most 500)"
    )
    ls.add_argument("--after", type=positive_id, metavar="ID", help="start after this room id")
    r.add_parser("show", help="a room's members and invitations").add_argument(
        "room_id", type=positive_id
    )
    user_help = "a user id, or the username of a member or invitee (@NAME for digits)"
    remove = r.add_parser("remove", help="remove a member from a room, or revoke their invitation")
    remove.add_argument("room_id", type=positive_id)
    remove.add_argument("user", help=user_help)
    role = r.add_parser("set-role", help="give a member of a room another role")
    role.add_argument("room_id", type=positive_id)
    role.add_argument("user", help=user_help)
    role.add_argument("role", choices=get_args(RoomRole))
    delete = r.add_parser("delete", help="delete a room for all its members (needs --yes)")
    delete.add_argument("room_id", type=positive_id)
    delete.add_argument("--yes", action="store_true", help="yes, delete the room")


def _rooms_table(rooms: list[dict[str, Any]]) -> str:
    rows = [
        (
            r["room_id"],
            r["name"],
            r["kind"],
            r["member_count"],
            r["invitation_count"],
            yes_no(r["invite_only"]),
            yes_no(r["share_history"]),
            r["epoch"],
            when(r["created_at"]),
        )
        for r in rooms
    ]
    headers = ["id", "name", "kind", "members", "invited", "invite-only", "history", "epoch"]
    return table(rows, [*headers, "created"])


def _room_text(detail: dict[str, Any]) -> str:
    room = detail["room"]
    lines = [_rooms_table([room])]
    if room["topic"]:
        lines.append(f"topic: {room['topic']}")
    members = [
        (m["user_id"], m["username"], m["role"], len(m["device_ids"]), " ".join(m["device_ids"]))
        for m in detail["members"]
    ]
    lines += ["", "members:", table(members, ["user", "username", "role", "devices", "ids"])]
    if detail["invitations"]:
        invited = [
            (
                i["user_id"],
                i["username"],
                when(i["invited_at"]),
                named(i["by_user_id"], i["by_username"]),
            )
            for i in detail["invitations"]
        ]
        lines += ["", "invitations:", table(invited, ["user", "username", "invited", "by"])]
    return "\n".join(lines)


def _member_id(detail: dict[str, Any], user: str) -> int:
    """USER on the command line: a user id, or a member's or invitee's username."""
    if user.isascii() and user.isdigit() and int(user) >= 1:
        return int(user)
    wanted = user.removeprefix("@").casefold()
    for person in detail["members"] + detail["invitations"]:
        if person["username"].casefold() == wanted:
            return int(person["user_id"])
    room = detail["room"]
    raise UsageError(
        f"no member or invitee named {user!r} in room {room['room_id']} ({room['name']}); "
        "give a user id"
    )


def run(args: argparse.Namespace, call: Call) -> tuple[Any, str]:
    if args.action == "list":
        params = {"limit": args.limit} | ({"after_id": args.after} if args.after else {})
        body = call("GET", "/v1/rooms", params=params)
        after = body["next_after_id"]
        return body, more(_rooms_table(body["rooms"]), after and f"--after {after}")
    detail = call("GET", f"/v1/rooms/{args.room_id}")
    if args.action == "show":
        return detail, _room_text(detail)
    room = f"room {args.room_id} ({detail['room']['name']})"
    if args.action == "delete":  # --yes was checked before connecting
        body = call("DELETE", f"/v1/rooms/{args.room_id}")
        return body, (
            f"deleted {room}; its {body['member_count']} member(s) were told "
            f"and its {body['invitation_count']} invitation(s) are gone"
        )
    user_id = _member_id(detail, args.user)
    path = f"/v1/rooms/{args.room_id}/members/{user_id}"
    if args.action == "set-role":
        body = call("PUT", f"{path}/role", json={"role": args.role})
        return body, f"{named(user_id, body['username'])} is now {body['role']} of {room}"
    body = call("DELETE", path)  # remove
    who = named(user_id, body["username"])
    if body["was"] == "invitation":
        return body, f"revoked the invitation of {who} to {room}"
    return body, f"removed {who} from {room}"
