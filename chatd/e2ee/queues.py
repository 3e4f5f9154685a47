"""Store-and-forward: per-device queues of ciphertext, acknowledgements, receipts.

Theory of operation
-------------------
A ``send`` carries one ciphertext per recipient device. The queue service
checks it on the event loop, against what it keeps in memory: the current
devices of the users involved (:class:`~chatd.e2ee.current.CurrentDevices`),
each device queue's running totals (for the caps), and the sends it accepted
recently (for a repeated ``message_id``). A send that passes is *accepted*:
each of its envelopes gets the next envelope id, joins its device's *tail*
(envelopes accepted but not yet committed) and is announced to the relay
(:meth:`QueueEvents.queued`), which hands it to the device's live
connections at once. Its rows join the *open batch*.

The open batch is written by one job in the store's writer queue, queued at
most one at a time, which takes what is due when the writer reaches it
(:mod:`chatd.e2ee.writes`). An envelope that a live connection took at once
is *hot*: it stays in memory for up to ``devices.ack_wait_ms``, because its
device will most likely acknowledge it first, and then it is never written
at all. Everything else (envelopes for offline devices, deletes, ``sends``
rows, receipts that must be durable) is due at once, so it goes out with
the next group commit.
The relay reads a device's queue with a job in the same writer queue and
takes the tail as it is in that job's commit callback; since every envelope
leaves its tail in the commit callback of the batch that wrote it, the rows
read and the tail describe the queue at one instant (their ids may
interleave; :mod:`chatd.protocol.delivery` merges them).

Acknowledgement deletes. If the envelope is still in the open batch, the ack
cancels its insert and nothing of it ever reaches the disk; otherwise its id
joins the batch's deletes. Either way a ``delivered`` receipt for the sender
device is accepted like any envelope; one that reports a delete is *held*,
handed out only once it (and the delete) committed. The sender's ``sent``
waits until each envelope of its message is either committed or
acknowledged, whichever comes first, so ``sent`` still means "durably queued
or already delivered", while an online recipient never waits for the disk.

Delivery is at least once: an envelope handed out before its commit may be
seen again if the commit fails or the server stops first (the sender then
gets no ``sent`` and resends under the same ``message_id``, which clients
de-duplicate). A repeated ``message_id`` from the same device is answered
with the first answer: from memory when the first was recent; otherwise,
once the first send completed (every envelope durable or acknowledged), its
row in ``sends`` is found when the repeat's envelopes are about to be
written, and they are left out. A repeat of a send that never completed (the
server stopped first) is a new send: delivered again, never lost.

Envelopes that stay unacknowledged expire (``devices.envelope_days``): the
retention job (:meth:`QueueService.expire`) reads a batch of them, and they
are deleted and their ``expired`` receipts accepted through the same open
batch. Receipts themselves expire quietly.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Container, Iterable, Sequence
from typing import Any, Final, Protocol

import trio

from chatd.config import DeviceSettings
from chatd.e2ee.current import CurrentDevices
from chatd.e2ee.outcomes import (
    Accepted,
    Mismatch,
    Outcome,
    QueueFull,
    QueueStats,
    Repeated,
    SendOutcome,
    SendResult,
)
from chatd.e2ee.reading import ReadDone, read_queue
from chatd.e2ee.recent import RecentSends
from chatd.e2ee.roomlog import ExpiredRow, RoomLog
from chatd.e2ee.state import QueueState
from chatd.e2ee.writes import Batch, Insert, QueueWriter, Written
from chatd.errors import StoreError
from chatd.log import fields
from chatd.protocol import frames as f
from chatd.protocol.delivery import Sent
from chatd.protocol.rooms import RoomSend
from chatd.store import Store, now_ms

log = logging.getLogger("chatd.queues")

__all__ = [
    "Accepted",
    "Mismatch",
    "Outcome",
    "QueueEvents",
    "QueueFull",
    "QueueService",
    "Repeated",
    "SendOutcome",
    "SendResult",
    "purge_sends",
]

DAY_MS: Final = 86_400_000
MESSAGE_KINDS: Final = frozenset(("message", "room_message"))  # acknowledged: a receipt
ROOM_KINDS: Final = frozenset(("room_message", "room_event"))  # entries of the room log
EXPIRED_RECEIPT_DAYS: Final = 30  # how long an expired receipt waits for its device


_ExpiredEnvelope = tuple[int, str, str, str, "str | None", int]


class QueueEvents(Protocol):
    """What the queue service tells the relay, on the event loop."""

    def queued(self, device_id: str, envelope: f.Envelope, held: bool) -> bool:
        """An envelope was accepted for this device (before its commit). Calls
        for one device come in envelope id order. A ``held`` one may not be
        handed out before :meth:`released` says it committed. True if a live
        connection took it (so an ack is likely soon)."""

    def released(self, device_id: str, queue: Iterable[f.Envelope], held: Container[int]) -> None:
        """A write that held envelopes of this device is settled: ``queue`` is
        the device's queue from that write's first envelope on (still ``held``
        ones included, for the connections to stop at)."""

    def dropped(self, device_id: str, envelope_ids: Sequence[int]) -> None:
        """These envelopes left the queue without an ack (they expired)."""


class QueueService:
    """Sends, deliveries and acknowledgements. One per daemon; call :meth:`open` first."""

    def __init__(
        self,
        store: Store,
        settings: DeviceSettings,
        current: CurrentDevices,
        events: QueueEvents,
    ) -> None:
        self.store = store
        self.settings = settings
        self.current = current
        self.events = events
        self._max_count = settings.max_queued_envelopes
        self._max_bytes = settings.max_queued_bytes
        self._lifetime_ms = int(settings.envelope_days * DAY_MS)
        self._ack_wait = settings.ack_wait_ms / 1000
        self.stats = QueueStats()
        self.writer = QueueWriter(
            store, self.stats, written=self._written, failed=self._write_failed
        )
        self.state = QueueState()
        self.rooms = RoomLog(
            self.state,
            self.writer,
            self.stats,
            events,
            lifetime_ms=self._lifetime_ms,
            ack_wait=self._ack_wait,
        )
        self.recent = RecentSends()

    async def open(self) -> None:
        """Load the queues' totals and the envelope id sequence."""

        def load(conn: Any) -> tuple[int, bool]:
            for d, n, b in conn.execute("SELECT device_id, envelopes, bytes FROM queue_totals"):
                self.state.count(d, n, b)
            self.rooms.load(conn)
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'envelopes'")
            seq = row.fetchone()
            highest = conn.execute(
                "SELECT max(coalesce((SELECT max(id) FROM envelopes), 0),"
                " coalesce((SELECT max(id) FROM room_log), 0))"
            ).fetchone()[0]
            return max(highest, seq[0] if seq else 0), seq is not None

        last, has_sequence = await self.store.read(load)
        self.writer.load(last, has_sequence)

    # -- sending -----------------------------------------------------------------

    async def send(self, user_id: int, device_id: str, frame: f.Send) -> SendResult:
        """Check a send and accept it, or say why not (see the module docstring).

        Raises :class:`StoreError` when the store is shut down or unreadable.
        """
        repeat = self.recent.get(device_id, frame.message_id)
        if repeat is not None:
            return Repeated(repeat)
        targets: dict[tuple[int, str], str] = {}
        for e in frame.envelopes:
            targets[(e.user_id, e.device_id)] = e.ciphertext
        users = {u for u, _ in targets}
        users.add(user_id)
        current = self.current.cached(users)
        if current is None:
            current = await self.current.of(users)
            repeat = self.recent.get(device_id, frame.message_id)  # it may have come meanwhile
            if repeat is not None:
                return Repeated(repeat)
        expected = {(u, d) for u in users for d in current[u]}
        expected.discard((user_id, device_id))
        if expected != targets.keys():
            missing = sorted(expected - targets.keys())
            stale = sorted(targets.keys() - expected)
            return Mismatch(
                f.DeviceMismatch(
                    id=frame.id,
                    message_id=frame.message_id,
                    missing=[f.DeviceRef(user_id=u, device_id=d) for u, d in missing],
                    stale=[f.DeviceRef(user_id=u, device_id=d) for u, d in stale],
                )
            )
        sizes = {}
        full = []
        totals = self.state.totals
        max_count, max_bytes = self._max_count, self._max_bytes
        for (user, target), text in targets.items():
            size = sizes[target] = len(text) if text.isascii() else len(text.encode())
            count, total = totals.get(target, (0, 0))
            if count >= max_count or total + size > max_bytes:
                full.append((user, target))
        skipped: tuple[f.DeviceRef, ...] = ()
        if full:
            if not frame.skip_full or len(full) == len(targets):
                return QueueFull(sorted(d for _, d in full))
            for ref in full:
                del targets[ref]
            skipped = tuple(f.DeviceRef(user_id=u, device_id=d) for u, d in sorted(full))
        now = now_ms()
        expires = now + self._lifetime_ms
        outcome = SendOutcome(device_id, frame.message_id, len(targets), now)
        accepted: list[Insert] = []
        writer = self.writer
        with writer.lock:
            for (_, target), text in targets.items():
                envelope = f.Envelope(
                    envelope_id=writer.next_id,
                    kind="message",
                    message_id=frame.message_id,
                    sent_at=now,
                    sender_user_id=user_id,
                    sender_device_id=device_id,
                    ciphertext=text,
                )
                accepted.append(self._queue(target, envelope, sizes[target], expires, outcome))
        self.recent.remember(outcome)
        outcome.when_done(self._send_done)
        self._offer(accepted)
        return Accepted(outcome, skipped)

    def full(self, device_id: str, size: int) -> bool:
        """Whether this device's queue has no room for ``size`` more bytes."""
        return self.state.full(device_id, size, self._max_count, self._max_bytes)

    def has_room(self, device_id: str, share: float) -> bool:
        """Whether this device's queue is below ``share`` of both caps."""
        count, size = self.state.totals.get(device_id, (0, 0))
        return count < share * self._max_count and size < share * self._max_bytes

    def repeated(self, device_id: str, message_id: str) -> Outcome | None:
        """The outcome of this device's recent send of this ``message_id``, if any."""
        return self.recent.get(device_id, message_id)

    def boundary(self) -> int:
        """The last id handed out so far: what is accepted from now on gets a
        higher one (the room service draws its ranges here)."""
        return self.writer.next_id - 1

    def room_ops(self, ops: list[tuple[str, tuple[Any, ...]]]) -> Outcome:
        """Run these statements of the room service with the next write, in
        order, after everything handed over before; the outcome settles once
        they are durable."""
        outcome = Outcome()
        with self.writer.lock:
            batch = self.writer.open
            batch.ops.extend(ops)
            batch.waiters.append(outcome)
        self.writer.arm()
        return outcome

    def send_room(
        self, user_id: int, device_id: str, frame: RoomSend, targets: list[str]
    ) -> Accepted | Repeated:
        """Accept a room message for these member devices (chosen by the room
        service: the sending device and full queues left out). A repeated
        ``message_id`` of this device is answered with the first answer."""
        repeat = self.recent.get(device_id, frame.message_id)
        if repeat is not None:
            return Repeated(repeat)
        text = frame.ciphertext
        size = len(text) if text.isascii() else len(text.encode())
        outcome = SendOutcome(device_id, frame.message_id, len(targets), now_ms())
        self.recent.remember(outcome)
        outcome.when_done(self._send_done)
        self.rooms.accept(
            room_id=frame.room_id,
            kind="room_message",
            message_id=frame.message_id,
            targets=targets,
            size=size,
            sender_user_id=user_id,
            sender_device_id=device_id,
            ciphertext=text,
            outcome=outcome,
        )
        return Accepted(outcome)

    async def flush(self) -> None:
        """Write all that is accepted, and wait for it (see QueueWriter.flush)."""
        await self.writer.flush()

    def _send_done(self, outcome: Outcome) -> None:
        """A send settled: with an envelope on disk, its ``sends`` row follows."""
        if isinstance(outcome, SendOutcome) and outcome.written and outcome.error is None:
            with self.writer.lock:
                self.writer.open.completed.append(outcome)
            self.writer.arm()

    def _queue(
        self,
        device_id: str,
        envelope: f.Envelope,
        size: int,
        expires_at: int,
        outcome: SendOutcome | None,
        *,
        held: bool = False,
    ) -> Insert:
        """Accept one envelope (the lock is held): it joins the open batch (not
        due until :meth:`_offer` says when), its device's tail and totals."""
        envelope_id = envelope.envelope_id
        writer = self.writer
        writer.next_id = envelope_id + 1
        accepted = Insert(device_id, envelope, size, expires_at, outcome, held)
        writer.open.hot[envelope_id] = accepted  # until _offer says when it is due
        self.stats.accepted += 1
        if held:
            self.state.held.add(envelope_id)
        self.state.tail(device_id, envelope)
        self.state.count(device_id, 1, size)
        return accepted

    def _offer(self, accepted: list[Insert]) -> None:
        """Hand newly accepted envelopes to the relay (the lock released), then
        say when each is due: a hot one (a live connection took it) after the
        ack wait, the others at once. Then make sure a write will come."""
        queued = self.events.queued
        hot = [queued(a.device_id, a.envelope, a.held) for a in accepted]
        writer = self.writer
        wait = self._ack_wait if writer.waits_for_acks else 0.0
        due = time.monotonic() + wait
        with writer.lock:
            batch = writer.open
            for entry, taken in zip(accepted, hot, strict=True):
                envelope_id = entry.envelope.envelope_id
                if envelope_id not in batch.hot:
                    continue  # cancelled meanwhile
                if taken and wait > 0:
                    entry.due = due
                else:
                    entry.due = 0.0
                    batch.at_once[envelope_id] = batch.hot.pop(envelope_id)
            if writer.armed or (batch.hot and not batch.due_now() and writer.timer_at is not None):
                return  # a write or its timer is already on its way
        writer.arm()

    # -- acknowledging ---------------------------------------------------------------

    def acknowledge(self, device_id: str, acked: Sequence[tuple[int, Sent]]) -> Outcome:
        """These envelopes of ``device_id`` were acknowledged (each for the first
        time): delete them, or cancel their insert if it is still in the open
        batch, and accept a ``delivered`` receipt for each message. The outcome
        settles once all of it is durable."""
        now = now_ms()
        expires = now + self._lifetime_ms
        outcome = Outcome()
        receipts: list[Insert] = []
        settled: list[Outcome] = []  # sends one of whose envelopes was cancelled
        rooms = self.rooms
        with self.writer.lock:
            batch = self.writer.open
            writes_before = len(batch.deletes) + len(batch.room_acks)
            for envelope_id, sent in acked:
                if sent.room_id is not None and sent.kind in ROOM_KINDS:
                    unwritten, send = rooms.acknowledged(batch, device_id, envelope_id, sent)
                    if send is not None:
                        settled.append(send)
                else:
                    cancelled = batch.pop(envelope_id)
                    unwritten = cancelled is not None
                    if cancelled is not None:
                        self._unqueue(cancelled)
                        if cancelled.outcome is not None:
                            settled.append(cancelled.outcome)
                    else:
                        self._delete(device_id, envelope_id, sent.size)
                if sent.kind in MESSAGE_KINDS and sent.sender_device_id:
                    # The receipt says the envelope is gone from the server:
                    # at once if it was never written, else once its delete is.
                    receipt = f.Envelope(
                        envelope_id=self.writer.next_id,
                        kind="delivered",
                        message_id=sent.message_id,
                        sent_at=now,
                        device_id=device_id,
                        room_id=sent.room_id,
                    )
                    receipts.append(
                        self._queue(
                            sent.sender_device_id, receipt, 0, expires, None, held=not unwritten
                        )
                    )
            wrote = len(batch.deletes) + len(batch.room_acks) > writes_before
            if wrote:
                batch.waiters.append(outcome)
        for send in settled:
            send.settle()
        self._offer(receipts)
        if not wrote:
            outcome.settle()  # nothing it changed needs the disk
        return outcome

    def _unqueue(self, cancelled: Insert) -> None:
        """An envelope's insert was cancelled before it was written (the lock is
        held; the caller settles its send's outcome once the lock is released,
        since an outcome's callbacks may take the lock)."""
        self.stats.cancelled += 1
        self.state.untail(cancelled.device_id, cancelled.envelope.envelope_id)
        self.state.count(cancelled.device_id, -1, -cancelled.size)

    def _delete(self, device_id: str, envelope_id: int, size: int) -> None:
        self.writer.open.deletes.append((device_id, envelope_id, size))
        self.state.deleting_now(device_id, envelope_id)
        self.state.count(device_id, -1, -size)

    # -- reading (for delivery) ----------------------------------------------------------

    def read(
        self,
        device_id: str,
        after: int,
        limit: int,
        done: ReadDone,
        failed: Callable[[BaseException], None],
    ) -> None:
        """Read up to ``limit`` envelopes of this device's queue after id ``after``.

        Once read, ``done(envelopes, through, complete, tail, held)`` runs on the
        loop: the envelopes (without those acknowledged meanwhile), the highest
        id the read covered, whether it reached the end of the table, the
        device's tail as it is at that moment, and which of the tail is held.
        ``failed(exc)`` runs instead if the read failed. Raises StoreError if
        the store is shut down.
        """

        read_queue(self.store, self.state, device_id, after, limit, done, failed)

    # -- expiry (retention) --------------------------------------------------------------

    async def sweep_rooms(self, *, now: int, limit: int) -> int:
        """Retention: room log entries and closed ranges nobody needs any more."""
        return await self.rooms.sweep(self.store, limit=limit)

    async def expire(self, *, now: int, limit: int) -> int:
        """Delete up to ``limit`` expired envelopes and as many expired room log
        entries; queue an ``expired`` receipt for each device an expired
        message was still waiting for, whose sender device still exists.
        Returns how many were deleted, once that is durable."""
        found: list[int] = []
        read_done = trio.Event()
        read_error: list[BaseException] = []

        def read(conn: Any) -> tuple[list[_ExpiredEnvelope], list[ExpiredRow]]:
            envelopes = [
                tuple(r)
                for r in conn.execute(
                    "SELECT id, recipient_device_id, kind, message_id, sender_device_id,"
                    " coalesce(length(ciphertext), 0) FROM envelopes WHERE expires_at < ?"
                    " ORDER BY expires_at LIMIT ?",
                    (now, limit),
                )
            ]
            return envelopes, RoomLog.read_expired(conn, now, limit)

        outcome = Outcome()

        def committed(rows: tuple[list[_ExpiredEnvelope], list[ExpiredRow]]) -> None:
            # On the loop, at the read's place in the writer's queue: nothing
            # acknowledged after the read was queued is expired again.
            found.append(self._expire_now(*rows, outcome))
            read_done.set()

        def failed(exc: BaseException) -> None:
            read_error.append(exc)
            read_done.set()

        self.store.submit_nowait(read, committed, failed, reads_only=True)
        await read_done.wait()
        if read_error:
            raise StoreError(f"reading expired envelopes failed: {read_error[0]}")
        await outcome.wait()
        return sum(found)

    def _expire_now(
        self, rows: list[_ExpiredEnvelope], room_rows: list[ExpiredRow], outcome: Outcome
    ) -> int:
        now = now_ms()
        expires = now + EXPIRED_RECEIPT_DAYS * DAY_MS
        taken = 0
        by_device: dict[str, list[int]] = {}
        receipts: list[Insert] = []
        with self.writer.lock:
            for envelope_id, recipient, kind, message_id, sender, size in rows:
                if envelope_id in self.state.deleting.get(recipient, ()):
                    continue  # acknowledged meanwhile
                self._delete(recipient, envelope_id, size)
                by_device.setdefault(recipient, []).append(envelope_id)
                taken += 1
                if kind == "message" and sender:
                    receipt = f.Envelope(
                        envelope_id=self.writer.next_id,
                        kind="expired",
                        message_id=message_id,
                        sent_at=now,
                        device_id=recipient,
                    )
                    receipts.append(self._queue(sender, receipt, 0, expires, None, held=True))
            entries, dropped = self.rooms.expire(room_rows, receipts, self._queue)
            taken += entries
            for device_id, ids in dropped.items():
                by_device.setdefault(device_id, []).extend(ids)
            if taken:
                self.writer.open.waiters.append(outcome)
        if not taken:
            outcome.settle()
        self._offer(receipts)
        for device_id, ids in by_device.items():
            self.events.dropped(device_id, ids)
        return taken

    def forget_device(self, device_id: str) -> None:
        """A device was removed (its queue went with it)."""
        self.state.forget(device_id)

    # -- after a write -------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write hot envelopes whose ack wait ran out, until cancelled (see
        :meth:`QueueWriter.serve`)."""
        await self.writer.serve(task_status=task_status)

    def _written(self, written: Written) -> None:
        """On the loop: a batch is durable."""
        batch, repeats = written
        if repeats:
            self._drop_open(repeats.keys())  # a repeat's hot envelopes are not written later
        self._untail_batch(batch, repeats)
        for ins in batch.inserts():
            if ins.outcome is None:
                continue
            if ins.outcome in repeats:
                self.state.count(ins.device_id, -1, -ins.size)  # not written after all
            else:
                ins.outcome.written = True
                ins.outcome.settle()
        self.rooms.written(batch, repeats)
        for outcome, envelopes in repeats.items():
            outcome.envelopes = envelopes
            outcome.settle(outcome.remaining)
        for device_id, envelope_id, _ in batch.deletes:
            self.state.undelete(device_id, envelope_id)
        for waiter in batch.waiters:
            waiter.settle()

    def _drop_open(self, outcomes: Iterable[Outcome]) -> None:
        """Take the envelopes of these sends out of the open batch (a repeat, or
        a send that failed): they are never written."""
        gone = set(outcomes)
        with self.writer.lock:
            batch = self.writer.open
            dropped = [i.envelope.envelope_id for i in batch.inserts() if i.outcome in gone]
            entries = [entry for i in dropped if (entry := batch.pop(i)) is not None]
        for entry in entries:
            self.state.untail(entry.device_id, entry.envelope.envelope_id)
            self.state.count(entry.device_id, -1, -entry.size)
        self.rooms.drop_open(list(gone))

    def _untail_batch(self, batch: Batch, written: dict[SendOutcome, int] | None) -> None:
        """A batch is settled: its envelopes leave their tails (``written``: the
        repeated sends left out, or None when it failed and wrote nothing). For
        each device it held envelopes of, the relay gets the queue from the
        batch on, so that connections waiting at a held envelope go on."""
        devices: dict[str, list[f.Envelope]] = {}
        state = self.state
        for ins in batch.inserts():
            state.untail(ins.device_id, ins.envelope.envelope_id)
            if ins.held:
                state.held.discard(ins.envelope.envelope_id)
                devices.setdefault(ins.device_id, [])
        if not devices:
            return
        if written is not None:
            for ins in batch.inserts():
                entries = devices.get(ins.device_id)
                if entries is not None and (ins.outcome is None or ins.outcome not in written):
                    entries.append(ins.envelope)
        for device_id, entries in devices.items():
            tail = state.tails.get(device_id, {}).values()
            queue = sorted(itertools.chain(entries, tail), key=_envelope_id)
            self.events.released(device_id, queue, state.held)

    def _write_failed(self, batch: Batch, error: StoreError) -> None:
        """On the loop: a batch was not written. Its sends fail (their senders
        resend); its deletes are undone (the envelopes come again)."""
        # The store logs the episode and its cause once (store.write_failed).
        log.debug("queues.write_failed", extra=fields(error=str(error)))
        failed_sends = {ins.outcome for ins in batch.inserts() if ins.outcome is not None}
        failed_sends.update(e.outcome for e in batch.room_inserts() if e.outcome is not None)
        for outcome in failed_sends:
            outcome.checked = False
            self.recent.forget(outcome)  # a resend is a new send
        self._drop_open(failed_sends)
        self._untail_batch(batch, None)
        for ins in batch.inserts():
            self.state.count(ins.device_id, -1, -ins.size)
            if ins.outcome is not None:
                ins.outcome.fail(error)
        self.rooms.failed(batch, error)
        for device_id, envelope_id, size in batch.deletes:
            self.state.undelete(device_id, envelope_id)
            self.state.count(device_id, 1, size)
        for waiter in batch.waiters:
            waiter.fail(error)
        for outcome in failed_sends:
            outcome.fail(error)


def _envelope_id(envelope: f.Envelope) -> int:
    return envelope.envelope_id


def purge_sends(conn: Any, *, now: int, limit: int, days: float) -> int:
    """Retention job: forget message ids older than the envelope lifetime."""
    cutoff = now - int(days * DAY_MS)
    return int(
        conn.execute(
            "DELETE FROM sends WHERE (sender_device_id, message_id) IN"
            " (SELECT sender_device_id, message_id FROM sends WHERE created_at < ? LIMIT ?)",
            (cutoff, limit),
        ).rowcount
    )
