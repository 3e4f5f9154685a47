"""Keeping glibc's malloc from hoarding the memory of password hashes.

Each password hash (Argon2id) allocates ``auth.argon2_memory_kib`` (19 MiB by
default) in a worker thread and frees it a few tens of milliseconds later.
glibc's dynamic mmap threshold rises to that size after the first free, so
later buffers come from the threads' malloc arenas, and once freed they stay
there: the daemon's resident memory grew by about 100 KiB per login, which
dwarfs what an idle connection costs (bench/relay.py). ``malloc_trim(0)``
after each hash returns those free pages (glibc madvises free chunks in every
arena), for a fraction of a millisecond, without making every allocation an
mmap as a fixed ``M_MMAP_THRESHOLD`` would (which slowed logins by a third).

The daemon also caps malloc at one arena (:func:`limit_malloc_arenas`, as
``MALLOC_ARENA_MAX=1`` would). Each worker thread that hashes would otherwise
get an arena of its own, and ``malloc_trim`` cannot shrink the top of a
thread's arena, only the main one's: with two arenas, a buffer freed at the
top of the second stayed resident (19 MiB, sometimes 38, kept by chance; see
``tests/test_memory.py``). Python's small objects come from its own
allocator, so one arena costs no measurable contention (bench/relay.py).
Connections that did not read can pin a delivery window each, in buffers
big enough for malloc to take from the heap rather than mmap; freed when the
connections end, they stayed resident at the peak of the flood. The relay
therefore asks a :class:`Trimmer` to trim after connections close: at most
once per ``TRIM_INTERVAL``, so a burst of closes costs one trim.

Under steady traffic nothing closes, yet freed memory still stays resident.
Large blocks come from the heap, not mmap, once the Argon2 buffers have
raised glibc's mmap threshold; one that is freed in the middle of the heap
stays resident, since glibc gives back by itself only what is free at the
top. The table of the record of recent sends (chatd.e2ee.recent) is such a
block: as its oldest entries are dropped, Python rebuilds it (3.7 MiB at
65,536 entries) every 109,000 sends, into fresh pages, and the old one stayed
resident. At 1,000 messages a second the RSS rose by 4 MiB at 88 s and again
at 197 s, while everything in use stayed flat (bench/sustained.py
--memtrace). So the daemon also trims once every ``TRIM_EVERY``
(:func:`trim_periodically`): a walk of the heap of a few milliseconds, in a
worker thread, once a minute; that also gives back what SQLite's transient
peaks and a backlog of messages touched.

A full garbage collection walks every tracked object, and the daemon holds
a few hundred thousand from start-up alone (modules, functions, settings)
that live as long as it does: a flood of short-lived connections triggered
full collections of about 100 ms, stalling every client (bench/floods.py).
:func:`freeze_startup_objects` moves them out of the collector's sight once
the daemon is ready, as ``gc.freeze`` is meant for.

Together they took the daemon from about 149 KiB to about 36 KiB of RSS per
idle authenticated connection at 1,000 connections, with logins no slower
(bench/relay.py --no-relay); the rest of the way down came from the relay.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from collections.abc import Callable
from typing import Any, Final

import trio

M_ARENA_MAX: Final = -8  # glibc's mallopt parameter number


def _libc_function(name: str, *argtypes: Any) -> Callable[..., int] | None:
    path = ctypes.util.find_library("c")
    if path is None:  # pragma: no cover - no C library found: nothing to do
        return None
    try:
        function = getattr(ctypes.CDLL(path), name)
    except (OSError, AttributeError):  # pragma: no cover - musl and others
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


_TRIM: Final = _libc_function("malloc_trim", ctypes.c_size_t)
_MALLOPT: Final = _libc_function("mallopt", ctypes.c_int, ctypes.c_int)


def limit_malloc_arenas(arenas: int = 1) -> bool:
    """Cap glibc's malloc arenas; call before threads start. False where
    unsupported. An explicit ``MALLOC_ARENA_MAX`` in the environment wins."""
    if _MALLOPT is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return bool(_MALLOPT(M_ARENA_MAX, arenas))


def freeze_startup_objects() -> None:
    """Collect once, then exempt every object alive now from later
    collections (they live as long as the process); call once, when ready."""
    gc.collect()
    gc.freeze()


def release_freed_memory() -> bool:
    """Return free heap memory to the kernel (glibc); False where unsupported."""
    if _TRIM is None:
        return False
    return bool(_TRIM(0))


TRIM_INTERVAL: Final = 1.0  # seconds: at most one trim after closes per interval
TRIM_EVERY: Final = 60.0  # seconds between two trims while the daemon runs


async def trim_periodically(every: float = TRIM_EVERY) -> None:
    """Return free heap memory to the kernel every ``every`` seconds, in a
    worker thread, until cancelled (see the module docstring)."""
    while True:
        await trio.sleep(every)
        await trio.to_thread.run_sync(release_freed_memory)


class Trimmer:
    """Returns freed memory to the kernel some time after it is asked to, at
    most once per ``interval`` however often it is asked (a burst of closes)."""

    def __init__(self, interval: float = TRIM_INTERVAL) -> None:
        self.interval = interval
        self.trims = 0
        self._due = trio.Event()

    def request(self) -> None:
        """Something big was freed: trim soon. Never blocks."""
        self._due.set()

    async def serve(self) -> None:
        """Trim when asked, in a worker thread (it walks the heap), until cancelled."""
        while True:
            await self._due.wait()
            await trio.sleep(self.interval)  # let the rest of the burst close first
            self._due = trio.Event()
            await trio.to_thread.run_sync(release_freed_memory)
            self.trims += 1
