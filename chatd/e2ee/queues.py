"""Store-and-forward: per-device queues of ciphertext, acknowledgements, receipts.

Theory of operation
-------------------
A ``send`` carries one ciphertext per recipient device. The server checks
that the devices are exactly the current devices of the users involved (plus
the sender's own other devices), refuses the whole send if a recipient's
queue is full, and otherwise queues one *envelope* per device, all in one
durable write. Only after that commit does the sender get ``sent``: every
envelope is then durably queued. A repeated ``message_id`` from the same
device is answered with the same result and queues nothing twice.

Each device's queue is ordered by envelope id. Connections of a device have
a *pump* (see :mod:`chatd.relay_sessions`) that sends what is queued beyond
what this connection already got, in batches; a new envelope wakes it. The
device acknowledges cumulatively (``ack up_to``); the server then deletes
those envelopes and queues a ``delivered`` receipt for each message's sender
device. Delivery is at least once: a device may see an envelope again after a
reconnect and removes duplicates by message id.

Envelopes that stay unacknowledged expire (``devices.envelope_days``): the
retention job deletes them in batches and queues an ``expired`` receipt for
the sender. Receipts themselves expire quietly.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final

from chatd.auth.models import AuthError
from chatd.config import DeviceSettings
from chatd.protocol import frames as f
from chatd.store import Store, now_ms
from chatd.store.store import PendingWrite

DAY_MS: Final = 86_400_000
_Queued = tuple[f.Sent, list[tuple[str, f.Envelope]]]  # a send's outcome and its envelopes
DELIVER_BATCH: Final = 100  # envelopes per deliver frame, at most...
DELIVER_BYTES: Final = 256 * 1024  # ...and about this many bytes of ciphertext


class QueueService:
    """Sends, deliveries and acks. One per daemon."""

    def __init__(self, store: Store, settings: DeviceSettings) -> None:
        self.store = store
        self.settings = settings
        #: Called with device ids whose queues changed without passing through
        #: on_committed (the expiry job's receipts); the relay has them read again.
        self.on_queued: Callable[[Iterable[str]], None] = lambda ids: None
        #: Called on the loop right after each commit with the envelopes it queued,
        #: as (recipient device, envelope) in queue order; the relay hands them
        #: to live connections that are caught up, without reading them back.
        self.on_committed: Callable[[list[tuple[str, f.Envelope]]], None] = lambda pairs: None
        self._committed: list[tuple[str, f.Envelope]] = []
        store.after_complete.append(self._flush_committed)

    def _collect(self, result: Any) -> None:
        """on_commit of sends and acks: gather the batch's new envelopes."""
        if isinstance(result, tuple):
            self._committed.extend(result[1])

    def _flush_committed(self) -> None:
        if self._committed:
            pairs, self._committed = self._committed, []
            self.on_committed(pairs)

    async def send(self, user_id: int, device_id: str, frame: f.Send) -> f.Sent | f.DeviceMismatch:
        """Queue a message durably, or explain what is wrong. Raises AuthError."""
        return await (await self.begin_send(user_id, device_id, frame))()

    async def begin_send(
        self, user_id: int, device_id: str, frame: f.Send
    ) -> Callable[[], Awaitable[f.Sent | f.DeviceMismatch]]:
        """Submit a send to the writer and return a function that waits for its
        commit and gives the outcome (raising AuthError for a full queue).
        Sends begun in order commit in order, so a connection may pipeline them."""
        now = now_ms()
        expires = now + int(self.settings.envelope_days * DAY_MS)
        max_count = self.settings.max_queued_envelopes
        max_bytes = self.settings.max_queued_bytes
        # (user, device) -> the ciphertext as sent, and as stored (UTF-8, encoded
        # here on the loop rather than in the writer thread).
        targets = {
            (e.user_id, e.device_id): (e.ciphertext, e.ciphertext.encode()) for e in frame.envelopes
        }

        def queue(conn: Any) -> _Queued | f.Sent | f.DeviceMismatch | list[str]:
            done = conn.execute(
                "SELECT envelopes FROM sends WHERE sender_device_id = ? AND message_id = ?",
                (device_id, frame.message_id),
            ).fetchone()
            if done is not None:
                return f.Sent(id=frame.id, message_id=frame.message_id, envelopes=done[0])
            users = {uid for uid, _ in targets} | {user_id}
            marks = ",".join("?" * len(users))
            current = {
                (row[0], row[1])
                for row in conn.execute(
                    f"SELECT d.user_id, d.id FROM devices d JOIN users u ON u.id = d.user_id"  # noqa: S608
                    f" WHERE d.user_id IN ({marks}) AND d.ed25519 IS NOT NULL"
                    " AND u.disabled_at IS NULL",
                    tuple(users),
                )
            }
            current.discard((user_id, device_id))
            missing = sorted(current - set(targets))
            stale = sorted(set(targets) - current)
            if missing or stale:
                return f.DeviceMismatch(
                    id=frame.id,
                    message_id=frame.message_id,
                    missing=[f.DeviceRef(user_id=u, device_id=d) for u, d in missing],
                    stale=[f.DeviceRef(user_id=u, device_id=d) for u, d in stale],
                )
            full = []
            for (_, target), (_, data) in targets.items():
                # Kept by triggers on envelopes (schema version 6).
                count, size = conn.execute(
                    "SELECT envelopes, bytes FROM queue_totals WHERE device_id = ?", (target,)
                ).fetchone() or (0, 0)
                if count + 1 > max_count or size + len(data) > max_bytes:
                    full.append(target)
            if full:
                return full
            queued = []
            for (_, target), (text, data) in targets.items():
                cursor = conn.execute(
                    "INSERT INTO envelopes (recipient_device_id, kind, message_id, sender_user_id,"
                    " sender_device_id, ciphertext, sent_at, expires_at)"
                    " VALUES (?, 'message', ?, ?, ?, ?, ?, ?)",
                    (target, frame.message_id, user_id, device_id, data, now, expires),
                )
                envelope = f.Envelope(
                    envelope_id=int(cursor.lastrowid),
                    kind="message",
                    message_id=frame.message_id,
                    sent_at=now,
                    sender_user_id=user_id,
                    sender_device_id=device_id,
                    ciphertext=text,
                )
                queued.append((target, envelope))
            conn.execute(
                "INSERT INTO sends (sender_device_id, message_id, envelopes, created_at)"
                " VALUES (?, ?, ?, ?)",
                (device_id, frame.message_id, len(targets), now),
            )
            sent = f.Sent(id=frame.id, message_id=frame.message_id, envelopes=len(targets))
            return sent, queued

        pending: PendingWrite[_Queued | f.Sent | f.DeviceMismatch | list[str]]
        pending = await self.store.submit(queue, self._collect)

        async def finish() -> f.Sent | f.DeviceMismatch:
            result = await pending.wait()
            if isinstance(result, list):
                raise AuthError(
                    "queue_full",
                    f"the queue of device {', '.join(sorted(result))} is full; nothing was sent "
                    "(try again later)",
                    field="$.envelopes",
                )
            if isinstance(result, tuple):
                return result[0]
            return result

        return finish

    async def pending(self, device_id: str, after: int) -> list[f.Envelope]:
        """The next batch of this device's queue after envelope id ``after``."""

        def read(conn: Any) -> list[f.Envelope]:
            return [
                f.Envelope(
                    envelope_id=r[0],
                    kind=r[1],
                    message_id=r[2],
                    sent_at=r[3],
                    sender_user_id=r[4],
                    sender_device_id=r[5],
                    ciphertext=r[6].decode() if r[6] is not None else None,
                    device_id=r[7],
                )
                for r in conn.execute(
                    "SELECT id, kind, message_id, sent_at, sender_user_id, sender_device_id,"
                    " ciphertext, device_id FROM envelopes"
                    " WHERE recipient_device_id = ? AND id > ? ORDER BY id LIMIT ?",
                    (device_id, after, DELIVER_BATCH),
                )
            ]

        batches = deliver_batches(await self.store.read(read))
        return batches[0] if batches else []

    async def ack(self, device_id: str, up_to: int) -> int:
        """Delete this device's envelopes up to ``up_to``; receipts go to the senders."""
        return await (await self.begin_ack(device_id, up_to))()

    async def begin_ack(self, device_id: str, up_to: int) -> Callable[[], Awaitable[int]]:
        """Submit an ack to the writer; the returned function waits for its commit."""
        now = now_ms()
        expires = now + int(self.settings.envelope_days * DAY_MS)

        def delete(conn: Any) -> tuple[int, list[tuple[str, f.Envelope]]]:
            # Two statements however many envelopes: a delivered receipt for
            # each message whose sender device still exists, then the delete.
            receipts = [
                (
                    sender,
                    f.Envelope(
                        envelope_id=envelope_id,
                        kind="delivered",
                        message_id=message_id,
                        sent_at=now,
                        device_id=device_id,
                    ),
                )
                for envelope_id, sender, message_id in conn.execute(
                    "INSERT INTO envelopes (recipient_device_id, kind, message_id, device_id,"
                    " sent_at, expires_at)"
                    " SELECT e.sender_device_id, 'delivered', e.message_id, ?, ?, ?"
                    " FROM envelopes e JOIN devices d ON d.id = e.sender_device_id"
                    " WHERE e.recipient_device_id = ? AND e.id <= ? AND e.kind = 'message'"
                    " ORDER BY e.id RETURNING id, recipient_device_id, message_id",
                    (device_id, now, expires, device_id, up_to),
                ).fetchall()
            ]
            deleted = conn.execute(
                "DELETE FROM envelopes WHERE recipient_device_id = ? AND id <= ?",
                (device_id, up_to),
            ).rowcount
            return int(deleted), sorted(receipts, key=lambda r: r[1].envelope_id)

        pending: PendingWrite[tuple[int, list[tuple[str, f.Envelope]]]]
        pending = await self.store.submit(delete, self._collect)

        async def finish() -> int:
            deleted, _ = await pending.wait()
            return deleted

        return finish


