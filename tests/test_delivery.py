"""The delivery rules of the sans-I/O core: pure, synchronous tests."""

from __future__ import annotations

import subprocess
import sys

from chatd.protocol import frames as f
from chatd.protocol.delivery import (
    Delivery,
    DeviceLedger,
    Phase,
    Replies,
    deliver_batches,
)


def env(n: int, kind: str = "message", text: str | None = "x") -> f.Envelope:
    return f.Envelope(
        envelope_id=n,
        kind=kind,
        message_id=f"m{n}",
        sent_at=0,
        sender_user_id=1 if kind == "message" else None,
        sender_device_id="SENDER" if kind == "message" else None,
        ciphertext=text if kind == "message" else None,
    )


def ids(envelopes: list[f.Envelope]) -> list[int]:
    return [e.envelope_id for e in envelopes]


def everything(d: Delivery) -> list[int]:
    """Write what is ready (every id counts as outstanding)."""
    return ids(d.take_ready(range(10**9)))


def test_nothing_is_delivered_before_the_session_starts() -> None:
    d = Delivery(window=10)
    assert d.phase is Phase.WAITING
    assert d.read_limit() == 0  # no read before the session reply is queued
    assert not d.offer(env(1))
    d.start()
    assert d.phase is Phase.BEHIND
    assert d.read_limit() == 10
    assert d.read_limit() == 0  # one read at a time


def test_a_complete_read_with_the_tail_makes_the_connection_live_in_order() -> None:
    d = Delivery(window=10)
    d.start()
    d.read_limit()
    handed = d.read_done([env(3), env(5)], through=5, complete=True, tail=[env(7), env(8)])
    assert ids(handed) == [3, 5, 7, 8]
    assert d.phase is Phase.LIVE
    assert not d.offer(env(8))  # not twice
    assert d.offer(env(9))
    assert everything(d) == [3, 5, 7, 8, 9]


def test_an_incomplete_read_stays_behind_and_reads_on_from_the_cursor() -> None:
    d = Delivery(window=10)
    d.start()
    d.read_limit()
    d.read_done([env(1), env(2)], through=4, complete=False, tail=[env(9)])
    assert d.phase is Phase.BEHIND and d.cursor == 4  # rows it skipped are not read again
    assert d.read_limit() == 8
    d.read_done([env(6)], through=6, complete=True, tail=[env(9)])
    assert everything(d) == [1, 2, 6, 9]


def test_the_window_bounds_what_is_handed_over_and_a_full_one_falls_behind() -> None:
    d = Delivery(window=3)
    d.start()
    d.read_limit()
    d.read_done([], through=0, complete=True, tail=[])
    assert [d.offer(env(n)) for n in (1, 2, 3, 4)] == [True, True, True, False]
    assert d.phase is Phase.BEHIND and d.cursor == 3
    assert everything(d) == [1, 2, 3]
    assert d.read_limit() == 0  # the window is still full
    assert d.ack(2) == [1, 2]
    assert d.read_limit() == 2
    handed = d.read_done([env(4)], through=4, complete=True, tail=[env(5)])
    assert ids(handed) == [4, 5] and d.phase is Phase.LIVE


def test_a_tail_that_overflows_the_window_is_taken_only_in_part() -> None:
    d = Delivery(window=2)
    d.start()
    d.read_limit()
    handed = d.read_done([], through=0, complete=True, tail=[env(1), env(2), env(3)])
    assert ids(handed) == [1, 2]
    assert d.phase is Phase.BEHIND and d.cursor == 2


def test_the_ack_cut_covers_only_what_this_connection_was_sent() -> None:
    d = Delivery(window=10)
    d.start()
    d.read_limit()
    d.read_done([env(1), env(2)], through=2, complete=True, tail=[])
    assert everything(d) == [1, 2]
    d.offer(env(3))  # handed over, not written yet
    assert d.ack(10**12) == [1, 2]  # far beyond: only what was written
    assert d.ack(10**12) == []
    assert everything(d) == [3]
    assert d.ack(2) == []  # below what is left
    assert d.ack(3) == [3]


def test_envelopes_another_connection_acknowledged_are_not_written() -> None:
    d = Delivery(window=10)
    d.start()
    d.read_limit()
    d.read_done([], through=0, complete=True, tail=[env(1), env(2), env(3)])
    assert ids(d.take_ready({1, 3})) == [1, 3]
    assert d.unacked == [1, 3]


