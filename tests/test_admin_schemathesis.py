"""Schemathesis against the admin API of a real daemon: 0 failures with --checks all.

A fresh ``chatd serve`` (tests/test_daemon.py's helper, a real SQLCipher file)
listens for admin requests on 127.0.0.1, port 0. Before schemathesis runs,
the test gives it something to find: two accounts, alice's session and
device, a channel and a group with bob invited, and an invite. Then the
``schemathesis`` command (the venv's) loads the OpenAPI document the daemon
serves and runs every phase (examples, coverage, fuzzing, stateful) with
every check, including negative data, undeclared methods, ``Allow`` headers,
use after delete and ignored auth. Its run may change or delete anything:
the daemon is this test's alone.

Bounded: a few examples per operation, a fixed seed, deterministic
generation, no example database, one worker, nothing beyond loopback.
``bench/schemathesis_admin.py`` is the long run of the same thing.

The run with the token must end with 0 failures and 0 errors; so must the run
without it, in which every declared operation that needs the token must have
answered 401 and nothing else. Afterwards the daemon must stop cleanly on
SIGTERM, with no error-level line in its log (a 500 would leave one).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args
from urllib.parse import unquote, urlsplit

import httpx
import trio

from chatd.admin.api import ROUTES
from chatd.admin.app import routes_for
from chatd.admin.openapi import openapi_document
from chatd.client import open_client
from chatd.retention import JobName

from .conftest import DataDir
from .test_daemon import daemon
from .test_e2e_daemon import RELAXED_AUTH

SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))
EXAMPLES = 5  # per operation in the fuzzing phase; the coverage phase adds its own cases
SEED = 20261203
RUN_SECONDS = 120  # bound on one schemathesis run (it takes about 10 s)
PASSWORDS = {"alice": "alice's long password", "bob": "bob's long password!"}


@dataclass
class Run:
    """One finished schemathesis run."""

    returncode: int
    output: str
    entries: list[dict[str, Any]]  # its HAR: every request and response

    @property
    def cases(self) -> int:
        found = re.search(r"(\d+) generated", self.output)
        return int(found.group(1)) if found else 0


async def run_schemathesis(admin_url: str, report: Path, *, token: str | None) -> Run:
    """Run schemathesis in ``report``'s directory (where it keeps its cache)."""
    env = dict(os.environ)
    config = report.with_suffix(".toml")
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
        str(EXAMPLES),
        "--seed",
        str(SEED),
        "--generation-deterministic",  # also: no example database
        "--workers",
        "1",
        "--request-timeout",
        "10",
        "--no-color",
        "--suppress-health-check",
        "too_slow",  # slow generation on a busy machine is not the API's fault
        "--report",
        "har",
        "--report-har-path",
        str(report),
    ]
    with trio.fail_after(RUN_SECONDS):
        done = await trio.run_process(
            command,
            capture_stdout=True,
            stderr=subprocess.STDOUT,
            check=False,
            cwd=report.parent,
            env=env,
        )
    output = done.stdout.decode(errors="replace")
    entries = json.loads(report.read_text())["log"]["entries"] if report.exists() else []
    return Run(done.returncode, output, entries)


async def seed(admin_url: str, relay_url: str, token: str, stores: Path) -> None:
    """Accounts, a session and device, two rooms and an invite to find."""
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=admin_url, headers=headers) as admin:
        for name, password in PASSWORDS.items():
            reply = await admin.post("/v1/users", json={"username": name, "password": password})
            assert reply.status_code == 200, reply.text
        bob = (await admin.get("/v1/users", params={"username": "bob"})).json()["users"][0]
        reply = await admin.post("/v1/invites", json={"note": "for carol"})
        assert reply.status_code == 200, reply.text
        # Every job name the document lists runs in the real daemon.
        reply = await admin.post("/v1/retention/run", json={"jobs": list(get_args(JobName))})
        assert reply.status_code == 200, reply.text
        assert sorted(r["job"] for r in reply.json()["reports"]) == sorted(get_args(JobName))
    async with open_client(
        relay_url,
        "alice",
        PASSWORDS["alice"],
        device_name="alice-laptop",
        store_path=stores / "alice.db",
        store_key=secrets.token_bytes(32),
        backoff_base=0.01,
    ) as alice:
        await alice.rooms.create("general", "channel")
        group = await alice.rooms.create("plans", "group")
        await alice.rooms.invite(group.room_id, bob["id"])


