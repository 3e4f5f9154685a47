"""Which backups still hold an account, live or erased (``GET /v1/backups/holding``).

An account is named by its user id *and* its creation time. Ids were reused
before migration 13 (an erased highest id went to the next account), so an
id alone could match another person in an old backup; the pair cannot. For
a live account the pair comes from ``users``; for an erased one, from its
erasure receipt (``user_id`` and ``account_created_at``), since the purge
left nothing else.

:func:`scan_backups` opens each backup in ``backup.directory`` read-only with
its backup key (:func:`chatd.backup.archive.key_for`) and looks the ids up in
its ``users`` table, a chunk at a time. It is blocking: the daemon runs it in
a worker thread, on connections of its own, never on the event loop or the
store's writer. A backup whose key is not at hand, or that cannot be read,
is reported as unchecked, never silently skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from chatd.backup.archive import key_for, list_backups, open_backup
from chatd.config import Config
from chatd.errors import BackupError, SecretFileError
from chatd.store.db import DatabaseError, close_quietly

ID_CHUNK: Final = 500  # user ids per lookup (SQLite's default limit is 32766 parameters)


@dataclass(frozen=True)
class Account:
    """One account, as a receipt or the users table names it."""

    user_id: int
    created_at: int  # unix ms
    receipt_id: int | None = None  # the erasure receipt; None for a live account


@dataclass
class Holding:
    accounts: dict[Account, list[str]]  # account -> backup files holding it, oldest first
    checked: int = 0
    unchecked: list[tuple[str, str]] = field(default_factory=list)  # (file, why)


def accounts_from_receipts(rows: list[tuple[int, str]]) -> list[Account]:
    """Accounts named by erasure receipts: rows of (receipt id, receipt JSON)."""
    found = []
    for receipt_id, document in rows:
        receipt: dict[str, Any] = msgspec.json.decode(document)["receipt"]
        found.append(Account(receipt["user_id"], receipt["account_created_at"], receipt_id))
    return found


def scan_backups(config: Config, accounts: list[Account]) -> Holding:
    """Open every backup and list the ones holding each account (blocking)."""
    result = Holding({a: [] for a in accounts})
    by_id: dict[int, list[Account]] = {}
    for account in accounts:
        by_id.setdefault(account.user_id, []).append(account)
    ids = sorted(by_id)
    for backup in list_backups(config.backups_dir):
        try:
            conn = open_backup(backup.path, key_for(config, backup.path))
        except (BackupError, SecretFileError) as exc:
            result.unchecked.append((backup.name, str(exc)))
            continue
        try:
            for start in range(0, len(ids), ID_CHUNK):
                chunk = ids[start : start + ID_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(
                    f"SELECT id, created_at FROM users WHERE id IN ({marks})",  # noqa: S608 - only ?s
                    chunk,
                ).fetchall()
                for user_id, created_at in rows:
                    for account in by_id[int(user_id)]:
                        if account.created_at == int(created_at):
                            result.accounts[account].append(backup.name)
        except DatabaseError as exc:
            result.unchecked.append((backup.name, f"corrupt or truncated: {exc}"))
            continue
        finally:
            close_quietly(conn)
        result.checked += 1
    return result
