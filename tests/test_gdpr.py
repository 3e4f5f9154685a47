"""Account export and erasure (GDPR Art. 15, 17, 20) against the real daemon.

Each scenario starts ``chatd serve`` (tests/test_daemon.py's helper) on a
fresh data dir with a real SQLCipher file, creates the people over the admin
API, and plays with the real client library. What the server holds is read
from its SQLCipher file, read-only with the key. The streaming of a large
export is checked on a real store in a temp dir, page by page.
"""

from __future__ import annotations

import io
import json
import secrets
import sqlite3
import subprocess
import sys
import zipfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from chatd.client import Client, ServerRefusedError, open_client
from chatd.client.errors import LoginError
from chatd.config import StoreSettings
from chatd.errors import SecretFileError
from chatd.inspection import ScanReport, open_server_db, scan_files
from chatd.keyfiles import load_signing_seed
from chatd.privacy import export as export_mod
from chatd.privacy.erasure import PLAN
from chatd.privacy.export import NOT_EXPORTED, SECTIONS, ExportWriter, stream_export
from chatd.privacy.receipts import ReceiptError, verify
from chatd.store import serve_store
from chatd.store.migrations import MIGRATIONS, _statements

from .conftest import DataDir
from .test_client_account import code_of, raises_leaf
from .test_daemon import daemon

WAIT = 20.0
#: A name found nowhere else, so a scan for it finds only her.
ERASED = "wilhelmina"
PASSWORDS = {"alice": "alice's long password", ERASED: "wilhelmina's own password"}
RELAXED_AUTH = {
    "require_mfa": "none",
    "login_rate_per_ip": 100_000.0,
    "login_rate_per_account": 100_000.0,
    "rate_burst": 1000,
}


@dataclass
class Scene:
    data_dir: DataDir
    url: str
    admin: httpx.AsyncClient
    log: Path
    stores: Path
    ids: dict[str, int] = field(default_factory=dict)
    keys: dict[str, bytes] = field(default_factory=dict)

    async def call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.data_dir.token}"}
        return await self.admin.request(method, path, headers=headers, **kw)

    async def ok(self, method: str, path: str, **kw: Any) -> Any:
        response = await self.call(method, path, **kw)
        assert response.status_code == 200, response.text
        return response.json()

    @asynccontextmanager
    async def device(self, user: str, what: str = "phone") -> AsyncIterator[Client]:
        name = f"{user}-{what}"
        async with open_client(
            self.url,
            user,
            PASSWORDS[user],
            device_name=name,
            store_path=self.stores / f"{name}.db",
            store_key=self.keys.setdefault(name, secrets.token_bytes(32)),
            backoff_base=0.01,
            insecure=True,
        ) as client:
            yield client

    async def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        def read() -> list[tuple[Any, ...]]:
            with open_server_db(self.data_dir.db, self.data_dir.key) as conn:
                return [tuple(r) for r in conn.execute(sql, params).fetchall()]

        return await trio.to_thread.run_sync(read)

    async def export(self, user_id: int) -> zipfile.ZipFile:
        headers = {"Authorization": f"Bearer {self.data_dir.token}"}
        chunks = []
        async with self.admin.stream("GET", f"/v1/users/{user_id}/export", headers=headers) as r:
            assert r.status_code == 200
            assert r.headers["content-type"] == "application/zip"
            assert "content-length" not in r.headers  # streamed, not built first
            async for chunk in r.aiter_raw():
                chunks.append(chunk)
        return zipfile.ZipFile(io.BytesIO(b"".join(chunks)))


@asynccontextmanager
async def scene(data_dir: DataDir, short_tmp: Path, **privacy: Any) -> AsyncIterator[Scene]:
    data_dir.configure(auth=RELAXED_AUTH, privacy=privacy)
    stores = short_tmp / "stores"
    stores.mkdir()
    async with daemon(data_dir, short_tmp) as d:
        await d.wait_notify("READY")
        transport = httpx.AsyncHTTPTransport(uds=str(data_dir.path / "a.sock"))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://chatd", timeout=WAIT
        ) as admin:
            s = Scene(data_dir, d.relay_url(), admin, short_tmp / "stderr.log", stores)
            for name, password in PASSWORDS.items():
                user = await s.ok(
                    "POST", "/v1/users", json={"username": name, "password": password}
                )
                s.ids[name] = user["id"]
            yield s


