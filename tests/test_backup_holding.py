"""After an erasure: user ids are never reused, and the backups that still
hold the erased account are found (``GET /v1/backups/holding``, ``chatctl
backup holding``), on a real daemon with real SQLCipher backups.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from chatd.auth.user_ids import next_user_id
from chatd.store.migrations import SCHEMA_VERSION, migrate

from .conftest import DataDir
from .test_gdpr import ERASED, scene


async def test_an_erased_accounts_id_is_never_given_to_a_new_account(
    data_dir: DataDir, short_tmp: Path
) -> None:
    async with scene(data_dir, short_tmp, erasure_grace_days=0) as s:
        her = s.ids[ERASED]
        assert her == max(s.ids.values())  # the highest id: the one a rowid would reuse
        await s.ok("DELETE", f"/v1/users/{her}")
        run = await s.ok("POST", "/v1/retention/run", json={"jobs": ["erasure"]})
        assert run["reports"][0]["rows_purged"] > 0
        assert await s.rows("SELECT id FROM users WHERE id = ?", her) == []
        carol = await s.ok(
            "POST", "/v1/users", json={"username": "carol", "password": "carol's long password"}
        )
        assert carol["id"] == her + 1
        (mark,) = await s.rows("SELECT last_id FROM user_id_high_water")
        assert mark == (her + 1,)


def test_the_migration_seeds_the_high_water_mark_from_receipts_and_users() -> None:
    """An old database whose highest id was already erased (and maybe reused):
    the mark starts above every id a receipt or an account names."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    migrate(conn, target=SCHEMA_VERSION - 1)
    conn.execute(
        "INSERT INTO users (id, username, username_key, role, password_hash,"
        " password_changed_at, created_at) VALUES (3, 'a', 'a', 'user', 'h', 0, 0)"
    )
    conn.execute("INSERT INTO erasure_receipts (user_id, erased_at, receipt) VALUES (7, 1, '{}')")
    migrate(conn)
    assert next_user_id(conn) == 8
    # An insert made elsewhere (a hand-made row, an old tool) still moves the mark.
    conn.execute(
        "INSERT INTO users (id, username, username_key, role, password_hash,"
        " password_changed_at, created_at) VALUES (20, 'b', 'b', 'user', 'h', 0, 0)"
    )
    conn.execute("DELETE FROM users WHERE id = 20")
    assert next_user_id(conn) == 21
