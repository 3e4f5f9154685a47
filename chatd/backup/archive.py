"""The backup directory: backup names, listing, the key a backup needs, and
what ``verify`` and ``holding`` read from a backup.

A backup is one SQLCipher file named ``chatd-backup-<UTC time>-<key id>.db``
(e.g. ``chatd-backup-20261203T191530123Z-3f2a9c0d1e4b5a69.db``): the time it
was started and the key id (:func:`chatd.backup.keys.key_id`) of the backup
key that encrypts it. Nothing else is stored beside it.
"""

from __future__ import annotations

import calendar
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from chatd.auth.usernames import normalize_username
from chatd.backup.copy import quote
from chatd.backup.keys import key_id, known_backup_keys, read_key_file
from chatd.config import Config
from chatd.errors import BackupError, KeyMismatchError, StoreError
from chatd.store.db import Connection, DatabaseError, _looks_plaintext, close_quietly, connect

BACKUP_GLOB: Final = "chatd-backup-*.db"
_NAME: Final = re.compile(r"^chatd-backup-(\d{8}T\d{9}Z)-([0-9a-f]{16})\.db$")


def backup_name(started_ms: int, kid: str) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(started_ms // 1000))
    return f"chatd-backup-{stamp}{started_ms % 1000:03d}Z-{kid}.db"


@dataclass(frozen=True)
class BackupFile:
    name: str
    path: Path
    bytes: int
    created_at: int  # unix ms, from the name (else the file's mtime)
    key_id: str | None  # from the name; None for a file not named by chatd


def parse_name(path: Path) -> tuple[int, str] | None:
    """(started unix ms, key id) from a backup's name, or None."""
    found = _NAME.match(path.name)
    if found is None:
        return None
    stamp, kid = found.groups()
    seconds = time.strptime(stamp[:15], "%Y%m%dT%H%M%S")
    return calendar.timegm(seconds) * 1000 + int(stamp[15:18]), kid


def list_backups(directory: Path) -> list[BackupFile]:
    """The backups in ``directory``, oldest first (none if it does not exist)."""
    found = []
    if not directory.is_dir():
        return []
    for path in directory.glob(BACKUP_GLOB):
        try:
            info = path.stat()
        except FileNotFoundError:  # deleted meanwhile
            continue
        parsed = parse_name(path)
        created, kid = parsed if parsed else (int(info.st_mtime * 1000), None)
        found.append(BackupFile(path.name, path, info.st_size, created, kid))
    return sorted(found, key=lambda b: (b.created_at, b.name))


def key_for(config: Config, path: Path, key_file: Path | None = None) -> bytes:
    """The backup key that opens the backup at ``path``.

    With ``key_file``, that key (refused if the backup's name records another
    key id). Otherwise the key whose id the name records, among
    :func:`known_backup_keys`; for a file not named by chatd, the first
    known key that opens it. Raises :class:`BackupError` saying which key is
    needed when it is not at hand, and :class:`SecretFileError` for an
    unsafe key file.
    """
    parsed = parse_name(path)
    wanted = parsed[1] if parsed else None
    if key_file is not None:
        key = read_key_file(key_file)
        if wanted is not None and key_id(key) != wanted:
            raise BackupError(
                f"{path.name} was made with backup key {wanted}, but {key_file} holds "
                f"key {key_id(key)}"
            )
        return key
    keys = known_backup_keys(config)
    if wanted is not None:
        if wanted in keys:
            return keys[wanted]
        raise BackupError(
            f"{path.name} needs backup key {wanted}, which is not in {config.data_dir} "
            f"(neither backup key file nor backup-{wanted}.key); pass --key-file PATH"
        )
    for key in keys.values():
        try:
            close_quietly(connect(path, key, busy_timeout_ms=0, readonly=True))
        except KeyMismatchError:
            continue
        except StoreError:
            return key  # page 1 decrypts, the rest is damaged: verify says how
        return key
    raise BackupError(
        f"none of the backup keys in {config.data_dir} opens {path} (wrong key, or not a "
        "chatd backup); pass --key-file PATH"
    )


def open_backup(path: Path, key: bytes) -> Connection:
    """A read-only connection to a backup, its key proven.

    Raises :class:`BackupError` (the file left as it is) when the file is
    missing, the key does not open it, or it is not a chatd database.
    """
    if not path.is_file():
        raise BackupError(f"{path} does not exist or is not a file")
    try:
        conn = connect(path, key, busy_timeout_ms=0, readonly=True)
    except KeyMismatchError:
        raise BackupError(
            f"backup key {key_id(key)} does not open {path}: wrong key, or not a chatd "
            "backup (the file was left untouched)"
        ) from None
    except StoreError:
        if _looks_plaintext(path):
            raise BackupError(f"{path} is an unencrypted SQLite file, not a chatd backup") from None
        raise BackupError(
            f"{path} is corrupt or truncated: its first page decrypts with backup key "
            f"{key_id(key)}, but its schema cannot be read"
        ) from None
    try:
        found = conn.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'users'"
        ).fetchone()[0]
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    except DatabaseError as exc:
        close_quietly(conn)
        raise BackupError(f"{path} is corrupt: {exc}") from None
    if not found or version < 1:
        close_quietly(conn)
        raise BackupError(f"{path} opens with the key but is not a chatd backup (no chatd schema)")
    return conn


