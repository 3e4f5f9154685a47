"""Run ``chatd`` with tracemalloc and memory marks on SIGUSR1. A bench helper; chatd is unchanged.

    python bench/_memtrace.py OUT_DIR FRAMES serve --config DATA/chatd.toml

This calls ``chatd.cli.run`` with the remaining arguments, exactly as the
``chatd`` script would, after ``tracemalloc.start(FRAMES)`` (with FRAMES 0,
tracemalloc stays off: the marks below cost next to nothing, and the daemon
runs at its own speed and size). Each SIGUSR1 makes a *mark* N (0, 1, ...):
with tracemalloc on, its snapshot goes to ``OUT_DIR/snapshot-N.pickle``
(compare two offline with :func:`top_growth`); and one JSON line goes to
``OUT_DIR/marks.jsonl`` with what tracemalloc cannot see:

* ``traced``: bytes of Python allocations tracemalloc follows (all of
  Python's: object memory and PyMem_Malloc/PyMem_RawMalloc);
* ``sqlite_used`` / ``sqlite_highwater``: SQLite's own heap, all connections
  (``sqlite3_memory_used`` of the sqlcipher3 extension, which tracemalloc
  does not see: page caches, prepared statements, schema);
* ``malloc``: glibc's ``mallinfo2``: ``arena`` (heap obtained with brk/sbrk),
  ``hblkhd`` (in mmapped chunks), ``uordblks`` (in use), ``fordblks`` (free
  but kept by the allocator): free memory still resident shows here;
* ``pymalloc``: Python's own allocator for objects of up to 512 bytes: its
  ``arenas`` (1 MiB each, mmapped, so outside ``malloc``), the bytes ``used``
  in them, and free (``free_blocks`` in pools in use, ``free_pools``);
* ``status``: RssAnon, RssFile, RssShmem, VmRSS of /proc/self/status (KiB);
* ``gc_objects``: objects the garbage collector tracks (with tracemalloc
  on; counting them stalls the loop for tens of milliseconds);
* ``connections``: open database connections (the writer, the store's readers
  and any backup's), each with its own page cache.

The handler runs on the main thread between two bytecodes of the event loop:
the snapshot takes a second or so with a few hundred thousand blocks, which
stalls the daemon once per mark; the bench sends marks only where it does
not measure latency. tracemalloc itself costs CPU and memory on every
allocation, so RSS and latency under this wrapper are not the daemon's own:
read the growth by traceback, not the totals.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import signal
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from types import FrameType
from typing import Any, Final

FRAMES: Final = 12  # frames kept per allocation traceback, unless told


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mallinfo() -> dict[str, int]:
    path = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(path).mallinfo2  # type: ignore[arg-type]
    except (OSError, AttributeError, TypeError):
        return {}
    fn.restype = MallInfo2
    info = fn()
    return {name: int(getattr(info, name)) for name, _ in MallInfo2._fields_}


def _sqlite() -> dict[str, int]:
    try:
        import sqlcipher3._sqlite3 as ext  # the daemon has imported it by now

        lib = ctypes.CDLL(ext.__file__)
    except (ImportError, OSError, AttributeError):
        return {}
    lib.sqlite3_memory_used.restype = ctypes.c_int64
    lib.sqlite3_memory_highwater.restype = ctypes.c_int64
    lib.sqlite3_memory_highwater.argtypes = [ctypes.c_int]
    return {
        "sqlite_used": int(lib.sqlite3_memory_used()),
        "sqlite_highwater": int(lib.sqlite3_memory_highwater(0)),
    }


def _status() -> dict[str, int]:
    found: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            found[key] = int(value.split()[0])
    return found


def _pymalloc() -> dict[str, int]:
    """Python's small-object allocator (``sys._debugmallocstats``, which writes
    to the C stderr: caught in a temporary file): its arenas (1 MiB each,
    mmapped, outside malloc's figures), and the bytes in use and free in them."""
    wanted = {
        "# arenas allocated current": "arenas",
        "# arenas highwater mark": "arenas_highwater",
        "# bytes in allocated blocks": "used",
        "# bytes in available blocks": "free_blocks",
    }
    found: dict[str, int] = {}
    with tempfile.TemporaryFile() as out:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(out.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        for line in out.read().decode(errors="replace").splitlines():
            key, _, value = line.partition("=")
            name = wanted.get(key.strip())
            if name is None and key.strip().endswith("unused pools * 16384 bytes"):
                name = "free_pools"
            if name is not None:
                found[name] = int(value.strip().replace(",", ""))
    return found


def _connections() -> int:
    """Open database connections: file descriptors on a ``*.db`` file (one each)."""
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        try:
            if os.readlink(fd).endswith(".db"):
                count += 1
        except OSError:
            continue  # closed meanwhile
    return count


def install(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    marks = [0]

    def mark(signum: int, frame: FrameType | None) -> None:
        n = marks[0]
        marks[0] += 1
        started = time.monotonic()
        tracing = tracemalloc.is_tracing()
        if tracing:
            tracemalloc.take_snapshot().dump(str(out / f"snapshot-{n}.pickle"))
        record: dict[str, Any] = {
            "mark": n,
            "at": time.monotonic(),
            "traced": tracemalloc.get_traced_memory()[0],
            **_sqlite(),
            "malloc": _mallinfo(),
            "pymalloc": _pymalloc(),
            "status": _status(),
            "gc_objects": len(gc.get_objects()) if tracing else 0,
            "connections": _connections(),
            "took": time.monotonic() - started,
        }
        with (out / "marks.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")

    signal.signal(signal.SIGUSR1, mark)


def top_growth(before: Path, after: Path, limit: int = 15) -> list[str]:
    """The allocation tracebacks that grew most between two snapshots, as lines."""
    old = tracemalloc.Snapshot.load(str(before))
    new = tracemalloc.Snapshot.load(str(after))
    keep = [
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap*>"),
    ]
    old, new = old.filter_traces(keep), new.filter_traces(keep)
    lines = []
    stats = new.compare_to(old, "traceback")
    stats.sort(key=lambda s: s.size_diff, reverse=True)
    for stat in stats[:limit]:
        lines.append(
            f"{stat.size_diff / 1024:+.0f} KiB ({stat.count_diff:+d} blocks,"
            f" now {stat.size / 1024:.0f} KiB in {stat.count} blocks)"
        )
        frames = [fr for fr in stat.traceback.format(most_recent_first=True) if fr.strip()]
        lines += ["    " + fr.strip() for fr in frames[:16]]
    by_file = new.compare_to(old, "filename")
    by_file.sort(key=lambda s: s.size_diff, reverse=True)
    lines.append("by file (where the allocation happened):")
    lines += [f"  {s.size_diff / 1024:+.0f} KiB {s.traceback[0].filename}" for s in by_file[:limit]]
    return lines


def main() -> None:
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    out, frames, argv = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    if frames > 0:
        tracemalloc.start(frames)
    install(out)
    from chatd import cli

    sys.exit(cli.run(argv))


if __name__ == "__main__":
    main()
