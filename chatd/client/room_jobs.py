"""Room key work done in the background, after what caused it is acknowledged.

One task (:meth:`RoomJobs.serve`) runs two loops:

* **Jobs**, one at a time, each under the rooms' send lock (so a job and a
  room message never share or rotate a session at once):
  - a ``room_key_request`` from another device: answered by
    :func:`chatd.client.megolm.reshare_index`'s rule, from a fresh
    ``room_members``;
  - an ``expired`` receipt for an Olm message that carried one of our
    sessions: the session goes again to that device if it is still a member
    device, from the index it had;
  - with the room's ``share_history`` on, a member joined or a member's
    devices changed: our earlier sessions of the room go to their devices,
    each from its first known index.
  Jobs are queued without waiting (at most MAX_JOBS; beyond that one is
  dropped and logged: the inbound worker must never wait on the network).
  A failed job is logged; the rule it applies is applied again the next
  time (another request, another receipt).
* **The key wait.** A held room message whose key has not come within
  ``key_wait_seconds`` of its arrival becomes ``undecryptable`` (reported
  to the application as :class:`RoomUndecryptable`), and a
  ``room_key_request`` goes to the sending device. It stays held: a key that
  comes later still decrypts it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Final

import trio

from .errors import ClientError, DecryptionError
from .megolm import MemberDevice, reshare_index
from .room_events import RoomEventItem, RoomUndecryptable
from .room_keys import member_device
from .room_payloads import RoomKeyRequest
from .room_store import HeldMessage
from .rooms import Rooms
from .store import DeviceRecord, now_ms

log = logging.getLogger(__name__)

MAX_JOBS: Final = 1000  # jobs waiting; more are dropped (and logged)

#: The devices of one user (current, with keys): how a key request finds whom to name.
UserDevices = Callable[[int], Awaitable[list[DeviceRecord]]]


class RoomJobs:
    """The background room work of one device. Start :meth:`serve` in a nursery."""

    def __init__(
        self,
        rooms: Rooms,
        user_devices: UserDevices,
        events: trio.MemorySendChannel[RoomEventItem],
    ) -> None:
        self._rooms = rooms
        self._user_devices = user_devices
        self._events = events
        self._send, self._receive = trio.open_memory_channel[Callable[[], Awaitable[None]]](
            MAX_JOBS
        )
        self._held = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the jobs and the key wait until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._serve_jobs)
            nursery.start_soon(self._serve_key_wait)
            task_status.started()

    def _submit(self, job: Callable[[], Awaitable[None]]) -> None:
        try:
            self._send.send_nowait(job)
        except trio.WouldBlock:
            log.warning("client.room_job_dropped")

    async def _serve_jobs(self) -> None:
        async for job in self._receive:
            try:
                async with self._rooms.send_lock:
                    await job()
            except (ClientError, trio.TooSlowError) as exc:
                log.warning("client.room_job_failed", extra={"error": str(exc)})

    # -- what the inbound worker asks for -------------------------------------

    def held_arrived(self) -> None:
        """A room message was held: the key wait looks at it."""
        self._held.set()

    def key_requested(self, requester: DeviceRecord, fields: dict[str, Any]) -> None:
        try:
            request = RoomKeyRequest.parse(fields)
        except DecryptionError as exc:
            log.warning("client.room_key_request_refused", extra={"error": str(exc)})
            return
        self._submit(partial(self._answer, request.room_id, request.session_id, requester))

    def share_expired(self, message_id: str, device_id: str) -> None:
        """An ``expired`` receipt about an Olm message of ours to ``device_id``."""
        self._submit(partial(self._reshare_expired, message_id, device_id))

    def member_changed(self, room_id: int, user_id: int) -> None:
        """A member joined, or their devices changed (history keys, if the room shares them)."""
        self._submit(partial(self._share_history, room_id, user_id))

    # -- jobs -----------------------------------------------------------------

    async def _answer(
        self, room_id: int, session_id: str, requester: DeviceRecord | MemberDevice
    ) -> None:
        """Share our session ``session_id`` with ``requester`` again, if the rule allows."""
        keys = self._rooms.keys
        own = keys.export(room_id, session_id)
        if own is None:
            return  # not one of our sessions: we only ever share our own
        members = await self._rooms.current_members(room_id, fresh=True)
        asking = member_device(requester)
        now = {(d.user_id, d.device_id): d for d in members.devices()}
        info = await self._rooms.room(room_id)
        share = await self._rooms.store.share(session_id, asking.user_id, asking.device_id)
        index = reshare_index(
            share,
            asking,
            member_device=now.get((asking.user_id, asking.device_id)) == asking,
            share_history=bool(info and info.share_history),
            first_known=own.first_index,
        )
        if index is None:
            log.info("client.room_key_request_declined", extra={"room_id": room_id})
            return
        key = keys.export(room_id, session_id, index)
        if key is not None:
            await self._rooms.share(room_id, key, [asking], members)

    async def _reshare_expired(self, message_id: str, device_id: str) -> None:
        for room_id, session_id, user_id in await self._rooms.store.shares_sent_in(
            message_id, device_id
        ):
            members = await self._rooms.current_members(room_id, fresh=True)
            device = next(
                (d for d in members.devices() if (d.user_id, d.device_id) == (user_id, device_id)),
                None,
            )
            if device is not None:
                await self._answer(room_id, session_id, device)

    async def _share_history(self, room_id: int, user_id: int) -> None:
        info = await self._rooms.room(room_id)
        if info is None or not info.share_history or info.role is None:
            return
        members = await self._rooms.current_members(room_id, fresh=True)
        own = (self._rooms.keys.own.user_id, self._rooms.keys.own.device_id)
        targets = [
            d for d in members.devices() if d.user_id == user_id and (d.user_id, d.device_id) != own
        ]
        for session in self._rooms.keys.own_sessions(room_id):
            need = []
            for d in targets:
                had = await self._rooms.store.share(
                    session.session.session_id, d.user_id, d.device_id
                )
                if (
                    had is None
                    or had.curve25519 != d.curve25519
                    or had.first_index > (session.first_index)
                ):
                    need.append(d)
            if need:
                await self._rooms.share(room_id, session.export(), need, members)

    # -- the key wait ---------------------------------------------------------

    async def _serve_key_wait(self) -> None:
        wait_ms = self._rooms.keys.settings.key_wait_seconds * 1000
        while True:
            if self._held.is_set():
                self._held = trio.Event()
            woken = self._held  # set by a message held from now on
            held = [h for h in await self._rooms.store.held() if h.requested_at is None]
            now = now_ms()
            due = [h for h in held if h.held_at + wait_ms <= now]
            if due:
                marked = set(
                    await self._rooms.store.mark_undecryptable([h.message_id for h in due])
                )
                due = [h for h in due if h.message_id in marked]
                for h in due:
                    await self._events.send(
                        RoomUndecryptable(
                            h.room_id, h.message_id, h.sender_user_id, h.sender_device_id, h.sent_at
                        )
                    )
                try:
                    await self._request_keys(due)
                except (ClientError, trio.TooSlowError) as exc:
                    log.warning("client.room_key_request_failed", extra={"error": str(exc)})
                continue
            if held:
                earliest = min(h.held_at for h in held) + wait_ms
                with trio.move_on_after(max(0.0, (earliest - now) / 1000)):
                    await woken.wait()
            else:
                await woken.wait()

    async def _request_keys(self, held: list[HeldMessage]) -> None:
        """One ``room_key_request`` per (room, sending device, session)."""
        asked = {(h.room_id, h.sender_user_id, h.sender_device_id, h.session_id) for h in held}
        own = self._rooms.keys.own
        for room_id, user_id, device_id, session_id in sorted(asked):

            async def named(user_id: int = user_id) -> list[MemberDevice]:
                users = {user_id, own.user_id}
                return [
                    member_device(d)
                    for u in sorted(users)
                    for d in await self._user_devices(u)
                    if (d.user_id, d.device_id) != (own.user_id, own.device_id)
                ]

            fields = RoomKeyRequest(room_id, session_id).fields()
            await self._rooms.send_control(fields, await named(), {(user_id, device_id)}, named)