def test_a_device_acknowledges_each_envelope_once_across_its_connections() -> None:
    ledger = DeviceLedger()
    one, two = Delivery(window=10), Delivery(window=10)
    for d in (one, two):
        d.start()
        d.read_limit()
        ledger.handed(
            d.read_done([env(1), env(2, kind="delivered")], through=2, complete=True, tail=[])
        )
        everything(d)
    first = ledger.acknowledge(one.ack(2))
    assert [(i, s.kind, s.message_id, s.sender_device_id) for i, s in first] == [
        (1, "message", "m1", "SENDER"),
        (2, "delivered", "m2", None),
    ]
    assert ledger.acknowledge(two.ack(2)) == []  # the second connection's ack adds nothing


def test_a_closing_connection_forgets_only_what_no_other_connection_holds() -> None:
    ledger = DeviceLedger()
    ledger.handed([env(1), env(2)])
    ledger.forget([1, 2], still_held=[[2]])
    assert list(ledger.outstanding) == [2]


def test_the_size_of_a_sent_envelope_is_counted_in_utf8_bytes() -> None:
    ledger = DeviceLedger()
    ledger.handed([env(1, text="€€")])
    assert ledger.outstanding[1].size == 6


def test_answers_keep_request_order_behind_a_pending_one() -> None:
    replies = Replies()
    replies.answer([b"a"])
    slot = replies.reserve()
    replies.answer([b"c"])
    assert replies.take() == [b"a"]
    assert replies.take() == []  # c waits behind the pending slot
    assert replies.waiting == 1 and len(replies) == 2
    replies.fill(slot, [b"b1", b"b2"])
    assert replies.waiting == 0
    assert replies.take() == [b"b1", b"b2", b"c"]
    later = replies.reserve()
    replies.fill(later, [b"d"])
    replies.fill(later, [b"twice"])  # a slot is filled once
    assert replies.take() == [b"d"]


def test_deliver_batches_split_by_count_and_bytes_never_empty() -> None:
    many = [env(n) for n in range(1, 251)]
    assert [len(b) for b in deliver_batches(many)] == [100, 100, 50]
    assert deliver_batches([]) == []


def test_the_delivery_rules_import_no_io() -> None:
    code = (
        "import sys, chatd.protocol.delivery, chatd.protocol.validation\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('trio', 'sqlite3', 'sqlcipher3', 'trio_websocket', 'wsproto'))\n"
        "bad += [m for m in sys.modules if m.startswith(('chatd.store', 'chatd.relay'))]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_envelopes_kept_in_memory_between_the_rows_are_merged_in_order() -> None:
    """An envelope waiting for its ack stays in memory while later ones are
    written: a read's rows and the tail interleave, and come out in id order."""
    d = Delivery(window=10)
    d.start()
    d.read_limit()
    handed = d.read_done([env(5), env(7)], through=7, complete=True, tail=[env(6), env(9)])
    assert ids(handed) == [5, 6, 7, 9] and d.phase is Phase.LIVE


def test_a_merged_read_stops_at_the_window_and_reads_on_from_there() -> None:
    d = Delivery(window=2)
    d.start()
    d.read_limit()
    handed = d.read_done([env(5), env(7)], through=7, complete=True, tail=[env(6)])
    assert ids(handed) == [5, 6]
    assert d.phase is Phase.BEHIND and d.cursor == 6  # 7 is read again


def test_a_held_envelope_stops_the_connection_until_it_is_released() -> None:
    d = Delivery(window=10)
    d.start()
    d.read_limit()
    handed = d.read_done([env(1)], through=1, complete=True, tail=[env(2), env(3)], held={2})
    assert ids(handed) == [1] and d.blocked and d.phase is Phase.BEHIND
    assert d.read_limit() == 0  # no reading while it waits
    assert not d.offer(env(4))
    assert ids(d.resume([env(2), env(3), env(4)])) == [2, 3, 4]
    assert not d.blocked and d.phase is Phase.LIVE


def test_a_live_connection_offered_a_held_envelope_waits_for_it() -> None:
    d = Delivery(window=10)
    d.start()
    d.read_limit()
    d.read_done([], through=0, complete=True, tail=[])
    assert not d.offer(env(1), held=True)
    assert d.blocked and not d.offer(env(2))
    assert ids(d.resume([env(1), env(2)], held=set())) == [1, 2]
