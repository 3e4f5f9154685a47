"""Dropping a flooding address's new connections in the kernel.

An address the relay hangs up on at accept (:mod:`chatd.relay.addresses`:
it was answered 429 ten times this second and is still over its limits)
used to cost the event loop an ``accept`` and a ``close`` per connection,
about 25 µs each. At a few thousand connections a second from one address
that was a tenth of the loop, and the other clients' p99 doubled.

:class:`SynDrops` moves that refusal into the kernel. It keeps a classic BPF
socket filter on each listening socket (``SO_ATTACH_FILTER``: unprivileged,
on the relay's own sockets only) that drops TCP segments from the addresses
being hung up on. A dropped SYN is never answered: no connection is made,
nothing reaches the accept queue, and the peer's TCP stack retries after its
retransmission timeout (1 s on Linux, then longer). Each address is dropped
until a deadline, or until it is
back under its limits (:meth:`SynDrops.discard`); then the filter is rebuilt
without it. The deadline is when the address's next 429 is due, at most
0.1 s away. The filter is rebuilt only when the set changes, at about 65 µs;
at most CAPACITY addresses are dropped at once, and any beyond that are
still hung up on in the accept loop.

Accepted sockets inherit the listener's filter as it was when the kernel
made them. While a filter is attached, the accept loop takes it off each
accepted socket (:meth:`SynDrops.accepted`, one system call), so the
connections accepted during a flood do not run the listener's filter on
every segment for the rest of their lives.

The program matches the IPv4 source address at offset 12 of the network
header and the IPv6 one at offsets 8 to 20 (``SKF_NET_OFF``: the filter
sees a TCP segment from its TCP header on), so one program serves IPv4,
IPv6 and dual-stack listeners; an IPv4-mapped peer (``::ffff:a.b.c.d``) is
matched as IPv4, and an IPv6 /64 (what the relay counts IPv6 clients by)
on its first 8 bytes. Where the kernel refuses the filter (not Linux, a sandbox,
``net.core.optmem_max``), it is logged once and the accept loop's hang-up
stays the only refusal.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import logging
import math
import socket
import struct
import sys
from typing import Final

import trio

from chatd.log import fields

log = logging.getLogger("chatd.relay")

CAPACITY: Final = 64  # addresses dropped at once (the program stays under 700 instructions)
SO_ATTACH_FILTER: Final = getattr(socket, "SO_ATTACH_FILTER", 26)
SO_DETACH_FILTER: Final = getattr(socket, "SO_DETACH_FILTER", 27)

# Classic BPF (linux/filter.h): opcodes and the network header's offset.
_LD_W_ABS: Final = 0x20  # A = 32-bit word at k
_LD_B_ABS: Final = 0x30  # A = byte at k
_AND_K: Final = 0x54  # A &= k
_JEQ_K: Final = 0x15  # if A == k: skip jt, else skip jf
_RET_K: Final = 0x06  # keep k bytes (0: drop)
_NET: Final = -0x100000  # SKF_NET_OFF: offsets from the network header
_KEEP: Final = 0xFFFFFFFF
_DROP: Final = 0


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k & 0xFFFFFFFF)


def program(v4: list[int], v6: list[bytes]) -> list[bytes]:
    """The filter's instructions: drop a segment whose source is one of
    ``v4`` (addresses as integers) or starts with one of ``v6`` (a whole
    address of 16 bytes, or a /64 prefix of 8), keep the rest."""
    v4_part = [_insn(_LD_W_ABS, 0, 0, _NET + 12)]
    for number in v4:
        v4_part += [_insn(_JEQ_K, 0, 1, number), _insn(_RET_K, 0, 0, _DROP)]
    v4_part.append(_insn(_RET_K, 0, 0, _KEEP))
    v6_part = []
    for prefix in v6:
        words = struct.unpack(f"!{len(prefix) // 4}I", prefix)
        last = 2 * len(words) - 1  # each word is a load and a test, then the drop
        for i, word in enumerate(words):  # on a mismatch skip to the next entry
            v6_part.append(_insn(_LD_W_ABS, 0, 0, _NET + 8 + 4 * i))
            v6_part.append(_insn(_JEQ_K, 0, last - 2 * i, word))
        v6_part.append(_insn(_RET_K, 0, 0, _DROP))
    v6_part.append(_insn(_RET_K, 0, 0, _KEEP))
    version = [
        _insn(_LD_B_ABS, 0, 0, _NET),
        _insn(_AND_K, 0, 0, 0xF0),
        _insn(_JEQ_K, 0, len(v4_part), 0x40),  # IPv4: go on; else skip to the IPv6 part
    ]
    return version + v4_part + v6_part


def _key(address: str) -> int | bytes | None:
    """``address`` as the filter matches it: an IPv4 address as an integer,
    an IPv6 one as its 16 bytes, an IPv6 /64 network (``2001:db8::/64``,
    what the relay's limits count IPv6 clients by) as its 8; None if it is
    none of these."""
    if "/" in address:
        try:
            network = ipaddress.ip_network(address)
        except ValueError:
            return None
        if network.version != 6 or network.prefixlen != 64:
            return None
        return network.network_address.packed[:8]
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        return ip.packed if ip.ipv4_mapped is None else int(ip.ipv4_mapped)
    return int(ip)


class SynDrops:
    """The addresses whose segments the listening sockets drop, each until a deadline."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self.available = sys.platform == "linux"  # SO_ATTACH_FILTER is Linux's
        self._sockets: list[socket.socket] = []
        self._until: dict[str, float] = {}  # address -> trio time its drop ends
        self._attached = False
        self._changed = trio.Event()
        self.dropped = 0  # addresses put into the filter since start (for tests and metrics)

    @property
    def active(self) -> bool:
        """Whether a filter is attached (accepted sockets carry a copy)."""
        return self._attached

    def dropping(self, address: str) -> bool:
        return address in self._until

    def watch(self, sock: socket.socket) -> None:
        """Keep the filter on the listening socket ``sock`` too."""
        self._sockets.append(sock)
        if self._attached:
            self._rebuild()

    def unwatch(self, sock: socket.socket) -> None:
        """Take the filter off ``sock`` (before it is closed) and forget it."""
        self._sockets.remove(sock)
        if self._attached:
            _detach(sock)

    def add(self, address: str, until: float) -> bool:
        """Drop ``address``'s segments until ``until`` (trio time); False if
        it cannot be (full, not an IP address, or no filter on this system)."""
        if not self.available or address in self._until or len(self._until) >= self.capacity:
            return False
        if _key(address) is None:
            return False
        self._until[address] = until
        self._rebuild()
        if not self.available:  # the kernel refused the filter
            return False
        self.dropped += 1
        self._changed.set()
        return True

    def discard(self, address: str) -> None:
        """Stop dropping ``address`` (it is back under its limits)."""
        if self._until.pop(address, None) is not None:
            self._rebuild()

    def accepted(self, sock: socket.socket) -> None:
        """Take the inherited filter off a socket just accepted."""
        if self._attached:
            _detach(sock)  # none if the kernel made it before the filter

    async def run(self) -> None:
        """Lift each drop at its deadline; runs until cancelled, then takes the filter off."""
        try:
            while True:
                self._changed = trio.Event()
                deadline = min(self._until.values(), default=math.inf)
                with trio.move_on_at(deadline):
                    await self._changed.wait()
                now = trio.current_time()
                expired = [address for address, until in self._until.items() if until <= now]
                for address in expired:
                    del self._until[address]
                if expired:
                    self._rebuild()
        finally:
            self._until.clear()
            self._rebuild()

    def _rebuild(self) -> None:
        v4: list[int] = []
        v6: list[bytes] = []
        for address in self._until:
            key = _key(address)
            if isinstance(key, int):
                v4.append(key)
            elif key is not None:
                v6.append(key)
        try:
            if v4 or v6:
                code = bytearray(b"".join(program(v4, v6)))
                pointer = ctypes.addressof(ctypes.c_char.from_buffer(code))  # no new ctypes type
                fprog = struct.pack("@HL", len(code) // 8, pointer)
                for sock in self._sockets:  # the kernel copies the program
                    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
                self._attached = True
            elif self._attached:
                for sock in self._sockets:
                    _detach(sock)
                self._attached = False
        except OSError as exc:
            log.warning(
                "relay.syn_drop_unavailable",
                extra=fields(error=errno.errorcode.get(exc.errno or 0, str(exc))),
            )
            self.available = False
            self._until.clear()
            self._attached = False
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    _detach(sock)


def _detach(sock: socket.socket) -> None:
    """Take the filter off ``sock``, if it has one."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    except OSError as exc:
        if exc.errno != errno.ENOENT:  # ENOENT: it has none
            raise
