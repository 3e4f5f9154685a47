"""Attachments: upload and download throughput through the daemon, against
curl on a plain static server, and the daemon's RSS while a file streams.

One run of the real daemon (``chatd init`` into a temp dir, ``chatd serve``
with NOTIFY_SOCKET; the helpers of ``bench/_daemon.py`` and the relay
settings and login of ``bench/relay.py``), with the blob listener on a free
loopback port. One user is seeded and logs in over the relay.

For each size in --sizes (MB of 10^6 bytes; default 10 and 50), --rounds
rounds (default 3) of:

* **upload**: a fresh random file of that size (it stands for ciphertext:
  the server cannot tell) is named by its SHA-256 in ``blob_upload``; the
  signed PUT URL is then fed the file by ``curl -T`` (streamed by curl, with
  ``Content-Length``). Timed by curl (``time_total``); the daemon checks the
  size and hash while streaming, fsyncs, renames and writes the row before
  it answers 201, so the time includes all of that.
* **download**: ``blob_download`` for the same blob, then ``curl -o
  /dev/null`` on the signed GET URL.
* **baseline**: ``curl -o /dev/null`` on the same file served by ``python
  -m http.server`` (a subprocess, loopback), in the same run. There is no
  plain static server that takes a PUT, so the upload is compared with the
  same baseline download: both are "curl moves N bytes over loopback".

The daemon's VmRSS (/proc/PID/status) is sampled every SAMPLE_SECONDS
during each transfer: *before* is the value at the start of the first
transfer, *peak* the highest sample of all transfers of that size, *after*
the value once the last transfer of the run ended. Buffering a whole file
would show up as a peak that grows with the size (tens of MB); streaming
keeps it flat.

The URLs are not timed (one relay round trip each). The best round is the
figure (least disturbed by other processes); the median is printed too.

Run: ``.venv/bin/python bench/attachments.py [--sizes 10,50] [--rounds 3]``.

Where an upload's time goes (measured once on a 2-CPU VM, 50 MB, with
timers around the listener's steps): about 0.04 s waiting for body chunks
(hypercorn parses the 765 chunks of ~64 KiB on the event loop), 0.08 s
hashing and writing them in the worker thread (SHA-256 ~1.15 GB/s and
page-cache writes ~3 GB/s here, one after the other, 1 MiB at a time) and
0.03 s for fsync, rename and the row. Joining the chunks into one write per
MiB, and hashing and writing in two threads while the next MiB arrives, did
not change the figure measurably on 2 CPUs (curl, the event loop and the
worker threads compete for them), so the listener keeps the simple loop.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio
from _daemon import Daemon, init_data_dir, seed_users, set_settings, vm_rss_kib
from relay import CONNECT_TIMEOUT, PASSWORD, _encode, _fs_type, configure, login, reply_to
from trio_websocket import WebSocketConnection, open_websocket_url

SAMPLE_SECONDS: Final = 0.005  # between RSS samples during a transfer
TRANSFER_TIMEOUT: Final = 300.0  # seconds for one curl transfer
MB: Final = 1_000_000
_BLOBS_URL = re.compile(r"blobs (https?://\S+)")
_SERVING = re.compile(r"port (\d+)")


@dataclass
class Sizes:
    """Figures for one file size."""

    size: int
    upload: list[float] = field(default_factory=list)  # seconds
    download: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)
    rss_before: int = 0  # KiB
    rss_peak: int = 0


class RssWatch:
    """Samples a process's VmRSS while a transfer runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0

    async def sample(self, done: trio.Event) -> None:
        while not done.is_set():
            self.peak = max(self.peak, vm_rss_kib(self.pid))
            with trio.move_on_after(SAMPLE_SECONDS):
                await done.wait()
        self.peak = max(self.peak, vm_rss_kib(self.pid))


