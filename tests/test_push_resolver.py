"""The push sender's DNS answers (chatd/push/resolver.py): kept for a
second, a lookup in flight shared, a failure not kept."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from chatd.push.resolver import KEEP_SECONDS, SharedResolver


class SlowDNS:
    """A fake resolver whose lookups end when the test says so."""

    def __init__(self) -> None:
        self.answers: dict[str, list[str]] = {"push.test": ["93.184.216.34"]}
        self.asked = 0
        self.go = trio.Event()

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked += 1
        await self.go.wait()
        if host not in self.answers:
            raise OSError("no such host")
        return list(self.answers[host])


async def test_an_answer_is_kept_for_a_second_then_looked_up_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    dns = SlowDNS()
    dns.go.set()
    shared = SharedResolver(dns)
    assert not shared.knows("push.test", 443)
    assert await shared("push.test", 443) == ["93.184.216.34"]
    dns.answers["push.test"] = ["10.0.0.7"]  # the name now points elsewhere
    assert shared.knows("push.test", 443)
    assert await shared("push.test", 443) == ["93.184.216.34"] and dns.asked == 1
    assert not shared.knows("push.test", 80)  # another port: its own answer
    await trio.sleep(KEEP_SECONDS)
    assert not shared.knows("push.test", 443)
    assert await shared("push.test", 443) == ["10.0.0.7"] and dns.asked == 2


async def test_a_lookup_in_flight_is_shared() -> None:
    dns = SlowDNS()
    shared = SharedResolver(dns)
    got: list[list[str]] = []

    async def ask() -> None:
        got.append(await shared("push.test", 443))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        dns.go.set()
    assert got == [["93.184.216.34"]] * 5 and dns.asked == 1


async def test_a_failed_lookup_fails_every_sharer_and_is_not_kept() -> None:
    dns = SlowDNS()
    shared = SharedResolver(dns)
    failed = 0

    async def ask() -> None:
        nonlocal failed
        with pytest.raises(OSError):
            await shared("gone.test", 443)
        failed += 1

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        dns.go.set()
    assert failed == 3 and dns.asked == 1
    assert not shared.knows("gone.test", 443)
    dns.answers["gone.test"] = ["93.184.216.35"]
    assert await shared("gone.test", 443) == ["93.184.216.35"] and dns.asked == 2