def deliver_batches(envelopes: list[f.Envelope]) -> list[list[f.Envelope]]:
    """Split envelopes (in queue order) into ``deliver`` frames: at most
    DELIVER_BATCH each, ending before the one that would take a frame's
    ciphertext over DELIVER_BYTES (but never empty)."""
    batches: list[list[f.Envelope]] = []
    batch: list[f.Envelope] = []
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


def expire_envelopes(conn: Any, *, now: int, limit: int, notify: list[str] | None = None) -> int:
    """Retention job: delete expired envelopes; tell senders their messages expired."""
    rows = conn.execute(
        "SELECT id, kind, message_id, sender_device_id, recipient_device_id FROM envelopes"
        " WHERE expires_at < ? ORDER BY expires_at LIMIT ?",
        (now, limit),
    ).fetchall()
    for envelope_id, kind, message_id, sender, recipient in rows:
        conn.execute("DELETE FROM envelopes WHERE id = ?", (envelope_id,))
        alive = sender and conn.execute("SELECT 1 FROM devices WHERE id = ?", (sender,)).fetchone()
        if kind == "message" and alive:
            conn.execute(
                "INSERT INTO envelopes (recipient_device_id, kind, message_id, device_id,"
                " sent_at, expires_at) VALUES (?, 'expired', ?, ?, ?, ?)",
                (sender, message_id, recipient, now, now + 30 * DAY_MS),
            )
            if notify is not None:
                notify.append(sender)
    return len(rows)


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
