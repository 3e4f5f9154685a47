"""Consent over the real relay: the gate, accepting and revoking, and new versions.

Each test runs the relay and the store in-process (tests/test_relay_auth.py's
``server``) with real sockets and a real SQLCipher file, and sets versions
through the consent service the admin API uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sqlcipher3
import trio

from chatd.consent import ConsentService

from .test_relay_auth import PASSWORD, Client, Server, connect, create_once, server

WAIT = 10.0
TERMS = {"kind": "terms", "version": "2026-12", "url": "https://example.org/terms/2026-12"}


def consent_of(srv: Server) -> ConsentService:
    return srv.relay.dispatcher.consent


async def set_terms(srv: Server, version: str = "2026-12", kind: str = "terms") -> None:
    await consent_of(srv).set_document(
        kind, version, url=f"https://example.org/{kind}/{version}", title=None
    )


async def next_frame(c: Client) -> dict[str, Any]:
    with trio.fail_after(WAIT):
        return json.loads(await c.ws.get_message())  # type: ignore[no-any-return]


async def records(srv: Server) -> list[tuple[Any, ...]]:
    rows = await srv.store.read(
        lambda conn: conn.execute(
            "SELECT user_id, kind, version, action, session_id, device_id"
            " FROM consent_records ORDER BY id"
        ).fetchall()
    )
    return [tuple(r) for r in rows]


async def test_without_a_version_nothing_is_gated(short_tmp: Path) -> None:
    async with server(short_tmp) as srv, connect(srv) as c:
        session = await c.login()
        assert "consent_required" not in session
        assert (await next_frame(c))["type"] == "key_count"
        assert (await c.request("directory"))["type"] == "members"
        status = await c.request("consent_status")
        assert status == {"type": "consent", "id": status["id"], "documents": [], "required": []}
        refused = await c.request("consent_accept", kind="terms", version="1")
        assert (refused["code"], refused["field"]) == ("consent_not_set", "$.kind")


async def test_a_new_login_must_accept_the_terms_before_anything_else(short_tmp: Path) -> None:
    async with server(short_tmp, relay={"max_bad_frames": 3}) as srv, connect(srv) as c:
        await set_terms(srv)
        session = await c.login()
        assert session["consent_required"] == [TERMS]
        # Refused, and not bad frames: more of them than max_bad_frames.
        for _ in range(5):
            refused = await c.request("directory")
            assert refused["type"] == "error" and refused["code"] == "consent_required"
            assert "terms" in refused["message"]
        # What a gated session may still do.
        assert (await c.request("list_sessions"))["type"] == "sessions"
        status = await c.request("consent_status")
        assert status["documents"] == [TERMS] and status["required"] == ["terms"]
        stale = await c.request("consent_accept", kind="terms", version="2026-11")
        assert (stale["code"], stale["field"]) == ("consent_version_mismatch", "$.version")
        assert "2026-12" in stale["message"]
        bad = await c.request("consent_accept", kind="cookies", version="1")
        assert (bad["code"], bad["field"]) == ("bad_frame", "$.kind")
        assert await records(srv) == []  # refusals record nothing
        # Accepting lifts the gate: ok, then the key count withheld until now.
        ok = await c.request("consent_accept", kind="terms", version="2026-12")
        assert ok == {"type": "ok", "id": ok["id"]}
        assert (await next_frame(c))["type"] == "key_count"
        assert (await c.request("directory"))["type"] == "members"
        [(user_id, kind, version, action, session_id, device_id)] = await records(srv)
        assert (user_id, kind, version, action) == (
            session["user"]["id"],
            "terms",
            "2026-12",
            "accepted",
        )
        assert (session_id, device_id) == (session["session_id"], session["device_id"])
        # Accepting again records nothing new.
        again = await c.request("consent_accept", kind="terms", version="2026-12")
        assert again["type"] == "ok" and len(await records(srv)) == 1


async def test_an_accepted_version_is_remembered_at_the_next_login(short_tmp: Path) -> None:
    async with server(short_tmp) as srv:
        await set_terms(srv)
        async with connect(srv) as c:
            await c.login()
            await c.request("consent_accept", kind="terms", version="2026-12")
        async with connect(srv) as c:
            session = await c.login()
            assert "consent_required" not in session
            assert (await next_frame(c))["type"] == "key_count"
            resumed_token = session["access_token"]
        async with connect(srv) as c:
            resumed = await c.request("resume", access_token=resumed_token)
            assert resumed["type"] == "session" and "consent_required" not in resumed


async def test_a_new_version_gates_live_sessions_at_once(short_tmp: Path) -> None:
    async with server(short_tmp) as srv, connect(srv) as c:
        await set_terms(srv, "1")
        await c.login()
        await c.request("consent_accept", kind="terms", version="1")
        assert (await next_frame(c))["type"] == "key_count"
        await set_terms(srv, "2")
        pushed = await next_frame(c)
        assert pushed == {
            "type": "consent_required",
            "documents": [{"kind": "terms", "version": "2", "url": "https://example.org/terms/2"}],
        }
        assert (await c.request("directory"))["code"] == "consent_required"
        # Setting the privacy notice adds to what must be accepted.
        await set_terms(srv, "p1", kind="privacy")
        pushed = await next_frame(c)
        assert [d["kind"] for d in pushed["documents"]] == ["privacy", "terms"]
        await c.request("consent_accept", kind="terms", version="2")
        assert (await c.request("directory"))["code"] == "consent_required"
        await c.request("consent_accept", kind="privacy", version="p1")
        assert (await c.request("directory"))["type"] == "members"


async def test_revoking_gates_every_connection_of_the_user_and_accepting_lifts_them(
    short_tmp: Path,
) -> None:
    async with server(short_tmp) as srv, connect(srv) as laptop, connect(srv) as phone:
        await set_terms(srv)
        session = await laptop.login()
        await laptop.request("consent_accept", kind="terms", version="2026-12")
        assert (await next_frame(laptop))["type"] == "key_count"
        await phone.request("login", username="alice", password=PASSWORD, device_name="phone")
        assert (await next_frame(phone))["type"] == "key_count"  # already accepted
        revoked = await laptop.request("consent_revoke", kind="terms")
        assert revoked["type"] == "ok"
        assert await next_frame(laptop) == {"type": "consent_required", "documents": [TERMS]}
        assert await next_frame(phone) == {"type": "consent_required", "documents": [TERMS]}
        assert (await phone.request("directory"))["code"] == "consent_required"
        # Accepting on the phone lifts the laptop's gate too.
        await phone.request("consent_accept", kind="terms", version="2026-12")
        assert await next_frame(laptop) == {"type": "consent_required", "documents": []}
        assert (await laptop.request("directory"))["type"] == "members"
        actions = [(r[3], r[4]) for r in await records(srv)]
        assert actions[:2] == [
            ("accepted", session["session_id"]),
            ("revoked", session["session_id"]),
        ]
        assert actions[2][0] == "accepted" and actions[2][1] != session["session_id"]


async def test_a_gated_session_gets_no_deliveries_until_it_accepts(short_tmp: Path) -> None:
    from .test_keys import login_device

    async with server(short_tmp) as srv:
        await create_once(srv.admin, "bob", PASSWORD)
        async with connect(srv) as c:
            bob = await login_device(c, "bob")
            await bob.publish(2)
        async with connect(srv) as c:
            alice = await login_device(c)
            await alice.publish(2)
            sent = await c.request(
                "send",
                message_id="0b0b0b0b-0000-4000-8000-000000000001",
                envelopes=[{"user_id": bob.user_id, "device_id": bob.device_id, "ciphertext": "x"}],
            )
            assert sent["type"] == "sent"
        await set_terms(srv)
        async with connect(srv) as c:
            session = await c.login("bob", PASSWORD, device_id=bob.device_id)
            assert session["consent_required"] == [TERMS]
            refused = await c.request("keys_upload")
            assert refused["code"] == "consent_required"
            ok = await c.request("consent_accept", kind="terms", version="2026-12")
            # c.skipped holds what came before the ok: nothing was delivered.
            assert [f["type"] for f in c.skipped] == []
            assert ok["type"] == "ok"
            assert (await next_frame(c))["type"] == "key_count"
            deliver = await next_frame(c)
            assert deliver["type"] == "deliver"
            assert deliver["envelopes"][0]["message_id"] == "0b0b0b0b-0000-4000-8000-000000000001"


async def test_consent_records_are_append_only(short_tmp: Path) -> None:
    async with server(short_tmp) as srv, connect(srv) as c:
        await set_terms(srv)
        await c.login()
        await c.request("consent_accept", kind="terms", version="2026-12")
        before = await records(srv)
        with pytest.raises(sqlcipher3.IntegrityError, match="append-only"):
            await srv.store.write(
                lambda conn: conn.execute("UPDATE consent_records SET action = 'revoked'")
            )
        assert await records(srv) == before