def read_json(zf: zipfile.ZipFile, name: str) -> Any:
    return json.loads(zf.read(name))


# -- export --------------------------------------------------------------------------------


async def test_the_export_holds_every_section_and_never_ciphertext_or_credentials(
    data_dir: DataDir, short_tmp: Path
) -> None:
    async with scene(data_dir, short_tmp) as s:
        alice, her = s.ids["alice"], s.ids[ERASED]
        attachment = short_tmp / "notes.txt"
        attachment.write_text("the notes")
        async with s.device("alice"):
            pass  # her device and keys, then she is away
        async with s.device(ERASED) as w:
            with trio.fail_after(WAIT):
                room = await w.rooms.create("plans", "group")
                await w.rooms.invite(room.room_id, alice)
                await w.send_text(alice, "queued for alice while she is away")
                await w.send_file(alice, attachment)
        await s.ok("GET", f"/v1/users/{her}")  # an admin read about her: audit-logged
        zf = await s.export(her)
        zf_alice = await s.export(alice)
        ciphertexts = await s.rows("SELECT ciphertext FROM envelopes WHERE ciphertext IS NOT NULL")

    manifest = read_json(zf, "manifest.json")
    assert manifest["format_version"] == 1 and manifest["user_id"] == her
    names = {f["name"] for f in manifest["files"]}
    assert names == {f"{x.name}.json" for x in SECTIONS}
    assert sorted(zf.namelist()) == sorted([*names, "manifest.json"])
    for entry in manifest["files"]:  # each file as the manifest describes it
        data = zf.read(entry["name"])
        assert export_mod.hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert len(json.loads(data)) == entry["rows"]
    assert "users.password_hash" in manifest["omitted"]

    profile = read_json(zf, "profile.json")
    assert [p["username"] for p in profile] == [ERASED]
    assert "password_hash" not in profile[0] and "totp_secret" not in profile[0]
    devices = read_json(zf, "devices.json")
    assert [d["name"] for d in devices] == [f"{ERASED}-phone"] and devices[0]["ed25519"]
    assert read_json(zf, "one_time_keys.json") and read_json(zf, "fallback_keys.json")
    assert [m["role"] for m in read_json(zf, "room_memberships.json")] == ["owner"]
    assert [i["user_id"] for i in read_json(zf, "room_invitations.json")] == [alice]
    assert "login" in {e["event"] for e in read_json(zf, "auth_events.json")}
    assert ("GET", f"/v1/users/{her}") in {
        (e["method"], e["path"]) for e in read_json(zf, "admin_audit.json")
    }
    (blob,) = read_json(zf, "attachments.json")
    assert blob["size"] > 0
    assert read_json(zf, "sessions.json")[0]["device_name"] == f"{ERASED}-phone"
    assert "access_hash" not in read_json(zf, "sessions.json")[0]

    # Alice's export has the envelopes queued for her: metadata, not content.
    queued = read_json(zf_alice, "queued_envelopes.json")
    assert queued and all(e["size"] > 0 and "ciphertext" not in e for e in queued)
    assert {e["sender_user_id"] for e in queued} == {her}
    assert ciphertexts
    for export in (zf, zf_alice):
        everything = b"".join(export.read(n) for n in export.namelist())
        for (ciphertext,) in ciphertexts:
            text = ciphertext if isinstance(ciphertext, bytes) else ciphertext.encode()
            assert text[:64] not in everything
        assert b"$argon2" not in everything


