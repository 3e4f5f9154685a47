"""Delivery of our room messages: ``sent``, then delivered to N of M members.

A room message is queued once per member device (PROTOCOL, rooms); each device
that acknowledges it makes a ``delivered`` receipt, each that lets it expire an
``expired`` one, both naming the device (and the room). Receipts are counted
per *user*: a member has the message once any of their devices has it. The
message's state becomes ``delivered`` when every member user it was for has
it, and ``expired`` when every device it was queued for has answered and some
member user still does not. :meth:`RoomDeliveries.delivery` gives the counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .store import LocalStore, now_ms


@dataclass(frozen=True)
class RoomDelivery:
    """How far one of our room messages got: ``delivered`` of ``members``
    member users (other than us) have it on at least one device; ``expired``
    users had every device it was queued for let it expire."""

    members: int
    delivered: int
    expired: int
    devices: int  # member devices the server queued it for (``sent.envelopes``)


class RoomDeliveries:
    """Receipts of our room messages, in the device's :class:`LocalStore`."""

    def __init__(self, store: LocalStore) -> None:
        self._store = store

    async def set_sent(self, message_id: str, recipients: int, envelopes: int) -> None:
        """Our room message was accepted: for ``recipients`` member users (other
        than us) on ``envelopes`` devices. ``sending`` becomes ``sent``, unless
        receipts moved it on already."""

        def write(conn: Any) -> None:
            conn.execute(
                "UPDATE messages SET recipients = ?, envelopes = ?,"
                " state = CASE WHEN state = 'sending' THEN 'sent' ELSE state END"
                " WHERE message_id = ?",
                (recipients, envelopes, message_id),
            )
            _settle(conn, message_id)

        await self._store.write(write)

    async def add_room_receipt(self, message_id: str, device_id: str, kind: str) -> None:
        """A ``delivered`` or ``expired`` receipt about our room message: the
        state becomes ``delivered`` once every member user has it, ``expired``
        once every device has answered and some member user does not."""

        def write(conn: Any) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO receipts (message_id, device_id, kind, at)"
                " VALUES (?, ?, ?, ?)",
                (message_id, device_id, kind, now_ms()),
            )
            _settle(conn, message_id)

        await self._store.write(write)

    async def delivery(self, message_id: str) -> RoomDelivery | None:
        """The delivery of our room message, or None if there is no such one."""
        return await self._store.read(lambda c: _delivery(c, message_id))


def _delivery(conn: Any, message_id: str) -> RoomDelivery | None:
    row = conn.execute(
        "SELECT recipients, envelopes, sender_user_id FROM messages"
        " WHERE message_id = ? AND direction = 'out' AND room_id IS NOT NULL",
        (message_id,),
    ).fetchone()
    if row is None:
        return None
    recipients, envelopes, me = row[0] or 0, row[1] or 0, row[2]
    kinds: dict[int, set[str]] = {}
    for user_id, kind in conn.execute(
        "SELECT d.user_id, r.kind FROM receipts r JOIN devices d ON d.device_id = r.device_id"
        " WHERE r.message_id = ? AND d.user_id != ?",
        (message_id, me),
    ).fetchall():
        kinds.setdefault(user_id, set()).add(kind)
    delivered = sum(1 for k in kinds.values() if "delivered" in k)
    expired = sum(1 for k in kinds.values() if k == {"expired"})
    return RoomDelivery(recipients, delivered, expired, envelopes)


def _settle(conn: Any, message_id: str) -> None:
    """Move our room message to ``delivered`` or ``expired`` when its receipts say so."""
    delivery = _delivery(conn, message_id)
    if delivery is None:
        return
    (answered,) = conn.execute(
        "SELECT count(*) FROM receipts WHERE message_id = ?", (message_id,)
    ).fetchone()
    state = None
    if delivery.members and delivery.delivered >= delivery.members:
        state = "delivered"
    elif delivery.devices and answered >= delivery.devices:
        state = "expired"
    if state is not None:
        conn.execute(
            "UPDATE messages SET state = ? WHERE message_id = ? AND state IN ('sent', 'sending')",
            (state, message_id),
        )
