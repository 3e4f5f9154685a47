"""chatd.memory: the glibc malloc settings behind the idle-connection figure."""

from __future__ import annotations

import subprocess
import sys

import pytest
import trio

from chatd import memory
from chatd.memory import limit_malloc_arenas, release_freed_memory


def test_freed_memory_can_be_released_on_glibc() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    assert release_freed_memory() is True


def test_an_explicit_malloc_arena_max_in_the_environment_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False


def test_the_arena_cap_applies_in_a_fresh_process() -> None:
    code = "from chatd.memory import limit_malloc_arenas; print(limit_malloc_arenas())"
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == ("True" if sys.platform.startswith("linux") else "False")


_HASHING = """
import sys, threading
from argon2.low_level import Type, hash_secret_raw
from chatd.auth.passwords import PasswordHasher
from chatd.memory import limit_malloc_arenas

if "cap" in sys.argv:
    limit_malloc_arenas()
hasher = PasswordHasher()  # the daemon's defaults: 19 MiB per hash
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")))

def login(together):
    together.wait()  # all at once, as under a login burst, however busy the machine
    if "raw" in sys.argv:  # Argon2 without chatd's trim afterwards
        hash_secret_raw(b"pw", b"s" * 16, time_cost=2, memory_cost=19456, parallelism=1,
                        hash_len=32, type=Type.ID)
    else:
        hasher.hash("correct horse battery staple")

for _ in range(3):  # like logins on the daemon's worker threads, 4 at a time
    n = 1 if "serial" in sys.argv else 4
    together = threading.Barrier(n)
    threads = [threading.Thread(target=login, args=(together,)) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")))
"""


def _rss_growth_hashing(*flags: str, env: dict[str, str] | None = None) -> int:
    """KiB of RSS that 12 hashes (4 threads at a time) or 3 (one at a time) leave."""
    env = {"PATH": "/usr/bin:/bin", **(env or {})}  # no MALLOC_* from the caller
    out = subprocess.run(
        [sys.executable, "-c", _HASHING, *flags],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    before, after = (int(line) for line in out.stdout.split())
    return after - before


def _most_rss_growth_hashing(*flags: str, env: dict[str, str] | None = None) -> int:
    """The most of a few runs: which arena a thread's buffer lands in depends on
    whether the hashes overlap, and a busy machine may run them one by one.
    One run that keeps a buffer is what shows the setting is needed."""
    most = 0
    for _ in range(5):
        most = max(most, _rss_growth_hashing(*flags, env=env))
        if most > 19 * 1024:
            break
    return most


def test_capped_arenas_and_trimming_give_argon2_buffers_back() -> None:
    """Both halves of chatd.memory are needed, and the cap must be one arena:
    without the cap each worker thread keeps its own 19 MiB buffer; without the
    trim the arena keeps its; and with two arenas, malloc_trim cannot shrink
    the top of the second, where a freed buffer stays."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    as_chatd_runs = _rss_growth_hashing("cap")
    assert as_chatd_runs < 4 * 1024  # no Argon2 buffer kept
    assert _rss_growth_hashing("cap", "serial") < 4 * 1024
    assert _most_rss_growth_hashing() > 19 * 1024
    # One buffer freed at the top of the arena is below glibc's trim threshold.
    assert _rss_growth_hashing("cap", "raw", "serial") > 19 * 1024
    assert _most_rss_growth_hashing(env={"MALLOC_ARENA_MAX": "2"}) > 19 * 1024


async def test_the_daemon_trims_freed_memory_periodically_while_it_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under steady traffic no connection closes, so nothing asks for a trim:
    freed pages in the middle of the heap would stay resident for good."""
    assert memory.TRIM_EVERY == 60.0  # once a minute in the daemon
    trims = 0
    three = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def fake_trim() -> bool:  # runs in a worker thread, as the real one
        nonlocal trims
        trims += 1
        if trims == 3:
            trio.from_thread.run_sync(three.set, trio_token=token)
        return True

    monkeypatch.setattr(memory, "release_freed_memory", fake_trim)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(memory.trim_periodically, 0.001)
        await three.wait()
        nursery.cancel_scope.cancel()
    assert trims >= 3