async def test_a_large_export_is_streamed_page_by_page(short_tmp: Path) -> None:
    """Thousands of queued envelopes: the export comes in many small pieces,
    each made from one page of rows, never the whole queue at once."""
    settings = StoreSettings()
    key = secrets.token_bytes(32)
    async with trio.open_nursery() as nursery:
        store = await nursery.start(serve_store, short_tmp / "big.db", key, settings)
        count = 5 * export_mod.PAGE_ROWS + 7

        def fill(conn: Any) -> None:
            conn.execute(
                "INSERT INTO users (id, username, username_key, role, password_hash,"
                " password_changed_at, created_at) VALUES (1, 'carol', 'carol', 'user', 'h', 0, 0)"
            )
            conn.execute(
                "INSERT INTO devices (id, user_id, name, created_at, last_seen_at)"
                " VALUES ('CAROLDEVICE', 1, 'phone', 0, 0)"
            )
            # A table a later migration might add (consent records): exported as it is.
            conn.execute("CREATE TABLE consents (user_id INTEGER, version TEXT, at INTEGER)")
            conn.execute("INSERT INTO consents VALUES (1, 'terms-2', 5), (2, 'terms-2', 6)")
            conn.executemany(
                "INSERT INTO envelopes (recipient_device_id, kind, message_id, sender_user_id,"
                " sender_device_id, ciphertext, sent_at, expires_at)"
                " VALUES ('CAROLDEVICE', 'message', ?, 1, 'CAROLDEVICE', ?, 0, 1)",
                [(f"m{i}", b"C" * 1000) for i in range(count)],
            )

        await store.write(fill)
        pages: list[int] = []
        steps = ExportWriter.step

        def counting_step(writer: ExportWriter, conn: Any) -> tuple[bytes, bool]:
            data, done = steps(writer, conn)
            pages.append(len(data))
            return data, done

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ExportWriter, "step", counting_step)
            chunks = [c async for c in await stream_export(store, 1, server="test")]
        nursery.cancel_scope.cancel()

    zf = zipfile.ZipFile(io.BytesIO(b"".join(chunks)))
    assert len(json.loads(zf.read("queued_envelopes.json"))) == count
    assert json.loads(zf.read("consents.json")) == [{"user_id": 1, "version": "terms-2", "at": 5}]
    # One read per page of the queue (at least), each piece far smaller than
    # the whole: the envelopes were never all in memory at once.
    assert len(pages) >= count // export_mod.PAGE_ROWS + len(SECTIONS)
    assert len(chunks) > count // export_mod.PAGE_ROWS
    manifest = json.loads(zf.read("manifest.json"))
    (envelopes,) = [f for f in manifest["files"] if f["name"] == "queued_envelopes.json"]
    assert max(len(c) for c in chunks) < envelopes["bytes"] / 10
    assert b"CCCCCCCC" not in b"".join(zf.read(n) for n in zf.namelist())


async def test_an_unknown_user_has_no_export_and_cannot_be_erased(
    data_dir: DataDir, short_tmp: Path
) -> None:
    async with scene(data_dir, short_tmp) as s:
        for method, path in (
            ("GET", "/v1/users/999/export"),
            ("DELETE", "/v1/users/999"),
            ("POST", "/v1/users/999/erasure/cancel"),
        ):
            response = await s.call(method, path)
            assert response.status_code == 404, response.text
            assert response.json()["error"]["code"] == "not_found"
        cancel = await s.call("POST", f"/v1/users/{s.ids['alice']}/erasure/cancel")
        assert cancel.status_code == 409
        assert cancel.json()["error"]["code"] == "erasure_not_pending"
        assert (await s.call("GET", "/v1/users/1/export")).status_code == 200
        unauthorised = await s.admin.get("/v1/users/1/export")
        assert unauthorised.status_code == 401
        assert len(await s.rows("SELECT id FROM users")) == 2  # nothing was lost


