"""Hostile input against the real daemon: a bounded, derandomized Hypothesis
run of tests/fuzzing.py's cases (every client frame type, arbitrary JSON,
raw WebSocket framing; before and after login).

Properties: no case breaks the rules tests/fuzzing.py checks (a Close frame
with a documented code, an error frame for every refused frame, the fence
answered otherwise); no error-level line in the daemon's log; and a
well-behaved client on another connection gets every ping answered while
the cases run. bench/fuzz.py runs the same cases 100,000 times.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import trio
from hypothesis import HealthCheck, Phase, given, settings
from trio_websocket import open_websocket_url

from .conftest import DataDir
from .fuzzing import Case, Fuzzer, cases
from .test_daemon import daemon
from .test_daemon_messaging import PASSWORDS, create_users

EXAMPLES = 1_000  # about 20 s on 2 busy cores
#: The fuzzer logs in and resumes often (a case may log it out): no limits on
#: that account or on resumes. Logins per address keep their default, so the
#: hostile login frames are refused cheaply, as they would be in production.
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


def fuzz(host: str, port: int, examples: int) -> int:
    """Run the cases (in a worker thread: Hypothesis and the client block)."""
    fuzzer = Fuzzer(host, port, "alice", PASSWORDS["alice"])

    @settings(
        max_examples=examples,
        derandomize=True,  # the same cases on every run: CI stays deterministic
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=(Phase.generate, Phase.shrink),
    )
    @given(cases)
    def each(case: Case) -> None:
        fuzzer.run_case(case)

    try:
        each()
    finally:
        fuzzer.close()
    return fuzzer.stats.cases


async def test_hostile_input_never_breaks_the_rules_or_the_others_service(
    data_dir: DataDir, short_tmp: Path
) -> None:
    data_dir.configure(auth=FUZZ_AUTH)
    async with daemon(data_dir, short_tmp) as d:
        await d.wait_notify("READY")
        await create_users(data_dir)
        url = d.relay_url()
        port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
        round_trips: list[float] = []
        done = trio.Event()
        async with open_websocket_url(url) as bob:
            await bob.get_message()  # hello
            login = {
                "type": "login",
                "id": "l",
                "username": "bob",
                "password": PASSWORDS["bob"],
                "device_name": "phone",
            }
            await bob.send_message(json.dumps(login))
            while json.loads(await bob.get_message())["type"] != "session":
                pass

            async def well_behaved() -> None:
                n = 0
                while not done.is_set():
                    n += 1
                    started = trio.current_time()
                    await bob.send_message(f'{{"type":"ping","id":"b{n}"}}')
                    with trio.fail_after(10):  # served throughout, never starved
                        while json.loads(await bob.get_message()).get("id") != f"b{n}":
                            pass
                    round_trips.append(trio.current_time() - started)
                    await trio.sleep(0.02)  # a paced client, not a flood

            async with trio.open_nursery() as nursery:
                nursery.start_soon(well_behaved)
                try:
                    ran = await trio.to_thread.run_sync(fuzz, "127.0.0.1", port, EXAMPLES)
                finally:
                    done.set()
        assert ran >= EXAMPLES
        assert len(round_trips) > 10
        slowest = sorted(round_trips)[math.ceil(len(round_trips) * 0.99) - 1]
        assert slowest < 5.0
    log = (short_tmp / "stderr.log").read_text()
    assert [line for line in log.splitlines() if re.search(r"level=(error|critical)", line)] == []
