"""Delivery of our room messages: ``sent``, then delivered to N of M members.

A room message is queued once per member device (PROTOCOL, rooms); each device
that acknowledges it makes a ``delivered`` receipt, each that lets it expire an
``expired`` one, both naming the device (and the room). A member device whose
queue was full is not queued at all: ``sent.skipped`` names it, and it is
recorded as a ``skipped`` receipt; no receipt will come from it. Receipts are
counted per *user*: a member has the message once any of their devices has
it; a member is *unreachable* when every device of theirs was skipped.

The message's state becomes ``delivered`` when every member user it was for
has it, and ``expired`` when every device it was queued for has answered and
some member user (an unreachable one included) does not.
:meth:`RoomDeliveries.delivery` gives the counts; :meth:`add_room_receipt`
says when a receipt changed them (``RoomDeliveryChanged`` in
``room_events()``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .store import LocalStore, now_ms


@dataclass(frozen=True)
class RoomDelivery:
    """How far one of our room messages got: ``delivered`` of ``members``
    member users (other than us) have it on at least one device; ``expired``
    users had every device it was queued for let it expire; ``unreachable``
    users had a full queue on every device (``sent.skipped``): they will not
    get it."""

    members: int
    delivered: int
    expired: int
    devices: int  # member devices the server queued it for (``sent.envelopes``)
    unreachable: int = 0
    skipped: tuple[tuple[int, str], ...] = ()  # (user id, device id) left out: full queue
    state: str = "sent"  # the message's: sending, sent, or (final) delivered, expired

    @property
    def final(self) -> bool:
        """``delivered`` or ``expired``: no receipt will change the state again."""
        return self.state in ("delivered", "expired")

    @property
    def waiting(self) -> int:
        """Member users who may still get it (not delivered, expired, unreachable)."""
        return max(0, self.members - self.delivered - self.expired - self.unreachable)


class RoomDeliveries:
    """Receipts of our room messages, in the device's :class:`LocalStore`."""

    def __init__(self, store: LocalStore) -> None:
        self._store = store

    async def set_sent(
        self,
        message_id: str,
        recipients: int,
        envelopes: int,
        skipped: Iterable[tuple[int, str]] = (),
        unreachable: int = 0,
    ) -> None:
        """Our room message was accepted: for ``recipients`` member users (other
        than us), queued for ``envelopes`` devices; ``skipped`` devices were
        not (full queues), so ``unreachable`` member users will not get it.
        ``sending`` becomes ``sent``, unless receipts moved it on already (or
        nobody it was for can get it: then ``expired``)."""
        at = now_ms()

        def write(conn: Any) -> None:
            conn.execute(
                "UPDATE messages SET recipients = ?, envelopes = ?, unreachable = ?,"
                " state = CASE WHEN state = 'sending' THEN 'sent' ELSE state END"
                " WHERE message_id = ?",
                (recipients, envelopes, unreachable, message_id),
            )
            conn.executemany(
                "INSERT OR IGNORE INTO receipts (message_id, device_id, kind, at)"
                " VALUES (?, ?, 'skipped', ?)",
                [(message_id, device_id, at) for _, device_id in skipped],
            )
            _settle(conn, message_id)

        await self._store.write(write)

    async def add_room_receipt(
        self, message_id: str, device_id: str, kind: str
    ) -> tuple[int, RoomDelivery] | None:
        """A ``delivered`` or ``expired`` receipt about our room message: the
        state becomes ``delivered`` once every member user has it, ``expired``
        once every device has answered and some member user does not.
        Returns (room id, delivery) when it changed the counts or the state
        of a message that is ``sent`` already (not for one still ``sending``:
        :meth:`delivery` after ``send`` returns covers that)."""

        def write(conn: Any) -> tuple[int, RoomDelivery] | None:
            before = _delivery(conn, message_id)
            conn.execute(
                "INSERT OR REPLACE INTO receipts (message_id, device_id, kind, at)"
                " VALUES (?, ?, ?, ?)",
                (message_id, device_id, kind, now_ms()),
            )
            _settle(conn, message_id)
            after = _delivery(conn, message_id)
            if after is None or after.state == "sending" or after == before:
                return None
            (room_id,) = conn.execute(
                "SELECT room_id FROM messages WHERE message_id = ?", (message_id,)
            ).fetchone()
            return int(room_id), after

        return await self._store.write(write)

    async def delivery(self, message_id: str) -> RoomDelivery | None:
        """The delivery of our room message, or None if there is no such one."""
        return await self._store.read(lambda c: _delivery(c, message_id))


def _delivery(conn: Any, message_id: str) -> RoomDelivery | None:
    row = conn.execute(
        "SELECT recipients, envelopes, sender_user_id, unreachable, state FROM messages"
        " WHERE message_id = ? AND direction = 'out' AND room_id IS NOT NULL",
        (message_id,),
    ).fetchone()
    if row is None:
        return None
    recipients, envelopes, me, unreachable = row[0] or 0, row[1] or 0, row[2], row[3] or 0
    kinds: dict[int, set[str]] = {}
    skipped: list[tuple[int, str]] = []
    for user_id, device_id, kind in conn.execute(
        "SELECT d.user_id, r.device_id, r.kind FROM receipts r"
        " JOIN devices d ON d.device_id = r.device_id WHERE r.message_id = ?"
        " ORDER BY d.user_id, r.device_id",
        (message_id,),
    ).fetchall():
        if kind == "skipped":
            skipped.append((user_id, device_id))
        elif user_id != me:
            kinds.setdefault(user_id, set()).add(kind)
    delivered = sum(1 for k in kinds.values() if "delivered" in k)
    expired = sum(1 for k in kinds.values() if k == {"expired"})
    return RoomDelivery(
        recipients, delivered, expired, envelopes, unreachable, tuple(skipped), str(row[4])
    )


def _settle(conn: Any, message_id: str) -> None:
    """Move our room message to ``delivered`` or ``expired`` when its receipts say so."""
    delivery = _delivery(conn, message_id)
    if delivery is None:
        return
    (answered,) = conn.execute(
        "SELECT count(*) FROM receipts WHERE message_id = ? AND kind != 'skipped'",
        (message_id,),
    ).fetchone()
    state = None
    if delivery.members and delivery.delivered >= delivery.members:
        state = "delivered"
    elif (delivery.devices or delivery.unreachable) and answered >= delivery.devices:
        state = "expired"
    if state is not None:
        conn.execute(
            "UPDATE messages SET state = ? WHERE message_id = ? AND state IN ('sent', 'sending')",
            (state, message_id),
        )