async def test_a_user_exports_their_own_account_over_the_relay_after_reauthentication(
    data_dir: DataDir, short_tmp: Path
) -> None:
    async with scene(data_dir, short_tmp) as s, s.device("alice") as alice:
        target = short_tmp / "mine.zip"
        with trio.fail_after(WAIT):
            assert await alice.export_account(target, PASSWORDS["alice"]) == target
        zf = zipfile.ZipFile(target)
        assert read_json(zf, "manifest.json")["user_id"] == s.ids["alice"]
        assert [p["username"] for p in read_json(zf, "profile.json")] == ["alice"]
        assert ("account_export", "ok") in {
            (e["event"], e["outcome"]) for e in read_json(zf, "auth_events.json")
        }
        with pytest.raises(Exception, match="exists already"):
            await alice.export_account(target, PASSWORDS["alice"])  # never replaces a file

        # The URL is for her alone and short-lived: a changed one is refused.
        url = (await alice.connection.request("export_account", password=PASSWORDS["alice"]))["url"]
        async with httpx.AsyncClient() as http:
            assert (await http.get(url)).status_code == 200
            forged = url.replace(f"/v1/exports/{s.ids['alice']}?", f"/v1/exports/{s.ids[ERASED]}?")
            refused = await http.get(forged)
            assert refused.status_code == 403 and refused.json()["error"] == "bad_signature"

        other = short_tmp / "not-mine.zip"
        with trio.fail_after(WAIT), pytest.raises(ServerRefusedError) as wrong:
            await alice.export_account(other, "not my password at all")
        assert wrong.value.code == "reauth_failed" and wrong.value.field == "$.password"
        assert not other.exists()
        audit = await s.ok("GET", "/v1/auth-audit", params={"user_id": s.ids["alice"]})
        assert ("account_export", "bad_password") in {
            (e["event"], e["outcome"]) for e in audit["events"]
        }


# -- erasure -------------------------------------------------------------------------------


def chatctl(*args: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from chatd.chatctl import main; sys.argv[0] = 'chatctl'; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60, check=False
    )


async def test_erasure_disables_at_once_and_cancel_keeps_everything(
    data_dir: DataDir, short_tmp: Path
) -> None:
    async with scene(data_dir, short_tmp) as s:
        her = s.ids[ERASED]
        with raises_leaf(LoginError) as ended:
            async with s.device(ERASED):
                state = await s.ok("DELETE", f"/v1/users/{her}")
                assert state["disabled"] and state["erase_after"] > 0
                with trio.fail_after(WAIT):
                    await trio.sleep_forever()  # until her connection is closed
        assert code_of(ended) == "session_revoked"
        sessions = await s.ok("GET", "/v1/sessions", params={"user_id": her})
        assert sessions["sessions"] and all(x["revoked"] for x in sessions["sessions"])
        refused = await s.call("POST", f"/v1/users/{her}/enable")
        assert refused.status_code == 409
        assert refused.json()["error"]["code"] == "erasure_pending"
        # Within the grace period the purge leaves her be.
        await s.ok("POST", "/v1/retention/run", json={"jobs": ["erasure"]})
        assert await s.rows("SELECT username FROM users WHERE id = ?", her) == [(ERASED,)]
        config = str(data_dir.config_path)
        cancelled = await trio.to_thread.run_sync(
            chatctl, "--config", config, "users", "cancel-erasure", ERASED
        )
        assert cancelled.returncode == 0, cancelled.stderr
        assert await s.rows("SELECT erase_after FROM users WHERE id = ?", her) == [(None,)]
        await s.ok("POST", f"/v1/users/{her}/enable")
        async with s.device(ERASED, "laptop") as w:  # the account works again
            assert w.user_id == her
        assert (await s.ok("GET", "/v1/erasure-receipts"))["receipts"] == []
        unconfirmed = await trio.to_thread.run_sync(
            chatctl, "--config", config, "users", "erase", ERASED
        )
        assert unconfirmed.returncode == 64 and "--yes" in unconfirmed.stderr


USER_COLUMNS = {"user_id", "sender_user_id", "owner_user_id", "used_by", "by_user_id"}


