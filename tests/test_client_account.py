"""The client library's self-service: registering with an invite, TOTP
enrolment when the server requires it, password, sessions, logout and
devices; and the transport checks (TLS certificates, plain ws://)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyotp
import pytest
import trio

from chatd.client import (
    Account,
    CertificateError,
    Client,
    ClientError,
    LoginError,
    ServerRefusedError,
    check_transport,
    open_client,
)
from chatd.errors import exception_leaves

from .test_client import ALICE_KEY, BOB_KEY, RELAXED, device, relay
from .test_relay_auth import PASSWORD, server

ADMIN_PASSWORD = "the admin's long password"
NEW_PASSWORD = "a brand new long password"
CAROL_PASSWORD = "carol chose this herself"


@contextmanager
def raises_leaf(kind: type[BaseException]) -> Iterator[list[BaseException]]:
    """Like pytest.raises, for an error that leaves a nursery inside a group."""
    found: list[BaseException] = []
    try:
        yield found
    except BaseException as exc:  # noqa: BLE001 - re-raised unless it is the one
        leaf = next((e for e in exception_leaves(exc) if isinstance(e, kind)), None)
        if leaf is None:
            raise
        found.append(leaf)
    else:
        pytest.fail(f"{kind.__name__} was not raised")


def code_of(found: list[BaseException]) -> str:
    assert isinstance(found[0], ServerRefusedError)
    return found[0].code


async def reconnect(client: Client) -> None:
    """Drop the connection and wait until the client is back (resumed)."""
    before = client.connection.connects
    await client.connection.drop()
    with trio.fail_after(10):
        while client.connection.connects == before:
            await trio.sleep(0.01)


def next_code(secret: str, steps: int = 1) -> str:
    """A TOTP code of a later step than any used so far (each step works once)."""
    return pyotp.TOTP(secret).at(time.time() + 30 * steps)


async def test_an_invite_registers_a_new_account_and_its_first_device(short_tmp: Path) -> None:
    async with relay(short_tmp) as srv:
        code, _ = await srv.admin.create_invite("user", None, "for carol")
        options = {"device_name": "carol", "store_path": short_tmp / "carol.db"}
        async with Client.register(
            srv.url, code, "Carol", CAROL_PASSWORD, store_key=bytes([3]) * 32, **options
        ) as carol:
            assert carol.device_id
            members = {m.username: m for m in await carol.directory()}
            assert [d.device_id for d in members["Carol"].devices] == [carol.device_id]
        # The store remembers the device: the invite is not needed (nor used) again.
        async with open_client(
            srv.url,
            "carol",
            CAROL_PASSWORD,
            store_key=bytes([3]) * 32,
            invite_code=code,
            **options,
        ) as again:
            assert again.device_id == carol.device_id
        # A used invite is refused, with the protocol's code.
        with raises_leaf(LoginError) as refused:
            async with Client.register(
                srv.url,
                code,
                "dave",
                "dave's own long password",
                device_name="d",
                store_path=short_tmp / "dave.db",
                store_key=bytes([4]) * 32,
            ):
                pass  # pragma: no cover - refused
        assert code_of(refused) == "invalid_invite"


async def test_an_admin_is_walked_through_totp_enrolment(short_tmp: Path) -> None:
    async with server(short_tmp, require_mfa="admins", **RELAXED) as srv:
        await srv.admin.create_user("root", ADMIN_PASSWORD, "admin")
        options = {
            "device_name": "root",
            "store_path": short_tmp / "root.db",
            "store_key": bytes([5]) * 32,
        }
        # Without a way to enrol, the login is refused with its own code (and
        # the restricted session is logged out, not left behind).
        with raises_leaf(LoginError) as refused:
            async with open_client(srv.url, "root", ADMIN_PASSWORD, **options):
                pass  # pragma: no cover - refused
        assert code_of(refused) == "mfa_enrollment_required"
        assert all(
            s.revoked for s in await srv.admin.list_sessions(None) if s.device_name == "root"
        )

        secrets: list[str] = []
        codes: list[str] = []

        async def enrol(account: Account) -> None:
            assert account.enrollment_required
            pending = await account.enroll_totp(ADMIN_PASSWORD)
            assert "secret" not in repr(pending) and pending.secret not in repr(pending)
            assert pending.provisioning_uri.startswith("otpauth://totp/")
            with pytest.raises(ServerRefusedError) as wrong:
                await account.confirm_totp("000000")
            assert wrong.value.code == "mfa_failed"
            codes.extend(await account.confirm_totp(pyotp.TOTP(pending.secret).now()))
            secrets.append(pending.secret)

        async with open_client(srv.url, "root", ADMIN_PASSWORD, enroll_totp=enrol, **options) as c:
            assert len(codes) == 10
            assert not c.account.enrollment_required
            # The session works fully now: keys are published, the directory answers.
            members = await c.directory()
            assert any(m.username == "root" and m.devices for m in members)
            # The rotated tokens were kept: a reconnect resumes the session.
            await reconnect(c)
            await c.directory()
        # The store kept the session: the next run continues it.
        async with open_client(srv.url, "root", ADMIN_PASSWORD, **options) as c:
            assert c.device_id and not c.account.enrollment_required
        # Another device of the account logs in with a code, as usual.
        options["store_path"] = short_tmp / "root-phone.db"
        with raises_leaf(LoginError) as need:
            async with open_client(srv.url, "root", ADMIN_PASSWORD, **options):
                pass  # pragma: no cover - refused
        assert code_of(need) == "mfa_required"
        async with open_client(
            srv.url, "root", ADMIN_PASSWORD, totp=next_code(secrets[0]), **options
        ):
            pass


async def test_a_user_changes_the_password_and_manages_totp(short_tmp: Path) -> None:
    async with relay(short_tmp) as srv, device(srv, short_tmp, "alice", "laptop", ALICE_KEY) as a:
        with pytest.raises(ServerRefusedError) as wrong:
            await a.account.change_password("not my password", NEW_PASSWORD)
        assert wrong.value.code == "reauth_failed"
        with pytest.raises(ServerRefusedError) as weak:
            await a.account.change_password(PASSWORD, "short")
        assert weak.value.code == "weak_password"
        await a.account.change_password(PASSWORD, NEW_PASSWORD)
        # The session goes on with its new tokens, also after a reconnect.
        await reconnect(a)
        await a.directory()

        pending = await a.account.enroll_totp(NEW_PASSWORD)
        first = await a.account.confirm_totp(next_code(pending.secret, 0))
        second = await a.account.new_recovery_codes(NEW_PASSWORD, next_code(pending.secret))
        assert len(second) == 10 and not set(first) & set(second)
        with pytest.raises(ServerRefusedError) as used:
            await a.account.disable_totp(NEW_PASSWORD, first[0])  # replaced by the new set
        assert used.value.code == "mfa_failed"
        await a.account.disable_totp(NEW_PASSWORD, second[0])
        with pytest.raises(ServerRefusedError) as off:
            await a.account.new_recovery_codes(NEW_PASSWORD, "123456")
        assert off.value.code == "mfa_not_enabled"
        await reconnect(a)
        await a.directory()


async def test_sessions_are_listed_and_ended_and_a_lost_device_removed(short_tmp: Path) -> None:
    async with relay(short_tmp) as srv:
        async with device(srv, short_tmp, "alice", "laptop", ALICE_KEY) as laptop:
            # The phone's session is ended from the laptop: it does not log in
            # again with the password it holds, it says the session was ended.
            with raises_leaf(LoginError) as ended:
                async with device(srv, short_tmp, "alice", "phone", bytes([7]) * 32):
                    sessions = await laptop.account.sessions()
                    assert [s.device_name for s in sessions if s.current] == ["laptop"]
                    assert {s.device_name for s in sessions} == {"laptop", "phone"}
                    mine = next(s for s in sessions if s.current)
                    with pytest.raises(ServerRefusedError) as own:
                        await laptop.account.revoke_sessions([mine.session_id])
                    assert own.value.code == "use_logout"
                    assert len(await laptop.account.revoke_other_sessions()) == 1
                    assert [s.device_name for s in await laptop.account.sessions()] == ["laptop"]
                    with trio.fail_after(10):
                        await trio.sleep_forever()
            assert code_of(ended) == "session_revoked"
            assert ("login", "bad_password") not in await srv.audit()

    async with relay(short_tmp) as srv:
        async with (
            device(srv, short_tmp, "alice", "laptop", ALICE_KEY) as laptop,
            device(srv, short_tmp, "bob", "bob", BOB_KEY) as bob,
        ):
            async with device(srv, short_tmp, "alice", "phone", bytes([7]) * 32) as phone:
                lost = phone.device_id
            with pytest.raises(ServerRefusedError) as itself:
                await laptop.account.remove_device(laptop.device_id)
            assert itself.value.code == "use_logout"
            await laptop.account.remove_device(lost)
            alice = next(m for m in await bob.directory() if m.username == "alice")
            assert [d.device_id for d in alice.devices] == [laptop.device_id]
            # Bob's messages no longer go to the lost phone.
            await bob.send_text(alice.user_id, "only the laptop")

            await laptop.account.logout()
            assert await srv.audit() and ("logout", "ok") in await srv.audit()
            assert not laptop.connection.connected


async def test_an_admin_password_reset_is_not_answered_with_the_old_password(
    short_tmp: Path,
) -> None:
    async with relay(short_tmp) as srv:
        with raises_leaf(LoginError) as ended:
            async with device(srv, short_tmp, "alice", "laptop", ALICE_KEY):
                users = await srv.admin.list_users(limit=10, after_id=None)
                alice = next(u for u in users if u.username == "alice")
                await srv.admin.reset_password(alice.id, NEW_PASSWORD)
                with trio.fail_after(10):
                    await trio.sleep_forever()
        assert code_of(ended) == "password_reset"
        assert ("login", "bad_password") not in await srv.audit()


def test_plain_ws_is_refused_unless_on_this_machine_or_allowed() -> None:
    check_transport("ws://127.0.0.1:7878/v1/ws")
    check_transport("ws://[::1]:7878/v1/ws")
    check_transport("ws://localhost/v1/ws")
    check_transport("wss://chat.example.org/v1/ws")
    check_transport("ws://chat.example.org/v1/ws", insecure=True)
    with pytest.raises(ClientError, match="refusing unencrypted ws:// to chat.example.org"):
        check_transport("ws://chat.example.org/v1/ws")
    with pytest.raises(ClientError, match="must start with wss://"):
        check_transport("http://chat.example.org/v1/ws")


def make_certificate(tmp: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, as the relay's TLS tests make one."""
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    try:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
            + ["-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1"]
            + ["-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True,
            capture_output=True,
        )
    except (FileNotFoundError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"openssl cannot make a test certificate: {exc}")
    return cert, key


