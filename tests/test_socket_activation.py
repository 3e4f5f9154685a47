"""systemd socket activation: chatd serves the sockets it is passed, and a
restart on the same sockets loses no connection attempt.

The test plays systemd: it binds the relay port, the admin socket and the
metrics port, keeps them open for the whole test, and starts each chatd with
them as fds 3, 4, ... and ``LISTEN_PID`` set to chatd's own pid (a small
launcher moves the fds and execs chatd, so the pid stays the same).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import Request

from chatd.errors import ListenError
from chatd.sdlisten import take_listen_fds

from .conftest import DataDir
from .test_daemon import Daemon

# Moves the passed fds (argv[1], comma-separated) to 3, 4, ..., sets
# LISTEN_PID to its own pid and becomes chatd (argv[2:]), as systemd does.
LAUNCHER = """
import os, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
copies = [os.dup(fd) for fd in fds]
for offset, fd in enumerate(copies):
    os.dup2(fd, 3 + offset)
    os.set_inheritable(3 + offset, True)  # dup2 onto itself keeps close-on-exec
for fd in set(copies) | set(fds):
    if fd >= 3 + len(fds):
        os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-m", "chatd", *sys.argv[2:]])
"""


@asynccontextmanager
async def activated(
    data_dir: DataDir, short_tmp: Path, sockets: list[tuple[str, socket.socket]], run: int
) -> AsyncIterator[Daemon]:
    """``chatd serve`` started the way systemd starts it with these sockets."""
    notify_path = short_tmp / f"notify{run}.sock"
    notify = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await notify.bind(str(notify_path))
    fds = [sock.fileno() for _, sock in sockets]
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(notify_path),
        "LISTEN_FDS": str(len(sockets)),
        "LISTEN_FDNAMES": ":".join(name for name, _ in sockets),
    }
    env.pop("LISTEN_PID", None)
    proc = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-c",
            LAUNCHER,
            ",".join(map(str, fds)),
            "serve",
            "--config",
            str(data_dir.config_path),
        ],  # fmt: skip
        env=env,
        pass_fds=fds,
        stderr=open(short_tmp / f"stderr{run}.log", "ab"),  # noqa: SIM115 - the child owns it
    )
    try:
        yield Daemon(proc, notify)
    except BaseException:
        print((short_tmp / f"stderr{run}.log").read_text()[-4000:])
        raise
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        notify.close()


def systemd_sockets(data_dir: DataDir) -> tuple[socket.socket, socket.socket]:
    """The relay's TCP socket and the admin unix socket, bound and listening."""
    relay = socket.create_server(("127.0.0.1", 0), backlog=64)
    admin = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    admin.bind(str(data_dir.path / "a.sock"))
    os.chmod(data_dir.path / "a.sock", 0o600)
    admin.listen(64)
    return relay, admin


def upgrade_request(port: int) -> bytes:
    return WSConnection(ConnectionType.CLIENT).send(
        Request(host=f"127.0.0.1:{port}", target="/v1/ws")
    )


async def read_head(stream: trio.abc.Stream) -> bytes:
    """The bytes up to the end of an HTTP response head."""
    data = b""
    with trio.fail_after(30):
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(4096)
            assert chunk, f"closed before a response: {data!r}"
            data += chunk
    return data


async def stop(d: Daemon) -> None:
    d.proc.send_signal(signal.SIGTERM)
    with trio.fail_after(30):
        assert await d.proc.wait() == 0