def traces(db: Path, key: bytes, user_id: int, device_ids: list[str]) -> list[str]:
    """Every place in the decrypted database that still names the user: the
    username or a device id in any value, the user id in a column of users."""
    found = []
    with open_server_db(db, key) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        for table in tables:
            columns = [c[1] for c in conn.execute(f"PRAGMA table_info({table})")]
            for row in conn.execute(f"SELECT * FROM {table}"):  # noqa: S608 - table names
                for column, value in zip(columns, row, strict=True):
                    where = f"{table}.{column}"
                    if table == "erasure_receipts":
                        continue  # the evidence: her former id, never her name (checked below)
                    if isinstance(value, bytes):
                        value = value.decode("latin-1")
                    if isinstance(value, str):
                        needles = [ERASED, *device_ids]
                        found += [f"{where}: {n}" for n in needles if n in value]
                    if value == user_id and (
                        column in USER_COLUMNS or (table, column) == ("users", "id")
                    ):
                        found.append(f"{where} = {user_id}")
    return found


async def test_the_purge_leaves_no_trace_and_issues_a_signed_receipt(
    data_dir: DataDir, short_tmp: Path
) -> None:
    async with scene(data_dir, short_tmp, erasure_grace_days=0) as s:
        alice, her = s.ids["alice"], s.ids[ERASED]
        attachment = short_tmp / "notes.txt"
        attachment.write_text("the notes")
        async with s.device("alice") as a:
            with raises_leaf(LoginError) as ended:
                async with s.device(ERASED) as w:
                    with trio.fail_after(WAIT):
                        room = await w.rooms.create("plans", "group")
                        await w.rooms.invite(room.room_id, alice)
                        await a.rooms.join(room.room_id)
                        await w.rooms.send(room.room_id, "hello room")
                        await w.send_text(alice, "hello alice")
                        await w.send_file(alice, attachment)
                        await a.send_text(her, "hello wilhelmina")
                    devices = [
                        r[0] for r in await s.rows("SELECT id FROM devices WHERE user_id = ?", her)
                    ]
                    blob_ids = [r[0] for r in await s.rows("SELECT blob_id FROM blobs")]
                    assert devices and blob_ids
                    await s.ok("DELETE", f"/v1/users/{her}")
                    with trio.fail_after(WAIT):
                        await trio.sleep_forever()
            assert code_of(ended) == "session_revoked"
            run = await s.ok("POST", "/v1/retention/run", json={"jobs": ["erasure"]})
            (report,) = run["reports"]
            assert report["error"] is None and report["rows_purged"] > 0
            assert report["bytes_reclaimed"] >= attachment.stat().st_size

        found = await trio.to_thread.run_sync(traces, s.data_dir.db, s.data_dir.key, her, devices)
        assert found == []
        assert not any((s.data_dir.path / "blobs" / b).exists() for b in blob_ids)
        report_files = ScanReport()
        scan_files([s.data_dir.path / "blobs", s.log], [ERASED], report_files)
        assert report_files.found == [] and "stderr.log" in report_files.files
        assert await s.rows("SELECT username FROM users") == [("alice",)]

        receipts = (await s.ok("GET", "/v1/erasure-receipts"))["receipts"]
        assert [r["user_id"] for r in receipts] == [her]
        document = receipts[0]["receipt"]
        assert ERASED not in json.dumps(document)
        key = (await s.ok("GET", "/v1/server-key"))["public_key"]
        receipt = verify(document, key)
        assert receipt["user_id"] == her and receipt["deleted"]["users"] == 1
        assert receipt["deleted"]["devices"] == len(devices)
        assert receipt["attachments"]["sha256"] == blob_ids

        # chatctl checks it against the server's key; an altered one fails.
        path = short_tmp / "receipt.json"
        path.write_text(json.dumps(document))
        config = str(s.data_dir.config_path)
        good = await trio.to_thread.run_sync(
            chatctl, "--config", config, "receipts", "verify", str(path)
        )
        assert good.returncode == 0, good.stderr
        assert "signature OK" in good.stdout and f'"user_id": {her}' in good.stdout
        tampered = json.loads(json.dumps(document))
        tampered["receipt"]["deleted"]["users"] = 0
        path.write_text(json.dumps(tampered))
        bad = await trio.to_thread.run_sync(
            chatctl, "--config", config, "receipts", "verify", str(path)
        )
        assert bad.returncode == 1 and "altered" in bad.stderr
        with pytest.raises(ReceiptError):
            verify(tampered, key)
        shown = await trio.to_thread.run_sync(chatctl, "--config", config, "receipts", "public-key")
        assert key in shown.stdout
        offline = await trio.to_thread.run_sync(
            chatctl, "receipts", "verify", str(path), "--public-key", key
        )
        assert offline.returncode == 1


