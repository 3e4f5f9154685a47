"""Run ``chatd`` with an event-loop lag monitor. A bench helper; chatd itself is unchanged.

    python bench/_lagmon.py LAG_LOG serve --config DATA/chatd.toml

This calls ``chatd.cli.run`` with the remaining arguments, exactly as the
``chatd`` script would, except that ``trio.run`` gets two additions:

* a system task (``bench.lag_monitor``) that sleeps ``INTERVAL`` seconds in a
  loop and records how late each wake-up is: the time a ready task waits
  for the event loop, i.e. the loop's lag;
* an instrument that times every task step, so each sample also carries the
  longest single step since the previous sample (its wall time, the CPU
  time the loop thread spent in it, and the task's name) and the summed step
  time (how busy the loop thread was). A long step with little CPU means the
  thread was descheduled or waited on the GIL; with a lot, it computed;
* a ``gc.callbacks`` hook: the longest garbage-collector pause since the
  previous sample.

Each sample is one line in LAG_LOG, flushed about once a second:
``MONOTONIC LAG STEP_WALL STEP_CPU BUSY GC_PAUSE TASK_NAME`` (seconds; the
timestamp is CLOCK_MONOTONIC, ``time.monotonic()``, comparable across
processes). The wake-up lateness includes about 1 ms of timer rounding
(epoll's timeout is in whole milliseconds), so an idle loop shows 0-1 ms.
The cost is one wake-up per ``INTERVAL`` and four clock reads per task step;
both phases of a benchmark pay it alike.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import trio
import trio.lowlevel

INTERVAL: Final = 0.010  # seconds between lag samples
FLUSH_SECONDS: Final = 1.0  # write buffered samples about this often


class StepTimer(trio.abc.Instrument):
    """Longest task step and total step time since the last :meth:`take`."""

    def __init__(self) -> None:
        self._started = 0.0
        self._started_cpu = 0.0
        self._longest = 0.0
        self._longest_cpu = 0.0
        self._longest_task = "-"
        self._busy = 0.0
        self._gc_started = 0.0
        self._gc_longest = 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._started = time.monotonic()
        self._started_cpu = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        took = time.monotonic() - self._started
        self._busy += took
        if took > self._longest:
            self._longest = took
            self._longest_cpu = time.thread_time() - self._started_cpu
            self._longest_task = task.name

    def gc_callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.monotonic()
        elif self._gc_started:
            self._gc_longest = max(self._gc_longest, time.monotonic() - self._gc_started)
            self._gc_started = 0.0

    def take(self) -> tuple[float, float, float, float, str]:
        taken = (
            self._longest,
            self._longest_cpu,
            self._busy,
            self._gc_longest,
            self._longest_task,
        )
        self._longest, self._longest_cpu, self._busy, self._gc_longest = 0.0, 0.0, 0.0, 0.0
        self._longest_task = "-"
        return taken


async def _monitor(path: str, timer: StepTimer) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    lines: list[str] = []
    flushed = time.monotonic()
    try:
        while True:
            before = time.monotonic()
            await trio.sleep(INTERVAL)
            woke = time.monotonic()
            step, step_cpu, busy, gc_pause, task = timer.take()
            name = " ".join(task.split())  # one line per sample, whatever the name holds
            lag = woke - before - INTERVAL
            lines.append(
                f"{woke:.6f} {lag:.6f} {step:.6f} {step_cpu:.6f} {busy:.6f} {gc_pause:.6f} {name}\n"
            )
            if woke - flushed >= FLUSH_SECONDS:
                os.write(fd, "".join(lines).encode())
                lines.clear()
                flushed = woke
    except Exception as exc:  # a system task must not crash the daemon
        print(f"lag monitor stopped: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        if lines:
            os.write(fd, "".join(lines).encode())
        os.close(fd)


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    path, argv = sys.argv[1], sys.argv[2:]
    real_run = trio.run

    def run_with_monitor(async_fn: Callable[..., Awaitable[Any]], *args: Any, **kw: Any) -> Any:
        timer = StepTimer()
        gc.callbacks.append(timer.gc_callback)

        async def monitored() -> Any:
            trio.lowlevel.spawn_system_task(_monitor, path, timer, name="bench.lag_monitor")
            return await async_fn(*args)

        kw["instruments"] = [*kw.get("instruments", ()), timer]
        return real_run(monitored, **kw)

    trio.run = run_with_monitor  # type: ignore[assignment]  # chatd.cli looks it up at call time
    from chatd import cli

    sys.exit(cli.run(argv))


if __name__ == "__main__":
    main()
