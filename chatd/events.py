"""What services tell each other, as narrow interfaces.

``daemon.py`` makes the relay's :class:`~chatd.relay.registry.Registry` first
and hands it to each service that has news for the relay, when it makes the
service (explicit wiring: nothing is patched in afterwards). A service used
on its own (by a test, or a tool with no relay) gets :data:`UNHEARD`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, Protocol


class SessionEvents(Protocol):
    def sessions_revoked(self, session_ids: Iterable[int]) -> None:
        """These sessions ended: their live connections close at once (4003)."""


class KeyEvents(Protocol):
    def keys_low(self, device_ids: Iterable[str]) -> None:
        """These devices' unclaimed one-time keys ran low: tell them their count."""


class DeviceEvents(Protocol):
    def devices_changed(self, user_ids: Iterable[int]) -> None:
        """These users' current devices changed (a device published its keys
        or was removed, the account was disabled or enabled), committed."""


class _Unheard:
    """Events nobody listens to: for a service running without a relay."""

    def sessions_revoked(self, session_ids: Iterable[int]) -> None:
        pass

    def keys_low(self, device_ids: Iterable[str]) -> None:
        pass

    def devices_changed(self, user_ids: Iterable[int]) -> None:
        pass


UNHEARD: Final = _Unheard()
