"""The ``chat`` command: options, secrets, and exit codes.

Secrets never come from the command line or the environment: the password
(and a TOTP code, when asked for) are read with :func:`getpass.getpass` from
the terminal, and the store key comes from ``--key-file`` or from a store
passphrase typed at the terminal (Argon2id with a random salt kept in
``<store>.salt``). The prompts for logging in happen before Trio starts; when
the server says the account needs a TOTP code, ``main`` asks for it and runs
the client again. (An invite code is single-use and may be given as
``--invite CODE``; ``--invite`` alone asks for it.) When the server requires
the account to set up TOTP first, the client walks the person through it
inside Trio (:mod:`chatd.chat.enrol`), reading the typed code from the
terminal.
"""

from __future__ import annotations

import argparse
import getpass
import io
import logging
import os
import secrets
import socket
import ssl
import stat
import sys
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

import trio

from chatd.auth.usernames import UsernameError, normalize_username
from chatd.client import (
    CertificateError,
    ClientError,
    ClientStoreError,
    ConnectionLostError,
    LoginError,
    check_transport,
    key_from_passphrase,
    open_client,
)
from chatd.errors import ChatdError, exception_leaves

from .app import ChatApp
from .consent import ask_at_login
from .display import clean
from .enrol import enrol_at_login
from .keyrings import KeyringUnavailable, keep_passphrase, stored_passphrase
from .terminal import LineReader, open_terminal_lines

DEFAULT_SERVER: Final = "ws://127.0.0.1:7878/v1/ws"
SALT_BYTES: Final = 16  # random salt for the store passphrase
MAX_SALT_BYTES: Final = 1024  # a larger .salt file is not ours
KEY_BYTES: Final = 32  # the raw store key
MAX_KEY_FILE: Final = 4096  # bytes; a key file is one short line
PASSPHRASE_TRIES: Final = 3  # attempts to type a new passphrase twice the same

EXIT_OK: Final = 0  # /quit or Ctrl-D
EXIT_ERROR: Final = 1  # anything else that went wrong
EXIT_USAGE: Final = 2  # bad options, key file or input; not a terminal
EXIT_LOGIN: Final = 3  # login refused (also when the server ends the session later)
EXIT_STORE: Final = 4  # the local store does not open: wrong passphrase or key file
EXIT_UNREACHABLE: Final = 5  # the server cannot be reached
EXIT_INTERRUPTED: Final = 130  # Ctrl-C

EXIT_CODES: Final = f"""\
exit codes:
  {EXIT_OK}    you left with /quit or Ctrl-D
  {EXIT_ERROR}    an unexpected error
  {EXIT_USAGE}    bad options or key file, no terminal, or a prompt was left empty
  {EXIT_LOGIN}    the server refused the login (or ended the session later)
  {EXIT_STORE}    the local store did not open: wrong store passphrase or key file
  {EXIT_UNREACHABLE}    the server cannot be reached
  {EXIT_INTERRUPTED}  interrupted with Ctrl-C
"""

LOGIN_REFUSED: Final = {
    "login_failed": "wrong username or password",
    "mfa_required": "this account needs a TOTP code",
    "mfa_failed": "the TOTP code is wrong or was already used; wait for the next one",
    "account_disabled": "this account is disabled; ask an admin",
    "rate_limited": "too many attempts; wait a minute and try again",
    "too_many_devices": "you have the most devices allowed; remove one first",
    "unknown_device": (
        "the server no longer knows this store's device (was it removed?);"
        " start again with a new --store"
    ),
    "mfa_enrollment_required": (
        "this account must set up a second factor (TOTP) before it can chat;"
        " run chat again and follow the steps"
    ),
    "password_reset": "your password was reset by an admin; log in again",
    "session_revoked": (
        "this session was ended (logged out from another device, or this device"
        " was removed); log in again"
    ),
    "invalid_invite": "the invite code is unknown, used, revoked or expired; ask for a new one",
    "username_taken": "that username is taken; choose another with --user",
    "consent_required": (
        "you did not accept the server's terms, and it serves nobody who has not;"
        " run chat again to accept them"
    ),
}


