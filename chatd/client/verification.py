"""SAS device verification over the relay: the Trio side of :mod:`chatd.client.sas`.

Every verification payload is an Olm-encrypted message like any other: it is
sent with ``send`` to every current device of the other user (and to our own
other devices, as the relay requires), and carries ``to_device_id`` and
``transaction_id`` inside the ciphertext. Only the device named in
``to_device_id`` acts on it; the others record its message id (so a
re-delivery is skipped) and ignore it. The server sees ciphertext only.

:class:`Verifications` keeps the verifications in progress, at most
MAX_VERIFICATIONS, each keyed by (other user, other device, transaction id).
The client's inbound worker hands it each decrypted payload *after* the
envelope is stored and acknowledged; replies (``verify_key``, ``verify_done``,
``verify_cancel``) are sent from there. The application drives the rest
through :class:`Verification`: ``accept``, ``sas``, ``confirm``, ``cancel``,
``done``. One lock per verification keeps its outgoing payloads in order (a
``verify_done`` never overtakes our ``verify_mac``).

Every wait ends at the verification's deadline (VERIFICATION_TIMEOUT after it
began): then it is cancelled with ``timeout`` on both sides.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final

import trio

from .errors import ClientError, VerificationError
from .sas import KINDS, Party, SasExchange, ShortAuthString, valid_transaction_id

log = logging.getLogger(__name__)

VERIFICATION_TIMEOUT: Final = 600.0  # seconds from start to done, on each side
MAX_VERIFICATIONS: Final = 16  # in progress at once; more incoming ones are refused (busy)

#: Sends payload fields to one user's devices (and our own other devices).
SendControl = Callable[[int, dict[str, Any]], Awaitable[None]]
#: Stores the verified flag of the device ``Party`` names; raises
#: VerificationError if the store no longer has that key for it.
MarkVerified = Callable[[Party], Awaitable[None]]


class Verification:
    """One SAS verification with another device. Get one from
    ``Client.start_verification`` or ``Client.verification_requests()``.

    Typical use: ``await v.sas()`` (shows the emoji; for an incoming request
    this also accepts it), the person compares, then ``await v.confirm()`` and
    ``await v.done()``; or ``await v.cancel(...)`` if they differ. Every wait
    raises VerificationError when the verification is cancelled (by either
    side), a MAC does not match, or the deadline passes.
    """

    def __init__(self, exchange: SasExchange, send: SendControl, mark: MarkVerified) -> None:
        self._exchange = exchange
        self._send_fields = send
        self._mark = mark
        self._lock = trio.Lock()
        self._changed = trio.Event()
        self._sas_ready = False
        self.deadline = trio.current_time() + VERIFICATION_TIMEOUT

    @property
    def transaction_id(self) -> str:
        return self._exchange.transaction_id

    @property
    def user_id(self) -> int:
        """The other device's user."""
        return self._exchange.them.user_id

    @property
    def device_id(self) -> str:
        """The other device."""
        return self._exchange.them.device_id

    @property
    def incoming(self) -> bool:
        """True when the other device started it."""
        return not self._exchange.we_started

    @property
    def state(self) -> str:
        """``created``/``started`` or ``requested``/``accepted``, ``keys_exchanged``,
        ``confirmed``, ``done`` or ``cancelled``."""
        return self._exchange.state

    @property
    def error(self) -> VerificationError | None:
        """Why it was cancelled, once it was."""
        return self._exchange.error

    # -- for the application --------------------------------------------------

    async def accept(self) -> None:
        """Accept an incoming request (sends our SAS key). :meth:`sas` does it too."""
        async with self._lock:
            await self._send_or_cancel([self._step(self._exchange.accept)])

    async def sas(self) -> ShortAuthString:
        """Wait until both SAS keys are exchanged; return the emoji and numbers
        to compare. Accepts an incoming request first if it was not yet."""
        if self._exchange.state == "requested":
            await self.accept()
        await self._wait(lambda: self._sas_ready)
        sas = self._exchange.sas
        assert sas is not None  # noqa: S101 - _sas_ready is set after the keys are exchanged
        return sas

    async def confirm(self) -> None:
        """The person saw the same emoji (or numbers) on both devices: send our
        MAC. The other device is marked verified once its MAC has verified and
        it has confirmed ours (see :meth:`done`)."""
        await self.sas()
        async with self._lock:
            if self._exchange.state in ("confirmed", "done"):
                return
            await self._send_or_cancel(self._step(self._exchange.confirm))
            await self._finish_if_verified()
        self._notify()

    async def cancel(self, reason: str = "cancelled by the user", *, code: str = "user") -> None:
        """End the verification and tell the other device (best effort). Use
        ``code="mismatched_sas"`` when the emoji differ. Does nothing once it is
        done or cancelled."""
        async with self._lock:
            if self._exchange.state not in ("done", "cancelled"):
                await self._cancel(code, reason)

    async def done(self) -> None:
        """Wait until the other device is marked verified in the store. Raises
        VerificationError if it is cancelled instead (``code`` says why)."""
        await self._wait(lambda: self._exchange.state == "done")

    # -- for Verifications ----------------------------------------------------

    async def receive(self, kind: str, fields: dict[str, Any]) -> None:
        """Apply a payload from the other device and send what it calls for."""
        async with self._lock:
            if trio.current_time() > self.deadline:
                await self._cancel("timeout", "the verification took too long")
                return
            try:
                replies = self._exchange.receive(kind, fields)
            except VerificationError as exc:
                await self._cancel(exc.code, exc.reason)
                return
            try:
                await self._send_all(replies)
            except (ClientError, trio.TooSlowError) as exc:
                self._exchange.cancel("send_failed", f"could not reach the other device: {exc}")
                self._notify()
                return
            if self._exchange.state == "keys_exchanged":
                self._sas_ready = True  # (the starter's key went out before anyone confirms)
            await self._finish_if_verified()
        self._notify()

    async def start(self) -> None:
        async with self._lock:
            await self._send_or_cancel([self._step(self._exchange.start)])

    @property
    def finished(self) -> bool:
        return self._exchange.state in ("done", "cancelled") or trio.current_time() > self.deadline

    # -- internals ------------------------------------------------------------

    def _step(self, method: Callable[[], Any]) -> Any:
        try:
            return method()
        finally:
            self._notify()

    async def _send_all(self, payloads: list[dict[str, Any]]) -> None:
        for fields in payloads:
            await self._send_fields(
                self.user_id,
                {**fields, "transaction_id": self.transaction_id, "to_device_id": self.device_id},
            )

    async def _send_or_cancel(self, payloads: list[dict[str, Any]]) -> None:
        """Send for the application (call with the lock held): if a payload
        cannot be sent, the verification cannot go on; cancel it and raise."""
        try:
            await self._send_all(payloads)
        except (ClientError, trio.TooSlowError) as exc:
            await self._cancel("send_failed", f"could not reach the other device: {exc}")
            raise

    async def _cancel(self, code: str, reason: str) -> None:
        """Call with the lock held."""
        fields = self._exchange.cancel(code, reason)
        self._notify()
        try:
            await self._send_all([fields])
        except (ClientError, trio.TooSlowError) as exc:
            log.warning("client.verification_cancel_unsent", extra={"error": str(exc)})

    async def _finish_if_verified(self) -> None:
        """Call with the lock held."""
        if self._exchange.verified:
            try:
                await self._mark(self._exchange.them)
            except VerificationError as exc:
                await self._cancel(exc.code, exc.reason)
                return
            self._exchange.finish()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait(self, condition: Callable[[], bool]) -> None:
        with trio.move_on_at(self.deadline):
            while True:
                changed = self._changed
                if self._exchange.error is not None:
                    raise self._exchange.error
                if condition():
                    return
                await changed.wait()
        async with self._lock:
            await self._cancel("timeout", "the verification took too long")
        raise self._exchange.error or VerificationError("timeout", "")


