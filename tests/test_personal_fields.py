"""No log line and no response to another user carries a personal field the
data inventory does not let them see.

A real daemon (``chatd serve``, JSON logs, a real SQLCipher file) serves a
realistic session of three people over raw WebSockets: zz-marker-alice
registers with an invite (whose note names her), accepts the terms, publishes
keys, registers a push endpoint, sets up TOTP, lists her sessions,
messages bob directly, makes a private group with a distinctive name and topic
and invites bob into it, sends to the room and types to him; bob does all that
back; carol only looks at the directory, who is online and the rooms. Every
frame each of them receives and every log line is kept.

Then the forbidden values are **derived from etc/data-inventory.toml**, so a
new personal column is checked without touching this test: for each column
marked ``personal_data = true``, every text value of it in the database (of at
least MIN_CHARS characters) may appear only where its ``visible_to`` allows
(``team_if`` widening it to the team for matching rows). A value that also
sits in a column visible to the viewer, or in a column that is not personal,
is allowed (a device name is both the session's, seen by its user only, and
the device's, seen by the team). The viewers:

* carol's frames: ``team``;
* bob's frames: ``team``, ``room`` and ``peer`` (he shares a room and a
  conversation with alice, and never asks for his own ``self`` data);
* alice's own frames: everything but admin-only values (``visible_to = []``:
  her push URL, her password hash, the invite's note are never sent back);
* the daemon's log: ``log``.

Numbers (ids, times) are not checked by value: the same number means
different things in different fields. Alice's password, tokens and invite
code, which are in no column, are checked too.
"""

from __future__ import annotations

import json
import signal
import tomllib
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pyotp
import trio
from trio_websocket import open_websocket_url

from chatd.inspection import open_server_db

from .conftest import REPO, DataDir
from .test_daemon import daemon
from .test_keys import Device
from .test_relay_auth import Client

MIN_CHARS = 6  # shorter text values are not distinctive enough to look for
AUDIENCES = frozenset({"self", "team", "room", "peer", "log"})
WAIT = 15.0
TERMS = "2026-12"

ALICE = "zz-marker-alice"
ALICE_PASSWORD = "zz-marker alice's long password"
ALICE_DEVICE = "zz-marker-alice-phone"
PUSH_URL = "http://127.0.0.1:9/zz-marker-push-topic-of-alice"
INVITE_NOTE = "zz-marker invite note for alice"
GROUP = "zz-marker-secret-group"
TOPIC = "zz-marker topic of the secret group"
PEOPLE = {"bob-person": "bob-person's long password", "carol-person": "carol's long password!"}


@dataclass
class Recorder:
    """A WebSocket whose every received message is kept (for test_relay_auth's Client)."""

    ws: Any
    received: list[str] = field(default_factory=list)

    async def get_message(self) -> str:
        with trio.fail_after(WAIT):
            message = await self.ws.get_message()
        self.received.append(message)
        return message  # type: ignore[no-any-return]

    async def send_message(self, message: str) -> None:
        await self.ws.send_message(message)


def inventory() -> dict[str, Any]:
    with (REPO / "etc" / "data-inventory.toml").open("rb") as fh:
        return tomllib.load(fh)["tables"]  # type: ignore[no-any-return]


@dataclass
class Values:
    """Text values of the database: each personal one with who may see it."""

    public: set[str] = field(default_factory=set)  # values of columns that are not personal
    personal: list[tuple[str, frozenset[str], str]] = field(default_factory=list)

    def forbidden(self, viewer: frozenset[str]) -> dict[str, str]:
        """Personal values ``viewer`` may not see, with the column they come from."""
        allowed = set(self.public)
        allowed.update(v for v, seen_by, _ in self.personal if seen_by & viewer)
        return {v: where for v, seen_by, where in self.personal if v not in allowed}


def read_values(data_dir: DataDir) -> Values:
    values = Values()
    with open_server_db(data_dir.db, data_dir.key) as conn:
        for table, entry in inventory().items():
            for column, info in entry["columns"].items():
                if not info["personal_data"]:
                    rows = conn.execute(f"SELECT {column} FROM {table}").fetchall()  # noqa: S608
                    values.public.update(r[0] for r in rows if isinstance(r[0], str))
                    continue
                team_if = info.get("team_if", "0")
                rows = conn.execute(
                    f"SELECT {column}, {team_if} FROM {table}"  # noqa: S608 - from the inventory
                ).fetchall()
                for value, team in rows:
                    if isinstance(value, str) and len(value) >= MIN_CHARS:
                        seen_by = set(info["visible_to"]) | ({"team"} if team else set())
                        values.personal.append((value, frozenset(seen_by), f"{table}.{column}"))
    return values


