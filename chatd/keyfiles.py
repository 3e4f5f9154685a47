"""Secret files: the database key and the admin token, and the data dir they live in.

A secret comes from a systemd credential when ``$CREDENTIALS_DIRECTORY`` holds
one by the documented name (``LoadCredential=``), otherwise from the file the
config points at. A file that group or others can access is refused: a key
that anyone else on the machine could have read is no longer a secret.

Nothing here logs or returns a secret in an error message.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from pathlib import Path
from typing import Final

from chatd.config import Config
from chatd.errors import DataDirError, SecretFileError

#: systemd credential names (``LoadCredential=NAME:PATH``).
DB_KEY_CREDENTIAL: Final = "chatd-db-key"
ADMIN_TOKEN_CREDENTIAL: Final = "chatd-admin-token"  # noqa: S105 - a file name, not a secret

DB_KEY_BYTES: Final = 32  # raw SQLCipher key: 256 bits
ADMIN_TOKEN_BYTES: Final = 32  # 256 bits from the CSPRNG
_MAX_SECRET_FILE: Final = 4_096  # bytes; a secret file is a single short line


def _credential(name: str) -> Path | None:
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if directory:
        candidate = Path(directory) / name
        if candidate.exists():
            return candidate
    return None


def _read_private(path: Path, what: str, *, from_credential: bool) -> str:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise SecretFileError(
            f"{what} file {path} does not exist (run 'chatd init' to create one)"
        ) from None
    except PermissionError:
        raise SecretFileError(f"{what} file {path}: permission denied") from None
    if not stat.S_ISREG(info.st_mode):
        raise SecretFileError(f"{what} file {path} is not a regular file")
    # systemd credentials are placed by systemd with safe permissions already.
    if not from_credential and info.st_mode & 0o077:
        raise SecretFileError(
            f"{what} file {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); run: chmod 600 {path}"
        )
    if info.st_size > _MAX_SECRET_FILE:
        raise SecretFileError(f"{what} file {path} is too large to be a {what}")
    try:
        return path.read_text(encoding="ascii").strip()
    except PermissionError:
        raise SecretFileError(f"{what} file {path}: permission denied") from None
    except UnicodeDecodeError:
        raise SecretFileError(f"{what} file {path} is not ASCII text") from None


def db_key_path(config: Config) -> tuple[Path, bool]:
    """Where the database key comes from, and whether it is a systemd credential."""
    cred = _credential(DB_KEY_CREDENTIAL)
    if cred is not None:
        return cred, True
    return config.in_data_dir(config.store.key_file), False


def read_hex_key(
    path: Path, what: str, size: int, *, from_credential: bool, hint: str | None = None
) -> bytes:
    """A ``size``-byte key from a private file (or systemd credential) of
    ``2 * size`` hex digits. Raises :class:`SecretFileError` when the file is
    missing, unsafe or malformed; the message names ``what`` and, if given,
    what to do (``hint``)."""
    text = _read_private(path, what, from_credential=from_credential)
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != size:
        advice = f" ({hint})" if hint else ""
        raise SecretFileError(f"{what} file {path} must hold exactly {size * 2} hex digits{advice}")
    return key


def credential(name: str) -> Path | None:
    """The systemd credential ``name`` (in $CREDENTIALS_DIRECTORY), if passed."""
    return _credential(name)


def load_db_key(config: Config) -> bytes:
    """Return the raw 32-byte database key.

    Raises :class:`SecretFileError` when the file is missing, unsafe, or not
    exactly 64 hex digits.
    """
    path, from_cred = db_key_path(config)
    return read_hex_key(
        path,
        "database key",
        DB_KEY_BYTES,
        from_credential=from_cred,
        hint="generate one with: chatd init",
    )


def admin_token_path(config: Config) -> tuple[Path, bool]:
    cred = _credential(ADMIN_TOKEN_CREDENTIAL)
    if cred is not None:
        return cred, True
    return config.in_data_dir(config.admin.token_file), False


def hash_admin_token(token: str) -> bytes:
    """SHA-256 of a token. Tokens carry 256 random bits, so a fast hash suffices."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def load_admin_token_hash(config: Config) -> bytes:
    """Read the admin token and return only its SHA-256; the token itself is dropped."""
    path, from_cred = admin_token_path(config)
    token = _read_private(path, "admin token", from_credential=from_cred)
    if len(token) < 32:
        raise SecretFileError(f"admin token file {path} holds a token that is too short")
    return hash_admin_token(token)


