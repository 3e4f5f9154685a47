"""Who is online now: ``GET /v1/online`` and ``chatctl online`` on the real daemon.

The daemon hands the relay registry's list of connected devices to the admin
API; these tests connect real WebSocket clients to a real ``chatd serve``
(real SQLCipher file) and read the list over the admin unix socket and
through chatctl. Nothing sleeps: a connection that says ``bye`` is gone from
the registry by the time its Close frame arrives.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import trio
from trio_websocket import open_websocket_url

from .conftest import DataDir
from .test_admin import assert_error
from .test_daemon import chatctl as run_chatctl
from .test_daemon import daemon
from .test_daemon_messaging import PASSWORDS, create_users
from .test_relay_auth import Client


@asynccontextmanager
async def connected(url: str) -> AsyncIterator[Client]:
    async with open_websocket_url(url) as ws:
        assert json.loads(await ws.get_message())["type"] == "hello"
        yield Client(ws)


async def online(data_dir: DataDir) -> dict[str, Any]:
    transport = httpx.AsyncHTTPTransport(uds=str(data_dir.path / "a.sock"))
    headers = {"Authorization": f"Bearer {data_dir.token}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://chatd") as admin:
        reply = await admin.get("/v1/online", headers=headers)
        assert reply.status_code == 200, reply.text
        return reply.json()  # type: ignore[no-any-return]


async def test_online_lists_connected_devices_without_message_metadata(
    data_dir: DataDir, short_tmp: Path
) -> None:
    data_dir.configure(auth={"require_mfa": "none"})
    config = str(data_dir.config_path)
    async with daemon(data_dir, short_tmp) as d:
        await d.wait_notify("READY")
        await create_users(data_dir)
        url = d.relay_url()
        assert await online(data_dir) == {"devices": [], "users": 0, "connections": 0}
        before = int(time.time() * 1000)
        async with connected(url) as alice, connected(url) as alice_again, connected(url) as bob:
            session = await alice.login("alice", PASSWORDS["alice"])
            assert session["type"] == "session", session
            resumed = await alice_again.request("resume", access_token=session["access_token"])
            assert resumed["device_id"] == session["device_id"]
            bob_session = await bob.login("bob", PASSWORDS["bob"])
            assert bob_session["type"] == "session", bob_session

            listed = await online(data_dir)
            assert listed["users"] == 2 and listed["connections"] == 3
            first, second = listed["devices"]
            assert set(first) == {
                "user_id",
                "username",
                "device_id",
                "device_name",
                "since",
                "connections",
            }
            assert (first["username"], first["device_id"], first["connections"]) == (
                "alice",
                session["device_id"],
                2,
            )
            assert first["device_name"] == "laptop"
            assert (second["username"], second["device_id"], second["connections"]) == (
                "bob",
                bob_session["device_id"],
                1,
            )
            assert before <= first["since"] <= int(time.time() * 1000)

            table = await trio.to_thread.run_sync(run_chatctl, "--config", config, "online")
            assert table.returncode == 0, table.stderr
            lines = table.stdout.splitlines()
            assert lines[0].split() == [
                "user", "username", "device", "name", "online", "since", "connections"
            ]  # fmt: skip
            assert any(
                line.split()[:4] == ["1", "alice", session["device_id"], "laptop"]
                and line.split()[-1] == "2"
                for line in lines
            )
            assert lines[-1] == "2 device(s) of 2 user(s) online"

            await bob.ws.send_message(json.dumps({"type": "bye"}))
            assert (await bob.closed())[0] == 1000
            await alice_again.ws.send_message(json.dumps({"type": "bye"}))
            assert (await alice_again.closed())[0] == 1000
            listed = await online(data_dir)
            assert [(x["username"], x["connections"]) for x in listed["devices"]] == [("alice", 1)]
            assert listed["devices"][0]["since"] == first["since"]  # the oldest one stayed

        audit = await trio.to_thread.run_sync(run_chatctl, "--config", config, "audit")
        assert "/v1/online" in audit.stdout  # who is online is personal data


async def test_online_without_a_relay_answers_503(data_dir: DataDir) -> None:
    from .test_admin_accounts import accounts_running

    async with accounts_running(data_dir) as admin:
        assert_error(await admin.call("GET", "/v1/online"), 503, "service_unavailable")
        assert_error(await admin.client.get("/v1/online"), 401, "unauthorized")
