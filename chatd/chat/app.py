"""The running terminal client: commands, live messages and delivery marks.

:class:`ChatApp` runs on a logged-in :class:`chatd.client.Client`. Its
:meth:`~ChatApp.run` owns one nursery with these tasks:

* the **input loop** (in ``run`` itself): reads typed lines, runs commands,
  and puts plain text on the outbox;
* the **sender**: sends the outbox one message at a time, so messages leave in
  the order they were typed, and prints ``✓ sent``;
* one **delivery watcher** per sent message (at most ``MAX_WATCHED``): prints
  ``✓✓ delivered`` or ``✗ expired`` when the message reaches that state;
* the **incoming printer**: prints received messages as they arrive, marking
  those from unverified devices;
* the **room printer**: prints room messages, room events and invitations
  (see :mod:`chatd.chat.rooms`, which also has the room commands and follows
  the delivery of room messages);
* the **connection watcher**: says when the connection drops and comes back;
* the **verification requests** taker, and one follower for the emoji (SAS)
  verification in progress, if any (see :mod:`chatd.chat.verifying`).

The directory (who is on the server, their devices, ``/who``, ``/devices``,
``/fingerprint``, ``/verify``) is :mod:`chatd.chat.directory`.

Everything prints through one ``say`` callable, whole lines at a time; all
tasks share the one Trio thread, so lines never interleave.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Final

import trio

from chatd.client import (
    Client,
    ClientError,
    IdentityChangedError,
    Member,
    ReceivedMessage,
    SendError,
    ServerRefusedError,
)
from chatd.client.room_store import RoomInfo

from .account import ACCOUNT_COMMANDS, AccountCommands
from .activity import ActivityView
from .commands import Command, Refused, UsageError
from .consent import CONSENT_COMMANDS, ConsentCommands
from .directory import Directory
from .display import (
    clean,
    clock,
    excerpt,
    history_lines,
    message_lines,
)
from .files import FILE_COMMANDS, FileCommands, arrival_hint
from .rooms import ROOM_COMMANDS, People, RoomsView
from .terminal import LineReader
from .verifying import SasVerifier
from .waiting import WAITING_COMMANDS, WaitingMessages

PAGE: Final = 20  # messages per history page
MAX_PAGE: Final = 1000  # the largest /history N
OUTBOX: Final = 100  # typed messages waiting to be sent
MAX_WATCHED: Final = 100  # sent messages whose delivery is followed live
QUIT_GRACE: Final = 10.0  # seconds /quit waits for the outbox to be sent
CONNECTION_POLL: Final = 1.0  # seconds between connection state checks
LAST_CONVERSATION: Final = "chat.last_conversation"  # kept in the store: user:ID or room:ID

Say = Callable[[str], None]


COMMANDS: Final = (
    Command("help", "/help", "list the commands"),
    Command("who", "/who", "the people on the server, online or not, and their devices"),
    Command(
        "open",
        "/open <username>",
        "chat with someone: shows your last messages with them (/open #room opens a room)",
    ),
    Command("history", "/history [N]", f"the last N messages of this conversation ({PAGE})"),
    Command("more", "/more", "the page of older messages before the one shown last"),
    *WAITING_COMMANDS,
    *ROOM_COMMANDS,
    *FILE_COMMANDS,
    Command("devices", "/devices", "every device seen so far and whether you verified it"),
    Command("fingerprint", "/fingerprint", "this device's fingerprint, to read out to others"),
    Command(
        "verify",
        "/verify <username> <device> <fingerprint>",
        "mark a device verified: type the fingerprint its owner reads to you",
    ),
    Command(
        "sas",
        "/sas <username> <device>",
        "verify a device by comparing emoji with its screen (they /accept there)",
    ),
    Command("accept", "/accept", "go ahead with a verification another device asked for"),
    Command("yes", "/yes", "the emoji match the other screen: verify the device"),
    Command("no", "/no", "the emoji differ, or decline or cancel the verification"),
    *ACCOUNT_COMMANDS,
    *CONSENT_COMMANDS,
    Command("quit", "/quit", "leave; you stay logged in (Ctrl-D does the same)"),
)


class ChatApp:
    """The terminal client running on one logged-in device."""

    def __init__(
        self,
        client: Client,
        say: Say,
        *,
        username: str,
        device_name: str = "",
        bold: bool = False,
    ) -> None:
        self.client = client
        self.say = say
        self.username = username
        self.device_name = device_name
        self.peer: Member | None = None  # the open conversation
        self.directory = Directory(
            client, say, unread=lambda user_id: self.activity.unread.get(user_id, 0)
        )
        self._cursor = 0  # index in the conversation of the oldest message shown
        self._page = PAGE
        self._watched = 0
        self._outbox_send, self._outbox = trio.open_memory_channel[tuple[Member | RoomInfo, str]](
            OUTBOX
        )
        self._sender_done = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._sas = SasVerifier(client, say, self.directory.describe_device)
        self.account = AccountCommands(client, say)
        self.consent = ConsentCommands(client, say)
        self.waiting = WaitingMessages(
            client,
            say,
            member=self.directory.member,
            refresh_directory=self.directory.refresh,
            peer=lambda: self.peer,
        )
        self.activity = ActivityView(
            client, say, peer=lambda: self.peer, on_online=self.waiting.on_online
        )
        self.rooms = RoomsView(
            client,
            say,
            People(self.directory.name_of, self.directory.find_member, self.directory.refresh),
            opened=self._room_opened,
            idle=lambda: self.peer is None and self.rooms.current is None,
            bold=bold,
        )
        self.files = FileCommands(client, say, self._file_target, self._in_background)

    def _file_target(self) -> int | RoomInfo | None:
        if self.rooms.current is not None:
            return self.rooms.current
        return None if self.peer is None else self.peer.user_id

    # -- the app --------------------------------------------------------------

    async def run(self, lines: LineReader) -> None:
        """Run until /quit or end of input. Returns after the outbox is sent
        (or QUIT_GRACE passed). Errors of the client library that end the
        connection for good (a refused login after a reconnect) propagate."""
        device = self.client.device_id
        if self.device_name:
            device += f' ("{clean(self.device_name)}")'
        self.say(f"Logged in as {clean(self.username)} on device {device}.")
        self.say("Type /help for the commands, /open <username> to start chatting.")
        try:
            await self.directory.refresh()
        except (ClientError, trio.TooSlowError) as exc:
            self.say(f"! the directory could not be fetched: {_reason(exc)}; try /who")
        try:
            await self.rooms.start()
        except (ClientError, trio.TooSlowError) as exc:
            self.say(f"! the rooms could not be listed: {_reason(exc)}; try /rooms")
        self.account.lines = lines
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._show_incoming)
            nursery.start_soon(self._show_room_events)
            nursery.start_soon(self._send_outbox)
            nursery.start_soon(self._watch_connection)
            nursery.start_soon(self.activity.serve)
            await self._reopen_last()
            nursery.start_soon(self._sas.serve_requests, nursery)
            while True:
                line = await lines.readline()
                if line is None or not await self.handle(line):
                    break
            await self._sas.close()
            await self._finish_outbox()
            await self._remember_last()
            nursery.cancel_scope.cancel()
        self.say("Bye.")

    async def _reopen_last(self) -> None:
        """Open the conversation that was open when chat last ended."""
        with contextlib.suppress(ClientError, trio.TooSlowError, UsageError, Refused):
            kind, _, ident = (await self.client.app_value(LAST_CONVERSATION) or "").partition(":")
            user = kind == "user" and ident.isdigit()
            member = self.directory.member(int(ident)) if user else None
            if member is not None:
                await self._cmd_open([member.username])
            elif kind == "room" and ident.isdigit():
                await self.rooms.cmd_room([ident])

    async def _remember_last(self) -> None:
        room, peer = self.rooms.current, self.peer
        value = f"room:{room.room_id}" if room else f"user:{peer.user_id}" if peer else ""
        with contextlib.suppress(ClientError, trio.TooSlowError):
            await self.client.set_app_value(LAST_CONVERSATION, value)

    async def handle(self, line: str) -> bool:
        """Run one typed line; False when the app should stop."""
        if not line.strip():
            return True
        if line.startswith("/") and not line.startswith("//"):
            name, *args = line[1:].split() or [""]
            name = name.lower()
            if name == "quit":
                return False
            command = next((c for c in COMMANDS if c.name == name), None)
            if command is None:
                self.say(f"! unknown command /{clean(name)}; type /help for the list")
                return True
            attr = command.name.replace("-", "_")
            handler: Callable[[list[str]], Awaitable[None]] = (
                getattr(self, f"_cmd_{attr}", None)
                or getattr(self.directory, f"cmd_{attr}", None)
                or getattr(self.files, f"cmd_{attr}", None)
                or getattr(self.account, f"cmd_{attr}", None)
                or getattr(self.consent, f"cmd_{attr}", None)
                or getattr(self.waiting, f"cmd_{attr}", None)
                or getattr(self.rooms, f"cmd_{attr}")
            )
            await self._reporting(command.name, partial(handler, args))
            return not self.account.ended
        text = line[1:] if line.startswith("//") else line
        target: Member | RoomInfo | None = self.rooms.current or self.peer
        if target is None:
            self.say("! no conversation open: /open <username> first (see /who), or /room <room>")
            return True
        try:
            self._outbox_send.send_nowait((target, text))
        except trio.WouldBlock:
            self.say(f"! not sent {excerpt(text)}: {OUTBOX} messages are already waiting")
        return True

    async def _reporting(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run command ``name``; say what went wrong, in its terms."""
        try:
            await run()
        except UsageError as exc:
            self.say(f"! {exc}")
        except Refused as exc:
            self.say(f"! /{name} failed: {exc}")
        except IdentityChangedError as exc:
            self.say(f"!! WARNING: {clean(str(exc))}")
        except (ClientError, trio.TooSlowError) as exc:
            self.say(f"! /{name} failed: {_reason(exc)}")

    def _in_background(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Finish command ``name`` in its own task (an upload), so typing goes on."""
        if self._nursery is None:  # pragma: no cover - commands run inside run()
            raise RuntimeError("no nursery: the app is not running")
        self._nursery.start_soon(self._reporting, name, run)

    # -- commands -------------------------------------------------------------

    async def _cmd_help(self, args: list[str]) -> None:
        self.say("Commands:")
        width = max(len(c.usage) for c in COMMANDS)
        for c in COMMANDS:
            self.say(f"  {c.usage.ljust(width)}  {c.help}")
        self.say("Anything else you type is sent to the open conversation (// sends a /).")
        self.say("A <room> is #name, name, or the room's id (see /rooms).")
        self.say("Marks: ✓ sent to the server, ✓✓ delivered to a device of theirs, ✗ expired.")

    def _room_opened(self) -> None:
        self.peer = None

    async def _cmd_open(self, args: list[str]) -> None:
        if len(args) != 1:
            raise UsageError("usage: /open <username>")
        if args[0].startswith("#"):
            await self.rooms.cmd_room(args)
            return
        self.peer = await self.directory.find_member(args[0])
        self.rooms.current = None
        self._page = PAGE
        entries = await self.client.history(self.peer.user_id)
        self._cursor = len(entries)
        self.say(f"-- conversation with {clean(self.peer.username)} --")
        await self.activity.opened(self.peer)
        if not entries:
            self.say("-- no messages yet: type a line to send it --")
        else:
            await self._show_page(self.peer, self._cursor - PAGE, self._cursor)
        unverified = [
            d
            for d in await self.client.devices()
            if d.user_id == self.peer.user_id
            and d.current
            and not d.verified
            and d.device_id != self.client.device_id
        ]
        if unverified:
            ids = ", ".join(clean(d.device_id) for d in unverified)
            self.say(
                f"! {clean(self.peer.username)} has {len(unverified)} unverified device(s): {ids}."
                " Verify them with /sas (emoji) or /verify (fingerprint)"
            )

    async def _cmd_history(self, args: list[str]) -> None:
        count = PAGE
        if args:
            if len(args) != 1 or not args[0].isdigit() or not 1 <= int(args[0]) <= MAX_PAGE:
                raise UsageError(f"usage: /history [N], N from 1 to {MAX_PAGE}")
            count = int(args[0])
        if self.rooms.current is not None:
            await self.rooms.history(count)
            return
        peer = self._need_peer()
        self._page = count
        entries = await self.client.history(peer.user_id)
        self._cursor = len(entries)
        if not entries:
            self.say(f"-- no messages with {clean(peer.username)} yet --")
            return
        await self._show_page(peer, self._cursor - count, self._cursor)

    async def _cmd_more(self, args: list[str]) -> None:
        if self.rooms.current is not None:
            await self.rooms.more()
            return
        peer = self._need_peer()
        if self._cursor <= 0:
            self.say("-- no older messages --")
            return
        await self._show_page(peer, self._cursor - self._page, self._cursor)

    async def _show_page(self, peer: Member, start: int, end: int) -> None:
        """Print messages ``start`` to ``end`` (0-based, end excluded) of the
        conversation with ``peer`` and move the /more cursor to ``start``."""
        entries = await self.client.history(peer.user_id)
        start, end = max(0, start), min(end, len(entries))
        more = " (/more for older)" if start > 0 else ""
        self.say(
            f"-- {clean(peer.username)}: messages {start + 1}–{end} of {len(entries)}{more} --"
        )
        for number, entry in enumerate(entries[start:end], start + 1):
            for line in history_lines(entry, self.directory.name_of(entry.sender_user_id), number):
                self.say(line)
        self._cursor = start

    async def _cmd_sas(self, args: list[str]) -> None:
        if len(args) != 2:
            raise UsageError("usage: /sas <username> <device> (the device id is in /who)")
        if self._nursery is None:
            raise UsageError("/sas needs the chat to be running")
        member = await self.directory.find_member(args[0])
        device = await self.directory.device(member, args[1])
        if device is None:
            raise UsageError(f"{clean(member.username)} has no device {clean(args[1])} (see /who)")
        if (device.user_id, device.device_id) == (self.client.user_id, self.client.device_id):
            raise UsageError("that is this device: run /sas on another device to verify it")
        if not device.current:
            raise UsageError(f"device {clean(device.device_id)} was removed from the directory")
        await self._sas.start(self._nursery, device.user_id, device.device_id)

    async def _cmd_accept(self, args: list[str]) -> None:
        await self._sas.accept()

    async def _cmd_yes(self, args: list[str]) -> None:
        await self._sas.confirm()

    async def _cmd_no(self, args: list[str]) -> None:
        await self._sas.refuse()

    def _need_peer(self) -> Member:
        if self.peer is None:
            raise UsageError("no conversation open: /open <username> or /room <room> first")
        return self.peer

    # -- background tasks -----------------------------------------------------

    async def _send_outbox(self) -> None:
        """Send typed messages in order; start a delivery watcher for each."""
        try:
            async for target, text in self._outbox:
                if isinstance(target, RoomInfo):
                    await self.rooms.send(target, text)
                    continue
                peer = target
                try:
                    message_id = await self.client.send_text(peer.user_id, text)
                except SendError as exc:
                    # Kept in the history as "sending" either way.
                    try:
                        no_device = not await self.directory.has_devices(peer)
                    except (ClientError, trio.TooSlowError):
                        no_device = False
                    if no_device:
                        await self.waiting.kept(peer, text)
                    else:
                        self.say(f"! not sent {excerpt(text)}: {_reason(exc)}")
                    continue
                except (ClientError, trio.TooSlowError) as exc:
                    self.say(f"! not sent {excerpt(text)}: {_reason(exc)}")
                    continue
                self.say(f"✓ sent {excerpt(text)}")
                if (
                    peer.user_id != self.client.user_id
                    and self._watched < MAX_WATCHED
                    and self._nursery is not None
                ):
                    self._nursery.start_soon(self._watch_delivery, message_id, text)
        finally:
            self._sender_done.set()

    async def _finish_outbox(self) -> None:
        """Let the sender finish what was typed before /quit."""
        waiting = self._outbox.statistics().current_buffer_used
        self._outbox_send.close()
        if waiting:
            self.say(f"-- sending {waiting} message(s) before leaving --")
        with trio.move_on_after(QUIT_GRACE):
            await self._sender_done.wait()

    async def _watch_delivery(self, message_id: str, text: str) -> None:
        self._watched += 1
        reached: list[str] = []
        try:
            async with trio.open_nursery() as nursery:

                async def wait(state: str) -> None:
                    try:
                        await self.client.wait_state(message_id, state)
                        reached.append(state)
                    except ClientError:
                        pass  # the store failed; /history shows the state once it works
                    nursery.cancel_scope.cancel()

                nursery.start_soon(wait, "delivered")
                nursery.start_soon(wait, "expired")
        finally:
            self._watched -= 1
        if reached == ["delivered"]:
            self.say(f"✓✓ delivered {excerpt(text)}")
        elif reached:
            self.say(f"✗ expired, not delivered {excerpt(text)}: the server dropped it unread")

    async def _show_incoming(self) -> None:
        async for message in self.client.messages():
            await self._show_message(message)

    async def _show_room_events(self) -> None:
        async for item in self.client.room_events():
            await self.rooms.show(item)

    async def _show_message(self, message: ReceivedMessage) -> None:
        """Print a received message. Never raises ClientError: a message is
        shown even if the directory or the store cannot be read just now."""
        name_of, member = self.directory.name_of, self.directory.member
        if member(message.sender_user_id) is None or member(message.peer_user_id) is None:
            with contextlib.suppress(ClientError, trio.TooSlowError):
                await self.directory.refresh()
        sender = name_of(message.sender_user_id)
        if message.outgoing:
            prefix = f"{clock(message.sent_at)} {sender} → {name_of(message.peer_user_id)}: "
        else:
            prefix = f"{clock(message.sent_at)} {sender}: "
        idle = self.peer is None and self.rooms.current is None
        suffix = ""
        if message.attachment is not None:
            here = idle or (self.peer is not None and self.peer.user_id == message.peer_user_id)
            other = f"/open {name_of(message.peer_user_id)}"
            suffix = await arrival_hint(
                self.client,
                message.message_id,
                peer_user_id=message.peer_user_id,
                room_id=None,
                open_first="" if here else other,
            )
        suffix += "" if message.sender_verified else " (unverified device)"
        for line in message_lines(prefix, message.text, suffix):
            self.say(line)
        if not message.outgoing:
            peer = self.peer if self.rooms.current is None else None
            seen = idle or (peer is not None and peer.user_id == message.peer_user_id)
            self.activity.received(message.sender_user_id, seen=seen)
        peer_member = member(message.peer_user_id)
        if idle and peer_member is not None:
            self.peer = peer_member
            name = name_of(self.peer.user_id)
            self.say(f"-- conversation with {name} (what you type goes there) --")

    async def _watch_connection(self) -> None:
        """Say when the connection drops and when it is back. The library
        reconnects by itself; it has no drop event, so this polls."""
        connection = self.client.connection
        online = True
        while True:
            await trio.sleep(CONNECTION_POLL)
            if connection.connected != online:
                online = connection.connected
                if online:
                    self.say("✓ connected again")
                else:
                    self.say("! connection lost; reconnecting (what you type is sent once back)")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "the server did not answer in time (is the connection down?)"
    if isinstance(exc, ServerRefusedError) and exc.code == "rate_limited":
        return "the server says slow down; try again in a moment"
    return clean(str(exc))
