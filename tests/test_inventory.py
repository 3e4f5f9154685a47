"""The data inventories list every column their schema holds, and no other:
etc/data-inventory.toml for the server, etc/client-data-inventory.toml for the
client library's local store."""

from __future__ import annotations

import sqlite3
import tomllib

import pytest

from chatd.client.store import _SCHEMA as CLIENT_SCHEMA
from chatd.store.migrations import migrate

from .conftest import REPO


def schema_columns(client: bool = False) -> dict[str, set[str]]:
    conn = sqlite3.connect(":memory:")
    if client:
        conn.executescript(CLIENT_SCHEMA)
    else:
        migrate(conn)
    tables = [
        r[0]
        for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        if not r[0].startswith("sqlite_")
    ]
    return {t: {c[1] for c in conn.execute(f"PRAGMA table_info({t})")} for t in tables}


def inventory(client: bool = False) -> dict[str, dict[str, object]]:
    name = "client-data-inventory.toml" if client else "data-inventory.toml"
    with (REPO / "etc" / name).open("rb") as fh:
        return tomllib.load(fh)["tables"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("client", [False, True], ids=["server", "client"])
def test_every_column_is_in_the_inventory_and_nothing_stale(client: bool) -> None:
    listed = {table: set(entry["columns"]) for table, entry in inventory(client).items()}  # type: ignore[call-overload]
    assert listed == schema_columns(client)


@pytest.mark.parametrize("client", [False, True], ids=["server", "client"])
def test_every_entry_says_purpose_retention_and_personal_data(client: bool) -> None:
    for table, entry in inventory(client).items():
        assert len(str(entry["purpose"])) > 10, table
        assert "retention" in entry and str(entry["retention"]), table
        for column, info in entry["columns"].items():  # type: ignore[attr-defined]
            assert len(info["purpose"]) > 5, f"{table}.{column}"
            assert isinstance(info["personal_data"], bool), f"{table}.{column}"