def new_db_key() -> str:
    return secrets.token_bytes(DB_KEY_BYTES).hex()


def new_admin_token() -> str:
    return secrets.token_urlsafe(ADMIN_TOKEN_BYTES)


def write_private_file(path: Path, text: str) -> bool:
    """Create ``path`` with mode 0600 holding ``text``. Never overwrites.

    Returns False (and leaves the file alone) when it already exists.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(text + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return True


def check_data_dir(path: Path) -> None:
    """Refuse a data dir that is missing, not ours, or writable by group/others."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise DataDirError(
            f"data dir {path} does not exist (create it with 'chatd init --data-dir {path}')"
        ) from None
    if not stat.S_ISDIR(info.st_mode):
        raise DataDirError(f"data dir {path} is not a directory")
    if info.st_uid != os.geteuid():
        raise DataDirError(
            f"data dir {path} is owned by uid {info.st_uid}, but chatd runs as uid "
            f"{os.geteuid()}; chown it to the chatd user"
        )
    if info.st_mode & 0o022:
        raise DataDirError(
            f"data dir {path} is writable by group or others "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); run: chmod 700 {path}"
        )


# -- the blob URL signing key ([attachments]) ----------------------------------------

BLOB_KEY_CREDENTIAL: Final = "chatd-blob-key"
BLOB_KEY_BYTES: Final = 32  # HMAC-SHA256 key: 256 bits from the CSPRNG


def blob_key_path(config: Config) -> tuple[Path, bool]:
    """Where the blob URL key comes from, and whether it is a systemd credential."""
    cred = _credential(BLOB_KEY_CREDENTIAL)
    if cred is not None:
        return cred, True
    return config.in_data_dir(config.attachments.key_file), False


def new_blob_key() -> str:
    return secrets.token_bytes(BLOB_KEY_BYTES).hex()


def load_blob_key(config: Config) -> bytes:
    """Return the 32-byte key that signs blob URLs, making the file (mode
    0600) at first start when neither it nor the credential exists.

    Raises :class:`SecretFileError` when the file is unsafe or not exactly 64
    hex digits.
    """
    path, from_cred = blob_key_path(config)
    if not from_cred:
        write_private_file(path, new_blob_key())  # no-op when it exists
    return read_hex_key(
        path,
        "blob URL key",
        BLOB_KEY_BYTES,
        from_credential=from_cred,
        hint="delete it and restart chatd to make a new one; issued URLs stop working",
    )


# -- the server's Ed25519 signing key ([privacy]: erasure receipts) ---------------------

SIGNING_KEY_CREDENTIAL: Final = "chatd-signing-key"
SIGNING_KEY_BYTES: Final = 32  # an Ed25519 seed: 256 bits from the CSPRNG


def signing_key_path(config: Config) -> tuple[Path, bool]:
    """Where the signing key comes from, and whether it is a systemd credential."""
    cred = _credential(SIGNING_KEY_CREDENTIAL)
    if cred is not None:
        return cred, True
    return config.in_data_dir(config.privacy.signing_key_file), False


def new_signing_key() -> str:
    return secrets.token_bytes(SIGNING_KEY_BYTES).hex()


def load_signing_seed(config: Config) -> bytes:
    """Return the 32-byte Ed25519 seed that signs erasure receipts, making the
    file (mode 0600) at first start when neither it nor the credential exists.

    Raises :class:`SecretFileError` when the file is unsafe or not exactly 64
    hex digits.
    """
    path, from_cred = signing_key_path(config)
    if not from_cred:
        write_private_file(path, new_signing_key())  # no-op when it exists
    return read_hex_key(
        path,
        "signing key",
        SIGNING_KEY_BYTES,
        from_credential=from_cred,
        hint="restore it from a backup: receipts signed with it verify only against it",
    )
