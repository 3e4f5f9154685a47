"""Memory per idle relay connection: the daemon's RSS growth with N open WebSockets.

Starts the real daemon (``chatd init`` into a temp dir, then ``chatd serve``
with NOTIFY_SOCKET, as systemd would). The config gets ``relay.port = 0``,
a one-hour ``relay.idle_timeout_seconds`` and ``handshake_timeout_seconds``,
and room in ``relay.max_connections``. The relay port comes from the READY
STATUS line.

From this script (a separate process from the daemon), trio_websocket opens
--connections WebSockets to /v1/ws, at most --concurrency handshakes at a time.
On each it receives the ``hello`` frame, sends one ``ping`` and receives the
``pong``, which takes the connection past the first-frame timer to the plain
idle state. Before that, a few warm-up connections are opened and closed, so
one-time costs (lazy imports, first allocations) are not counted per
connection. VmRSS of the daemon (/proc/PID/status) is read after the warm-up
(baseline) and once all N connections are open and idle (after a short settle
pause). Prints (with - baseline) / N in KiB per connection, the totals, and
RSS again after every client has closed. Finally SIGTERM, expecting exit 0.

RLIMIT_NOFILE of this process is raised before the daemon starts, and the
daemon inherits it.

    .venv/bin/python bench/idle_connections.py [--connections 1000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import trio
from _daemon import RELAXED_ADDRESSES, Daemon, init_data_dir, raise_nofile, set_settings, vm_rss_kib
from trio_websocket import open_websocket_url

WARMUP_CONNECTIONS = 10
CONNECT_TIMEOUT = 30.0  # seconds for one handshake + hello + pong
OPEN_ALL_TIMEOUT = 300.0  # seconds for all connections to be open
SETTLE_SECONDS = 1.0  # pause before reading RSS, so in-flight work finishes


class Clients:
    """Holds N client connections open until ``release`` is set."""

    def __init__(self, url: str, n: int, concurrency: int) -> None:
        self.url = url
        self.n = n
        self.handshakes = trio.Semaphore(concurrency)
        self.opened = 0
        self.all_open = trio.Event()
        self.release = trio.Event()
        self.failures: list[str] = []

    async def one(self, index: int) -> None:
        await self.handshakes.acquire()
        handshaking = True
        try:
            async with open_websocket_url(
                self.url, connect_timeout=CONNECT_TIMEOUT, disconnect_timeout=5
            ) as ws:
                with trio.fail_after(CONNECT_TIMEOUT):
                    hello = json.loads(await ws.get_message())
                    if hello.get("type") != "hello":
                        raise RuntimeError(f"first frame is not hello: {hello!r}")
                    await ws.send_message(json.dumps({"type": "ping", "id": str(index)}))
                    pong = json.loads(await ws.get_message())
                    if pong != {"type": "pong", "id": str(index)}:
                        raise RuntimeError(f"expected pong, got {pong!r}")
                self.handshakes.release()
                handshaking = False
                self.opened += 1
                if self.opened == self.n:
                    self.all_open.set()
                await self.release.wait()
        except Exception as exc:
            self.failures.append(f"connection {index}: {type(exc).__name__}: {exc}")
            self.all_open.set()  # wake the waiter; it checks failures
        finally:
            if handshaking:
                self.handshakes.release()


async def _open_and_close(url: str, n: int, concurrency: int) -> None:
    clients = Clients(url, n, concurrency)
    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(clients.one, i)
        with trio.move_on_after(OPEN_ALL_TIMEOUT):
            await clients.all_open.wait()
        clients.release.set()
    if clients.failures or clients.opened < n:
        raise SystemExit(f"warm-up failed: {clients.opened} of {n} open; {clients.failures[:5]}")


async def _measure(daemon: Daemon, url: str, n: int, concurrency: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    await _open_and_close(url, WARMUP_CONNECTIONS, concurrency)
    await trio.sleep(SETTLE_SECONDS)
    figures["before"] = vm_rss_kib(daemon.pid)

    clients = Clients(url, n, concurrency)
    async with trio.open_nursery() as nursery:
        started = time.perf_counter()
        for i in range(n):
            nursery.start_soon(clients.one, i)
        with trio.move_on_after(OPEN_ALL_TIMEOUT):
            await clients.all_open.wait()
        ok = not clients.failures and clients.opened == n
        if ok:
            figures["open_seconds"] = time.perf_counter() - started
            await trio.sleep(SETTLE_SECONDS)
            figures["after"] = vm_rss_kib(daemon.pid)
            figures["opened"] = clients.opened
        clients.release.set()
    if not ok:
        raise SystemExit(
            f"only {clients.opened} of {n} connections opened; "
            f"{len(clients.failures)} failed: "
            + "; ".join(clients.failures[:5])
            + f"\ndaemon log:\n{daemon.log_tail()}"
        )
    await trio.sleep(SETTLE_SECONDS)
    figures["closed"] = vm_rss_kib(daemon.pid)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1_000, help="idle connections")
    parser.add_argument("--concurrency", type=int, default=50, help="handshakes at once")
    parser.add_argument("--quick", action="store_true", help="smoke run: 100 connections")
    args = parser.parse_args()
    n = 100 if args.quick else max(1, min(args.connections, 50_000))
    concurrency = max(1, min(args.concurrency, 1_000))

    # Client sockets live here and server sockets in the daemon; both need n+.
    limit = raise_nofile(2 * n + 1_024)
    if limit < n + 256:
        raise SystemExit(f"RLIMIT_NOFILE is {limit}; need at least {n + 256}")

    with tempfile.TemporaryDirectory(prefix="chatd-bench-") as tmp:
        work = Path(tmp)
        config = init_data_dir(work / "data")
        set_settings(
            config,
            "relay",
            {
                **RELAXED_ADDRESSES,
                "port": 0,
                "idle_timeout_seconds": 3_600.0,
                "handshake_timeout_seconds": 300.0,
                "max_connections": max(10_000, 2 * n),
            },
        )
        daemon = Daemon(config, work)
        daemon.start()
        try:
            ready = daemon.wait_ready()
            url, _port = daemon.relay_url()
            figures = trio.run(_measure, daemon, url, n, concurrency)
        except BaseException:
            daemon.kill()
            raise
        code, stop_seconds = daemon.stop()
        log_tail = daemon.log_tail()
    if code != 0:
        raise SystemExit(f"chatd exited with {code} after SIGTERM, expected 0:\n{log_tail}")

    before, after, closed = figures["before"], figures["after"], figures["closed"]
    per_conn = (after - before) / n
    print(f"relay: {url} (daemon ready in {ready * 1000:.0f} ms, RLIMIT_NOFILE {limit})")
    print(f"idle connections open: {int(figures['opened'])}")
    print(f"time to open all: {figures['open_seconds']:.2f} s")
    print(f"daemon RSS before (after {WARMUP_CONNECTIONS} warm-up connections): {before:,.0f} KiB")
    print(f"daemon RSS with {n} idle connections: {after:,.0f} KiB")
    print(f"RSS growth: {after - before:,.0f} KiB")
    print(f"RSS per idle connection: {per_conn:.1f} KiB")
    print(f"daemon RSS after all closed: {closed:,.0f} KiB")
    print(f"SIGTERM to exit {code}: {stop_seconds * 1000:.0f} ms")


if __name__ == "__main__":
    main()
