"""Keyed rate limits and failure back-off, in bounded memory. Pure and synchronous.

Two tools, both keyed by a string the caller chooses (a source address, a
normalised username, or both joined):

* :class:`RateLimiter` is a token bucket per key: up to ``burst`` requests at
  once, refilled at ``rate_per_minute``. It limits how often anyone may try.
* :class:`FailureBackoff` counts consecutive failures per key (wrong
  password, wrong code) and makes the key wait 1, 2, 4, 8, ... seconds after
  each, up to a cap. It slows guessing against one account without ever
  locking the owner out for good: the wait is capped at ``max_seconds``, and
  the count is forgotten after ``forget_after`` seconds without a failure
  (ASVS 5.0 6.1.1 and 6.3.1: throttle, do not lock out forever).

Time is always passed in (``trio.current_time()`` in the server, plain floats
in tests), so both are deterministic and never sleep. Neither is thread-safe:
use them from the event loop thread only.

Memory is bounded: each holds at most ``max_keys`` entries. When full, the
least recently used entry is dropped. Dropping only ever makes a key *less*
limited for a moment (a dropped bucket comes back full; a dropped failure
count comes back at zero); it never refuses anyone wrongly. The entry dropped
is the one idle the longest, which for a bucket has usually refilled
completely, and then dropping it loses nothing at all. Filling 100,000
entries takes as many distinct keys, which a per-address limit in front
already slows down, and even then the other limits and the password hash cost
still apply. That trade is accepted so that no flood of keys can exhaust
memory.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

DEFAULT_MAX_KEYS: Final = 100_000  # entries kept per limiter
#: Largest exponent used for back-off; 2**64 seconds already exceeds any cap,
#: so counting further only risks float overflow.
_MAX_DOUBLINGS: Final = 64


@dataclass(slots=True)
class _Bucket:
    tokens: float  # requests available now, 0 <= tokens <= burst
    updated: float  # time ``tokens`` was last brought up to date


class RateLimiter:
    """A token bucket per key, with at most ``max_keys`` buckets.

    Each key may make ``burst`` requests at once and then ``rate_per_minute``
    a minute on average. A refused request costs nothing, so a client that
    waits ``retry_after`` seconds is then allowed.
    """

    def __init__(
        self, rate_per_minute: float, burst: int, *, max_keys: int = DEFAULT_MAX_KEYS
    ) -> None:
        if not rate_per_minute > 0:
            raise ValueError("rate_per_minute must be greater than 0")
        if burst < 1:
            raise ValueError("burst must be at least 1")
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.rate_per_minute = rate_per_minute
        self.burst = burst
        self.max_keys = max_keys
        self._per_second = rate_per_minute / 60.0
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        """How many keys are tracked now."""
        return len(self._buckets)

    def check(self, key: str, now: float) -> float:
        """Take one request for ``key`` at time ``now`` (seconds).

        Returns 0.0 when allowed (a token is used up), else the seconds to
        wait before a request would be allowed (greater than 0; nothing is
        used up). A clock that goes backwards is treated as standing still.
        """
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._buckets.popitem(last=False)  # least recently used
            bucket = _Bucket(tokens=float(self.burst), updated=now)
            self._buckets[key] = bucket
        else:
            self._buckets.move_to_end(key)
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(float(self.burst), bucket.tokens + elapsed * self._per_second)
            bucket.updated = max(bucket.updated, now)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self._per_second


@dataclass(slots=True)
class _Failures:
    count: int  # consecutive failures
    last: float  # time of the latest one


class FailureBackoff:
    """Exponential back-off after consecutive failures, per key.

    After ``n`` consecutive failures a key must wait
    ``min(base_seconds * 2**(n-1), max_seconds)`` seconds from its last
    failure. :meth:`success` clears the key; so does ``forget_after`` seconds
    without a failure. The caller asks :meth:`retry_after` before an attempt
    and refuses while it is above 0, then reports the outcome with
    :meth:`failure` or :meth:`success`.
    """

    def __init__(
        self,
        base_seconds: float = 1.0,
        max_seconds: float = 900.0,
        *,
        forget_after: float = 86_400.0,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        if not base_seconds > 0:
            raise ValueError("base_seconds must be greater than 0")
        if not max_seconds >= base_seconds:
            raise ValueError("max_seconds must be at least base_seconds")
        if not forget_after > 0:
            raise ValueError("forget_after must be greater than 0")
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.base_seconds = base_seconds  # wait after the first failure
        self.max_seconds = max_seconds  # longest wait, however many failures
        self.forget_after = forget_after  # seconds without failure that clear a key
        self.max_keys = max_keys
        self._failures: OrderedDict[str, _Failures] = OrderedDict()

    def __len__(self) -> int:
        """How many keys are tracked now."""
        return len(self._failures)

    def delay(self, failures: int) -> float:
        """The wait, in seconds, after ``failures`` consecutive failures."""
        if failures < 1:
            return 0.0
        doublings = min(failures - 1, _MAX_DOUBLINGS)
        return min(self.base_seconds * 2.0**doublings, self.max_seconds)

    def _current(self, key: str, now: float) -> _Failures | None:
        entry = self._failures.get(key)
        if entry is not None and now - entry.last >= self.forget_after:
            del self._failures[key]
            return None
        return entry

    def retry_after(self, key: str, now: float) -> float:
        """Seconds ``key`` must still wait at ``now``; 0.0 if it may try now."""
        entry = self._current(key, now)
        if entry is None:
            return 0.0
        return max(0.0, entry.last + self.delay(entry.count) - now)

    def failure(self, key: str, now: float) -> None:
        """Record a failed attempt by ``key`` at ``now``."""
        entry = self._current(key, now)
        if entry is None:
            if len(self._failures) >= self.max_keys:
                self._failures.popitem(last=False)  # least recently failed
            self._failures[key] = _Failures(count=1, last=now)
            return
        entry.count += 1
        entry.last = max(entry.last, now)
        self._failures.move_to_end(key)

    def success(self, key: str) -> None:
        """Record a successful attempt: ``key`` starts again from no failures."""
        self._failures.pop(key, None)
