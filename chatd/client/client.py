"""The chatd client: end-to-end encrypted one-to-one messages and rooms over the relay.

``open_client`` (:mod:`chatd.client.opening`) opens the local store, connects
and logs in, publishes keys, and runs three background tasks in a nursery it
owns: the connection (:mod:`chatd.client.connection`), the room jobs
(:mod:`chatd.client.room_jobs`), and the inbound worker
(:mod:`chatd.client.inbound`), which handles ``deliver``, pushed
``key_count`` and ``room_invited`` frames one at a time. This module is the
:class:`Client` itself: the directory and device verification, sending
direct messages and files, the history, and the channels the application
reads (``messages()``, ``room_events()``, ``activity()``).

Ordering guarantees
-------------------
* Olm state is written to the store *before* the ciphertext it produced
  leaves the device (:mod:`chatd.client.olm_send`), so a crash can never
  reuse a message key.
* One lock (``_olm_lock``) serialises every use of the Olm account and
  channels, so sending and receiving never interleave inside the ratchet.
* What is received is stored before it is acknowledged, and handed on after
  (see :mod:`chatd.client.inbound`). Keys are published by
  :mod:`chatd.client.keys`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import trio

from . import consent
from .account import Account
from .attachments import Attachment, Attachments
from .connection import Connection
from .consent import ConsentDocument, ConsentStatus
from .crypto import (
    ONE_TIME_KEY_TARGET,
    OlmMachine,
    checked_devices,
    encode_control,
    encode_payload,
    fingerprint,
)
from .errors import ClientError, SendError, VerificationError
from .inbound import Activity, Inbound, ReceivedMessage
from .keys import KeySupply
from .megolm import MemberDevice, RoomSettings
from .olm_send import OlmSender
from .room_events import RoomEventItem
from .room_inbound import RoomInbound
from .room_jobs import RoomJobs
from .room_keys import RoomKeys
from .room_store import RoomStore
from .rooms import Rooms
from .sas import Party
from .store import DeviceRecord, HistoryEntry, LocalStore, now_ms
from .verification import Verification, Verifications

INBOX_MESSAGES: Final = 1000  # received messages buffered for messages()
ACTIVITY_PUSHES: Final = 100  # pushed presence and typing buffered; later ones are dropped
ROOM_EVENTS: Final = 1000  # room messages and events buffered for room_events()
KEYS_READY_TIMEOUT: Final = 30.0  # seconds open_client waits for the first key upload


@dataclass(frozen=True)
class Member:
    user_id: int
    username: str
    devices: list[DeviceRecord]  # devices with published keys


class Client:
    """A logged-in device. Get one from :func:`open_client`."""

    def __init__(
        self,
        store: LocalStore,
        olm: OlmMachine,
        conn: Connection,
        *,
        one_time_keys: int = ONE_TIME_KEY_TARGET,
        fallback_key: str | None = None,
        room_settings: RoomSettings | None = None,
        attachments: Attachments | None = None,
    ) -> None:
        self._store = store
        self._attachments = attachments
        self._olm = olm
        self._conn = conn
        self._olm_lock = trio.Lock()
        self._keys = KeySupply(
            store,
            olm,
            conn,
            self._olm_lock,
            one_time_keys=one_time_keys,
            fallback_key=fallback_key,
        )
        self._olm_send = OlmSender(store, olm, conn, self._olm_lock)
        self._members: dict[int, Member] = {}
        self._changed = trio.Event()
        self._inbox_send, self._inbox = trio.open_memory_channel[ReceivedMessage](INBOX_MESSAGES)
        self._verifications = Verifications(self._party, self._send_control, self._mark_verified)
        self._room_settings = room_settings or RoomSettings()
        self._room_events_send, self._room_events = trio.open_memory_channel[RoomEventItem](
            ROOM_EVENTS
        )
        self._activity_send, self._activity = trio.open_memory_channel[Activity](ACTIVITY_PUSHES)
        self._rooms: Rooms | None = None
        self._inbound: Inbound | None = None
        #: Password, TOTP, sessions and devices of this user (docs/CLIENT.md).
        self.account = Account(conn, self.directory)

    @staticmethod
    def register(
        url: str, invite_code: str, username: str, password: str, **options: Any
    ) -> AbstractAsyncContextManager[Client]:
        """Create an account with an invite code (``chatctl invites create``)
        and open it on a new device: ``async with Client.register(url, code,
        "bob", "bob's own password", device_name=..., store_path=...,
        store_key=...) as client``. The same as ``open_client(...,
        invite_code=...)``; takes its other options. Refusals are LoginError
        with ``invalid_invite``, ``username_taken``, ``invalid_username`` or
        ``weak_password``."""
        from .opening import open_client  # opening imports this module

        return open_client(url, username, password, invite_code=invite_code, **options)

    async def _open_rooms(self, pickle_key: bytes) -> RoomJobs:
        """Load the Megolm state (once logged in: it needs our device id)."""
        own = MemberDevice(self.user_id, self.device_id, self._olm.curve25519, self._olm.ed25519)
        room_store = RoomStore(self._store)
        keys = await RoomKeys.open(room_store, pickle_key, own, self._room_settings)
        self._rooms = rooms = Rooms(
            self._conn, self._store, room_store, keys, self._olm_send, self._attachments
        )
        rooms.on_change = self._notify
        jobs = RoomJobs(rooms, self._user_devices, self._room_events_send)
        self._inbound = Inbound(
            self._store,
            self._olm,
            self._conn,
            self._olm_lock,
            self._keys,
            self._verifications,
            rooms,
            jobs,
            RoomInbound(self._store, rooms, jobs, self._sender_device),
            sender_device=self._sender_device,
            notify=self._notify,
            inbox=self._inbox_send,
            room_events=self._room_events_send,
            activity=self._activity_send,
        )
        return jobs

    @property
    def rooms(self) -> Rooms:
        """Room requests and room messages (see :class:`chatd.client.rooms.Rooms`)."""
        if self._rooms is None:  # pragma: no cover - open_client opens them before yielding
            raise ClientError("the client is not open")
        return self._rooms

    def room_events(self) -> trio.MemoryReceiveChannel[RoomEventItem]:
        """Room messages (decrypted, stored), undecryptable-message notices,
        room events and invitations, in delivery order. One consumer; buffered
        up to ROOM_EVENTS, then delivery waits."""
        return self._room_events

    async def _user_devices(self, user_id: int) -> list[DeviceRecord]:
        members = await self.directory()
        return next((m.devices for m in members if m.user_id == user_id), [])

    @property
    def user_id(self) -> int:
        return self._conn.user_id

    @property
    def device_id(self) -> str:
        return self._conn.credentials.device_id or ""

    @property
    def connection(self) -> Connection:
        return self._conn

    # -- directory and verification -------------------------------------------

    async def directory(self) -> list[Member]:
        """Fetch the team's members and their devices. Checks every device's
        self-signature (devices that fail are left out) and records devices
        not seen before as unverified. Raises IdentityChangedError if a known
        device now shows different identity keys."""
        reply = await self._conn.request("directory")
        known = {(d.user_id, d.device_id): d for d in await self._store.devices()}
        members, seen = [], []
        own = (self.user_id, self.device_id)
        for m in reply["members"]:
            devices = checked_devices(m["user_id"], m["devices"], known, own)
            seen.extend(devices)
            members.append(Member(m["user_id"], m["username"], devices))
        await self._store.replace_devices(seen)
        self._members = {m.user_id: m for m in members}
        return members

    async def devices(self) -> list[DeviceRecord]:
        """Every device seen in the directory so far, with its ``verified`` flag."""
        return await self._store.devices()

    async def verify_device(self, user_id: int, device_id: str, expected_fingerprint: str) -> None:
        """Mark a device verified after its owner read you its fingerprint
        (compare out of band). Raises ClientError if it does not match."""
        for d in await self._store.devices():
            if (d.user_id, d.device_id) == (user_id, device_id):
                if fingerprint(d.ed25519) != " ".join(expected_fingerprint.upper().split()):
                    raise ClientError(f"the fingerprint of device {device_id} does not match")
                await self._store.set_verified(user_id, device_id, True)
                return
        raise ClientError(f"unknown device {device_id}; refresh the directory first")

    @property
    def fingerprint(self) -> str:
        """This device's fingerprint, to read out to people verifying it."""
        return fingerprint(self._olm.ed25519)

    async def start_verification(self, user_id: int, device_id: str) -> Verification:
        """Start an interactive SAS verification (emoji or numbers) with another
        device, of another user or our own. Returns once ``verify_start`` is
        queued by the server; then ``await v.sas()``, compare, ``await
        v.confirm()`` and ``await v.done()``. Raises ClientError for an unknown
        device or this device, and the errors of :meth:`send_text`."""
        if (user_id, device_id) == (self.user_id, self.device_id):
            raise ClientError("a device cannot verify itself")
        device = await self._sender_device(user_id, device_id)
        if device is None or not device.current:
            raise ClientError(f"unknown device {device_id} of user {user_id}")
        return await self._verifications.start(
            Party(device.user_id, device.device_id, device.ed25519)
        )

    def verification_requests(self) -> trio.MemoryReceiveChannel[Verification]:
        """Verifications other devices start with this one, as they arrive. One
        consumer; ``await v.sas()`` accepts one, ``await v.cancel()`` declines it.
        Requests beyond MAX_VERIFICATIONS are declined (``busy``)."""
        return self._verifications.requests

    def _party(self) -> Party:
        return Party(self.user_id, self.device_id, self._olm.ed25519)

    async def _mark_verified(self, device: Party) -> None:
        for d in await self._store.devices():
            if (d.user_id, d.device_id, d.ed25519) == (
                device.user_id,
                device.device_id,
                device.ed25519,
            ):
                await self._store.set_verified(d.user_id, d.device_id, True)
                return
        raise VerificationError(
            "mac_mismatch", f"device {device.device_id} has other keys than the ones verified"
        )

    # -- sending --------------------------------------------------------------

    def _targets(self, user_id: int) -> list[DeviceRecord]:
        users = {user_id, self.user_id}
        return [
            d
            for u in users
            if u in self._members
            for d in self._members[u].devices
            if (d.user_id, d.device_id) != (self.user_id, self.device_id)
        ]

    # -- consent ---------------------------------------------------------------------

    @property
    def consent_required(self) -> list[ConsentDocument]:
        """The documents (terms, privacy notice) the server asks this user to
        accept before anything else; empty when there are none. While not
        empty, requests other than consent and account ones are refused with
        ServerRefusedError ``consent_required`` (docs/CLIENT.md, Consent)."""
        return consent.required_documents(self._conn)

    async def consent_status(self) -> ConsentStatus:
        """Every current document on the server, and the kinds still to accept."""
        return await consent.status(self._conn)

    async def accept_consent(self, kind: str, version: str) -> None:
        """Accept ``version`` of document ``kind`` (``terms`` or ``privacy``).
        Raises ServerRefusedError ``consent_version_mismatch`` when it is not
        the current version (fetch :meth:`consent_status` and show that one)."""
        await consent.accept(self._conn, kind, version)

    async def revoke_consent(self, kind: str) -> None:
        """Withdraw the acceptance of ``kind``: the server refuses this user
        everything but consent and account requests until it is accepted again."""
        await consent.revoke(self._conn, kind)

    # -- push wake-ups ---------------------------------------------------------------

    async def register_push(
        self, url: str, *, p256dh: str | None = None, auth: str | None = None
    ) -> None:
        """Have the server send this device content-free wake-ups at ``url``
        (a UnifiedPush endpoint, e.g. an ntfy topic URL) while it has no live
        connection; replaces an earlier endpoint. With ``p256dh`` and
        ``auth`` (RFC 8291, base64url, both or neither) each wake-up's body is
        encrypted to them. Raises ServerRefusedError (``push_url_refused``,
        ``bad_push_key``, ``push_disabled``, ``bad_frame`` naming the field)
        or ClientError when the server does not offer push."""
        if "push" not in self._conn.features:
            raise ClientError("this server does not offer push wake-ups")
        fields: dict[str, str] = {"url": url}
        if p256dh is not None:
            fields["p256dh"] = p256dh
        if auth is not None:
            fields["auth"] = auth
        await self._conn.request("push_register", **fields)

    async def remove_push(self) -> None:
        """Send this device no more wake-ups (fine with none registered)."""
        if "push" not in self._conn.features:
            raise ClientError("this server does not offer push wake-ups")
        await self._conn.request("push_remove")

    async def send_text(self, user_id: int, text: str) -> str:
        """Send ``text`` to every device of ``user_id`` and to our own other
        devices, each encrypted with Olm. Returns the message id once the
        server has queued it durably. A ``device_mismatch`` refreshes the
        directory and retries once. Raises SendError, ServerRefusedError,
        KeyClaimError or ConnectionLostError; the message then stays in the
        history with state ``sending``."""
        message_id = str(uuid.uuid4())
        peer = user_id
        await self._store.add_message(
            HistoryEntry(
                message_id, peer, "out", self.user_id, self.device_id, text, now_ms(), "sending"
            )
        )
        await self._send_payload(message_id, user_id, encode_payload(message_id, user_id, text))
        await self._store.set_state(message_id, "sent", only_from="sending")
        return message_id

    async def send_file(
        self, user_id: int, path: Path, *, media_type: str | None = None, text: str | None = None
    ) -> tuple[str, Attachment]:
        """Encrypt the file at ``path`` here, upload its ciphertext, and send
        ``user_id`` (and our other devices) a message carrying its key, as
        :meth:`send_text` does. ``media_type`` defaults to a guess from the
        name and must be in the allowlist. Returns the message id and the
        attachment. Raises AttachmentError, ServerRefusedError (too_large,
        quota_exceeded) and what send_text raises."""
        attachments = self._need_attachments()
        attachment = await attachments.upload(path, media_type)
        message_id = str(uuid.uuid4())
        shown = text if text is not None else f"[file] {attachment.name}"
        await self._store.add_message(
            HistoryEntry(
                message_id,
                user_id,
                "out",
                self.user_id,
                self.device_id,
                shown,
                now_ms(),
                "sending",
                attachment=attachment,
            )
        )
        payload = encode_payload(message_id, user_id, shown, attachment=attachment.fields())
        await self._send_payload(message_id, user_id, payload, blob_ids=[attachment.blob_id])
        await self._store.set_state(message_id, "sent", only_from="sending")
        return message_id, attachment

    async def save_file(self, attachment: Attachment, target: Path) -> Path:
        """Download ``attachment`` (from a received message), check its
        SHA-256 and size, decrypt it and write it to ``target`` (a new file,
        or a directory to save it in under the sender's file name). Returns
        the path written. Raises AttachmentError, DecryptionError,
        ServerRefusedError (blob_not_found: expired, or not sent to us)."""
        return await self._need_attachments().download(attachment, target)

    async def export_account(
        self, path: str | Path, password: str, totp: str | None = None
    ) -> Path:
        """Download everything the server holds about this account (a ZIP of
        JSON files with ``manifest.json``) into ``path``, a file that must not
        exist yet. The server asks for the password again (and ``totp``, a
        TOTP or recovery code, when the account has TOTP). Returns the path.
        Raises ServerRefusedError (``reauth_failed``, ``mfa_required``,
        ``rate_limited``) or AttachmentError (the download failed; no file is
        left)."""
        fields: dict[str, Any] = {"password": password}
        if totp:
            fields["totp"] = totp
        reply = await self._conn.request("export_account", **fields)
        return await self._need_attachments().fetch(reply["url"], Path(path))

    def _need_attachments(self) -> Attachments:
        if self._attachments is None:
            raise ClientError("this client was opened without attachments")
        return self._attachments

    async def resend(self, message_id: str) -> None:
        """Send again a message of ours that is still ``sending`` (it did not
        reach the server: the recipient had no device yet, or the connection
        was down), under the same message id, so the server takes it at most
        once. Raises ClientError if there is no such message, and the errors
        of :meth:`send_text`."""
        entry = next((e for e in await self.history() if e.message_id == message_id), None)
        if entry is None or entry.direction != "out" or entry.state != "sending":
            raise ClientError(f"no unsent message {message_id}")
        if entry.text is None or entry.room_id is not None:  # pragma: no cover - not ours
            raise ClientError(f"message {message_id} is not a direct text message")
        peer = entry.peer_user_id
        await self._send_payload(message_id, peer, encode_payload(message_id, peer, entry.text))
        await self._store.set_state(message_id, "sent", only_from="sending")

    def activity(self) -> trio.MemoryReceiveChannel[Activity]:
        """What the server pushes about people, never stored: PresenceChange
        for the users this connection watches (the people it exchanged
        messages or typing notices with, or named in :meth:`watch_presence`),
        and TypingNotice when someone types to us. One consumer; at most
        ACTIVITY_PUSHES wait, later ones are dropped."""
        return self._activity

    async def watch_presence(self, user_ids: list[int]) -> set[int]:
        """Which of ``user_ids`` are online now; the connection then watches
        them (their changes come as PresenceChange in :meth:`activity`). On a
        server without ``who_is_online.user_ids``: every online user, and
        nobody is watched."""
        if "who_is_online.user_ids" in self._conn.features:
            reply = await self._conn.request("who_is_online", user_ids=user_ids)
        else:  # pragma: no cover - every chatd server lists the feature
            reply = await self._conn.request("who_is_online")
        return set(reply.get("online", []))

    async def app_value(self, name: str) -> str | None:
        """A value the application kept in the encrypted store with
        :meth:`set_app_value` (for example the conversation open last)."""
        return (await self._store.meta()).get(f"app.{name}")

    async def set_app_value(self, name: str, value: str) -> None:
        """Keep a short value of the application's in the encrypted store."""
        await self._store.set_meta(**{f"app.{name}": value})

    async def send_typing(self, user_id: int, active: bool) -> None:
        """Tell ``user_id``'s online devices that we started (or stopped)
        typing to them. Best effort: no reply, dropped while disconnected."""
        await self._conn.send_frame("typing", to_user_id=user_id, active=active)

    async def _send_control(self, user_id: int, fields: dict[str, Any]) -> None:
        """Send a payload that is not a chat message (kept out of the history)."""
        message_id = str(uuid.uuid4())
        await self._send_payload(message_id, user_id, encode_control(message_id, user_id, fields))

    async def _send_payload(
        self, message_id: str, user_id: int, payload: bytes, *, blob_ids: Sequence[str] = ()
    ) -> None:
        """Encrypt ``payload`` for every device of ``user_id`` and our own other
        devices, and send it as message ``message_id``."""
        if user_id not in self._members or self.user_id not in self._members:
            await self.directory()
        for attempt in range(2):
            targets = self._targets(user_id)
            if not any(d.user_id == user_id for d in targets) and user_id != self.user_id:
                raise SendError(f"user {user_id} has no device with published keys")
            reply = await self._olm_send.send(
                message_id, targets, lambda _m, _d: payload, blob_ids=blob_ids
            )
            if reply is None or reply["type"] == "sent":
                return  # None: a note to self on our only device, nothing to relay
            if reply["type"] == "device_mismatch" and attempt == 0:
                await self.directory()
                continue
            raise SendError(f"the server refused the device list of message {message_id}")

    # -- receiving ------------------------------------------------------------

    def messages(self) -> trio.MemoryReceiveChannel[ReceivedMessage]:
        """Received messages, in delivery order (already decrypted and stored).
        One consumer; buffered up to INBOX_MESSAGES, then delivery waits."""
        return self._inbox

    async def history(self, peer_user_id: int | None = None) -> list[HistoryEntry]:
        """The conversation with one user (or everything), oldest first."""
        return await self._store.history(peer_user_id)

    async def wait_state(self, message_id: str, state: str) -> None:
        """Wait until a message in the history reaches ``state`` (for example
        ``delivered`` once a recipient device acknowledged it)."""
        while True:
            changed = self._changed
            if any(e.message_id == message_id and e.state == state for e in await self.history()):
                return
            await changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _serve_inbound(self) -> None:
        """Run the inbound worker (:mod:`chatd.client.inbound`) until cancelled."""
        if self._inbound is None:  # pragma: no cover - open_client opens the rooms first
            raise ClientError("the client is not open")
        await self._inbound.serve()

    async def _sender_device(self, user_id: int, device_id: str) -> DeviceRecord | None:
        """The sending device as we know it; a device we have not seen yet
        makes us fetch the directory once."""
        device = await self._store.device(user_id, device_id)
        if device is None:
            await self.directory()
            device = await self._store.device(user_id, device_id)
        return device
