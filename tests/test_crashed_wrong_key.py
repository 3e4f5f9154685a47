"""Defect 5 of issue 14: a wrong key after a crash must not touch the files.

A subprocess opens the database the way the daemon's writer does, commits
writes in WAL mode and dies with ``os._exit`` (no close, no checkpoint), as
after ``kill -9``: a ``-wal`` and ``-shm`` stay beside ``chatd.db``. Then
``chatd serve`` with a wrong key must exit 2 and leave all three files as
they were, byte for byte and mtime for mtime; with the right key it then
starts and finds every committed row.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from chatd.store.db import open_reader

from .conftest import DataDir
from .test_daemon import run_chatd

#: Writes rows the way the writer does, then dies without closing (no checkpoint).
CRASHING_WRITER = """
import os, sys
from pathlib import Path
from chatd.store.db import open_writer
conn = open_writer(Path(sys.argv[1]), bytes.fromhex(sys.argv[2]), busy_timeout_ms=1000)
conn.execute("PRAGMA wal_autocheckpoint = 0")
conn.execute("CREATE TABLE crash_probe (n INTEGER, body BLOB)")
for n in range(50):
    conn.execute("INSERT INTO crash_probe VALUES (?, randomblob(4000))", (n,))
os._exit(0)
"""


def snapshot(db: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime (ns) of the database and its -wal and -shm."""
    files = {}
    for suffix in ("", "-wal", "-shm"):
        path = Path(f"{db}{suffix}")
        files[path.name] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return files


def test_a_wrong_key_after_a_crash_leaves_the_db_wal_and_shm_untouched(
    data_dir: DataDir,
) -> None:
    crashed = subprocess.run(  # noqa: S603 - our own interpreter and script
        [sys.executable, "-c", CRASHING_WRITER, str(data_dir.db), data_dir.key_hex],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert crashed.returncode == 0, crashed.stderr
    wal = Path(f"{data_dir.db}-wal")
    assert wal.stat().st_size > 100_000  # the rows are in the WAL, not in chatd.db
    before = snapshot(data_dir.db)
    listing = sorted(os.listdir(data_dir.path))
    right_key = data_dir.key_hex
    (data_dir.path / "db.key").write_text("ab" * 32 + "\n")
    for command in ("serve", "check-config"):
        result = run_chatd(command, "--config", str(data_dir.config_path))
        assert result.returncode == 2, result.stderr
        assert f"the database key does not match {data_dir.db}" in result.stderr
        assert snapshot(data_dir.db) == before, command
        # The only new file may be serve's empty data-dir lock (chatd.datalock).
        assert sorted(set(os.listdir(data_dir.path)) - {"chatd.lock"}) == listing
    # The right key still finds every row the crashed writer committed.
    conn = open_reader(data_dir.db, bytes.fromhex(right_key), busy_timeout_ms=1000)
    try:
        assert conn.execute("SELECT count(*) FROM crash_probe").fetchone()[0] == 50
    finally:
        conn.close()
