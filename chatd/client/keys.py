"""This device's key supply on the server: its identity keys (once), one-time
keys kept near a target, and a fallback key that is replaced once it was used.

The server hands out a device's fallback key only when its one-time keys have
run out, and then to every claim until the device uploads a new one. Each use
weakens it a little (it is not single-use), so the device replaces it as soon
as it sees it used: when a pre-key message opens a new Olm channel with the
fallback key it last published (:meth:`KeySupply.noticed`, called from the
decryption that found it). The flag ``fallback_used`` is stored with that
message, so a crash before the replacement is uploaded still replaces it on
the next ``key_count``. vodozemac keeps the previous fallback key too, so
peers who claimed the old one before the replacement can still open channels.

Ordering: the private halves of new keys are stored (in the account pickle)
before their public halves are uploaded, and marked published only once the
server accepted them; a key made but never accepted is offered again rather
than replaced.
"""

from __future__ import annotations

from typing import Any, Final

import trio

from .connection import Connection
from .crypto import ONE_TIME_KEY_TARGET, OlmMachine
from .store import LocalStore

#: At most this many one-time keys on the server: vodozemac's
#: ``max_number_of_one_time_keys``. The account holds twice that (published and
#: new) and forgets the oldest beyond it, which could be keys still on the server.
MAX_ONE_TIME_KEYS: Final = 50


class KeySupply:
    """Publishes this device's keys. ``olm_lock`` is the client's Olm lock."""

    def __init__(
        self,
        store: LocalStore,
        olm: OlmMachine,
        conn: Connection,
        olm_lock: trio.Lock,
        *,
        one_time_keys: int = ONE_TIME_KEY_TARGET,
        fallback_key: str | None = None,
    ) -> None:
        self._store = store
        self._olm = olm
        self._conn = conn
        self._olm_lock = olm_lock
        self._lock = trio.Lock()
        self._target = one_time_keys
        # Top up below half (at least below one), or when the server asks.
        self._low = max(1, (one_time_keys + 1) // 2)
        self._fallback_key = fallback_key  # the published one, to notice when it is used
        #: Set once the first key_count was answered (the keys are on the server).
        self.ready = trio.Event()
        #: The published fallback key was used and is not replaced yet.
        self.rotation_due = False

    def noticed(self, one_time_key: str | None) -> dict[str, str] | None:
        """After a decryption that opened a channel with ``one_time_key``: the
        meta values to store with the message if that was our published
        fallback key (then :meth:`rotate_fallback` is due), else None."""
        if one_time_key is None or one_time_key != self._fallback_key:
            return None
        self.rotation_due = True
        return {"fallback_used": "1"}

    async def top_up(self, count: dict[str, Any]) -> None:
        """Answer a key_count: identity keys once, one-time keys up to the
        target when they run low, and a fallback key when the server has none,
        ours was used, or we do not know which one it has."""
        async with self._lock:
            meta = await self._store.meta()
            have = int(count["one_time_key_count"])
            wanted = 0
            if have < self._low or count.get("upload_wanted"):
                wanted = max(0, self._target - have)
            fallback = (
                not count.get("fallback_key")
                or meta.get("fallback_used") == "1"
                or "fallback_key" not in meta
            )
            await self._publish(meta, wanted, fallback=fallback)
            self.ready.set()

    async def rotate_fallback(self) -> None:
        """Upload a new fallback key: the published one was used."""
        async with self._lock:
            meta = await self._store.meta()
            if meta.get("fallback_used") == "1":
                await self._publish(meta, 0, fallback=True)
            self.rotation_due = False

    async def _publish(self, meta: dict[str, str], one_time: int, *, fallback: bool) -> None:
        """One keys_upload (call with ``_lock`` held)."""
        user_id, device_id = self._conn.user_id, self._conn.credentials.device_id or ""
        upload: dict[str, Any] = {}
        if meta.get("published") != device_id:
            upload["device_keys"] = self._olm.device_keys(user_id, device_id)
        async with self._olm_lock:
            if one_time:
                upload["one_time_keys"] = self._olm.new_one_time_keys(device_id, one_time)
            if fallback:
                upload["fallback_key"] = self._olm.new_fallback_key(device_id)
            if one_time or fallback:
                # Private keys are stored before their public halves leave.
                await self._store.save_olm(self._olm.account_pickle(), [])
        if not upload:
            return
        await self._conn.request("keys_upload", **upload)
        accepted: dict[str, str] = {"published": device_id}
        if fallback:
            accepted |= {"fallback_key": upload["fallback_key"]["curve25519"], "fallback_used": ""}
        async with self._olm_lock:
            self._olm.mark_published()
            await self._store.save_olm(self._olm.account_pickle(), [], accepted)
        if fallback:
            self._fallback_key = accepted["fallback_key"]
