"""Sustained load, bounded: 100 connections of the real daemon each send one
message a second for 5 seconds and acknowledge their deliveries. The long run
is ``bench/sustained.py`` (1,000 connections for 60 s; docs/RELIABILITY.md,
section 5); both run the same code.
"""

from __future__ import annotations

from pathlib import Path

from .test_kill9 import load_bench

CONNECTIONS = 100
SECONDS = 5.0
WARMUP = 1.0
#: How far the daemon's RSS may rise between the first sample after the
#: warm-up and the last (about 400 messages). Measured: under 0.1 MiB in
#: three runs, and flat in the long run once SQLite's page caches and the
#: record of recent sends have filled (RELIABILITY.md, section 5). The bound
#: leaves room for an allocator step on a shared machine and catches a leak
#: of more than about 5 KB a message.
RSS_GROWTH_BOUND_KIB = 2 * 1024


async def test_a_hundred_connections_sending_every_second_get_no_error_and_rss_stays_flat(
    short_tmp: Path,
) -> None:
    sustained = load_bench("sustained")
    result = await sustained.run(short_tmp, connections=CONNECTIONS, seconds=SECONDS, warmup=WARMUP)
    summary = sustained.report(result)
    assert result.errors == [], summary
    assert result.exit_code == 0, summary
    assert result.answered == CONNECTIONS * SECONDS, summary
    assert len(result.deliver_latency) == result.messages > 0, summary
    assert result.rss_growth_kib() < RSS_GROWTH_BOUND_KIB, summary
