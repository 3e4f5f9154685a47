"""Sending Olm-encrypted payloads: open channels where needed, encrypt one
ciphertext per device, and pack them into ``send`` frames.

The relay takes a ``send`` only if it names every current device of every
user it names, plus the sender's own other devices (PROTOCOL §8.2), at most
200 envelopes and ``limits.max_frame_bytes`` in all. A payload for many users
(a room key for a big room) is therefore split into several sends by user,
each with its own message id, and each naming our own other devices again.
Each envelope has its own plaintext, so a device that must be named but has
nothing to get receives a ``dummy`` payload, which receivers ignore.

Ordering: Olm state is written to the store before the ciphertext it made
leaves the device (under the client's Olm lock), as in :mod:`chatd.client.client`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple, Protocol

import trio

from .connection import Connection
from .crypto import OlmMachine, encode_control
from .errors import KeyClaimError
from .store import LocalStore

MAX_CLAIMS: Final = 100  # devices per keys_claim (the server's limit)
MAX_ENVELOPES: Final = 200  # envelopes per send (the server's limit)
DEFAULT_FRAME_BYTES: Final = 65_536  # limits.max_frame_bytes when hello had none
FRAME_SLACK: Final = 1024  # bytes kept free in a frame for the estimate's error
DUMMY: Final = {"kind": "dummy"}  # for a device that must be named but gets nothing


class OlmPeer(Protocol):
    """A device with identity keys (``DeviceRecord`` and ``MemberDevice`` both are)."""

    @property
    def user_id(self) -> int: ...
    @property
    def device_id(self) -> str: ...
    @property
    def curve25519(self) -> str: ...
    @property
    def ed25519(self) -> str: ...


#: Builds the plaintext for one device of one send: (message id, device) -> bytes.
PayloadFor = Callable[[str, OlmPeer], bytes]


class Batch(NamedTuple):
    """One ``send`` of a split payload: its message id, its devices and the reply."""

    message_id: str
    devices: list[OlmPeer]
    reply: dict[str, Any]


def control_for(fields: dict[str, Any], wanted: set[tuple[int, str]] | None = None) -> PayloadFor:
    """Control payload ``fields`` for the devices in ``wanted`` (all if None), ``dummy`` else."""

    def payload(message_id: str, device: OlmPeer) -> bytes:
        chosen = wanted is None or (device.user_id, device.device_id) in wanted
        return encode_control(message_id, device.user_id, fields if chosen else DUMMY)

    return payload


def plan_batches(
    targets: Sequence[OlmPeer], own_user_id: int, envelope_bytes: int, frame_bytes: int
) -> list[list[OlmPeer]]:
    """Split ``targets`` into sends: all devices of one user in the same send,
    our own other devices in every send, at most MAX_ENVELOPES and about
    ``frame_bytes`` per send (each envelope counted as ``envelope_bytes``)."""
    own = [d for d in targets if d.user_id == own_user_id]
    by_user: dict[int, list[OlmPeer]] = {}
    for d in targets:
        if d.user_id != own_user_id:
            by_user.setdefault(d.user_id, []).append(d)
    room = max(1, min(MAX_ENVELOPES, (frame_bytes - FRAME_SLACK) // envelope_bytes) - len(own))
    batches: list[list[OlmPeer]] = []
    current: list[OlmPeer] = []
    for devices in by_user.values():
        if current and len(current) + len(devices) > room:
            batches.append(current)
            current = []
        current = current + devices
    if current or not batches:
        batches.append(current)
    return [own + batch for batch in batches if own or batch]


def estimate_envelope_bytes(plaintext_bytes: int) -> int:
    """Frame bytes one envelope takes for a payload of this size: the Olm
    message (a pre-key message at worst) in base64, its JSON wrapper escaped
    inside the frame, and the user and device ids."""
    return (plaintext_bytes + 220) * 4 // 3 + 160


class OlmSender:
    """Encrypts and sends Olm payloads for the client. ``lock`` is its Olm lock."""

    def __init__(
        self, store: LocalStore, olm: OlmMachine, conn: Connection, lock: trio.Lock
    ) -> None:
        self._store = store
        self._olm = olm
        self._conn = conn
        self._lock = lock

    async def send(
        self,
        message_id: str,
        targets: Sequence[OlmPeer],
        payload: PayloadFor,
        *,
        skip_full: bool = False,
        blob_ids: Sequence[str] = (),
    ) -> dict[str, Any] | None:
        """One ``send`` of ``payload`` to ``targets`` (which must be exactly what
        the relay expects). Returns its reply (``sent`` or ``device_mismatch``),
        or None when there is nobody to send to. With ``skip_full`` the server
        leaves out devices whose queue is full (``sent.skipped``) rather than
        refusing the send. Raises KeyClaimError and the connection's errors."""
        async with self._lock:
            await self.open_channels(targets)
            envelopes = [
                {
                    "user_id": d.user_id,
                    "device_id": d.device_id,
                    "ciphertext": self._olm.encrypt(d.curve25519, payload(message_id, d)),
                }
                for d in targets
            ]
            await self._store.save_olm(None, self._olm.take_dirty())
        if not envelopes:
            return None
        extra: dict[str, Any] = {"skip_full": True} if skip_full else {}
        if blob_ids:
            extra["blob_ids"] = list(blob_ids)  # the attachments it carries (their keys inside)
        return await self._conn.request("send", message_id=message_id, envelopes=envelopes, **extra)

    async def send_split(
        self,
        targets: Sequence[OlmPeer],
        payload: PayloadFor,
        sample: bytes,
        *,
        skip_full: bool = False,
    ) -> list[Batch]:
        """Send ``payload`` to ``targets`` in as many sends as it takes (see
        :func:`plan_batches`; ``sample`` is a payload as large as any). Stops at
        the first reply that is not ``sent`` and returns the batches so far, that
        one last."""
        frame = int(self._conn.limits.get("max_frame_bytes", DEFAULT_FRAME_BYTES))
        batches = plan_batches(
            targets, self._conn.user_id, estimate_envelope_bytes(len(sample)), frame
        )
        done: list[Batch] = []
        for devices in batches:
            message_id = str(uuid.uuid4())
            reply = await self.send(message_id, devices, payload, skip_full=skip_full)
            if reply is None:
                continue
            done.append(Batch(message_id, devices, reply))
            if reply["type"] != "sent":
                break
        return done

    async def open_channels(self, targets: Sequence[OlmPeer]) -> None:
        """Claim keys and open outbound Olm channels to devices we have none with.
        Call with the Olm lock held. Raises KeyClaimError."""
        need = [d for d in targets if not self._olm.has_channel(d.curve25519)]
        for i in range(0, len(need), MAX_CLAIMS):
            batch = {(d.user_id, d.device_id): d for d in need[i : i + MAX_CLAIMS]}
            reply = await self._conn.request(
                "keys_claim",
                devices=[{"user_id": u, "device_id": d} for u, d in batch],
            )
            for key in reply["keys"]:
                device = batch.get((key["user_id"], key["device_id"]))
                if device is not None:
                    self._olm.open_channel(device.ed25519, device.curve25519, key)
            if reply["missing"]:
                names = ", ".join(m["device_id"] for m in reply["missing"])
                raise KeyClaimError(f"no one-time or fallback key left for device(s) {names}")
        if need:
            await self._store.save_olm(self._olm.account_pickle(), self._olm.take_dirty())


def largest_payload(fields: dict[str, Any]) -> bytes:
    """The control payload ``fields`` as large as it gets in any send (for
    :meth:`OlmSender.send_split`'s estimate)."""
    return encode_control(str(uuid.UUID(int=0)), 2**63 - 1, fields)
