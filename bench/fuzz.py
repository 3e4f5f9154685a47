"""Fuzzing: hostile frames against the real daemon, and what they cost the others.

Starts ``chatd serve`` (``chatd init`` into a temp dir, NOTIFY_SOCKET as
systemd would) with the settings of tests/test_fuzz.py (no MFA, no limit on
the fuzzer's own logins and resumes; logins per address keep their default),
makes the accounts ``alice`` (the fuzzer) and ``bob`` (the well-behaved
client) through the admin API, and runs ``--cases`` cases of
tests/fuzzing.py (every client frame type, arbitrary JSON, raw WebSocket
framing; before and after login) with Hypothesis, seeded (``--seed``).
Every case is checked as in the test suite; a broken rule is counted and
printed, not fatal, so the run goes on.

**The well-behaved client** is its own process (``--pinger``, this script
again), so the fuzzer's CPU does not sit in its event loop: logged in as
bob, it sends a ``ping`` every ``--interval`` seconds and writes each round
trip with its monotonic time. The fuzzing runs in windows of
``--fuzz-window`` seconds, each followed by a quiet window of
``--quiet-window`` seconds, interleaved over the whole run, so both sides of
the p99 ratio see the same machine (other benchmarks share it).

Prints: cases run, cases/s (over the fuzzing windows), broken rules, the
daemon's error-level log lines, the close codes and error codes the cases
got, the daemon's CPU seconds, and the pinger's p50/p99 in quiet windows vs
fuzzing windows with their ratio.

    .venv/bin/python bench/fuzz.py --cases 100000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.fuzzing

from _daemon import (  # noqa: E402 - after the path tweak
    Daemon,
    cpu_seconds,
    create_users,
    init_data_dir,
    set_settings,
)
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

from tests.fuzzing import (  # noqa: E402
    Case,
    Fuzzer,
    FuzzFailure,
    _read_events,
    cases,
    text_frame,
    upgrade,
)

PASSWORD = "a long fuzzing password"  # noqa: S105 - a throwaway account's
FUZZ_AUTH = {
    "require_mfa": "none",
    "login_rate_per_account": 100_000.0,
    "refresh_rate_per_ip": 100_000.0,
    # A case that asks for the password again (mfa_enroll, export_account, ...)
    # with a wrong one backs the account off, as it should; the fuzzer then
    # waits that out before it logs in again, so keep the wait short.
    "backoff_base_seconds": 0.1,
    "backoff_max_seconds": 1.0,
}


def pinger(port: int, out: Path, interval: float) -> None:
    """The well-behaved client: log in as bob, ping forever, log round trips."""
    sock = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.3", 0))
    ws = upgrade(sock, "127.0.0.1")
    login = {"type": "login", "id": "l", "username": "bob", "password": PASSWORD}
    sock.sendall(text_frame(json.dumps({**login, "device_name": "pinger"})))
    _read_events(sock, ws, lambda e: e is None or '"session"' in getattr(e, "data", ""))
    n = 0
    with out.open("w") as fh:
        while True:
            n += 1
            fence = f'"id":"p{n}"'
            started = time.monotonic()
            sock.sendall(text_frame(f'{{"type":"ping",{fence}}}'))
            events = _read_events(sock, ws, partial(_answers, fence))
            if events[-1] is None:
                fh.write("closed\n")
                return
            fh.write(f"{started:.6f} {time.monotonic() - started:.6f}\n")
            fh.flush()
            time.sleep(interval)


class _OutOfTime(BaseException):
    """--max-seconds passed: stop generating cases."""


def _answers(fence: str, event: object) -> bool:
    return event is None or fence in getattr(event, "data", "")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(len(ordered) * p) - 1)] if ordered else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--max-seconds", type=float, default=math.inf, help="stop then, and report")
    parser.add_argument("--fuzz-window", type=float, default=4.0, help="seconds (default 4)")
    parser.add_argument("--quiet-window", type=float, default=2.0, help="seconds (default 2)")
    parser.add_argument("--interval", type=float, default=0.02, help="between pings (0.02 s)")
    parser.add_argument("--pinger", nargs=2, metavar=("PORT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pinger:
        pinger(int(args.pinger[0]), Path(args.pinger[1]), args.interval)
        return

    with tempfile.TemporaryDirectory(prefix="chatd-fuzz-") as tmp:
        work = Path(tmp)
        config = init_data_dir(work / "data")
        set_settings(config, "relay", {"port": 0})
        set_settings(config, "auth", FUZZ_AUTH)
        set_settings(config, "attachments", {"port": 0})
        daemon = Daemon(config, work)
        daemon.start()
        daemon.wait_ready()
        try:
            create_users(work / "data", ["alice", "bob"], PASSWORD, workers=2)
            _, port = daemon.relay_url()
            run(args, port, daemon, work)
        finally:
            code, _ = daemon.stop()
            print(f"daemon exit code after SIGTERM: {code}")


def run(args: argparse.Namespace, port: int, daemon: Daemon, work: Path) -> None:
    out = work / "pings.txt"
    ping_proc = subprocess.Popen(  # noqa: S603 - this script, with our own arguments
        [sys.executable, __file__, "--pinger", str(port), str(out)]
        + ["--interval", str(args.interval)]
    )
    fuzzer = Fuzzer("127.0.0.1", port, "alice", PASSWORD)
    failures: list[str] = []
    windows: list[tuple[float, float]] = []  # fuzzing windows (monotonic start, end)
    window_start = time.monotonic() + args.quiet_window
    time.sleep(args.quiet_window)  # a quiet window first
    cpu_before = cpu_seconds(daemon.pid)
    started = time.monotonic()

    @settings(
        max_examples=args.cases,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=(Phase.generate,),
    )
    @seed(args.seed)
    @given(cases)
    def each(case: Case) -> None:
        nonlocal window_start
        now = time.monotonic()
        if now - started > args.max_seconds:
            raise _OutOfTime  # a BaseException: Hypothesis lets it through

        if now - window_start >= args.fuzz_window:
            windows.append((window_start, now))
            time.sleep(args.quiet_window)
            window_start = time.monotonic()
            if fuzzer.stats.cases % 5_000 < 200:
                print(f"  {fuzzer.stats.cases} cases, {len(failures)} failures", flush=True)
        try:
            fuzzer.run_case(case)
        except (FuzzFailure, OSError) as exc:
            failures.append(f"{type(exc).__name__}: {exc}"[:400])
            if len(failures) <= 5:
                print(f"  broken: {failures[-1]}", flush=True)
            fuzzer.close()

    try:
        each()
    except (KeyboardInterrupt, _OutOfTime):  # Ctrl-C or --max-seconds: report what ran
        print(f"stopped after {fuzzer.stats.cases} cases")
    finally:
        windows.append((window_start, time.monotonic()))
        fuzzer.close()
        time.sleep(args.quiet_window)  # and a quiet window last
        ping_proc.terminate()
        ping_proc.wait(timeout=10)
    elapsed = time.monotonic() - started
    cpu = cpu_seconds(daemon.pid) - cpu_before
    report(args, fuzzer, failures, windows, out, elapsed, cpu, daemon)


def report(
    args: argparse.Namespace,
    fuzzer: Fuzzer,
    failures: list[str],
    windows: list[tuple[float, float]],
    pings: Path,
    elapsed: float,
    cpu: float,
    daemon: Daemon,
) -> None:
    stats = fuzzer.stats
    fuzz_seconds = sum(end - start for start, end in windows)
    lines = pings.read_text().splitlines()
    pinger_closed = "closed" in lines
    samples = [tuple(map(float, line.split())) for line in lines if line != "closed"]
    during = [lat for t, lat in samples if any(a <= t < b for a, b in windows)]
    quiet = [lat for t, lat in samples if not any(a <= t < b for a, b in windows)]
    log = daemon.log_path.read_text(errors="replace").splitlines()
    errors = [line for line in log if "level=error" in line or "level=critical" in line]
    print(f"cases: {stats.cases} in {elapsed:.0f} s ({len(windows)} fuzzing windows)")
    print(f"cases/s during fuzzing: {stats.cases / fuzz_seconds:.0f}")
    print(f"sessions the fuzzer opened for itself: {stats.sessions}")
    print(f"broken rules: {len(failures)}")
    for failure in failures[:10]:
        print(f"  {failure}")
    print(f"error-level log lines: {len(errors)}")
    for line in errors[:10]:
        print(f"  {line[:300]}")
    print(f"close codes: {dict(sorted(stats.closes.items()))}")
    print(f"error codes: {dict(sorted(stats.errors.items()))}")
    print(f"daemon CPU over the run: {cpu:.1f} s ({1000 * cpu / max(stats.cases, 1):.2f} ms/case)")
    print(f"well-behaved client: {len(samples)} round trips, closed: {pinger_closed}")
    q50, q99 = percentile(quiet, 0.5) * 1e3, percentile(quiet, 0.99) * 1e3
    d50, d99 = percentile(during, 0.5) * 1e3, percentile(during, 0.99) * 1e3
    print(f"  quiet windows:   n={len(quiet)} p50 {q50:.2f} ms  p99 {q99:.2f} ms")
    print(f"  during fuzzing:  n={len(during)} p50 {d50:.2f} ms  p99 {d99:.2f} ms")
    print(f"  p99 ratio during/quiet: {d99 / q99:.2f}x")
    print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
