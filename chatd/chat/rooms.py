"""Rooms in the terminal client: the room commands, the open room, and room lines.

:class:`RoomsView` is the rooms' part of :class:`chatd.chat.app.ChatApp`. It
owns what is about rooms: the open room (``current``), the names of the rooms
seen, and the count of messages that came to rooms while they were not open.
The app owns the rest (the people, the one-to-one conversation, the outbox)
and hands the view what it needs when it makes it (:class:`People`, and two
callables about the open conversation), so neither reaches into the other.

A ROOM typed in a command is ``#name``, ``name`` or the room's id (all
digits): names are looked up in ``list_rooms`` (your rooms first, then your
invitations, then the channels), case-insensitively; a name that two rooms
share must be given as an id.

Refusals of the server are said in the command's terms (:func:`refusal`):
"you are not a member of #x: /join x first", not a protocol code.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import trio

from chatd.client import Client, ClientError, Member
from chatd.client.room_delivery import RoomDelivery
from chatd.client.room_events import (
    RoomDeliveryChanged,
    RoomEventItem,
    RoomInvitation,
    RoomMessage,
    RoomUndecryptable,
    RoomUpdate,
)
from chatd.client.room_store import RoomInfo
from chatd.client.rooms import RoomList

from .commands import Command, Refused, UsageError
from .display import clean, clock, device_line, excerpt, save_hint, stamp
from .files import arrival_hint
from .room_display import (
    CANNOT_DECRYPT,
    HELD,
    delivery_notice,
    event_text,
    label,
    refusals,
    room_mark,
    room_message_lines,
    room_summary,
    undecryptable_text,
)

PAGE: Final = 20  # room messages per history page
MAX_NAME: Final = 64  # characters in a room name (the server's limit)
MAX_TOPIC: Final = 512  # characters in a topic (the server's limit)
MAX_WATCHED: Final = 100  # sent room messages whose delivery is followed live
ROLES: Final = ("owner", "moderator", "member")

ROOM_COMMANDS: Final = (
    Command("rooms", "/rooms", "your rooms, your invitations, and the channels you can join"),
    Command(
        "create",
        "/create <name> [--group] [--invite-only] [--topic <text>]",
        "make a channel (anyone may join) or a --group (by invitation); you own it",
    ),
    Command("room", "/room <room>", "open a room (#name or id): what you type goes there"),
    Command("join", "/join <room>", "join a channel, or a room you are invited to"),
    Command("invite", "/invite <username> [<room>]", "invite someone to the open room (or <room>)"),
    Command("members", "/members [<room>]", "the room's members, their roles and their devices"),
    Command("topic", "/topic [<text>]", "show the open room's topic, or set it (moderators)"),
    Command(
        "kick",
        "/kick <username> [<room>]",
        "remove someone from the room, or take back their invitation (moderators)",
    ),
    Command(
        "role",
        "/role <username> <role> [<room>]",
        "make someone owner, moderator or member of the room (owners)",
    ),
    Command(
        "leave", "/leave [<room>]", "leave the open room (or <room>), or decline an invitation"
    ),
)


@dataclass
class _Followed:
    """One of our room messages whose delivery is said as it grows."""

    quoted: str  # its text, as quoted in the lines about it
    shown: int = 0  # the "delivered to" count said last
    announced: bool = False  # "✓ sent" is out: changes may be said now


@dataclass(frozen=True)
class People:
    """What the view needs to know about people, from the app."""

    name_of: Callable[[int], str]  # a cleaned username, or user#ID
    find_member: Callable[[str], Awaitable[Member]]  # raises UsageError
    refresh: Callable[[], Awaitable[None]]  # fetch the directory again


class RoomsView:
    """The rooms of one running ``chat``."""

    def __init__(
        self,
        client: Client,
        say: Callable[[str], None],
        people: People,
        *,
        opened: Callable[[], None],
        idle: Callable[[], bool],
        bold: bool = False,
    ) -> None:
        self.client = client
        self.say = say
        self.people = people
        self._opened = opened  # a room was opened: the app closes its conversation
        self._idle = idle  # True when no conversation (nor room) is open
        self._bold = bold
        self.current: RoomInfo | None = None  # the open room
        self._names: dict[int, str] = {}
        self._unread: dict[int, int] = {}
        self._cursor = 0
        self._page = PAGE
        self._following: dict[str, _Followed] = {}  # our room messages, by message id

    # -- rooms and names ------------------------------------------------------

    async def start(self) -> None:
        """Learn the rooms' names; say if invitations are waiting."""
        listing = await self._list()
        if listing.invited:
            count = len(listing.invited)
            self.say(f"-- you have {count} room invitation(s): see /rooms --")

    async def _list(self) -> RoomList:
        listing = await self.client.rooms.list_rooms()
        for room in [*listing.joined, *listing.channels, *(i.room for i in listing.invited)]:
            self._names[room.room_id] = room.name
        return listing

    def room_name(self, room_id: int) -> str:
        """``#name`` (cleaned), or ``room 12`` if the name is not known."""
        name = self._names.get(room_id)
        return label(name) if name is not None else f"room {room_id}"

    async def _learn(self, room_id: int) -> None:
        if room_id in self._names:
            return
        with contextlib.suppress(ClientError, trio.TooSlowError):
            info = await self.client.rooms.room(room_id)
            if info is not None:
                self._names[room_id] = info.name

    async def find_room(self, typed: str) -> RoomInfo:
        """The room typed as ``#name``, ``name`` or id. Raises UsageError."""
        listing = await self._list()
        groups = (listing.joined, [i.room for i in listing.invited], listing.channels)
        key = typed.removeprefix("#")
        if key.isdigit():
            for group in groups:
                for room in group:
                    if room.room_id == int(key):
                        return room
            raise UsageError(f"you see no room with id {key} (see /rooms)")
        for group in groups:
            found = [r for r in group if r.name.casefold() == key.casefold()]
            if len(found) == 1:
                return found[0]
            if found:
                ids = ", ".join(str(r.room_id) for r in found)
                raise UsageError(f"{len(found)} rooms are called {label(key)}: use the id ({ids})")
        raise UsageError(f"you see no room called {label(key[:MAX_NAME])} (see /rooms)")

    async def _room_arg(self, args: list[str], at: int, usage: str) -> RoomInfo:
        """The room named by ``args[at]``, else the open room."""
        if len(args) > at + 1:
            raise UsageError(f"usage: {usage}")
        if len(args) == at + 1:
            return await self.find_room(args[at])
        if self.current is None:
            raise UsageError(f"no room is open: /room <room> first, or {usage}")
        return self.current

    def _name_or_you(self, user_id: int | None) -> str:
        if user_id is None:
            return "someone"
        return "you" if user_id == self.client.user_id else self.people.name_of(user_id)

    # -- commands -------------------------------------------------------------

    async def cmd_rooms(self, args: list[str]) -> None:
        listing = await self._list()
        if not (listing.joined or listing.invited or listing.channels):
            self.say("-- no rooms yet: /create <name> makes one --")
            return
        self.say(f"Your rooms ({len(listing.joined)}):")
        for room in listing.joined:
            new = self._unread.get(room.room_id, 0)
            mark = "  (open)" if self.current and self.current.room_id == room.room_id else ""
            self.say(f"  {room_summary(room)}" + (f"  [{new} new]" if new else "") + mark)
        if listing.invited:
            self.say(f"Invitations ({len(listing.invited)}): /join to accept, /leave to decline")
            for invitation in listing.invited:
                by = invitation.by_user_id
                who = f", from {self.people.name_of(by)}" if by is not None else ""
                self.say(f"  {room_summary(invitation.room)}{who}")
        if listing.channels:
            self.say(f"Channels you can join ({len(listing.channels)}):")
            for room in listing.channels:
                self.say(f"  {room_summary(room)}")

    async def cmd_create(self, args: list[str]) -> None:
        usage = "usage: /create <name> [--group] [--invite-only] [--topic <text>]"
        kind, invite_only, share_history, topic, name = "channel", False, False, "", None
        rest = list(args)
        while rest:
            word = rest.pop(0)
            if word == "--group":
                kind = "group"
            elif word == "--invite-only":
                invite_only = True
            elif word == "--share-history":
                share_history = True
            elif word == "--topic":
                topic, rest = " ".join(rest), []
                if not topic:
                    raise UsageError(f"{usage} (--topic needs the text after it)")
            elif word.startswith("--") or name is not None:
                raise UsageError(usage)
            else:
                name = word.removeprefix("#")
        if not name:
            raise UsageError(usage)
        if len(name) > MAX_NAME:
            raise UsageError(f"a room name has at most {MAX_NAME} characters")
        if name.isdigit():
            raise UsageError("a room name needs a letter (a number alone names a room by id)")
        if len(topic) > MAX_TOPIC:
            raise UsageError(f"a topic has at most {MAX_TOPIC} characters")
        room = await self.client.rooms.create(
            name, kind, topic=topic, invite_only=invite_only, share_history=share_history
        )
        self._names[room.room_id] = room.name
        what = "group" if kind == "group" else "channel"
        how = (
            "invite people with /invite <username>"
            if kind == "group" or invite_only
            else "anyone can /join it"
        )
        self.say(f"-- created the {what} {label(room.name)} (id {room.room_id}): {how} --")
        await self.open(room)

    async def cmd_room(self, args: list[str]) -> None:
        if len(args) != 1:
            raise UsageError("usage: /room <room> (#name or id, see /rooms)")
        room = await self.find_room(args[0])
        if room.role is None:
            raise UsageError(
                f"you are not a member of {label(room.name)}: /join {clean(room.name)} first"
            )
        await self.open(room)

    async def cmd_join(self, args: list[str]) -> None:
        if len(args) != 1:
            raise UsageError("usage: /join <room> (#name or id, see /rooms)")
        room = await self.find_room(args[0])
        if room.role is not None:
            self.say(f"-- you are already in {label(room.name)} --")
        else:
            with refusals(room):
                room = await self.client.rooms.join(room.room_id)
            self.say(f"-- you joined {label(room.name)} --")
        await self.open(room)

    async def cmd_invite(self, args: list[str]) -> None:
        usage = "/invite <username> [<room>]"
        if not args:
            raise UsageError(f"usage: {usage}")
        room = await self._room_arg(args, 1, usage)
        member = await self.people.find_member(args[0])
        with refusals(room):
            await self.client.rooms.invite(room.room_id, member.user_id)
        self.say(f"-- invited {clean(member.username)} to {label(room.name)} --")

    async def cmd_leave(self, args: list[str]) -> None:
        room = await self._room_arg(args, 0, "/leave [<room>]")
        with refusals(room):
            await self.client.rooms.leave(room.room_id)
        if room.role is None:
            self.say(f"-- declined the invitation to {label(room.name)} --")
        else:
            self.say(f"-- you left {label(room.name)} --")
        if self.current is not None and self.current.room_id == room.room_id:
            self.current = None

    async def cmd_members(self, args: list[str]) -> None:
        room = await self._room_arg(args, 0, "/members [<room>]")
        with refusals(room):
            members = await self.client.rooms.members(room.room_id)
        await self._known([m.user_id for m in members.members] + members.invited)
        self.say(f"{label(room.name)}: {len(members.members)} member(s)")
        for m in members.members:
            you = ", you" if m.user_id == self.client.user_id else ""
            self.say(f"{clean(m.username)} ({m.role}{you})")
            if not m.devices:
                self.say("    (no device yet)")
            for d in m.devices:
                self.say(device_line(d, self.client.device_id))
        if members.invited:
            names = ", ".join(self.people.name_of(u) for u in members.invited)
            self.say(f"invited: {names}")

    async def cmd_topic(self, args: list[str]) -> None:
        if self.current is None:
            raise UsageError("no room is open: /room <room> first")
        room = self.current
        if not args:
            info = await self.client.rooms.room(room.room_id) or room
            shown = clean(info.topic) if info.topic else "(none)"
            self.say(f"{label(room.name)} topic: {shown}")
            return
        topic = " ".join(args)
        if len(topic) > MAX_TOPIC:
            raise UsageError(f"a topic has at most {MAX_TOPIC} characters")
        with refusals(room, f"setting the topic of {label(room.name)} needs the moderator role"):
            await self.client.rooms.set_topic(room.room_id, topic)

    async def cmd_kick(self, args: list[str]) -> None:
        usage = "/kick <username> [<room>]"
        if not args:
            raise UsageError(f"usage: {usage}")
        room = await self._room_arg(args, 1, usage)
        member = await self.people.find_member(args[0])
        if member.user_id == self.client.user_id:
            raise UsageError("to leave a room, type /leave")
        needs = (
            f"removing someone from {label(room.name)} needs the moderator role"
            " (and the owner role for a moderator; nobody removes an owner)"
        )
        with refusals(room, needs):
            await self.client.rooms.remove(room.room_id, member.user_id)

    async def cmd_role(self, args: list[str]) -> None:
        usage = "/role <username> <owner|moderator|member> [<room>]"
        if len(args) < 2 or args[1].lower() not in ROLES:
            raise UsageError(f"usage: {usage}")
        room = await self._room_arg(args, 2, usage)
        member = await self.people.find_member(args[0])
        needs = f"changing roles in {label(room.name)} needs the owner role"
        with refusals(room, needs):
            await self.client.rooms.set_role(room.room_id, member.user_id, args[1].lower())

    # -- the open room --------------------------------------------------------

    async def open(self, room: RoomInfo) -> None:
        """Make ``room`` the open conversation and show its last messages."""
        self.current = room
        self._names[room.room_id] = room.name
        self._unread.pop(room.room_id, None)
        self._opened()
        self._page = PAGE
        about = f" — topic: {clean(room.topic)}" if room.topic else ""
        self.say(f"-- room {label(room.name)}{about} (what you type goes there) --")
        entries = await self.client.rooms.history(room.room_id)
        self._cursor = len(entries)
        if not entries:
            self.say("-- no messages yet: type a line to send it --")
        else:
            await self._show_page(self._cursor - PAGE, self._cursor)

    async def history(self, count: int) -> None:
        room = self._need_current()
        self._page = count
        entries = await self.client.rooms.history(room.room_id)
        self._cursor = len(entries)
        if not entries:
            self.say(f"-- no messages in {label(room.name)} yet --")
            return
        await self._show_page(self._cursor - count, self._cursor)

    async def more(self) -> None:
        self._need_current()
        if self._cursor <= 0:
            self.say("-- no older messages --")
            return
        await self._show_page(self._cursor - self._page, self._cursor)

    def _need_current(self) -> RoomInfo:
        if self.current is None:
            raise UsageError("no room is open: /room <room> first")
        return self.current

    async def _show_page(self, start: int, end: int) -> None:
        room = self._need_current()
        entries = await self.client.rooms.history(room.room_id)
        start, end = max(0, start), min(end, len(entries))
        more = " (/more for older)" if start > 0 else ""
        self.say(f"-- {label(room.name)}: messages {start + 1}–{end} of {len(entries)}{more} --")
        await self._known([e.sender_user_id for e in entries[start:end]])
        me = self.people.name_of(self.client.user_id)
        for number, entry in enumerate(entries[start:end], start + 1):
            suffix = save_hint(number) if entry.attachment is not None else ""
            if entry.direction == "out":
                delivery = await self.client.rooms.delivery(entry.message_id)
                suffix += "  " + room_mark(entry.state, delivery)
            text = entry.text
            if text is None:
                suffix = ""
                text = CANNOT_DECRYPT if entry.state == "undecryptable" else HELD
            prefix = f"{stamp(entry.sent_at)} {self.people.name_of(entry.sender_user_id)}: "
            mentioned = entry.direction == "in" and self.client.user_id in entry.mentions
            for line in room_message_lines(
                prefix, text, suffix, mentioned=mentioned, me=me, bold=self._bold
            ):
                self.say(line)
        self._cursor = start

    async def _known(self, user_ids: list[int]) -> None:
        """Fetch the directory once if one of ``user_ids`` has no name yet."""
        if any(self.people.name_of(u) == f"user#{u}" for u in user_ids):
            with contextlib.suppress(ClientError, trio.TooSlowError):
                await self.people.refresh()

    # -- sending --------------------------------------------------------------

    async def send(self, room: RoomInfo, text: str) -> None:
        """Send ``text`` to ``room`` and say so; follow its delivery (the
        RoomDeliveryChanged events :meth:`show` gets). Never raises
        ClientError: a failure is said as ``! not sent``."""
        try:
            with refusals(room):
                message_id = await self.client.rooms.send(room.room_id, text)
        except Refused as exc:
            self.say(f"! not sent {excerpt(text)}: {exc}")
            return
        except (ClientError, trio.TooSlowError) as exc:
            reason = (
                "the server did not answer in time (is the connection down?)"
                if isinstance(exc, trio.TooSlowError)
                else clean(str(exc))
            )
            self.say(f"! not sent {excerpt(text)}: {reason}")
            return
        # Followed from now: a change that comes while the line below is not
        # printed yet is read again after it.
        followed = _Followed(excerpt(text))
        if len(self._following) < MAX_WATCHED:
            self._following[message_id] = followed
        delivery = await self._delivery(message_id)
        if delivery is not None and not delivery.members:
            self._following.pop(message_id, None)
            self.say(f"✓ sent {excerpt(text)} (nobody else is in {label(room.name)} yet)")
            return
        self.say(f"✓ sent {excerpt(text)}")
        followed.announced = True
        delivery = await self._delivery(message_id)
        if delivery is not None:
            self._progress(message_id, delivery)

    async def _delivery(self, message_id: str) -> RoomDelivery | None:
        with contextlib.suppress(ClientError):
            return await self.client.rooms.delivery(message_id)
        return None

    def _progress(self, message_id: str, delivery: RoomDelivery) -> None:
        """Say how many members have a followed message, as the count grows,
        until all have it or it expired."""
        followed = self._following.get(message_id)
        if followed is None or not followed.announced:
            return  # not followed, or send() reads it again once "✓ sent" is out
        if delivery.state == "expired":
            self.say(delivery_notice(delivery, "expired", followed.quoted))
        elif delivery.delivered > followed.shown:
            followed.shown = delivery.delivered
            self.say(delivery_notice(delivery, delivery.state, followed.quoted))
        if delivery.final:
            del self._following[message_id]

    # -- what arrives ---------------------------------------------------------

    async def show(self, item: RoomEventItem) -> None:
        """Print one room message, notice, event or invitation. Never raises
        ClientError."""
        if isinstance(item, RoomInvitation):
            self._names[item.room.room_id] = item.room.name
            who = self._name_or_you(item.by_user_id)
            kind = "group" if item.room.kind == "group" else "channel"
            name = clean(item.room.name)
            self.say(
                f"-- {who} invited you to the {kind} {label(item.room.name)}:"
                f" /join {name} to accept, /leave {name} to decline --"
            )
            return
        if isinstance(item, RoomDeliveryChanged):
            self._progress(item.message_id, item.delivery)
            return
        await self._learn(item.room_id)
        room = self.room_name(item.room_id)
        if isinstance(item, RoomUpdate):
            await self._event(item, room)
            return
        await self._known([item.sender_user_id])
        sender = self.people.name_of(item.sender_user_id)
        prefix = f"{clock(item.sent_at)} {room} {sender}: "
        if isinstance(item, RoomUndecryptable):
            self.say(prefix + undecryptable_text(item.cause))
        else:
            hint = ""
            if item.attachment is not None:
                here = self._idle() or (
                    self.current is not None and self.current.room_id == item.room_id
                )
                hint = await arrival_hint(
                    self.client,
                    item.message_id,
                    peer_user_id=None,
                    room_id=item.room_id,
                    open_first=""
                    if here
                    else f"/room {room if room.startswith('#') else item.room_id}",
                )
            self._message(item, prefix, hint)
        await self._arrived(item.room_id, room)

    def _message(self, item: RoomMessage, prefix: str, hint: str = "") -> None:
        suffix = hint + ("" if item.sender_verified else " (unverified device)")
        if item.late:
            suffix += " (its key came late)"
        me = self.people.name_of(self.client.user_id)
        mentioned = not item.outgoing and self.client.user_id in item.mentions
        for line in room_message_lines(
            prefix, item.text, suffix, mentioned=mentioned, me=me, bold=self._bold
        ):
            self.say(line)

    async def _arrived(self, room_id: int, room: str) -> None:
        """Count it as new, or open its room if nothing is open."""
        if self.current is not None and self.current.room_id == room_id:
            return
        info = None
        if self._idle():
            with contextlib.suppress(ClientError, trio.TooSlowError):
                info = await self.client.rooms.room(room_id)
        if info is not None:
            self.current = info
            self._opened()
            self.say(f"-- {room} is open (what you type goes there) --")
            return
        self._unread[room_id] = self._unread.get(room_id, 0) + 1

    async def _event(self, update: RoomUpdate, room: str) -> None:
        await self._known([u for u in (update.user_id, update.by_user_id) if u is not None])
        self.say(f"{clock(update.sent_at)} {room} * {event_text(update, self._name_or_you)}")
        gone = update.type == "deleted" or (
            update.type in ("left", "removed") and update.user_id == self.client.user_id
        )
        if gone and self.current is not None and self.current.room_id == update.room_id:
            self.current = None
            self.say(f"-- {room} is closed: you are no longer in it --")
        elif (
            update.type == "topic"
            and self.current is not None
            and self.current.room_id == update.room_id
        ):
            self.current = dataclasses.replace(self.current, topic=update.topic or "")