@asynccontextmanager
async def admin_daemon(data_dir: DataDir, short_tmp: Path) -> AsyncIterator[str]:
    """A fresh daemon with its admin API on loopback and data to find; its admin URL."""
    data_dir.configure(admin={"listen": "127.0.0.1:0"}, auth=RELAXED_AUTH)
    async with daemon(data_dir, short_tmp) as d:
        status = await d.wait_notify("READY")
        found = re.search(r"admin (http://[^,\s]+)", status)
        assert found, status
        stores = short_tmp / "stores"
        stores.mkdir()
        await seed(found.group(1), d.relay_url(), data_dir.token, stores)
        yield found.group(1)
        d.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await d.proc.wait() == 0
    log = (short_tmp / "stderr.log").read_text()
    assert [line for line in log.splitlines() if "level=error" in line] == []


def needs_token(method: str, url: str) -> bool:
    """Whether the document declares ``method`` on ``url``'s path, with the token."""
    routes = routes_for(ROUTES, unquote(urlsplit(url).path))
    return any(r.auth for r in routes if r.method == method)


async def test_schemathesis_finds_nothing_with_the_token_or_without_it(
    data_dir: DataDir, short_tmp: Path
) -> None:
    async with admin_daemon(data_dir, short_tmp) as admin_url:
        with_token = await run_schemathesis(
            admin_url, short_tmp / "with-token.har", token=data_dir.token
        )
        assert with_token.returncode == 0, with_token.output
        assert re.search(r"\d+ generated, \d+ passed", with_token.output), with_token.output
        assert with_token.cases >= 500  # the coverage phase alone makes several hundred
        statuses = {e["response"]["status"] for e in with_token.entries}
        assert 200 in statuses and not any(s >= 500 for s in statuses), statuses

        without = await run_schemathesis(admin_url, short_tmp / "no-token.har", token=None)
        assert without.returncode == 0, without.output
        seen = 0
        for entry in without.entries:
            request, status = entry["request"], entry["response"]["status"]
            if needs_token(request["method"], request["url"]):
                seen += 1
                assert status == 401, (request["method"], request["url"], status)
            assert status < 500
        assert seen >= 200


def _schemas(schema: Any, components: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every (path, subschema) in a request schema, following $refs."""
    found: list[tuple[str, dict[str, Any]]] = []

    def walk(node: Any, where: str) -> None:
        if not isinstance(node, dict):
            return
        ref = node.get("$ref")
        if ref:
            walk(components[ref.rsplit("/", 1)[1]], where)
            return
        found.append((where, node))
        for name, prop in node.get("properties", {}).items():
            walk(prop, f"{where}.{name}")
        for branch in node.get("anyOf", []):
            walk(branch, where)
        walk(node.get("items"), f"{where}[]")

    walk(schema, "$")
    return found


def test_every_request_value_the_document_allows_is_bounded() -> None:
    """What the document allows must fit SQLite (int64) and admin.max_body_bytes, so
    every integer has a maximum, and every string and list a longest length; the
    types in chatd/admin/*.py say so with msgspec.Meta (le=MAX_INT, max_length=...)."""
    document = openapi_document()
    components = document["components"]["schemas"]
    for path, item in document["paths"].items():
        for method, op in item.items():
            schemas = [(f"{p['in']} {p['name']}", p["schema"]) for p in op.get("parameters", [])]
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            if body is not None:
                schemas += [(f"body {w}", s) for w, s in _schemas(body["schema"], components)]
            for where, schema in schemas:
                what = f"{method.upper()} {path}: {where}"
                if schema.get("type") == "integer":
                    assert schema.get("maximum", 2**64) <= 2**63 - 1, what
                if schema.get("type") == "string" and "enum" not in schema:
                    assert "maxLength" in schema, what
                if schema.get("type") == "array":
                    assert "maxItems" in schema, what