def leaks(texts: list[str], forbidden: dict[str, str]) -> list[str]:
    """Each forbidden value found in ``texts`` (raw, or as JSON escapes it)."""
    found = []
    for value, where in sorted(forbidden.items()):
        needles = {value, json.dumps(value)[1:-1]}
        if any(n in text for text in texts for n in needles):
            found.append(f"{where}: {value[:40]!r}")
    return found


async def begin(
    stack: AsyncExitStack, url: str, frame_type: str, **fields: Any
) -> tuple[Client, Recorder, Device]:
    """Connect, start a session, accept the terms and publish keys."""
    ws = await stack.enter_async_context(open_websocket_url(url))
    recorder = Recorder(ws)
    client = Client(recorder)
    await recorder.get_message()  # hello
    session = await client.request(frame_type, **fields)
    assert session["type"] == "session", session
    assert [d["kind"] for d in session["consent_required"]] == ["terms"]
    refused = await client.request("directory")
    assert refused["code"] == "consent_required"
    ok = await client.request("consent_accept", kind="terms", version=TERMS)
    assert ok["type"] == "ok", ok
    device = Device(client, session["user"]["id"], session["device_id"])
    assert (await device.publish(3))["type"] == "key_count"
    return client, recorder, device


async def admin_setup(data_dir: DataDir) -> str:
    """bob and carol, the terms, and an invite for alice; returns its code."""
    transport = httpx.AsyncHTTPTransport(uds=str(data_dir.path / "a.sock"))
    headers = {"Authorization": f"Bearer {data_dir.token}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://chatd") as admin:
        for name, password in PEOPLE.items():
            made = await admin.post(
                "/v1/users", headers=headers, json={"username": name, "password": password}
            )
            assert made.status_code == 200, made.text
        terms = {"kind": "terms", "version": TERMS, "url": "https://example.org/terms"}
        assert (await admin.put("/v1/consent", headers=headers, json=terms)).status_code == 200
        invite = await admin.post("/v1/invites", headers=headers, json={"note": INVITE_NOTE})
        assert invite.status_code == 200, invite.text
        return str(invite.json()["code"])


async def play(stack: AsyncExitStack, url: str, code: str) -> tuple[dict[str, Recorder], list[str]]:
    """The session of the module docstring; each person's recorder, and the
    secrets that are in no column (password, tokens, invite code)."""
    alice, alice_rec, alice_dev = await begin(
        stack,
        url,
        "register",
        invite_code=code,
        username=ALICE,
        password=ALICE_PASSWORD,
        device_name=ALICE_DEVICE,
    )
    session = json.loads(next(m for m in alice_rec.received if '"session"' in m))
    secrets = [ALICE_PASSWORD, code, session["access_token"], session["refresh_token"]]
    bob, bob_rec, bob_dev = await begin(
        stack,
        url,
        "login",
        username="bob-person",
        password=PEOPLE["bob-person"],
        device_name="bob-laptop",
    )
    carol, carol_rec, _ = await begin(
        stack,
        url,
        "login",
        username="carol-person",
        password=PEOPLE["carol-person"],
        device_name="carol-laptop",
    )
    assert (await alice.request("push_register", url=PUSH_URL))["type"] == "ok"
    enrolment = await alice.request("mfa_enroll", password=ALICE_PASSWORD)
    assert enrolment["type"] == "mfa_enrollment"
    confirmed = await alice.request("mfa_confirm", code=pyotp.TOTP(enrolment["secret"]).now())
    assert confirmed["type"] == "recovery_codes", confirmed
    assert (await alice.request("list_sessions"))["type"] == "sessions"
    # A direct message each way.
    for sender, to in ((alice, bob_dev), (bob, alice_dev)):
        assert (await sender.request("directory"))["type"] == "members"
        claim = [{"user_id": to.user_id, "device_id": to.device_id}]
        assert (await sender.request("keys_claim", devices=claim))["type"] == "keys_claimed"
        envelope = {**claim[0], "ciphertext": f"zz-marker-ciphertext-{uuid.uuid4()}"}
        sent = await sender.request("send", message_id=str(uuid.uuid4()), envelopes=[envelope])
        assert sent["type"] == "sent", sent
    await alice.ws.send_message(
        json.dumps({"type": "typing", "to_user_id": bob_dev.user_id, "active": True})
    )
    # A private group with bob.
    room = await alice.request("room_create", name=GROUP, kind="group", topic=TOPIC)
    room_id = room["room"]["room_id"]
    invited = await alice.request("room_invite", room_id=room_id, user_id=bob_dev.user_id)
    assert invited["type"] == "ok", invited
    assert (await bob.request("room_join", room_id=room_id))["type"] == "room"
    members = await alice.request("room_members", room_id=room_id)
    sent = await alice.request(
        "room_send",
        room_id=room_id,
        message_id=str(uuid.uuid4()),
        epoch=members["epoch"],
        ciphertext="zz-marker-room-ciphertext",
    )
    assert sent["type"] == "sent", sent
    # Bob waits for the room message (after alice's direct one), and acknowledges.
    assert (await bob.request("who_is_online", user_ids=[alice_dev.user_id]))["type"] == "presence"

    def delivered() -> list[dict[str, Any]]:
        frames = [json.loads(m) for m in bob_rec.received]
        return [e for f in frames if f["type"] == "deliver" for e in f["envelopes"]]

    while not any(e["kind"] == "room_message" for e in delivered()):
        await bob_rec.get_message()  # bounded by WAIT
    last = max(e["envelope_id"] for e in delivered())
    assert (await bob.request("ack", up_to=last))["type"] == "ok"
    # Carol looks at what the team sees.
    for request in ("directory", "who_is_online", "list_rooms"):
        assert (await carol.request(request))["type"] != "error"
    # Alice withdraws consent and gives it again.
    assert (await alice.request("consent_revoke", kind="terms"))["type"] == "ok"
    assert (await alice.request("consent_accept", kind="terms", version=TERMS))["type"] == "ok"
    for c in (alice, bob, carol):
        await c.ws.send_message('{"type":"bye"}')
    return {"alice": alice_rec, "bob": bob_rec, "carol": carol_rec}, secrets


