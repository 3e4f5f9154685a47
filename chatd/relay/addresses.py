"""Connections per client address: what one address may hold of the relay.

Without this, one address could take every connection slot
(``relay.max_connections``): 10,000 connections that each got ``hello`` and
sat there until the authentication timeout left a legitimate client a 503.
:class:`AddressLimits` counts, per client address (the one behind
``relay.trusted_proxies``, see :class:`chatd.relay.server.TrustedProxies`),
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
still: once the address has been answered 429 ANSWERED_PER_SECOND times in
the current second, :meth:`AddressLimits.hang_up` tells the accept loop to
close its further connections at once, before a task is started for them
or a byte is read (the peer sees a reset or an empty reply), until the next
second or until the address is back under its limits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from chatd.relay.connection import Connection

RETRY_AFTER_SECONDS: Final = 10  # what a refused client is told to wait, in seconds
REASON_ADDRESS_FULL: Final = b"too many connections from this address\n"
REASON_ADDRESS_UNAUTHENTICATED: Final = b"too many unauthenticated connections from this address\n"
ANSWERED_PER_SECOND: Final = 10  # 429s one address gets per second before it is hung up on


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
        self._second = 0  # the whole second _answered counts in
        self._answered: dict[str, int] = {}  # address -> 429s in that second
        self._hanging: set[str] = set()  # addresses found over their limit in it

    def admit(self, address: str, now: float) -> bytes | None:
        """Count one more connection of ``address``; or, past a limit, count
        nothing and return the refusal's body (answer 429 with it)."""
        tally = self._tallies.get(address)
        if tally is not None:
            refusal = self._over(address, tally)
            if refusal is not None:
                self.refused += 1
                second = int(now)
                if second != self._second:
                    self._second, self._answered, self._hanging = second, {}, set()
                self._answered[address] = self._answered.get(address, 0) + 1
                return refusal
        else:
            tally = self._tallies[address] = _Tally()
        tally.admitted += 1
        return None

    def hang_up(self, address: str, now: float) -> bool:
        """Whether to close a new connection of ``address`` at accept,
        unanswered: it is over a limit and was answered 429
        ANSWERED_PER_SECOND times already this second. Called before the
        request is read, so for a trusted proxy it names the proxy: ask
        only for other peers."""
        if self._answered.get(address, 0) < ANSWERED_PER_SECOND or int(now) != self._second:
            return False
        if address not in self._hanging:
            tally = self._tallies.get(address)
            if tally is None or self._over(address, tally) is None:
                return False
            # Over its limit: so it stays for the rest of this second, unless
            # one of its connections ends (a login in the meantime is not
            # seen; its clients were told to wait 10 s anyway).
            self._hanging.add(address)
        self.hung_up += 1
        return True

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
        self._hanging.discard(address)  # perhaps under its limits again
        tally = self._tallies[address]
        tally.admitted -= 1
        if conn is not None:
            tally.connections.discard(conn)
        if not tally.admitted:
            del self._tallies[address]

    def unauthenticated_of(self, address: str) -> int:
        """Connections of ``address`` without a session yet."""
        tally = self._tallies.get(address)
        if tally is None:
            return 0
        return tally.admitted - sum(1 for c in tally.connections if c.proto.authenticated)

    def connections_of(self, address: str) -> int:
        tally = self._tallies.get(address)
        return 0 if tally is None else tally.admitted