async def test_an_untrusted_certificate_is_named_at_once(short_tmp: Path) -> None:
    cert, key = make_certificate(short_tmp)
    tls = {"tls_certificate": str(cert), "tls_private_key": str(key)}
    async with server(short_tmp, relay=tls, **RELAXED) as srv:
        url = f"wss://127.0.0.1:{srv.relay.port}/v1/ws"
        with trio.fail_after(5), raises_leaf(CertificateError) as untrusted:
            async with open_client(
                url,
                "alice",
                PASSWORD,
                device_name="a",
                store_path=short_tmp / "a.db",
                store_key=ALICE_KEY,
            ):
                pass  # pragma: no cover - refused
        assert "certificate is not trusted" in str(untrusted[0])
        assert "self-signed" in str(untrusted[0])


async def test_a_restart_continues_the_session_until_logout(short_tmp: Path) -> None:
    async with relay(short_tmp) as srv:

        async def live() -> list[int]:
            sessions = await srv.admin.list_sessions(None)
            return [s.session_id for s in sessions if not s.revoked and s.device_name == "laptop"]

        async with device(srv, short_tmp, "alice", "laptop", ALICE_KEY) as a:
            first = a.device_id
        assert len(await live()) == 1
        for _ in range(2):
            async with device(srv, short_tmp, "alice", "laptop", ALICE_KEY) as a:
                assert a.device_id == first
                await a.directory()
        assert len(await live()) == 1  # no new session per run
        # Past its access token's life, the session is refreshed, and keys still flow.
        async with device(srv, short_tmp, "alice", "laptop", ALICE_KEY) as a:
            assert a.connection.on_tokens is not None
            a.connection.credentials.access_expires_at = 0  # kept as if it ran out
            await a.connection.on_tokens(a.connection.credentials)
        async with device(srv, short_tmp, "alice", "laptop", ALICE_KEY) as a:
            await a.directory()
        assert ("refresh", "ok") in await srv.audit()
        assert len(await live()) == 1
        async with device(srv, short_tmp, "alice", "laptop", ALICE_KEY) as a:
            await a.account.logout()
        assert await live() == []
        # After a logout the password logs in again (same device, new session).
        async with device(srv, short_tmp, "alice", "laptop", ALICE_KEY) as a:
            assert a.device_id == first
        assert len(await live()) == 1