class SetupError(ChatdError):
    """Something to fix before chat can start; ``exit_code`` says which kind."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_status = exit_code


@dataclass(frozen=True)
class Options:
    server: str
    user: str
    device: str
    store: Path
    key_file: Path | None
    totp: bool
    invite: str | None = None  # "" means: ask for it
    ca: Path | None = None
    insecure: bool = False
    keyring: bool = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chat",
        description="Chat end-to-end encrypted on a chatd server, in this terminal.",
        epilog=EXIT_CODES + "\nSee docs/CHAT.md for every command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--server",
        metavar="URL",
        default=DEFAULT_SERVER,
        help=f"relay WebSocket URL (default {DEFAULT_SERVER})",
    )
    parser.add_argument("--user", metavar="NAME", required=True, help="your username")
    parser.add_argument(
        "--device",
        metavar="NAME",
        default=None,
        help="a name for this device (default: the host name)",
    )
    parser.add_argument(
        "--store",
        metavar="PATH",
        type=Path,
        default=None,
        help="the encrypted local store (default: $XDG_DATA_HOME/chatd-chat/<user>.db)",
    )
    parser.add_argument(
        "--key-file",
        metavar="PATH",
        type=Path,
        default=None,
        help="file with the store key (32 raw bytes or 64 hex digits, mode 0600);"
        " without it you are asked for a store passphrase",
    )
    parser.add_argument("--totp", action="store_true", help="ask for a TOTP code before logging in")
    parser.add_argument(
        "--invite",
        metavar="CODE",
        nargs="?",
        const="",
        default=None,
        help="create your account with an invite code from an admin (you choose the"
        " password); --invite alone asks for the code",
    )
    parser.add_argument(
        "--ca",
        metavar="FILE",
        type=Path,
        default=None,
        help="trust the server certificates signed by the CA (or the self-signed"
        " certificate) in this PEM file",
    )
    parser.add_argument(
        "--keyring",
        action="store_true",
        help="keep the store passphrase in the system keyring: typed once, then read from there",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow unencrypted ws:// to a host other than this machine",
    )
    return parser


def parse_options(argv: list[str] | None) -> Options:
    args = build_parser().parse_args(argv)
    try:
        user = normalize_username(args.user)
    except UsernameError as exc:
        raise SetupError(str(exc)) from None
    store = args.store if args.store is not None else default_store(user)
    try:
        check_transport(args.server, insecure=args.insecure)
    except ClientError as exc:
        raise SetupError(str(exc)) from None
    return Options(
        server=args.server,
        user=user,
        device=args.device or socket.gethostname() or "chat",
        store=store,
        key_file=args.key_file,
        totp=args.totp,
        invite=args.invite,
        ca=args.ca,
        insecure=args.insecure,
        keyring=args.keyring,
    )


def tls_context(ca: Path | None) -> ssl.SSLContext | None:
    """The TLS context for ``--ca FILE`` (the system's trusted CAs otherwise)."""
    if ca is None:
        return None
    try:
        return ssl.create_default_context(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SetupError(f"cannot use --ca {ca}: {reason}") from None


def default_store(user: str) -> Path:
    """``$XDG_DATA_HOME/chatd-chat/<user>.db`` (``~/.local/share`` by default)."""
    base = os.environ.get("XDG_DATA_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".local" / "share"
    return root / "chatd-chat" / f"{user}.db"


def prepare_store(store: Path) -> bool:
    """Create the store's directory (0700) and an empty store file (0600) if
    missing, so nothing is ever created readable by others. Returns True
    when the store is new (empty)."""
    try:
        if not store.parent.exists():
            store.parent.mkdir(mode=0o700, parents=True)
            os.chmod(store.parent, 0o700)
        fd = os.open(store, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.close(fd)
    except FileExistsError:
        return store.stat().st_size == 0
    except OSError as exc:
        raise SetupError(f"cannot create the store {store}: {exc.strerror}") from None
    return True


def read_key_file(path: Path) -> bytes:
    """The 32-byte store key from a file of 32 raw bytes or 64 hex digits.
    Refuses a file that group or others can access."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise SetupError(f"key file {path} is not a regular file")
        if info.st_mode & 0o077:
            raise SetupError(
                f"key file {path} is accessible by group or others"
                f" (mode {stat.S_IMODE(info.st_mode):04o}); run: chmod 600 {path}"
            )
        if info.st_size > MAX_KEY_FILE:
            raise SetupError(f"key file {path} is too large to be a key")
        data = path.read_bytes()
    except OSError as exc:
        raise SetupError(f"cannot read key file {path}: {exc.strerror}") from None
    if len(data) == KEY_BYTES:
        return data
    text = data.strip()
    if len(text) == 2 * KEY_BYTES and all(c in b"0123456789abcdefABCDEF" for c in text):
        return bytes.fromhex(text.decode("ascii"))
    raise SetupError(
        f"key file {path} must hold {KEY_BYTES} raw bytes or {2 * KEY_BYTES} hex digits"
    )


def read_salt(store: Path, *, new: bool) -> bytes:
    """The passphrase salt in ``<store>.salt``, created (0600) with a new store."""
    path = store.with_name(store.name + ".salt")
    try:
        if new and not path.exists():
            salt = secrets.token_bytes(SALT_BYTES)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(salt)
                f.flush()
                os.fsync(f.fileno())
            return salt
        salt = path.read_bytes()
    except FileNotFoundError:
        raise SetupError(
            f"{path} is missing: the store passphrase cannot be turned into the key"
            " without it (restore it from your backup, or use --key-file)",
            EXIT_STORE,
        ) from None
    except OSError as exc:
        raise SetupError(f"cannot use the salt file {path}: {exc.strerror}", EXIT_STORE) from None
    if not SALT_BYTES <= len(salt) <= MAX_SALT_BYTES:
        raise SetupError(f"{path} is not a salt file ({len(salt)} bytes)", EXIT_STORE)
    return salt


def ask(prompt: str) -> str:
    """A secret typed at the terminal, not echoed. Raises SetupError when
    input ends (Ctrl-D)."""
    try:
        return getpass.getpass(prompt)
    except EOFError:
        print(file=sys.stderr)
        raise SetupError("no input: cancelled") from None


def ask_passphrase(store: Path, *, new: bool) -> str:
    if not new:
        return ask("Store passphrase: ")
    for _ in range(PASSPHRASE_TRIES):
        first = ask(f"New store passphrase (it encrypts {store}): ")
        if not first:
            print("The passphrase must not be empty.", file=sys.stderr)
        elif ask("Repeat the store passphrase: ") == first:
            return first
        else:
            print("The two passphrases differ; again.", file=sys.stderr)
    raise SetupError("no store passphrase was set")


def ask_new_password(user: str) -> str:
    """The password of a new account, typed twice."""
    for _ in range(PASSPHRASE_TRIES):
        first = ask(f"Choose a password for {user} (12 to 128 characters): ")
        if not first:
            print("The password must not be empty.", file=sys.stderr)
        elif ask("Repeat the password: ") == first:
            return first
        else:
            print("The two passwords differ; again.", file=sys.stderr)
    raise SetupError("no password was chosen")


def ask_totp() -> str:
    code = ask("TOTP code: ").strip()
    if not code:
        raise SetupError("no TOTP code given", EXIT_LOGIN)
    return code


def say(line: str) -> None:
    print(line, flush=True)


#: What the client library's warnings mean to the person at the terminal.
#: None: the warning is shown another way (not as a ``!`` line).
LIBRARY_WARNINGS: Final[dict[str, str | None]] = {
    "client.undecryptable": "a message could not be decrypted (it is in /history, marked)",
    "client.inbound_failed": "a delivery could not be handled; the server will send it again",
    "client.refresh_refused": "the server refused to refresh the session",
    "client.after_ack_failed": "a received message could not be handled (a verification step?)",
    "client.verification_cancel_unsent": "the other device could not be told of the cancel",
    "client.room_undecryptable": None,  # shown in its room (RoomUndecryptable)
    "client.room_key_refused": "a room key from another device was unusable and was ignored",
    "client.room_key_request_refused": "a malformed room key request was ignored",
    "client.room_key_request_failed": "a missing room key could not be asked for",
    "client.room_job_failed": "a room key could not be shared or asked for",
    "client.room_job_dropped": "too much room key work at once: some of it was dropped",
}


class WarningLines(logging.Handler):
    """Shows library warnings as ``!`` lines in the chat instead of log records.
    The library logs an event name, with details in the ``error`` extra."""

    def emit(self, record: logging.LogRecord) -> None:
        event = record.getMessage()
        detail = getattr(record, "error", None)
        text = LIBRARY_WARNINGS.get(event, event)
        if text is None:
            return
        say(f"! {clean(text)}" + (f" ({clean(str(detail))})" if detail else ""))


def can_highlight() -> bool:
    """Whether the terminal shows bold text (for ``@you`` in room messages)."""
    return sys.stdout.isatty() and os.environ.get("TERM", "dumb") not in ("", "dumb")


@dataclass
class Progress:
    logged_in: bool = False
    registering: bool = False  # the first run with --invite
    from_keyring: bool = False  # the store passphrase came from the system keyring
    keep_passphrase: str | None = None  # to save in the keyring once the store opened


async def run_app(
    opts: Options, password: str, key: bytes, totp: str | None, progress: Progress
) -> None:
    """Open the client, then run the chat app until /quit."""
    say(f"Connecting to {opts.server} as {opts.user}…")

    async def ask_line(prompt: str) -> str | None:
        say(prompt)
        return await lines.readline()

    lines: LineReader
    async with (
        open_terminal_lines() as lines,
        open_client(
            opts.server,
            opts.user,
            password,
            device_name=opts.device,
            store_path=opts.store,
            store_key=key,
            totp=totp,
            ssl_context=tls_context(opts.ca),
            invite_code=opts.invite if progress.registering else None,
            enroll_totp=enrol_at_login(say, ask_line, password),
            accept_consent=ask_at_login(say, ask_line),
            insecure=opts.insecure,
        ) as client,
    ):
        progress.logged_in = True
        if progress.keep_passphrase is not None:
            try:
                await trio.to_thread.run_sync(keep_passphrase, opts.store, progress.keep_passphrase)
                say("The store passphrase is now kept in the system keyring (--keyring).")
            except KeyringUnavailable as exc:
                say(f"! the store passphrase was not saved: {exc}")
            progress.keep_passphrase = None
        app = ChatApp(
            client, say, username=opts.user, device_name=opts.device, bold=can_highlight()
        )
        await app.run(lines)


def _failure(
    exc: BaseException,
    opts: Options,
    logged_in: bool,
    registering: bool = False,
    from_keyring: bool = False,
) -> tuple[str, int]:
    """The message and exit code for what ended the app."""
    leaves = list(exception_leaves(exc))
    for kind in (
        KeyboardInterrupt,
        ClientStoreError,
        LoginError,
        CertificateError,
        ConnectionLostError,
    ):
        leaf = next((e for e in leaves if isinstance(e, kind)), None)
        if leaf is None:
            continue
        if isinstance(leaf, KeyboardInterrupt):
            return "interrupted", EXIT_INTERRUPTED
        if isinstance(leaf, ClientStoreError):
            where = " (it came from the system keyring)" if from_keyring else ""
            return (
                f"the local store did not open: {leaf}. Check the store passphrase{where}"
                " (or --key-file); the store was left unchanged",
                EXIT_STORE,
            )
        if isinstance(leaf, LoginError):
            reason = LOGIN_REFUSED.get(leaf.code, clean(leaf.message or leaf.code))
            if logged_in:
                return f"the server ended the session: {reason}", EXIT_LOGIN
            if registering:
                return f"registration refused: {reason}", EXIT_LOGIN
            return f"login refused: {reason}", EXIT_LOGIN
        if isinstance(leaf, CertificateError):
            return (
                f"cannot connect securely to {opts.server}: {leaf}. If the server uses"
                " its own CA or a self-signed certificate, pass it with --ca FILE",
                EXIT_UNREACHABLE,
            )
        return (
            f"cannot reach the server at {opts.server} (is it running, and is the URL right?)",
            EXIT_UNREACHABLE,
        )
    if not logged_in and any(isinstance(e, trio.TooSlowError) for e in leaves):
        return f"the server at {opts.server} did not answer in time", EXIT_UNREACHABLE
    client_error = next((e for e in leaves if isinstance(e, ClientError)), None)
    if client_error is not None:
        return str(client_error), EXIT_ERROR
    traceback.print_exception(exc)
    return f"unexpected error: {type(leaves[0]).__name__}: {leaves[0]}", EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    """Run ``chat``; returns the exit code (see EXIT_CODES)."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="replace")
    logging.basicConfig(level=logging.WARNING, handlers=[WarningLines()], force=True)
    try:
        opts = parse_options(argv)
    except SystemExit as exc:  # argparse: --help, or bad options
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except SetupError as exc:
        print(f"chat: {exc}", file=sys.stderr)
        return exc.exit_status
    try:
        return _main(opts)
    except SetupError as exc:
        print(f"chat: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("\nchat: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(opts: Options) -> int:
    key = read_key_file(opts.key_file) if opts.key_file is not None else None
    if not os.isatty(0):
        raise SetupError("chat is interactive: run it in a terminal")
    invite = opts.invite
    if invite is not None:
        invite = invite or ask("Invite code: ").strip()
        if not invite:
            raise SetupError("no invite code given")
        opts = replace(opts, invite=invite)
        password = ask_new_password(opts.user)
    else:
        password = ask(f"Password for {opts.user}: ")
    if not password:
        raise SetupError("no password given")
    totp = ask_totp() if opts.totp else None
    new = prepare_store(opts.store)
    progress = Progress(registering=invite is not None)
    if key is None:
        kept = None
        if opts.keyring:
            try:
                kept = None if new else stored_passphrase(opts.store)
            except KeyringUnavailable as exc:
                raise SetupError(f"--keyring: {exc}; leave out --keyring to type it") from None
        if kept:
            say("The store passphrase comes from the system keyring.")
            passphrase, progress.from_keyring = kept, True
        else:
            passphrase = ask_passphrase(opts.store, new=new)
            if opts.keyring:
                progress.keep_passphrase = passphrase
        salt = read_salt(opts.store, new=new)
        say("Unlocking the store…")
        key = key_from_passphrase(passphrase, salt)
    while True:
        try:
            trio.run(run_app, opts, password, key, totp, progress)
            return EXIT_OK
        except BaseException as exc:
            leaves = list(exception_leaves(exc))
            refused = next((e for e in leaves if isinstance(e, LoginError)), None)
            if refused is not None and refused.code == "mfa_required" and totp is None:
                say("This account has a second factor.")
                totp = ask_totp()
                continue
            message, code = _failure(
                exc, opts, progress.logged_in, progress.registering, progress.from_keyring
            )
            print(f"chat: {message}", file=sys.stderr)
            return code
