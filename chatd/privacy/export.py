"""Account export (GDPR Art. 15 and 20): everything the server holds about one
user, as a ZIP of JSON files with a manifest, streamed.

Theory of operation
-------------------
The export is a list of :class:`Section` s, one JSON file each: a SELECT
of one user's rows in the order of an index, read a page (``PAGE_ROWS``
rows) at a time, each page a range scan that starts after the last row's
key (keyset paging), so a queue of any length costs linear time.
:class:`ExportWriter` runs in a store reader thread (``store.read``), one
step per call: it reads the next page of the current section, writes it
into the ZIP entry (deflated, through :mod:`zipfile` writing to a
non-seekable sink, so entries carry data descriptors) and hands back the
compressed bytes made so far. :func:`stream_export` is the async iterator
around it that the admin API and the blob listener send as they go, so
memory holds one page, not the export. ``manifest.json`` comes last: it
lists every file with its SHA-256 and row count, which are known only once
the file is written.

What is never exported: ciphertext (the server cannot read it and it is not
the user's alone), password hashes and TOTP secrets (credentials, not data
about the person: the manifest says so), token hashes. Pages are separate
reads, so the export is not one snapshot of the database; the manifest says
so too.

Adding a section (e.g. the consent records of a later migration) is one more
entry in :data:`SECTIONS`; a section whose table does not exist is listed
under ``absent`` in the manifest instead of failing. Until then, a table
with a ``user_id`` column that no section reads and :data:`NOT_EXPORTED`
does not name is exported as it is (:func:`discovered_sections`), and a
test fails until one of the two names it.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import IO, Any, Final

from chatd.errors import RefusedError
from chatd.store import Store, now_ms

FORMAT_VERSION: Final = 1
PAGE_ROWS: Final = 500  # rows read and written per step (one reader-thread call)

#: Left out of profile.json, with why (repeated in the manifest).
OMITTED: Final = {
    "users.password_hash": "a credential (Argon2id hash), not information about you",
    "users.totp_secret": "a credential (your authenticator's secret)",
    "users.totp_last_step": "internal replay guard of the second factor",
    "sessions.access_hash, sessions.refresh_hash": "credentials (token hashes)",
    "recovery_codes.code_hash": "credentials; only how many are left is exported",
    "envelopes.ciphertext, room_log.ciphertext": (
        "end-to-end encrypted: the server cannot read it; only its size is exported"
    ),
}


class ExportNotFound(RefusedError):
    """No user with this id."""


@dataclass(frozen=True, slots=True)
class Section:
    """One JSON file of the export: the user's rows (``:uid``) of ``table``,
    a page at a time in the order of the paging key (one or more columns
    that an index of the table serves, so each page is a range scan, not a
    sort of all the user's rows). ``first`` reads the first page, ``next``
    the page after the key values ``:k0``, ``:k1``..., which both give as
    their last ``keys`` columns. A ``by_device`` section is read for one
    device of the user after the other (``:device``), in device id order."""

    name: str
    table: str  # skipped (listed as absent) when this table does not exist
    description: str
    first: str
    next: str
    keys: int  # how many key columns end each row
    by_device: bool = False  # ``:device``: read once per device of the user


def _section(
    name: str,
    table: str,
    description: str,
    select: str,
    where: str,
    key: tuple[str, ...],
    *,
    by_device: bool = False,
) -> Section:
    columns = ", ".join(f"{k} AS _k{i}" for i, k in enumerate(key))
    order = ", ".join(key)
    after = f"({order}) > ({', '.join(f':k{i}' for i in range(len(key)))})"
    base = f"SELECT {select}, {columns} FROM {table} WHERE ({where})"  # noqa: S608 - constants
    return Section(
        name,
        table,
        description,
        f"{base} ORDER BY {order} LIMIT :limit",
        f"{base} AND {after} ORDER BY {order} LIMIT :limit",
        len(key),
        by_device,
    )


_MY_DEVICES: Final = "(SELECT id FROM devices WHERE user_id = :uid)"
_ADMIN_PATHS: Final = (
    "path = '/v1/users/' || :uid OR path LIKE '/v1/users/' || :uid || '/%'"
    " OR path LIKE '/v1/rooms/%/members/' || :uid"
    " OR path LIKE '/v1/rooms/%/members/' || :uid || '/%'"
)

#: The export's files, in order. See etc/data-inventory.toml for each column.
SECTIONS: Final[tuple[Section, ...]] = (
    _section(
        "profile",
        "users",
        "Your account (without credentials: see omitted in the manifest)",
        "id, username, username_key, role, password_changed_at, totp_confirmed_at IS NOT NULL"
        " AS mfa_enabled, totp_confirmed_at, disabled_at, erase_after, created_at,"
        " device_list_version, (SELECT count(*) FROM recovery_codes r WHERE r.user_id = users.id"
        " AND r.used_at IS NULL) AS recovery_codes_left",
        "id = :uid",
        ("id",),
    ),
    _section(
        "devices",
        "devices",
        "Your devices and their public identity keys",
        "id, name, ed25519, curve25519, signature, created_at, last_seen_at, room_cursor",
        "user_id = :uid",
        ("id",),
    ),
    _section(
        "one_time_keys",
        "one_time_keys",
        "Public one-time keys your devices uploaded (claimed: handed out to a sender)",
        "device_id, key_id, curve25519, signature, uploaded_at, claimed_at",
        "device_id = :device",
        ("key_id",),
        by_device=True,
    ),
    _section(
        "fallback_keys",
        "fallback_keys",
        "Public fallback keys of your devices",
        "device_id, key_id, curve25519, signature, uploaded_at, used_at",
        f"device_id IN {_MY_DEVICES}",
        ("device_id",),
    ),
    _section(
        "sessions",
        "sessions",
        "Your login sessions (without their tokens)",
        "id, device_id, device_name, created_at, last_seen_at, ip, expires_at,"
        " access_expires_at, revoked_at, revoked_reason",
        "user_id = :uid",
        ("id",),
    ),
    _section(
        "room_memberships",
        "room_members",
        "Rooms you are a member of, with your role",
        "room_id, (SELECT name FROM rooms WHERE rooms.id = room_id) AS room_name, role, joined_at",
        "user_id = :uid",
        ("room_id",),
    ),
    _section(
        "room_invitations",
        "room_invites",
        "Open invitations to rooms, for you or made by you",
        "room_id, user_id, by_user_id, invited_at",
        "user_id = :uid OR by_user_id = :uid",
        ("room_id", "user_id"),
    ),
    _section(
        "invites",
        "invites",
        "The invite code you registered with (never the code itself)",
        "id, role, note, created_at, expires_at, used_at",
        "used_by = :uid",
        ("id",),
    ),
    _section(
        "auth_events",
        "auth_audit",
        "The authentication audit log's entries about your account",
        "id, at, event, outcome, ip, device_name, session_id",
        "user_id = :uid",
        ("at", "id"),
    ),
    _section(
        "admin_audit",
        "admin_audit",
        "Admin API requests about your account (method, path, status, time)",
        "id, at, method, path, status",
        _ADMIN_PATHS,
        ("id",),
    ),
    _section(
        "attachment_access",
        "blob_devices",
        "Attachments your devices may download (uploaded by you, or sent to you)",
        "blob_id, device_id",
        "device_id = :device",
        ("blob_id",),
        by_device=True,
    ),
    _section(
        "push_endpoints",
        "push_endpoints",
        "Where your devices get content-free push wake-ups",
        "device_id, url, created_at",
        f"device_id IN {_MY_DEVICES}",
        ("device_id",),
    ),
    _section(
        "consent",
        "consent_records",
        "Your acceptances and revocations of the terms and the privacy notice",
        "id, kind, version, action, at, session_id, device_id",
        "user_id = :uid",
        ("id",),
    ),
    _section(
        "attachments",
        "blobs",
        "Attachments you uploaded (metadata; the files are ciphertext only you can read)",
        "blob_id, size, created_at, referenced_at, expires_at",
        "owner_user_id = :uid",
        ("blob_id",),
    ),
    _section(
        "queued_envelopes",
        "envelopes",
        "Messages and receipts waiting for your devices: metadata only, never content",
        "id, recipient_device_id, kind, message_id, sender_user_id, sender_device_id,"
        " device_id, room_id, sent_at, expires_at, coalesce(length(ciphertext), 0) AS size",
        "recipient_device_id = :device",
        ("id",),
        by_device=True,
    ),
    _section(
        "sent_room_messages",
        "room_log",
        "Room messages you sent that still wait for some member device: metadata only",
        "id, room_id, message_id, sender_device_id, sent_at, expires_at,"
        " coalesce(length(ciphertext), 0) AS size",
        "kind = 'room_message' AND sender_user_id = :uid",
        ("id",),
    ),
)


#: Tables no section reads, and why. A test checks that every table of the
#: schema is read by a section or listed here; a table added later that has
#: a ``user_id`` column and is in neither is exported anyway (its rows of the
#: user, as they are) until a section or a reason is written for it.
NOT_EXPORTED: Final[dict[str, str]] = {
    "retention_runs": "no personal data",
    "consent_documents": "the server's documents; consent.json names each version you accepted",
    "recovery_codes": "credentials; profile.json says how many are left",
    "spent_refresh_tokens": "credentials (hashes of used tokens)",
    "queue_totals": "derived: the count and bytes of queued_envelopes.json",
    "room_devices": "internal ranges of the room log; the rooms are in room_memberships.json",
    "rooms": "room names are in room_memberships.json; the rest is the room's, not yours",
    "sends": "message ids remembered for de-duplication only",
    "blob_rooms": "which rooms may download an attachment: the room's data",
    "erasure_receipts": "receipts name an earlier, erased account: another person",
    "user_id_high_water": "one number for the whole server (the highest user id issued)",
}


def discovered_sections(conn: Any) -> list[Section]:
    """A section for each table with a ``user_id`` column that neither
    :data:`SECTIONS` nor :data:`NOT_EXPORTED` names (see there)."""
    known = {s.table for s in SECTIONS} | set(NOT_EXPORTED)
    found = []
    for name, sql in conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        " ORDER BY name"
    ).fetchall():
        if name in known:
            continue
        columns = conn.execute(f"PRAGMA table_info({name})").fetchall()
        if "user_id" not in {c[1] for c in columns}:
            continue
        key: tuple[str, ...] = ("rowid",)
        if "WITHOUT ROWID" in str(sql).upper():
            key = tuple(c[1] for c in sorted(columns, key=lambda c: c[5]) if c[5])
        description = f"Your rows of the table {name}"
        found.append(_section(name, name, description, "*", "user_id = :uid", key))
    return found


class _Sink:
    """A write-only, non-seekable file for zipfile: collects what it writes."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._offset = 0

    def write(self, data: bytes) -> int:
        self._chunks.append(bytes(data))
        self._offset += len(data)
        return len(data)

    def tell(self) -> int:
        return self._offset

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def take(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data


@dataclass
class _FileEntry:
    name: str
    description: str
    rows: int = 0
    bytes: int = 0
    sha256: str = ""


@dataclass
class ExportWriter:
    """The export's state between steps; each :meth:`step` runs in a reader thread."""

    user_id: int
    server: str
    generated_at: int = field(default_factory=now_ms)
    files: list[_FileEntry] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)
    sections: list[Section] | None = None  # SECTIONS and those discovered, at the first step
    steps: int = 0
    _sink: _Sink = field(default_factory=_Sink)
    _zip: zipfile.ZipFile | None = None
    _index: int = 0
    _after: tuple[Any, ...] | None = None  # the key of the last row written
    _devices: list[str] = field(default_factory=list)  # a by_device section's, to go
    _entry: IO[bytes] | None = None
    _hash: Any = None
    _done: bool = False

    def exists(self, conn: Any) -> bool:
        row = conn.execute("SELECT 1 FROM users WHERE id = ?", (self.user_id,)).fetchone()
        return row is not None

    def step(self, conn: Any) -> tuple[bytes, bool]:
        """Write the next page; return the ZIP bytes made so far and whether
        the export is complete."""
        self.steps += 1
        if self._zip is None:
            self._zip = zipfile.ZipFile(self._sink, "w", compression=zipfile.ZIP_DEFLATED)
        if self.sections is None:
            self.sections = [*SECTIONS, *discovered_sections(conn)]
        if self._index < len(self.sections):
            self._page(conn, self.sections[self._index])
        else:
            self._finish()
        return self._sink.take(), self._done

    def _page(self, conn: Any, section: Section) -> None:
        zf = self._zip
        assert zf is not None  # noqa: S101 - set by step()
        if self._entry is None:
            known = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (section.table,)
            ).fetchone()
            if known is None:
                self.absent.append(section.name)
                self._index += 1
                return
            self.files.append(_FileEntry(f"{section.name}.json", section.description))
            self._entry = zf.open(f"{section.name}.json", "w", force_zip64=True)
            self._hash = hashlib.sha256()
            self._after = None
            self._devices = [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM devices WHERE user_id = ? ORDER BY id", (self.user_id,)
                )
            ]
            self._write(b"[")
        params: dict[str, Any] = {"uid": self.user_id, "limit": PAGE_ROWS}
        if section.by_device:  # one device after the other, each a range of its index
            if not self._devices:
                self._close_entry()
                return
            params["device"] = self._devices[0]
        if self._after is not None:
            params |= {f"k{i}": value for i, value in enumerate(self._after)}
        cur = conn.execute(section.first if self._after is None else section.next, params)
        names = [d[0] for d in cur.description][: -section.keys]
        rows = cur.fetchall()
        entry = self.files[-1]
        for row in rows:
            record = dict(zip(names, row[: -section.keys], strict=True))
            prefix = b",\n " if entry.rows else b"\n "
            self._write(prefix + json.dumps(record, ensure_ascii=False).encode("utf-8"))
            entry.rows += 1
        if rows:
            self._after = tuple(rows[-1][-section.keys :])
        if len(rows) < PAGE_ROWS:
            if section.by_device and len(self._devices) > 1:
                del self._devices[0]  # the next device's rows, from its first
                self._after = None
                return
            self._close_entry()

    def _close_entry(self) -> None:
        assert self._entry is not None  # noqa: S101 - opened by _page()
        entry = self.files[-1]
        self._write(b"\n]\n" if entry.rows else b"]\n")
        self._entry.close()
        self._entry = None
        entry.sha256 = self._hash.hexdigest()
        self._index += 1

    def _write(self, data: bytes) -> None:
        assert self._entry is not None  # noqa: S101 - opened by _page()
        self._entry.write(data)
        self._hash.update(data)
        self.files[-1].bytes += len(data)

    def _finish(self) -> None:
        zf = self._zip
        assert zf is not None  # noqa: S101 - set by step()
        manifest = {
            "format": "chatd-account-export",
            "format_version": FORMAT_VERSION,
            "generated_at": self.generated_at,
            "server": self.server,
            "user_id": self.user_id,
            "files": [
                {
                    "name": f.name,
                    "description": f.description,
                    "rows": f.rows,
                    "bytes": f.bytes,
                    "sha256": f.sha256,
                }
                for f in self.files
            ],
            "absent": self.absent,
            "omitted": OMITTED,
            "notes": [
                "Timestamps are unix milliseconds (UTC).",
                "Each file is read page by page while the server runs; it is not one "
                "snapshot of the database.",
                "Message content is end-to-end encrypted; your devices hold your history.",
            ],
        }
        zf.writestr("manifest.json", json.dumps(manifest, indent=1).encode("utf-8"))
        zf.close()
        self._done = True


async def stream_export(store: Store, user_id: int, *, server: str) -> AsyncIterator[bytes]:
    """The export of ``user_id`` as ZIP bytes, a page at a time.

    Raises :class:`ExportNotFound` at the first step for an unknown user
    (before any byte), so a caller can still answer 404. Cancelling the
    iteration between pages leaves nothing behind.
    """
    writer = ExportWriter(user_id, server)
    if not await store.read(writer.exists):
        raise ExportNotFound("no such user")
    return _pages(store, writer)


async def _pages(store: Store, writer: ExportWriter) -> AsyncIterator[bytes]:
    done = False
    while not done:
        data, done = await store.read(writer.step)
        if data:
            yield data
