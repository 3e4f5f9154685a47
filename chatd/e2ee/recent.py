"""The queue service's record of recent sends: a repeated ``message_id``
answered from memory.

A client that got no ``sent`` (a lost connection, a restart) sends again
under the same ``message_id`` (PROTOCOL.md, section 8.2). While the first
send is remembered here, the repeat gets the first send's answer at once,
and nothing is checked or queued again. A repeat that is not remembered
goes through the checks and is caught, if the first send completed, by its
row in ``sends`` when its envelopes are about to be written
(:mod:`chatd.e2ee.writes`): memory is a shortcut, the table is the record.
Touched on the event loop only.
"""

from __future__ import annotations

from typing import Final

from chatd.e2ee.outcomes import SendOutcome

MAX_RECENT_SENDS: Final = 65_536  # (device, message_id) answered from memory, at most


class RecentSends:
    """The last :data:`MAX_RECENT_SENDS` sends accepted, by (sending device,
    ``message_id``); the oldest is forgotten first."""

    __slots__ = ("_sends",)

    def __init__(self) -> None:
        self._sends: dict[tuple[str, str], SendOutcome] = {}

    def get(self, device_id: str, message_id: str) -> SendOutcome | None:
        """The outcome of this device's send of this ``message_id``, if remembered."""
        return self._sends.get((device_id, message_id))

    def remember(self, outcome: SendOutcome) -> None:
        """A send was accepted: answer its repeats with ``outcome``."""
        sends = self._sends
        sends[(outcome.sender_device_id, outcome.message_id)] = outcome
        if len(sends) > MAX_RECENT_SENDS:
            del sends[next(iter(sends))]

    def forget(self, outcome: SendOutcome) -> None:
        """The send failed: a repeat is a new send."""
        self._sends.pop((outcome.sender_device_id, outcome.message_id), None)

    def __len__(self) -> int:
        return len(self._sends)
