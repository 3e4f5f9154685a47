"""The backup key: its file or systemd credential, its key id, rotation.

Backups are encrypted with their own 256-bit key, never the database key, so
a copy of the backups alone (off the machine) does not open the live
database and the database key alone does not open the backups.

The key comes from the systemd credential ``chatd-backup-key`` when systemd
passes one, otherwise from ``backup.key_file`` (default ``backup.key`` in the
data dir, mode 0600), made by ``chatd init`` or at first start.

Every backup's file name carries the *key id* of the key that encrypted it:
16 hex digits of a SHA-256 over a fixed label and the key. It names a key
without revealing it (the key has 256 random bits), so ``verify`` and
``restore`` can say which key a backup needs. Rotating the backup key
(``chatd backup rotate-key``) keeps the old key file as
``backup-<key id>.key`` beside the new one: old backups stay readable and
new backups use the new key.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import Final

from chatd.backup.copy import fsync_path
from chatd.config import Config
from chatd.errors import SecretFileError
from chatd.keyfiles import credential, read_hex_key, write_private_file

BACKUP_KEY_CREDENTIAL: Final = "chatd-backup-key"
BACKUP_KEY_BYTES: Final = 32  # raw SQLCipher key: 256 bits
KEY_ID_DIGITS: Final = 16  # hex digits of the key id (64 bits: names, does not reveal)
_KEY_ID_LABEL: Final = b"chatd backup key id v1\x00"


def new_backup_key() -> str:
    return secrets.token_bytes(BACKUP_KEY_BYTES).hex()


def key_id(key: bytes) -> str:
    """The public name of a key: what a backup's file name records."""
    return hashlib.sha256(_KEY_ID_LABEL + key).hexdigest()[:KEY_ID_DIGITS]


def backup_key_path(config: Config) -> tuple[Path, bool]:
    """Where the backup key comes from, and whether it is a systemd credential."""
    cred = credential(BACKUP_KEY_CREDENTIAL)
    if cred is not None:
        return cred, True
    return config.in_data_dir(config.backup.key_file), False


def read_key_file(path: Path, *, from_credential: bool = False) -> bytes:
    """A 32-byte key from a 0600 file of 64 hex digits.

    Raises :class:`SecretFileError` when it is missing, unsafe or malformed.
    """
    return read_hex_key(path, "backup key", BACKUP_KEY_BYTES, from_credential=from_credential)


def load_backup_key(config: Config) -> bytes:
    """The current backup key, making its file (mode 0600) when neither it
    nor the credential exists. Raises :class:`SecretFileError`."""
    path, from_cred = backup_key_path(config)
    if not from_cred:
        write_private_file(path, new_backup_key())  # no-op when it exists
    return read_key_file(path, from_credential=from_cred)


def retired_key_path(config: Config, kid: str) -> Path:
    """Where a retired backup key with key id ``kid`` is kept."""
    return config.in_data_dir(f"backup-{kid}.key")


def known_backup_keys(config: Config) -> dict[str, bytes]:
    """Every backup key at hand, by key id: the current one, the retired
    ``backup-<key id>.key`` files in the data dir, and systemd credentials
    named ``chatd-backup-key-<anything>`` (old keys passed to a one-off unit).
    Unreadable or malformed files are skipped; nothing is created."""
    found: list[tuple[Path, bool]] = [backup_key_path(config)]
    found += [(p, False) for p in sorted(config.data_dir.glob("backup-*.key"))]
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if directory:
        found += [(p, True) for p in sorted(Path(directory).glob(BACKUP_KEY_CREDENTIAL + "-*"))]
    keys: dict[str, bytes] = {}
    for path, from_credential in found:
        try:
            key = read_key_file(path, from_credential=from_credential)
        except SecretFileError:
            continue
        keys.setdefault(key_id(key), key)
    return keys


def rotate_backup_key(config: Config) -> tuple[str, str]:
    """Make a new backup key; keep the old one as ``backup-<old id>.key``.

    Returns (old key id, new key id). Order, so that a crash at any point
    loses no key: the old key is first written to its retired name (fsync),
    then the new key goes to a temporary file (fsync) that replaces the
    current one (rename is atomic). Raises :class:`SecretFileError` when the
    key comes from a systemd credential (rotate it there; see
    docs/OPERATIONS.md) or a file cannot be written.
    """
    path, from_cred = backup_key_path(config)
    if from_cred:
        raise SecretFileError(
            f"the backup key comes from the systemd credential {BACKUP_KEY_CREDENTIAL}; "
            "put a new key in the credential's source file and keep the old one as "
            "backup-<key id>.key in the data dir (docs/OPERATIONS.md)"
        )
    old = load_backup_key(config)
    old_id = key_id(old)
    write_private_file(retired_key_path(config, old_id), old.hex())
    if read_key_file(retired_key_path(config, old_id)) != old:
        raise SecretFileError(
            f"{retired_key_path(config, old_id)} exists and holds another key; move it away"
        )
    fresh = new_backup_key()
    temporary = path.with_name(path.name + ".new")
    temporary.unlink(missing_ok=True)
    if not write_private_file(temporary, fresh):  # pragma: no cover - unlinked just above
        raise SecretFileError(f"cannot create {temporary}")
    os.replace(temporary, path)
    fsync_path(path.parent, directory=True)
    return old_id, key_id(bytes.fromhex(fresh))
