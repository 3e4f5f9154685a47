"""Delivery rules: which envelopes a connection is sent, in what order, and
what an acknowledgement covers. Data and pure functions; no sockets, no loop.

Theory of operation
-------------------
Every device has one queue of envelopes, ordered by ``envelope_id``. Part of
it is durable (rows in the database) and part of it may not be yet: the
*tail*, envelopes the server accepted whose write has not committed. Ids are
handed out in the order envelopes are accepted; most of the tail follows the
rows, but an envelope kept in memory while it waits for its ack may have
rows after it, so a read's rows and the tail are merged by id.

Each connection of a device follows that queue with a :class:`Delivery`, a
cursor and a window. It is in one of three phases:

``WAITING``
    No session yet (or a session that must still enroll in a second factor):
    nothing is delivered. :meth:`Delivery.start` is called once the reply that
    starts the session has been queued, so that reply always comes before the
    first ``deliver`` (*session before first deliver*).
``BEHIND``
    The connection has not been handed everything up to the end of its
    queue. The I/O layer reads rows after the cursor (:meth:`Delivery.read_limit`
    says how many) and hands them in with :meth:`Delivery.read_done`, together
    with the tail as it is at that moment. If the rows reached the end of the
    table and the tail fits the window, the connection is caught up: ``LIVE``.
``LIVE``
    Caught up. Each envelope accepted from now on is offered to it at once
    (:meth:`Delivery.offer`), before its write commits. When the window is
    full, an offer is declined and the connection falls ``BEHIND``: what it
    declined will be read from the table (or the tail) once the window opens.

Some envelopes are *held*: they may not be handed out before they commit (a
receipt that says an envelope was deleted must not arrive before the delete
is durable). A connection that reaches a held envelope, by an offer or at
the end of a read, stops there (``blocked``) and is resumed with the rest of
the queue once it commits (:meth:`Delivery.resume`), so order is kept.

There is one path: the cursor only moves forward, and every envelope past it
reaches the connection either by an offer while ``LIVE`` or by a read while
``BEHIND``. The I/O layer keeps one promise for this to hold: a read's rows
and the tail it hands in describe the queue at one instant (the relay makes
reads through the writer's queue and hands the tail in from the read's
commit callback, see :mod:`chatd.relay.delivery`).

Invariants, each checked by ``tests/test_delivery.py``:

* **Order.** A connection is sent ids in strictly increasing order, across
  ``deliver`` frames too.
* **Window.** Envelopes handed to a connection and not yet acknowledged on it
  (``ready`` plus ``unacked``) never exceed the window.
* **Ack cut.** :meth:`Delivery.ack` covers only ids this connection was sent,
  up to ``up_to``: an ``up_to`` beyond them acknowledges nothing unseen, and
  an envelope handed over but not yet written to the socket is not covered.
* **Once per device.** A device's envelope is acknowledged once, whichever
  of its connections acks it first (:class:`DeviceLedger`): one receipt, one
  delete.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Container, Iterable, Sequence
from typing import Final, NamedTuple

from chatd.protocol.frames import Envelope

DELIVERY_WINDOW: Final = 1_000  # envelopes handed to a connection and not yet acknowledged
#: ...and about this many bytes of their ciphertext (one envelope may pass it):
#: what a connection that does not read can make the server hold for it.
DELIVERY_WINDOW_BYTES: Final = 1_048_576
DELIVER_BATCH: Final = 100  # envelopes per deliver frame, at most...
DELIVER_BYTES: Final = 256 * 1024  # ...and about this many bytes of ciphertext
READ_BATCH: Final = DELIVER_BATCH  # rows one read of the table asks for, at most


class Phase(enum.Enum):
    WAITING = "waiting"  # no session (or a restricted one): nothing is delivered
    BEHIND = "behind"  # the table must be read from the cursor
    LIVE = "live"  # caught up: new envelopes are offered as they are accepted


class Sent(NamedTuple):
    """What the server remembers of an envelope a connection was sent: enough to
    acknowledge it (a receipt for a message, the bytes it freed), not its text."""

    kind: str
    message_id: str
    sender_device_id: str | None
    size: int  # bytes of ciphertext
    room_id: int | None = None  # a room message or event: its room


def sent_record(envelope: Envelope) -> Sent:
    text = envelope.ciphertext
    size = (len(text) if text.isascii() else len(text.encode())) if text else 0
    return Sent(
        envelope.kind, envelope.message_id, envelope.sender_device_id, size, envelope.room_id
    )


class Delivery:
    """One connection's position in its device's queue."""

    __slots__ = (
        "window",
        "window_bytes",
        "phase",
        "cursor",
        "ready",
        "unacked",
        "unacked_sizes",
        "handed_bytes",
        "reading",
        "blocked",
    )

    def __init__(
        self, window: int = DELIVERY_WINDOW, window_bytes: int = DELIVERY_WINDOW_BYTES
    ) -> None:
        self.window = window
        self.window_bytes = window_bytes
        self.phase = Phase.WAITING
        self.cursor = 0  # the highest envelope id handed to this connection
        self.ready: list[Envelope] = []  # handed over, not yet written to the socket
        self.unacked: list[int] = []  # written, not yet acknowledged here (ascending)
        self.unacked_sizes: list[int] = []  # their ciphertext bytes, in the same order
        self.handed_bytes = 0  # ciphertext bytes of ready and unacked together
        self.reading = False  # a read of the table is in flight
        self.blocked = False  # stopped at a held envelope: waits for resume()

    @property
    def room(self) -> int:
        """How many more envelopes the window admits (none once its bytes are
        used up)."""
        if self.handed_bytes >= self.window_bytes:
            return 0
        return self.window - len(self.ready) - len(self.unacked)

    def _hand(self, envelope: Envelope) -> None:
        self.ready.append(envelope)
        self.handed_bytes += _size(envelope)
        self.cursor = envelope.envelope_id

    def start(self) -> None:
        """The session's reply is queued: delivery may begin (with a read)."""
        if self.phase is Phase.WAITING:
            self.phase = Phase.BEHIND

    def read_limit(self) -> int:
        """How many rows to read from the table now; 0 when no read is due
        (not behind, a read already in flight, or the window is full). The
        caller then makes the read and reports it with :meth:`read_done`."""
        if self.phase is not Phase.BEHIND or self.reading or self.blocked:
            return 0
        limit = min(self.room, READ_BATCH)
        if limit > 0:
            self.reading = True
        return limit

    def read_done(
        self,
        rows: Sequence[Envelope],
        *,
        through: int,
        complete: bool,
        tail: Iterable[Envelope],
        held: Container[int] = (),
    ) -> list[Envelope]:
        """A read after the cursor came back: ``rows`` (ascending, at most the
        limit asked for; rows already acknowledged are left out by the caller),
        ``through`` the highest id the read covered, ``complete`` whether it
        reached the end of the table, ``tail`` the envelopes accepted but not
        committed, as they are now, and ``held`` those of the tail that may not
        be handed out before their commit. Returns the envelopes handed over."""
        self.reading = False
        if self.phase is not Phase.BEHIND:
            return []
        before = len(self.ready)
        # Envelopes kept in memory may sit between the rows (an ack was
        # awaited for them while later ones were written): merge them in.
        between = [e for e in tail if self.cursor < e.envelope_id <= through]
        for envelope in sorted([*rows, *between], key=_id) if between else rows:
            envelope_id = envelope.envelope_id
            if envelope_id <= self.cursor:
                continue
            if envelope_id in held:
                self.blocked = True
                return self.ready[before:]
            if self.room <= 0:
                return self.ready[before:]  # the rest is read again from the cursor
            self._hand(envelope)
        self.cursor = max(self.cursor, through)
        if complete:
            self._follow(tail, held)
        return self.ready[before:]

    def resume(self, tail: Iterable[Envelope], held: Container[int] = ()) -> list[Envelope]:
        """The held envelope this connection stopped at was settled (committed,
        or dropped): go on through ``tail``, the queue from there on."""
        if not self.blocked:
            return []
        self.blocked = False
        before = len(self.ready)
        self._follow(tail, held)
        return self.ready[before:]

    def _follow(self, tail: Iterable[Envelope], held: Container[int]) -> None:
        """Hand over the tail past the cursor, up to a held envelope or a full
        window; all of it makes the connection ``LIVE``."""
        for envelope in tail:
            envelope_id = envelope.envelope_id
            if envelope_id <= self.cursor:
                continue
            if envelope_id in held:
                self.blocked = True
                return
            if self.room <= 0:
                return
            self._hand(envelope)
        self.phase = Phase.LIVE

    def offer(self, envelope: Envelope, *, held: bool = False) -> bool:
        """A newly accepted envelope of this device (offers come in id order).
        True if this connection takes it now. A full window sends it
        ``BEHIND``; so does a held envelope, which it then waits for."""
        if self.phase is not Phase.LIVE or envelope.envelope_id <= self.cursor:
            return False
        if held or self.room <= 0:
            self.phase = Phase.BEHIND
            self.blocked = held
            return False
        self._hand(envelope)
        return True

    def take_ready(self, outstanding: Container[int]) -> list[Envelope]:
        """The envelopes to write now, in order; from here on they count as sent.
        Those no longer ``outstanding`` (another connection of the device
        acknowledged them meanwhile) are left out."""
        taken = [e for e in self.ready if e.envelope_id in outstanding]
        if len(taken) < len(self.ready):
            left_out = (e for e in self.ready if e.envelope_id not in outstanding)
            self.handed_bytes -= sum(_size(e) for e in left_out)
        self.ready = []
        self.unacked.extend(e.envelope_id for e in taken)
        self.unacked_sizes.extend(_size(e) for e in taken)
        return taken

    def ack(self, up_to: int) -> list[int]:
        """The ids an ``ack up_to`` covers on this connection (the ack cut), which
        leave the window."""
        cut = bisect.bisect_right(self.unacked, up_to)
        acked = self.unacked[:cut]
        del self.unacked[:cut]
        self.handed_bytes -= sum(self.unacked_sizes[:cut])
        del self.unacked_sizes[:cut]
        return acked

    def held(self) -> list[int]:
        """Every id handed to this connection and not acknowledged on it."""
        return self.unacked + [e.envelope_id for e in self.ready]


