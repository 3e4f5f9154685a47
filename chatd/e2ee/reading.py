"""Reading a device's queue for delivery: the rows on disk, and the tail
as it is at the read's place in the writer's queue.

The read runs as a job in the store's writer queue (``reads_only``), so its
commit callback sees the queue at one instant: every envelope leaves its
device's tail in the commit callback of the batch that wrote it
(:mod:`chatd.e2ee.queues`). Rows and tail may interleave;
:mod:`chatd.protocol.delivery` merges them.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable
from typing import Any, Final

import msgspec

from chatd.e2ee.state import QueueState
from chatd.protocol import frames as f
from chatd.store import Store

#: A device's queue after an id: its envelopes, and the entries of the room
#: log its ranges cover past its cursor (chatd.e2ee.roomlog), in one order.
_READ_QUEUE: Final = (
    "SELECT id, kind, message_id, sent_at, sender_user_id, sender_device_id, ciphertext,"
    " device_id, room_id, NULL FROM envelopes WHERE recipient_device_id = ?1 AND id > ?2"
    " UNION ALL"
    " SELECT m.id, m.kind, m.message_id, m.sent_at, m.sender_user_id, m.sender_device_id,"
    " m.ciphertext, NULL, m.room_id, m.event"
    " FROM room_devices s JOIN devices d ON d.id = s.device_id"
    " JOIN room_log m ON m.room_id = s.room_id AND m.id > max(s.from_id, d.room_cursor, ?2)"
    " AND (s.until_id IS NULL OR m.id <= s.until_id)"
    " AND m.sender_device_id IS NOT s.device_id"
    " WHERE s.device_id = ?1 ORDER BY 1 LIMIT ?3"
)

#: ``done(envelopes, through, complete, tail, held)``, see :func:`read_queue`
ReadDone = Callable[[list[f.Envelope], int, bool, Iterable[f.Envelope], Container[int]], None]


def read_queue(
    store: Store,
    state: QueueState,
    device_id: str,
    after: int,
    limit: int,
    done: ReadDone,
    failed: Callable[[BaseException], None],
) -> None:
    """Read up to ``limit`` entries of this device's queue after id ``after``
    (see :meth:`chatd.e2ee.queues.QueueService.read`). Raises StoreError if
    the store is shut down."""

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
                room_id=r[8],
                event=msgspec.Raw(r[9].encode()) if r[9] is not None else None,
            )
            for r in conn.execute(_READ_QUEUE, (device_id, after, limit))
        ]

    def committed(rows: list[f.Envelope]) -> None:
        through = rows[-1].envelope_id if rows else after
        complete = len(rows) < limit
        deleting = state.deleting.get(device_id)
        if deleting:
            rows = [r for r in rows if r.envelope_id not in deleting]
        done(rows, through, complete, state.tails.get(device_id, {}).values(), state.held)

    store.submit_nowait(read, committed, failed, reads_only=True)
