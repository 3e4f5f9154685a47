"""The queue service's record of recent sends (chatd/e2ee/recent.py): a
repeated message_id is answered from memory with the first answer, the
record is bounded by count, and a settled entry is small."""

from __future__ import annotations

import tracemalloc
import uuid

from chatd.e2ee.outcomes import SendOutcome
from chatd.e2ee.recent import MAX_RECENT_SENDS, RecentSends
from chatd.errors import StoreError

DEVICE = "XY7XOHY2QQCLU"


def _send(message_id: str | None = None, count: int = 2, device: str = DEVICE) -> SendOutcome:
    return SendOutcome(device, message_id or str(uuid.uuid4()), count, 1_764_800_000_000)


def test_a_repeat_in_progress_waits_for_the_first_answer() -> None:
    recent = RecentSends()
    first = _send()
    recent.remember(first)
    assert recent.get(DEVICE, first.message_id) is first
    assert recent.get("OTHERDEVICE12", first.message_id) is None  # another device's message
    assert recent.get(DEVICE, str(uuid.uuid4())) is None


def test_a_repeat_of_a_completed_send_gets_its_count_at_once() -> None:
    recent = RecentSends()
    first = _send(count=3)
    recent.remember(first)
    first.settle(3)
    repeat = recent.get(DEVICE, first.message_id)
    assert repeat is not None and repeat is not first
    assert repeat.done and repeat.error is None and repeat.envelopes == 3
    answers: list[int] = []
    repeat.when_done(lambda o: answers.append(o.envelopes))
    assert answers == [3]


def test_a_failed_send_is_forgotten_so_that_its_resend_is_a_new_send() -> None:
    recent = RecentSends()
    first = _send()
    recent.remember(first)
    recent.forget(first)
    first.fail(StoreError("disk full"))
    assert recent.get(DEVICE, first.message_id) is None
    assert len(recent) == 0


def test_forgetting_a_failed_send_keeps_a_completed_one_of_the_same_id() -> None:
    recent = RecentSends()
    done = _send(count=1)
    recent.remember(done)
    done.settle()
    recent.forget(done)  # not the entry any more: the count is kept
    repeat = recent.get(DEVICE, done.message_id)
    assert repeat is not None and repeat.envelopes == 1


def test_the_oldest_send_is_forgotten_first_beyond_the_limit() -> None:
    recent = RecentSends(limit=3)
    sends = [_send() for _ in range(4)]
    for outcome in sends:
        recent.remember(outcome)
        outcome.settle(2)
    assert len(recent) == 3
    assert recent.get(DEVICE, sends[0].message_id) is None
    assert all(recent.get(DEVICE, s.message_id) is not None for s in sends[1:])


def test_a_full_record_of_completed_sends_stays_small() -> None:
    """MAX_RECENT_SENDS entries stay resident for as long as the daemon runs:
    a completed send keeps one short string and its count, not its outcome
    (about 330 bytes an entry before, some 130 now)."""
    n = 10_000
    message_ids = [str(uuid.uuid4()) for _ in range(n)]  # the frames' strings, not counted
    recent = RecentSends()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for message_id in message_ids:
            outcome = _send(message_id, count=1)
            recent.remember(outcome)
            outcome.settle()
        per_entry = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    assert per_entry < 160, f"{per_entry:.0f} bytes per remembered send"
    assert MAX_RECENT_SENDS * per_entry < 12 * 2**20
