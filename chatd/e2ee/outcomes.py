"""Outcomes of queue writes the caller does not wait on, and the typed
results of a send (see :mod:`chatd.e2ee.queues`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import trio

from chatd.errors import StoreError
from chatd.protocol import frames as f


class Outcome:
    """The outcome of a write the caller does not wait on: settled once, then
    its callbacks run on the event loop. For a send, ``remaining`` counts the
    envelopes not yet committed or acknowledged."""

    __slots__ = ("remaining", "error", "envelopes", "_callbacks", "_event")

    def __init__(self, remaining: int = 1, envelopes: int = 0) -> None:
        self.remaining = remaining
        self.envelopes = envelopes  # for a send: the count ``sent`` reports
        self.error: StoreError | None = None
        self._callbacks: list[Callable[[Outcome], None]] | None = None
        self._event: trio.Event | None = None

    @property
    def done(self) -> bool:
        return self.remaining <= 0 or self.error is not None

    def when_done(self, callback: Callable[[Outcome], None]) -> None:
        """Run ``callback(self)`` once settled (now, if it is)."""
        if self.done:
            callback(self)
        else:
            if self._callbacks is None:
                self._callbacks = []
            self._callbacks.append(callback)

    async def wait(self) -> None:
        """Wait until settled; raises the StoreError of a failed write."""
        if not self.done:
            self._event = self._event or trio.Event()
            await self._event.wait()
        else:
            await trio.lowlevel.checkpoint()
        if self.error is not None:
            raise self.error

    def settle(self, count: int = 1) -> None:
        if self.remaining <= 0 or self.error is not None:
            return
        self.remaining -= count
        if self.remaining <= 0:
            self._fire()

    def fail(self, error: StoreError) -> None:
        if not self.done:
            self.error = error
            self._fire()

    def _fire(self) -> None:
        callbacks, self._callbacks = self._callbacks, None
        for callback in callbacks or ():
            callback(self)
        if self._event is not None:
            self._event.set()


class SendOutcome(Outcome):
    """A send's outcome. Its row in ``sends`` (the record that answers a repeat
    of the same ``message_id`` after a restart) is written once the outcome
    settled with some envelope on disk: only then is every envelope durable
    or acknowledged, which is what answering ``sent`` to a repeat promises.
    A send whose envelopes were all acknowledged before any write leaves no
    row, and neither does one interrupted before it settled: a repeat of it
    after a restart is delivered again (at least once), never lost."""

    __slots__ = ("sender_device_id", "message_id", "created_at", "checked", "written")

    def __init__(self, sender_device_id: str, message_id: str, count: int, created_at: int) -> None:
        super().__init__(remaining=count, envelopes=count)
        self.sender_device_id = sender_device_id
        self.message_id = message_id
        self.created_at = created_at
        self.checked = False  # the writer looked for an earlier row (writer thread only)
        self.written = False  # an envelope of it committed (event loop only)


@dataclass(frozen=True, slots=True)
class Accepted:
    """The send is accepted; ``outcome`` settles once it is durable or delivered.
    ``skipped``: target devices left out because their queues are full."""

    outcome: Outcome
    skipped: tuple[f.DeviceRef, ...] = ()


@dataclass(frozen=True, slots=True)
class Repeated:
    """This device sent this ``message_id`` before: the first send's outcome
    (which may still be pending) answers this one too. Nothing new is queued."""

    outcome: Outcome


@dataclass(frozen=True, slots=True)
class Mismatch:
    """The send did not name exactly the current devices; nothing was queued."""

    frame: f.DeviceMismatch


@dataclass(frozen=True, slots=True)
class QueueFull:
    """A target device's queue is full; nothing was queued."""

    device_ids: list[str]


SendResult = Accepted | Repeated | Mismatch | QueueFull


class QueueStats:
    """What the queue service did since it started (logged when it stops)."""

    __slots__ = (
        "accepted",
        "cancelled",
        "written",
        "deleted",
        "room_accepted",
        "room_written",
        "room_deleted",
        "batches",
        "kept",
    )

    def __init__(self) -> None:
        self.accepted = 0  # envelopes accepted (messages and receipts)
        self.cancelled = 0  # envelopes and room entries acknowledged before any write
        self.written = 0  # envelopes inserted
        self.deleted = 0  # envelopes deleted (acknowledged or expired after their write)
        self.room_accepted = 0  # room log entries accepted (messages and events)
        self.room_written = 0  # room log entries inserted (each once, for all its devices)
        self.room_deleted = 0  # room log entries deleted once nobody waited for them
        self.batches = 0  # write jobs
        self.kept = 0  # hot entries a write job left for later (summed over jobs)

    def fields(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}
