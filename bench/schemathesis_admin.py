"""Long schemathesis run against the admin API of a real ``chatd serve``.

The long form of tests/test_admin_schemathesis.py. It makes a fresh data dir
with ``chatd init``, moves the admin API to 127.0.0.1 (a free port), relaxes
login limits, starts the daemon and seeds it: two accounts, alice's session
and device (through the real client library), a channel and a group with bob
invited, an invite. Then it runs ``schemathesis run`` on the OpenAPI document
the daemon serves, with every phase and ``--checks all``, twice:

* with the admin token: every response must pass every check;
* without it: besides, every declared operation that needs the token must
  answer 401 and nothing else.

It prints, for each run: operations, test cases generated, requests sent,
responses by status, failures and errors (from schemathesis), and seconds
taken; then whether the daemon logged anything at error level and how it
exited on SIGTERM. Exit status 0 only if both runs found nothing. The HAR
files of both runs (every request and response) are kept in the work dir,
printed at the end.

    .venv/bin/python bench/schemathesis_admin.py [--examples 300] [--seed 1]
        [--max-time SECONDS] [--workers 1]

``--examples`` is schemathesis's ``--max-examples`` (per operation, in the
fuzzing phase; the coverage phase adds its boundary cases on top);
``--max-time`` instead repeats fuzzing and stateful testing until the time is
spent. Nothing leaves loopback.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import trio
from _daemon import RELAXED_AUTH, Daemon, init_data_dir, set_settings

from chatd.admin.api import ROUTES
from chatd.admin.app import routes_for
from chatd.client import open_client

SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))
PASSWORDS = {"alice": "alice's long password", "bob": "bob's long password!"}
_ADMIN_URL = re.compile(r"admin (http://[^,\s]+)")


def seed(admin_url: str, relay_url: str, token: str, work: Path) -> None:
    """Accounts, a session and device, two rooms and an invite for schemathesis to find."""
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=admin_url, headers=headers, timeout=30) as admin:
        for name, password in PASSWORDS.items():
            reply = admin.post("/v1/users", json={"username": name, "password": password})
            reply.raise_for_status()
        bob = admin.get("/v1/users", params={"username": "bob"}).json()["users"][0]["id"]
        admin.post("/v1/invites", json={"note": "for carol"}).raise_for_status()

    async def rooms() -> None:
        async with open_client(
            relay_url,
            "alice",
            PASSWORDS["alice"],
            device_name="alice-laptop",
            store_path=work / "alice.db",
            store_key=secrets.token_bytes(32),
        ) as alice:
            await alice.rooms.create("general", "channel")
            group = await alice.rooms.create("plans", "group")
            await alice.rooms.invite(group.room_id, bob)

    trio.run(rooms)


def run(admin_url: str, args: argparse.Namespace, work: Path, token: str | None) -> dict[str, Any]:
    """One schemathesis run; its figures."""
    har = work / ("with-token.har" if token else "without-token.har")
    env = dict(os.environ)
    config = har.with_suffix(".toml")
    config.write_text("")
    if token is not None:
        # From the environment, not the command line, where ps would show it.
        config.write_text('[headers]\nAuthorization = "Bearer ${CHATD_ADMIN_TOKEN}"\n')
        env["CHATD_ADMIN_TOKEN"] = token
    command = [
        SCHEMATHESIS,
        "--config-file",
        str(config),
        "run",
        f"{admin_url}/v1/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        str(args.examples),
        "--seed",
        str(args.seed),
        "--workers",
        str(args.workers),
        "--request-timeout",
        "30",
        "--no-color",
        "--suppress-health-check",
        "too_slow",  # slow generation on a busy machine is not the API's fault
        "--report",
        "har",
        "--report-har-path",
        str(har),
    ]
    if args.max_time:
        command += ["--max-time", str(args.max_time)]
    started = time.monotonic()
    done = subprocess.run(
        command, cwd=work, env=env, capture_output=True, text=True, check=False, timeout=24 * 3600
    )
    seconds = time.monotonic() - started
    output = done.stdout + done.stderr
    (work / har.with_suffix(".txt").name).write_text(output)
    entries = json.loads(har.read_text())["log"]["entries"] if har.exists() else []
    statuses = collections.Counter(e["response"]["status"] for e in entries)
    not_401 = [
        f"{e['request']['method']} {e['request']['url']} -> {e['response']['status']}"
        for e in entries
        if token is None
        and e["response"]["status"] != 401
        and _needs_token(e["request"]["method"], e["request"]["url"])
    ]

    def figure(pattern: str) -> int:
        found = re.search(pattern, output)
        return int(found.group(1)) if found else 0

    return {
        "exit": done.returncode,
        "operations": figure(r"Operations:\s+(\d+) selected"),
        "cases": figure(r"(\d+) generated"),
        "requests": len(entries),
        "statuses": dict(sorted(statuses.items())),
        "failures": figure(r"(\d+) unique failures?"),
        "errors": figure(r"(\d+) errored"),
        "secured_not_401": not_401,
        "seconds": seconds,
        "tail": "\n".join(output.splitlines()[-40:]),
    }


def _needs_token(method: str, url: str) -> bool:
    routes = routes_for(ROUTES, unquote(urlsplit(url).path))
    return any(r.auth for r in routes if r.method == method)


def report(label: str, figures: dict[str, Any]) -> bool:
    clean = figures["exit"] == 0 and not figures["secured_not_401"]
    print(f"{label}:")
    print(f"  operations          {figures['operations']}")
    print(f"  test cases          {figures['cases']}")
    print(f"  requests            {figures['requests']}")
    print(f"  responses by status {figures['statuses']}")
    print(f"  failures            {figures['failures']}")
    print(f"  errors              {figures['errors']}")
    if label.startswith("without"):
        print(f"  secured, not 401    {len(figures['secured_not_401'])}")
        for line in figures["secured_not_401"][:10]:
            print(f"    {line}")
    print(f"  seconds             {figures['seconds']:.1f}")
    print(f"  schemathesis exit   {figures['exit']}")
    if not clean:
        print(figures["tail"])
    return clean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--examples", type=int, default=300, help="max examples per operation")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-time", type=int, default=0, help="seconds per run (0: no limit)")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="chatd-schemathesis-"))
    data = work / "data"
    data.mkdir(mode=0o700)
    config = init_data_dir(data)
    set_settings(config, "relay", {"port": 0})
    set_settings(config, "attachments", {"port": 0})
    set_settings(config, "admin", {"listen": "127.0.0.1:0"})
    set_settings(config, "auth", RELAXED_AUTH)
    token = (data / "admin-token").read_text().strip()

    daemon = Daemon(config, work)
    daemon.start()
    try:
        daemon.wait_ready()
        found = _ADMIN_URL.search(daemon.status)
        if found is None:
            raise SystemExit(f"no admin URL in the READY status: {daemon.status!r}")
        admin_url = found.group(1)
        seed(admin_url, daemon.relay_url()[0], token, work)
        print(f"schemathesis {args.examples} examples/operation, seed {args.seed}, {admin_url}")
        clean = report("with the token", run(admin_url, args, work, token))
        clean = report("without the token", run(admin_url, args, work, None)) and clean
    finally:
        code, _ = daemon.stop()
    errors = [line for line in daemon.log_path.read_text().splitlines() if "level=error" in line]
    print(f"daemon: {len(errors)} error-level log lines, exit {code} on SIGTERM")
    for line in errors[:10]:
        print(f"  {line}")
    print(f"reports and log: {work}")
    if not clean or errors or code != 0:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