class DeviceLedger:
    """What the connections of one device were handed and nobody acknowledged yet.

    An envelope enters when it is first handed to one of the device's
    connections and leaves when any of them acknowledges it (or it expires,
    or no connection holds it any more), so that two connections
    acknowledging the same envelope make one receipt and one delete between
    them, and a connection does not write what another one already had
    acknowledged (:meth:`Delivery.take_ready`).
    """

    __slots__ = ("outstanding",)

    def __init__(self) -> None:
        self.outstanding: dict[int, Sent] = {}

    def handed(self, envelopes: Iterable[Envelope]) -> None:
        for envelope in envelopes:
            if envelope.envelope_id not in self.outstanding:
                self.outstanding[envelope.envelope_id] = sent_record(envelope)

    def acknowledge(self, ids: Iterable[int]) -> list[tuple[int, Sent]]:
        """Of these ids (one connection's ack cut), the ones acknowledged for
        the first time, with what is needed to act on them."""
        first = []
        for envelope_id in ids:
            record = self.outstanding.pop(envelope_id, None)
            if record is not None:
                first.append((envelope_id, record))
        return first

    def forget(self, ids: Iterable[int], still_held: Iterable[Iterable[int]] = ()) -> None:
        """Drop these ids (a connection closed, or they expired), except those
        another connection of the device still holds."""
        keep: set[int] = set()
        for held in still_held:
            keep.update(held)
        for envelope_id in ids:
            if envelope_id not in keep:
                self.outstanding.pop(envelope_id, None)


