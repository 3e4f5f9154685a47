"""Devices and their keys: binding at login, uploads, claims, the directory.

Theory of operation
-------------------
Every login binds a *device*: a new one (server-assigned id), or an existing
device of the same user named in the login frame. Each device publishes its
vodozemac identity keys once (Ed25519 and Curve25519, self-signed), then
signed one-time keys and one fallback key. Every signature is checked with
PyNaCl before anything is stored; a bad one refuses the whole upload.

A claim hands out each one-time key at most once: it runs as a single
``DELETE ... RETURNING`` inside the one writer thread, so concurrent claims
are serialised by construction and a key is never returned twice. A device
with no one-time key left gives out its fallback key, marked as such. When a
claim leaves a device below ``devices.one_time_key_threshold`` keys, that
device's live connections are told (``key_count`` with ``upload_wanted``),
so running out of keys, the classic cause of undecryptable messages, is
signalled before it happens.

Each user has a ``device_list_version`` that goes up whenever one of their
devices is added or gets its identity keys, so peers notice changes.
"""

from __future__ import annotations

import base64
import secrets
from typing import Any, Final

import trio

from chatd.auth.models import AuthError
from chatd.config import DeviceSettings
from chatd.e2ee import signing
from chatd.e2ee.current import CurrentDevices
from chatd.errors import ChatdError
from chatd.events import UNHEARD, KeyEvents
from chatd.protocol import frames as f
from chatd.store import Store, now_ms

DEVICE_ID_BYTES: Final = 8  # 64 random bits, 13 base32 characters


def new_device_id() -> str:
    return base64.b32encode(secrets.token_bytes(DEVICE_ID_BYTES)).decode().rstrip("=")


def bind_device(
    conn: Any, user_id: int, device_id: str | None, name: str, now: int, max_devices: int
) -> str:
    """In a write job: the device a new session uses. Raises AuthError."""
    if device_id is not None:
        row = conn.execute(
            "SELECT id FROM devices WHERE id = ? AND user_id = ?", (device_id, user_id)
        ).fetchone()
        if row is None:
            raise AuthError("unknown_device", "no device of yours has this id", field="$.device_id")
        conn.execute(
            "UPDATE devices SET name = ?, last_seen_at = ? WHERE id = ?", (name, now, device_id)
        )
        return device_id
    count = conn.execute("SELECT count(*) FROM devices WHERE user_id = ?", (user_id,)).fetchone()[0]
    if count >= max_devices:
        raise AuthError(
            "too_many_devices",
            f"this account already has {count} devices (the limit); remove one first",
        )
    new_id = new_device_id()
    conn.execute(
        "INSERT INTO devices (id, user_id, name, created_at, last_seen_at) VALUES (?, ?, ?, ?, ?)",
        (new_id, user_id, name, now, now),
    )
    conn.execute(
        "UPDATE users SET device_list_version = device_list_version + 1 WHERE id = ?", (user_id,)
    )
    return new_id


def _device_keys_object(user_id: int, device_id: str, keys: f.DeviceKeys) -> dict[str, Any]:
    return {
        "curve25519": keys.curve25519,
        "device_id": device_id,
        "ed25519": keys.ed25519,
        "user_id": user_id,
    }


def _key_object(device_id: str, key: f.SignedKey, *, fallback: bool) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "curve25519": key.curve25519,
        "device_id": device_id,
        "key_id": key.key_id,
    }
    if fallback:
        obj["fallback"] = True
    return obj


