"""systemd socket activation: the listening sockets systemd hands over.

With ``systemd/chatd.socket`` (and ``chatd-admin.socket``), systemd binds the
relay port and the admin socket itself, keeps them open across restarts of
chatd, and passes them to each new chatd process: the ``sd_listen_fds(3)``
protocol. File descriptors ``3 .. 3+LISTEN_FDS-1`` are the sockets,
``LISTEN_FDNAMES`` names them (colon-separated, from each socket unit's
``FileDescriptorName=``), and ``LISTEN_PID`` says which process they are
for: a child that inherited the environment must not take them.

Connection attempts made while chatd restarts wait in the kernel's accept
queue of the socket that systemd still holds, and the next chatd accepts
them: a restart loses none.

:func:`take_listen_fds` reads the variables once, at start, and removes them
from the environment (so no child process sees them). Names chatd knows:
:data:`RELAY`, :data:`ADMIN` and :data:`METRICS`; any other is an error that
names it, as is a socket that is not a listening stream socket.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Final

from chatd.errors import ListenError

SD_LISTEN_FDS_START: Final = 3  # the first passed descriptor (sd-daemon.h)
RELAY: Final = "relay"  # the relay's TCP listener(s)
ADMIN: Final = "admin"  # the admin API's unix (or loopback TCP) socket
METRICS: Final = "metrics"  # the token-free metrics listener ([metrics] listen)
KNOWN_NAMES: Final = (RELAY, ADMIN, METRICS)
_VARIABLES: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


@dataclass
class ActivatedSockets:
    """The sockets systemd passed, by name; each is taken by one service."""

    by_name: dict[str, list[socket.socket]] = field(default_factory=dict)

    def take(self, name: str) -> list[socket.socket]:
        """The sockets named ``name`` (empty if none): the caller owns them now."""
        return self.by_name.pop(name, [])

    def close_rest(self) -> None:
        """Close what no service took."""
        for sockets in self.by_name.values():
            for sock in sockets:
                sock.close()
        self.by_name.clear()


def take_listen_fds(
    environ: MutableMapping[str, str] | None = None, *, pid: int | None = None
) -> ActivatedSockets:
    """The sockets passed to this process, and the variables unset.

    Returns no sockets when chatd was not socket-activated (no
    ``LISTEN_FDS``, or a ``LISTEN_PID`` of another process). Raises
    :class:`ListenError` for malformed variables, an unknown name or a
    descriptor that is not a listening stream socket.
    """
    env = os.environ if environ is None else environ
    listen_pid, count, names = (env.pop(name, None) for name in _VARIABLES)
    if listen_pid is None or count is None:
        return ActivatedSockets()
    if not listen_pid.isdigit() or int(listen_pid) != (os.getpid() if pid is None else pid):
        return ActivatedSockets()  # meant for another process
    if not count.isdigit():
        raise ListenError(f"socket activation: LISTEN_FDS={count!r} is not a count")
    n = int(count)
    labels = names.split(":") if names else []
    if len(labels) != n:
        raise ListenError(
            f"socket activation: LISTEN_FDNAMES names {len(labels)} socket(s) but "
            f"LISTEN_FDS is {n}; give each socket unit a FileDescriptorName= "
            f"({', '.join(KNOWN_NAMES)})"
        )
    found = ActivatedSockets()
    try:
        for offset, label in enumerate(labels):
            fd = SD_LISTEN_FDS_START + offset
            if label not in KNOWN_NAMES:
                raise ListenError(
                    f"socket activation: socket {fd} is named {label!r}; chatd knows "
                    f"{', '.join(KNOWN_NAMES)} (set FileDescriptorName= in its socket unit)"
                )
            try:
                sock = socket.socket(fileno=fd)
            except OSError as exc:
                raise ListenError(
                    f"socket activation: descriptor {fd} ({label}) is not a socket: {exc.strerror}"
                ) from None
            found.by_name.setdefault(label, []).append(sock)
            sock.set_inheritable(False)
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            if sock.type != socket.SOCK_STREAM or not listening:
                raise ListenError(
                    f"socket activation: socket {fd} ({label}) is not a listening stream "
                    "socket (use ListenStream= in the socket unit)"
                )
    except ListenError:
        found.close_rest()
        raise
    return found
