"""The room log: room messages and events, stored once, queued for many devices.

Theory of operation
-------------------
A room message (or a room event the server makes) is one *entry* of the
room log. It gets the next id of the one sequence envelopes use, so it has
one place in the queue of every device it is for, and one ``envelope_id``
for all of them. The database stores it once (``room_log``); which devices
it is for is not stored per entry but as *ranges*: a device gets the
entries of a room with ``from_id < id <= until_id`` of one of its
``room_devices`` rows (kept by :mod:`chatd.rooms.service` in step with
membership), except its own messages, and only those above its ``room_cursor``, the highest room
entry it acknowledged. So the bytes stored per room message do not grow
with the number of recipients.

In memory an accepted entry is one :class:`~chatd.e2ee.writes.RoomInsert`
shared by its targets: it joins each target's tail (one envelope object for
all of them), is offered to their live connections, and waits in the open
batch like an envelope. A message every target took at once is *hot*: it
waits up to the ack wait, and if every target acknowledges it in that time
it is never written. Otherwise it is written once. Events are always
written at once: a client learns of membership changes only from them, and
no sender would make one again after a crash. Acknowledging a written
entry advances the device's cursor (with the next group commit); once no
target waits for it any more, a guarded delete removes it (guarded: the
statement checks the ranges and cursors again, so an entry read back after
a restart, whose waiting devices are not counted in memory, is deleted only
when the last one is past it). The sender's ``sent`` waits, as for a direct
message, until every target acknowledged it or it is written.

Expiry works on the table: an expired entry is deleted and every device
still waiting for it yields an ``expired`` receipt for the sender device.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Final

import msgspec

from chatd.e2ee.outcomes import Outcome, QueueStats, SendOutcome
from chatd.e2ee.state import QueueState
from chatd.e2ee.writes import WAITED_FOR, Batch, Insert, QueueWriter, RoomInsert
from chatd.errors import StoreError
from chatd.protocol import frames as f
from chatd.protocol.delivery import Sent
from chatd.store import now_ms

#: A device's waiting room log entries per device: count and bytes (at start).
ROOM_TOTALS: Final = (
    "SELECT s.device_id, count(*), coalesce(sum(length(m.ciphertext)), 0)"
    " FROM room_devices s JOIN devices d ON d.id = s.device_id"
    " JOIN room_log m ON m.room_id = s.room_id AND m.id > max(s.from_id, d.room_cursor)"
    " AND (s.until_id IS NULL OR m.id <= s.until_id)"
    " AND m.sender_device_id IS NOT s.device_id GROUP BY s.device_id"
)
#: Expired entries, each with every device still waiting for it (or NULL).
_EXPIRED: Final = (
    "SELECT m.id, m.room_id, m.kind, m.message_id, m.sender_device_id,"
    " coalesce(length(m.ciphertext), 0), w.device_id"
    " FROM (SELECT id, room_id, kind, message_id, sender_device_id, ciphertext FROM room_log"
    "       WHERE expires_at < ? ORDER BY expires_at LIMIT ?) AS m"
    " LEFT JOIN (SELECT s.room_id, s.from_id, s.until_id, s.device_id, d.room_cursor"
    "            FROM room_devices s JOIN devices d ON d.id = s.device_id) AS w"
    " ON w.room_id = m.room_id AND w.from_id < m.id"
    " AND (w.until_id IS NULL OR m.id <= w.until_id) AND w.room_cursor < m.id"
    " AND m.sender_device_id IS NOT w.device_id"
)

ExpiredRow = tuple[int, int, str, str, "str | None", int, "str | None"]

#: Entries no device waits for any more (their targets were removed, or the
#: guarded delete of their last ack came before a restart's count).
_SWEEP_ENTRIES: Final = (
    "DELETE FROM room_log WHERE id IN (SELECT m.id FROM room_log m"  # noqa: S608 - constants
    f" WHERE NOT {WAITED_FOR} LIMIT ?) RETURNING id"
)
#: Closed ranges with nothing left in them for their device. Only ranges that
#: end below ``?1``, the lowest room entry id not yet written: an entry still
#: in memory may fall in a range that looks empty on disk.
_SWEEP_RANGES: Final = (
    "DELETE FROM room_devices WHERE (device_id, room_id, from_id) IN ("
    " SELECT s.device_id, s.room_id, s.from_id FROM room_devices s"
    " JOIN devices d ON d.id = s.device_id WHERE s.until_id IS NOT NULL AND s.until_id < ?1"
    " AND NOT EXISTS (SELECT 1 FROM room_log m WHERE m.room_id = s.room_id"
    " AND m.id > max(s.from_id, d.room_cursor) AND m.id <= s.until_id"
    " AND m.sender_device_id IS NOT s.device_id) LIMIT ?2)"
)


class RoomLog:
    """Room log entries in the queues (see the module docstring). Made and
    driven by :class:`~chatd.e2ee.queues.QueueService`, whose lock and batch
    it shares."""

    def __init__(
        self,
        state: QueueState,
        writer: QueueWriter,
        stats: QueueStats,
        events: Any,
        *,
        lifetime_ms: int,
        ack_wait: float,
    ) -> None:
        self.state = state
        self.writer = writer
        self.stats = stats
        self.events = events  # QueueEvents (chatd.e2ee.queues)
        self.lifetime_ms = lifetime_ms
        self.ack_wait = ack_wait
        # Written entries accepted since start that some target still waits
        # for: how many targets (an entry from before the start is not here).
        self._waiting: dict[int, int] = {}

    def load(self, conn: Any) -> None:
        """At start (in a read): add each device's waiting room entries to its totals."""
        for device_id, count, size in conn.execute(ROOM_TOTALS):
            self.state.count(device_id, int(count), int(size))

    # -- accepting ---------------------------------------------------------------

    def accept(
        self,
        *,
        room_id: int,
        kind: str,
        message_id: str,
        targets: list[str],
        size: int = 0,
        sender_user_id: int | None = None,
        sender_device_id: str | None = None,
        ciphertext: str | None = None,
        event: bytes | None = None,
        outcome: SendOutcome | None = None,
    ) -> int:
        """Accept one entry for these devices and hand it to their live
        connections; returns its id. With no targets nothing is kept (the
        id is still used up, so that ranges stay exact)."""
        now = now_ms()
        writer = self.writer
        with writer.lock:
            entry_id = writer.next_id
            writer.next_id = entry_id + 1
            if not targets:
                return entry_id
            envelope = f.Envelope(
                envelope_id=entry_id,
                kind=kind,
                message_id=message_id,
                sent_at=now,
                sender_user_id=sender_user_id,
                sender_device_id=sender_device_id,
                ciphertext=ciphertext,
                room_id=room_id,
                event=msgspec.Raw(event) if event is not None else None,
            )
            entry = RoomInsert(envelope, size, now + self.lifetime_ms, outcome, targets)
            writer.open.rooms_hot[entry_id] = entry  # not due until offered (below)
        self.stats.room_accepted += 1
        state = self.state
        for device_id in targets:
            state.tail(device_id, envelope)
            state.count(device_id, 1, size)
        queued = self.events.queued
        taken = 0
        for device_id in targets:
            taken += queued(device_id, envelope, False)
        wait = self.ack_wait if writer.waits_for_acks else 0.0
        with writer.lock:
            batch = writer.open
            if entry_id in batch.rooms_hot:  # not acknowledged by all meanwhile
                if taken == len(targets) and wait > 0 and event is None:
                    entry.due = time.monotonic() + wait
                    if writer.armed or writer.timer_at is not None:
                        return entry_id  # a write or its timer is on its way
                else:
                    entry.due = 0.0
                    batch.rooms_at_once[entry_id] = batch.rooms_hot.pop(entry_id)
        writer.arm()
        return entry_id

    # -- acknowledging (the writer's lock held) -----------------------------------------

    def acknowledged(
        self, batch: Batch, device_id: str, entry_id: int, sent: Sent
    ) -> tuple[bool, Outcome | None]:
        """``device_id`` acknowledged room entry ``entry_id`` for the first time.
        Returns whether the entry was still unwritten (then a receipt about it
        need not wait for anything), and a send outcome to settle by one once
        the lock is released."""
        state = self.state
        state.untail(device_id, entry_id)
        state.count(device_id, -1, -sent.size)
        entry = batch.room(entry_id)
        if entry is not None:  # not taken by a write yet
            entry.pending -= 1
            entry.acked.append(device_id)
            if entry.pending <= 0:
                batch.pop_room(entry_id)  # acknowledged by all: never written
                self.stats.cancelled += 1
            return True, entry.outcome
        # Written (or being written): the device's cursor moves past it.
        if batch.cursors.get(device_id, 0) < entry_id:
            batch.cursors[device_id] = entry_id
        batch.room_acks.append((device_id, entry_id, sent.size))
        state.deleting_now(device_id, entry_id)
        waiting = self._waiting.get(entry_id)
        if waiting is None or waiting <= 1:
            self._waiting.pop(entry_id, None)
            batch.room_deletes.append(entry_id)
        else:
            self._waiting[entry_id] = waiting - 1
        return False, None

    # -- expiry ------------------------------------------------------------------------

    @staticmethod
    def read_expired(conn: Any, now: int, limit: int) -> list[ExpiredRow]:
        return [tuple(r) for r in conn.execute(_EXPIRED, (now, limit))]

    def expire(
        self, rows: list[ExpiredRow], receipts: list[Insert], queue: Any
    ) -> tuple[int, dict[str, list[int]]]:
        """Delete these expired entries (the lock held): the sender device gets
        an ``expired`` receipt per device still waiting for one (made with
        ``queue``, held until the delete commits). Returns how many entries
        were deleted, and per device the ids it no longer waits for (for
        the relay, once the lock is released)."""
        now = now_ms()
        batch = self.writer.open
        dropped: dict[str, list[int]] = {}
        entries: set[int] = set()
        for entry_id, room_id, kind, message_id, sender, size, device_id in rows:
            if entry_id not in entries:
                entries.add(entry_id)
                batch.room_expired.append(entry_id)
                self._waiting.pop(entry_id, None)
            if device_id is None or entry_id in self.state.deleting.get(device_id, ()):
                continue  # nobody waited, or acknowledged meanwhile
            self.state.count(device_id, -1, -size)
            dropped.setdefault(device_id, []).append(entry_id)
            if kind == "room_message" and sender:
                receipt = f.Envelope(
                    envelope_id=self.writer.next_id,
                    kind="expired",
                    message_id=message_id,
                    sent_at=now,
                    device_id=device_id,
                    room_id=room_id,
                )
                receipts.append(queue(sender, receipt, 0, now + self.lifetime_ms, None, held=True))
        return len(entries), dropped

    # -- sweeping (retention) ------------------------------------------------------------

    async def sweep(self, store: Any, *, limit: int) -> int:
        """Delete up to ``limit`` room log entries nobody waits for, and as
        many closed ranges with nothing left in them. Returns the rows deleted."""
        below = self.writer.lowest_unwritten_room_entry()

        def sweep(conn: Any) -> tuple[list[int], int]:
            entries = [row[0] for row in conn.execute(_SWEEP_ENTRIES, (limit,))]
            ranges = conn.execute(_SWEEP_RANGES, (below, limit)).rowcount
            return entries, int(ranges)

        entries, ranges = await store.write(sweep)
        for entry_id in entries:
            self._waiting.pop(entry_id, None)
        self.stats.room_deleted += len(entries)
        return len(entries) + int(ranges)

    # -- after a write (on the loop) ---------------------------------------------------------

    def written(self, batch: Batch, repeats: dict[SendOutcome, int]) -> None:
        """A batch committed: its entries leave their tails, their sends settle,
        and those that some target still waits for are counted."""
        state = self.state
        for entry in batch.room_inserts():
            entry_id = entry.envelope.envelope_id
            for device_id in entry.targets:
                state.untail(device_id, entry_id)
            outcome = entry.outcome
            if outcome is not None and outcome in repeats:
                self._uncount(entry)  # a repeat: not written
                continue
            if entry.pending > 0:
                self._waiting[entry_id] = entry.pending
            if outcome is not None:
                outcome.written = True
                outcome.settle(outcome.remaining)
        for device_id, entry_id, _ in batch.room_acks:
            state.undelete(device_id, entry_id)

    def failed(self, batch: Batch, error: StoreError) -> None:
        """A batch was not written: its entries' sends fail; acknowledgements
        come again (the cursors did not move); deletes, expiries and the room
        service's statements are tried again with the next write."""
        state = self.state
        for entry in batch.room_inserts():
            entry_id = entry.envelope.envelope_id
            for device_id in entry.targets:
                state.untail(device_id, entry_id)
            self._uncount(entry)
            if entry.outcome is not None:
                entry.outcome.fail(error)
        for device_id, entry_id, size in batch.room_acks:
            state.undelete(device_id, entry_id)
            state.count(device_id, 1, size)
        with self.writer.lock:
            again = self.writer.open
            again.ops[:0] = batch.ops
            again.room_deletes.extend(batch.room_deletes)
            again.room_expired.extend(batch.room_expired)

    def _uncount(self, entry: RoomInsert) -> None:
        """An entry that is not in the queues after all: the targets that did
        not acknowledge it stop counting it."""
        acked = set(entry.acked)
        for device_id in entry.targets:
            if device_id not in acked:
                self.state.count(device_id, -1, -entry.size)

    def drop_open(self, outcomes: Sequence[Outcome]) -> None:
        """Take the entries of these sends out of the open batch (a repeat, or
        a send whose write failed): they are never written."""
        gone = set(outcomes)
        with self.writer.lock:
            batch = self.writer.open
            ids = [
                e.envelope.envelope_id
                for e in batch.room_inserts()
                if e.outcome is not None and e.outcome in gone
            ]
            entries = [entry for i in ids if (entry := batch.pop_room(i)) is not None]
        for entry in entries:
            for device_id in entry.targets:
                self.state.untail(device_id, entry.envelope.envelope_id)
            self._uncount(entry)