class KeyService:
    """Key uploads, claims and the directory. One per daemon."""

    def __init__(
        self,
        store: Store,
        settings: DeviceSettings,
        *,
        current: CurrentDevices,
        events: KeyEvents = UNHEARD,
    ) -> None:
        self.store = store
        self.settings = settings
        self.current = current  # told when a device becomes current or is removed
        self.events = events  # told which devices run low on one-time keys

    async def key_count(self, device_id: str, request_id: str | None = None) -> f.KeyCount:
        def count(conn: Any) -> tuple[int, bool]:
            otks = conn.execute(
                "SELECT count(*) FROM one_time_keys WHERE device_id = ? AND claimed_at IS NULL",
                (device_id,),
            ).fetchone()[0]
            fallback = conn.execute(
                "SELECT 1 FROM fallback_keys WHERE device_id = ?", (device_id,)
            ).fetchone()
            return int(otks), fallback is not None

        otks, fallback = await self.store.read(count)
        return self._count_frame(otks, fallback, request_id)

    def _count_frame(self, otks: int, fallback: bool, request_id: str | None) -> f.KeyCount:
        low = otks < self.settings.one_time_key_threshold or not fallback
        return f.KeyCount(
            id=request_id, one_time_key_count=otks, fallback_key=fallback, upload_wanted=low
        )

    async def upload(self, user_id: int, device_id: str, frame: f.KeysUpload) -> f.KeyCount:
        """Store signed keys after checking every signature. Raises AuthError."""
        current = await self.store.read(
            lambda conn: conn.execute(
                "SELECT ed25519, curve25519 FROM devices WHERE id = ?", (device_id,)
            ).fetchone()
        )
        if current is None:
            raise AuthError("unknown_device", "this session's device no longer exists")
        ed25519 = current[0]
        new_identity = frame.device_keys
        if new_identity is not None:
            if ed25519 is not None and (new_identity.ed25519, new_identity.curve25519) != tuple(
                current
            ):
                raise AuthError(
                    "device_keys_immutable",
                    "this device already has other identity keys; log in as a new device instead",
                    field="$.device_keys",
                )
            ed25519 = new_identity.ed25519
        if ed25519 is None:
            raise AuthError(
                "device_keys_required",
                "upload the device's identity keys first",
                field="$.device_keys",
            )
        bad = await trio.to_thread.run_sync(
            _first_bad_signature, user_id, device_id, ed25519, frame
        )
        if bad is not None:
            raise AuthError(
                "bad_signature",
                "a signature does not verify with the device's Ed25519 identity key",
                field=bad,
            )
        limit = self.settings.max_one_time_keys
        now = now_ms()

        def store_keys(conn: Any) -> tuple[int, bool]:
            # Re-read inside the write: a concurrent upload may have set the
            # identity since the signatures were checked against ``ed25519``.
            now_keys = conn.execute(
                "SELECT ed25519 FROM devices WHERE id = ?", (device_id,)
            ).fetchone()
            if now_keys is None:
                raise AuthError("unknown_device", "this session's device no longer exists")
            if now_keys[0] is not None and now_keys[0] != ed25519:
                raise AuthError(
                    "device_keys_immutable",
                    "this device already has other identity keys; log in as a new device instead",
                    field="$.device_keys",
                )
            if new_identity is not None and now_keys[0] is None:
                conn.execute(
                    "UPDATE devices SET ed25519 = ?, curve25519 = ?, signature = ? WHERE id = ?",
                    (
                        new_identity.ed25519,
                        new_identity.curve25519,
                        new_identity.signature,
                        device_id,
                    ),
                )
                conn.execute(
                    "UPDATE users SET device_list_version = device_list_version + 1 WHERE id = ?",
                    (user_id,),
                )
            for key in frame.one_time_keys:
                conn.execute(
                    "INSERT OR IGNORE INTO one_time_keys (device_id, key_id, curve25519,"
                    " signature, uploaded_at) VALUES (?, ?, ?, ?, ?)",
                    (device_id, key.key_id, key.curve25519, key.signature, now),
                )
            otks = conn.execute(
                "SELECT count(*) FROM one_time_keys WHERE device_id = ? AND claimed_at IS NULL",
                (device_id,),
            ).fetchone()[0]
            if otks > limit:
                raise _TooMany(otks)
            if frame.fallback_key is not None:
                fb = frame.fallback_key
                conn.execute(
                    "INSERT OR REPLACE INTO fallback_keys (device_id, key_id, curve25519,"
                    " signature, uploaded_at) VALUES (?, ?, ?, ?, ?)",
                    (device_id, fb.key_id, fb.curve25519, fb.signature, now),
                )
            fallback = conn.execute(
                "SELECT 1 FROM fallback_keys WHERE device_id = ?", (device_id,)
            ).fetchone()
            return int(otks), fallback is not None

        try:
            result = await self.store.write(store_keys)
            if new_identity is not None:
                self.current.changed((user_id,))  # the device may be current now
        except _TooMany as exc:
            raise AuthError(
                "too_many_keys",
                f"a device may hold at most {limit} unclaimed "
                f"one-time keys (this upload would make {exc.count})",
                field="$.one_time_keys",
            ) from None
        return self._count_frame(result[0], result[1], frame.id)

    async def claim(self, refs: list[f.DeviceRef]) -> tuple[list[f.ClaimedKey], list[f.DeviceRef]]:
        """One key per device, each handed out once. Returns (keys, missing devices)."""
        now = now_ms()
        threshold = self.settings.one_time_key_threshold

        def take(conn: Any) -> tuple[list[f.ClaimedKey], list[f.DeviceRef], list[str]]:
            keys: list[f.ClaimedKey] = []
            missing: list[f.DeviceRef] = []
            low: list[str] = []
            for ref in dict.fromkeys((r.user_id, r.device_id) for r in refs):
                user_id, device_id = ref
                owner = conn.execute(
                    "SELECT 1 FROM devices d JOIN users u ON u.id = d.user_id"
                    " WHERE d.id = ? AND d.user_id = ? AND d.ed25519 IS NOT NULL"
                    " AND u.disabled_at IS NULL",
                    (device_id, user_id),
                ).fetchone()
                row = (
                    owner
                    and conn.execute(
                        "UPDATE one_time_keys SET claimed_at = ? WHERE device_id = ? AND key_id = ("
                        " SELECT key_id FROM one_time_keys WHERE device_id = ?"
                        " AND claimed_at IS NULL ORDER BY uploaded_at, key_id LIMIT 1)"
                        " RETURNING key_id, curve25519, signature",
                        (now, device_id, device_id),
                    ).fetchone()
                )
                fallback = False
                if owner and row is None:
                    row = conn.execute(
                        "SELECT key_id, curve25519, signature FROM fallback_keys"
                        " WHERE device_id = ?",
                        (device_id,),
                    ).fetchone()
                    fallback = row is not None
                    if fallback:
                        conn.execute(
                            "UPDATE fallback_keys SET used_at = coalesce(used_at, ?)"
                            " WHERE device_id = ?",
                            (now, device_id),
                        )
                if not row:
                    missing.append(f.DeviceRef(user_id=user_id, device_id=device_id))
                    continue
                keys.append(
                    f.ClaimedKey(
                        user_id=user_id,
                        device_id=device_id,
                        key_id=row[0],
                        curve25519=row[1],
                        signature=row[2],
                        fallback=fallback,
                    )
                )
                left = conn.execute(
                    "SELECT count(*) FROM one_time_keys WHERE device_id = ? AND claimed_at IS NULL",
                    (device_id,),
                ).fetchone()[0]
                if left < threshold:
                    low.append(device_id)
            return keys, missing, low

        keys, missing, low = await self.store.write(take)
        if low:
            self.events.keys_low(low)
        return keys, missing

    async def remove_device(self, user_id: int, device_id: str) -> list[int]:
        """Delete a device of ``user_id`` with its keys, queue and sessions.

        Returns the ids of the sessions that ended (the caller closes their
        connections). Raises AuthError for a device that is not the user's.
        """

        def remove(conn: Any) -> list[int] | None:
            owned = conn.execute(
                "SELECT 1 FROM devices WHERE id = ? AND user_id = ?", (device_id, user_id)
            ).fetchone()
            if owned is None:
                return None
            sessions = [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM sessions WHERE device_id = ? AND revoked_at IS NULL",
                    (device_id,),
                )
            ]
            conn.execute("DELETE FROM devices WHERE id = ?", (device_id,))
            conn.execute(
                "UPDATE users SET device_list_version = device_list_version + 1 WHERE id = ?",
                (user_id,),
            )
            return sessions

        ended = await self.store.write(remove)
        if ended is None:
            raise AuthError("unknown_device", "no device of yours has this id", field="$.device_id")
        self.current.changed((user_id,))
        return ended

    async def directory(self) -> list[f.Member]:
        """Every enabled member with their devices and identity keys."""

        def read(conn: Any) -> list[f.Member]:
            members: dict[int, f.Member] = {}
            for user_id, username, version in conn.execute(
                "SELECT id, username, device_list_version FROM users WHERE disabled_at IS NULL"
                " ORDER BY username_key"
            ):
                members[user_id] = f.Member(
                    user_id=user_id, username=username, device_list_version=version, devices=[]
                )
            for row in conn.execute(
                "SELECT user_id, id, name, ed25519, curve25519, signature"
                " FROM devices ORDER BY created_at, id"
            ):
                member = members.get(row[0])
                if member is not None:
                    member.devices.append(f.DirectoryDevice(*row[1:]))
            return list(members.values())

        return await self.store.read(read)


