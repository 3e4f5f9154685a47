"""``chatd backup list|verify|holding|rotate-key``, ``chatd restore`` and ``chatd rekey``.

These run on the server machine, as the chatd user, next to the data dir:
they read the key files themselves. ``restore`` and ``rekey`` need the daemon
stopped: they hold the data dir lock (:mod:`chatd.datalock`) that ``chatd
serve`` holds while it runs, and also refuse while its admin socket answers.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from pathlib import Path
from typing import Any, Final

from chatd.auth.user_ids import highest_user_id_issued, raise_high_water
from chatd.backup.archive import find_user, key_for, list_backups, verify_backup
from chatd.backup.copy import copy_database, fsync_path
from chatd.backup.keys import rotate_backup_key
from chatd.config import Config
from chatd.datalock import hold_data_dir_lock
from chatd.errors import BackupError, KeyMismatchError, SecretFileError, StoreError, UsageError
from chatd.keyfiles import (
    DB_KEY_BYTES,
    check_data_dir,
    credential,
    db_key_path,
    load_db_key,
    new_db_key,
    read_hex_key,
    write_private_file,
)
from chatd.store.db import DatabaseError, close_quietly, connect, open_writer
from chatd.store.migrations import SCHEMA_VERSION

COMMANDS: Final = ("backup", "restore", "rekey")
#: The systemd credential a new database key may come in as (``chatd rekey``).
NEW_DB_KEY_CREDENTIAL: Final = "chatd-db-key-new"


def add_commands(sub: Any, config_arg: Any) -> None:
    """Add ``backup``, ``restore`` and ``rekey`` to the ``chatd`` parser."""
    backup = sub.add_parser("backup", help="list, verify and inspect backups; rotate their key")
    b = backup.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = b.add_parser("list", help="the backups in backup.directory and the key each needs")
    config_arg(p)
    p = b.add_parser("verify", help="check a backup with its key; show its schema and row counts")
    config_arg(p)
    p.add_argument("file", type=Path)
    p.add_argument("--key-file", type=Path, help="the backup key (default: found by key id)")
    p = b.add_parser("holding", help="which backups still hold an account (after an erasure)")
    config_arg(p)
    p.add_argument("user", help="user id, or username (@123 for an all-digit name)")
    p = b.add_parser("rotate-key", help="new backup key for new backups; keep the old one")
    config_arg(p)
    p = sub.add_parser("restore", help="replace the database with a backup (daemon stopped)")
    config_arg(p)
    p.add_argument("file", type=Path)
    p.add_argument("--key-file", type=Path, help="the backup key (default: found by key id)")
    p = sub.add_parser("rekey", help="re-encrypt the database under a new key (daemon stopped)")
    config_arg(p)
    new = p.add_mutually_exclusive_group()
    new.add_argument(
        "--new-key-file",
        type=Path,
        help="0600 file with the new key, 64 hex digits (default: the systemd credential "
        f"{NEW_DB_KEY_CREDENTIAL})",
    )
    new.add_argument(
        "--generate", action="store_true", help="write a new key to <key file>.new and use it"
    )


def run_command(args: argparse.Namespace, config: Config) -> int:
    check_data_dir(config.data_dir)
    if args.command == "restore":
        with hold_data_dir_lock(config.data_dir, "a restore"):
            return restore(config, args.file, args.key_file)
    if args.command == "rekey":
        with hold_data_dir_lock(config.data_dir, "a rekey"):
            return rekey(config, args.new_key_file, generate=args.generate)
    if args.action == "list":
        return _list(config)
    if args.action == "verify":
        return _verify(config, args.file, args.key_file)
    if args.action == "holding":
        return _holding(config, args.user)
    old, new = rotate_backup_key(config)
    print(f"new backups use backup key {new}")
    print(f"backups made before use key {old}, kept as {config.in_data_dir(f'backup-{old}.key')}")
    return 0


def _list(config: Config) -> int:
    files = list_backups(config.backups_dir)
    print(f"backups in {config.backups_dir}: {len(files)}")
    for f in files:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(f.created_at / 1000))
        print(f"  {f.name}  {f.bytes} bytes  {when}Z  key {f.key_id or '?'}")
    return 0


def _verify(config: Config, path: Path, key_file: Path | None) -> int:
    report = verify_backup(path, key_for(config, path, key_file))
    print(f"backup  {report.path} ({report.bytes} bytes)")
    print(f"key     {report.key_id}")
    print(f"schema  version {report.schema_version} (this chatd knows up to {SCHEMA_VERSION})")
    print("checks  cipher_integrity_check ok, integrity_check ok")
    width = max(map(len, report.rows), default=0)
    for table, count in report.rows.items():
        print(f"  {table.ljust(width)}  {count}")
    print(f"  {'total'.ljust(width)}  {sum(report.rows.values())}")
    return 0


def _holding(config: Config, user: str) -> int:
    files = list_backups(config.backups_dir)
    holding, unchecked = [], []
    for f in files:
        try:
            found = find_user(f.path, key_for(config, f.path), user)
        except (BackupError, SecretFileError) as exc:
            unchecked.append(f"{f.name}: {exc}")
            continue
        if found is not None:
            holding.append(f"{f.name} (user {found[0]}, {found[1]})")
    print(f"{len(holding)} of {len(files)} backup(s) in {config.backups_dir} hold {user}:")
    for line in holding:
        print(f"  {line}")
    if unchecked:
        print(f"{len(unchecked)} backup(s) could not be checked:")
        for line in unchecked:
            print(f"  {line}")
        return BackupError.exit_code
    return 0


def refuse_if_running(config: Config, what: str) -> None:
    """Raise :class:`BackupError` when chatd answers on its admin listener."""
    address: Any
    if config.admin_unix_socket is not None:
        family, address = socket.AF_UNIX, str(config.admin_unix_socket)
        if not config.admin_unix_socket.exists():
            return
    elif config.admin_tcp is not None:  # pragma: no branch - one of the two is set
        host, port = config.admin_tcp
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        address = (host, port)
    probe = socket.socket(family, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(address)
    except OSError:
        return  # nothing listens: stopped (a stale socket file is harmless)
    finally:
        probe.close()
    raise BackupError(
        f"chatd is running (its admin API answers at {config.admin.listen}); stop it "
        f"before {what} (systemctl stop chatd)"
    )


def _stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def _sidecars(db: Path) -> list[Path]:
    return [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]


def restore(config: Config, path: Path, key_file: Path | None) -> int:
    """Replace the database with the backup at ``path``.

    Order: refuse while chatd runs; verify the backup with its key; refuse a
    newer schema; note the highest user id the current database issued (so
    the restored one never issues those ids again); copy it into
    ``<database>.restoring`` under the database key; move the current
    database and its -wal/-shm aside to ``<database>.before-restore-<time>``;
    put the copy in place; open it as the daemon would (WAL, migrations) and
    raise its user id mark. If that open fails, the restored copy
    is removed and the previous database moved back. The set-aside database
    is never deleted: the admin removes it once satisfied.
    """
    refuse_if_running(config, "a restore")
    key = key_for(config, path, key_file)
    report = verify_backup(path, key)
    if report.schema_version > SCHEMA_VERSION:
        raise BackupError(
            f"{path} has schema version {report.schema_version}, but this chatd knows up to "
            f"{SCHEMA_VERSION}; restore it with the newer chatd that made it (nothing changed)"
        )
    db_key = load_db_key(config)
    db = config.database_path
    issued = _user_ids_issued(db, db_key)
    staged = db.with_name(db.name + ".restoring")
    staged.unlink(missing_ok=True)  # left by a crashed restore
    copy_database(path, key, staged, db_key, chunk_rows=config.backup.chunk_rows)
    aside = db.with_name(f"{db.name}.before-restore-{_stamp()}")
    moved: list[tuple[Path, Path]] = []
    placed = False
    try:
        for current, kept in zip(_sidecars(db), _sidecars(aside), strict=True):
            if current.exists():
                os.rename(current, kept)
                moved.append((current, kept))
        os.rename(staged, db)
        placed = True
        fsync_path(db.parent, directory=True)
        conn = open_writer(db, db_key, busy_timeout_ms=config.store.busy_timeout_ms)
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        raise_high_water(conn, issued)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        close_quietly(conn)
    except BaseException:
        staged.unlink(missing_ok=True)
        if placed:  # every original was moved aside: what is there now is the copy's
            for restored in _sidecars(db):
                restored.unlink(missing_ok=True)
        for current, kept in moved:
            os.rename(kept, current)
        fsync_path(db.parent, directory=True)
        raise
    print(f"restored {path} (backup key {report.key_id}) into {db}")
    print(f"  schema version {report.schema_version} -> {version} (migrated on open)")
    print(f"  {sum(report.rows.values())} rows in {len(report.rows)} tables")
    if moved:
        print(f"  the previous database is kept as {aside} (delete it when satisfied)")
    print("start chatd again: systemctl start chatd")
    return 0


def _user_ids_issued(db: Path, key: bytes) -> int:
    """The highest user id the database being replaced issued (0 when it is
    missing or unreadable): ids issued after the backup are not issued again."""
    if not db.exists():
        return 0
    try:
        conn = connect(db, key, busy_timeout_ms=0, readonly=True)
    except StoreError:
        return 0
    try:
        return highest_user_id_issued(conn)
    except DatabaseError:
        return 0
    finally:
        close_quietly(conn)


def _opens(db: Path, key: bytes) -> bool:
    try:
        close_quietly(connect(db, key, busy_timeout_ms=0, readonly=True))
    except KeyMismatchError:
        return False
    return True


def rekey(config: Config, new_key_file: Path | None, *, generate: bool) -> int:
    """Re-encrypt the database under a new key with ``PRAGMA rekey``, daemon stopped.

    Crash safety, step by step:

    1. The old key opens the database (open_writer: migrations, WAL); a
       TRUNCATE checkpoint moves every WAL frame into the file, and the
       journal mode becomes DELETE, so nothing old-key stays in a WAL that a
       later open would replay into a new-key file.
    2. ``PRAGMA rekey`` rewrites every page in ONE transaction, behind a
       rollback journal: killed here, the next open with the old key (still
       the configured one) rolls the journal back. Take a backup first all
       the same (docs/OPERATIONS.md).
    3. The new key must open the database (and WAL mode is set back); the
       old one must not.
    4. Only then is the old key file renamed to ``<key file>.retired-<time>``
       and the new key put in its place. Killed between 2 and 4, chatd
       refuses to start with exit 2 (wrong key), nothing lost: running
       ``chatd rekey`` again with the same new key file finds the database
       already under the new key and finishes step 4.

    With a systemd credential the key file cannot be moved from here; the
    admin swaps the credential's source (the output says so).
    """
    refuse_if_running(config, "a rekey")
    old_path, from_cred = db_key_path(config)
    old = load_db_key(config)
    if generate:
        new_key_file = config.in_data_dir(config.store.key_file + ".new")
        if not write_private_file(new_key_file, new_db_key()):
            raise SecretFileError(f"{new_key_file} exists; move it away or pass --new-key-file")
    new_from_cred = False
    if new_key_file is None:
        new_key_file = credential(NEW_DB_KEY_CREDENTIAL)
        new_from_cred = True
        if new_key_file is None:
            raise UsageError(
                "chatd rekey: give the new key with --new-key-file PATH, --generate, or "
                f"the systemd credential {NEW_DB_KEY_CREDENTIAL}"
            )
    new = read_hex_key(
        new_key_file, "new database key", DB_KEY_BYTES, from_credential=new_from_cred
    )
    if new == old:
        raise SecretFileError(f"{new_key_file} holds the current key; make a new one")
    db = config.database_path
    busy = config.store.busy_timeout_ms
    if _opens(db, old):
        conn = open_writer(db, old, busy_timeout_ms=busy)
        try:
            blocked = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            if blocked:
                raise StoreError(f"cannot checkpoint {db}: is another process using it?")
            conn.execute("PRAGMA journal_mode = DELETE")
            conn.execute(f"PRAGMA rekey = \"x'{new.hex()}'\"")
        finally:
            close_quietly(conn)
    elif not _opens(db, new):
        raise KeyMismatchError(db)
    close_quietly(open_writer(db, new, busy_timeout_ms=busy))  # WAL again; proves the key
    if _opens(db, old):  # pragma: no cover - SQLCipher rekeyed every page
        raise StoreError(f"{db} still opens with the old key; the rekey did not happen")
    print(f"the database {db} is now encrypted with the key in {new_key_file}")
    if from_cred or new_from_cred:
        print(
            "the keys are systemd credentials, which chatd cannot move: now keep the old "
            "source file of chatd-db-key aside and put the new key in its place, e.g. "
            "mv /etc/chatd/db.key /etc/chatd/db.key.retired && "
            "mv /etc/chatd/db.key.new /etc/chatd/db.key (docs/OPERATIONS.md)"
        )
        return 0
    retired = old_path.with_name(f"{old_path.name}.retired-{_stamp()}")
    os.rename(old_path, retired)
    if new_key_file.resolve() != old_path.resolve():
        try:
            os.rename(new_key_file, old_path)
        except OSError:  # another filesystem: write a copy, keep the given file
            write_private_file(old_path, new.hex())
    fsync_path(old_path.parent, directory=True)
    print(f"  {old_path} now holds the new key; the old key is kept as {retired}")
    print("  the retired key opens only copies of the database from before this rekey")
    print("  (backups use the backup key); delete it when no such copy is left")
    return 0
