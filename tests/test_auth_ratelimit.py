"""Rate limits and back-off: allowed bursts, honest retry_after, bounded memory."""

from __future__ import annotations

import pytest

from chatd.auth.ratelimit import FailureBackoff, RateLimiter

# -- RateLimiter ----------------------------------------------------------------


def test_burst_then_refusal_with_retry_after() -> None:
    limiter = RateLimiter(rate_per_minute=60, burst=3)  # one token a second
    assert [limiter.check("a", 100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.check("a", 100.0) == pytest.approx(1.0)
    assert limiter.check("a", 100.5) == pytest.approx(0.5)


def test_refusal_costs_nothing_and_waiting_retry_after_is_enough() -> None:
    limiter = RateLimiter(rate_per_minute=6, burst=1)  # one token per 10 s
    assert limiter.check("a", 0.0) == 0.0
    wait = limiter.check("a", 0.0)
    assert wait == pytest.approx(10.0)
    for _ in range(5):  # hammering while refused does not push the wait back
        assert limiter.check("a", 4.0) == pytest.approx(6.0)
    assert limiter.check("a", 0.0 + wait) == 0.0


def test_refill_over_time_up_to_burst() -> None:
    limiter = RateLimiter(rate_per_minute=120, burst=4)  # two tokens a second
    for _ in range(4):
        assert limiter.check("a", 0.0) == 0.0
    assert limiter.check("a", 0.0) > 0
    assert limiter.check("a", 1.0) == 0.0  # two refilled
    assert limiter.check("a", 1.0) == 0.0
    assert limiter.check("a", 1.0) == pytest.approx(0.5)
    # A long idle spell refills only up to the burst.
    results = [limiter.check("a", 1_000.0) for _ in range(5)]
    assert results[:4] == [0.0] * 4
    assert results[4] == pytest.approx(0.5)


def test_keys_are_independent() -> None:
    limiter = RateLimiter(rate_per_minute=1, burst=1)
    assert limiter.check("a", 0.0) == 0.0
    assert limiter.check("a", 0.0) == pytest.approx(60.0)
    assert limiter.check("b", 0.0) == 0.0


def test_clock_going_backwards_is_standing_still() -> None:
    limiter = RateLimiter(rate_per_minute=60, burst=1)
    assert limiter.check("a", 50.0) == 0.0
    assert limiter.check("a", 10.0) == pytest.approx(1.0)
    assert limiter.check("a", 51.0) == 0.0


def test_limiter_memory_is_bounded_and_evicts_least_recently_used() -> None:
    limiter = RateLimiter(rate_per_minute=1, burst=1, max_keys=3)
    for key in ("a", "b", "c"):
        assert limiter.check(key, 0.0) == 0.0
    assert limiter.check("a", 1.0) > 0  # touch a: b is now least recently used
    assert limiter.check("d", 1.0) == 0.0
    assert len(limiter) == 3
    assert limiter.check("a", 1.0) > 0  # a was kept, still limited
    assert limiter.check("c", 1.0) > 0  # c was kept
    # b was dropped: it comes back with a full bucket (less limited, never more).
    assert limiter.check("b", 1.0) == 0.0
    assert len(limiter) == 3
    for i in range(1_000):
        limiter.check(f"k{i}", 2.0)
    assert len(limiter) == 3


def test_limiter_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="rate_per_minute"):
        RateLimiter(rate_per_minute=0, burst=1)
    with pytest.raises(ValueError, match="rate_per_minute"):
        RateLimiter(rate_per_minute=float("nan"), burst=1)
    with pytest.raises(ValueError, match="burst"):
        RateLimiter(rate_per_minute=1, burst=0)
    with pytest.raises(ValueError, match="max_keys"):
        RateLimiter(rate_per_minute=1, burst=1, max_keys=0)


# -- FailureBackoff -------------------------------------------------------------


def test_backoff_doubles_and_is_capped() -> None:
    backoff = FailureBackoff(base_seconds=1.0, max_seconds=60.0)
    assert backoff.retry_after("u", 0.0) == 0.0
    waits = []
    now = 0.0
    for _ in range(9):
        backoff.failure("u", now)
        waits.append(backoff.retry_after("u", now))
        now += waits[-1]  # wait exactly as told, then fail again
        assert backoff.retry_after("u", now) == 0.0
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]