async def test_a_restart_on_the_same_sockets_loses_no_connection_attempt(
    data_dir: DataDir, short_tmp: Path
) -> None:
    relay, admin = systemd_sockets(data_dir)
    scrape = socket.create_server(("127.0.0.1", 0))  # the token-free metrics listener
    port = relay.getsockname()[1]
    sockets = [("relay", relay), ("admin", admin), ("metrics", scrape)]
    with relay, admin, scrape:
        async with activated(data_dir, short_tmp, sockets, run=1) as first:
            ready = await first.wait_notify("READY")
            assert f"serving relay ws://127.0.0.1:{port}/v1/ws" in ready
            served = await trio.open_tcp_stream("127.0.0.1", port)
            await served.send_all(upgrade_request(port))
            assert (await read_head(served)).startswith(b"HTTP/1.1 101")
            await served.aclose()
            await stop(first)
        # No chatd runs now. The kernel still queues connections on the
        # sockets "systemd" holds; the next chatd must answer them.
        waiting_relay = await trio.open_tcp_stream("127.0.0.1", port)
        await waiting_relay.send_all(upgrade_request(port))
        waiting_admin = await trio.open_unix_socket(str(data_dir.path / "a.sock"))
        await waiting_admin.send_all(b"GET /v1/health HTTP/1.1\r\nHost: chatd\r\n\r\n")
        waiting_scrape = await trio.open_tcp_stream("127.0.0.1", scrape.getsockname()[1])
        await waiting_scrape.send_all(b"GET /metrics HTTP/1.1\r\nHost: chatd\r\n\r\n")
        async with activated(data_dir, short_tmp, sockets, run=2) as second:
            await second.wait_notify("READY")
            assert (await read_head(waiting_relay)).startswith(b"HTTP/1.1 101")
            health = await read_head(waiting_admin)
            assert health.startswith(b"HTTP/1.1 200"), health
            assert (await read_head(waiting_scrape)).startswith(b"HTTP/1.1 200")
            await waiting_scrape.aclose()
            await waiting_relay.aclose()
            await waiting_admin.aclose()
            await stop(second)
        # systemd's socket file outlives both chatd processes.
        assert (data_dir.path / "a.sock").is_socket()
    log = (short_tmp / "stderr2.log").read_text()
    assert "msg=relay.listening" in log and "activated=True" in log


async def test_a_socket_that_is_not_listening_is_refused_clearly(
    data_dir: DataDir, short_tmp: Path
) -> None:
    relay = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # never listen()ed
    with relay:
        async with activated(data_dir, short_tmp, [("relay", relay)], run=1) as d:
            with trio.fail_after(30):
                assert await d.proc.wait() == ListenError.exit_code
    log = (short_tmp / "stderr1.log").read_text()
    assert "socket 3 (relay) is not a listening stream socket" in log
    assert not (data_dir.path / "a.sock").exists()  # it stopped before serving anything


def test_sockets_for_another_process_are_left_alone() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "relay:admin"}
    assert take_listen_fds(env, pid=4242).by_name == {}
    assert env == {}  # unset all the same: no child process may take them


def test_without_activation_there_is_nothing() -> None:
    env = {"PATH": "/usr/bin"}
    assert take_listen_fds(env).by_name == {}
    assert env == {"PATH": "/usr/bin"}


@pytest.mark.parametrize(
    ("fds", "names", "message"),
    [
        ("two", "relay", "LISTEN_FDS='two' is not a count"),
        ("2", "relay", "LISTEN_FDNAMES names 1 socket(s) but LISTEN_FDS is 2"),
        ("1", "chatd.socket", "socket 3 is named 'chatd.socket'; chatd knows relay, admin"),
    ],
)
def test_malformed_activation_is_an_error_naming_the_problem(
    fds: str, names: str, message: str
) -> None:
    env = {"LISTEN_PID": "4242", "LISTEN_FDS": fds, "LISTEN_FDNAMES": names}
    with pytest.raises(ListenError) as error:
        take_listen_fds(env, pid=4242)
    assert message in str(error.value)
    assert env == {}


def test_the_launcher_passes_what_systemd_would() -> None:
    # Guards the tests above: the child sees the sockets as 3 and 4, in order.
    relay = socket.create_server(("127.0.0.1", 0))
    admin = socket.create_server(("127.0.0.1", 0))
    ports = [str(admin.getsockname()[1]), str(relay.getsockname()[1])]
    with relay, admin:
        probe = (
            "import os, socket; print(os.environ['LISTEN_PID'] == str(os.getpid()),"
            " socket.socket(fileno=3).getsockname()[1], socket.socket(fileno=4).getsockname()[1])"
        )
        launcher = LAUNCHER.replace(
            'os.execv(sys.executable, [sys.executable, "-m", "chatd", *sys.argv[2:]])',
            "os.execv(sys.executable, [sys.executable, '-c', sys.argv[2]])",
        )
        out = subprocess.run(
            [sys.executable, "-c", launcher, f"{admin.fileno()},{relay.fileno()}", probe],
            pass_fds=(relay.fileno(), admin.fileno()),
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.split()
    assert out == ["True", *ports]
