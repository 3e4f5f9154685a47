"""Authorization across users and devices, authentication in the first
frames only, and generic errors: the ASVS 5.0 level-2 rows of
docs/SECURITY.md section 5 that no other test proved.

Each refusal is checked for its clear error and for leaving the other
user's session or device exactly as it was.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
from trio_websocket import open_websocket_url

from chatd import log as chatd_log
from chatd.config import LogSettings
from chatd.log import fields

from .test_keys import BOB_PASSWORD, login_device, team
from .test_protocol import closes, frames, started
from .test_relay_auth import PASSWORD, Client, connect

SECRET = "hunter2-never-echo-this"  # a value that must not come back in any error


async def test_a_user_cannot_revoke_another_users_session(short_tmp: Path) -> None:
    async with team(short_tmp) as srv, connect(srv) as alice, connect(srv) as bob:
        await alice.login()
        bobs = await bob.login("bob", BOB_PASSWORD)
        refused = await alice.request("revoke_sessions", session_ids=[bobs["session_id"]])
        assert refused["code"] == "unknown_session", refused  # the same as a made-up id
        # Bob's session and connection go on.
        listed = await bob.request("list_sessions")
        assert bobs["session_id"] in [s["session_id"] for s in listed["sessions"]]
        assert (await bob.request("ping"))["type"] == "pong"


async def test_a_user_cannot_remove_or_log_in_as_another_users_device(short_tmp: Path) -> None:
    async with team(short_tmp) as srv, connect(srv) as alice, connect(srv) as bob:
        await login_device(alice)
        bobs = await login_device(bob, "bob", BOB_PASSWORD)
        refused = await alice.request("remove_device", device_id=bobs.device_id)
        assert refused["code"] == "unknown_device", refused
        assert refused["field"] == "$.device_id"
        async with connect(srv) as thief:
            taken = await thief.login(device_id=bobs.device_id)  # alice's password, bob's device
            assert taken["code"] == "unknown_device", taken
        # Bob's device is still his and still listed; his connection goes on.
        directory = await bob.request("directory")
        devices = {
            d["device_id"]
            for m in directory["members"]
            if m["user_id"] == bobs.user_id
            for d in m["devices"]
        }
        assert devices == {bobs.device_id}
        assert (await bob.request("ping"))["type"] == "pong"


async def test_a_token_in_the_url_authenticates_nothing(short_tmp: Path) -> None:
    async with team(short_tmp) as srv, connect(srv) as alice:
        session = await alice.login()
        token = session["access_token"]
        url = f"{srv.url}?access_token={token}&token={token}"
        async with open_websocket_url(
            url, extra_headers=[("Authorization", f"Bearer {token}")]
        ) as ws:
            assert json.loads(await ws.get_message())["type"] == "hello"
            c = Client(ws)
            assert (await c.request("list_sessions"))["code"] == "auth_required"
            # Only the first frames authenticate: resume with the token works.
            assert (await c.request("resume", access_token=token))["type"] == "session"


@pytest.mark.parametrize(
    "text",
    [
        json.dumps({"type": "login", "id": "1", "username": "alice", "password": {"p": SECRET}}),
        json.dumps({"type": "login", "id": "1", "username": SECRET * 10, "password": 7}),
        json.dumps({"type": "resume", "id": "1", "access_token": [SECRET]}),
        json.dumps({"type": "ping", "id": {"x": SECRET}}),
        '{"type":"login","password":"' + SECRET + '",',  # not even JSON
    ],
    ids=["password-object", "long-username-bad-password", "token-list", "id", "cut-off"],
)
def test_error_frames_name_the_field_but_never_echo_a_value(text: str) -> None:
    """(An unknown ``type`` is named back to its sender: a protocol word, not a
    value; docs/SECURITY.md section 5.)"""
    actions = started().receive_text(text)
    [error] = frames(actions)
    assert error["type"] == "error" and error["message"]
    assert SECRET not in json.dumps(error)
    assert not closes(actions)


async def test_a_wrong_password_for_another_user_says_nothing_about_them(short_tmp: Path) -> None:
    """The reply is the same for bob (exists) and for a name that does not."""
    async with team(short_tmp) as srv, connect(srv) as c:
        exists = await c.login("bob", PASSWORD)
        missing = await c.login("nobody-here", PASSWORD)
        for reply in (exists, missing):
            reply.pop("id")
        assert exists == missing
        assert exists["code"] == "login_failed"


@pytest.mark.parametrize("style", ["logfmt", "json"])
def test_a_logged_value_cannot_forge_a_log_line(style: str) -> None:
    """A client-chosen value (the relay logs a refused Origin header, for
    one) is quoted: its newline cannot start a line of its own."""
    forged = "https://x.example\nts=2026-01-01T00:00:00Z level=error msg=forged"
    stream = io.StringIO()
    chatd_log.configure(LogSettings(format=style), stream)
    try:
        logging.getLogger("chatd.relay").info("relay.origin_refused", extra=fields(origin=forged))
    finally:
        chatd_log.configure(LogSettings(), io.StringIO())
    [line] = stream.getvalue().splitlines()
    assert "\\nts=2026-01-01T00:00:00Z level=error msg=forged" in line  # escaped, in the one line
