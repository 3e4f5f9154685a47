"""``chatd demo``, second part: a room conversation, and the room log on the server.

Theory of operation
-------------------
After the one-to-one part of :mod:`chatd.demo`, the same throwaway server
and the same client stores play a conversation in a channel:

5. alice creates the channel; bob and carol find it in ``list_rooms``, join
   it, and go offline;
6. alice sends room messages while both are offline: each is encrypted
   *once* with her Megolm session, whose key went first to bob's and carol's
   devices over Olm (ordinary envelopes). The server stores each room message
   once, in its room log, however many devices it is queued for;
7. in the same session alice sends a file to the channel (:mod:`chatd.demo_files`):
   the server stores its ciphertext only;
8. bob, then carol, come online, decrypt and acknowledge them; bob saves the
   file and checks it is alice's; bob replies;
9. alice comes back, reads the reply and sees her messages delivered to
   every member.

After each step the server's room log is shown: room messages as stored
(Megolm ciphertext, one row each, with the number of devices still waiting
for it) and room events (the server makes them, in clear: membership is
metadata the server has anyway). The room texts join the plaintext scan.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Final

from chatd.client import Client
from chatd.client.room_events import RoomMessage, RoomUndecryptable
from chatd.demo_files import FileScript
from chatd.inspection import RoomLogRow, ServerView

from .errors import ChatdError

if TYPE_CHECKING:  # pragma: no cover - the demo imports this module, not the reverse
    from .demo import _Demo

ROOM_NAME: Final = "launch"
ROOM_TOPIC: Final = "go-live on Thursday"
ROOM_MESSAGES: Final = (
    "Dry run tomorrow 9:30, room B",
    "Carol, can you present the budget?",
)
ROOM_REPLY: Final = "Carol said yes; slides by Wednesday"
ROOM_TEXTS: Final = (*ROOM_MESSAGES, ROOM_REPLY)  # for the plaintext scan
ROOM_MEMBERS: Final = ("bob", "carol")  # join alice's channel
ROOM_ROW_FIXED: Final = 28  # columns of a room log row besides its content


class RoomDemoError(ChatdError):
    """A room step saw something else than it should (a message it cannot decrypt)."""


def room_log_header(width: int) -> str:
    chars = max(10, width - ROOM_ROW_FIXED)
    title = "content, as stored"
    return f"{'id':>3} {'entry':<5} {'from':<6} {'devs':>4} {title:<{chars}} {'bytes':>5}"


def room_log_row(row: RoomLogRow, width: int) -> str:
    chars = max(10, width - ROOM_ROW_FIXED)
    if row.kind == "room_message" and row.ciphertext is not None:
        kind, shown, size = (
            "msg",
            row.ciphertext.decode("ascii", "replace"),
            str(len(row.ciphertext)),
        )
    else:
        kind, shown, size = "event", row.event or "", "-"
    shown = shown if len(shown) <= chars else shown[: chars - 1] + "…"
    return (
        f"{row.id:>3} {kind:<5} {row.sender or '-':<6} {row.waiting:>4} {shown:<{chars}} {size:>5}"
    )


async def next_room_messages(client: Client, count: int) -> list[RoomMessage]:
    """The next ``count`` room messages (room events in between are skipped).
    Raises RoomDemoError for one that cannot be decrypted."""
    got: list[RoomMessage] = []
    async for item in client.room_events():
        if isinstance(item, RoomUndecryptable):
            raise RoomDemoError(f"a room message from user {item.sender_user_id} was undecryptable")
        if isinstance(item, RoomMessage):
            got.append(item)
            if len(got) == count:
                break
    return got


class RoomScript:
    """Steps 5 to 9 of the demo, on the demo's server and client stores."""

    def __init__(self, demo: _Demo) -> None:
        self.demo = demo
        self.room_id = 0
        self.sent: list[str] = []  # alice's room message ids
        self.files = FileScript(demo)

    def room_lines(self, title: str, view: ServerView) -> list[str]:
        width = self.demo.screen.right
        lines = [
            f"rooms: #{name} ({kind}, {members} members)" for _, name, kind, members in view.rooms
        ]
        lines.append(f"room log: {title}")
        if view.room_log:
            lines.append(room_log_header(width))
            lines += [room_log_row(r, width) for r in view.room_log]
        return lines

    async def step_channel(self) -> None:
        """Steps 5, 6 and 7, in one session of alice's (the demo stays within the
        default login rate: 10 logins at once)."""
        screen = self.demo.screen
        screen.step(f"5. alice makes the channel #{ROOM_NAME}; bob and carol join it")
        async with self.demo.client("alice") as alice:
            room = await alice.rooms.create(ROOM_NAME, "channel", topic=ROOM_TOPIC)
            self.room_id = room.room_id
            left = [f"alice: creates #{ROOM_NAME} (name and topic are not end-to-end encrypted)"]
            for name in ROOM_MEMBERS:
                async with self.demo.client(name) as member:
                    listing = await member.rooms.list_rooms()
                    if not any(r.room_id == self.room_id for r in listing.channels):
                        raise RoomDemoError(f"{name} does not see #{ROOM_NAME} in list_rooms")
                    await member.rooms.join(self.room_id)
                left += [
                    f"{name}: finds #{ROOM_NAME} in the channel list, joins",
                    f"{name}: offline",
                ]
            view = await self.demo.server_view()
            screen.columns(left, self.room_lines("room events, made by the server", view))

            screen.step(f"6. alice writes to #{ROOM_NAME} while bob and carol are offline")
            left = ["alice: her Megolm key goes first to bob's and carol's devices, over Olm"]
            for text in ROOM_MESSAGES:
                self.sent.append(await alice.rooms.send(self.room_id, text))
                left.append(f"alice → #{ROOM_NAME}: {text}")
            delivery = await alice.rooms.delivery(self.sent[-1])
            devices = delivery.devices if delivery is not None else 0
            left.append(f"alice: each encrypted once, queued for {devices} devices")
            view = await self.demo.server_view()
            once = sum(1 for r in view.room_log if r.kind == "room_message")
            title = f"{once} messages stored once each (devs: still waiting)"
            right = self.room_lines(title, view)
            keys = [e for e in view.envelopes if e.ciphertext is not None]
            right.append(f"envelopes: {len(keys)} Olm messages carrying alice's room key")
            screen.columns(left, right)
            await self.files.step_alice_sends(alice, self.room_id, ROOM_NAME)

    async def step_members_read(self) -> None:
        self.demo.screen.step(
            "8. bob, then carol, come online: read, acknowledge; bob saves the file, replies"
        )
        left: list[str] = []
        for name in ROOM_MEMBERS:
            async with self.demo.client(name) as member:
                # alice's messages and her file; carol also gets bob's reply
                expected = len(ROOM_MESSAGES) + 1 + (1 if name == "carol" else 0)
                messages = await next_room_messages(member, expected)
                members = await member.rooms.members(self.room_id)
                names = {m.user_id: m.username for m in members.members}
                for message in messages:
                    who = names.get(message.sender_user_id, "?")
                    left.append(f"{name} reads {who} → #{ROOM_NAME}: {message.text}")
                    if name == "bob" and message.attachment is not None:
                        left += await self.files.bob_saves(member, message)
                if name == "bob":
                    await member.rooms.send(self.room_id, ROOM_REPLY)
                    left.append(f"bob → #{ROOM_NAME}: {ROOM_REPLY}")
                # A request after the acks: the server has handled them.
                await member.rooms.list_rooms()
            left.append(f"{name}: offline")
        view = await self.demo.server_view()
        title = "read ones deleted; bob's reply waits for alice"
        right = [*self.room_lines(title, view), self.files.retention_line()]
        self.demo.screen.columns(left, right)

    async def step_alice_reads(self) -> None:
        self.demo.screen.step("9. alice comes back: the reply, and her messages delivered")
        async with self.demo.client("alice") as alice:
            (reply,) = await next_room_messages(alice, 1)
            left = [f"alice reads bob → #{ROOM_NAME}: {reply.text}"]
            counts = set()
            for message_id in self.sent:
                await alice.wait_state(message_id, "delivered")
                delivery = await alice.rooms.delivery(message_id)
                if delivery is not None:
                    counts.add(f"{delivery.delivered} of {delivery.members}")
            shown = " / ".join(sorted(counts))
            left.append(f"alice: each of her room messages delivered to {shown} members ✓")
            await alice.rooms.list_rooms()
        view = await self.demo.server_view()
        self.demo.screen.columns(left, self.room_lines("alice acked the reply", view))

    def steps(self) -> Sequence[tuple[str, Callable[[], Awaitable[None]]]]:
        return (
            ("the channel", self.step_channel),
            ("bob's and carol's turn", self.step_members_read),
            ("alice's room turn", self.step_alice_reads),
        )