def schema_tables() -> set[str]:
    conn = sqlite3.connect(":memory:")
    for script in MIGRATIONS:
        for statement in _statements(script):
            conn.execute(statement)
    return {
        r[0]
        for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    }


def test_every_table_has_an_erasure_rule_and_is_exported_or_says_why_not() -> None:
    """A new table must say what an erasure does to it (chatd.privacy.erasure.PLAN),
    and be read by an export section or say why not (export.NOT_EXPORTED)."""
    tables = schema_tables()
    assert tables == set(PLAN)
    exported = {s.table for s in SECTIONS}
    assert tables == exported | set(NOT_EXPORTED)
    assert not exported & set(NOT_EXPORTED)


def test_the_signing_key_is_made_private_at_first_start_and_an_unsafe_one_refused(
    data_dir: DataDir,
) -> None:
    config = data_dir.config
    path = data_dir.path / "server-signing.key"
    assert not path.exists()
    seed = load_signing_seed(config)
    assert path.stat().st_mode & 0o777 == 0o600 and len(seed) == 32
    assert load_signing_seed(config) == seed  # kept, never replaced
    path.chmod(0o644)
    with pytest.raises(SecretFileError, match="chmod 600"):
        load_signing_seed(config)
    path.chmod(0o600)
    path.write_text("not hex\n")
    with pytest.raises(SecretFileError, match="64 hex digits"):
        load_signing_seed(config)


async def test_chat_exports_the_account_after_asking_for_the_password(
    data_dir: DataDir, short_tmp: Path
) -> None:
    from .test_chat import chat, log_in, user_args

    async with scene(data_dir, short_tmp) as s:
        args = user_args(s.url, short_tmp, "alice", key=bytes([1]) * 32) + ["--insecure"]
        target = short_tmp / "alice-data.zip"
        async with chat(short_tmp, *args) as alice:
            await log_in(alice, "alice", PASSWORDS["alice"])
            await alice.type(f"/export {target}")
            await alice.expect("Your current password (not shown):")
            await alice.type(PASSWORDS["alice"])
            await alice.expect(f"✓ wrote {target}")
            await alice.type(f"/export {target}")
            await alice.expect("exists already")
            await alice.type("/quit")
            assert await alice.exit_code() == 0
        assert PASSWORDS["alice"] not in alice.output
        manifest = read_json(zipfile.ZipFile(target), "manifest.json")
        assert manifest["user_id"] == s.ids["alice"]


async def test_a_cancelled_erasure_is_never_purged_even_when_read_as_due(short_tmp: Path) -> None:
    """The purge checks in each of its writes that the erasure is still due:
    cancelled between the job's read and its writes, nothing is deleted."""
    from chatd.config import PrivacySettings
    from chatd.privacy.erasure import Erasure, ErasureCancelled
    from chatd.privacy.receipts import ReceiptSigner
    from chatd.store import now_ms

    from .test_relay_auth import server

    async with server(short_tmp) as srv:
        erasure = Erasure(
            srv.admin,
            PrivacySettings(erasure_grace_days=0),
            ReceiptSigner(secrets.token_bytes(32)),
            rooms=srv.rooms,
            queues=srv.queues,
        )
        alice = (await srv.admin.list_users(limit=1, after_id=None, username="alice"))[0].id
        await erasure.request(alice)
        await erasure.cancel(alice)
        with pytest.raises(ErasureCancelled):
            await erasure.erase_now(alice, batch=10, now=now_ms())
        assert (await srv.admin.get_user(alice)).username == "alice"
        assert await erasure.purge(now=now_ms(), limit=10) == (0, 0)
        await erasure.request(alice)
        rows, _ = await erasure.purge(now=now_ms(), limit=10)
        assert rows > 0
        (entry,) = await erasure.receipts(limit=10, before_id=None)
        assert verify(entry.receipt, erasure.signer.public_key)["user_id"] == alice
