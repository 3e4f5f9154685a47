"""etc/data-inventory.toml lists every column the schema holds, and no other."""

from __future__ import annotations

import sqlite3
import tomllib

from chatd.store.migrations import migrate

from .conftest import REPO


def schema_columns() -> dict[str, set[str]]:
    conn = sqlite3.connect(":memory:")
    migrate(conn)
    tables = [
        r[0]
        for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        if not r[0].startswith("sqlite_")
    ]
    return {t: {c[1] for c in conn.execute(f"PRAGMA table_info({t})")} for t in tables}


def inventory() -> dict[str, dict[str, object]]:
    with (REPO / "etc" / "data-inventory.toml").open("rb") as fh:
        return tomllib.load(fh)["tables"]  # type: ignore[no-any-return]


def test_every_column_is_in_the_inventory_and_nothing_stale() -> None:
    listed = {table: set(entry["columns"]) for table, entry in inventory().items()}  # type: ignore[call-overload]
    assert listed == schema_columns()


def test_every_entry_says_purpose_retention_and_personal_data() -> None:
    for table, entry in inventory().items():
        assert len(str(entry["purpose"])) > 10, table
        assert "retention" in entry and str(entry["retention"]), table
        for column, info in entry["columns"].items():  # type: ignore[attr-defined]
            assert len(info["purpose"]) > 5, f"{table}.{column}"
            assert isinstance(info["personal_data"], bool), f"{table}.{column}"
