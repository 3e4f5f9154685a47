"""Attachments on the server: signed URLs from the relay, the blob listener
over real loopback HTTP, references, quotas and the retention job.

Every refusal is checked for its clear error and for leaving no file behind
(neither a blob nor a ``.part-`` file) in the blob directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import pytest
import trio

from chatd.auth.accounts import AccountAdmin
from chatd.blobs.grants import Referral
from chatd.blobs.http import BlobApp, serve_blobs
from chatd.blobs.service import BlobService
from chatd.blobs.signing import SignedGrant
from chatd.config import (
    AttachmentSettings,
    AuthSettings,
    Config,
    DeviceSettings,
    RelaySettings,
    RetentionSettings,
    StoreSettings,
)
from chatd.daemon import open_blobs, open_services
from chatd.relay import Relay, serve_relay
from chatd.retention import Retention, blob_jobs
from chatd.store import Store, now_ms, serve_store

from .test_keys import BOB_PASSWORD, Device, login_device
from .test_relay_auth import PASSWORD, connect, create_once

KEY = bytes(range(32))
BLOB_KEY = bytes(range(32, 64))
CAROL_PASSWORD = "carol also has a long password"
TEAM = (("alice", PASSWORD), ("bob", BOB_PASSWORD), ("carol", CAROL_PASSWORD))


@dataclasses.dataclass
class BlobServer:
    relay: Relay
    store: Store
    blobs: BlobService
    app: BlobApp
    directory: Path

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.relay.port}/v1/ws"

    def files(self) -> list[str]:
        return sorted(os.listdir(self.directory))


@asynccontextmanager
async def blob_server(
    tmp: Path, devices: DeviceSettings | None = None, **attachments: Any
) -> AsyncIterator[BlobServer]:
    auth = AuthSettings(
        session_check_seconds=0.2,
        require_mfa="none",
        backoff_base_seconds=1e-6,
        login_rate_per_ip=100_000.0,
        login_rate_per_account=100_000.0,
        rate_burst=1000,
    )
    config = Config(
        relay=RelaySettings(port=0),
        auth=auth,
        attachments=AttachmentSettings(**{"port": 0, **attachments}),
        devices=devices or DeviceSettings(),
        path=tmp / "chatd.toml",
    )
    async with trio.open_nursery() as nursery:
        store = await nursery.start(serve_store, tmp / "c.db", KEY, StoreSettings())
        services = await open_services(nursery, store, config)
        blobs = open_blobs(store, config, services.rooms, BLOB_KEY)
        app = await nursery.start(serve_blobs, config, blobs, trio.Event())
        relay = await nursery.start(
            partial(serve_relay, **services.for_relay(), blobs=blobs), config, trio.Event()
        )
        admin = AccountAdmin(services.auth, current=services.current)
        for name, password in TEAM:
            await create_once(admin, name, password)
        yield BlobServer(relay, store, blobs, app, config.blobs_dir)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def people(srv: BlobServer) -> AsyncIterator[tuple[Device, Device, Device]]:
    """Alice, Bob and Carol, one device each, with published keys."""
    async with AsyncExitStack() as stack:
        devices = []
        for name, password in TEAM:
            client = await stack.enter_async_context(connect(srv))  # type: ignore[arg-type]
            device = await login_device(client, name, password)
            await device.publish(5)
            devices.append(device)
        yield devices[0], devices[1], devices[2]


def blob_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def upload_url(device: Device, data: bytes, size: int | None = None) -> dict[str, Any]:
    return await device.client.request(
        "blob_upload", sha256=blob_of(data), size=len(data) if size is None else size
    )


async def put(url: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.put(url, content=body, headers=headers)


async def get(url: str) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.get(url)


def error(response: httpx.Response) -> str:
    return str(response.json()["error"])


async def send_naming(sender: Device, to: Device, blob_ids: list[str]) -> dict[str, Any]:
    """A direct message to ``to`` (its one device) naming ``blob_ids``."""
    return await sender.client.request(
        "send",
        message_id=str(uuid.uuid4()),
        envelopes=[{"user_id": to.user_id, "device_id": to.device_id, "ciphertext": "opaque"}],
        blob_ids=blob_ids,
    )


DATA = os.urandom(300_000)  # stands for ciphertext: the server cannot tell


async def test_an_upload_is_stored_by_its_hash_and_only_recipients_may_download_it(
    short_tmp: Path,
) -> None:
    async with blob_server(short_tmp) as srv, people(srv) as (alice, bob, carol):
        signed = await upload_url(alice, DATA)
        assert signed["type"] == "blob_url" and signed["method"] == "PUT"
        assert signed["blob_id"] == blob_of(DATA) and signed["size"] == len(DATA)
        assert signed["expires_at"] > now_ms()
        response = await put(signed["url"], DATA)
        assert response.status_code == 201, response.text
        assert srv.files() == [blob_of(DATA)]
        assert (srv.directory / blob_of(DATA)).read_bytes() == DATA
        # Uploading the same again is harmless.
        again = await put((await upload_url(alice, DATA))["url"], DATA)
        assert again.status_code == 200

        # Before a message names it, only the uploader may fetch it.
        refused = await bob.client.request("blob_download", blob_id=blob_of(DATA))
        assert (refused["type"], refused["code"], refused["field"]) == (
            "error",
            "blob_not_found",
            "$.blob_id",
        )
        own = await alice.client.request("blob_download", blob_id=blob_of(DATA))
        assert (await get(own["url"])).content == DATA

        sent = await send_naming(alice, bob, [blob_of(DATA)])
        assert sent["type"] == "sent", sent
        got = await bob.client.request("blob_download", blob_id=blob_of(DATA))
        assert got["method"] == "GET" and got["size"] == len(DATA)
        response = await get(got["url"])
        assert response.status_code == 200 and response.content == DATA
        assert response.headers["cache-control"] == "no-store"
        # Carol got no message naming it: the same answer as for a blob that does not exist.
        for blob_id in (blob_of(DATA), blob_of(b"never uploaded")):
            refused = await carol.client.request("blob_download", blob_id=blob_id)
            assert refused["code"] == "blob_not_found"


async def test_a_send_may_name_only_blobs_the_sender_may_read(short_tmp: Path) -> None:
    async with blob_server(short_tmp) as srv, people(srv) as (alice, bob, carol):
        await put((await upload_url(alice, DATA))["url"], DATA)
        refused = await send_naming(carol, bob, [blob_of(DATA)])
        assert (refused["type"], refused["code"], refused["field"]) == (
            "error",
            "blob_not_found",
            "$.blob_ids[0]",
        )
        # Nothing was queued for Bob, and Bob still may not fetch it.
        assert (await bob.client.request("blob_download", blob_id=blob_of(DATA)))["type"] == "error"
        # Bob, once sent it, may pass it on.
        await send_naming(alice, bob, [blob_of(DATA)])
        assert (await send_naming(bob, carol, [blob_of(DATA)]))["type"] == "sent"
        assert (await carol.client.request("blob_download", blob_id=blob_of(DATA)))["type"] == (
            "blob_url"
        )


async def test_a_refused_send_grants_no_read_access(short_tmp: Path) -> None:
    """A send refused after its references were recorded (a device mismatch,
    a full queue) takes them back; a send that skips a full device grants
    that device nothing."""
    async with blob_server(short_tmp, DeviceSettings(max_queued_envelopes=1)) as srv:
        async with people(srv) as (alice, bob, carol):
            await put((await upload_url(alice, DATA))["url"], DATA)
            blob = blob_of(DATA)

            def to(*devices: Device) -> list[dict[str, Any]]:
                return [
                    {"user_id": d.user_id, "device_id": d.device_id, "ciphertext": "x"}
                    for d in devices
                ]

            async def send(envelopes: list[dict[str, Any]], **more: Any) -> dict[str, Any]:
                return await alice.client.request(
                    "send",
                    message_id=str(uuid.uuid4()),
                    envelopes=envelopes,
                    blob_ids=[blob],
                    **more,
                )

            async def may_read(device: Device) -> bool:
                answer = await device.client.request("blob_download", blob_id=blob)
                return bool(answer["type"] == "blob_url")

            # Bob's device is named, but Carol's is missing: nothing is sent.
            stale = {"user_id": carol.user_id, "device_id": "NOTADEVICE", "ciphertext": "x"}
            mismatch = await send([*to(bob), stale])
            assert mismatch["type"] == "device_mismatch", mismatch
            assert not await may_read(bob)
            # The blob counts as never named, so the unreferenced purge still applies.
            assert (
                await srv.store.read(
                    lambda conn: conn.execute(
                        "SELECT referenced_at FROM blobs WHERE blob_id = ?", (blob,)
                    ).fetchone()[0]
                )
                is None
            )

            # Carol's queue is full (she is offline and one envelope waits).
            await carol.client.ws.aclose()
            assert (
                await alice.client.request(
                    "send", message_id=str(uuid.uuid4()), envelopes=to(carol)
                )
            )["type"] == "sent"
            full = await send(to(bob, carol))
            assert full["code"] == "queue_full", full
            assert not await may_read(bob)

            # With skip_full, Bob gets it and may read it; Carol, skipped, may not.
            sent = await send(to(bob, carol), skip_full=True)
            assert sent["type"] == "sent" and [s["device_id"] for s in sent["skipped"]] == [
                carol.device_id
            ]
            assert await may_read(bob)
            granted = await srv.store.read(
                lambda conn: sorted(
                    r[0]
                    for r in conn.execute(
                        "SELECT device_id FROM blob_devices WHERE blob_id = ?", (blob,)
                    )
                )
            )
            assert granted == sorted([alice.device_id, bob.device_id])

            # A refused send leaves a grant that existed before it alone.
            again = await send([*to(bob), stale])
            assert again["type"] == "device_mismatch"
            assert await may_read(bob)


async def test_a_refused_send_does_not_take_back_a_grant_another_send_needs(
    short_tmp: Path,
) -> None:
    """Two messages name one blob for Bob at once; the first one recorded
    the grant. Whichever order the outcomes come in, a refusal of one
    does not withdraw what the other was (or may yet be) accepted with,
    and the grant goes only when every message that needed it was refused."""
    async with blob_server(short_tmp) as srv:
        async with people(srv) as (alice, bob, _carol):
            await put((await upload_url(alice, DATA))["url"], DATA)
            blob = blob_of(DATA)
            blobs = srv.blobs

            async def granted() -> bool:
                sql = "SELECT count(*) FROM blob_devices WHERE blob_id = ? AND device_id = ?"
                found = await srv.store.read(
                    lambda conn: conn.execute(sql, (blob, bob.device_id)).fetchone()[0]
                )
                return bool(found)

            async def refer() -> Referral:
                return await blobs.refer(
                    alice.user_id, alice.device_id, [blob], device_ids=[bob.device_id]
                )

            # The second is accepted first, then the first is refused.
            first, second = await refer(), await refer()
            assert first.readers and not second.readers  # only the first made it
            blobs.confirm(second)
            blobs.release(second)
            await blobs.withdraw(first)
            blobs.release(first)
            assert await granted()
            await srv.store.write(
                lambda conn: conn.execute(
                    "DELETE FROM blob_devices WHERE device_id = ?", (bob.device_id,)
                )
            )

            # The first is refused while the second is still pending, which
            # is then accepted.
            first, second = await refer(), await refer()
            await blobs.withdraw(first)
            blobs.release(first)
            assert await granted()  # the second may still be accepted
            blobs.confirm(second)
            blobs.release(second)
            assert await granted()
            await srv.store.write(
                lambda conn: conn.execute(
                    "DELETE FROM blob_devices WHERE device_id = ?", (bob.device_id,)
                )
            )

            # Both refused: the grant goes with the last of them.
            first, second = await refer(), await refer()
            await blobs.withdraw(first)
            blobs.release(first)
            await blobs.withdraw(second)
            blobs.release(second)
            assert not await granted()
            assert blobs.pending.idle  # nothing left over


async def test_a_room_message_lets_the_rooms_members_download(short_tmp: Path) -> None:
    async with blob_server(short_tmp) as srv, people(srv) as (alice, bob, carol):
        room = await alice.client.request("room_create", kind="channel", name="launch")
        room_id = room["room"]["room_id"]
        joined = await bob.client.request("room_join", room_id=room_id)
        assert joined["type"] == "room", joined
        await put((await upload_url(alice, DATA))["url"], DATA)
        members = await alice.client.request("room_members", room_id=room_id)
        sent = await alice.client.request(
            "room_send",
            room_id=room_id,
            message_id=str(uuid.uuid4()),
            epoch=members["epoch"],
            ciphertext="opaque megolm",
            blob_ids=[blob_of(DATA)],
        )
        assert sent["type"] == "sent", sent
        got = await bob.client.request("blob_download", blob_id=blob_of(DATA))
        assert (await get(got["url"])).content == DATA
        assert (await carol.client.request("blob_download", blob_id=blob_of(DATA)))["type"] == (
            "error"
        )
        await bob.client.request("room_leave", room_id=room_id)
        assert (await bob.client.request("blob_download", blob_id=blob_of(DATA)))["code"] == (
            "blob_not_found"
        )


def tamper(url: str, **changes: str | None) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    for key, value in changes.items():
        if value is None:
            query.pop(key, None)
        else:
            query[key] = value
    return parts._replace(query=urlencode(query)).geturl()


@pytest.mark.parametrize(
    "change",
    [
        {"sig": "A" * 43},
        {"sig": None},
        {"size": str(len(DATA) + 1)},
        {"exp": str(now_ms() + 10**9)},
        {"u": "999"},
        {"d": "AAAAAAAA"},
        {"size": "-1"},
    ],
    ids=["forged", "unsigned", "size", "expiry", "user", "device", "malformed"],
)
async def test_every_wrong_signature_is_refused_before_the_body(
    short_tmp: Path, change: dict[str, str | None]
) -> None:
    async with blob_server(short_tmp) as srv, people(srv) as (alice, _bob, _carol):
        signed = await upload_url(alice, DATA)
        response = await put(tamper(signed["url"], **change), DATA)
        assert response.status_code == 403
        assert error(response) == "bad_signature"
        assert srv.files() == []


async def test_a_url_for_another_blob_or_method_is_refused(short_tmp: Path) -> None:
    async with blob_server(short_tmp) as srv, people(srv) as (alice, _bob, _carol):
        signed = await upload_url(alice, DATA)
        other = signed["url"].replace(blob_of(DATA), blob_of(DATA[:-1]))
        assert error(await put(other, DATA[:-1])) == "bad_signature"
        # A PUT URL does not download.
        response = await get(signed["url"])
        assert (response.status_code, error(response)) == (403, "bad_signature")
        assert srv.files() == []


async def test_an_expired_url_is_refused(short_tmp: Path) -> None:
    async with blob_server(short_tmp) as srv, people(srv) as (alice, _bob, _carol):
        signed = await upload_url(alice, DATA)
        query = dict(parse_qsl(urlsplit(signed["url"]).query))
        past = SignedGrant("PUT", blob_of(DATA), len(DATA), now_ms() - 1, alice.user_id, query["d"])
        url = srv.blobs.base_url + srv.blobs.signer.path(past)
        response = await put(url, DATA)
        assert (response.status_code, error(response)) == (403, "url_expired")
        assert "expired" in response.json()["message"]
        assert srv.files() == []


async def test_guessed_blob_paths_get_nothing(short_tmp: Path) -> None:
    async with blob_server(short_tmp) as srv, people(srv) as (alice, _bob, _carol):
        await put((await upload_url(alice, DATA))["url"], DATA)
        base = srv.blobs.base_url
        async with httpx.AsyncClient() as http:
            bare = await http.get(f"{base}/v1/blobs/{blob_of(DATA)}")
            assert (bare.status_code, error(bare)) == (403, "bad_signature")
            for path in ("/v1/blobs/../c.db", "/v1/blobs/", "/", "/v1/ws", "/v1/blobs/ABC"):
                response = await http.get(base + path)
                assert (response.status_code, error(response)) == (404, "not_found"), path
            deleting = await http.delete(f"{base}/v1/blobs/{blob_of(DATA)}")
            assert deleting.status_code == 405
        assert srv.files() == [blob_of(DATA)]


async def chunks(data: bytes, size: int = 65_536) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def test_an_oversize_upload_is_refused_and_leaves_nothing(short_tmp: Path) -> None:
    async with blob_server(short_tmp, max_file_bytes=len(DATA)) as srv, people(srv) as (a, _b, _c):
        refused = await upload_url(a, DATA + b"x")
        assert (refused["code"], refused["field"]) == ("too_large", "$.size")
        signed = await upload_url(a, DATA)
        declared = await put(signed["url"], DATA + b"more")
        assert (declared.status_code, error(declared)) == (413, "too_large")
        # Without a Content-Length (chunked), the extra bytes are caught as they come.
        streamed = await put(signed["url"], chunks(DATA + b"more"))
        assert (streamed.status_code, error(streamed)) == (413, "too_large")
        await srv.app.wait_uploads_ended(2)
        assert srv.files() == []


async def test_a_truncated_upload_is_refused_and_leaves_nothing(short_tmp: Path) -> None:
    async with blob_server(short_tmp) as srv, people(srv) as (alice, _bob, _carol):
        signed = await upload_url(alice, DATA)
        short = await put(signed["url"], DATA[:-10])
        assert (short.status_code, error(short)) == (400, "size_mismatch")
        streamed = await put(signed["url"], chunks(DATA[:-10]))
        assert (streamed.status_code, error(streamed)) == (400, "size_mismatch")
        assert "bytes" in streamed.json()["message"]
        await srv.app.wait_uploads_ended(2)
        assert srv.files() == []


async def test_a_hash_mismatch_is_refused_and_leaves_nothing(short_tmp: Path) -> None:
    async with blob_server(short_tmp) as srv, people(srv) as (alice, _bob, _carol):
        signed = await upload_url(alice, DATA)
        forged = bytes([DATA[0] ^ 1]) + DATA[1:]
        response = await put(signed["url"], forged)
        assert (response.status_code, error(response)) == (422, "hash_mismatch")
        await srv.app.wait_uploads_ended(1)
        assert srv.files() == []
        # The same URL still works with the right bytes.
        assert (await put(signed["url"], DATA)).status_code == 201


async def test_an_upload_cut_off_mid_way_leaves_nothing(short_tmp: Path) -> None:
    async with blob_server(short_tmp) as srv, people(srv) as (alice, _bob, _carol):
        signed = await upload_url(alice, DATA)
        parts = urlsplit(signed["url"])
        stream = await trio.open_tcp_stream(parts.hostname or "", parts.port or 0)
        head = (
            f"PUT {parts.path}?{parts.query} HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {len(DATA)}\r\n\r\n"
        ).encode()
        await stream.send_all(head + DATA[: len(DATA) // 2])
        await stream.aclose()
        with trio.fail_after(10):
            await srv.app.wait_uploads_ended(1)
        assert srv.files() == []
        assert srv.app.uploads == 0


async def test_a_quota_is_enforced_at_the_url_and_at_the_upload(short_tmp: Path) -> None:
    quota = len(DATA) + 1000
    async with (
        blob_server(short_tmp, quota_bytes_per_user=quota) as srv,
        people(srv) as (
            alice,
            _bob,
            _carol,
        ),
    ):
        second = os.urandom(2000)
        url_first = await upload_url(alice, DATA)
        url_second = await upload_url(alice, second)  # fits: nothing is stored yet
        assert (await put(url_first["url"], DATA)).status_code == 201
        refused = await upload_url(alice, second)
        assert (refused["code"], refused["field"]) == ("quota_exceeded", "$.size")
        assert "quota" in refused["message"]
        late = await put(url_second["url"], second)
        assert (late.status_code, error(late)) == (413, "quota_exceeded")
        await srv.app.wait_uploads_ended(2)
        assert srv.files() == [blob_of(DATA)]
        assert await srv.blobs.stored_bytes(alice.user_id) == len(DATA)


async def test_retention_purges_expired_unreferenced_and_orphaned_blobs(short_tmp: Path) -> None:
    async with blob_server(short_tmp) as srv, people(srv) as (alice, bob, _carol):
        kept, expired, unnamed = DATA, os.urandom(5000), os.urandom(7000)
        for data in (kept, expired, unnamed):
            assert (await put((await upload_url(alice, data))["url"], data)).status_code == 201
        await send_naming(alice, bob, [blob_of(kept), blob_of(expired)])
        await srv.store.write(
            lambda c: c.execute(
                "UPDATE blobs SET expires_at = 0 WHERE blob_id = ?", (blob_of(expired),)
            )
        )
        hour_ago = now_ms() - 2 * 3_600_000
        await srv.store.write(
            lambda c: c.execute(
                "UPDATE blobs SET created_at = ? WHERE blob_id = ?", (hour_ago, blob_of(unnamed))
            )
        )
        orphan = srv.directory / blob_of(b"left by a crash")
        part = srv.directory / ".part-0123"
        fresh_part = srv.directory / ".part-4567"  # an upload going on now: kept
        for path in (orphan, part, fresh_part):
            path.write_bytes(b"x" * 100)
        old = time.time() - 2 * 3600
        os.utime(orphan, (old, old))
        os.utime(part, (old, old))

        retention = Retention(
            srv.store, RetentionSettings(), blob_jobs(srv.blobs.settings, srv.blobs)
        )
        [report] = await retention.run_now()
        assert report.job == "blobs" and report.error is None
        assert report.rows_purged == 2
        assert report.bytes_reclaimed >= len(expired) + len(unnamed) + 200
        assert srv.files() == sorted([blob_of(kept), fresh_part.name])
        gone = await bob.client.request("blob_download", blob_id=blob_of(expired))
        assert gone["code"] == "blob_not_found"
        sql = "SELECT count(*) FROM blob_devices"
        refs = await srv.store.read(lambda c: c.execute(sql).fetchone())
        assert refs[0] == 2  # the kept blob's: Alice's upload and Bob's message


async def test_without_a_blob_listener_attachment_requests_are_refused(short_tmp: Path) -> None:
    from .test_keys import team

    async with team(short_tmp) as srv, connect(srv) as c:
        alice = await login_device(c)
        await alice.publish(5)
        refused = await c.request("blob_upload", sha256=blob_of(DATA), size=len(DATA))
        assert refused["code"] == "attachments_unavailable"
        sent = await c.request(
            "send",
            message_id=str(uuid.uuid4()),
            envelopes=[{"user_id": 2, "device_id": "AAAA", "ciphertext": "x"}],
            blob_ids=[blob_of(DATA)],
        )
        assert (sent["code"], sent["field"]) == ("attachments_unavailable", "$.blob_ids")


def test_a_blob_key_is_made_at_first_start_and_kept(short_tmp: Path) -> None:
    from chatd.keyfiles import load_blob_key

    config = Config(path=short_tmp / "chatd.toml")
    first = load_blob_key(config)
    assert len(first) == 32 and load_blob_key(config) == first
    assert (short_tmp / "blob-url.key").stat().st_mode & 0o777 == 0o600
    assert "blob" not in json.dumps(repr(srv_signer(first)))


def srv_signer(key: bytes) -> Any:
    from chatd.blobs.signing import UrlSigner

    signer = UrlSigner(key)
    assert key.hex() not in repr(signer)
    return signer
