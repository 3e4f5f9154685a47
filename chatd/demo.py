"""``chatd demo``: a throwaway server, scripted clients, and what each side sees.

Theory of operation
-------------------
The demo makes a temporary directory and, inside it, a server data dir the
way ``chatd init`` makes one (a new database key and admin token), with a
short config whose only change from the defaults is ``relay.port = 0``. It
starts the real daemon as a subprocess (``python -m chatd serve``) and waits
for the systemd-style ``READY=1`` datagram on a ``NOTIFY_SOCKET`` it binds
itself; the ``STATUS=`` line of that datagram names the relay URL and so the
port the kernel picked. A daemon that exits or stays silent is reported with
the tail of its log.

Three accounts (alice, bob, carol) with random passwords are created through
the admin API on its unix socket, and scripted clients of :mod:`chatd.client`
(each with its own encrypted store and a random store key) play a one-to-one
conversation, then one in a channel (:mod:`chatd.demo_rooms`), in which each
side is offline at some point, so that ciphertext waits in the server's
queues. After each step the demo opens the server's SQLCipher file
read-only with the database key (WAL lets a reader in while the daemon
writes) and prints, beside what the clients saw, what the server stored.

At the end it searches every file of the server (the data dir, with the
database, its ``-wal`` and ``-shm``, and the daemon's log) byte for byte, and
every text and blob value of every table of the decrypted database, for each
message text. Then it stops the daemon with SIGTERM, which must exit 0. Any
plaintext found, or any step that fails or takes too long, ends the demo with
a :class:`DemoError` (exit code 1); the daemon is killed if it still runs and
the temporary directory is removed unless ``--keep`` was given.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

import httpx
import trio

from chatd.client import Client, open_client
from chatd.config import CONFIG_FILE_NAME, Config, load_config
from chatd.demo_files import FILE_LINES, FILE_NAME, short_blob
from chatd.demo_rooms import ROOM_TEXTS, RoomScript
from chatd.demo_screen import CIPHERTEXT_CHARS, Screen, envelope_header, envelope_row
from chatd.errors import ChatdError, exception_leaves
from chatd.inspection import (
    ScanReport,
    ServerView,
    read_server_view,
    scan_database,
    scan_files,
)
from chatd.keyfiles import write_private_file

READY_TIMEOUT: Final = 30.0  # seconds the daemon may take to report READY=1
STEP_TIMEOUT: Final = 30.0  # seconds one scripted step may take
STOP_TIMEOUT: Final = 30.0  # seconds the daemon may take to exit after SIGTERM
LOG_TAIL_LINES: Final = 20  # daemon log lines shown when something fails
MAX_SOCKET_PATH: Final = 100  # bytes; AF_UNIX paths are limited to about 108

ALICE_MESSAGES: Final = (
    "Launch moved to Thursday 10:00",
    "Bring the signed contract, pls",
    "Lab door code is 4711#",
)
BOB_REPLY: Final = "Got all three. See you Thursday"

#: Inherited variables that would make the throwaway daemon use something else
#: than its own files (systemd credentials, notify socket, watchdog, config).
_FOREIGN_ENV: Final = (
    "CREDENTIALS_DIRECTORY",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "CHATD_CONFIG",
)

DEMO_CONFIG: Final = """\
# A throwaway config written by `chatd demo`: the defaults, except free ports.
[server]
data_dir = "."

[relay]
port = 0

[admin]
listen = "unix:admin.sock"

[attachments]
port = 0
"""


class DemoError(ChatdError):
    """The demo could not run to the end, or found plaintext in the server's files."""

    exit_code = 1
    shows_log = False  # the message already holds the tail of the daemon's log


# -- the throwaway daemon ---------------------------------------------------------------------


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "  (no daemon log)"
    tail = text.splitlines()[-lines:]
    return "\n".join(f"  | {line}" for line in tail) if tail else "  (the daemon log is empty)"


