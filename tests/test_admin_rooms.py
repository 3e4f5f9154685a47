"""Room administration over the real admin unix socket, and through chatctl.

The real relay and services (``open_services``) on a real SQLCipher file,
and the real admin app under hypercorn, handed the same room service the
daemon hands it. Members are real devices on the relay: what an admin does
reaches them as room events, and the relay enforces it at once.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
import trio

from chatd.admin.api import ROUTES, AdminContext
from chatd.admin.openapi import openapi_document
from chatd.admin.service import serve_admin
from chatd.keyfiles import hash_admin_token
from chatd.protocol.rooms import RoomCreate
from chatd.retention import serve_retention

from .conftest import DataDir
from .test_admin import admin_running, assert_error
from .test_admin_accounts import chatctl, concrete
from .test_keys import BOB_PASSWORD, Device, login_device, team
from .test_relay_auth import PASSWORD, Client, Server, connect

ROOM_ROUTES = [r for r in ROUTES if r.handler.__module__ == "chatd.admin.rooms_api"]


class RoomsAdmin:
    def __init__(self, client: httpx.AsyncClient, token: str, srv: Server) -> None:
        self.client = client
        self.token = token
        self.srv = srv

    async def call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}"}
        return await self.client.request(method, path, headers=headers, **kw)

    async def ok(self, method: str, path: str, **kw: Any) -> Any:
        response = await self.call(method, path, **kw)
        assert response.status_code == 200, response.text
        return response.json()

    async def audit_rows(self) -> list[tuple[str, str, int]]:
        rows = await self.srv.store.read(
            lambda c: c.execute(
                "SELECT method, path, status FROM admin_audit ORDER BY id"
            ).fetchall()
        )
        return [tuple(r) for r in rows]

    async def room(self, owner: int, name: str) -> int:
        """A channel made through the room service, as the relay would make it."""
        info = await self.srv.rooms.create(owner, RoomCreate(id="x", name=name, kind="channel"))
        return info.room_id


@asynccontextmanager
async def rooms_admin(data_dir: DataDir) -> AsyncIterator[RoomsAdmin]:
    """A relay with alice and bob, and the admin API over the same services."""
    config = data_dir.config
    async with team(data_dir.path) as srv, trio.open_nursery() as nursery:
        retention = await nursery.start(serve_retention, srv.store, config.retention)
        ctx = AdminContext(
            store=srv.store,
            retention=retention,
            token_hash=hash_admin_token(data_dir.token),
            accounts=srv.admin,
            rooms=srv.rooms,
        )
        stopping = trio.Event()
        await nursery.start(serve_admin, config, ctx, stopping)
        transport = httpx.AsyncHTTPTransport(uds=str(config.admin_unix_socket))
        async with httpx.AsyncClient(transport=transport, base_url="http://chatd") as client:
            yield RoomsAdmin(client, data_dir.token, srv)
        stopping.set()
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def members(admin: RoomsAdmin) -> AsyncIterator[tuple[Device, Device]]:
    """Alice and Bob, each on one device with published keys."""
    async with AsyncExitStack() as stack:
        devices = []
        for username, password in (("alice", PASSWORD), ("bob", BOB_PASSWORD)):
            client = await stack.enter_async_context(connect(admin.srv))
            device = await login_device(client, username, password)
            await device.publish(5)
            devices.append(device)
        yield devices[0], devices[1]


async def room_event(c: Client, event_type: str) -> dict[str, Any]:
    """The next room event of this type delivered to this device (acknowledged)."""
    with trio.fail_after(10):
        while True:
            frame = json.loads(await c.ws.get_message())
            if frame["type"] != "deliver":
                continue
            envelopes = frame["envelopes"]
            await c.ws.send_message(
                json.dumps({"type": "ack", "up_to": envelopes[-1]["envelope_id"]})
            )
            for envelope in envelopes:
                if envelope["kind"] == "room_event" and envelope["event"]["type"] == event_type:
                    return envelope  # type: ignore[no-any-return]


async def room_send(device: Device, room_id: int, epoch: int) -> dict[str, Any]:
    return await device.client.request(
        "room_send", room_id=room_id, message_id=str(uuid.uuid4()), epoch=epoch, ciphertext="x"
    )


# -- the declarations -----------------------------------------------------------------------------


def test_every_room_route_needs_the_token_is_audited_and_documented() -> None:
    assert {(r.method, r.path) for r in ROOM_ROUTES} == {
        ("GET", "/v1/rooms"),
        ("GET", "/v1/rooms/{room_id}"),
        ("DELETE", "/v1/rooms/{room_id}/members/{user_id}"),
        ("PUT", "/v1/rooms/{room_id}/members/{user_id}/role"),
        ("DELETE", "/v1/rooms/{room_id}"),
    }
    paths = openapi_document()["paths"]
    for r in ROOM_ROUTES:
        assert r.auth and r.audit, r.endpoint
        op = paths[r.path][r.method.lower()]
        assert op["tags"] == ["rooms"]
        documented = [p["name"] for p in op.get("parameters", []) if p["in"] == "path"]
        assert documented == r.path_params
        assert {"401", "503"} <= set(op["responses"])
        if r.path_params:
            assert "room_not_found" in op["responses"]["404"]["description"]
    role = paths["/v1/rooms/{room_id}/members/{user_id}/role"]["put"]["responses"]
    assert "last_owner" in role["409"]["description"]


# -- list, show, remove --------------------------------------------------------------------------


async def test_an_admin_lists_and_shows_rooms_and_removes_a_member(data_dir: DataDir) -> None:
    async with rooms_admin(data_dir) as admin, members(admin) as (alice, bob):
        made = await alice.client.request("room_create", name="general", kind="channel")
        room_id = made["room"]["room_id"]
        joined = await bob.client.request("room_join", room_id=room_id)
        assert joined["type"] == "room"

        page = await admin.ok("GET", "/v1/rooms")
        [room] = page["rooms"]
        assert page["next_after_id"] is None
        assert room == {
            "room_id": room_id,
            "kind": "channel",
            "name": "general",
            "topic": "",
            "invite_only": False,
            "share_history": False,
            "created_at": made["room"]["created_at"],
            "member_count": 2,
            "invitation_count": 0,
            "epoch": joined["room"]["epoch"],
        }
        shown = await admin.ok("GET", f"/v1/rooms/{room_id}")
        assert shown["room"] == room
        assert shown["members"] == [
            {
                "user_id": alice.user_id,
                "username": "alice",
                "role": "owner",
                "device_ids": [alice.device_id],
            },
            {
                "user_id": bob.user_id,
                "username": "bob",
                "role": "member",
                "device_ids": [bob.device_id],
            },
        ]
        assert shown["invitations"] == []

        removed = await admin.ok("DELETE", f"/v1/rooms/{room_id}/members/{bob.user_id}")
        assert removed == {
            "room_id": room_id,
            "user_id": bob.user_id,
            "username": "bob",
            "was": "member",
            "room_deleted": False,
        }

        # Both Bob's device (its last entry of the room) and Alice's hear of it,
        # with no by_user_id: a server admin did it.
        for device in (bob, alice):
            envelope = await room_event(device.client, "removed")
            assert envelope["room_id"] == room_id
            event = envelope["event"]
            assert event["user_id"] == bob.user_id
            assert "by_user_id" not in event
        # The relay enforces it at once: Bob can no longer send or read the members.
        epoch = (await admin.ok("GET", f"/v1/rooms/{room_id}"))["room"]["epoch"]
        refused = await room_send(bob, room_id, epoch)
        assert (refused["type"], refused["code"]) == ("error", "not_member")
        refused = await bob.client.request("room_members", room_id=room_id)
        assert (refused["type"], refused["code"]) == ("error", "not_member")
        assert (await room_send(alice, room_id, epoch))["type"] == "sent"

        after = await admin.ok("GET", f"/v1/rooms/{room_id}")
        assert [m["username"] for m in after["members"]] == ["alice"]
        assert after["room"]["member_count"] == 1
        stored = await admin.srv.store.read(
            lambda c: c.execute(
                "SELECT user_id FROM room_members WHERE room_id = ?", (room_id,)
            ).fetchall()
        )
        assert [tuple(r) for r in stored] == [(alice.user_id,)]
        assert_error(
            await admin.call("DELETE", f"/v1/rooms/{room_id}/members/{bob.user_id}"),
            404,
            "user_not_found",
        )

        assert await admin.audit_rows() == [
            ("GET", "/v1/rooms", 200),
            ("GET", f"/v1/rooms/{room_id}", 200),
            ("DELETE", f"/v1/rooms/{room_id}/members/{bob.user_id}", 200),
            ("GET", f"/v1/rooms/{room_id}", 200),
            ("GET", f"/v1/rooms/{room_id}", 200),
            ("DELETE", f"/v1/rooms/{room_id}/members/{bob.user_id}", 404),
        ]


async def test_removing_an_invitee_revokes_the_invitation(data_dir: DataDir) -> None:
    async with rooms_admin(data_dir) as admin, members(admin) as (alice, bob):
        made = await alice.client.request("room_create", name="secret", kind="group")
        room_id = made["room"]["room_id"]
        assert (await alice.client.request("room_invite", room_id=room_id, user_id=bob.user_id))[
            "type"
        ] == "ok"
        shown = await admin.ok("GET", f"/v1/rooms/{room_id}")
        assert shown["room"]["invite_only"] is True and shown["room"]["invitation_count"] == 1
        [invitation] = shown["invitations"]
        assert invitation == {
            "user_id": bob.user_id,
            "username": "bob",
            "invited_at": invitation["invited_at"],
            "by_user_id": alice.user_id,
            "by_username": "alice",
        }

        removed = await admin.ok("DELETE", f"/v1/rooms/{room_id}/members/{bob.user_id}")
        assert removed["was"] == "invitation"
        event = (await room_event(alice.client, "invite_revoked"))["event"]
        assert event["user_id"] == bob.user_id and "by_user_id" not in event
        rooms = await bob.client.request("list_rooms")
        assert rooms["invited"] == []
        refused = await bob.client.request("room_join", room_id=room_id)
        assert (refused["type"], refused["code"]) == ("error", "room_not_found")
        assert (await admin.ok("GET", f"/v1/rooms/{room_id}"))["invitations"] == []


async def test_an_admin_gives_a_room_an_owner(data_dir: DataDir) -> None:
    async with rooms_admin(data_dir) as admin, members(admin) as (alice, bob):
        made = await alice.client.request("room_create", name="general", kind="channel")
        room_id = made["room"]["room_id"]
        await bob.client.request("room_join", room_id=room_id)
        # Removing the only owner leaves the room without one, until an admin names one.
        await admin.ok("DELETE", f"/v1/rooms/{room_id}/members/{alice.user_id}")
        path = f"/v1/rooms/{room_id}/members/{bob.user_id}/role"
        promoted = await admin.ok("PUT", path, json={"role": "owner"})
        assert promoted == {
            "user_id": bob.user_id,
            "username": "bob",
            "role": "owner",
            "device_ids": [bob.device_id],
        }
        event = (await room_event(bob.client, "role"))["event"]
        assert (event["user_id"], event["role"]) == (bob.user_id, "owner")
        assert "by_user_id" not in event
        # Bob can act as the owner now.
        ok = await bob.client.request("room_set_topic", room_id=room_id, topic="news")
        assert ok["type"] == "ok"

        error = assert_error(
            await admin.call("PUT", path, json={"role": "member"}), 409, "last_owner"
        )
        assert error["message"]
        error = assert_error(
            await admin.call("PUT", path, json={"role": "admin"}), 400, "invalid_request"
        )
        assert error["field"] == "$.role"
        other = f"/v1/rooms/{room_id}/members/{alice.user_id}/role"
        error = assert_error(
            await admin.call("PUT", other, json={"role": "owner"}), 404, "user_not_found"
        )
        assert error["field"] == "user_id"
        shown = await admin.ok("GET", f"/v1/rooms/{room_id}")
        assert [(m["username"], m["role"]) for m in shown["members"]] == [("bob", "owner")]
        assert shown["room"]["topic"] == "news"


async def test_an_admin_deletes_a_room(data_dir: DataDir) -> None:
    async with rooms_admin(data_dir) as admin, members(admin) as (alice, bob):
        made = await alice.client.request("room_create", name="general", kind="channel")
        room_id = made["room"]["room_id"]
        await bob.client.request("room_join", room_id=room_id)
        epoch = (await admin.ok("GET", f"/v1/rooms/{room_id}"))["room"]["epoch"]

        deleted = await admin.ok("DELETE", f"/v1/rooms/{room_id}")
        assert (deleted["room_id"], deleted["name"], deleted["member_count"]) == (
            room_id,
            "general",
            2,
        )
        for device in (alice, bob):
            event = (await room_event(device.client, "deleted"))["event"]
            assert "by_user_id" not in event
            refused = await room_send(device, room_id, epoch)
            assert (refused["type"], refused["code"]) == ("error", "room_not_found")
        assert (await admin.ok("GET", "/v1/rooms"))["rooms"] == []
        assert_error(await admin.call("GET", f"/v1/rooms/{room_id}"), 404, "room_not_found")
        assert_error(await admin.call("DELETE", f"/v1/rooms/{room_id}"), 404, "room_not_found")
        stored = await admin.srv.store.read(
            lambda c: c.execute("SELECT count(*) FROM rooms").fetchone()[0]
        )
        assert stored == 0
        assert ("DELETE", f"/v1/rooms/{room_id}", 200) in await admin.audit_rows()


# -- paging and refusals --------------------------------------------------------------------------


async def test_rooms_are_listed_in_pages(data_dir: DataDir) -> None:
    async with rooms_admin(data_dir) as admin:
        alice = (await admin.srv.admin.list_users(limit=1, after_id=None))[0].id
        ids = [await admin.room(alice, name) for name in ("a", "b", "c")]
        first = await admin.ok("GET", "/v1/rooms", params={"limit": 2})
        assert [r["room_id"] for r in first["rooms"]] == ids[:2]
        assert first["next_after_id"] == ids[1]
        rest = await admin.ok("GET", "/v1/rooms", params={"limit": 2, "after_id": ids[1]})
        assert [r["name"] for r in rest["rooms"]] == ["c"]
        assert rest["next_after_id"] is None
        for params, field in (({"limit": 0}, "limit"), ({"after_id": "x"}, "after_id")):
            error = assert_error(
                await admin.call("GET", "/v1/rooms", params=params), 400, "invalid_request"
            )
            assert error["field"] == field
        assert_error(
            await admin.call("GET", "/v1/rooms", params={"nope": 1}), 400, "invalid_request"
        )


async def test_unknown_rooms_and_bad_ids_get_clear_errors(data_dir: DataDir) -> None:
    async with rooms_admin(data_dir) as admin:
        alice = (await admin.srv.admin.list_users(limit=1, after_id=None))[0].id
        room_id = await admin.room(alice, "general")
        for r in ROOM_ROUTES:
            if not r.path_params:
                continue
            body = {"json": {"role": "owner"}} if r.body is not None else {}
            error = assert_error(
                await admin.call(r.method, concrete(r, 999), **body), 404, "room_not_found"
            )
            assert error["field"] == "room_id"
            for bad in ("abc", "0", "-1", "99999999999999999999"):
                path = r.path.replace("{room_id}", bad).replace("{user_id}", str(alice))
                error = assert_error(
                    await admin.call(r.method, path, **body), 400, "invalid_request"
                )
                assert error["field"] == "room_id"
        error = assert_error(
            await admin.call("DELETE", f"/v1/rooms/{room_id}/members/0"), 400, "invalid_request"
        )
        assert error["field"] == "user_id"
        error = assert_error(
            await admin.call("DELETE", f"/v1/rooms/{room_id}/members/999"), 404, "user_not_found"
        )
        assert error["field"] == "user_id"
        # Nothing changed.
        assert [r["member_count"] for r in (await admin.ok("GET", "/v1/rooms"))["rooms"]] == [1]


async def test_every_room_route_refuses_a_missing_token_and_audits_it(data_dir: DataDir) -> None:
    async with rooms_admin(data_dir) as admin:
        alice = (await admin.srv.admin.list_users(limit=1, after_id=None))[0].id
        room_id = await admin.room(alice, "general")
        for r in ROOM_ROUTES:
            path = concrete(r, room_id).replace(f"/members/{room_id}", f"/members/{alice}")
            response = await admin.client.request(r.method, path, json={"role": "member"})
            assert_error(response, 401, "unauthorized")
            wrong = await admin.client.request(
                r.method, path, headers={"Authorization": "Bearer nope"}
            )
            assert_error(wrong, 401, "unauthorized")
        rows = await admin.audit_rows()
        assert len(rows) == 2 * len(ROOM_ROUTES)
        assert {status for _, _, status in rows} == {401}
        # The room is untouched.
        shown = await admin.ok("GET", f"/v1/rooms/{room_id}")
        assert [(m["user_id"], m["role"]) for m in shown["members"]] == [(alice, "owner")]


async def test_without_a_room_service_the_routes_answer_503(data_dir: DataDir) -> None:
    async with admin_running(data_dir) as admin:
        for r in ROOM_ROUTES:
            body: dict[str, Any] = {"json": {"role": "owner"}} if r.body is not None else {}
            response = await admin.client.request(
                r.method, concrete(r), headers=admin.auth(), **body
            )
            assert_error(response, 503, "service_unavailable")


# -- chatctl --------------------------------------------------------------------------------------


async def test_chatctl_administers_rooms(data_dir: DataDir) -> None:
    async with rooms_admin(data_dir) as admin, members(admin) as (alice, bob):
        base = [
            "--socket",
            str(data_dir.path / "a.sock"),
            "--token-file",
            str(data_dir.path / "admin-token"),
        ]

        async def ctl(*args: str) -> subprocess.CompletedProcess[str]:
            return await trio.to_thread.run_sync(lambda: chatctl(*base, *args))

        made = await alice.client.request(
            "room_create", name="general", kind="channel", topic="all hands"
        )
        room_id = made["room"]["room_id"]
        await bob.client.request("room_join", room_id=room_id)
        group = (await alice.client.request("room_create", name="ops", kind="group"))["room"]
        await alice.client.request("room_invite", room_id=group["room_id"], user_id=bob.user_id)

        listed = await ctl("rooms", "list")
        assert listed.returncode == 0, listed.stderr
        lines = listed.stdout.splitlines()
        assert lines[0].split() == [
            "id", "name", "kind", "members", "invited", "invite-only", "history", "epoch", "created"
        ]  # fmt: skip
        assert lines[2].split()[:6] == [str(room_id), "general", "channel", "2", "0", "no"]
        assert lines[3].split()[:6] == [str(group["room_id"]), "ops", "group", "1", "1", "yes"]
        as_json = json.loads((await ctl("--json", "rooms", "list", "--limit", "1")).stdout)
        assert [r["name"] for r in as_json["rooms"]] == ["general"]

        shown = await ctl("rooms", "show", str(room_id))
        assert shown.returncode == 0, shown.stderr
        assert "topic: all hands" in shown.stdout
        members_part = shown.stdout.split("members:\n", 1)[1].splitlines()
        assert members_part[0].split() == ["user", "username", "role", "devices", "ids"]
        assert members_part[2].split() == [
            str(alice.user_id),
            "alice",
            "owner",
            "1",
            alice.device_id,
        ]
        assert members_part[3].split() == [str(bob.user_id), "bob", "member", "1", bob.device_id]
        invited = (await ctl("rooms", "show", str(group["room_id"]))).stdout
        row = invited.split("invitations:\n", 1)[1].splitlines()[2]
        assert row.split()[:2] == [str(bob.user_id), "bob"]
        assert row.endswith(f"{alice.user_id} (alice)")

        promoted = await ctl("rooms", "set-role", str(room_id), "bob", "moderator")
        assert promoted.returncode == 0, promoted.stderr
        assert promoted.stdout.strip() == (
            f"{bob.user_id} (bob) is now moderator of room {room_id} (general)"
        )
        show_now = (await ctl("rooms", "show", str(room_id))).stdout
        assert f"{bob.user_id}     bob       moderator  1" in show_now
        # USER is a username (any case) or a user id.
        removed = await ctl("rooms", "remove", str(room_id), "BOB")
        assert removed.returncode == 0, removed.stderr
        assert removed.stdout.strip() == (
            f"removed {bob.user_id} (bob) from room {room_id} (general)"
        )
        assert "by_user_id" not in (await room_event(bob.client, "removed"))["event"]
        revoked = await ctl("rooms", "remove", str(group["room_id"]), str(bob.user_id))
        assert revoked.stdout.strip() == (
            f"revoked the invitation of {bob.user_id} (bob) to room {group['room_id']} (ops)"
        )
        unknown = await ctl("rooms", "remove", str(room_id), "carol")
        assert unknown.returncode == 64 and "no member or invitee named 'carol'" in unknown.stderr
        gone = await ctl("rooms", "remove", str(room_id), str(bob.user_id))
        assert gone.returncode == 1 and "user_not_found" in gone.stderr

        role = await ctl("rooms", "set-role", str(room_id), "alice", "moderator")
        assert role.returncode == 1 and "last_owner" in role.stderr

        unconfirmed = await ctl("rooms", "delete", str(room_id))
        assert unconfirmed.returncode == 64 and "--yes" in unconfirmed.stderr
        assert (await admin.ok("GET", f"/v1/rooms/{room_id}"))["room"]["name"] == "general"
        deleted = await ctl("rooms", "delete", str(room_id), "--yes")
        assert deleted.returncode == 0, deleted.stderr
        assert deleted.stdout.startswith(f"deleted room {room_id} (general)")
        missing = await ctl("rooms", "show", str(room_id))
        assert missing.returncode == 1
        assert "room_not_found" in missing.stderr and "field room_id" in missing.stderr
        bad = await ctl("rooms", "show", "zero")
        assert bad.returncode == 64

        rows = await admin.audit_rows()
        assert ("DELETE", f"/v1/rooms/{room_id}/members/{bob.user_id}", 200) in rows
        assert ("DELETE", f"/v1/rooms/{room_id}", 200) in rows


async def test_removing_the_last_member_deletes_the_room(data_dir: DataDir) -> None:
    async with rooms_admin(data_dir) as admin, members(admin) as (alice, _bob):
        made = await alice.client.request("room_create", name="alone", kind="group")
        room_id = made["room"]["room_id"]
        removed = await admin.ok("DELETE", f"/v1/rooms/{room_id}/members/{alice.user_id}")
        assert (removed["was"], removed["room_deleted"]) == ("member", True)
        event = (await room_event(alice.client, "deleted"))["event"]
        assert "by_user_id" not in event
        assert_error(await admin.call("GET", f"/v1/rooms/{room_id}"), 404, "room_not_found")
        assert (await admin.ok("GET", "/v1/rooms"))["rooms"] == []
