"""Messages not sent yet: kept, and offered again once they can go.

A message to someone who has never logged in (so has no device to encrypt
to) stays in the history as ``sending`` (``… not sent yet`` in ``/history``).
:class:`WaitingMessages` asks the server to tell this connection when that
person comes online (``watch_presence``), and when they do
(:mod:`chatd.chat.activity` calls :meth:`WaitingMessages.on_online`) and
their device has published its keys, it says so and offers ``/resend``.
``/resend`` sends every message of the open conversation that is still
``sending``, under its own message id (so one that did reach the server
after all is not queued twice).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from chatd.client import Client, ClientError, Member

from .commands import Command, UsageError
from .display import clean, excerpt

KEYS_CHECKS: Final = 5  # directory checks after someone came online
KEYS_CHECK_EVERY: Final = 1.0  # seconds between them: their keys follow the login

WAITING_COMMANDS: Final = (
    Command(
        "resend",
        "/resend",
        "send the messages of this conversation that are marked not sent yet",
    ),
)

Say = Callable[[str], None]


class WaitingMessages:
    """Follows the people who have messages waiting for their first device."""

    def __init__(
        self,
        client: Client,
        say: Say,
        *,
        member: Callable[[int], Member | None],
        refresh_directory: Callable[[], Awaitable[None]],
        peer: Callable[[], Member | None],
    ) -> None:
        self.client = client
        self.say = say
        self._member = member
        self._refresh = refresh_directory
        self._peer = peer
        self._waiting: set[int] = set()  # user ids with a message kept for them

    async def kept(self, peer: Member, text: str) -> None:
        """``text`` was kept unsent for ``peer``, who has no device yet."""
        self.say(
            f"! not sent yet {excerpt(text)}: {clean(peer.username)} has no device yet"
            " (they must log in once). It is kept in /history; you will be told when"
            " it can go"
        )
        if peer.user_id in self._waiting:
            return
        self._waiting.add(peer.user_id)
        with contextlib.suppress(ClientError, trio.TooSlowError):
            await self.client.watch_presence([peer.user_id])  # to hear when they log in

    async def on_online(self, user_id: int) -> None:
        """``user_id`` came online: once their device's keys are in the
        directory, offer /resend for what waits for them."""
        if user_id not in self._waiting:
            return
        for attempt in range(KEYS_CHECKS):
            if attempt:
                await trio.sleep(KEYS_CHECK_EVERY)
            with contextlib.suppress(ClientError, trio.TooSlowError):
                await self._refresh()
            member = self._member(user_id)
            if member is not None and member.devices:
                self._waiting.discard(user_id)
                waiting = [
                    e
                    for e in await self.client.history(user_id)
                    if e.direction == "out" and e.state == "sending"
                ]
                self.say(
                    f"-- {clean(member.username)} has a device now: /open"
                    f" {clean(member.username)}, then /resend sends your {len(waiting)}"
                    " message(s) not sent yet --"
                )
                return

    async def cmd_resend(self, args: list[str]) -> None:
        peer = self._peer()
        if peer is None:
            raise UsageError("no conversation open: /open <username> first")
        waiting = [
            e
            for e in await self.client.history(peer.user_id)
            if e.direction == "out" and e.state == "sending" and e.text is not None
        ]
        if not waiting:
            self.say(f"-- nothing waits to be sent to {clean(peer.username)} --")
            return
        for entry in waiting:
            try:
                await self.client.resend(entry.message_id)
            except (ClientError, trio.TooSlowError) as exc:
                self.say(f"! not sent {excerpt(entry.text or '')}: {clean(str(exc))}")
                return
            self.say(f"✓ sent {excerpt(entry.text or '')}")