class Daemon:
    """The ``chatd serve`` subprocess and where to find it."""

    def __init__(self, proc: trio.Process, log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path
        self.relay_url = ""

    def failure(self, message: str) -> DemoError:
        error = DemoError(
            f"{message}; the daemon's log ({self.log_path}) ends with:\n{log_tail(self.log_path)}"
        )
        error.shows_log = True
        return error

    async def stop(self) -> int:
        """SIGTERM, then wait for the exit code. Raises DemoError unless it is 0."""
        self.proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(STOP_TIMEOUT):
            code = await self.proc.wait()
            if code != 0:
                raise self.failure(f"the daemon exited with code {code} after SIGTERM, not 0")
            return code
        raise self.failure(f"the daemon did not stop within {STOP_TIMEOUT:g} s of SIGTERM")


def _open_log(path: Path) -> IO[bytes]:
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")


async def _wait_ready(proc: trio.Process, notify: trio.socket.SocketType) -> str | None:
    """The STATUS= of the READY=1 datagram; None if the daemon exited or timed out."""
    status: str | None = None
    with trio.move_on_after(READY_TIMEOUT):
        async with trio.open_nursery() as nursery:

            async def exited() -> None:
                await proc.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(exited)
            while status is None:
                lines = (await notify.recv(4096)).decode(errors="replace").splitlines()
                if "READY=1" in lines:
                    status = next(
                        (s.removeprefix("STATUS=") for s in lines if s.startswith("STATUS=")), ""
                    )
            nursery.cancel_scope.cancel()
    return status


@asynccontextmanager
async def open_daemon(config_path: Path, workdir: Path) -> AsyncIterator[Daemon]:
    """Start ``chatd serve --config config_path`` and wait until it is ready.

    Its stdout and stderr go to ``workdir/daemon.log``. Raises DemoError (with
    the log's tail) if it exits or stays silent for READY_TIMEOUT. On exit the
    daemon is killed if it still runs: call :meth:`Daemon.stop` first for a
    clean stop.
    """
    notify_path = workdir / "notify.sock"
    log_path = workdir / "daemon.log"
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_ENV}
    env["NOTIFY_SOCKET"] = str(notify_path)
    notify = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        await notify.bind(str(notify_path))
        log_file = _open_log(log_path)
        try:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "chatd", "serve", "--config", str(config_path)],
                env=env,
                cwd=str(workdir),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
            )
        finally:
            log_file.close()  # the child has its own descriptor
        daemon = Daemon(proc, log_path)
        try:
            status = await _wait_ready(proc, notify)
            if status is None and proc.returncode is not None:
                raise daemon.failure(f"the daemon exited with code {proc.returncode} at start")
            if status is None:
                raise daemon.failure(f"the daemon did not report ready within {READY_TIMEOUT:g} s")
            found = re.search(r"serving relay (\S+),", status)
            if found is None:
                raise daemon.failure(f"cannot find the relay address in {status!r}")
            daemon.relay_url = found[1]
            try:
                yield daemon
            except Exception as exc:
                if not getattr(exc, "shows_log", False):
                    print(
                        f"chatd demo: the daemon's log ends with:\n{log_tail(log_path)}",
                        file=sys.stderr,
                    )
                raise
        finally:
            if proc.returncode is None:
                proc.kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()
    finally:
        notify.close()
        notify_path.unlink(missing_ok=True)


# -- the script -------------------------------------------------------------------------------


@contextmanager
def _step_deadline(what: str) -> Iterator[None]:
    """Bound one step; its timeouts and chatd errors (also from inside the client
    library's nursery) become one DemoError naming the step. Anything else is a
    bug and keeps its traceback."""
    try:
        with trio.fail_after(STEP_TIMEOUT):
            yield
    except Exception as exc:
        leaves = list(exception_leaves(exc))
        if not all(isinstance(e, trio.TooSlowError | ChatdError) for e in leaves):
            raise
        if len(leaves) == 1 and isinstance(leaves[0], DemoError):
            raise leaves[0] from None
        reasons = "; ".join(
            f"it took over {STEP_TIMEOUT:g} s" if isinstance(e, trio.TooSlowError) else str(e)
            for e in leaves
        )
        raise DemoError(f"{what} failed: {reasons}") from None


@contextmanager
def _workdir(keep: bool) -> Iterator[Path]:
    if keep:
        yield Path(tempfile.mkdtemp(prefix="chatd-demo-"))
        return
    with tempfile.TemporaryDirectory(prefix="chatd-demo-") as name:
        yield Path(name)


def _prepare_data_dir(data_dir: Path) -> Config:
    """``chatd init`` for ``data_dir``, then the demo's config in place of the template."""
    from chatd.cli import cmd_init  # the cli imports this module lazily; no cycle at import

    with contextlib.redirect_stdout(io.StringIO()):  # its summary names the default port
        cmd_init(data_dir)
    config_path = data_dir / CONFIG_FILE_NAME
    config_path.write_text(DEMO_CONFIG)  # keeps the 0600 mode init gave it
    return load_config(config_path)


