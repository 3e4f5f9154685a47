"""The chatd error hierarchy.

Every error chatd raises on purpose derives from :class:`ChatdError`. Each one
says what was wrong and what to do about it, never carries a secret, and maps
to a documented process exit code (see ``docs/OPERATIONS.md``)::

    ChatdError                      exit 1  (unexpected, should not happen)
    ├── UsageError                  exit 64 bad command-line arguments
    ├── ConfigError                 exit 3  config file unreadable or invalid
    ├── SecretFileError             exit 4  key/token file missing, malformed or unsafe
    ├── DataDirError                exit 6  data dir missing, not ours, or unsafe
    │   └── DataDirLockedError      exit 9  another chatd (serve, restore, rekey) uses it
    ├── ListenError                 exit 5  address in use or cannot bind
    ├── StoreError                  exit 7  database unusable
    │   ├── KeyMismatchError        exit 2  the key does not open the database
    │   ├── SchemaTooNewError       exit 7  database written by a newer chatd
    │   └── StoreClosedError        exit 7  write after the writer stopped
    ├── BackupError                 exit 8  a backup cannot be made, read or restored
    ├── RefusedError                (no exit) a request refused; its code and
    │   │                           message go to the client as they are
    │   ├── AuthError               chatd.auth.models: sessions, keys, accounts
    │   ├── PushRefused             chatd.push.guard: push endpoints (SSRF guard, keys)
    │   └── ApiError                chatd.admin.api: an admin API answer (HTTP status)
    ├── InputError                  (no exit) a value fails a rule, said in the message
    │   ├── UsernameError, PasswordPolicyError, MalformedTokenError  (chatd.auth)
    ├── WebSocketClosed             (no exit) chatd.relay.ws: no more messages can come
    └── ClientError                 chatd.client.errors: the client library's errors

Protocol errors a client causes are not exceptions here: the sans-I/O core in
:mod:`chatd.protocol` turns them into error frames and close codes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar


def exception_leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside ``exc``, through any nesting of exception groups
    (Trio nurseries raise groups), in order; ``exc`` itself if not a group."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from exception_leaves(inner)
    else:
        yield exc


class ChatdError(Exception):
    """Root of every deliberate chatd error. ``str(err)`` is safe to print."""

    exit_code: ClassVar[int] = 1


class UsageError(ChatdError):
    exit_code = 64


class ConfigError(ChatdError):
    """The config file is unreadable or a setting is invalid.

    The message always names the file and, where there is one, the key.
    """

    exit_code = 3

    def __init__(self, path: object, message: str, *, key: str | None = None) -> None:
        self.path = str(path)
        self.key = key
        where = f"{self.path}: {key}" if key else self.path
        super().__init__(f"{where}: {message}")


class SecretFileError(ChatdError):
    """A key or token file is missing, malformed, or readable by group/others."""

    exit_code = 4


class DataDirError(ChatdError):
    """The data directory is missing, owned by another user, or writable by others."""

    exit_code = 6


class DataDirLockedError(DataDirError):
    """Another chatd process holds the data dir's lock (``chatd.lock``): a
    running ``chatd serve``, ``chatd restore`` or ``chatd rekey``."""

    exit_code = 9


class ListenError(ChatdError):
    """A listening socket could not be opened (usually: address already in use)."""

    exit_code = 5


class StoreError(ChatdError):
    """The database cannot be used."""

    exit_code = 7


class KeyMismatchError(StoreError):
    """The configured key does not decrypt the database. The file is untouched."""

    exit_code = 2

    def __init__(self, path: object) -> None:
        self.path = str(path)
        super().__init__(
            f"the database key does not match {self.path} "
            "(the file was left untouched; check store.key_file or the "
            "chatd-db-key credential)"
        )


class SchemaTooNewError(StoreError):
    """The database was migrated by a newer chatd than this one."""


class StoreClosedError(StoreError):
    """A write was submitted after the store writer stopped."""


class BackupError(ChatdError):
    """A backup cannot be made, verified or restored: a wrong or missing
    backup key, a corrupt or truncated file, not a chatd backup, a backup
    from a newer chatd, or a restore while chatd is running. Nothing was
    changed (a failed backup leaves no partial file)."""

    exit_code = 8


class RefusedError(ChatdError):
    """A request was refused for a reason its sender can act on. ``code`` (a
    stable machine word) and ``message`` go back to the sender as they are;
    neither says more than the sender may know, nor carries a secret."""


class InputError(ChatdError, ValueError):
    """A value breaks a rule (a username, a password, a token's form);
    ``str(err)`` says which rule, never repeating a secret."""
