"""``chat`` for one's own account, through a pseudo-terminal: registering with
an invite, TOTP enrolment when the server requires it, changing the
password, sessions, logout and removing a lost device; and the errors that
used to mislead (an untrusted certificate, an admin's password reset, plain
ws:// to another host)."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pyotp
import pytest
import trio

from chatd.client import open_client

from .conftest import REPO
from .test_chat import chat, log_in, user_args
from .test_client import ALICE_KEY, BOB_KEY, RELAXED, device, next_message, relay
from .test_client_account import ADMIN_PASSWORD, CAROL_PASSWORD, NEW_PASSWORD, make_certificate
from .test_relay_auth import PASSWORD, create_once, server


async def test_a_new_user_registers_with_an_invite_and_chooses_the_password(
    short_tmp: Path,
) -> None:
    async with relay(short_tmp) as srv:
        code, _ = await srv.admin.create_invite("user", None, "carol")
        args = user_args(srv.url, short_tmp, "carol", key=bytes([3]) * 32)
        async with chat(short_tmp, *args, "--invite", code) as carol:
            await carol.expect("Choose a password for carol (12 to 128 characters): ")
            await carol.type(CAROL_PASSWORD)
            await carol.expect("Repeat the password: ")
            await carol.type(CAROL_PASSWORD)
            await carol.expect("Logged in as carol on device ")
            await carol.type("/quit")
            assert await carol.exit_code() == 0
        assert CAROL_PASSWORD not in carol.output
        # From now on carol logs in with the password she chose.
        async with chat(short_tmp, *args) as carol:
            await log_in(carol, "carol", CAROL_PASSWORD)
            await carol.type("/quit")
            assert await carol.exit_code() == 0

        # The invite worked once; with --invite alone the code is asked for.
        args = user_args(srv.url, short_tmp, "dave", key=bytes([4]) * 32)
        async with chat(short_tmp, *args, "--invite") as dave:
            await dave.expect("Invite code: ")
            await dave.type(code)
            await dave.expect("Choose a password for dave")
            await dave.type("dave's own long password")
            await dave.expect("Repeat the password: ")
            await dave.type("dave's own long password")
            await dave.expect(
                "chat: registration refused: the invite code is unknown, used, revoked or expired"
            )
            assert await dave.exit_code() == 3
        code, _ = await srv.admin.create_invite("user", None, "dave")
        async with chat(short_tmp, *args, "--invite", code) as dave:
            await dave.expect("Choose a password for dave")
            await dave.type("dave")
            await dave.expect("Repeat the password: ")
            await dave.type("dave")
            await dave.expect("chat: registration refused: ")
            await dave.expect("12")  # the server's rule, as it says it
            assert await dave.exit_code() == 3


async def test_an_admin_sets_up_totp_on_first_login(short_tmp: Path) -> None:
    async with server(short_tmp, require_mfa="admins", **RELAXED) as srv:
        await srv.admin.create_user("root", ADMIN_PASSWORD, "admin")
        args = user_args(srv.url, short_tmp, "root", key=bytes([5]) * 32)
        # Giving up is a refused login (exit 3), not "did not answer" (exit 5).
        async with chat(short_tmp, *args) as root:
            await root.expect("Password for root: ")
            await root.type(ADMIN_PASSWORD)
            await root.expect("This account needs a second factor (TOTP) before it can chat.")
            await root.expect("Type the 6-digit code the app shows now")
            await root.type("")
            await root.expect(
                "chat: login refused: this account must set up a second factor (TOTP)"
            )
            assert await root.exit_code() == 3

        async with chat(short_tmp, *args) as root:
            await root.expect("Password for root: ")
            await root.type(ADMIN_PASSWORD)
            await root.expect("Scan this QR code with your authenticator app:")
            qr = await root.expect("Or type this secret into the app")
            assert "█" in qr or "▀" in qr
            secret = (await root.expect_line(" (TOTP, 6 digits, 30 s): ")).replace(" ", "")
            assert re.fullmatch(r"[A-Z2-7]{32}", secret)
            await root.expect("Type the 6-digit code the app shows now")
            await root.type("000000")
            await root.expect("! that code is not right")
            await root.type(pyotp.TOTP(secret).now())
            await root.expect("✓ TOTP is on")
            codes = await root.expect("Logged in as root")
            assert len(re.findall(r"^    [a-z2-7]{4}(-[a-z2-7]{4}){5}$", codes, re.M)) == 10
            await root.type("/quit")
            assert await root.exit_code() == 0

        # The next run continues the session; another device asks for a code.
        async with chat(short_tmp, *args) as root:
            await root.expect("Password for root: ")
            await root.type(ADMIN_PASSWORD)
            await root.expect("Logged in as root")
            await root.type("/quit")
            assert await root.exit_code() == 0
        args[args.index("--store") + 1] = str(short_tmp / "root-phone.db")
        async with chat(short_tmp, *args) as root:
            await root.expect("Password for root: ")
            await root.type(ADMIN_PASSWORD)
            await root.expect("TOTP code: ")
            await root.type(pyotp.TOTP(secret).at(time.time() + 30))  # a step not used yet
            await root.expect("Logged in as root")
            await root.type("/quit")
            assert await root.exit_code() == 0


async def test_a_user_changes_the_password_ends_sessions_and_removes_a_lost_device(
    short_tmp: Path,
) -> None:
    async with relay(short_tmp) as srv:
        async with device(srv, short_tmp, "alice", "phone", bytes([7]) * 32) as phone:
            lost = phone.device_id  # the phone is lost, still logged in
        args = user_args(srv.url, short_tmp, "alice", key=ALICE_KEY)
        async with chat(short_tmp, *args) as alice:
            laptop = await log_in(alice, "alice", PASSWORD)
            await alice.type("/sessions")
            shown = await alice.expect("Your devices (2;")
            assert '"phone"' in shown and '"alice-laptop"' in shown and "(this one)" in shown
            await alice.expect(f'{lost}  "phone"')
            await alice.type("/logout others")
            await alice.expect("✓ ended 1 session(s): ")
            await alice.type("/logout 99999")
            await alice.expect("! you have no session 99999 (see /sessions)")
            await alice.type(f"/remove-device {laptop}")
            await alice.expect("! that is this device: use /logout")
            await alice.type(f"/remove-device {lost.lower()}")
            await alice.expect(f'✓ removed your device {lost} ("phone")')
            await alice.type("/sessions")
            await alice.expect("Your devices (1;")

            await alice.type("/password")
            await alice.expect("Your current password (not shown):")
            await alice.type("not my password")
            await alice.expect("New password (12 to 128 characters, not shown):")
            await alice.type(NEW_PASSWORD)
            await alice.expect("The new password again:")
            await alice.type(NEW_PASSWORD)
            await alice.expect("! /password failed: the current password is wrong")
            await alice.type("/password")
            await alice.expect("Your current password (not shown):")
            await alice.type(PASSWORD)
            await alice.expect("New password")
            await alice.type(NEW_PASSWORD)
            await alice.expect("The new password again:")
            await alice.type(NEW_PASSWORD)
            await alice.expect("✓ password changed.")
            # The session goes on with its new tokens.
            await alice.type("/open alice")
            await alice.type("still here")
            await alice.expect('✓ sent "still here"')

            await alice.type("/logout")
            await alice.expect("Logged out: this session is ended.")
            await alice.expect("Bye.")
            assert await alice.exit_code() == 0
        assert PASSWORD not in alice.output and NEW_PASSWORD not in alice.output
        audit = await srv.audit()
        assert ("logout", "ok") in audit and ("remove_device", "ok") in audit
        assert not [s for s in await srv.admin.list_sessions(None) if not s.revoked]

        # Same device, new password.
        async with chat(short_tmp, *args) as alice:
            assert await log_in(alice, "alice", NEW_PASSWORD) == laptop
            await alice.type("/quit")
            assert await alice.exit_code() == 0
        # /quit keeps the session.
        assert [s for s in await srv.admin.list_sessions(None) if not s.revoked]


async def test_a_password_reset_by_an_admin_is_said_so_and_not_retried(short_tmp: Path) -> None:
    async with relay(short_tmp) as srv:
        args = user_args(srv.url, short_tmp, "alice", key=ALICE_KEY)
        async with chat(short_tmp, *args) as alice:
            await log_in(alice, "alice", PASSWORD)
            users = await srv.admin.list_users(limit=10, after_id=None)
            await srv.admin.reset_password(
                next(u.id for u in users if u.username == "alice"), NEW_PASSWORD
            )
            await alice.expect(
                "chat: the server ended the session: your password was reset by an admin;"
                " log in again"
            )
            assert await alice.exit_code() == 3
        assert ("login", "bad_password") not in await srv.audit()
        # Typing the old password again is answered the same way; the new one works.
        async with chat(short_tmp, *args) as alice:
            await alice.expect("Password for alice: ")
            await alice.type(PASSWORD)
            await alice.expect(
                "chat: login refused: your password was reset by an admin; log in again"
            )
            assert await alice.exit_code() == 3
        async with chat(short_tmp, *args) as alice:
            await log_in(alice, "alice", NEW_PASSWORD)
            await alice.type("/quit")
            assert await alice.exit_code() == 0


async def test_an_untrusted_certificate_is_named_and_ca_trusts_it(short_tmp: Path) -> None:
    cert, key = make_certificate(short_tmp)
    tls = {"tls_certificate": str(cert), "tls_private_key": str(key)}
    async with server(short_tmp, relay=tls, **RELAXED) as srv:
        url = f"wss://127.0.0.1:{srv.relay.port}/v1/ws"
        args = user_args(url, short_tmp, "alice", key=ALICE_KEY)
        async with chat(short_tmp, *args) as alice:
            await alice.expect("Password for alice: ")
            await alice.type(PASSWORD)
            with trio.fail_after(5):  # at once, not after a minute
                await alice.expect(
                    f"chat: cannot connect securely to {url}: the server's TLS certificate"
                    " is not trusted: self-signed certificate"
                )
            await alice.expect("pass it with --ca FILE")
            assert await alice.exit_code() == 5
        async with chat(short_tmp, *args, "--ca", str(cert)) as alice:
            await log_in(alice, "alice", PASSWORD)
            await alice.type("/quit")
            assert await alice.exit_code() == 0


async def test_plain_ws_to_another_host_is_refused_without_insecure(short_tmp: Path) -> None:
    url = "ws://chat.example.org/v1/ws"
    result = await trio.run_process(
        [sys.executable, "-m", "chatd.chat", "--user", "alice", "--server", url],
        stdin=b"",
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=REPO,
        env={"HOME": str(short_tmp), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert "refusing unencrypted ws:// to chat.example.org" in result.stderr.decode()
    assert "--insecure" in result.stderr.decode()


async def test_a_message_to_someone_without_a_device_waits_and_is_offered_again(
    short_tmp: Path,
) -> None:
    async with relay(short_tmp) as srv:
        await create_once(srv.admin, "carol", CAROL_PASSWORD)
        args = user_args(srv.url, short_tmp, "alice", key=ALICE_KEY)
        async with chat(short_tmp, *args) as alice:
            await log_in(alice, "alice", PASSWORD)
            await alice.type("/open carol")
            await alice.expect("-- no messages yet")
            await alice.type("hi carol")
            await alice.expect('! not sent yet "hi carol": carol has no device yet')
            await alice.expect("It is kept in /history")
            await alice.type("/history")
            assert (await alice.expect_line("] alice: hi carol")).endswith("… not sent yet")
            await alice.type("/resend")
            await alice.expect('! not sent "hi carol": ')  # still no device

            async with open_client(
                srv.url,
                "carol",
                CAROL_PASSWORD,
                device_name="carol",
                store_path=short_tmp / "carol.db",
                store_key=bytes([3]) * 32,
            ) as carol:
                await alice.expect(
                    "-- carol has a device now: /open carol, then /resend sends your"
                    " 1 message(s) not sent yet --"
                )
                await alice.type("/resend")
                await alice.expect('✓ sent "hi carol"')
                message = await next_message(carol)
                assert message.text == "hi carol"
                await alice.type("/history")
                assert (await alice.expect_line("] alice: hi carol")).endswith("✓")  # or ✓✓
            await alice.type("/quit")
            assert await alice.exit_code() == 0


async def test_presence_typing_unread_counts_and_the_last_conversation(short_tmp: Path) -> None:
    async with relay(short_tmp) as srv:
        args = user_args(srv.url, short_tmp, "alice", key=ALICE_KEY)
        async with chat(short_tmp, *args) as alice:
            await log_in(alice, "alice", PASSWORD)
            async with device(srv, short_tmp, "bob", "bob", BOB_KEY) as bob:
                alice_id = next(m.user_id for m in await bob.directory() if m.username == "alice")
                await alice.type("/open alice")
                await alice.expect("-- conversation with alice --")
                for n in range(2):
                    await bob.send_text(alice_id, f"note {n}")
                await alice.expect("bob: note 1")
                await alice.type("/who")
                await alice.expect("bob (online, 2 unread)")

                await alice.type("/open bob")
                await alice.expect("-- bob is online --")
                await alice.type("/who")
                assert "unread" not in await alice.expect("bob (online)")
                await bob.send_typing(alice_id, True)
                await alice.expect("-- bob is typing… --")
            await alice.expect("-- bob went offline --")
            await alice.type("/quit")
            assert await alice.exit_code() == 0
        # The next start opens the conversation that was open.
        async with chat(short_tmp, *args) as alice:
            await log_in(alice, "alice", PASSWORD)
            await alice.expect("-- conversation with bob --")
            await alice.expect("-- bob is offline --")
            await alice.type("hello again")
            await alice.expect('✓ sent "hello again"')
            await alice.type("/quit")
            assert await alice.exit_code() == 0


async def test_the_store_passphrase_can_be_kept_in_the_system_keyring(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "tests.fake_keyring.FileKeyring")
    monkeypatch.setenv("CHATD_TEST_KEYRING", str(short_tmp / "keyring.json"))
    passphrase = "a store passphrase for the keyring"
    async with relay(short_tmp) as srv:
        args = user_args(srv.url, short_tmp, "alice")
        async with chat(short_tmp, *args, "--keyring") as alice:
            await alice.expect("Password for alice: ")
            await alice.type(PASSWORD)
            await alice.expect("New store passphrase")
            await alice.type(passphrase)
            await alice.expect("Repeat the store passphrase: ")
            await alice.type(passphrase)
            await alice.expect("The store passphrase is now kept in the system keyring")
            await alice.type("/quit")
            assert await alice.exit_code() == 0
        assert passphrase in (short_tmp / "keyring.json").read_text()

        async with chat(short_tmp, *args, "--keyring") as alice:
            await alice.expect("Password for alice: ")
            await alice.type(PASSWORD)
            await alice.expect("The store passphrase comes from the system keyring.")
            await alice.expect("Logged in as alice")
            await alice.type("/quit")
            assert await alice.exit_code() == 0
        assert "Store passphrase: " not in alice.output

        # Without --keyring nothing changes: it is typed.
        async with chat(short_tmp, *args) as alice:
            await alice.expect("Password for alice: ")
            await alice.type(PASSWORD)
            await alice.expect("Store passphrase: ")
            await alice.type(passphrase)
            await alice.expect("Logged in as alice")
            await alice.type("/quit")
            assert await alice.exit_code() == 0

        # A keyring that cannot be used is said so (exit 2).
        monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyring.backends.fail.Keyring")
        async with chat(short_tmp, *args, "--keyring") as alice:
            await alice.expect("Password for alice: ")
            await alice.type(PASSWORD)
            await alice.expect("chat: --keyring: the system keyring cannot be used")
            assert await alice.exit_code() == 2


async def test_a_user_turns_totp_on_gets_new_codes_and_turns_it_off(short_tmp: Path) -> None:
    async with relay(short_tmp) as srv:
        args = user_args(srv.url, short_tmp, "alice", key=ALICE_KEY)
        async with chat(short_tmp, *args) as alice:
            await log_in(alice, "alice", PASSWORD)
            await alice.type("/totp maybe")
            await alice.expect("! usage: /totp on/off/codes")
            await alice.type("/totp codes")
            await alice.expect("Your current password (not shown):")
            await alice.type(PASSWORD)
            await alice.expect("TOTP code from your app (or a recovery code):")
            await alice.type("123456")
            await alice.expect("! /totp failed: TOTP is not on for this account")

            await alice.type("/totp on")
            await alice.expect("Your current password (not shown):")
            await alice.type(PASSWORD)
            await alice.expect("Scan this QR code with your authenticator app:")
            secret = (await alice.expect_line(" (TOTP, 6 digits, 30 s): ")).replace(" ", "")
            await alice.expect("Type the 6-digit code the app shows now")
            await alice.type(pyotp.TOTP(secret).now())
            await alice.expect("✓ TOTP is on")
            await alice.expect("not shown again")
            await alice.type("/totp codes")
            await alice.expect("Your current password (not shown):")
            await alice.type(PASSWORD)
            await alice.expect("TOTP code from your app (or a recovery code):")
            await alice.type(pyotp.TOTP(secret).at(time.time() + 30))
            await alice.expect("✓ new recovery codes; the old ones no longer work.")
            await alice.expect("not shown again.")
            codes = [(await alice.expect_line("    ")).strip() for _ in range(10)]
            assert all(re.fullmatch(r"[a-z2-7]{4}(-[a-z2-7]{4}){5}", c) for c in codes)
            await alice.type("/totp off")
            await alice.expect("Your current password (not shown):")
            await alice.type(PASSWORD)
            await alice.expect("TOTP code from your app (or a recovery code):")
            await alice.type("aaaa-aaaa-aaaa-aaaa-aaaa-aaaa")
            await alice.expect("! /totp failed: the code is wrong or was already used")
            await alice.type("/totp off")
            await alice.expect("Your current password (not shown):")
            await alice.type(PASSWORD)
            await alice.expect("TOTP code from your app (or a recovery code):")
            await alice.type(codes[0])  # a recovery code works too
            await alice.expect("✓ TOTP is off")
            await alice.type("/quit")
            assert await alice.exit_code() == 0
        assert PASSWORD not in alice.output
