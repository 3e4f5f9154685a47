"""The SQLCipher store: connections, migrations and the group-commit writer."""

from chatd.store.store import Store, now_ms, serve_store

__all__ = ["Store", "now_ms", "serve_store"]