def _read_secret(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii").strip()
    except OSError as exc:
        raise DemoError(f"cannot read {path}: {exc.strerror}") from None


async def _create_users(socket_path: Path, token: str, names: Sequence[str]) -> dict[str, str]:
    """Create accounts over the admin API; returns their random passwords."""
    passwords = {name: secrets.token_urlsafe(18) for name in names}
    transport = httpx.AsyncHTTPTransport(uds=str(socket_path))
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(
        transport=transport, base_url="http://chatd", timeout=STEP_TIMEOUT
    ) as admin:
        for name, password in passwords.items():
            try:
                reply = await admin.post(
                    "/v1/users",
                    headers=headers,
                    json={"username": name, "password": password, "role": "user"},
                )
            except httpx.TransportError as exc:
                raise DemoError(f"cannot reach the admin API on {socket_path}: {exc}") from None
            if reply.status_code != 200:
                raise DemoError(
                    f"the admin API refused to create {name}: {reply.status_code} {reply.text}"
                )
    return passwords


@dataclass
class _Demo:
    screen: Screen
    workdir: Path
    config: Config
    daemon: Daemon
    db_key: bytes
    passwords: dict[str, str]
    store_keys: dict[str, bytes] = field(default_factory=dict)
    sent: list[str] = field(default_factory=list)  # alice's message ids
    needles: list[str] = field(
        default_factory=lambda: [*ALICE_MESSAGES, BOB_REPLY, *ROOM_TEXTS, *FILE_LINES]
    )

    @asynccontextmanager
    async def client(self, name: str) -> AsyncIterator[Client]:
        clients = self.workdir / "clients"
        clients.mkdir(mode=0o700, exist_ok=True)
        if name not in self.store_keys:
            self.store_keys[name] = secrets.token_bytes(32)
            # Kept beside the store so that a --keep run can be looked into.
            write_private_file(clients / f"{name}.key", self.store_keys[name].hex())
        key = self.store_keys[name]
        async with open_client(
            self.daemon.relay_url,
            name,
            self.passwords[name],
            device_name=f"{name}'s demo device",
            store_path=clients / f"{name}.db",
            store_key=key,
        ) as client:
            yield client

    async def server_view(self) -> ServerView:
        return await trio.to_thread.run_sync(
            read_server_view, self.config.database_path, self.db_key
        )

    def envelope_lines(self, title: str, view: ServerView) -> list[str]:
        width = self.screen.right
        lines = [f"envelopes: {title}"]
        if view.envelopes:
            lines.append(envelope_header(width))
            lines += [envelope_row(e, width) for e in view.envelopes]
            shown = [e.ciphertext[:CIPHERTEXT_CHARS] for e in view.envelopes if e.ciphertext]
            if len(shown) != len(set(shown)):
                lines.append("(Olm pre-key messages begin alike: the channel's public keys)")
        return lines

    async def step_bob_registers(self) -> None:
        self.screen.step("1. bob signs in once, then goes offline")
        async with self.client("bob") as bob:
            left = [
                f"bob: signed in as device {bob.device_id}",
                "bob: published identity + one-time keys",
            ]
        left.append("bob: goes offline")
        view = await self.server_view()
        right = ["users: Argon2id hashes, never passwords"]
        right += [f"  {name:<6} {hashed}" for name, hashed in view.users]
        right.append("devices: public keys only")
        right += [
            f"  {device} {owner:<6} curve25519 {curve[:12]}… {count} one-time keys"
            for device, owner, curve, count in view.devices
        ]
        right.append(f"envelopes: {len(view.envelopes)} queued")
        self.screen.columns(left, right)

    async def step_alice_sends(self) -> None:
        self.screen.step("2. alice sends three messages while bob is offline")
        async with self.client("alice") as alice:
            left = [f"alice: signed in as device {alice.device_id}"]
            members = await alice.directory()
            bob = next(m for m in members if m.username == "bob")
            for text in ALICE_MESSAGES:
                self.sent.append(await alice.send_text(bob.user_id, text))
                left.append(f"alice → bob: {text}")
            left.append("alice: each answered 'sent' = queued durably")
        left.append("alice: goes offline")
        view = await self.server_view()
        title = f"{len(view.envelopes)} queued for bob's device, who is offline"
        self.screen.columns(left, self.envelope_lines(title, view))

    async def step_bob_reads_and_replies(self) -> None:
        self.screen.step("3. bob comes online: receives, decrypts, acknowledges, replies")
        async with self.client("bob") as bob:
            left = [f"bob: back online (device {bob.device_id})"]
            inbox = bob.messages()
            for _ in ALICE_MESSAGES:
                message = await inbox.receive()
                left.append(f"alice → bob: {message.text}")
            alice_id = message.sender_user_id
            # Sent on the same connection after the ack, so the server has
            # handled the ack (in order) by the time this returns.
            await bob.send_text(alice_id, BOB_REPLY)
            left.append(f"bob → alice: {BOB_REPLY}")
        left.append("bob: goes offline")
        view = await self.server_view()
        title = f"bob's acked ones deleted; {len(view.envelopes)} queued for alice's device"
        self.screen.columns(left, self.envelope_lines(title, view))

    async def step_alice_reads(self) -> None:
        self.screen.step("4. alice comes back online: receives the reply and receipts")
        async with self.client("alice") as alice:
            left = ["alice: back online"]
            message = await alice.messages().receive()
            left.append(f"bob → alice: {message.text}")
            # The receipts were queued before the reply, so they are handled first.
            states = {e.message_id: e.state for e in await alice.history()}
            delivered = sum(states.get(m) == "delivered" for m in self.sent)
            mark = "✓" if delivered == len(self.sent) else "(receipts missing!)"
            left.append(f"alice: {delivered} of {len(self.sent)} messages delivered {mark}")
            await alice.directory()  # a request after the ack: the server has handled it
        view = await self.server_view()
        title = f"alice acked; {len(view.envelopes)} left (a receipt for bob's device)"
        self.screen.columns(left, self.envelope_lines(title, view))

    async def scan(self) -> ScanReport:
        report = ScanReport()
        needles = self.needles
        await trio.to_thread.run_sync(
            scan_files, [self.config.data_dir, self.daemon.log_path], needles, report
        )
        await trio.to_thread.run_sync(
            scan_database, self.config.database_path, self.db_key, needles, report
        )
        return report


async def _play(screen: Screen, workdir: Path, keep: bool) -> ScanReport:
    config = _prepare_data_dir(workdir / "server")
    socket_path = config.admin_unix_socket
    if socket_path is None or len(str(socket_path).encode()) > MAX_SOCKET_PATH:
        raise DemoError(
            f"the temporary directory {workdir} is too deep for a unix socket; "
            "set TMPDIR to a short path such as /tmp"
        )
    db_key = bytes.fromhex(_read_secret(config.in_data_dir(config.store.key_file)))
    token = _read_secret(config.in_data_dir(config.admin.token_file))
    screen.line("chatd demo: a throwaway server and three scripted clients: alice, bob, carol")
    after = "kept at the end (--keep)" if keep else "removed at the end; --keep keeps it"
    screen.line(f"  temp dir   {workdir} ({after})")
    screen.line(f"  data dir   {config.data_dir} (made by 'chatd init')")
    async with open_daemon(config.path, workdir) as daemon:
        screen.line(f"  daemon     pid {daemon.proc.pid}, relay {daemon.relay_url}")
        screen.line(
            f"  settings   defaults (Argon2id m={config.auth.argon2_memory_kib} KiB"
            f" t={config.auth.argon2_time_cost}, rate limits as shipped), free ports"
        )
        with _step_deadline("creating the accounts"):
            passwords = await _create_users(socket_path, token, ["alice", "bob", "carol"])
        screen.line("  accounts   alice, bob, carol: random passwords, made over the admin API")
        screen.line("  the server's view is read from its SQLCipher file (read-only, with its key)")
        screen.line()
        screen.table_header()
        demo = _Demo(screen, workdir, config, daemon, db_key, passwords)
        rooms = RoomScript(demo)
        for what, step in (
            ("bob's first sign-in", demo.step_bob_registers),
            ("alice's messages", demo.step_alice_sends),
            ("bob's turn", demo.step_bob_reads_and_replies),
            ("alice's turn", demo.step_alice_reads),
            *rooms.steps(),
        ):
            with _step_deadline(what):
                await step()
        screen.line()
        screen.wrapped(
            "The server does see metadata: who sends to which device, when, and how many bytes."
        )
        with _step_deadline("the plaintext scan"):
            report = await demo.scan()
        texts = len(demo.needles) - len(FILE_LINES)
        screen.line(
            f"searching the server for the {texts} message texts and the"
            f" {len(FILE_LINES)} lines of {FILE_NAME}:"
        )
        screen.wrapped(
            f"  {len(report.files)} files, {report.file_bytes:,} bytes raw:"
            f" {', '.join(map(short_blob, report.files))}"
        )
        screen.wrapped(
            f"  {report.values:,} text and blob values in {report.tables} tables"
            " of the decrypted database"
        )
        if report.found:
            screen.line(f"plaintext found in server files: {len(report.found)} times")
            for where in report.found:
                screen.wrapped(f"  {where}")
        else:
            screen.line("plaintext found in server files: none")
        code = await daemon.stop()
        screen.line(f"daemon stopped by SIGTERM, exit code {code}")
    return report


async def run_demo(keep: bool = False) -> int:
    """Run the whole demo, printing to stdout; returns 0.

    Raises DemoError when a step fails, the daemon misbehaves, or a message
    text is found in the server's files.
    """
    screen = Screen.for_terminal()
    with _workdir(keep) as workdir:
        report = await _play(screen, workdir, keep)
    if keep:
        screen.wrapped(
            f"kept {workdir}: server/ is the data dir (chatd.db opens with server/db.key),"
            " clients/ holds the clients' stores and their keys"
        )
    else:
        screen.line(f"removed {workdir}")
    if report.found:
        raise DemoError("the server's files hold message plaintext; please report this bug")
    return 0
