"""What the queue service keeps in memory of every device's queue.

Shared by the direct queues (:mod:`chatd.e2ee.queues`) and the room log
(:mod:`chatd.e2ee.roomlog`), which both put entries in a device's queue.
Everything here is touched on the event loop only.
"""

from __future__ import annotations

from chatd.protocol import frames as f


class QueueState:
    """Per device: the running totals (for the caps), the *tail* (accepted,
    not yet committed), what is acknowledged but whose delete (or cursor) is
    not durable yet; and which accepted envelopes are *held* (not handed out
    before their commit)."""

    __slots__ = ("totals", "tails", "deleting", "held")

    def __init__(self) -> None:
        self.totals: dict[str, list[int]] = {}  # device -> [entries, bytes], accepted
        self.tails: dict[str, dict[int, f.Envelope]] = {}  # device -> accepted, uncommitted
        self.deleting: dict[str, set[int]] = {}  # device -> acknowledged, not durable yet
        self.held: set[int] = set()

    def full(self, device_id: str, size: int, max_count: int, max_bytes: int) -> bool:
        """Whether one more entry of ``size`` bytes breaks this device's caps."""
        count, total = self.totals.get(device_id, (0, 0))
        return count >= max_count or total + size > max_bytes

    def count(self, device_id: str, entries: int, size: int) -> None:
        totals = self.totals.get(device_id)
        if totals is None:
            if entries > 0:
                self.totals[device_id] = [entries, size]
            return
        totals[0] = max(0, totals[0] + entries)
        totals[1] = max(0, totals[1] + size)

    def tail(self, device_id: str, envelope: f.Envelope) -> None:
        self.tails.setdefault(device_id, {})[envelope.envelope_id] = envelope

    def untail(self, device_id: str, envelope_id: int) -> None:
        tail = self.tails.get(device_id)
        if tail is not None:
            tail.pop(envelope_id, None)
            if not tail:
                del self.tails[device_id]

    def deleting_now(self, device_id: str, envelope_id: int) -> None:
        self.deleting.setdefault(device_id, set()).add(envelope_id)

    def undelete(self, device_id: str, envelope_id: int) -> None:
        deleting = self.deleting.get(device_id)
        if deleting is not None:
            deleting.discard(envelope_id)
            if not deleting:
                del self.deleting[device_id]

    def forget(self, device_id: str) -> None:
        """A device was removed (its queue went with it)."""
        self.totals.pop(device_id, None)
