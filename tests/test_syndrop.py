"""The kernel filter that drops a flooding address's SYNs (chatd.relay.syndrop).

Over real loopback listening sockets: a dropped address's connection stays
in SYN-SENT (its SYN unanswered), another address's is accepted, and once
the drop is lifted (discarded, or at its deadline) the address gets in
again. Loopback has all of 127/8 and ::1.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import trio
import trio.testing

from chatd.relay.syndrop import CAPACITY, SO_DETACH_FILTER, SynDrops, program

TCP_SYN_SENT = 2


def tcp_state(sock: socket.socket) -> int:
    return int(struct.unpack("B", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1))[0])


@contextmanager
def listening(family: socket.AddressFamily = socket.AF_INET) -> Iterator[socket.socket]:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # dual-stack
            sock.bind(("::", 0))
        else:
            sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        sock.settimeout(10)  # a test that fails does not hang
        yield sock
    finally:
        sock.close()


def connecting(listener: socket.socket, source: str) -> socket.socket:
    """A non-blocking connect from ``source`` to ``listener``, under way."""
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.setblocking(False)
    target = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    try:
        sock.connect((target, listener.getsockname()[1]))
    except BlockingIOError:
        pass
    return sock


def accepted_from(listener: socket.socket, source: str) -> socket.socket:
    """Connect from ``source`` and accept it: once this returns, every SYN
    sent before it has been handled (loopback keeps order)."""
    client = connecting(listener, source)
    server, peer = listener.accept()
    assert peer[0] in (source, f"::ffff:{source}")
    client.close()
    return server


def test_the_program_keeps_every_jump_in_range_and_under_the_kernel_limit() -> None:
    """Classic BPF jumps are one byte and a program at most 4,096
    instructions: at CAPACITY addresses of either kind both hold."""
    for v4, v6 in ((CAPACITY, 0), (0, CAPACITY), (CAPACITY // 2, CAPACITY // 2)):
        for size in (16, 8):  # whole IPv6 addresses, /64 prefixes
            prefixes = [bytes(size - 1) + bytes([i]) for i in range(v6)]
            insns = program(list(range(1, v4 + 1)), prefixes)
            assert len(insns) < 4096
            for insn in insns:
                _code, jt, jf, _k = struct.unpack("=HBBI", insn)
                assert jt < 256 and jf < 256


def test_a_dropped_address_gets_no_answer_and_another_is_accepted() -> None:
    with listening() as listener:
        drops = SynDrops()
        drops.watch(listener)
        assert drops.add("127.0.0.2", until=1e12) and drops.active
        flooder = connecting(listener, "127.0.0.2")
        accepted_from(listener, "127.0.0.3").close()
        assert tcp_state(flooder) == TCP_SYN_SENT  # its SYN was dropped
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing of it queued
        listener.settimeout(10)
        flooder.close()
        drops.discard("127.0.0.2")  # back under its limits
        assert not drops.active
        accepted_from(listener, "127.0.0.2").close()


def test_a_dual_stack_listener_drops_ipv6_and_ipv4_mapped_addresses() -> None:
    with listening(socket.AF_INET6) as listener:
        drops = SynDrops()
        drops.watch(listener)
        assert drops.add("::1", until=1e12)
        assert drops.add("::ffff:127.0.0.2", until=1e12)  # as accept names it
        six, mapped = connecting(listener, "::1"), connecting(listener, "127.0.0.2")
        accepted_from(listener, "127.0.0.3").close()
        assert tcp_state(six) == tcp_state(mapped) == TCP_SYN_SENT
        six.close()
        mapped.close()
        drops.discard("::1")
        accepted_from(listener, "::1").close()


def test_an_ipv6_64_is_dropped_whole() -> None:
    """The relay counts an IPv6 client by its /64, and drops it so: ::1 is
    in ::/64; an IPv4 peer is not."""
    with listening(socket.AF_INET6) as listener:
        drops = SynDrops()
        drops.watch(listener)
        assert drops.add("::/64", until=1e12)
        assert not drops.add("2001:db8::/48", until=1e12)  # not a key the relay makes
        six = connecting(listener, "::1")
        accepted_from(listener, "127.0.0.3").close()
        assert tcp_state(six) == TCP_SYN_SENT
        six.close()
        drops.discard("::/64")
        accepted_from(listener, "::1").close()


def test_an_accepted_socket_loses_the_filter_it_inherited() -> None:
    """The kernel copies the listener's filter to each connection it makes;
    accepted() takes it off (a second detach finds none)."""
    with listening() as listener:
        drops = SynDrops()
        drops.watch(listener)
        drops.add("127.0.0.2", until=1e12)
        server = accepted_from(listener, "127.0.0.3")
        drops.accepted(server)
        with pytest.raises(OSError) as raised:
            server.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
        assert raised.value.errno == errno.ENOENT
        server.close()


def test_an_address_that_is_not_ip_or_past_capacity_is_not_dropped() -> None:
    with listening() as listener:
        drops = SynDrops(capacity=2)
        drops.watch(listener)
        assert not drops.add("unix-socket-peer", until=1e12)
        assert drops.add("127.0.0.2", until=1e12) and drops.add("127.0.0.4", until=1e12)
        assert not drops.add("127.0.0.5", until=1e12)  # still hung up on at accept
        assert not drops.add("127.0.0.2", until=1e12)  # already
        assert drops.dropped == 2
        accepted_from(listener, "127.0.0.5").close()


async def test_a_drop_ends_at_its_deadline(autojump_clock: trio.testing.MockClock) -> None:
    with listening() as listener:
        drops = SynDrops()
        drops.watch(listener)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drops.run)
            await trio.testing.wait_all_tasks_blocked()
            drops.add("127.0.0.2", until=trio.current_time() + 1)
            drops.add("127.0.0.4", until=trio.current_time() + 5)
            await trio.sleep_until(trio.current_time() + 1)  # the clock jumps
            await trio.testing.wait_all_tasks_blocked()
            assert not drops.dropping("127.0.0.2") and drops.dropping("127.0.0.4")
            accepted_from(listener, "127.0.0.2").close()
            nursery.cancel_scope.cancel()
        assert not drops.active  # cancelled: the filter is taken off
        accepted_from(listener, "127.0.0.4").close()


def test_a_kernel_that_refuses_the_filter_leaves_the_hang_up_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Where attaching fails (here: a closed socket), it is logged once and
    dropping is off; nothing raises into the accept loop."""
    closed = socket.socket()
    closed.close()
    drops = SynDrops()
    drops.watch(closed)
    with caplog.at_level(logging.WARNING, logger="chatd.relay"):
        assert not drops.add("127.0.0.2", until=1e12)
        assert not drops.add("127.0.0.4", until=1e12)
    assert [r.message for r in caplog.records] == ["relay.syn_drop_unavailable"]
    assert not drops.available and not drops.active and not drops.dropping("127.0.0.2")
