"""Making an account row: the one place that inserts into ``users``.

A user id is never handed out twice. ``users.id`` is a plain SQLite rowid,
which, left to itself, reuses the highest id once that row is deleted; after
an erasure the next account would then carry the erased one's id, and the
erasure receipt, ``removed`` room events, backups and logs would name two
people by one id. So :func:`insert_user` picks the id itself: one more than
the highest ever issued (``user_id_high_water``, kept up to date by a trigger
on every insert, migration 13) or in use, whichever is higher. It runs in
the writer's transaction, so two inserts cannot pick the same id.
"""

from __future__ import annotations

from typing import Any


def next_user_id(conn: Any) -> int:
    """The id the next account gets (inside the writer's transaction)."""
    row = conn.execute(
        "SELECT max(coalesce((SELECT last_id FROM user_id_high_water WHERE id = 1), 0),"
        " coalesce((SELECT max(id) FROM users), 0))"
    ).fetchone()
    return int(row[0]) + 1


def insert_user(
    conn: Any, *, username: str, username_key: str, role: str, password_hash: str, now: int
) -> int:
    """Insert an account with a never-used id and return that id. The caller
    has checked that ``username_key`` is free, in the same transaction."""
    user_id = next_user_id(conn)
    conn.execute(
        "INSERT INTO users (id, username, username_key, role, password_hash,"
        " password_changed_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (user_id, username, username_key, role, password_hash, now, now),
    )
    return user_id


def highest_user_id_issued(conn: Any) -> int:
    """The highest user id a database has issued, as far as it can tell: its
    mark, its accounts and its receipts (whichever of them its schema has).
    ``chatd restore`` carries this over from the database it replaces, so
    the ids issued since the backup are not issued again."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    parts = ["coalesce((SELECT max(id) FROM users), 0)"]
    if "erasure_receipts" in tables:
        parts.append("coalesce((SELECT max(user_id) FROM erasure_receipts), 0)")
    if "user_id_high_water" in tables:
        parts.append("coalesce((SELECT max(last_id) FROM user_id_high_water), 0)")
    return int(conn.execute(f"SELECT max({', '.join(parts)}, 0)").fetchone()[0])  # noqa: S608 - constants


def raise_high_water(conn: Any, issued: int) -> None:
    """Make sure no id up to ``issued`` is handed out again (after a restore)."""
    conn.execute("UPDATE user_id_high_water SET last_id = max(last_id, ?) WHERE id = 1", (issued,))
