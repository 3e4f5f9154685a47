"""Client addresses: who is behind a trusted proxy, and what one address may hold.

:class:`TrustedProxies` finds a connection's client address: the TCP peer,
or behind a trusted reverse proxy the right-most ``X-Forwarded-For`` entry
that is not itself one. Without the limits below, one address could take every connection slot
(``relay.max_connections``): 10,000 connections that each got ``hello`` and
sat there until the authentication timeout left a legitimate client a 503.
:class:`AddressLimits` counts, per client address (the one behind
``relay.trusted_proxies``; an IPv6 one by its /64, :func:`address_key`),
the connections it holds and how many of them have not authenticated yet,
and refuses a further upgrade past ``relay.max_connections_per_address`` or
``relay.max_unauthenticated_per_address`` with 429 and ``Retry-After``,
before anything of the WebSocket is set up.

A connection is counted from the moment it is admitted (before the 101 is
written, so concurrent handshakes cannot slip past the limit) until its
handler ends. Whether it has authenticated is read from its protocol core
when a new one from the same address asks (at most the limit of them to
look at, and only for an address under its limit), so nothing has to tell
this class when a login succeeds.

A flood of connections from an address over its limit is refused cheaper
still. Such an address gets its 429s at a steady rate, at most
ANSWERED_PER_SECOND a second (a token bucket holding ANSWERED_BURST), and
the budget is taken at accept, before the request is read, so a row of
connections accepted together cannot all be answered. A connection beyond
the budget is closed by the accept loop at once, before a task is started
for it or a byte is read (the peer sees a reset or an empty reply), and
:meth:`AddressLimits.hang_up` says until when the address's connections are
refused so: until its next 429 is due, at most 1/ANSWERED_PER_SECOND s
later. For that time the accept loop has the kernel drop its SYNs
unanswered (:mod:`chatd.relay.syndrop`). A steady rate, not ten at the turn
of each second, keeps the answering from coming in bursts that hold up
everyone else's traffic.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import TYPE_CHECKING, Final

from chatd.log import client_network

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from chatd.relay.connection import Connection

RETRY_AFTER_SECONDS: Final = 10  # what a refused client is told to wait, in seconds
REASON_ADDRESS_FULL: Final = b"too many connections from this address\n"
REASON_ADDRESS_UNAUTHENTICATED: Final = b"too many unauthenticated connections from this address\n"
ANSWERED_PER_SECOND: Final = 10.0  # 429s an address over its limits gets a second, steadily
ANSWERED_BURST: Final = 3.0  # and at most this many in a row
_KNOWN_ADDRESSES: Final = 4_096  # peers whose trust is remembered (then forgotten at once)


class TrustedProxies:
    """Finds the client's address behind the reverse proxies we believe."""

    def __init__(self, networks: tuple[str, ...]) -> None:
        self.networks = [ipaddress.ip_network(n, strict=False) for n in networks]
        self._known: dict[str, bool] = {}  # address -> trusted, asked at every accept

    def trusted(self, address: str) -> bool:
        known = self._known.get(address)
        if known is None:
            if len(self._known) >= _KNOWN_ADDRESSES:
                self._known.clear()
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                known = False
            else:
                known = any(ip in network for network in self.networks)
            self._known[address] = known
        return known

    def client_address(self, peer: str, headers: list[tuple[bytes, bytes]]) -> str:
        """The TCP peer, or, behind a trusted reverse proxy, the right-most
        X-Forwarded-For entry that is not itself a trusted proxy."""
        if not self.trusted(peer):
            return peer
        forwarded = ",".join(
            value.decode("latin-1") for key, value in headers if key.lower() == b"x-forwarded-for"
        )
        for candidate in reversed([part.strip() for part in forwarded.split(",")][-32:]):
            try:
                ipaddress.ip_address(candidate)
            except ValueError:
                return peer  # a malformed chain: trust nothing in it
            if not self.trusted(candidate):
                return candidate
        return peer


@functools.lru_cache(maxsize=4_096)
def address_key(address: str) -> str:
    """What the limits count ``address`` as: an IPv4 address as itself, an
    IPv6 one as its /64 (``2001:db8:1:2::/64``), as the login rate limits do
    (:func:`chatd.log.client_network`): one IPv6 client has a whole /64 to
    pick addresses from. Anything else (not an IP address) as itself."""
    network = client_network(address)
    return address if network == "-" else network


