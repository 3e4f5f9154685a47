"""Which read grants a pending message may take back (in memory, event loop only).

A ``send`` or ``room_send`` naming attachments records its grants before
it is queued (:meth:`chatd.blobs.BlobService.refer`) and withdraws them if
it is then refused. Two messages naming one blob for one device may be
pending at once, and one refused must not take back what the other was
(or may yet be) accepted with. :class:`PendingGrants` keeps, per grant, how
many pending messages need it and which one created it:

* a refused message withdraws a grant only if it created it (or its creator
  was refused too: the grant is *doomed*) and no other pending message
  needs it; otherwise the last of those decides;
* a message accepted with a grant makes it nobody's to withdraw.

Pure: no I/O, no awaits.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

#: A reference a message may make: ("first", blob, None) (the blob named at
#: all), ("device", blob, device_id) or ("room", blob, room_id).
Grant = tuple[str, str, str | int | None]


@dataclass(frozen=True, slots=True, eq=False)
class Referral:
    """What one message's :meth:`BlobService.refer` added: blobs named for
    the first time, (blob, device) read grants and (blob, room) grants that
    did not exist before; and every grant the message needs (``touched``),
    new or not. Compared by identity: each is one message's."""

    first: tuple[str, ...] = ()
    readers: tuple[tuple[str, str], ...] = ()
    rooms: tuple[tuple[str, int], ...] = ()
    touched: tuple[Grant, ...] = ()

    def made(self) -> list[Grant]:
        """The grants this message's references created."""
        return [
            *(("first", b, None) for b in self.first),
            *(("device", b, d) for b, d in self.readers),
            *(("room", b, r) for b, r in self.rooms),
        ]


def needed(
    blob_ids: Sequence[str], device_ids: Sequence[str], room_id: int | None
) -> tuple[Grant, ...]:
    """Every grant a message naming ``blob_ids`` for ``device_ids`` (a send)
    or ``room_id`` (a room send) needs."""
    unique = sorted(set(blob_ids))
    grants: list[Grant] = [("first", b, None) for b in unique]
    grants += [("device", b, d) for b in unique for d in sorted(set(device_ids))]
    if room_id is not None:
        grants += [("room", b, room_id) for b in unique]
    return tuple(grants)


class PendingGrants:
    """The grants of pending messages (see the module docstring)."""

    def __init__(self) -> None:
        self._made_by: dict[Grant, Referral] = {}
        self._needs: Counter[Grant] = Counter()  # pending messages needing each grant
        self._doomed: set[Grant] = set()  # made by a refused message; see withdrawn

    @property
    def idle(self) -> bool:
        """No message is pending (for tests)."""
        return not (self._needs or self._made_by or self._doomed)

    def need(self, touched: Sequence[Grant]) -> None:
        """A message that needs ``touched`` is pending: count it before the
        first await, so that a refused message deciding what to withdraw
        from then on sees it."""
        self._needs.update(touched)

    def recorded(self, referral: Referral) -> None:
        """Its references are written: the new ones are its to withdraw."""
        for grant in referral.made():
            self._made_by[grant] = referral

    def confirm(self, referral: Referral, except_devices: Sequence[str] = ()) -> None:
        """The message was accepted (but for ``except_devices``): the grants it
        needs stay, even those another message, pending or refused, created."""
        left_out = set(except_devices)
        for grant in referral.touched:
            if grant[0] == "device" and grant[2] in left_out:
                continue
            self._made_by.pop(grant, None)
            self._doomed.discard(grant)

    def withdrawn(self, referral: Referral, device_ids: Sequence[str] | None = None) -> list[Grant]:
        """The message was refused (or left ``device_ids`` out): the grants to
        delete now."""
        candidates = referral.touched
        if device_ids is not None:
            gone = set(device_ids)
            candidates = tuple(g for g in candidates if g[0] == "device" and g[2] in gone)
        mine: list[Grant] = []
        for grant in candidates:
            if self._made_by.get(grant) is referral:
                del self._made_by[grant]
            elif grant not in self._doomed:
                continue
            if self._needs[grant] <= 1:
                self._doomed.discard(grant)
                mine.append(grant)
            else:
                self._doomed.add(grant)
        return mine

    def release(self, referral: Referral) -> None:
        """The message is done with; call it last. What it created and did
        not withdraw stays."""
        for grant in referral.made():
            if self._made_by.get(grant) is referral:
                del self._made_by[grant]
        self.forget(referral.touched)

    def forget(self, touched: Sequence[Grant]) -> None:
        """A message needing ``touched`` is no longer pending."""
        for grant in touched:
            left = self._needs[grant] - 1
            if left > 0:
                self._needs[grant] = left
            else:
                del self._needs[grant]
                # Nobody left to decide on a doomed grant: it stays (a grant
                # to a device a message named; the blob's expiry ends it).
                self._doomed.discard(grant)
