"""Startup benchmark: how long ``chatd serve`` takes from spawn to systemd READY=1.

Each run makes a fresh data dir with ``chatd init`` (not timed) and sets
``relay.port = 0`` so runs never clash on a port. It then binds an AF_UNIX
datagram socket, starts ``chatd serve --config DIR/chatd.toml`` with
NOTIFY_SOCKET pointing at it (as systemd does for Type=notify), and times from
spawn until a datagram with READY=1 arrives. Then it sends SIGTERM and waits
for exit code 0. Each run starts the daemon twice on the same data dir:

* first start: no database yet (it creates the SQLCipher file and runs every
  migration);
* second start: the database exists (key check and schema check only).

"Cold" means a new process. The OS page cache stays warm (dropping it needs
root), so these times are CPU and import cost, not disk reads. For reference,
the script also times a bare ``python -c "import chatd.cli, chatd.daemon"``
(spawn until it prints a line), which is the import share of the start.
Prints median, min and max of --runs runs.

    .venv/bin/python bench/startup.py [--runs 5] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _daemon import Daemon, init_data_dir, set_settings


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def _report(label: str, samples: list[float]) -> None:
    print(f"{label} median: {_ms(statistics.median(samples))}")
    print(f"{label} min: {_ms(min(samples))}")
    print(f"{label} max: {_ms(max(samples))}")


def _start_and_stop(config: Path, work: Path) -> tuple[float, float]:
    daemon = Daemon(config, work)
    daemon.start()
    try:
        ready = daemon.wait_ready()
    except BaseException:
        daemon.kill()
        raise
    code, stopped = daemon.stop()
    if code != 0:
        tail = daemon.log_tail()
        raise SystemExit(f"chatd exited with {code} after SIGTERM, expected 0:\n{tail}")
    return ready, stopped


def _import_time() -> float:
    """Spawn to "imported" on stdout: comparable with spawn to READY (no exit cost)."""
    code = "import chatd.cli, chatd.daemon; print('imported', flush=True)"
    started = time.perf_counter()
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        elapsed = time.perf_counter() - started
        proc.wait(timeout=60)
    if line.strip() != b"imported" or proc.returncode != 0:
        raise SystemExit(f"importing chatd failed (exit {proc.returncode})")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per figure (default 5)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 runs")
    args = parser.parse_args()
    runs = 2 if args.quick else max(1, min(args.runs, 100))

    first: list[float] = []
    second: list[float] = []
    stops: list[float] = []
    imports: list[float] = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="chatd-bench-") as tmp:
            work = Path(tmp)
            config = init_data_dir(work / "data")
            set_settings(config, "relay", {"port": 0})
            ready, stopped = _start_and_stop(config, work)
            first.append(ready)
            stops.append(stopped)
            ready, stopped = _start_and_stop(config, work)
            second.append(ready)
            stops.append(stopped)
        imports.append(_import_time())

    print(f"runs: {runs}")
    _report("first start to READY=1 (creates database)", first)
    _report("second start to READY=1 (existing database)", second)
    _report("SIGTERM to exit 0", stops)
    _report("python import chatd.cli + chatd.daemon", imports)


if __name__ == "__main__":
    main()