class _Budget:
    """The 429s an address over its limits may still be answered (a token bucket)."""

    __slots__ = ("at", "over", "tokens")

    def __init__(self, now: float) -> None:
        self.tokens = ANSWERED_BURST
        self.at = now  # when tokens was last brought up to date
        self.over = False  # found over its limits since one of its connections last ended

    def take(self, now: float) -> float:
        """Take one 429 if one is due and return 0.0; else the seconds until one is."""
        tokens = min(ANSWERED_BURST, self.tokens + (now - self.at) * ANSWERED_PER_SECOND)
        self.at = now
        if tokens >= 1.0 - 1e-9:  # (float sums of the refill)
            self.tokens = tokens - 1.0
            return 0.0
        self.tokens = tokens
        return (1.0 - tokens) / ANSWERED_PER_SECOND


class _Tally:
    __slots__ = ("admitted", "connections")

    def __init__(self) -> None:
        self.admitted = 0  # every connection of the address, accepted or being accepted
        self.connections: set[Connection] = set()  # those past the upgrade


class AddressLimits:
    """Open and unauthenticated connections per client address."""

    def __init__(self, per_address: int, unauthenticated: int) -> None:
        self.per_address = per_address
        self.unauthenticated = unauthenticated
        self._tallies: dict[str, _Tally] = {}
        self.refused = 0  # upgrades refused since start (for tests and metrics)
        self.hung_up = 0  # connections closed at accept since start (see hang_up)
        self._budgets: dict[str, _Budget] = {}  # addresses refused while they have connections

    def admit(self, address: str, now: float) -> bytes | None:
        """Count one more connection of ``address``; or, past a limit, count
        nothing and return the refusal's body (answer 429 with it)."""
        tally = self._tallies.get(address)
        if tally is not None:
            refusal = self._over(address, tally)
            if refusal is not None:
                self.refused += 1
                if address not in self._budgets:  # its first 429: from now on, budgeted
                    budget = self._budgets[address] = _Budget(now)
                    budget.take(now)  # this one
                return refusal
        else:
            tally = self._tallies[address] = _Tally()
        tally.admitted += 1
        return None

    def hang_up(self, address: str, now: float) -> float | None:
        """At accept, before the request is read: None to go on with a new
        connection of ``address``; or, for an address over its limits that
        has had its 429s for now, close it unanswered, and the time until
        which its connections are refused so (when its next 429 is due).
        Going on takes one 429 from its budget, since the connection will
        most likely be answered one. For a trusted proxy this names the
        proxy, not its clients: ask only for other peers."""
        budget = self._budgets.get(address)
        if budget is None:  # never refused, or not since its connections all ended
            return None
        wait = budget.take(now)
        if not wait:
            return None
        if not budget.over:
            tally = self._tallies.get(address)
            if tally is None or self._over(address, tally) is None:
                return None  # under its limits again: let it in
            # Over its limits: so it stays until one of its connections ends
            # (a login in the meantime is not seen; its clients were told to
            # wait 10 s anyway).
            budget.over = True
        self.hung_up += 1
        return now + wait

    def _over(self, address: str, tally: _Tally) -> bytes | None:
        if tally.admitted >= self.per_address:
            return REASON_ADDRESS_FULL
        if self.unauthenticated_of(address) >= self.unauthenticated:
            return REASON_ADDRESS_UNAUTHENTICATED
        return None

    def bind(self, address: str, conn: Connection) -> None:
        """The admitted connection of ``address`` is upgraded: it is ``conn``."""
        self._tallies[address].connections.add(conn)

    def release(self, address: str, conn: Connection | None) -> None:
        """An admitted connection of ``address`` ended (``conn``, if bound)."""
        tally = self._tallies[address]
        tally.admitted -= 1
        if conn is not None:
            tally.connections.discard(conn)
        if not tally.admitted:
            del self._tallies[address]
            self._budgets.pop(address, None)
        else:
            budget = self._budgets.get(address)
            if budget is not None:
                budget.over = False  # perhaps under its limits again

    def unauthenticated_of(self, address: str) -> int:
        """Connections of ``address`` without a session yet."""
        tally = self._tallies.get(address)
        if tally is None:
            return 0
        return tally.admitted - sum(1 for c in tally.connections if c.proto.authenticated)

    def connections_of(self, address: str) -> int:
        tally = self._tallies.get(address)
        return 0 if tally is None else tally.admitted