CLAIMED_KEYS_KEPT_DAYS: Final = 30


def purge_claimed_keys(conn: Any, *, now: int, limit: int) -> int:
    """Retention job: forget one-time keys handed out more than 30 days ago."""
    cutoff = now - CLAIMED_KEYS_KEPT_DAYS * 86_400_000
    return int(
        conn.execute(
            "DELETE FROM one_time_keys WHERE (device_id, key_id) IN (SELECT device_id, key_id"
            " FROM one_time_keys WHERE claimed_at < ? LIMIT ?)",
            (cutoff, limit),
        ).rowcount
    )


class _TooMany(ChatdError):
    def __init__(self, count: int) -> None:
        super().__init__(count)
        self.count = count


def _first_bad_signature(
    user_id: int, device_id: str, ed25519: str, frame: f.KeysUpload
) -> str | None:
    """The JSON path of the first signature that does not verify, else None (CPU: a thread)."""
    if frame.device_keys is not None:
        obj = _device_keys_object(user_id, device_id, frame.device_keys)
        if not signing.verify(frame.device_keys.ed25519, obj, frame.device_keys.signature):
            return "$.device_keys.signature"
    for i, key in enumerate(frame.one_time_keys):
        if not signing.verify(ed25519, _key_object(device_id, key, fallback=False), key.signature):
            return f"$.one_time_keys[{i}].signature"
    if frame.fallback_key is not None:
        fb = frame.fallback_key
        if not signing.verify(ed25519, _key_object(device_id, fb, fallback=True), fb.signature):
            return "$.fallback_key.signature"
    return None
