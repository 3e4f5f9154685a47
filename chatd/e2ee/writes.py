"""Writing the queues: the open batch and the one job that writes it.

Theory of operation
-------------------
What the queue service accepts (envelopes, deletes, outcomes to settle)
goes into the *open batch*, under a lock it shares with the store's writer
thread. A :class:`QueueWriter` keeps at most one job for it in the writer's
queue (:meth:`QueueWriter.arm`): submitted at once when something in the
batch is due, or when the first hot envelope's ack wait runs out (the timer
of :meth:`QueueWriter.serve`). When the writer reaches the job it takes what
is due (:meth:`Batch.take`: everything but hot envelopes still waiting for
their ack) and writes it with a few set-based statements, whatever its size,
so a batch costs a few GIL hand-offs however many rows it holds: one read of
``sends`` for the sends whose envelopes are written for the first time (a
repeat of a completed send is left out), the envelopes, the rows of the
sends that completed, and the deletes. Once the batch has committed (or
failed), the queue service hears of it through the callbacks it gave the
writer, on the event loop, in commit order.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Final, NamedTuple

import msgspec
import trio

from chatd.e2ee.outcomes import Outcome, QueueStats, SendOutcome
from chatd.errors import StoreError
from chatd.log import fields
from chatd.protocol import frames as f
from chatd.store import Store

log = logging.getLogger("chatd.queues")

_json = msgspec.json.Encoder()


class Insert:
    """An accepted envelope waiting in a batch to be written."""

    __slots__ = ("device_id", "envelope", "size", "expires_at", "outcome", "held", "due")

    def __init__(
        self,
        device_id: str,
        envelope: f.Envelope,
        size: int,
        expires_at: int,
        outcome: SendOutcome | None,
        held: bool,
    ) -> None:
        self.device_id = device_id  # the recipient device
        self.envelope = envelope
        self.size = size  # bytes of ciphertext
        self.expires_at = expires_at
        self.outcome = outcome  # the send it belongs to (None for a receipt)
        self.held = held  # not handed out before its commit
        self.due = math.inf  # time.monotonic() from which it is written (set once offered)


class RoomInsert:
    """An accepted room log entry (a room message or event, stored once)
    waiting in a batch to be written, and the member devices it is for."""

    __slots__ = ("envelope", "size", "expires_at", "outcome", "targets", "pending", "acked", "due")

    def __init__(
        self,
        envelope: f.Envelope,
        size: int,
        expires_at: int,
        outcome: SendOutcome | None,
        targets: list[str],
    ) -> None:
        self.envelope = envelope
        self.size = size  # bytes of ciphertext
        self.expires_at = expires_at
        self.outcome = outcome  # the room send it is (None for an event)
        self.targets = targets  # the member devices it is queued for
        self.pending = len(targets)  # of those, the ones that did not acknowledge it yet
        self.acked: list[str] = []  # devices that acknowledged it before it was written
        self.due = math.inf


class Batch:
    """What the next write job will write."""

    __slots__ = (
        "at_once",
        "hot",
        "rooms_at_once",
        "rooms_hot",
        "ops",
        "deletes",
        "cursors",
        "room_acks",
        "room_deletes",
        "room_expired",
        "waiters",
        "completed",
    )

    def __init__(self) -> None:
        # Accepted envelopes by id: those due at once, and the hot ones (a live
        # connection took them) in the order they fall due; the same for room
        # log entries.
        self.at_once: dict[int, Insert] = {}
        self.hot: dict[int, Insert] = {}
        self.rooms_at_once: dict[int, RoomInsert] = {}
        self.rooms_hot: dict[int, RoomInsert] = {}
        # Statements of the room service (membership, room_devices ranges),
        # run first and in order.
        self.ops: list[tuple[str, tuple[Any, ...]]] = []
        self.deletes: list[tuple[str, int, int]] = []  # (device, envelope id, bytes)
        self.cursors: dict[str, int] = {}  # device -> highest room log id it acknowledged
        self.room_acks: list[tuple[str, int, int]] = []  # (device, room log id, bytes) behind them
        self.room_deletes: list[int] = []  # room log ids possibly waited for by nobody now
        self.room_expired: list[int] = []  # room log ids that expired
        self.waiters: list[Outcome] = []  # settled when this batch commits
        self.completed: list[SendOutcome] = []  # sends done: their rows in ``sends``

    def __bool__(self) -> bool:
        return bool(self.hot or self.rooms_hot or self.due_now())

    def due_now(self) -> bool:
        """Whether anything in it should be written without waiting."""
        return bool(
            self.at_once
            or self.rooms_at_once
            or self.ops
            or self.deletes
            or self.cursors
            or self.room_deletes
            or self.room_expired
            or self.waiters
            or self.completed
        )

    def inserts(self) -> Iterator[Insert]:
        yield from self.at_once.values()
        yield from self.hot.values()

    def room_inserts(self) -> Iterator[RoomInsert]:
        yield from self.rooms_at_once.values()
        yield from self.rooms_hot.values()

    def first_hot(self) -> float:
        """When the first hot entry falls due (inf if there is none)."""
        due = math.inf
        if self.hot:
            due = next(iter(self.hot.values())).due
        if self.rooms_hot:
            due = min(due, next(iter(self.rooms_hot.values())).due)
        return due

    def pop(self, envelope_id: int) -> Insert | None:
        entry = self.at_once.pop(envelope_id, None)
        return entry if entry is not None else self.hot.pop(envelope_id, None)

    def room(self, entry_id: int) -> RoomInsert | None:
        """The room log entry with this id, if it is in this batch."""
        entry = self.rooms_at_once.get(entry_id)
        return entry if entry is not None else self.rooms_hot.get(entry_id)

    def pop_room(self, entry_id: int) -> RoomInsert | None:
        entry = self.rooms_at_once.pop(entry_id, None)
        return entry if entry is not None else self.rooms_hot.pop(entry_id, None)

    def take(self, now: float) -> Batch:
        """Move out what is due by ``now`` (the lock held): the hot entries
        leave from the front while they are due, so this costs what it takes."""
        taken = Batch()
        taken.at_once, self.at_once = self.at_once, {}
        taken.rooms_at_once, self.rooms_at_once = self.rooms_at_once, {}
        taken.ops, self.ops = self.ops, []
        taken.deletes, self.deletes = self.deletes, []
        taken.cursors, self.cursors = self.cursors, {}
        taken.room_acks, self.room_acks = self.room_acks, []
        taken.room_deletes, self.room_deletes = self.room_deletes, []
        taken.room_expired, self.room_expired = self.room_expired, []
        taken.waiters, self.waiters = self.waiters, []
        taken.completed, self.completed = self.completed, []
        _take_due(self.hot, taken.hot, now)
        _take_due(self.rooms_hot, taken.rooms_hot, now)
        # Devices that acknowledged a room entry before its write: their
        # cursors are written with it (later acks come with later batches).
        for entry in taken.room_inserts():
            for device_id in entry.acked:
                entry_id = entry.envelope.envelope_id
                if taken.cursors.get(device_id, 0) < entry_id:
                    taken.cursors[device_id] = entry_id
        return taken


def _take_due(hot: dict[int, Any], into: dict[int, Any], now: float) -> None:
    while hot:
        entry_id = next(iter(hot))
        if hot[entry_id].due > now:
            break
        into[entry_id] = hot.pop(entry_id)


class Written(NamedTuple):
    batch: Batch
    repeats: dict[SendOutcome, int]  # sends found already in ``sends``: their first count


_FIND_SENDS: Final = (
    "SELECT sender_device_id, message_id, envelopes FROM sends"
    " WHERE (sender_device_id, message_id) IN (SELECT value->>0, value->>1 FROM json_each(?))"
)
_INSERT_SENDS: Final = (
    "INSERT OR IGNORE INTO sends (sender_device_id, message_id, envelopes, created_at)"
    " SELECT value->>0, value->>1, value->>2, value->>3 FROM json_each(?)"
)
_INSERT_ENVELOPES: Final = (
    "INSERT INTO envelopes (id, recipient_device_id, kind, message_id, sender_user_id,"
    " sender_device_id, device_id, ciphertext, sent_at, expires_at, room_id)"
    " SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6,"
    " CAST(value->>7 AS BLOB), value->>8, value->>9, value->>10 FROM json_each(?)"
    # A device removed after the send was accepted: its queue is gone, and so
    # is this envelope, as if the send had come just before the removal.
    " WHERE value->>1 IN (SELECT id FROM devices)"
)
_DELETE_ENVELOPES: Final = "DELETE FROM envelopes WHERE id IN (SELECT value FROM json_each(?))"
_INSERT_ROOM_LOG: Final = (
    "INSERT INTO room_log (id, room_id, kind, message_id, sender_user_id, sender_device_id,"
    " ciphertext, event, sent_at, expires_at)"
    " SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5,"
    " CAST(value->>6 AS BLOB), value->>7, value->>8, value->>9 FROM json_each(?)"
)
_ADVANCE_CURSORS: Final = (
    "UPDATE devices SET room_cursor = max(room_cursor, v.value->>1)"
    " FROM json_each(?) AS v WHERE devices.id = v.value->>0"
)
#: Whether some device still waits for room log entry ``m``: a range of its
#: room that covers ``m``, of a device whose cursor is below ``m``.
WAITED_FOR: Final = (
    "EXISTS (SELECT 1 FROM room_devices s JOIN devices d ON d.id = s.device_id"
    " WHERE s.room_id = m.room_id AND s.from_id < m.id"
    " AND (s.until_id IS NULL OR m.id <= s.until_id) AND d.room_cursor < m.id"
    " AND m.sender_device_id IS NOT s.device_id)"
)
_DELETE_ROOM_LOG: Final = (
    "DELETE FROM room_log WHERE id IN (SELECT m.id FROM room_log m"  # noqa: S608 - constants
    f" WHERE m.id IN (SELECT value FROM json_each(?)) AND NOT {WAITED_FOR})"
)
_EXPIRE_ROOM_LOG: Final = "DELETE FROM room_log WHERE id IN (SELECT value FROM json_each(?))"


class QueueWriter:
    """The open batch, its lock, and the job that writes it (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        stats: QueueStats,
        *,
        written: Callable[[Written], None],
        failed: Callable[[Batch, StoreError], None],
    ) -> None:
        self.store = store
        self.stats = stats
        self.lock = threading.Lock()  # the open batch and next_id, shared with the writer thread
        self.open = Batch()
        self.next_id = 1  # the next envelope id to hand out (under the lock)
        self.armed = False  # a job to write the open batch is in the writer's queue
        self.timer_at: float | None = None  # time.monotonic() when hot envelopes fall due
        self._written = written
        self._failed = failed
        self._taken: list[Batch] = []  # batches the writer took, oldest first
        self._has_sequence = False
        self._wake: trio.Event | None = None  # wakes serve() (None: serve() is not running)
        self._flushing = False  # stopping: write everything, hot or not

    @property
    def waits_for_acks(self) -> bool:
        """Whether hot envelopes may wait (serve() runs to write them later)."""
        return self._wake is not None

    def load(self, highest_id: int, has_sequence: bool) -> None:
        self.next_id = highest_id + 1
        self._has_sequence = has_sequence

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write hot envelopes whose ack wait ran out, until cancelled; without
        this task, nothing waits for acks. Cancellation writes all that is open."""
        self._wake = trio.Event()
        task_status.started()
        try:
            while True:
                at = self.timer_at
                if at is None:
                    await self._wake.wait()
                else:
                    with trio.move_on_after(max(0.0, at - time.monotonic())):
                        await self._wake.wait()
                self._wake = trio.Event()
                if self.timer_at is not None and time.monotonic() >= self.timer_at:
                    self.timer_at = None
                    self.arm(force=True)
        finally:
            self._wake = None
            self._flushing = True
            self.arm(force=True)
            log.info("queues.stopped", extra=fields(**self.stats.fields()))

    async def flush(self) -> None:
        """Write everything open now, hot envelopes too, and wait for it to
        commit (the daemon calls this once the relay has drained, before the
        store closes). Raises StoreError if that write fails."""
        self._flushing = True
        waiter = Outcome()
        with self.lock:
            self.open.waiters.append(waiter)
        self.arm(force=True)
        await waiter.wait()

    def lowest_unwritten_room_entry(self) -> int:
        """The lowest id of a room log entry in memory and not yet committed
        (the next id to hand out if there is none)."""
        with self.lock:
            ids = [e.envelope.envelope_id for e in self.open.room_inserts()]
            for batch in self._taken:
                ids.extend(e.envelope.envelope_id for e in batch.room_inserts())
            return min(ids, default=self.next_id)

    def arm(self, *, force: bool = False) -> None:
        """Make sure the open batch will be written: a job now if anything in it
        is due (or ``force``), else a timer for when its first hot envelope is."""
        with self.lock:
            if self.armed:
                return
            batch = self.open
            if not batch:
                return
            if not (force or batch.due_now()):
                first = batch.first_hot()
                if self.timer_at is None or first < self.timer_at:
                    self.timer_at = first
                    if self._wake is not None:
                        self._wake.set()
                return
            self.armed = True
        try:
            self.store.submit_nowait(self._write, self._committed, self._not_written)
        except StoreError as exc:
            with self.lock:
                self.armed = False
                batch, self.open = self.open, Batch()
            self._failed(batch, exc)

    def _write(self, conn: Any) -> Written:
        """In the writer thread: take what is due of the open batch and write it."""
        with self.lock:
            batch = self.open.take(math.inf if self._flushing else time.monotonic())
            self.armed = False
            self._taken.append(batch)
            highest = self.next_id - 1
            kept = len(self.open.hot)
        self.stats.batches += 1
        self.stats.kept += kept
        for statement, params in batch.ops:
            conn.execute(statement, params)
        repeats: dict[SendOutcome, int] = {}
        outcomes = [ins.outcome for ins in batch.inserts()]
        outcomes += [entry.outcome for entry in batch.room_inserts()]
        sends = {o: None for o in outcomes if o is not None and not o.checked}
        if sends:
            # A send repeated after a restart, whose first copy completed: its
            # envelopes are not written again (its first answer stands).
            keys = [[o.sender_device_id, o.message_id] for o in sends]
            found = {
                (d, m): n for d, m, n in conn.execute(_FIND_SENDS, (_json.encode(keys).decode(),))
            }
            for outcome in sends:
                outcome.checked = True
                count = found.get((outcome.sender_device_id, outcome.message_id))
                if count is not None:
                    repeats[outcome] = int(count)
        if batch.at_once or batch.hot:
            rows = [
                [
                    ins.envelope.envelope_id,
                    ins.device_id,
                    ins.envelope.kind,
                    ins.envelope.message_id,
                    ins.envelope.sender_user_id,
                    ins.envelope.sender_device_id,
                    ins.envelope.device_id,
                    ins.envelope.ciphertext,
                    ins.envelope.sent_at,
                    ins.expires_at,
                    ins.envelope.room_id,
                ]
                for ins in batch.inserts()
                if ins.outcome is None or ins.outcome not in repeats
            ]
            if rows:
                conn.execute(_INSERT_ENVELOPES, (_json.encode(rows).decode(),))
                self.stats.written += len(rows)
        if batch.rooms_at_once or batch.rooms_hot:
            room_rows: list[list[Any]] = [
                [
                    e.envelope.envelope_id,
                    e.envelope.room_id,
                    e.envelope.kind,
                    e.envelope.message_id,
                    e.envelope.sender_user_id,
                    e.envelope.sender_device_id,
                    e.envelope.ciphertext,
                    e.envelope.event,
                    e.envelope.sent_at,
                    e.expires_at,
                ]
                for e in batch.room_inserts()
                if e.outcome is None or e.outcome not in repeats
            ]
            if room_rows:
                conn.execute(_INSERT_ROOM_LOG, (_json.encode(room_rows).decode(),))
                self.stats.room_written += len(room_rows)
        if batch.completed:
            rows = [
                [o.sender_device_id, o.message_id, o.envelopes, o.created_at]
                for o in batch.completed
            ]
            conn.execute(_INSERT_SENDS, (_json.encode(rows).decode(),))
        if batch.deletes:
            ids = [envelope_id for _, envelope_id, _ in batch.deletes]
            conn.execute(_DELETE_ENVELOPES, (_json.encode(ids).decode(),))
            self.stats.deleted += len(ids)
        if batch.cursors:
            cursors = [[d, i] for d, i in batch.cursors.items()]
            conn.execute(_ADVANCE_CURSORS, (_json.encode(cursors).decode(),))
        if batch.room_expired:
            conn.execute(_EXPIRE_ROOM_LOG, (_json.encode(batch.room_expired).decode(),))
        if batch.room_deletes:
            gone = conn.execute(_DELETE_ROOM_LOG, (_json.encode(batch.room_deletes).decode(),))
            self.stats.room_deleted += gone.rowcount
        # Ids are never used twice, not even those cancelled before any write.
        if not self._has_sequence:
            conn.execute(
                "INSERT INTO sqlite_sequence (name, seq) SELECT 'envelopes', ?"
                " WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'envelopes')",
                (highest,),
            )
            self._has_sequence = True
        conn.execute(
            "UPDATE sqlite_sequence SET seq = ? WHERE name = 'envelopes' AND seq < ?",
            (highest, highest),
        )
        return Written(batch, repeats)

    def _committed(self, written: Written) -> None:
        """On the loop: a batch is durable."""
        self._taken.remove(written.batch)
        self._written(written)
        self.arm()  # what stayed (hot envelopes) gets its timer

    def _not_written(self, exc: BaseException) -> None:
        """On the loop: the job writing a batch failed (or never ran)."""
        error = exc if isinstance(exc, StoreError) else StoreError(f"the write failed: {exc}")
        if self._taken:
            batch = self._taken.pop(0)
        else:  # the batch was never taken: fail what is open
            with self.lock:
                batch, self.open = self.open, Batch()
                self.armed = False
        self._failed(batch, error)
        self.arm()
