"""The sender's CPU per wake-up, alone: no relay, no load clients.

Starts bench/push.py's slow receiver (its own process, answers after
--answer-after s) and one sender process (``python -m chatd.push sender``,
as the notifier starts it), feeds it --rate jobs a second for --seconds to
--devices distinct endpoints, and prints the sender's CPU time (user+sys,
from /proc) per wake-up and the wake-ups the receiver counted.

Usage: ``.venv/bin/python bench/push_sender.py [--rate 1000] [--seconds 10] [--host localhost]``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from push import read_stats  # noqa: E402 - after the path tweak

from chatd.push.notifier import open_sender_process  # noqa: E402
from chatd.push.sender import Job, LineReader, Setup, encode  # noqa: E402


def cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    return sum(cpu_split(pid))


async def run(port: int, args: argparse.Namespace) -> None:
    setup = Setup(
        timeout_seconds=10.0,
        ttl_seconds=60,
        concurrency=args.concurrency,
        allowed_networks=("127.0.0.1/32",),
    )
    outcomes: dict[str, int] = {}
    async with open_sender_process(setup) as (jobs, answers):
        import chatd.push.notifier as n  # the process is the newest child of ours

        pid = max(int(p) for p in os.listdir("/proc") if p.isdigit() and _is_sender(int(p)))
        del n
        reader = LineReader(answers)

        async def read() -> None:
            import msgspec

            from chatd.push.sender import Outcome

            decoder = msgspec.json.Decoder(Outcome)
            while lines := await reader.receive_lines():
                for line in lines:
                    r = decoder.decode(line).result
                    outcomes[r] = outcomes.get(r, 0) + 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.sleep(1.5)  # the sender imports and starts
            (user0, sys0), t0 = cpu_split(pid), time.monotonic()
            total = int(args.rate * args.seconds)
            per_tick = max(1, args.rate // 100)
            next_at = trio.current_time()
            for i in range(0, total, per_tick):
                batch = b"".join(
                    encode(Job(j, f"http://{args.host}:{port}/up/d{j % args.devices}")) + b"\n"
                    for j in range(i, min(total, i + per_tick))
                )
                await jobs.send_all(batch)
                next_at += per_tick / args.rate
                await trio.sleep_until(next_at)
            with trio.move_on_after(15):
                while sum(outcomes.values()) < total:
                    await trio.sleep(0.1)
            (user1, sys1), t1 = cpu_split(pid), time.monotonic()
            nursery.cancel_scope.cancel()
    done = sum(outcomes.values())
    user, system = user1 - user0, sys1 - sys0
    per = 1e6 / max(done, 1)
    print(
        f"sender: {done} wake-ups in {t1 - t0:.1f} s ({done / (t1 - t0):.0f}/s), outcomes"
        f" {outcomes}; CPU {user + system:.2f} s = {(user + system) * per:.0f} µs per wake-up"
        f" (user {user * per:.0f} µs, system {system * per:.0f} µs)"
    )


def _is_sender(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return b"-m\x00chatd.push\x00sender" in cmd and int(stat[1]) == os.getpid()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=1536)
    parser.add_argument("--answer-after", type=float, default=1.0)
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="the endpoints' host: an IP literal (checked once per URL), or a name that"
        " resolves to 127.0.0.1 only, e.g. localhost (resolved and checked for every wake-up)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="chatd-sender-bench-") as tmp:
        stats_path = Path(tmp) / "receiver.json"
        rx = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).parent / "push.py"),
                "--receiver",
                str(stats_path),
                "--answer-after",
                str(args.answer_after),
            ],
            stdin=subprocess.DEVNULL,
        )
        try:
            port = read_stats(stats_path)["port"]
            rx_cpu0 = cpu_seconds(rx.pid)
            trio.run(run, port, args)
            rx_cpu = cpu_seconds(rx.pid) - rx_cpu0
            posts = read_stats(stats_path)["requests"]
            print(
                f"receiver CPU {rx_cpu:.2f} s = {rx_cpu / max(posts, 1) * 1e6:.0f} µs per POST;"
                f" it counted {posts} POSTs"
            )
        finally:
            rx.send_signal(signal.SIGTERM)
            rx.wait(timeout=10)


if __name__ == "__main__":
    main()
