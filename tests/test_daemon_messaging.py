"""The real daemon killed in the middle of sends: no acknowledged message is lost."""

from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path

import httpx
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from .conftest import DataDir
from .test_daemon import daemon
from .test_keys import login_device
from .test_relay_auth import Client

PASSWORDS = {"alice": "alice's long password", "bob": "bob's long password!"}


async def create_users(data_dir: DataDir) -> None:
    transport = httpx.AsyncHTTPTransport(uds=str(data_dir.path / "a.sock"))
    headers = {"Authorization": f"Bearer {data_dir.token}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://chatd") as admin:
        for name, password in PASSWORDS.items():
            reply = await admin.post(
                "/v1/users",
                headers=headers,
                json={"username": name, "password": password, "role": "user"},
            )
            assert reply.status_code == 200, reply.text


async def test_sigkill_mid_send_loses_no_acknowledged_message(
    data_dir: DataDir, short_tmp: Path
) -> None:
    data_dir.configure(auth={"require_mfa": "none"})
    acknowledged: list[str] = []
    async with daemon(data_dir, short_tmp) as d:
        await d.wait_notify("READY")
        await create_users(data_dir)
        url = d.relay_url()
        async with open_websocket_url(url) as bob_ws:
            await bob_ws.get_message()  # hello
            bob = await login_device(Client(bob_ws), "bob", PASSWORDS["bob"])
            await bob.publish(1)
        bob_device = bob.device_id
        try:
            async with open_websocket_url(url) as ws:
                await ws.get_message()
                alice = await login_device(Client(ws), "alice", PASSWORDS["alice"])
                await alice.publish(1)
                for n in range(200):
                    message_id = str(uuid.uuid4())
                    await ws.send_message(
                        json.dumps(
                            {
                                "type": "send",
                                "id": f"s{n}",
                                "message_id": message_id,
                                "envelopes": [
                                    {
                                        "user_id": bob.user_id,
                                        "device_id": bob_device,
                                        "ciphertext": f"opaque {n}",
                                    }
                                ],
                            }
                        )
                    )
                    while True:
                        reply = json.loads(await ws.get_message())
                        if reply.get("id") == f"s{n}":
                            break
                    assert reply["type"] == "sent"
                    acknowledged.append(message_id)
                    if n == 20:
                        d.proc.send_signal(signal.SIGKILL)  # mid-stream, no goodbye
        except ConnectionClosed:
            pass
        with trio.fail_after(30):
            await d.proc.wait()
    assert len(acknowledged) >= 21
    # Start again on the same files: every acknowledged message is still queued.
    async with daemon(data_dir, short_tmp) as d:
        await d.wait_notify("READY")
        async with open_websocket_url(d.relay_url()) as ws:
            await ws.get_message()
            client = Client(ws)
            session = await client.login("bob", PASSWORDS["bob"], device_id=bob_device)
            assert session["device_id"] == bob_device
            received: list[str] = []
            with trio.fail_after(30):
                while len(received) < len(acknowledged):
                    frame = json.loads(await ws.get_message())
                    if frame["type"] == "deliver":
                        received += [e["message_id"] for e in frame["envelopes"]]
                        await ws.send_message(
                            json.dumps(
                                {"type": "ack", "up_to": frame["envelopes"][-1]["envelope_id"]}
                            )
                        )
            assert set(acknowledged) <= set(received)
        d.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await d.proc.wait() == 0
