"""The content-addressed blob files: ``<data_dir>/blobs/<blob_id>``.

An upload streams into ``.part-<random>`` in the same directory; once its
size and SHA-256 check out it is fsynced, renamed to its blob id (atomic on
one filesystem) and the directory is fsynced. A blob file therefore exists
whole or not at all; a ``.part-`` file is an upload in progress or one a
crash cut off, and is deleted when the upload fails or, after a crash, by
the retention job. Every call here blocks on the filesystem: callers run
them in a worker thread.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from chatd.blobs.signing import BLOB_ID

PART_PREFIX: Final = ".part-"


class BlobFiles:
    """The blob directory; made (mode 0700) when missing."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def ensure(self) -> None:
        self.directory.mkdir(mode=0o700, exist_ok=True)

    def path(self, blob_id: str) -> Path:
        if not BLOB_ID.fullmatch(blob_id):
            raise ValueError("not a blob id")
        return self.directory / blob_id

    def new_part(self) -> tuple[Path, int]:
        """A new, empty upload file (mode 0600) and its open descriptor."""
        path = self.directory / f"{PART_PREFIX}{secrets.token_hex(16)}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        return path, fd

    @staticmethod
    def write_all(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def finish(self, part: Path, fd: int, blob_id: str) -> None:
        """Make the upload durable under its blob id (fsync, rename, fsync dir)."""
        os.fsync(fd)
        os.close(fd)
        os.replace(part, self.path(blob_id))
        self.sync_dir()

    def sync_dir(self) -> None:
        dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    @staticmethod
    def discard(part: Path, fd: int | None) -> None:
        """Drop an upload that failed."""
        if fd is not None:
            os.close(fd)
        part.unlink(missing_ok=True)

    def remove(self, blob_id: str) -> int:
        """Delete a blob file; the bytes freed (0 if it was gone)."""
        path = self.path(blob_id)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size

    def entries(self) -> Iterator[tuple[str, float, int]]:
        """(name, mtime, size) of every file in the directory."""
        try:
            with os.scandir(self.directory) as it:
                for entry in it:
                    if entry.is_file(follow_symlinks=False):
                        st = entry.stat(follow_symlinks=False)
                        yield entry.name, st.st_mtime, st.st_size
        except FileNotFoundError:
            return

    def remove_name(self, name: str) -> int:
        """Delete a file of the directory by name (an orphan or a stale part)."""
        if "/" in name or name in (".", ".."):
            raise ValueError("not a file name")
        path = self.directory / name
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size
