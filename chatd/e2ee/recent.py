"""The queue service's record of recent sends: a repeated ``message_id``
answered from memory.

A client that got no ``sent`` (a lost connection, a restart) sends again
under the same ``message_id`` (PROTOCOL.md, section 8.2). While the first
send is remembered here, the repeat gets the first send's answer at once,
and nothing is checked or queued again. A repeat that is not remembered
goes through the checks and is caught, if the first send completed with an
envelope on disk, by its row in ``sends`` when its envelopes are about to be
written (:mod:`chatd.e2ee.writes`). A send whose envelopes were all
acknowledged before any was written (the usual case when the recipients
are online) leaves no row: for it, this record is the only one, which is why
it is bounded by count only (the promise of section 8.2, "about the last
65,536"), not by a time shorter than that. A time bound would not lower the
peak either: under load the count bound is reached first.

Each entry is small, since 65,536 of them stay resident: one string key
(``message_id`` then the device id; the message id always has 36
characters, so the pair reads back unambiguously) and, once the send
settled, just its envelope count instead of its outcome, about 130 bytes an
entry in all instead of about 330 (docs/RELIABILITY.md, section 5). A send
still in progress keeps its :class:`SendOutcome`, so that a repeat can wait
for the first answer. Touched on the event loop only.
"""

from __future__ import annotations

from typing import Final

from chatd.e2ee.outcomes import Outcome, SendOutcome

MAX_RECENT_SENDS: Final = 65_536  # (device, message_id) answered from memory, at most


class RecentSends:
    """The last ``limit`` sends accepted, by (sending device, ``message_id``);
    the oldest is forgotten first."""

    __slots__ = ("_sends", "limit")

    def __init__(self, limit: int = MAX_RECENT_SENDS) -> None:
        self.limit = limit
        #: message_id + device id -> the send's outcome while it is in
        #: progress, then the envelope count its ``sent`` reported
        self._sends: dict[str, SendOutcome | int] = {}

    def get(self, device_id: str, message_id: str) -> Outcome | None:
        """The outcome of this device's send of this ``message_id``, if remembered
        (a settled one, answered at once, once the send completed)."""
        found = self._sends.get(message_id + device_id)
        if found is None or isinstance(found, Outcome):
            return found
        return Outcome(remaining=0, envelopes=found)

    def remember(self, outcome: SendOutcome) -> None:
        """A send was accepted: answer its repeats with ``outcome``."""
        sends = self._sends
        sends[outcome.message_id + outcome.sender_device_id] = outcome
        if len(sends) > self.limit:
            del sends[next(iter(sends))]
        outcome.when_done(self._settled)

    def forget(self, outcome: SendOutcome) -> None:
        """The send failed: a repeat is a new send."""
        key = outcome.message_id + outcome.sender_device_id
        if self._sends.get(key) is outcome:
            del self._sends[key]

    def _settled(self, outcome: Outcome) -> None:
        """A send completed (or failed): keep only its count."""
        assert isinstance(outcome, SendOutcome)  # noqa: S101 - only sends are remembered
        key = outcome.message_id + outcome.sender_device_id
        if outcome.error is None and self._sends.get(key) is outcome:
            self._sends[key] = outcome.envelopes  # the key keeps its place in the order

    def __len__(self) -> int:
        return len(self._sends)
