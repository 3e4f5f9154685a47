"""Consent in the client library and in ``chat`` (through a pseudo-terminal):
asked at login, refused with a clear message, accepted; a new version while
chatting; ``/consent`` to show, revoke and accept."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from chatd.client import ConsentDocument, ConsentRequired, LoginError, ServerRefusedError

from .test_chat import chat, user_args
from .test_client import ALICE_KEY, device, relay
from .test_client_account import code_of, raises_leaf
from .test_consent import consent_of
from .test_relay_auth import PASSWORD

WAIT = 15.0
URL = "https://example.org/terms/2026-12"


async def test_the_library_asks_at_login_and_exposes_accept_and_revoke(short_tmp: Path) -> None:
    async with relay(short_tmp) as srv:
        await consent_of(srv).set_document("terms", "2026-12", url=URL, title="Terms")
        # Without a callback (or declining), opening fails clearly.
        with raises_leaf(LoginError) as refused:
            async with device(srv, short_tmp, "alice", "laptop", ALICE_KEY):
                pass  # pragma: no cover - refused
        assert code_of(refused) == "consent_required"
        asked: list[list[ConsentDocument]] = []

        async def accept(documents: list[ConsentDocument]) -> bool:
            asked.append(documents)
            return True

        async with device(
            srv, short_tmp, "alice", "laptop", ALICE_KEY, accept_consent=accept
        ) as alice:
            assert asked == [[ConsentDocument("terms", "2026-12", URL, "Terms")]]
            assert alice.consent_required == []
            await alice.directory()  # the session works
            status = await alice.consent_status()
            assert (status.required, [d.version for d in status.documents]) == ([], ["2026-12"])
            await alice.revoke_consent("terms")
            with pytest.raises(ServerRefusedError) as gated:
                await alice.directory()
            assert gated.value.code == "consent_required"
            with trio.fail_after(WAIT):
                item = await alice.activity().receive()
            assert item == ConsentRequired((ConsentDocument("terms", "2026-12", URL, "Terms"),))
            assert [d.kind for d in alice.consent_required] == ["terms"]
            with pytest.raises(ServerRefusedError) as stale:
                await alice.accept_consent("terms", "2026-11")
            assert stale.value.code == "consent_version_mismatch"
            await alice.accept_consent("terms", "2026-12")
            assert alice.consent_required == []
            await alice.directory()


async def test_chat_asks_before_continuing_and_exits_clearly_on_no(short_tmp: Path) -> None:
    async with relay(short_tmp) as srv:
        await consent_of(srv).set_document("terms", "2026-12", url=URL, title="Terms")
        args = user_args(srv.url, short_tmp, "alice", key=ALICE_KEY)
        async with chat(short_tmp, *args) as alice:
            await alice.expect("Password for alice: ")
            await alice.type(PASSWORD)
            await alice.expect("Before you continue, the server asks you to accept:")
            shown = await alice.expect("Accept? [y/N]")
            assert f'terms of service, version 2026-12 "Terms": read it at {URL}' in shown
            await alice.type("n")
            await alice.expect("chat: login refused: you did not accept the server's terms")
            assert await alice.exit_code() == 3
        assert await consent_of(srv).records(1) == []
        async with chat(short_tmp, *args) as alice:
            await alice.expect("Password for alice: ")
            await alice.type(PASSWORD)
            await alice.expect("Accept? [y/N]")
            await alice.type("y")
            await alice.expect("Logged in as alice on device ")
            # A new version while chatting: announced, and /consent accepts it.
            await consent_of(srv).set_document("privacy", "3", url=None, title=None)
            await alice.expect("! the server asks you to accept a new version")
            await alice.expect("privacy notice, version 3")
            await alice.type("/who")
            await alice.expect("consent_required")
            await alice.type("/consent")
            await alice.expect("privacy notice, version 3 (to accept)")
            await alice.type("/consent accept")
            await alice.expect("-- accepted: privacy notice, version 3 --")
            await alice.type("/consent revoke terms")
            await alice.expect("-- you withdrew your acceptance of the terms of service")
            await alice.type("/consent revoke cookies")
            await alice.expect("! usage: /consent, /consent accept, or /consent revoke")
            await alice.type("/consent accept")
            await alice.expect("-- accepted: terms of service, version 2026-12")
            await alice.type("/quit")
            assert await alice.exit_code() == 0
        actions = [(r.kind, r.action) for r in await consent_of(srv).records(1)]
        assert actions == [
            ("terms", "accepted"),
            ("privacy", "accepted"),
            ("terms", "revoked"),
            ("terms", "accepted"),
        ]