@dataclass(frozen=True)
class VerifyReport:
    path: Path
    key_id: str
    schema_version: int
    rows: dict[str, int]  # table -> row count
    bytes: int


def verify_backup(path: Path, key: bytes) -> VerifyReport:
    """Open a backup with its key and check it: ``PRAGMA cipher_integrity_check``
    (every page's HMAC: tampering or a torn copy), ``PRAGMA integrity_check``
    (the b-trees), then count the rows of each table.

    Raises :class:`BackupError` naming what is wrong: wrong key, not a
    backup, corrupt or truncated.
    """
    conn = open_backup(path, key)
    try:
        cipher = [row[0] for row in conn.execute("PRAGMA cipher_integrity_check").fetchall()]
        if cipher:
            raise BackupError(f"{path} is corrupt (page checks failed: {'; '.join(cipher[:3])})")
        check = [row[0] for row in conn.execute("PRAGMA integrity_check").fetchall()]
        if check != ["ok"]:
            raise BackupError(f"{path} is corrupt (integrity check: {'; '.join(check[:3])})")
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        names = [
            row[0]
            for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT LIKE 'sqlite_%' ORDER BY name"
            ).fetchall()
        ]
        rows = {
            n: int(conn.execute(f"SELECT count(*) FROM {quote(n)}").fetchone()[0])  # noqa: S608
            for n in names
        }
    except DatabaseError as exc:
        raise BackupError(f"{path} is corrupt or truncated: {exc}") from None
    finally:
        close_quietly(conn)
    return VerifyReport(path, key_id(key), version, rows, path.stat().st_size)


def find_user(path: Path, key: bytes, user: str) -> tuple[int, str] | None:
    """(user id, username) of ``user`` in the backup, or None when it does not
    hold that account. ``user`` is a user id (digits) or a username
    (``@digits`` for an all-digit name). Raises :class:`BackupError`."""
    conn = open_backup(path, key)
    try:
        if user.isascii() and user.isdigit():
            row = conn.execute("SELECT id, username FROM users WHERE id = ?", (int(user),))
        else:
            name = normalize_username(user.removeprefix("@"))
            row = conn.execute("SELECT id, username FROM users WHERE username_key = ?", (name,))
        found = row.fetchone()
    except DatabaseError as exc:
        raise BackupError(f"{path} is corrupt or truncated: {exc}") from None
    finally:
        close_quietly(conn)
    return (int(found[0]), str(found[1])) if found else None
