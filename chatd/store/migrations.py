"""Versioned schema migrations, run at start by the writer connection.

The schema version lives in ``PRAGMA user_version``. Each entry of
:data:`MIGRATIONS` takes the database from version ``n - 1`` to ``n`` in one
transaction, so a crash mid-migration leaves the previous version intact.
Migrations are append-only: never edit one that has shipped; add the next.

Every column added here must also appear in ``etc/data-inventory.toml`` (a
test enforces it).
"""

from __future__ import annotations

from typing import Any, Final

from chatd.errors import SchemaTooNewError

MIGRATIONS: Final[tuple[str, ...]] = (
    # 1: retention run reports (one row per job per run).
    """
    CREATE TABLE retention_runs (
        id              INTEGER PRIMARY KEY,
        job             TEXT    NOT NULL,
        started_at      INTEGER NOT NULL,  -- unix milliseconds
        duration_ms     INTEGER NOT NULL,
        rows_purged     INTEGER NOT NULL,
        bytes_reclaimed INTEGER NOT NULL,
        error           TEXT               -- NULL on success; an error class name
    );
    CREATE INDEX retention_runs_started_at ON retention_runs (started_at);
    """,
    # 2: admin API audit log (who did what through the admin API, and when).
    """
    CREATE TABLE admin_audit (
        id      INTEGER PRIMARY KEY,
        at      INTEGER NOT NULL,  -- unix milliseconds
        method  TEXT    NOT NULL,
        path    TEXT    NOT NULL,
        status  INTEGER NOT NULL
    );
    CREATE INDEX admin_audit_at ON admin_audit (at);
    """,
)

SCHEMA_VERSION: Final = len(MIGRATIONS)


def schema_version(conn: Any) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: Any, *, target: int = SCHEMA_VERSION) -> int:
    """Bring the schema up to ``target``; return the version found at start.

    Raises :class:`SchemaTooNewError` for a database from a newer chatd.
    """
    found = schema_version(conn)
    if found > SCHEMA_VERSION:
        raise SchemaTooNewError(
            f"the database has schema version {found}, but this chatd knows up to "
            f"{SCHEMA_VERSION}; upgrade chatd (downgrades are not supported)"
        )
    for version in range(found + 1, target + 1):
        script = MIGRATIONS[version - 1]
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(script):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return found


def _statements(script: str) -> list[str]:
    # Migrations hold no semicolons inside literals, so a plain split is exact
    # and keeps each step inside our explicit transaction (executescript would
    # commit first).
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