_SILENT: Final[list[bytes]] = []  # an unfilled silent slot (identity, never mutated)


def _id(envelope: Envelope) -> int:
    return envelope.envelope_id


def _size(envelope: Envelope) -> int:
    """Ciphertext characters: its bytes for ASCII (base64), as the window counts them."""
    return len(envelope.ciphertext or "")


def deliver_batches(envelopes: list[Envelope]) -> list[list[Envelope]]:
    """Split envelopes (in queue order) into ``deliver`` frames: at most
    DELIVER_BATCH each, ending before the one that would take a frame's
    ciphertext over DELIVER_BYTES (but never empty)."""
    batches: list[list[Envelope]] = []
    batch: list[Envelope] = []
    size = 0
    for envelope in envelopes:
        grows = len(envelope.ciphertext or "")
        if batch and (len(batch) == DELIVER_BATCH or size + grows > DELIVER_BYTES):
            batches.append(batch)
            batch, size = [], 0
        batch.append(envelope)
        size += grows
    if batch:
        batches.append(batch)
    return batches


class Replies:
    """Answers to one connection's messages, kept in the order they came.

    Most answers are known at once (:meth:`answer`). A pipelined request (a
    ``send`` waiting for its commit, an ``ack`` waiting for its deletes) takes
    a slot with :meth:`reserve` and fills it later; answers behind an unfilled
    slot wait for it. A *silent* slot (an ``ack`` without ``id``) will hold no
    frame: it only keeps later answers behind its write, and does not count
    as a queued frame. :meth:`take` gives what can go out now, in order.
    """

    __slots__ = ("_slots", "_base", "waiting", "silent")

    def __init__(self) -> None:
        self._slots: list[list[bytes] | None] = []  # None: not filled yet
        self._base = 0  # how many slots were taken before the first one here
        self.waiting = 0  # reserved slots not filled yet
        self.silent = 0  # of those, the silent ones

    def __len__(self) -> int:
        """Answers waiting to be written, or to be known (silent slots aside)."""
        return len(self._slots) - self.silent

    def answer(self, frames: list[bytes]) -> None:
        self._slots.append(frames)

    def reserve(self, *, silent: bool = False) -> int:
        """A slot for an answer to come; returns its handle for :meth:`fill`
        (with no frames, for a silent one)."""
        self._slots.append(_SILENT if silent else None)
        self.waiting += 1
        self.silent += silent
        return len(self._slots) - 1 + self._base

    def fill(self, handle: int, frames: list[bytes]) -> None:
        index = handle - self._base
        if 0 <= index < len(self._slots):
            slot = self._slots[index]
            if slot is None or slot is _SILENT:
                self.silent -= slot is _SILENT
                self._slots[index] = frames
                self.waiting -= 1

    def take(self) -> list[bytes]:
        """The frames that may be written now: every answer up to the first
        slot still waiting."""
        out: list[bytes] = []
        n = 0
        for frames in self._slots:
            if frames is None or frames is _SILENT:
                break
            out.extend(frames)
            n += 1
        if n:
            del self._slots[:n]
            self._base += n
        return out
