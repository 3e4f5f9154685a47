"""Shared fixtures: real data dirs with real secret files, in short temp paths.

Unix socket paths are limited to about 100 bytes, so data dirs live directly
under the system temp dir rather than under pytest's deeper tmp_path.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chatd.config import Config, load_config
from chatd.keyfiles import new_admin_token, new_db_key, write_private_file

REPO = Path(__file__).resolve().parent.parent


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def write_config(data_dir: Path, settings: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for section, values in settings.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    path = data_dir / "chatd.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class DataDir:
    """A data dir made the way ``chatd init`` makes one, with a test config."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.key_hex = new_db_key()
        self.token = new_admin_token()
        write_private_file(path / "db.key", self.key_hex)
        write_private_file(path / "admin-token", self.token)
        self.configure()

    def configure(self, **sections: dict[str, Any]) -> Config:
        settings: dict[str, dict[str, Any]] = {
            "server": {"data_dir": ".", "shutdown_grace_seconds": 5.0},
            "relay": {"port": 0},
            "admin": {"listen": "unix:a.sock"},
            "retention": {"interval_seconds": 3600.0, "jitter_seconds": 0.0},
            "attachments": {"port": 0},
        }
        for name, values in sections.items():
            settings.setdefault(name, {}).update(values)
        self.config_path = write_config(self.path, settings)
        return self.config

    @property
    def config(self) -> Config:
        return load_config(self.config_path)

    @property
    def key(self) -> bytes:
        return bytes.fromhex(self.key_hex)

    @property
    def db(self) -> Path:
        return self.path / "chatd.db"


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="chatd-"))
    os.chmod(path, 0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def data_dir(short_tmp: Path) -> DataDir:
    return DataDir(short_tmp)
