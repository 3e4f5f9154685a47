"""The store passphrase kept in the system keyring, for ``chat --keyring``.

Opt-in: without ``--keyring`` the passphrase is always typed. With it, the
passphrase of an existing store is read from the keyring (the ``keyring``
package: Secret Service on Linux, Keychain on macOS, ...), under the service
``chatd-chat`` and the store's absolute path; when the keyring has none, it
is typed once and saved there after the store opened with it.

The keyring calls may block (a desktop prompt, D-Bus): they run before Trio
starts, or in a thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import keyring
from keyring.errors import KeyringError

from chatd.errors import ChatdError

SERVICE: Final = "chatd-chat"


class KeyringUnavailable(ChatdError):
    """The system keyring cannot be used; the message says why."""


def _account(store: Path) -> str:
    return str(store.resolve())


def stored_passphrase(store: Path) -> str | None:
    """The passphrase kept for ``store``, or None. Raises KeyringUnavailable."""
    try:
        return keyring.get_password(SERVICE, _account(store))
    except KeyringError as exc:
        raise KeyringUnavailable(f"the system keyring cannot be used ({exc})") from None


def keep_passphrase(store: Path, passphrase: str) -> None:
    """Save the passphrase of ``store``. Raises KeyringUnavailable."""
    try:
        keyring.set_password(SERVICE, _account(store), passphrase)
    except KeyringError as exc:
        raise KeyringUnavailable(f"the system keyring cannot be used ({exc})") from None
