"""Consent administered on the real daemon: the admin API, chatctl, the audit log,
and a connected session told of a new version the moment chatctl sets it."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import trio
from trio_websocket import open_websocket_url

from .conftest import DataDir
from .test_daemon import chatctl, daemon
from .test_daemon_messaging import PASSWORDS, create_users

WAIT = 15.0


async def test_chatctl_sets_and_shows_versions_and_a_users_records(
    data_dir: DataDir, short_tmp: Path
) -> None:
    data_dir.configure(auth={"require_mfa": "none"})
    config = str(data_dir.config_path)

    async def ctl(*args: str) -> tuple[int, str, str]:
        done = await trio.to_thread.run_sync(chatctl, "--config", config, *args)
        return done.returncode, done.stdout, done.stderr

    async with daemon(data_dir, short_tmp) as d:
        await d.wait_notify("READY")
        await create_users(data_dir)
        code, out, _ = await ctl("consent", "show")
        assert code == 0 and "no version set" in out
        async with open_websocket_url(d.relay_url()) as ws:
            await ws.get_message()  # hello
            login = {"username": "bob", "password": PASSWORDS["bob"], "device_name": "phone"}
            await ws.send_message(json.dumps({"type": "login", "id": "l1", **login}))
            with trio.fail_after(WAIT):
                session = json.loads(await ws.get_message())
                assert "consent_required" not in session
                assert json.loads(await ws.get_message())["type"] == "key_count"
            url = "https://example.org/terms/2026-12"
            code, out, err = await ctl(
                "consent", "set", "terms", "2026-12", "--url", url, "--title", "Terms"
            )
            assert code == 0, err
            assert "2026-12" in out and url in out
            with trio.fail_after(WAIT):
                pushed = json.loads(await ws.get_message())
            assert pushed == {
                "type": "consent_required",
                "documents": [
                    {"kind": "terms", "version": "2026-12", "url": url, "title": "Terms"}
                ],
            }
            accept = {"type": "consent_accept", "id": "a1", "kind": "terms", "version": "2026-12"}
            await ws.send_message(json.dumps(accept))
            with trio.fail_after(WAIT):
                assert json.loads(await ws.get_message()) == {"type": "ok", "id": "a1"}
        code, out, _ = await ctl("--json", "consent", "show")
        [document] = json.loads(out)["documents"]
        assert (document["kind"], document["version"], document["url"]) == ("terms", "2026-12", url)
        code, out, _ = await ctl("users", "consent", "bob")
        assert code == 0
        assert "accepted" in out and "2026-12" in out and "still to accept: nothing" in out
        code, out, _ = await ctl("users", "consent", "alice")
        assert "still to accept: terms" in out
        # Bad input: a clear error, nothing stored.
        code, _, err = await ctl("consent", "set", "terms", "no spaces allowed")
        assert code == 1 and "invalid_request" in err and "$.version" in err
        code, _, err = await ctl("consent", "set", "cookies", "1")
        assert code == 64 and "invalid choice" in err
        code, _, err = await ctl("users", "consent", "999")
        assert code == 1 and "not_found" in err
        transport = httpx.AsyncHTTPTransport(uds=str(data_dir.path / "a.sock"))
        headers = {"Authorization": f"Bearer {data_dir.token}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://chatd") as admin:
            bad_url = await admin.put(
                "/v1/consent", headers=headers, json={"kind": "terms", "version": "3", "url": "x"}
            )
            assert bad_url.status_code == 400 and bad_url.json()["error"]["field"] == "$.url"
            still = (await admin.get("/v1/consent", headers=headers)).json()["documents"]
            assert [d["version"] for d in still] == ["2026-12"]
        code, out, _ = await ctl("--json", "audit", "--limit", "50")
        paths = [(e["method"], e["path"]) for e in json.loads(out)["entries"]]
        assert ("PUT", "/v1/consent") in paths
        assert ("GET", "/v1/users/2/consent") in paths  # a read of personal data
        d.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await d.proc.wait() == 0
