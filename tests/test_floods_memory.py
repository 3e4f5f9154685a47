"""Defect 8: what non-reading connections pin is bounded and given back.

A real ``chatd serve`` subprocess (its RSS read from /proc): a device gets
20 connections that never read while another account queues it 1,200
messages of 8,000 characters. Before the fix each connection took up to its
1,000-envelope window into one write buffer (about 8 MB each here), and RSS
stayed at the peak after they closed. The flood and the daemon helpers are
the long run's (``bench/floods.py --memory``), at a smaller size.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import trio

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import floods  # noqa: E402 - from bench/, put on the path above
from _daemon import Daemon, init_data_dir, seed_users  # noqa: E402

PEAK_MB = 48  # RSS the flood may add at its peak (it added over 100 MB before the fix)
AFTER_MB = 15  # RSS still above the start 3 s after the connections closed


def test_non_reading_connections_pin_bounded_memory_that_comes_back(tmp_path: Path) -> None:
    config = init_data_dir(tmp_path / "data")
    floods.configure(config, relaxed=True)
    seed_users(config, floods.USERS, floods.PASSWORD)
    daemon = Daemon(config, tmp_path)
    daemon.start()
    try:
        daemon.wait_ready()
        _url, port = daemon.relay_url()

        async def run() -> dict[str, Any]:
            _pair, state = await floods.setup(port)
            return await floods.pin_memory(port, daemon.pid, state, connections=20, messages=1_200)

        rss = trio.run(run)
    finally:
        daemon.kill()
    print(rss)
    assert rss["peak"] - rss["before"] < PEAK_MB, rss
    assert rss["after"] - rss["before"] < AFTER_MB, rss
