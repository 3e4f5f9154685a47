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
    # 3: accounts, second factors, invites, sessions and the auth audit log.
    """
    CREATE TABLE users (
        id                  INTEGER PRIMARY KEY,
        username            TEXT    NOT NULL,         -- as first entered, for display
        username_key        TEXT    NOT NULL UNIQUE,  -- NFKC + casefold: lookups, uniqueness
        role                TEXT    NOT NULL CHECK (role IN ('user', 'moderator', 'admin')),
        password_hash       TEXT    NOT NULL,         -- Argon2id PHC string
        password_changed_at INTEGER NOT NULL,
        totp_secret         TEXT,                     -- base32; set at enrolment
        totp_confirmed_at   INTEGER,                  -- MFA is active when set
        totp_last_step      INTEGER,                  -- last accepted TOTP step (no replay)
        disabled_at         INTEGER,
        created_at          INTEGER NOT NULL
    );
    CREATE TABLE recovery_codes (
        id        INTEGER PRIMARY KEY,
        user_id   INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        code_hash BLOB    NOT NULL,                   -- SHA-256 of the normalized code
        used_at   INTEGER
    );
    CREATE INDEX recovery_codes_user ON recovery_codes (user_id);
    CREATE TABLE invites (
        id         INTEGER PRIMARY KEY,
        code_hash  BLOB    NOT NULL UNIQUE,           -- SHA-256 of the code
        role       TEXT    NOT NULL CHECK (role IN ('user', 'moderator', 'admin')),
        note       TEXT    NOT NULL,                  -- admin's note, e.g. who it is for
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        used_at    INTEGER,
        used_by    INTEGER REFERENCES users (id) ON DELETE SET NULL,
        revoked_at INTEGER
    );
    CREATE TABLE sessions (
        id                INTEGER PRIMARY KEY,
        user_id           INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        device_name       TEXT    NOT NULL,
        created_at        INTEGER NOT NULL,
        last_seen_at      INTEGER NOT NULL,
        last_ip           TEXT    NOT NULL,           -- masked (/24, /48)
        expires_at        INTEGER NOT NULL,           -- absolute end of the session
        access_hash       BLOB    NOT NULL UNIQUE,
        access_expires_at INTEGER NOT NULL,
        refresh_hash      BLOB    NOT NULL UNIQUE,
        revoked_at        INTEGER,
        revoked_reason    TEXT
    );
    CREATE INDEX sessions_user ON sessions (user_id);
    CREATE INDEX sessions_expires_at ON sessions (expires_at);
    CREATE TABLE spent_refresh_tokens (
        token_hash BLOB    PRIMARY KEY,
        session_id INTEGER NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
        spent_at   INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX spent_refresh_tokens_session ON spent_refresh_tokens (session_id);
    CREATE TABLE auth_audit (
        id          INTEGER PRIMARY KEY,
        at          INTEGER NOT NULL,
        event       TEXT    NOT NULL,
        outcome     TEXT    NOT NULL,                 -- ok, or the reason it failed
        user_id     INTEGER REFERENCES users (id) ON DELETE SET NULL,
        ip          TEXT    NOT NULL,                 -- masked
        device_name TEXT,
        session_id  INTEGER
    );
    CREATE INDEX auth_audit_at ON auth_audit (at);
    CREATE INDEX auth_audit_user ON auth_audit (user_id, at);
    """,
    # 4: devices, their identity keys, one-time keys and fallback keys.
    """
    CREATE TABLE devices (
        id             TEXT    PRIMARY KEY,           -- server-assigned, 13 base32 chars
        user_id        INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        name           TEXT    NOT NULL,
        ed25519_key    TEXT,                          -- identity signing key, set once
        curve25519_key TEXT,                          -- identity key, set once
        keys_signature TEXT,                          -- self-signature over both
        created_at     INTEGER NOT NULL,
        last_seen_at   INTEGER NOT NULL
    );
    CREATE INDEX devices_user ON devices (user_id);
    ALTER TABLE users ADD COLUMN device_list_version INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE sessions ADD COLUMN device_id TEXT REFERENCES devices (id) ON DELETE CASCADE;
    CREATE TABLE one_time_keys (
        device_id      TEXT    NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
        key_id         TEXT    NOT NULL,
        curve25519_key TEXT    NOT NULL,
        signature      TEXT    NOT NULL,
        uploaded_at    INTEGER NOT NULL,
        claimed_at     INTEGER,                       -- handed out; kept so a re-upload
                                                      -- cannot make it claimable again
        PRIMARY KEY (device_id, key_id)
    ) WITHOUT ROWID;
    CREATE TABLE fallback_keys (
        device_id      TEXT    PRIMARY KEY REFERENCES devices (id) ON DELETE CASCADE,
        key_id         TEXT    NOT NULL,
        curve25519_key TEXT    NOT NULL,
        signature      TEXT    NOT NULL,
        uploaded_at    INTEGER NOT NULL,
        used_at        INTEGER                        -- first handed out as a fallback
    );
    """,
    # 5: store-and-forward: per-device queues of ciphertext and receipts.
    """
    CREATE TABLE envelopes (
        id               INTEGER PRIMARY KEY AUTOINCREMENT,  -- queue order, ack cursor;
                                                      -- never reused after a delete
        recipient_device TEXT    NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
        kind             TEXT    NOT NULL CHECK (kind IN ('message', 'delivered', 'expired')),
        message_id       TEXT    NOT NULL,
        sender_user      INTEGER,                     -- message: who sent it
        sender_device    TEXT,                        -- message: from which device
        about_device     TEXT,                        -- receipt: the recipient device
        ciphertext       BLOB,                        -- message only; opaque to the server
        created_at       INTEGER NOT NULL,
        expires_at       INTEGER NOT NULL
    );
    CREATE INDEX envelopes_recipient ON envelopes (recipient_device, id);
    CREATE INDEX envelopes_expires_at ON envelopes (expires_at);
    CREATE TABLE sends (
        sender_device TEXT    NOT NULL,
        message_id    TEXT    NOT NULL,
        envelopes     INTEGER NOT NULL,
        created_at    INTEGER NOT NULL,
        PRIMARY KEY (sender_device, message_id)
    ) WITHOUT ROWID;
    CREATE INDEX sends_created_at ON sends (created_at);
    """,
    # 6: each device queue's running totals, kept by triggers in the same
    # transaction as the envelopes, so a send checks the caps with one lookup
    # instead of reading the whole queue (which grew with the queue).
    """
    CREATE TABLE queue_totals (
        device_id TEXT    PRIMARY KEY REFERENCES devices (id) ON DELETE CASCADE,
        envelopes INTEGER NOT NULL,  -- queued envelopes, receipts included
        bytes     INTEGER NOT NULL   -- their ciphertext, in bytes
    ) WITHOUT ROWID;
    INSERT INTO queue_totals (device_id, envelopes, bytes)
        SELECT recipient_device, count(*), coalesce(sum(length(ciphertext)), 0)
        FROM envelopes GROUP BY recipient_device;
    CREATE TRIGGER envelopes_queued AFTER INSERT ON envelopes BEGIN
        INSERT INTO queue_totals (device_id, envelopes, bytes)
        VALUES (NEW.recipient_device, 1, coalesce(length(NEW.ciphertext), 0))
        ON CONFLICT (device_id) DO UPDATE
        SET envelopes = envelopes + 1, bytes = bytes + excluded.bytes;
    END;
    CREATE TRIGGER envelopes_gone AFTER DELETE ON envelopes BEGIN
        UPDATE queue_totals
        SET envelopes = envelopes - 1, bytes = bytes - coalesce(length(OLD.ciphertext), 0)
        WHERE device_id = OLD.recipient_device;
    END;
    """,
    # 7: one name per thing: columns take the names of the wire fields they
    # carry (PROTOCOL.md). RENAME COLUMN rewrites the indexes and the
    # queue_totals triggers of migration 6 to the new names as well.
    """
    ALTER TABLE envelopes RENAME COLUMN recipient_device TO recipient_device_id;
    ALTER TABLE envelopes RENAME COLUMN sender_user TO sender_user_id;
    ALTER TABLE envelopes RENAME COLUMN sender_device TO sender_device_id;
    ALTER TABLE envelopes RENAME COLUMN about_device TO device_id;
    ALTER TABLE envelopes RENAME COLUMN created_at TO sent_at;
    ALTER TABLE sends RENAME COLUMN sender_device TO sender_device_id;
    ALTER TABLE devices RENAME COLUMN ed25519_key TO ed25519;
    ALTER TABLE devices RENAME COLUMN curve25519_key TO curve25519;
    ALTER TABLE devices RENAME COLUMN keys_signature TO signature;
    ALTER TABLE one_time_keys RENAME COLUMN curve25519_key TO curve25519;
    ALTER TABLE fallback_keys RENAME COLUMN curve25519_key TO curve25519;
    ALTER TABLE sessions RENAME COLUMN last_ip TO ip;
    """,
    # 8: rooms. A room's messages and events are stored once, in room_log, and
    # reach each member device through its room_devices ranges: a device gets
    # the room's log entries with from_id < id <= until_id that are past its
    # room_cursor (the highest room log id it acknowledged). room_log ids come
    # from the envelopes' id sequence, so one device's queue (its envelopes
    # and its room log entries) has one order. Neither room_log nor
    # room_devices references rooms: what was queued before a room was
    # deleted is still delivered, then purged like any envelope.
    """
    CREATE TABLE rooms (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: old entries name it
        kind          TEXT    NOT NULL CHECK (kind IN ('channel', 'group')),
        name          TEXT    NOT NULL,
        topic         TEXT    NOT NULL,
        invite_only   INTEGER NOT NULL,
        share_history INTEGER NOT NULL,
        created_at    INTEGER NOT NULL,
        epoch         INTEGER NOT NULL               -- goes up when its member devices change
    );
    CREATE TABLE room_members (
        room_id   INTEGER NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
        user_id   INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        role      TEXT    NOT NULL CHECK (role IN ('owner', 'moderator', 'member')),
        joined_at INTEGER NOT NULL,
        PRIMARY KEY (room_id, user_id)
    ) WITHOUT ROWID;
    CREATE INDEX room_members_user ON room_members (user_id);
    CREATE TABLE room_invites (
        room_id    INTEGER NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
        user_id    INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        by_user_id INTEGER REFERENCES users (id) ON DELETE SET NULL,
        invited_at INTEGER NOT NULL,
        PRIMARY KEY (room_id, user_id)
    ) WITHOUT ROWID;
    CREATE INDEX room_invites_user ON room_invites (user_id);
    CREATE TABLE room_log (
        id               INTEGER PRIMARY KEY,        -- from the envelopes' id sequence
        room_id          INTEGER NOT NULL,
        kind             TEXT    NOT NULL CHECK (kind IN ('room_message', 'room_event')),
        message_id       TEXT    NOT NULL,
        sender_user_id   INTEGER,                    -- room_message: who sent it
        sender_device_id TEXT,                       -- room_message: from which device
        ciphertext       BLOB,                       -- room_message: Megolm, opaque
        event            TEXT,                       -- room_event: JSON, made by the server
        sent_at          INTEGER NOT NULL,
        expires_at       INTEGER NOT NULL
    );
    CREATE INDEX room_log_room ON room_log (room_id, id);
    CREATE INDEX room_log_expires_at ON room_log (expires_at);
    CREATE TABLE room_devices (
        device_id TEXT    NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
        room_id   INTEGER NOT NULL,
        from_id   INTEGER NOT NULL,                  -- gets room_log ids above this...
        until_id  INTEGER,                           -- ...up to this one (NULL: no end yet)
        PRIMARY KEY (device_id, room_id, from_id)
    ) WITHOUT ROWID;
    CREATE INDEX room_devices_room ON room_devices (room_id);
    ALTER TABLE devices ADD COLUMN room_cursor INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE envelopes ADD COLUMN room_id INTEGER;
    """,
    # 9: push endpoints: where to send a device's content-free wake-ups
    # (chatd.push). One per device, gone with the device.
    """
    CREATE TABLE push_endpoints (
        device_id  TEXT    PRIMARY KEY REFERENCES devices (id) ON DELETE CASCADE,
        url        TEXT    NOT NULL,                -- UnifiedPush endpoint, checked
        p256dh     TEXT,                            -- RFC 8291 key of the device (base64url)
        auth       TEXT,                            -- RFC 8291 auth secret (base64url)
        created_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    """,
    # 10: attachments. The ciphertext lives in files under <data_dir>/blobs,
    # named by its SHA-256 (blob_id); these rows say whose it is, until when,
    # and which devices and rooms a message naming it went to.
    """
    CREATE TABLE blobs (
        blob_id       TEXT    PRIMARY KEY,  -- hex SHA-256 of the ciphertext: the file name
        owner_user_id INTEGER NOT NULL,     -- the uploader; counts against their quota
        size          INTEGER NOT NULL,     -- ciphertext bytes
        created_at    INTEGER NOT NULL,     -- unix ms, upload finished
        referenced_at INTEGER,              -- first message naming it; NULL: none yet
        expires_at    INTEGER NOT NULL      -- unix ms; purged after
    ) WITHOUT ROWID;
    CREATE INDEX blobs_owner ON blobs (owner_user_id);
    CREATE INDEX blobs_expires ON blobs (expires_at);
    CREATE TABLE blob_devices (
        blob_id   TEXT NOT NULL REFERENCES blobs (blob_id) ON DELETE CASCADE,
        device_id TEXT NOT NULL,            -- may download: uploaded it or was sent it
        PRIMARY KEY (blob_id, device_id)
    ) WITHOUT ROWID;
    CREATE INDEX blob_devices_device ON blob_devices (device_id);
    CREATE TABLE blob_rooms (
        blob_id TEXT    NOT NULL REFERENCES blobs (blob_id) ON DELETE CASCADE,
        room_id INTEGER NOT NULL,           -- members of the room may download
        PRIMARY KEY (blob_id, room_id)
    ) WITHOUT ROWID;
    """,
    # 11: consent: the documents users accept (every version an admin set, the
    # current one per kind being the newest), and each user's acceptances and
    # revocations, append-only (chatd.consent).
    """
    CREATE TABLE consent_documents (
        id      INTEGER PRIMARY KEY,
        kind    TEXT    NOT NULL CHECK (kind IN ('terms', 'privacy')),
        version TEXT    NOT NULL,
        url     TEXT,
        title   TEXT,
        set_at  INTEGER NOT NULL
    );
    CREATE INDEX consent_documents_kind ON consent_documents (kind, id);
    CREATE TABLE consent_records (
        id         INTEGER PRIMARY KEY,
        user_id    INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        kind       TEXT    NOT NULL CHECK (kind IN ('terms', 'privacy')),
        version    TEXT    NOT NULL,
        action     TEXT    NOT NULL CHECK (action IN ('accepted', 'revoked')),
        at         INTEGER NOT NULL,
        session_id INTEGER,
        device_id  TEXT
    );
    CREATE INDEX consent_records_user ON consent_records (user_id, kind, id);
    CREATE TRIGGER consent_records_append_only BEFORE UPDATE ON consent_records
    BEGIN
        SELECT RAISE(ABORT, 'consent records are append-only');
    END;
    """,
    # 12: account erasure (chatd.privacy). An erasure disables the account at
    # once and sets erase_after; the erasure job purges it after that time
    # and keeps only the signed receipt, which names the account by its
    # (then unused) id and creation time, never by its name.
    """
    ALTER TABLE users ADD COLUMN erase_after INTEGER;  -- erasure requested: purged after (unix ms)
    CREATE INDEX users_erase_after ON users (erase_after) WHERE erase_after IS NOT NULL;
    CREATE TABLE erasure_receipts (
        id        INTEGER PRIMARY KEY,
        user_id   INTEGER NOT NULL,                 -- the erased account's former id
        erased_at INTEGER NOT NULL,                 -- unix ms
        receipt   TEXT    NOT NULL                  -- the signed receipt (JSON), as issued
    );
    CREATE INDEX erasure_receipts_user ON erasure_receipts (user_id);
    """,
    # 13: user ids are never handed out twice. users.id is a plain rowid (no
    # AUTOINCREMENT, and rebuilding the table is not worth it), so erasing the
    # highest-id account used to free its id for the next account: receipts,
    # room events, backups and logs would then name two people by one id.
    # chatd.auth.user_ids picks max(last_id, max(users.id)) + 1; the trigger
    # keeps last_id up to date for every insert, whoever makes it. Seeded with
    # the highest id in use or named by a receipt.
    """
    CREATE TABLE user_id_high_water (
        id      INTEGER PRIMARY KEY CHECK (id = 1),  -- one row
        last_id INTEGER NOT NULL                     -- the highest user id ever issued
    );
    INSERT INTO user_id_high_water (id, last_id) VALUES (1, max(
        coalesce((SELECT max(id) FROM users), 0),
        coalesce((SELECT max(user_id) FROM erasure_receipts), 0)));
    CREATE TRIGGER users_id_high_water AFTER INSERT ON users
    BEGIN
        UPDATE user_id_high_water SET last_id = NEW.id WHERE id = 1 AND last_id < NEW.id;
    END;
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
    # commit first). A trigger's body is put back together up to its END.
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    statements: list[str] = []
    in_trigger = False
    for piece in (s.strip() for s in "\n".join(lines).split(";")):
        if not piece:
            continue
        if in_trigger:
            statements[-1] += ";\n" + piece
            in_trigger = piece.upper() != "END"
        else:
            statements.append(piece)
            in_trigger = piece.upper().startswith("CREATE TRIGGER")
    return statements
