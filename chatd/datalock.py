"""The data dir lock: one chatd process at a time works on a data dir.

``chatd serve`` holds an exclusive ``flock`` on ``<data_dir>/chatd.lock`` for
its whole life; ``chatd restore`` and ``chatd rekey`` hold the same lock
while they change the database. So a second daemon on the same data dir,
or a restore or rekey while chatd runs, is refused at once with
:class:`DataDirLockedError` (exit 9), before anything is opened or changed.

Why a lock and not only the admin socket probe the offline commands did
before: a probe finds a daemon only once its admin listener is up and only
if the config names the same listener, and two daemons starting at once both
find nothing. The kernel releases a ``flock`` when its process exits, even by
SIGKILL or a crash, so a lock file left behind never blocks anyone; the file
itself is empty and stays.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from chatd.errors import DataDirError, DataDirLockedError

LOCK_FILE: Final = "chatd.lock"


@contextmanager
def hold_data_dir_lock(data_dir: Path, what: str) -> Iterator[Path]:
    """Hold the exclusive lock on ``data_dir`` for the ``with`` block; yields
    the lock file's path. ``what`` names the command for the refusal (e.g.
    ``"a restore"``).

    Raises :class:`DataDirLockedError` at once (never waits) when another
    process holds it, and :class:`DataDirError` when the lock file cannot be
    opened. Non-blocking, so it may be called on the event loop.
    """
    path = data_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise DataDirError(f"cannot open the lock file {path}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataDirLockedError(
                f"another chatd process (serve, restore or rekey) is using the data dir "
                f"{data_dir}: it holds {path}. Stop it before {what} (systemctl stop chatd)"
            ) from None
        yield path
    finally:
        os.close(fd)  # closing the only descriptor releases the lock
