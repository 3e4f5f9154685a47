"""The push sender's DNS answers: each kept ``KEEP_SECONDS``, lookups shared.

The SSRF guard resolves an endpoint's host before every wake-up
(:func:`chatd.push.guard.checked_addresses`), and the POST then goes to an
address it checked. A lookup is ``getaddrinfo`` in a worker thread: measured
with ``bench/push_sender.py --host localhost`` (1,000 wake-ups a second to a
host name), about 210 us of the sender's CPU per wake-up, more than the POST
itself, while in real use nearly every endpoint is on one or a few hosts
(the team's ntfy). So :class:`SharedResolver` keeps each answer for
``KEEP_SECONDS`` and lets wake-ups that need the same name while it is
being looked up wait for that one lookup.

This does not weaken the guard: every wake-up is still checked, against an
answer at most ``KEEP_SECONDS`` old, and the POST goes to an address that
check passed (so a DNS answer that changes to a private address is refused
from the next lookup on, and no connection goes anywhere unchecked). A
failed lookup is not kept: the wake-ups that shared it are retried, and the
next one looks the name up again.
"""

from __future__ import annotations

from typing import Final

import trio

from chatd.push.guard import Resolver

KEEP_SECONDS: Final = 1.0  # an answer is reused for this long (far under any usual DNS TTL)
MAX_NAMES: Final = 4096  # answers kept at most; all are dropped when it is reached


class SharedResolver:
    """A :data:`chatd.push.guard.Resolver` over ``resolve`` that keeps each
    answer ``keep`` seconds and shares a lookup in flight. Raises what
    ``resolve`` raises (OSError), also to the callers that shared it."""

    def __init__(self, resolve: Resolver, keep: float = KEEP_SECONDS) -> None:
        self._resolve = resolve
        self._keep = keep
        self._answers: dict[tuple[str, int], tuple[float, list[str]]] = {}
        self._lookups: dict[tuple[str, int], trio.Event] = {}

    def knows(self, host: str, port: int) -> bool:
        """Whether an answer for ``host`` is kept: then a call returns it
        without waiting."""
        kept = self._answers.get((host, port))
        return kept is not None and kept[0] > trio.current_time()

    async def __call__(self, host: str, port: int) -> list[str]:
        key = (host, port)
        kept = self._answers.get(key)
        if kept is not None and kept[0] > trio.current_time():
            return kept[1]  # no lookup: returns without waiting (see knows)
        lookup = self._lookups.get(key)
        if lookup is not None:
            await lookup.wait()
            kept = self._answers.get(key)
            if kept is None:
                raise OSError("the shared lookup of this name failed")
            return kept[1]
        lookup = self._lookups[key] = trio.Event()
        try:
            answer = await self._resolve(host, port)
            if len(self._answers) >= MAX_NAMES:
                self._answers.clear()
            self._answers[key] = (trio.current_time() + self._keep, answer)
        except BaseException:
            self._answers.pop(key, None)
            raise
        finally:
            del self._lookups[key]
            lookup.set()
        return answer
