"""Opening a client: the store, the connection, the login and the keys.

:func:`open_client` is the way in (docs/CLIENT.md); it owns the nursery in
which the connection, the inbound worker and the room jobs run.
"""

from __future__ import annotations

import contextlib
import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio
from argon2.low_level import Type, hash_secret_raw

from .account import Account
from .attachments import DEFAULT_MEDIA_TYPES, Attachments
from .client import KEYS_READY_TIMEOUT, Client
from .connection import Connection, Credentials
from .consent import AcceptConsent, consent_at_login
from .crypto import ONE_TIME_KEY_TARGET, OlmMachine, pickle_key
from .errors import ClientError, LoginError
from .keys import MAX_ONE_TIME_KEYS
from .megolm import RoomSettings
from .store import LocalStore


def key_from_passphrase(passphrase: str, salt: bytes) -> bytes:
    """A 32-byte store key from a passphrase: Argon2id (t=3, m=64 MiB, p=4).

    ``salt`` should be at least 16 random bytes kept next to the store. Slow on
    purpose (tenths of a second): call it through ``trio.to_thread.run_sync``
    inside async code.
    """
    if len(salt) < 16:
        raise ClientError("the salt must be at least 16 bytes")
    return hash_secret_raw(
        passphrase.encode(),
        salt,
        time_cost=3,
        memory_cost=64 * 1024,
        parallelism=4,
        hash_len=32,
        type=Type.ID,
    )


#: What ``open_client`` calls when the server requires TOTP before the
#: session may be used: set it up with ``account.enroll_totp`` and
#: ``account.confirm_totp`` (and show the recovery codes), or raise.
EnrollTotp = Callable[[Account], Awaitable[None]]

LOGOUT_GRACE = 2.0  # seconds to end a session that could not be used


def check_transport(url: str, *, insecure: bool = False) -> None:
    """Refuse a plain ``ws://`` URL to anything but this machine (loopback)
    unless ``insecure``: passwords and tokens would cross the network in the
    clear. Raises ClientError."""
    parts = urlsplit(url)
    if parts.scheme == "wss" or insecure:
        return
    if parts.scheme != "ws":
        raise ClientError(f"the server URL must start with wss:// (or ws://): {url}")
    host = parts.hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ClientError(
            f"refusing unencrypted ws:// to {host}: use wss://, or allow it explicitly"
            " (insecure=True; chat --insecure)"
        )


