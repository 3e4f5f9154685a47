"""The ``chat`` terminal client, driven through pseudo-terminals like a person would.

The relay runs in the test's Trio loop; each ``chat`` is a real subprocess
whose stdin, stdout and stderr are the slave side of a pty. The test reads the
master side and types on it. :meth:`Terminal.expect` waits (with a timeout,
never a sleep) until some text shows up on the screen.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import re
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pyotp
import pytest
import trio

from chatd.chat.app import COMMANDS
from chatd.chat.cli import EXIT_CODES, read_key_file
from chatd.chat.display import clean, message_lines, normalize_fingerprint, verification_ended
from chatd.client import VerificationError

from .conftest import REPO
from .test_client import BOB_KEY, device, next_message, relay
from .test_keys import BOB_PASSWORD
from .test_relay_auth import PASSWORD, connect, create_once, enroll

TIMEOUT = 15.0  # seconds for one expected text to appear
STORE_PASSPHRASE = "a store passphrase for alice"


class Terminal:
    """One ``chat`` process on a pty: what it printed, and a keyboard."""

    def __init__(self, process: trio.Process, master: trio.lowlevel.FdStream) -> None:
        self.process = process
        self._master = master
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.output = ""  # everything shown so far, without carriage returns
        self._seen = 0  # how far expect() has consumed the output

    async def _read(self) -> None:
        try:
            data = await self._master.receive_some(4096)
        except trio.BrokenResourceError:  # EIO: the program exited
            data = b""
        if not data:
            raise EOFError
        self.output += self._decoder.decode(data).replace("\r", "")

    async def expect(self, text: str, timeout: float = TIMEOUT) -> str:
        """Wait until ``text`` appears after what earlier calls consumed; return
        the output up to and including it."""
        try:
            with trio.fail_after(timeout):
                while (found := self.output.find(text, self._seen)) < 0:
                    await self._read()
        except (trio.TooSlowError, EOFError) as exc:
            raise AssertionError(
                f"{text!r} did not appear ({type(exc).__name__}); the terminal showed:\n"
                + self.output[self._seen :]
            ) from None
        chunk = self.output[self._seen : found + len(text)]
        self._seen = found + len(text)
        return chunk

    async def expect_all(self, *texts: str) -> None:
        """Wait until every one of ``texts`` appears after what earlier calls
        consumed, in any order (a request's answer and the event it made
        race); consume up to the last of them."""
        seen = self._seen
        ends = []
        for text in texts:
            self._seen = seen
            await self.expect(text)
            ends.append(self._seen)
        self._seen = max(ends)

    async def expect_line(self, start: str) -> str:
        """The rest of the line that begins with ``start``."""
        await self.expect(start)
        return (await self.expect("\n"))[:-1]

    async def type(self, line: str) -> None:
        await self._master.send_all(line.encode() + b"\n")

    async def ctrl_d(self) -> None:
        await self._master.send_all(b"\x04")

    async def exit_code(self) -> int:
        """Read to the end of the output, then the exit code."""
        with trio.fail_after(TIMEOUT):
            try:
                while True:
                    await self._read()
            except EOFError:
                pass
            return await self.process.wait()


@asynccontextmanager
async def chat(tmp: Path, *args: str) -> AsyncIterator[Terminal]:
    """Run ``python -m chatd.chat *args`` on a new pseudo-terminal."""
    master, slave = os.openpty()
    env = {
        **os.environ,
        "HOME": str(tmp),
        "XDG_DATA_HOME": str(tmp / "xdg"),
        "LANG": "C.UTF-8",
        "TERM": "dumb",
    }
    try:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "chatd.chat", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            cwd=REPO,
            env=env,
        )
    finally:
        os.close(slave)
    stream = trio.lowlevel.FdStream(master)
    try:
        yield Terminal(process, stream)
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
                await process.wait()
            await stream.aclose()


def key_file(tmp: Path, name: str, key: bytes) -> Path:
    path = tmp / f"{name}.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    return path


def user_args(srv_url: str, tmp: Path, user: str, *, key: bytes | None = None) -> list[str]:
    args = ["--server", srv_url, "--user", user, "--device", f"{user}-laptop"]
    args += ["--store", str(tmp / f"{user}-chat.db")]
    if key is not None:
        args += ["--key-file", str(key_file(tmp, user, key))]
    return args


async def log_in(term: Terminal, user: str, password: str) -> str:
    """Answer the password prompt; return the device id the client shows."""
    await term.expect(f"Password for {user}: ")
    await term.type(password)
    line = await term.expect_line(f"Logged in as {user} on device ")
    match = re.match(r"(\w+)", line)
    assert match, line
    return match.group(1)


async def test_two_people_chat_live_see_delivery_and_verify_each_other(short_tmp: Path) -> None:
    async with relay(short_tmp) as srv:
        alice_args = user_args(srv.url, short_tmp, "alice", key=bytes([1]) * 32)
        bob_args = user_args(srv.url, short_tmp, "bob", key=bytes([2]) * 32)
        async with chat(short_tmp, *alice_args) as alice:
            await log_in(alice, "alice", PASSWORD)
            await alice.type("hello?")
            await alice.expect("! no conversation open: /open <username> first")

            async with chat(short_tmp, *bob_args) as bob:
                bob_device = await log_in(bob, "bob", BOB_PASSWORD)

                # /who lists bob, his new device flagged unverified, and that he is online.
                await alice.type("/who")
                await alice.expect(f'! new device for bob: {bob_device} "bob-laptop", UNVERIFIED')
                who = await alice.expect(f'{bob_device}  "bob-laptop"  UNVERIFIED')
                assert "alice (you, online)" in who and "bob (online)" in who
                assert "this device" in who

                await alice.type("/open bob")
                await alice.expect("-- conversation with bob --")
                await alice.expect("-- no messages yet")
                await alice.expect(f"! bob has 1 unverified device(s): {bob_device}.")

                # Alice types; bob's terminal shows it live; alice sees the marks.
                await alice.type("hello bob")
                await alice.expect('✓ sent "hello bob"')
                line = await bob.expect_line("alice: hello bob")
                assert line == " (unverified device)"
                await bob.expect("-- conversation with alice (what you type goes there) --")
                await alice.expect('✓✓ delivered "hello bob"')

                # Bob answers; alice's terminal shows it while she is idle at the prompt.
                await bob.type("hi alice")
                await bob.expect('✓ sent "hi alice"')
                assert re.search(
                    r"\[\d\d:\d\d\] bob: hi alice \(unverified device\)\n",
                    await alice.expect("(unverified device)\n"),
                )

                # Bob reads out his fingerprint; alice first mistypes it, then gets it right.
                await bob.type("/fingerprint")
                fingerprint = await bob.expect_line("Fingerprint: ")
                assert normalize_fingerprint(fingerprint) == fingerprint
                wrong = "0000 " * 16
                await alice.type(f"/verify bob {bob_device} {wrong}")
                await alice.expect(f"! the fingerprint does not match bob's device {bob_device}")
                await alice.expect("it is NOT verified")
                await alice.type(f"/verify bob {bob_device} 12 34")
                await alice.expect("! a fingerprint is 64 hex digits")
                await alice.type(f"/verify bob {bob_device.lower()} {fingerprint.lower()}")
                await alice.expect(f'✓ bob\'s device {bob_device} ("bob-laptop") is now verified.')
                await alice.type("/who")
                await alice.expect(f'{bob_device}  "bob-laptop"  verified')

                # Now bob's messages carry no warning.
                await bob.type("verified now?")
                assert await alice.expect_line("bob: verified now?") == ""
                await alice.type("/devices")
                await alice.expect(f'{bob_device}  "bob-laptop"  verified')

                await bob.ctrl_d()
                await bob.expect("Bye.")
                assert await bob.exit_code() == 0

            await alice.type("/quit")
            await alice.expect("Bye.")
            assert await alice.exit_code() == 0
        # The password was never echoed to the screen.
        assert PASSWORD not in alice.output and BOB_PASSWORD not in bob.output


async def test_two_people_compare_emoji_and_verify_each_others_devices(
    short_tmp: Path,
) -> None:
    async with relay(short_tmp) as srv:
        alice_args = user_args(srv.url, short_tmp, "alice", key=bytes([1]) * 32)
        bob_args = user_args(srv.url, short_tmp, "bob", key=bytes([2]) * 32)
        async with chat(short_tmp, *alice_args) as alice, chat(short_tmp, *bob_args) as bob:
            alice_device = await log_in(alice, "alice", PASSWORD)
            bob_device = await log_in(bob, "bob", BOB_PASSWORD)
            alices = f'alice\'s device {alice_device} ("alice-laptop")'
            bobs = f'bob\'s device {bob_device} ("bob-laptop")'

            # Bob sees other emoji than alice (say) and answers /no: nothing is verified.
            await alice.type(f"/sas bob {bob_device.lower()}")
            await alice.expect(f"-- asked {bobs} to verify: they type /accept there")
            await bob.expect(f"{alices} wants to verify with you: /accept to compare emoji")
            await bob.type("/yes")
            await bob.expect("! not now: /accept to compare emoji, /no to decline")
            await bob.type("/accept")
            assert await alice.expect_line("Emoji: ") == await bob.expect_line("Emoji: ")
            await bob.expect("Do they match? Type /yes if they are the same on both screens")
            await bob.type("/no")
            await bob.expect(f"! verification with {alices} cancelled: the emoji differ. It is NOT")
            await alice.expect(
                f"! {bobs} cancelled the verification: the emoji differ. It is NOT verified."
            )
            await alice.type("/who")
            await alice.expect(f'{bob_device}  "bob-laptop"  UNVERIFIED')

            # Again. While alice waits for bob, her lines still go out as messages,
            # and a request from another device of bob's is declined (busy).
            await alice.type("/open bob")
            await alice.expect("-- no messages yet")
            await alice.type(f"/sas bob {bob_device}")
            await bob.expect(f"{alices} wants to verify with you")
            await alice.type("do you see the emoji?")
            assert await bob.expect_line("alice: do you see the emoji?") == " (unverified device)"
            async with device(srv, short_tmp, "bob", "bob-phone", BOB_KEY) as phone:
                alice_id = next(m.user_id for m in await phone.directory() if m.username == "alice")
                busy = await phone.start_verification(alice_id, alice_device)
                with trio.fail_after(TIMEOUT), pytest.raises(VerificationError) as refused:
                    await busy.sas()
                assert (refused.value.code, refused.value.remote) == ("busy", True)
                await alice.expect(
                    f"asked to verify with you; declined, as you are verifying {bobs}"
                )

                await bob.type("/accept")
                emoji = await alice.expect_line("Emoji: ")
                assert emoji == await bob.expect_line("Emoji: ")
                assert len(emoji.split("   ")) == 7  # seven emoji, each with its name
                numbers = await alice.expect_line("Numbers: ")
                assert numbers == await bob.expect_line("Numbers: ")
                assert re.fullmatch(r"\d{4} \d{4} \d{4}", numbers)
                await alice.expect("Do they match?")
                await alice.type("/yes")
                await alice.expect(f"-- you said they match; waiting for {bobs} to confirm too --")
                await bob.type("/yes")
                await bob.expect(f"✓ {alices} is now verified (the emoji matched).")
                await alice.expect(f"✓ {bobs} is now verified (the emoji matched).")
                await alice.type("/who")
                await alice.expect(f'{bob_device}  "bob-laptop"  verified')

                # Messages between the verified devices no longer carry the mark.
                await bob.type("now I trust you")
                assert await alice.expect_line("bob: now I trust you") == ""
                await alice.type("same here")
                assert await bob.expect_line("alice: same here") == ""

                # Another device's reason for cancelling is cleaned before it is shown.
                request = await phone.start_verification(alice_id, alice_device)
                await alice.expect("wants to verify with you: /accept")
                await request.cancel("no \x1b[2J way")
                phones = f'bob\'s device {phone.device_id} ("bob-phone")'
                await alice.expect(
                    f"! {phones} cancelled the verification"
                    ' (they wrote: "no \\x1b[2J way"). It is NOT verified.'
                )
                assert "\x1b" not in alice.output

                # Leaving chat in the middle of a verification cancels it.
                await alice.type(f"/sas bob {phone.device_id}")
                with trio.fail_after(TIMEOUT):
                    left = await phone.verification_requests().receive()
                await alice.type("/quit")
                with trio.fail_after(TIMEOUT), pytest.raises(VerificationError) as cancelled:
                    await left.done()
                assert (cancelled.value.code, cancelled.value.reason) == ("user", "they left chat")
                assert await alice.exit_code() == 0
            await bob.type("/quit")
            assert await bob.exit_code() == 0


async def test_history_scrolls_page_by_page_and_bad_commands_are_explained(
    short_tmp: Path,
) -> None:
    async with relay(short_tmp) as srv:
        await create_once(srv.admin, "carol", "carol also has a long password")
        args = user_args(srv.url, short_tmp, "alice", key=bytes([1]) * 32)
        async with chat(short_tmp, *args) as alice:
            await log_in(alice, "alice", PASSWORD)
            async with device(srv, short_tmp, "bob", "bob", BOB_KEY) as bob:
                alice_id = next(m.user_id for m in await bob.directory() if m.username == "alice")
                for n in range(25):
                    await bob.send_text(alice_id, f"msg-{n:02d}")
                await bob.send_text(alice_id, "evil \x1b[2J\u202eeno")
                await alice.expect("msg-24 (unverified device)")
                await alice.expect("bob: evil \\x1b[2J\\u202eeno (unverified device)")
                assert "\x1b" not in alice.output  # nothing bob sent reaches the terminal raw

                await alice.type("/open bob")
                page = await alice.expect("-- bob: messages 7–26 of 26 (/more for older) --")
                page = await alice.expect("evil")
                assert [f"msg-{n:02d}" for n in range(6, 25)] == re.findall(r"msg-\d\d", page)
                assert re.search(r"\[\d{4}-\d\d-\d\d \d\d:\d\d\] bob: msg-06\n", page)
                await alice.type("/more")
                await alice.expect("-- bob: messages 1–6 of 26 --")
                page = await alice.expect("msg-05\n")
                assert re.findall(r"msg-\d\d", page) == [f"msg-{n:02d}" for n in range(6)]
                await alice.type("/more")
                await alice.expect("-- no older messages --")

                # Her reply shows its delivery mark in the history.
                await alice.type("thanks bob")
                await alice.expect('✓✓ delivered "thanks bob"')
                await alice.type("/history 2")
                await alice.expect("-- bob: messages 26–27 of 27 (/more for older) --")
                assert (await alice.expect_line("] alice: thanks bob")).endswith("✓✓")
                await alice.type("/more")
                await alice.expect("-- bob: messages 24–25 of 27 (/more for older) --")
                await alice.expect("msg-24\n")

                for typed, answer in [
                    ("/frobnicate", "! unknown command /frobnicate; type /help for the list"),
                    ("/open nobody", "! no user named 'nobody' on this server (see /who)"),
                    ("/open Ünï", "is not a valid username"),
                    ("/open", "! usage: /open <username>"),
                    ("/history lots", "! usage: /history [N], N from 1 to 1000"),
                    ("/verify bob", "! usage: /verify <username> <device> <fingerprint>"),
                    ("/verify bob NOSUCHDEVICE " + "0000 " * 16, "bob has no device NOSUCHDEVICE"),
                    ("/sas bob", "! usage: /sas <username> <device>"),
                    ("/sas bob X", "! bob has no device X (see /who)"),
                    ("/yes", "! no verification is in progress"),
                    ("/open carol", "-- no messages yet"),
                    ("hi carol", '! not sent yet "hi carol": carol has no device yet'),
                    ("/open bob", "-- conversation with bob --"),
                ]:
                    await alice.type(typed)
                    await alice.expect(answer)
                await alice.type("/help")
                shown = await alice.expect("Marks:")
                for command in COMMANDS:
                    assert command.usage in shown

                # A line starting with // sends a slash.
                await alice.type("//shrug")
                await alice.expect('✓ sent "/shrug"')
                await alice.ctrl_d()
                assert await alice.exit_code() == 0
                got = [(await next_message(bob)).text for _ in range(2)]
                assert got == ["thanks bob", "/shrug"]


async def test_a_wrong_password_is_refused_with_exit_code_3(short_tmp: Path) -> None:
    async with relay(short_tmp) as srv:
        args = user_args(srv.url, short_tmp, "alice", key=bytes([1]) * 32)
        async with chat(short_tmp, *args) as alice:
            await alice.expect("Password for alice: ")
            await alice.type("not the password")
            await alice.expect("chat: login refused: wrong username or password")
            assert await alice.exit_code() == 3


async def test_the_totp_code_is_asked_for_when_the_account_needs_one(short_tmp: Path) -> None:
    async with relay(short_tmp) as srv:
        async with connect(srv) as c:
            await c.login()
            secret, _ = await enroll(c)
        args = user_args(srv.url, short_tmp, "alice", key=bytes([1]) * 32)
        async with chat(short_tmp, *args) as alice:
            await alice.expect("Password for alice: ")
            await alice.type(PASSWORD)
            await alice.expect("This account has a second factor.")
            await alice.expect("TOTP code: ")
            await alice.type(pyotp.TOTP(secret).at(time.time() + 30))  # a step not used yet
            await alice.expect("Logged in as alice")
            await alice.type("/quit")
            assert await alice.exit_code() == 0
        # Another device of alice's (this store's session would just continue).
        args[args.index("--store") + 1] = str(short_tmp / "alice-phone.db")
        async with chat(short_tmp, *args, "--totp") as alice:
            await alice.expect("Password for alice: ")
            await alice.type(PASSWORD)
            await alice.expect("TOTP code: ")
            await alice.type("000000")
            await alice.expect("chat: login refused: the TOTP code is wrong")
            assert await alice.exit_code() == 3


async def test_a_store_passphrase_protects_the_store_and_a_wrong_one_changes_nothing(
    short_tmp: Path,
) -> None:
    store = short_tmp / "alice-chat.db"
    args = ["--user", "alice", "--store", str(store)]
    async with relay(short_tmp) as srv:
        args += ["--server", srv.url]
        async with chat(short_tmp, *args) as alice:
            await alice.expect("Password for alice: ")
            await alice.type(PASSWORD)
            await alice.expect("New store passphrase (it encrypts")
            await alice.type(STORE_PASSPHRASE)
            await alice.expect("Repeat the store passphrase: ")
            await alice.type(STORE_PASSPHRASE)
            await alice.expect("Logged in as alice")
            await alice.type("/open alice")
            await alice.type("a note to myself")
            await alice.expect('✓ sent "a note to myself"')
            await alice.type("/quit")
            assert await alice.exit_code() == 0
        assert STORE_PASSPHRASE not in alice.output
        salt = store.with_name(store.name + ".salt")
        assert len(salt.read_bytes()) == 16
        assert (salt.stat().st_mode & 0o777, store.stat().st_mode & 0o777) == (0o600, 0o600)
        before = hashlib.sha256(store.read_bytes()).digest()

        async with chat(short_tmp, *args) as alice:
            await alice.expect("Password for alice: ")
            await alice.type(PASSWORD)
            await alice.expect("Store passphrase: ")
            await alice.type("not my store passphrase")
            await alice.expect("chat: the local store did not open:")
            await alice.expect("the store was left unchanged")
            assert await alice.exit_code() == 4
        # Only the helpful message: not SQLCipher's own log lines.
        assert "hmac check failed" not in alice.output and "ERROR CORE" not in alice.output
        assert hashlib.sha256(store.read_bytes()).digest() == before

        async with chat(short_tmp, *args) as alice:
            await alice.expect("Password for alice: ")
            await alice.type(PASSWORD)
            await alice.expect("Store passphrase: ")
            await alice.type(STORE_PASSPHRASE)
            await alice.expect("Logged in as alice")
            await alice.type("/open alice")
            await alice.expect("alice: a note to myself  ✓")
            await alice.type("/quit")
            assert await alice.exit_code() == 0


async def test_an_unreachable_server_says_so_with_exit_code_5(short_tmp: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    url = f"ws://127.0.0.1:{port}/v1/ws"
    async with chat(short_tmp, *user_args(url, short_tmp, "alice", key=bytes(32))) as alice:
        await alice.expect("Password for alice: ")
        await alice.type(PASSWORD)
        await alice.expect(f"chat: cannot reach the server at {url}")
        assert await alice.exit_code() == 5


@pytest.mark.parametrize(
    ("content", "mode", "error"),
    [
        (b"abc", 0o600, "must hold 32 raw bytes or 64 hex digits"),
        (b"00" * 32, 0o644, "accessible by group or others (mode 0644); run: chmod 600"),
    ],
)
async def test_a_bad_key_file_is_refused_before_any_prompt(
    short_tmp: Path, content: bytes, mode: int, error: str
) -> None:
    path = short_tmp / "k"
    path.write_bytes(content)
    path.chmod(mode)
    result = await trio.run_process(
        [sys.executable, "-m", "chatd.chat", "--user", "alice", "--key-file", str(path)],
        stdin=b"",
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=REPO,
        env={**os.environ, "HOME": str(short_tmp)},
    )
    assert result.returncode == 2
    assert error in result.stderr.decode()


async def test_chat_needs_a_terminal(short_tmp: Path) -> None:
    path = key_file(short_tmp, "alice", bytes(32))
    result = await trio.run_process(
        [sys.executable, "-m", "chatd.chat", "--user", "alice", "--key-file", str(path)],
        stdin=b"",
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=REPO,
        env={**os.environ, "HOME": str(short_tmp)},
    )
    assert result.returncode == 2
    assert "chat is interactive: run it in a terminal" in result.stderr.decode()


def test_key_files_hold_raw_or_hex_keys(short_tmp: Path) -> None:
    raw = bytes(range(32))
    assert read_key_file(key_file(short_tmp, "hex", raw)) == raw
    path = short_tmp / "raw"
    path.write_bytes(raw)
    path.chmod(0o600)
    assert read_key_file(path) == raw


def test_text_from_others_cannot_control_the_terminal() -> None:
    assert clean("a\x1b[31mred\x07\x9b") == "a\\x1b[31mred\\x07\\x9b"
    assert clean("\u202egnp.exe\u2066") == "\\u202egnp.exe\\u2066"
    assert clean("tab\there ünï ✓") == "tab here ünï ✓"


def test_multi_line_messages_are_indented_and_undecryptable_ones_said_so() -> None:
    assert message_lines("[12:01] bob: ", "one\r\ntwo\nthree", " (x)") == [
        "[12:01] bob: one",
        "    two",
        "    three (x)",
    ]
    assert message_lines("bob: ", None) == ["bob: (this message could not be decrypted)"]


def test_fingerprints_are_read_in_any_spacing_and_case() -> None:
    fp = "ABCD " * 15 + "0123"
    assert normalize_fingerprint(fp.lower().replace(" ", "")) == fp
    assert normalize_fingerprint(fp + " 0") is None
    assert normalize_fingerprint("XYZ" * 20) is None


def test_why_a_verification_ended_is_said_plainly() -> None:
    who = "bob's device ABC"
    assert verification_ended(who, VerificationError("timeout", "too long")) == (
        f"! verification with {who} failed: it was not finished within 10 minutes."
        " It is NOT verified."
    )
    assert "someone may be in the middle" in verification_ended(
        who, VerificationError("mac_mismatch", "")
    )
    remote = VerificationError("odd\u202ecode", "why\nnot", remote=True)
    assert verification_ended(who, remote) == (
        f'! {who} cancelled the verification: code odd\\u202ecode (they wrote: "why\\x0anot").'
        " It is NOT verified."
    )


def test_every_command_and_exit_code_is_documented() -> None:
    doc = (REPO / "docs" / "CHAT.md").read_text()
    for command in COMMANDS:
        assert f"`{command.usage}`" in doc, command.usage
    for code in re.findall(r"^\s+(\d+)\s", EXIT_CODES, re.M):
        assert f"| {code} |" in doc, code


async def test_a_file_is_sent_and_saved_by_number_also_after_a_restart(short_tmp: Path) -> None:
    from .test_blobs import blob_server

    source = short_tmp / "plan.txt"
    source.write_bytes(b"the plan, in plaintext\n" * 1000)
    (short_tmp / "tool.exe").write_bytes(b"MZ")
    saved_dir = short_tmp / "saved"
    saved_dir.mkdir()
    async with blob_server(short_tmp) as srv:
        alice_args = user_args(srv.url, short_tmp, "alice", key=bytes([1]) * 32)
        bob_args = user_args(srv.url, short_tmp, "bob", key=bytes([2]) * 32)
        async with chat(short_tmp, *bob_args) as bob:
            await log_in(bob, "bob", BOB_PASSWORD)
            async with chat(short_tmp, *alice_args) as alice:
                await log_in(alice, "alice", PASSWORD)
                await alice.type("/open bob")
                await alice.expect("-- conversation with bob --")
                await alice.type(f"/send-file {short_tmp / 'missing.txt'}")
                await alice.expect("! no such file: ")
                await alice.type(f"/send-file {short_tmp / 'tool.exe'}")
                await alice.expect("! /send-file failed: media type")
                await alice.type(f"/send-file {source}")
                await alice.expect("✓ sent file plan.txt (23000 bytes)")
                await bob.expect("alice: [file] plan.txt")
                await alice.type("/quit")
                assert await alice.exit_code() == 0
            await bob.type("/quit")
            assert await bob.exit_code() == 0
        # Bob starts again: /save finds the file by its number in /history.
        async with chat(short_tmp, *bob_args) as bob:
            await log_in(bob, "bob", BOB_PASSWORD)
            await bob.type("/open alice")
            await bob.expect("-- conversation with alice --")
            await bob.type("/save 2")
            await bob.expect("! there is no message 2 here (1 to 1)")
            await bob.type(f"/save 1 {saved_dir}")
            await bob.expect(f"✓ saved {saved_dir / 'plan.txt'} (23000 bytes)")
            assert (saved_dir / "plan.txt").read_bytes() == source.read_bytes()
            await bob.type(f"/save 1 {saved_dir}")
            await bob.expect("exists already")
            await bob.type("/quit")
            assert await bob.exit_code() == 0
