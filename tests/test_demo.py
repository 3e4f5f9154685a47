"""``chatd demo`` end to end: the real daemon, two real clients, and no plaintext on the server."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from chatd.demo import ALICE_MESSAGES, BOB_REPLY, DemoError, open_daemon
from chatd.demo_files import FILE_LINES, FILE_NAME, FILE_TEXT
from chatd.demo_rooms import ROOM_MESSAGES, ROOM_NAME, ROOM_REPLY
from chatd.inspection import ScanReport, scan_database, scan_files
from chatd.store.db import PLAINTEXT_HEADER, connect

from .conftest import DataDir

SEPARATOR = " │ "


async def chatd_demo(*args: str, columns: int) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "COLUMNS": str(columns)}
    env.pop("CHATD_CONFIG", None)
    with trio.fail_after(60):
        return await trio.run_process(
            [sys.executable, "-m", "chatd", "demo", *args],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


def split_columns(stdout: str) -> tuple[list[str], list[str]]:
    """The left (clients) and right (server) cells of the side-by-side rows."""
    rows = [line.split(SEPARATOR, 1) for line in stdout.splitlines() if SEPARATOR in line]
    return [r[0].rstrip() for r in rows], [r[1] for r in rows]


def temp_dir_of(stdout: str) -> Path:
    found = re.search(r"^  temp dir   (\S+) ", stdout, re.M)
    assert found, stdout
    return Path(found[1])


async def test_the_demo_shows_plaintext_to_clients_and_only_ciphertext_on_the_server() -> None:
    result = await chatd_demo(columns=120)
    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, stdout + stderr
    assert "Traceback" not in stderr
    assert max(len(line) for line in stdout.splitlines()) <= 120
    left, right = split_columns(stdout)
    # Each message shows in plain text twice on the client side: sent, then received.
    for text in ALICE_MESSAGES:
        assert left.count(f"alice → bob: {text}") == 2, stdout
    assert left.count(f"bob → alice: {BOB_REPLY}") == 2, stdout
    assert "alice: 3 of 3 messages delivered ✓" in left
    # The server side holds ciphertext rows (Olm pre-key messages from alice, a
    # normal message from bob) and receipts, never the texts.
    alice_rows = [r for r in right if re.match(r' *\d+ [A-Z2-7]{13} alice +\{"v": 1, "type": 0', r)]
    bob_rows = [r for r in right if re.match(r' *\d+ [A-Z2-7]{13} bob +\{"v": 1, "type": 1', r)]
    assert len(alice_rows) == 3 and len(bob_rows) == 1, stdout
    assert any("(delivered receipt: no content)" in r for r in right)
    for text in (*ALICE_MESSAGES, BOB_REPLY):
        assert not any(text in r for r in right)
    assert "plaintext found in server files: none" in stdout.splitlines()
    assert "daemon stopped by SIGTERM, exit code 0" in stdout
    workdir = temp_dir_of(stdout)
    assert f"removed {workdir}" in stdout
    assert not workdir.exists()


async def test_the_demo_shows_a_room_message_stored_once_as_ciphertext() -> None:
    result = await chatd_demo(columns=120)
    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, stdout + stderr
    left, right = split_columns(stdout)
    # The client cells, wrapped ones joined again (a row whose right cell is
    # empty ends in "│" without the separator's space).
    cells = [line.split(" │", 1)[0] for line in stdout.splitlines() if " │" in line]
    said = " ".join(cell.strip() for cell in cells)
    for text in ROOM_MESSAGES:
        assert f"alice → #{ROOM_NAME}: {text}" in said
        for reader in ("bob", "carol"):
            assert f"{reader} reads alice → #{ROOM_NAME}: {text}" in said, stdout
    assert f"carol reads bob → #{ROOM_NAME}: {ROOM_REPLY}" in said
    assert f"alice reads bob → #{ROOM_NAME}: {ROOM_REPLY}" in said
    assert "alice: each of her room messages delivered to 2 of 2 members ✓" in said
    # Each of alice's room messages is one row of the room log, for both
    # members' devices: Megolm ciphertext, never the text.
    rows = [r for r in right if re.match(r' *\d+ msg +alice +2 \{"v": 1, "session_id": "', r)]
    assert len(rows) == len(ROOM_MESSAGES), stdout
    assert f"room log: {len(ROOM_MESSAGES)} messages stored once each" in " ".join(right)
    assert any(re.match(r' *\d+ msg +bob +1 \{"v": 1, "session_id": "', r) for r in right)
    assert any('{"type":"joined"' in r for r in right)  # room events: server-made metadata
    for text in (*ROOM_MESSAGES, ROOM_REPLY):
        assert not any(text in r for r in right)
    assert "searching the server for the 7 message texts and the 2 lines of budget.txt:" in stdout
    assert "plaintext found in server files: none" in stdout.splitlines()
    workdir = temp_dir_of(stdout)
    assert f"removed {workdir}" in stdout
    assert not workdir.exists()


async def test_keep_leaves_the_temp_dir_and_a_narrow_terminal_gets_100_columns() -> None:
    result = await chatd_demo("--keep", columns=60)
    stdout = result.stdout.decode()
    workdir = temp_dir_of(stdout)
    try:
        assert result.returncode == 0, stdout + result.stderr.decode()
        assert max(len(line) for line in stdout.splitlines()) <= 100
        assert f"kept {workdir}" in stdout
        database = workdir / "server" / "chatd.db"
        assert database.read_bytes()[:16] != PLAINTEXT_HEADER  # SQLCipher, not SQLite
        assert (workdir / "server" / "db.key").stat().st_mode & 0o777 == 0o600
        assert (workdir / "clients" / "alice.db").exists()
        assert "plaintext found in server files: none" in stdout
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def test_the_demo_shows_a_file_the_server_stores_only_as_ciphertext() -> None:
    result = await chatd_demo("--keep", columns=120)
    stdout = result.stdout.decode()
    workdir = temp_dir_of(stdout)
    try:
        assert result.returncode == 0, stdout + result.stderr.decode()
        cells = [line.split(" │", 1)[0] for line in stdout.splitlines() if " │" in line]
        said = " ".join(cell.strip() for cell in cells)
        assert f"alice → #{ROOM_NAME}: [file] {FILE_NAME}" in said
        assert "the same as alice's file ✓" in said
        assert f"carol reads alice → #{ROOM_NAME}: [file] {FILE_NAME}" in said
        # The one blob file on the server: ciphertext named by its SHA-256,
        # shown with its size, and none of the file's text in it.
        (blob,) = (workdir / "server" / "blobs").iterdir()
        data = blob.read_bytes()
        assert hashlib.sha256(data).hexdigest() == blob.name
        assert not any(line.encode() in data for line in FILE_LINES)
        right = split_columns(stdout)[1]
        assert f"  {blob.name[:16]}…  {len(data)} bytes" in right
        assert "  SHA-256 of its bytes = its name ✓" in right
        assert f"  first bytes: {data[:12].hex(' ')}" in right
        assert f"  {FILE_NAME}'s text in it: none: ciphertext only ✓" in right
        assert any(r.startswith(f"  blobs row: owner alice, {len(data)} bytes") for r in right)
        assert not any(line in r for r in right for line in FILE_LINES)
        # Bob's copy, decrypted on his side, is alice's file; the scan looked in blobs/.
        assert (workdir / "clients" / "bob-saved" / FILE_NAME).read_text() == FILE_TEXT
        assert f"blobs/{blob.name[:16]}…" in stdout
        assert "plaintext found in server files: none" in stdout.splitlines()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_help_documents_the_demo() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "chatd", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0
    assert "--keep" in result.stdout
    assert "plaintext found in server files: none" in result.stdout


async def test_a_daemon_that_cannot_start_is_reported_with_its_log(
    data_dir: DataDir, short_tmp: Path
) -> None:
    data_dir.config_path.write_text("[relay]\nport = 'eighty'\n")
    with trio.fail_after(30), pytest.raises(DemoError) as failed:
        async with open_daemon(data_dir.config_path, short_tmp):
            pass  # pragma: no cover - it never starts
    message = str(failed.value)
    assert "the daemon exited with code 3 at start" in message
    assert "relay.port" in message  # the tail of the daemon's own error


def test_the_scans_find_plaintext_in_raw_files_and_in_the_decrypted_database(
    data_dir: DataDir,
) -> None:
    leaked = data_dir.path / "leak.log"
    leaked.write_text(f"oops: {ALICE_MESSAGES[0]}\n")
    report = ScanReport()
    scan_files([data_dir.path], ALICE_MESSAGES, report)
    assert report.found == [f"leak.log: {ALICE_MESSAGES[0]!r}"]
    conn = connect(data_dir.db, data_dir.key, busy_timeout_ms=1000)
    conn.execute("CREATE TABLE notes (body BLOB)")
    conn.execute("INSERT INTO notes VALUES (?)", (f"x {BOB_REPLY} y".encode(),))
    conn.close()
    report = ScanReport()
    scan_database(data_dir.db, data_dir.key, [BOB_REPLY], report)
    assert report.found == [f"table notes: {BOB_REPLY!r}"]
    assert report.tables == 1 and report.values == 1
    # The raw bytes of the encrypted file do not give it away.
    report = ScanReport()
    scan_files([data_dir.db], [BOB_REPLY], report)
    assert report.found == []