async def test_no_log_line_or_other_users_response_carries_a_personal_field(
    data_dir: DataDir, short_tmp: Path
) -> None:
    data_dir.configure(
        auth={"require_mfa": "none"},
        log={"format": "json", "level": "debug"},
        push={"allowed_networks": ["127.0.0.1/32"]},
    )
    async with daemon(data_dir, short_tmp) as d:
        await d.wait_notify("READY")
        code = await admin_setup(data_dir)
        async with AsyncExitStack() as stack:
            recorders, secrets = await play(stack, d.relay_url(), code)
        values = await trio.to_thread.run_sync(read_values, data_dir)
        d.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await d.proc.wait() == 0
    log = (short_tmp / "stderr.log").read_text().splitlines()
    assert all(json.loads(line) for line in log)  # every line is a JSON event
    # The session really carried the markers, where they belong.
    assert ALICE in "".join(recorders["carol"].received)  # the directory shows usernames
    assert GROUP in "".join(recorders["bob"].received)  # bob is in the group
    personal = {where for _, _, where in values.personal}
    assert {"push_endpoints.url", "invites.note", "rooms.name", "users.totp_secret"} <= personal
    carol_may_not = values.forbidden(frozenset({"team"}))
    assert {GROUP, TOPIC, PUSH_URL, INVITE_NOTE} <= set(carol_may_not)
    # The check finds what is there: bob's frames, judged as carol's, show the group.
    assert any(GROUP in leak for leak in leaks(recorders["bob"].received, carol_may_not))
    assert any('"msg":"auth.login"' in line for line in log)
    secret = {s: "not a column (a secret)" for s in secrets}
    found = {
        "log": leaks(log, values.forbidden(frozenset({"log"})) | secret),
        "carol": leaks(recorders["carol"].received, values.forbidden(frozenset({"team"})) | secret),
        "bob": leaks(
            recorders["bob"].received,
            values.forbidden(frozenset({"team", "room", "peer"})) | secret,
        ),
        "alice": leaks(recorders["alice"].received, values.forbidden(AUDIENCES - {"log"})),
    }
    assert found == {"log": [], "carol": [], "bob": [], "alice": []}


def test_every_personal_column_says_who_may_see_it() -> None:
    for table, entry in inventory().items():
        for column, info in entry["columns"].items():
            if info["personal_data"]:
                assert set(info["visible_to"]) <= AUDIENCES, f"{table}.{column}"
            else:
                assert "visible_to" not in info and "team_if" not in info, f"{table}.{column}"