def test_backoff_delay_formula() -> None:
    backoff = FailureBackoff(base_seconds=0.5, max_seconds=900.0)
    assert [backoff.delay(n) for n in range(6)] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]
    assert backoff.delay(12) == 900.0
    assert backoff.delay(10_000) == 900.0  # no overflow, still the cap


def test_backoff_counts_down_from_last_failure() -> None:
    backoff = FailureBackoff()
    for _ in range(3):
        backoff.failure("u", 100.0)
    assert backoff.retry_after("u", 100.0) == 4.0
    assert backoff.retry_after("u", 101.5) == 2.5
    assert backoff.retry_after("u", 104.0) == 0.0
    assert backoff.retry_after("u", 5_000.0) == 0.0


def test_backoff_default_cap_is_fifteen_minutes() -> None:
    backoff = FailureBackoff()
    for _ in range(50):
        backoff.failure("u", 0.0)
    assert backoff.retry_after("u", 0.0) == 900.0  # never locked forever


def test_success_resets() -> None:
    backoff = FailureBackoff()
    for _ in range(5):
        backoff.failure("u", 0.0)
    backoff.success("u")
    assert backoff.retry_after("u", 0.0) == 0.0
    backoff.failure("u", 0.0)
    assert backoff.retry_after("u", 0.0) == 1.0
    backoff.success("never-failed")  # harmless


def test_count_forgotten_after_quiet_period() -> None:
    backoff = FailureBackoff(forget_after=3_600.0)
    for _ in range(6):
        backoff.failure("u", 0.0)
    assert backoff.retry_after("u", 3_599.0) == 0.0  # the wait (32 s) is long over
    backoff.failure("u", 3_599.0)  # within the hour: the count goes on to 7
    assert backoff.retry_after("u", 3_599.0) == 64.0
    backoff.failure("u", 3_599.0 + 3_600.0)  # an hour quiet: starts again at 1
    assert backoff.retry_after("u", 3_599.0 + 3_600.0) == 1.0
    assert backoff.retry_after("u", 3_599.0 + 7_200.0) == 0.0
    assert len(backoff) == 0  # the forgotten entry was dropped


def test_backoff_keys_are_independent() -> None:
    backoff = FailureBackoff()
    backoff.failure("alice", 0.0)
    backoff.failure("alice", 0.0)
    assert backoff.retry_after("alice", 0.0) == 2.0
    assert backoff.retry_after("bob", 0.0) == 0.0


def test_backoff_memory_is_bounded() -> None:
    backoff = FailureBackoff(max_keys=2)
    backoff.failure("a", 0.0)
    backoff.failure("b", 1.0)
    backoff.failure("a", 2.0)  # a failed most recently: b is least recent
    backoff.failure("c", 3.0)
    assert len(backoff) == 2
    assert backoff.retry_after("a", 3.0) > 0
    assert backoff.retry_after("c", 3.0) > 0
    assert backoff.retry_after("b", 3.0) == 0.0  # dropped: less limited, never more
    for i in range(1_000):
        backoff.failure(f"k{i}", 4.0)
    assert len(backoff) == 2


def test_backoff_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="base_seconds"):
        FailureBackoff(base_seconds=0)
    with pytest.raises(ValueError, match="max_seconds"):
        FailureBackoff(base_seconds=10, max_seconds=5)
    with pytest.raises(ValueError, match="forget_after"):
        FailureBackoff(forget_after=0)
    with pytest.raises(ValueError, match="max_keys"):
        FailureBackoff(max_keys=0)
