"""Secret files and the data dir: refused when unsafe, never overwritten."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from chatd.errors import DataDirError, SecretFileError
from chatd.keyfiles import (
    check_data_dir,
    hash_admin_token,
    load_admin_token_hash,
    load_db_key,
    write_private_file,
)

from .conftest import DataDir


def test_the_generated_key_and_token_load(data_dir: DataDir) -> None:
    config = data_dir.config
    assert load_db_key(config) == data_dir.key
    assert load_admin_token_hash(config) == hash_admin_token(data_dir.token)
    for name in ("db.key", "admin-token"):
        assert (data_dir.path / name).stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_a_key_file_others_can_read_is_refused(data_dir: DataDir, mode: int) -> None:
    key = data_dir.path / "db.key"
    os.chmod(key, mode)
    with pytest.raises(SecretFileError) as info:
        load_db_key(data_dir.config)
    assert "chmod 600" in str(info.value)
    assert data_dir.key_hex not in str(info.value)
    assert info.value.exit_code == 4


@pytest.mark.parametrize("content", ["", "abc", "zz" * 32, "ab" * 31, "ab" * 33])
def test_a_malformed_key_is_refused_without_echoing_it(data_dir: DataDir, content: str) -> None:
    key = data_dir.path / "db.key"
    key.unlink()
    write_private_file(key, content)
    with pytest.raises(SecretFileError, match="64 hex digits") as info:
        load_db_key(data_dir.config)
    if content:
        assert content not in str(info.value)


def test_a_missing_key_says_how_to_make_one(data_dir: DataDir) -> None:
    (data_dir.path / "db.key").unlink()
    with pytest.raises(SecretFileError, match="chatd init"):
        load_db_key(data_dir.config)


def test_systemd_credentials_take_precedence(
    data_dir: DataDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    other = "cd" * 32
    (creds / "chatd-db-key").write_text(other + "\n")
    (creds / "chatd-admin-token").write_text("t" * 43 + "\n")
    # systemd sets the credential's mode itself; a 0644 file there is accepted.
    os.chmod(creds / "chatd-db-key", 0o644)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert load_db_key(data_dir.config) == bytes.fromhex(other)
    assert load_admin_token_hash(data_dir.config) == hash_admin_token("t" * 43)


def test_a_short_admin_token_is_refused(data_dir: DataDir) -> None:
    token = data_dir.path / "admin-token"
    token.unlink()
    write_private_file(token, "short")
    with pytest.raises(SecretFileError, match="too short"):
        load_admin_token_hash(data_dir.config)


def test_private_files_are_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    assert write_private_file(path, "first") is True
    assert write_private_file(path, "second") is False
    assert path.read_text() == "first\n"
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_data_dir_writable_by_others_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "d"
    directory.mkdir()
    os.chmod(directory, 0o777)
    with pytest.raises(DataDirError, match="chmod 700") as info:
        check_data_dir(directory)
    assert info.value.exit_code == 6


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a directory away")
def test_a_data_dir_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "d"
    directory.mkdir(mode=0o700)
    os.chown(directory, 12345, 12345)
    with pytest.raises(DataDirError, match="owned by uid 12345"):
        check_data_dir(directory)


def test_a_missing_data_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataDirError, match="does not exist"):
        check_data_dir(tmp_path / "nope")
