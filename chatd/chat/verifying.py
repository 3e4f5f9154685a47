"""Emoji (SAS) verification at the terminal, one at a time.

A person starts a verification with ``/sas <username> <device>``, or answers
another device's request with ``/accept``. When nobody is in the middle, both
screens then show the same seven emoji (and three numbers); the person
compares them with the other screen and types ``/yes`` or ``/no``.

The input loop never waits on the other device, so chat messages can still be
typed meanwhile. Each verification is followed by one task in the app's
nursery (:meth:`SasVerifier._follow`): it prints the emoji once both SAS keys
are exchanged, and the outcome once there is one. The commands only act
(accept, confirm, cancel) and return; whatever ends a verification, from
either side, is reported by that task alone.

A terminal runs one verification at a time: ``/sas`` says so, and a request
from another device meanwhile is declined with the ``busy`` code (the person
is told). The client library's own limits (16 at once, a 10-minute deadline)
apply as well.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

import trio

from chatd.client import Client, ClientError, Verification, VerificationError

from .display import clean, sas_lines, verification_ended

CANCEL_GRACE: Final = 5.0  # seconds leaving chat waits to tell the other device

Say = Callable[[str], None]
#: ``bob's device ABC ("phone")`` for a (user id, device id), cleaned.
Describe = Callable[[int, str], Awaitable[str]]


@dataclass(eq=False)
class _Current:
    """The verification in progress and how far the person got."""

    verification: Verification
    who: str  # the other device, as Describe shows it
    accepted: trio.Event = field(default_factory=trio.Event)  # incoming: /accept typed
    shown: bool = False  # the emoji are on the screen
    answered: bool = False  # /yes typed

    def next_step(self) -> str:
        if self.verification.incoming and not self.accepted.is_set():
            return "/accept to compare emoji, /no to decline"
        if not self.shown:
            return "waiting for the other device; /no cancels"
        if not self.answered:
            return "/yes if the emoji match the other screen, /no if not"
        return "waiting for the other device to confirm; /no cancels"


class SasVerifier:
    """The emoji verification of one terminal and the commands that drive it."""

    def __init__(self, client: Client, say: Say, describe: Describe) -> None:
        self.client = client
        self.say = say
        self._describe = describe
        self._current: _Current | None = None
        self._starting = False  # /sas is waiting for verify_start to be sent

    @property
    def busy(self) -> bool:
        return self._current is not None or self._starting

    async def start(self, nursery: trio.Nursery, user_id: int, device_id: str) -> None:
        """``/sas``: ask another device to verify; a task in ``nursery`` follows
        it. Raises ClientError if the request cannot be sent."""
        if self._refused_while_busy():
            return
        self._starting = True
        try:
            who = await self._describe(user_id, device_id)
            verification = await self.client.start_verification(user_id, device_id)
        finally:
            self._starting = False
        current = _Current(verification, who)
        self._current = current
        self.say(f"-- asked {who} to verify: they type /accept there; /no cancels --")
        nursery.start_soon(self._follow, current)

    async def serve_requests(self, nursery: trio.Nursery) -> None:
        """Take other devices' requests as they arrive: announce one, decline
        those that come while one is in progress. Runs until cancelled."""
        async for verification in self.client.verification_requests():
            who = await self._describe(verification.user_id, verification.device_id)
            if self.busy:
                busy_with = f" {self._current.who}" if self._current else " another device"
                self.say(
                    f"! {who} asked to verify with you; declined, as you are verifying{busy_with}"
                )
                await verification.cancel(
                    "busy with another verification; try again in a moment", code="busy"
                )
                continue
            current = _Current(verification, who)
            self._current = current
            self.say(f"{who} wants to verify with you: {current.next_step()}")
            nursery.start_soon(self._follow, current)

    async def accept(self) -> None:
        """``/accept``: go ahead with the request shown last."""
        current = self._current
        if current is None:
            self.say("! no verification request is waiting")
        elif not current.verification.incoming or current.accepted.is_set():
            self.say(f"! not now: {current.next_step()}")
        else:
            current.accepted.set()  # _follow sends the acceptance

    async def confirm(self) -> None:
        """``/yes``: the emoji are the same on both screens."""
        current = self._current
        if current is None:
            self.say("! no verification is in progress (to start one: /sas <username> <device>)")
            return
        if not current.shown or current.answered:
            self.say(f"! not now: {current.next_step()}")
            return
        current.answered = True
        self.say(f"-- you said they match; waiting for {current.who} to confirm too --")
        # If it cannot be sent, the verification is cancelled and _follow says why.
        with contextlib.suppress(ClientError, trio.TooSlowError):
            await current.verification.confirm()

    async def refuse(self) -> None:
        """``/no``: the emoji differ, or decline or cancel the verification."""
        current = self._current
        if current is None:
            self.say("! no verification is in progress")
            return
        verification = current.verification
        if current.shown and not current.answered:
            await verification.cancel("the emoji differ", code="mismatched_sas")
        elif verification.incoming and not current.accepted.is_set():
            await verification.cancel("declined", code="user")
        else:
            await verification.cancel("cancelled", code="user")

    async def close(self) -> None:
        """Leaving chat: tell the other device, waiting at most CANCEL_GRACE."""
        if self._current is not None:
            with trio.move_on_after(CANCEL_GRACE):
                await self._current.verification.cancel("they left chat", code="user")

    # -- internals ------------------------------------------------------------

    def _refused_while_busy(self) -> bool:
        if self._current is not None:
            self.say(
                f"! you are verifying {self._current.who}; finish that first:"
                f" {self._current.next_step()}"
            )
            return True
        if self._starting:
            self.say("! a verification is being started; wait for it")
            return True
        return False

    async def _follow(self, current: _Current) -> None:
        """Print the emoji, then the outcome, of one verification."""
        verification = current.verification
        try:
            if verification.incoming:
                await _wait_accepted(current)
            sas = await verification.sas()
            current.shown = True
            self.say(f"-- compare with {current.who}: the same emoji, in the same order? --")
            for line in sas_lines(sas):
                self.say(line)
            self.say("Do they match? Type /yes if they are the same on both screens, /no if not.")
            await verification.done()
        except VerificationError as exc:
            self.say(verification_ended(current.who, exc))
        except (ClientError, trio.TooSlowError) as exc:
            reason = "the server did not answer" if isinstance(exc, trio.TooSlowError) else str(exc)
            self.say(
                f"! verification with {current.who} failed: {clean(reason)}. It is NOT verified."
            )
        else:
            self.say(f"✓ {current.who} is now verified (the emoji matched).")
        finally:
            if self._current is current:
                self._current = None


async def _wait_accepted(current: _Current) -> None:
    """Wait for /accept. Raises VerificationError if the request ends first:
    the other device cancels it, it is declined, or it times out."""
    ended: list[VerificationError] = []
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            try:
                await current.verification.done()  # cannot finish before the acceptance
            except VerificationError as exc:
                ended.append(exc)
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        await current.accepted.wait()
        nursery.cancel_scope.cancel()
    if ended:
        raise ended[0]
