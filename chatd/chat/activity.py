"""Live presence and typing in the open conversation, and unread counts.

:class:`ActivityView` takes what the server pushes about people
(:meth:`chatd.client.Client.activity`, never stored): presence changes of
watched users and typing notices (and the server asking again for consent,
shown by :func:`chatd.chat.consent.announce`). For the person whose conversation is open
it prints ``-- bob is online --``, ``-- bob went offline --`` and
``-- bob is typing… --`` (once per burst of notices: a notice lasts
TYPING_LASTS seconds unless repeated). A user coming online is also handed to
the messages waiting for their first device (:mod:`chatd.chat.waiting`).

It also counts the messages that arrive for a conversation that is not open
(shown in ``/who``, cleared by ``/open``), for this run only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from chatd.client import Client, ClientError, ConsentRequired, Member, PresenceChange

from .consent import announce
from .display import clean

TYPING_LASTS: Final = 10.0  # seconds a typing notice counts without a repeat

Say = Callable[[str], None]


class ActivityView:
    """Presence and typing of the open conversation's person; unread counts."""

    def __init__(
        self,
        client: Client,
        say: Say,
        *,
        peer: Callable[[], Member | None],
        on_online: Callable[[int], Awaitable[None]],
    ) -> None:
        self.client = client
        self.say = say
        self._peer = peer
        self._on_online = on_online
        self._typing_until: dict[int, float] = {}  # user id -> when the notice runs out
        self.unread: dict[int, int] = {}  # user id -> messages not seen in their conversation

    async def opened(self, peer: Member) -> None:
        """A conversation was opened: say whether the person is online now
        (the connection then watches them), and clear its unread count."""
        self.unread.pop(peer.user_id, None)
        if peer.user_id == self.client.user_id:
            return
        with contextlib.suppress(ClientError, trio.TooSlowError):
            online = peer.user_id in await self.client.watch_presence([peer.user_id])
            self.say(f"-- {clean(peer.username)} is {'online' if online else 'offline'} --")

    def received(self, user_id: int, *, seen: bool) -> None:
        """A message from ``user_id`` arrived; ``seen`` if their conversation is open."""
        self._typing_until.pop(user_id, None)  # they sent what they typed
        if not seen:
            self.unread[user_id] = self.unread.get(user_id, 0) + 1

    async def serve(self) -> None:
        """Print presence and typing for the open conversation, until cancelled."""
        async for item in self.client.activity():
            peer = self._peer()
            if isinstance(item, PresenceChange):
                for user_id in item.online:
                    if peer is not None and user_id == peer.user_id:
                        self.say(f"-- {clean(peer.username)} is online --")
                    await self._on_online(user_id)
                for user_id in item.offline:
                    self._typing_until.pop(user_id, None)
                    if peer is not None and user_id == peer.user_id:
                        self.say(f"-- {clean(peer.username)} went offline --")
                continue
            if isinstance(item, ConsentRequired):
                announce(self.say, item.documents)
                continue
            now = trio.current_time()
            if not item.active:
                self._typing_until.pop(item.user_id, None)
                continue
            fresh = self._typing_until.get(item.user_id, 0.0) < now
            self._typing_until[item.user_id] = now + TYPING_LASTS
            if fresh and peer is not None and item.user_id == peer.user_id:
                self.say(f"-- {clean(peer.username)} is typing… --")