@asynccontextmanager
async def open_client(
    url: str,
    username: str,
    password: str,
    *,
    device_name: str,
    store_path: Path | str,
    store_key: bytes,
    totp: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    backoff_base: float = 1.0,
    one_time_keys: int = ONE_TIME_KEY_TARGET,
    rooms: RoomSettings | None = None,
    media_types: tuple[str, ...] = DEFAULT_MEDIA_TYPES,
    invite_code: str | None = None,
    enroll_totp: EnrollTotp | None = None,
    accept_consent: AcceptConsent | None = None,
    insecure: bool = False,
) -> AsyncIterator[Client]:
    """Open the store, connect, log in and publish keys; yield a :class:`Client`.

    Logs in as the device saved in the store, or as a new device the first
    time. ``one_time_keys`` is how many one-time keys the device keeps on the
    server (1 to MAX_ONE_TIME_KEYS; it tops up when fewer than half are left,
    or when the server asks). ``rooms`` sets the room-key policy
    (RoomSettings: rotation_messages=100, rotation_seconds=7 days,
    key_wait_seconds=10). ``media_types`` is the attachment allowlist (sent
    and saved files); temporary attachment files live next to the store.

    ``invite_code``: a new store registers a new account with it
    (``username`` and ``password`` are then the new ones); a store that
    already has a device logs in as usual. ``enroll_totp`` is called when the
    server requires TOTP before this session may be used (see EnrollTotp);
    without it, or if it returns without confirming, the session is logged
    out and LoginError ``mfa_enrollment_required`` is raised.
    ``accept_consent`` is called with the documents (terms, privacy notice)
    the server asks the user to accept before the session may be used (see
    AcceptConsent); if it returns False, or is not given, the session is
    logged out and LoginError ``consent_required`` is raised. ``ws://`` is
    refused for any host but loopback unless ``insecure`` (check_transport).

    Raises ClientError (a ws:// URL refused), ClientStoreError (wrong key),
    LoginError (refused), CertificateError (the server's TLS certificate is
    not trusted), ConnectionLostError (cannot connect). On exit it says
    ``bye``, cancels its background tasks and closes the store.
    """
    check_transport(url, insecure=insecure)
    if not 1 <= one_time_keys <= MAX_ONE_TIME_KEYS:
        raise ClientError(f"one_time_keys must be 1 to {MAX_ONE_TIME_KEYS}")
    store = await LocalStore.open(Path(store_path), store_key)
    try:
        meta = await store.meta()
        key = pickle_key(store_key)
        olm = OlmMachine.restore(meta.get("account"), await store.olm_channels(), key)
        if "account" not in meta:
            await store.save_olm(olm.account_pickle(), [])
        credentials = Credentials(
            username, password, device_name, totp, meta.get("device_id"), invite_code=invite_code
        )
        if meta.get("device_id") and meta.get("refresh_token"):
            # The session of the last run, kept by save_tokens: resume it.
            credentials.access_token = meta.get("access_token") or None
            credentials.refresh_token = meta["refresh_token"]
            credentials.access_expires_at = int(meta.get("access_expires_at") or 0)
            credentials.session_expires_at = int(meta.get("session_expires_at") or 0)

        async def save_tokens(c: Credentials) -> None:
            """Keep the session's tokens in the (encrypted) store, so the next
            run continues this session instead of opening another."""
            await store.set_meta(
                access_token=c.access_token or "",
                refresh_token=c.refresh_token or "",
                access_expires_at=str(c.access_expires_at),
                session_expires_at=str(c.session_expires_at),
            )

        async def on_session(reply: dict[str, Any]) -> None:
            if reply.get("device_id") and reply["device_id"] != meta.get("device_id"):
                meta["device_id"] = reply["device_id"]
                await store.set_meta(device_id=reply["device_id"], user_id=str(reply["user"]["id"]))

        conn = Connection(
            url,
            credentials,
            ssl_context=ssl_context,
            backoff_base=backoff_base,
            on_session=on_session,
            on_tokens=save_tokens,
        )
        if meta.get("user_id"):
            conn.user_id = int(meta["user_id"])
        client = Client(
            store,
            olm,
            conn,
            one_time_keys=one_time_keys,
            fallback_key=meta.get("fallback_key"),
            room_settings=rooms,
            attachments=Attachments(
                conn,
                Path(store_path).parent,
                media_types=media_types,
                ssl_context=ssl_context,
            ),
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(conn.serve)
            if conn.restricted:
                await _enroll(conn, client.account, enroll_totp)
            if conn.consent_required:
                await consent_at_login(conn, accept_consent)
            jobs = await client._open_rooms(key)
            await nursery.start(jobs.serve)
            nursery.start_soon(client._serve_inbound)
            with trio.fail_after(KEYS_READY_TIMEOUT):
                await client._keys.ready.wait()
            try:
                yield client
            finally:
                with trio.move_on_after(2) as cleanup:
                    cleanup.shield = True
                    await conn.aclose()
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()


async def _enroll(conn: Connection, account: Account, enroll_totp: EnrollTotp | None) -> None:
    """Let ``enroll_totp`` set up TOTP on a restricted session; log the
    session out if that did not happen (so it does not linger unusable)."""
    try:
        if enroll_totp is not None:
            await enroll_totp(account)
    finally:
        if conn.restricted:
            with trio.move_on_after(LOGOUT_GRACE) as cleanup, contextlib.suppress(ClientError):
                cleanup.shield = True
                await conn.logout()
    if conn.restricted:
        raise LoginError(
            "mfa_enrollment_required", "this account must set up TOTP before it can be used"
        )
