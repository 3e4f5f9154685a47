"""The systemd notify protocol (sd_notify): READY, STATUS, WATCHDOG, STOPPING.

A no-op unless ``$NOTIFY_SOCKET`` is set. Sending is a single non-blocking
datagram, so it is safe to call from the event loop.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._address: str | None = None
        self._sock: socket.socket | None = None
        if address:
            # A leading '@' names a socket in the abstract namespace.
            self._address = "\0" + address[1:] if address.startswith("@") else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, **state: str) -> None:
        """Send ``KEY=value`` lines, e.g. ``notify(READY="1", STATUS="serving")``."""
        if self._sock is None or self._address is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in state.items())
        try:
            self._sock.sendto(message.encode(), self._address)
        except OSError:
            pass  # systemd gone or socket full: notifications are best effort

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds, if systemd asked for pings (for us)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None