class Verifications:
    """The verifications of one device: started here, or requested by others."""

    def __init__(self, us: Callable[[], Party], send: SendControl, mark: MarkVerified) -> None:
        self._us = us
        self._send = send
        self._mark = mark
        self._active: dict[tuple[int, str, str], Verification] = {}
        self._requests_send, self.requests = trio.open_memory_channel[Verification](
            MAX_VERIFICATIONS
        )

    async def start(self, them: Party) -> Verification:
        """Begin a verification with ``them``: sends ``verify_start``."""
        self._prune()
        if len(self._active) >= MAX_VERIFICATIONS:
            raise ClientError(f"{MAX_VERIFICATIONS} verifications are in progress; finish some")
        exchange = SasExchange(self._us(), them, str(uuid.uuid4()), we_started=True)
        verification = Verification(exchange, self._send, self._mark)
        self._active[(them.user_id, them.device_id, exchange.transaction_id)] = verification
        await verification.start()
        return verification

    async def handle(self, them: Party, to_user_id: int, fields: dict[str, Any]) -> None:
        """A decrypted verification payload from device ``them`` (already stored
        and acknowledged). Payloads for another device are ignored."""
        us = self._us()
        kind, transaction_id = fields.get("kind"), fields.get("transaction_id")
        if (to_user_id, fields.get("to_device_id")) != (us.user_id, us.device_id):
            return  # a copy for another device of ours, or of the recipient's
        if kind not in KINDS or not valid_transaction_id(transaction_id):
            log.info("client.verification_malformed", extra={"kind": str(kind)[:32]})
            return
        assert isinstance(kind, str) and isinstance(transaction_id, str)  # noqa: S101 - checked
        key = (them.user_id, them.device_id, transaction_id)
        verification = self._active.get(key)
        if verification is not None:
            await verification.receive(kind, fields)
        elif kind == "verify_start":
            await self._requested(them, transaction_id, fields)
        # anything else belongs to a verification we no longer have: ignore it

    async def _requested(self, them: Party, transaction_id: str, fields: dict[str, Any]) -> None:
        self._prune()
        exchange = SasExchange(
            self._us(),
            them,
            transaction_id,
            we_started=False,
            their_commitment=str(fields.get("commitment", "")),
        )
        verification = Verification(exchange, self._send, self._mark)
        if len(self._active) >= MAX_VERIFICATIONS:
            await verification.cancel("too many verifications in progress", code="busy")
            return
        try:
            self._requests_send.send_nowait(verification)
        except trio.WouldBlock:
            await verification.cancel("too many verification requests waiting", code="busy")
            return
        self._active[(them.user_id, them.device_id, transaction_id)] = verification

    def _prune(self) -> None:
        for key in [k for k, v in self._active.items() if v.finished]:
            del self._active[key]
