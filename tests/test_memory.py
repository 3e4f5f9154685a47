"""chatd.memory: the glibc malloc settings behind the idle-connection figure."""

from __future__ import annotations

import subprocess
import sys

import pytest

from chatd.memory import limit_malloc_arenas, release_freed_memory


def test_freed_memory_can_be_released_on_glibc() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    assert release_freed_memory() is True


def test_an_explicit_malloc_arena_max_in_the_environment_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False


def test_the_arena_cap_applies_in_a_fresh_process() -> None:
    code = "from chatd.memory import limit_malloc_arenas; print(limit_malloc_arenas())"
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == ("True" if sys.platform.startswith("linux") else "False")
