"""kill -9 under load, bounded: 50 kills of the real daemon while devices send
direct and room messages and acknowledge their deliveries, half of the kills
between a delivery and its ack. The long run is ``bench/kill9.py --kills 1000``
(docs/RELIABILITY.md, section 1); both run the same harness.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from .conftest import REPO

KILLS = 50  # the suite's bounded run (about a minute of CI time)


def load_bench(name: str) -> ModuleType:
    """Import ``bench/<name>.py`` (the bench directory is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


async def test_fifty_kills_lose_no_acknowledged_message_and_leave_a_sound_database(
    short_tmp: Path,
) -> None:
    kill9 = load_bench("kill9")
    figures = await kill9.run(short_tmp, kills=KILLS, devices=4, seed=KILLS)
    summary = kill9.report(figures)
    assert figures.kills == KILLS, summary
    assert figures.kills_before_ack >= KILLS // 4, summary
    assert figures.answered_sent > KILLS, summary
    assert figures.resent > 0, summary  # some sends were cut off by a kill and sent again
    assert figures.lost == [], summary
    assert figures.duplicates == 0, summary
    assert figures.after_durable_ack == 0, summary
    assert figures.errors == [], summary
    assert (figures.integrity, figures.cipher_integrity) == ("ok", "ok"), summary
    assert figures.exit_code == 0, summary
