"""Which devices are current: the set a send must name exactly, kept in memory.

A device is *current* when it has published its identity keys and its user
is not disabled (docs/PROTOCOL.md, section 8.1). Every ``send`` checks its
envelopes against the current devices of the users it names, so the answer
is cached per user instead of read from the database per message.

The services that change it say so when their write has committed:
:class:`~chatd.e2ee.keys.KeyService` (identity keys published, a device
removed) and :class:`~chatd.auth.accounts.AccountAdmin` (a user disabled or
enabled) call :meth:`CurrentDevices.changed`, which passes the news on to
its event sink (the room service, whose rooms' member devices follow). A
read of the database that raced with such a change is used for the request
that made it but not kept, so the cache never keeps a stale answer (a
generation counter tells).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from chatd.events import UNHEARD, DeviceEvents
from chatd.store import Store

MAX_CACHED_USERS: Final = 100_000  # users whose current devices are remembered


class CurrentDevices:
    """Current devices per user, read through from the store."""

    def __init__(self, store: Store, *, events: DeviceEvents = UNHEARD) -> None:
        self.store = store
        self.events = events
        self._current: dict[int, frozenset[str]] = {}
        self._generation = 0  # bumped by every change

    def changed(self, user_ids: Iterable[int]) -> None:
        """These users' current devices changed (called after the commit)."""
        self._generation += 1
        users = list(user_ids)
        for user_id in users:
            self._current.pop(user_id, None)
        self.events.devices_changed(users)

    def cached(self, user_ids: Iterable[int]) -> dict[int, frozenset[str]] | None:
        """The current devices of these users if all are cached, else None
        (the fast path of every send: no await)."""
        current = self._current
        try:
            return {u: current[u] for u in user_ids}
        except KeyError:
            return None

    async def of(self, user_ids: Iterable[int]) -> dict[int, frozenset[str]]:
        """The current devices of each of these users (empty for unknown or
        disabled users). Reads only the users not cached yet."""
        wanted = set(user_ids)
        found = {u: self._current[u] for u in wanted if u in self._current}
        missing = wanted - found.keys()
        if not missing:
            return found
        generation = self._generation
        read = await self.store.read(lambda conn: _current_devices(conn, sorted(missing)))
        keep = generation == self._generation and len(self._current) < MAX_CACHED_USERS
        for user_id in missing:
            devices = frozenset(read.get(user_id, ()))
            found[user_id] = devices
            if keep:
                self._current[user_id] = devices
        return found


def _current_devices(conn: Any, user_ids: list[int]) -> dict[int, list[str]]:
    marks = ",".join("?" * len(user_ids))
    out: dict[int, list[str]] = {}
    for user_id, device_id in conn.execute(
        f"SELECT d.user_id, d.id FROM devices d JOIN users u ON u.id = d.user_id"  # noqa: S608
        f" WHERE d.user_id IN ({marks}) AND d.ed25519 IS NOT NULL AND u.disabled_at IS NULL",
        tuple(user_ids),
    ):
        out.setdefault(user_id, []).append(device_id)
    return out
