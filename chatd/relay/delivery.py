"""Delivery: one path from a device's queue to each of its connections.

The rules (phases, window, ack cut, order) are the sans-I/O
:mod:`chatd.protocol.delivery`; this module carries them out against the
queue service and the registry. A connection gets envelopes two ways, which
are one path with one cursor:

* while ``LIVE``, the registry offers it each envelope the moment the queue
  service accepts it (:meth:`chatd.relay.registry.Registry.queued`), before
  the envelope's write commits;
* while ``BEHIND``, :func:`pump` reads the table after the cursor. The read
  is a job in the store writer's queue and its result is handed to the
  connection from the job's commit callback, together with the device's
  tail (accepted, uncommitted envelopes) as it is at that moment. Because
  the queue service keeps a job for everything it accepted in the same
  queue, ahead of the read, the rows and the tail together are exactly the
  queue at that instant: nothing is missed and nothing comes twice.

No task runs for delivery: reads complete in callbacks, and envelopes are
made into ``deliver`` frames by the connection's writer when it writes.
"""

from __future__ import annotations

import logging
from collections.abc import Container, Iterable

from chatd.e2ee.queues import Outcome, QueueService
from chatd.errors import StoreError
from chatd.log import fields
from chatd.protocol import frames as f
from chatd.protocol.delivery import Phase
from chatd.relay.connection import Connection
from chatd.relay.registry import Registry

log = logging.getLogger("chatd.relay")


def start(conn: Connection, queues: QueueService, registry: Registry) -> None:
    """The connection's session reply is queued: begin delivering its queue
    (not to a session that must still enroll in a second factor, or accept
    the current terms: it starts once it has)."""
    grant = conn.grant
    if (
        grant is None
        or not grant.device_id
        or grant.mfa_enrollment_required
        or conn.proto.consent_pending
    ):
        return
    conn.delivery.start()
    pump(conn, queues, registry)


def pump(conn: Connection, queues: QueueService, registry: Registry) -> None:
    """Read the table after the connection's cursor, if it is behind and has room."""
    delivery = conn.delivery
    grant = conn.grant
    if grant is None or conn.closing is not None:
        return
    limit = delivery.read_limit()
    if not limit:
        return
    device_id = grant.device_id

    def done(
        rows: list[f.Envelope],
        through: int,
        complete: bool,
        tail: Iterable[f.Envelope],
        held: Container[int],
    ) -> None:
        if conn.grant is None or conn.device is None or conn.closing is not None:
            delivery.reading = False
            return
        handed = delivery.read_done(rows, through=through, complete=complete, tail=tail, held=held)
        if handed:
            conn.device.ledger.handed(handed)
            watch_senders(conn, handed, registry)
            conn.wake()
        if delivery.phase is Phase.BEHIND:
            pump(conn, queues, registry)

    def failed(exc: BaseException) -> None:
        # The device gets its queue with the next ack, envelope or connection.
        delivery.reading = False
        log.warning("relay.read_failed", extra=fields(error=type(exc).__name__))

    try:
        queues.read(device_id, delivery.cursor, limit, done, failed)
    except StoreError:
        delivery.reading = False  # shutting down


def acknowledge(conn: Connection, up_to: int, queues: QueueService) -> Outcome | None:
    """``ack up_to`` on this connection: what it covers (the ack cut) is
    acknowledged for its device, once across all of the device's connections.
    Returns the outcome of the resulting writes, if any. The window may have
    opened: the caller then calls :func:`pump`."""
    grant = conn.grant
    state = conn.device
    if grant is None or state is None:
        return None
    first = state.ledger.acknowledge(conn.delivery.ack(up_to))
    return queues.acknowledge(grant.device_id, first) if first else None


def watch_senders(conn: Connection, envelopes: Iterable[f.Envelope], registry: Registry) -> None:
    """Who sends a connection a message shares a conversation with it."""
    senders = {e.sender_user_id for e in envelopes if e.sender_user_id is not None}
    if senders:
        registry.watch(conn, senders)
