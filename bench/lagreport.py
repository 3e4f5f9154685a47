"""Line up a flood run's slowest pings and messages with the event loop around them.

Reads the file ``bench/floods.py --keep-lag FILE`` wrote: the phases
(``# MONOTONIC PHASE``), the pair's pings and messages (``P``/``M SENT
TOOK``) and the daemon's lag-monitor samples (bench/_lagmon.py, one line
per 10 ms: ``MONOTONIC LAG STEP_WALL STEP_CPU BUSY GC_PAUSE TASK``). For
the baseline and flood windows of each kind it prints the slowest few,
each with the loop samples around the moment it was sent: the loop's lag,
the longest step (wall / CPU: much more wall than CPU means the thread was
off the CPU or waiting for the GIL), how busy the loop was in that 10 ms,
the longest GC pause, and the task of the longest step. Rows of the loop
busy for 10 ms of 10 are what held the pair up in the connection flood
(docs/RELIABILITY.md section 4).

    .venv/bin/python bench/floods.py --kinds connections --keep-lag /tmp/lag.txt
    .venv/bin/python bench/lagreport.py /tmp/lag.txt [--top 8] [--messages]
"""

from __future__ import annotations

import argparse
import bisect
from pathlib import Path
from typing import NamedTuple


class Sample(NamedTuple):
    at: float
    lag: float
    step_wall: float
    step_cpu: float
    busy: float
    gc_pause: float
    task: str


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path, help="what bench/floods.py --keep-lag wrote")
    parser.add_argument("--top", type=int, default=8, help="slowest per window kind")
    parser.add_argument("--messages", action="store_true", help="messages instead of pings")
    args = parser.parse_args()
    phases: list[tuple[float, str]] = []
    timed: list[tuple[float, float]] = []  # (sent, took)
    samples: list[Sample] = []
    wanted = "M" if args.messages else "P"
    for line in args.file.read_text().splitlines():
        if line.startswith("# "):
            _, at, phase = line.split(" ", 2)
            phases.append((float(at), phase))
        elif line[:2] in ("P ", "M "):
            if line[0] == wanted:
                _, sent, took = line.split()
                timed.append((float(sent), float(took)))
        elif line:
            parts = line.split(" ", 6)
            if len(parts) == 7:
                numbers = [float(p) for p in parts[:6]]
                samples.append(Sample(*numbers, task=parts[6].rsplit(".", 1)[-1]))
    samples.sort()
    starts = [at for at, _ in phases]
    at_of = [s.at for s in samples]

    def phase_of(at: float) -> str:
        i = bisect.bisect_right(starts, at) - 1
        return phases[i][1] if i >= 0 else "warm-up"

    by_phase: dict[str, list[tuple[float, float]]] = {}
    for sent, took in timed:
        by_phase.setdefault(phase_of(sent), []).append((sent, took))
    for phase in sorted(by_phase):
        rows = sorted(by_phase[phase], key=lambda row: -row[1])
        print(f"{phase}: {len(rows)} {'messages' if args.messages else 'pings'}, slowest:")
        for sent, took in rows[: args.top]:
            i = bisect.bisect_left(at_of, sent)
            around = samples[max(0, i - 1) : i + 2]
            loop = "; ".join(
                f"lag {s.lag * 1e3:.1f} step {s.step_wall * 1e3:.2f}/{s.step_cpu * 1e3:.2f} cpu"
                f" busy {s.busy * 1e3:.1f} gc {s.gc_pause * 1e3:.2f} {s.task}"
                for s in around
            )
            print(f"  {took * 1e3:6.2f} ms | {loop}")


if __name__ == "__main__":
    main()
