"""Per-account rate limits on the relay requests that cost the most.

One account must not be able to flood the server, or the other users through
it: ``send`` and ``room_send`` (queue space, disk writes and deliveries to
every recipient device), ``keys_claim`` (it uses up other devices' one-time
keys), ``directory`` (it reads the whole team) and ``push_register`` /
``push_remove`` (a DNS lookup and a database write each). Each has a token bucket
per user id (:class:`chatd.auth.ratelimit.RateLimiter`, the one the login
limits use): ``relay.*_burst`` requests at once, then ``relay.*_rate_per_user``
a minute, summed over all the account's devices and connections. A refused
request costs nothing and is answered with ``error`` code ``rate_limited`` and
``retry_after`` (docs/PROTOCOL.md section 6.12).

Refusals are logged (``relay.rate_limited``) at most once a minute per user
and kind of request, so a flood does not become a flood of log lines.
Pure and synchronous; use it from the event loop thread only.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Final, Literal

import trio

from chatd.auth.ratelimit import RateLimiter
from chatd.config import RelaySettings
from chatd.log import fields
from chatd.protocol import core

log = logging.getLogger("chatd.relay")

ERR_RATE_LIMITED: Final = "rate_limited"
LOG_PER_MINUTE: Final = 1.0  # relay.rate_limited lines per user and kind, a minute

Kind = Literal["send", "keys_claim", "directory", "push"]


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request refused ``rate_limited``: the error that answers it, and
    the seconds until the account may make one again."""

    actions: list[core.Action]
    retry_after: float


class RequestLimits:
    """The per-account buckets of one relay (see the module docstring)."""

    def __init__(self, settings: RelaySettings) -> None:
        self._buckets: dict[Kind, RateLimiter] = {
            "send": RateLimiter(settings.send_rate_per_user, settings.send_burst),
            "keys_claim": RateLimiter(settings.keys_claim_rate_per_user, settings.keys_claim_burst),
            "directory": RateLimiter(settings.directory_rate_per_user, settings.directory_burst),
            "push": RateLimiter(settings.push_rate_per_user, settings.push_burst),
        }
        self._logged = RateLimiter(LOG_PER_MINUTE, 1)
        self.refused: Counter[str] = Counter()  # refusals by kind, for chatd.metrics

    def refuse(
        self, proto: core.ServerConnection, kind: Kind, user_id: int, request_id: str | None
    ) -> Refusal | None:
        """Take one ``kind`` request of ``user_id``: None if allowed, else the
        ``rate_limited`` error that answers it and its ``retry_after``."""
        now = trio.current_time()
        wait = self._buckets[kind].check(str(user_id), now)
        if not wait:
            return None
        self.refused[kind] += 1
        if not self._logged.check(f"{kind}:{user_id}", now):
            log.warning(
                "relay.rate_limited",
                extra=fields(request=kind, user_id=user_id, retry_after=round(wait, 3)),
            )
        what = "messages" if kind == "send" else f"{kind} requests"
        error = proto.error(
            ERR_RATE_LIMITED,
            f"too many {what} from this account; retry after {math.ceil(wait)} s",
            request_id=request_id,
            retry_after=round(wait, 3),
        )
        return Refusal(error, wait)