async def curl(args: list[str], watch: RssWatch | None) -> float:
    """Run curl (fail on HTTP errors); its time_total in seconds."""
    done = trio.Event()
    async with trio.open_nursery() as nursery:
        if watch is not None:
            nursery.start_soon(watch.sample, done)
        try:
            with trio.fail_after(TRANSFER_TIMEOUT):
                result = await trio.run_process(
                    ["curl", "--silent", "--show-error", "--fail", "-w", "%{time_total}", *args],
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
        finally:
            done.set()
    if result.returncode != 0:
        raise SystemExit(f"curl {args[0]} failed: {result.stderr.decode().strip()}")
    return float(result.stdout.decode().rsplit("\n", 1)[-1])


def random_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path``; their SHA-256 (hex)."""
    hasher = hashlib.sha256()
    with path.open("wb") as out:
        left = size
        while left:
            block = os.urandom(min(left, 1 << 20))
            hasher.update(block)
            out.write(block)
            left -= len(block)
    return hasher.hexdigest()


async def request(ws: WebSocketConnection, frame_type: str, **fields: Any) -> dict[str, Any]:
    request_id = str(uuid.uuid4())
    await ws.send_message(_encode({"type": frame_type, "id": request_id, **fields}).decode())
    with trio.fail_after(CONNECT_TIMEOUT):
        reply = await reply_to(ws, request_id)
    if reply.get("type") != "blob_url":
        raise SystemExit(f"{frame_type} refused: {reply!r}")
    return reply


class StaticServer:
    """``python -m http.server`` on loopback serving one directory."""

    def __init__(self, directory: Path) -> None:
        self.proc = subprocess.Popen(  # noqa: S603 - this interpreter, fixed arguments
            [sys.executable, "-u", "-m", "http.server", "--bind", "127.0.0.1", "0"],
            cwd=directory,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None  # noqa: S101 - asked for above
        line = self.proc.stdout.readline().decode()
        found = _SERVING.search(line)
        if found is None:
            self.stop()
            raise SystemExit(f"http.server did not say its port: {line!r}")
        self.port = int(found.group(1))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


async def measure(
    daemon: Daemon, relay_url: str, work: Path, static: StaticServer, sizes: list[int], rounds: int
) -> list[Sizes]:
    pid = daemon.main_pid or daemon.pid
    results = []
    async with open_websocket_url(relay_url) as ws:
        await login(ws, "bench", "bench")
        for size in sizes:
            figures = Sizes(size)
            watch = RssWatch(pid)
            figures.rss_before = vm_rss_kib(pid)
            for n in range(rounds):
                name = f"file-{size}-{n}"
                path = work / name
                blob_id = await trio.to_thread.run_sync(random_file, path, size)
                put = await request(ws, "blob_upload", sha256=blob_id, size=size)
                figures.upload.append(
                    await curl(["-T", str(path), "-o", os.devnull, put["url"]], watch)
                )
                get = await request(ws, "blob_download", blob_id=blob_id)
                figures.download.append(await curl(["-o", os.devnull, get["url"]], watch))
                local = f"http://127.0.0.1:{static.port}/{name}"
                figures.baseline.append(await curl(["-o", os.devnull, local], None))
                path.unlink()
            figures.rss_peak = watch.peak
            results.append(figures)
    return results


def rate(size: int, seconds: list[float]) -> tuple[float, float]:
    """(best, median) MB/s."""
    return size / MB / min(seconds), size / MB / statistics.median(seconds)


def report(results: list[Sizes], rss_after: int, rss_start: int) -> None:
    print(f"daemon RSS at start of the run: {rss_start / 1024:.1f} MiB")
    for r in results:
        up, down, base = rate(r.size, r.upload), rate(r.size, r.download), rate(r.size, r.baseline)
        print(f"\n{r.size / MB:.0f} MB attachment, {len(r.upload)} rounds (best / median MB/s):")
        print(f"  upload   (curl PUT -> chatd)       {up[0]:8.1f} / {up[1]:8.1f}")
        print(f"  download (chatd -> curl GET)       {down[0]:8.1f} / {down[1]:8.1f}")
        print(f"  baseline (http.server -> curl GET) {base[0]:8.1f} / {base[1]:8.1f}")
        print(
            f"  ratio to baseline (best): upload {up[0] / base[0]:.2f}x,"
            f" download {down[0] / base[0]:.2f}x"
        )
        print(
            f"  daemon RSS: before {r.rss_before / 1024:.1f} MiB, peak during transfers"
            f" {r.rss_peak / 1024:.1f} MiB (+{(r.rss_peak - r.rss_before) / 1024:.1f} MiB)"
        )
    print(f"\ndaemon RSS after all transfers: {rss_after / 1024:.1f} MiB")
    grow = [(r.size / MB, (r.rss_peak - r.rss_before) / 1024) for r in results]
    print(
        "peak RSS growth by file size: " + ", ".join(f"{s:.0f} MB: +{g:.1f} MiB" for s, g in grow)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,50", help="file sizes in MB, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(float(s) * MB) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="chatd-bench-attachments-") as tmp:
        work = Path(tmp)
        config = init_data_dir(work / "data")
        configure(config, idle=False, clients=1)
        quota = max(sizes) * args.rounds * len(sizes) + MB
        set_settings(
            config,
            "attachments",
            {
                "port": 0,
                "max_file_bytes": max(sizes) + MB,
                "quota_bytes_per_user": max(quota, 1_073_741_824),
            },
        )
        seed_users(config, ["bench"], PASSWORD)
        files = work / "files"
        files.mkdir()
        print(f"temp dir on {_fs_type(work)}; curl on loopback; {os.cpu_count()} CPUs")
        daemon = Daemon(config, work)
        daemon.start()
        static = StaticServer(files)
        try:
            daemon.wait_ready()
            relay_url, _port = daemon.relay_url()
            blobs = _BLOBS_URL.search(daemon.status)
            pid = daemon.main_pid or daemon.pid
            print(f"chatd (pid {pid}): {relay_url}, {blobs.group(1) if blobs else '?'}")
            rss_start = vm_rss_kib(pid)
            results = trio.run(measure, daemon, relay_url, files, static, sizes, args.rounds)
            rss_after = vm_rss_kib(pid)
        finally:
            static.stop()
            code, _ = daemon.stop()
        report(results, rss_after, rss_start)
        if code != 0:
            raise SystemExit(f"chatd exited with {code}; log: {daemon.log_path}")


if __name__ == "__main__":
    main()
