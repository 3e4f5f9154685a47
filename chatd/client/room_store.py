"""The rooms' part of the local store: rooms, Megolm sessions, who each of our
sessions was shared with, and room messages held until their key comes.

Same file, connection and rules as :class:`chatd.client.store.LocalStore`
(every call in a worker thread, each write one transaction committed with
``synchronous=FULL``). Megolm pickles are sealed with the same key as the Olm
ones. Writes that belong together are one transaction: a received ``room_key``
with the Olm state that decrypted it, its control record, the inbound session
and the held messages it opened; a received room message with the inbound
session state its decryption changed.

A *held* message is in the history with state ``held`` (no text) and in
``held_messages`` with its ciphertext. After the key wait it becomes
``undecryptable`` ("cannot decrypt, ask the sender to resend"), still held;
when its key comes it is decrypted, becomes ``received`` and leaves
``held_messages``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from .attachments import Attachment
from .megolm import InboundRow, MemberDevice, OutboundRow, Share
from .store import (
    HISTORY_COLUMNS,
    HistoryEntry,
    LocalStore,
    attachment_column,
    history_entry,
    now_ms,
)

#: (room id, pickle, created_at, messages, shares) as MegolmMachine.restore takes them
OutboundState = tuple[int, str, int, int, dict[tuple[int, str], Share]]


@dataclass(frozen=True)
class RoomInfo:
    """A room as the server describes it (``RoomInfo`` in the protocol)."""

    room_id: int
    kind: str  # channel | group
    name: str
    topic: str
    invite_only: bool
    share_history: bool
    created_at: int  # unix ms
    member_count: int
    role: str | None = None  # ours: owner | moderator | member; None when not a member
    epoch: int | None = None  # only for rooms we are in

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> RoomInfo:
        return cls(
            int(obj["room_id"]),
            str(obj["kind"]),
            str(obj["name"]),
            str(obj.get("topic", "")),
            bool(obj.get("invite_only", False)),
            bool(obj.get("share_history", False)),
            int(obj.get("created_at", 0)),
            int(obj.get("member_count", 0)),
            obj.get("role"),
            obj.get("epoch"),
        )


@dataclass(frozen=True)
class HeldMessage:
    message_id: str
    room_id: int
    sender_user_id: int
    sender_device_id: str
    session_id: str
    ciphertext: str
    sent_at: int  # unix ms, as the server recorded it
    held_at: int  # unix ms, when this device stored it
    requested_at: int | None  # when a room_key_request went out (it is undecryptable since)


class OlmWrite(NamedTuple):
    """Olm state to commit with a room write (see LocalStore.write_olm)."""

    account: str | None
    channels: list[tuple[str, str, str]]
    meta: dict[str, str] | None = None


def _write_megolm(conn: Any, outbound: list[OutboundRow], inbound: list[InboundRow]) -> None:
    conn.executemany(
        "INSERT OR REPLACE INTO megolm_outbound (room_id, session_id, pickle, created_at, messages)"
        " VALUES (?, ?, ?, ?, ?)",
        outbound,
    )
    now = now_ms()
    conn.executemany(
        "INSERT INTO megolm_inbound (room_id, sender_user_id, sender_device_id, session_id,"
        " sender_curve25519, sender_ed25519, first_index, pickle, received_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET"
        " first_index = excluded.first_index, pickle = excluded.pickle",
        [
            (
                r.room_id,
                r.sender.user_id,
                r.sender.device_id,
                r.session_id,
                r.sender.curve25519,
                r.sender.ed25519,
                r.first_index,
                r.pickle,
                now,
            )
            for r in inbound
        ],
    )


_HELD_COLUMNS = (
    "h.message_id, h.room_id, h.sender_user_id, h.sender_device_id, h.session_id,"
    " h.ciphertext, m.sent_at, h.held_at, h.requested_at"
)


class RoomStore:
    """Rooms and Megolm state in the device's :class:`LocalStore`."""

    def __init__(self, store: LocalStore) -> None:
        self._store = store

    # -- rooms ----------------------------------------------------------------

    async def save_rooms(self, rooms: list[RoomInfo]) -> None:
        """Record rooms as the server described them (replacing what we had)."""
        await self._store.write(
            lambda c: c.executemany(
                "INSERT OR REPLACE INTO rooms (room_id, kind, name, topic, invite_only,"
                " share_history, created_at, member_count, role, epoch)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        r.room_id,
                        r.kind,
                        r.name,
                        r.topic,
                        int(r.invite_only),
                        int(r.share_history),
                        r.created_at,
                        r.member_count,
                        r.role,
                        r.epoch,
                    )
                    for r in rooms
                ],
            )
        )

    async def rooms(self) -> list[RoomInfo]:
        rows = await self._store.read(
            lambda c: c.execute(
                "SELECT room_id, kind, name, topic, invite_only, share_history, created_at,"
                " member_count, role, epoch FROM rooms ORDER BY room_id"
            ).fetchall()
        )
        return [
            RoomInfo(r[0], r[1], r[2], r[3], bool(r[4]), bool(r[5]), r[6], r[7], r[8], r[9])
            for r in rows
        ]

    async def room(self, room_id: int) -> RoomInfo | None:
        return next((r for r in await self.rooms() if r.room_id == room_id), None)

    async def update_room(self, room_id: int, **values: Any) -> None:
        """Set some of ``topic``, ``role``, ``epoch``, ``name``, ``member_count``."""
        allowed = {"topic", "role", "epoch", "name", "member_count"}
        if not values.keys() <= allowed:
            raise ValueError(f"not a room column: {sorted(values.keys() - allowed)}")
        sets = ", ".join(f"{name} = ?" for name in values)
        await self._store.write(
            lambda c: c.execute(
                f"UPDATE rooms SET {sets} WHERE room_id = ?",  # noqa: S608 - names checked above
                (*values.values(), room_id),
            )
        )

    # -- Megolm sessions ------------------------------------------------------

    async def megolm_state(self) -> tuple[list[OutboundState], list[tuple[int, MemberDevice, str]]]:
        """Everything :meth:`MegolmMachine.restore` needs."""

        def read(conn: Any) -> tuple[list[OutboundState], list[tuple[int, MemberDevice, str]]]:
            outbound: list[OutboundState] = []
            for room_id, session_id, pickle, created_at, messages in conn.execute(
                "SELECT room_id, session_id, pickle, created_at, messages FROM megolm_outbound"
            ).fetchall():
                shares = {
                    (u, d): Share(curve, index)
                    for u, d, curve, index in conn.execute(
                        "SELECT user_id, device_id, curve25519, first_index FROM megolm_shares"
                        " WHERE session_id = ?",
                        (session_id,),
                    ).fetchall()
                }
                outbound.append((room_id, pickle, created_at, messages, shares))
            inbound = [
                (r[0], MemberDevice(r[1], r[2], r[3], r[4]), r[5])
                for r in conn.execute(
                    "SELECT room_id, sender_user_id, sender_device_id, sender_curve25519,"
                    " sender_ed25519, pickle FROM megolm_inbound"
                ).fetchall()
            ]
            return outbound, inbound

        return await self._store.read(read)

    async def save_megolm(
        self,
        dirty: tuple[list[OutboundRow], list[InboundRow]],
        olm: OlmWrite | None = None,
    ) -> None:
        """Changed Megolm sessions (and Olm state that goes with them), in one transaction."""

        def write(conn: Any) -> None:
            if olm is not None:
                LocalStore.write_olm(conn, olm.account, olm.channels, olm.meta)
            _write_megolm(conn, *dirty)

        await self._store.write(write)

    async def forget_outbound(self, room_id: int) -> None:
        await self._store.write(
            lambda c: c.execute("DELETE FROM megolm_outbound WHERE room_id = ?", (room_id,))
        )

    # -- shares ---------------------------------------------------------------

    async def add_shares(
        self,
        room_id: int,
        session_id: str,
        devices: list[MemberDevice],
        first_index: int,
        message_id: str,
    ) -> None:
        """Our session ``session_id`` went to ``devices`` in Olm message ``message_id``.
        A device keeps the lowest index it was ever given."""
        now = now_ms()
        await self._store.write(
            lambda c: c.executemany(
                "INSERT INTO megolm_shares (session_id, user_id, device_id, room_id, curve25519,"
                " first_index, message_id, shared_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT DO UPDATE SET message_id = excluded.message_id,"
                " shared_at = excluded.shared_at, first_index = CASE"
                " WHEN curve25519 != excluded.curve25519 THEN excluded.first_index"
                " ELSE min(first_index, excluded.first_index) END,"
                " curve25519 = excluded.curve25519",
                [
                    (
                        session_id,
                        d.user_id,
                        d.device_id,
                        room_id,
                        d.curve25519,
                        first_index,
                        message_id,
                        now,
                    )
                    for d in devices
                ],
            )
        )

    async def share(self, session_id: str, user_id: int, device_id: str) -> Share | None:
        """How our session ``session_id`` was given to a device, if it was."""
        row = await self._store.read(
            lambda c: c.execute(
                "SELECT curve25519, first_index FROM megolm_shares"
                " WHERE session_id = ? AND user_id = ? AND device_id = ?",
                (session_id, user_id, device_id),
            ).fetchone()
        )
        return None if row is None else Share(row[0], row[1])

    async def share_message(self, session_id: str, user_id: int, device_id: str) -> str | None:
        """The Olm message that last gave our session ``session_id`` to a device."""
        row = await self._store.read(
            lambda c: c.execute(
                "SELECT message_id FROM megolm_shares"
                " WHERE session_id = ? AND user_id = ? AND device_id = ?",
                (session_id, user_id, device_id),
            ).fetchone()
        )
        return None if row is None else str(row[0])

    async def shares_sent_in(self, message_id: str, device_id: str) -> list[tuple[int, str, int]]:
        """(room id, session id, user id) of the shares Olm message ``message_id``
        carried to ``device_id`` (an ``expired`` receipt names both)."""
        rows = await self._store.read(
            lambda c: c.execute(
                "SELECT room_id, session_id, user_id FROM megolm_shares"
                " WHERE message_id = ? AND device_id = ?",
                (message_id, device_id),
            ).fetchall()
        )
        return [(r[0], r[1], r[2]) for r in rows]

    # -- room messages ----------------------------------------------------------

    async def has_message(self, message_id: str) -> bool:
        return await self._store.has_message(message_id)

    async def add_room_message(
        self,
        entry: HistoryEntry,
        dirty: tuple[list[OutboundRow], list[InboundRow]] = ([], []),
        **room: Any,
    ) -> bool:
        """A room message (sent, or received and decrypted) with the Megolm state
        it changed, in one transaction. False for a message id (or, received, a
        Megolm session and index) already in the history: a duplicate or a replay."""

        def write(conn: Any) -> bool:
            _write_megolm(conn, *dirty)
            return LocalStore.insert_message(conn, entry, **room)

        return await self._store.write(write)

    async def add_room_key(
        self,
        message_id: str,
        sender: tuple[int, str],
        olm: OlmWrite,
        dirty: tuple[list[OutboundRow], list[InboundRow]],
        released: list[Released],
    ) -> tuple[bool, list[str]]:
        """A received ``room_key`` (Olm payload ``message_id``), the Olm state that
        decrypted it, the session it brought and the held messages it opened,
        in one transaction. Returns (new, ids of the released messages); not
        new when the payload was recorded before (nothing is written then but
        the Olm state)."""

        def write(conn: Any) -> tuple[bool, list[str]]:
            LocalStore.write_olm(conn, olm.account, olm.channels, olm.meta)
            if not LocalStore.insert_control(conn, message_id, "room_key", sender):
                return False, []
            _write_megolm(conn, *dirty)
            return True, [r.message_id for r in released if release(conn, r)]

        return await self._store.write(write)

    async def release(
        self, dirty: tuple[list[OutboundRow], list[InboundRow]], released: list[Released]
    ) -> list[str]:
        """Held messages decrypted (by a key stored before), with the Megolm state."""

        def write(conn: Any) -> list[str]:
            _write_megolm(conn, *dirty)
            return [r.message_id for r in released if release(conn, r)]

        return await self._store.write(write)

    # -- held messages ----------------------------------------------------------

    async def hold(self, entry: HistoryEntry, session_id: str, ciphertext: str) -> bool:
        """Keep a room message whose key has not come: in the history as
        ``held``, with its ciphertext. False for a message id seen before."""

        def write(conn: Any) -> bool:
            if not LocalStore.insert_message(conn, entry):
                return False
            conn.execute(
                "INSERT INTO held_messages (message_id, room_id, sender_user_id,"
                " sender_device_id, session_id, ciphertext, held_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    entry.message_id,
                    entry.room_id,
                    entry.sender_user_id,
                    entry.sender_device_id,
                    session_id,
                    ciphertext,
                    now_ms(),
                ),
            )
            return True

        return await self._store.write(write)

    async def held(
        self,
        room_id: int | None = None,
        sender: tuple[int, str] | None = None,
        session_id: str | None = None,
    ) -> list[HeldMessage]:
        """Held messages, oldest first: all, or those one session opens."""
        where, args = "", ()
        if room_id is not None and sender is not None and session_id is not None:
            where = (
                " WHERE h.room_id = ? AND h.sender_user_id = ? AND h.sender_device_id = ?"
                " AND h.session_id = ?"
            )
            args = (room_id, *sender, session_id)  # type: ignore[assignment]
        rows = await self._store.read(
            lambda c: c.execute(
                f"SELECT {_HELD_COLUMNS} FROM held_messages h JOIN messages m"  # noqa: S608
                f" USING (message_id){where} ORDER BY m.sent_at, m.rowid",
                args,
            ).fetchall()
        )
        return [HeldMessage(*r) for r in rows]

    async def mark_undecryptable(self, message_ids: list[str]) -> list[str]:
        """The key wait is over: shown as "cannot decrypt, ask the sender to
        resend"; a key request goes out. Still held, for a late key. Returns
        the ids that were still held (not released meanwhile)."""
        now = now_ms()

        def write(conn: Any) -> list[str]:
            marked = []
            for message_id in message_ids:
                conn.execute(
                    "UPDATE held_messages SET requested_at = ? WHERE message_id = ?",
                    (now, message_id),
                )
                if conn.execute(
                    "UPDATE messages SET state = 'undecryptable' WHERE message_id = ?"
                    " AND state = 'held'",
                    (message_id,),
                ).rowcount:
                    marked.append(message_id)
            return marked

        return await self._store.write(write)

    async def history_entries(self, message_ids: list[str]) -> list[HistoryEntry]:
        def read(conn: Any) -> list[HistoryEntry]:
            rows = []
            for message_id in message_ids:
                row = conn.execute(
                    f"SELECT {HISTORY_COLUMNS} FROM messages WHERE message_id = ?",  # noqa: S608
                    (message_id,),
                ).fetchone()
                if row is not None:
                    rows.append(history_entry(row))
            return rows

        return await self._store.read(read)


class Released(NamedTuple):
    """A held message, decrypted."""

    message_id: str
    text: str
    mentions: tuple[int, ...]
    session_id: str
    megolm_index: int
    attachment: Attachment | None = None


def release(conn: Any, r: Released) -> bool:
    """A held message decrypted: ``received`` with its text; no longer held.
    False (and left held) if its Megolm index was used by another message: a replay."""
    taken = conn.execute(
        "SELECT 1 FROM messages WHERE megolm_session_id = ? AND megolm_index = ?"
        " AND message_id != ?",
        (r.session_id, r.megolm_index, r.message_id),
    ).fetchone()
    if taken is not None:
        return False
    conn.execute(
        "UPDATE messages SET plaintext = ?, mentions = ?, state = 'received',"
        " megolm_session_id = ?, megolm_index = ?, attachment = ?"
        " WHERE message_id = ? AND state != 'received'",
        (
            r.text,
            ",".join(map(str, r.mentions)),
            r.session_id,
            r.megolm_index,
            attachment_column(r.attachment),
            r.message_id,
        ),
    )
    deleted = conn.execute("DELETE FROM held_messages WHERE message_id = ?", (r.message_id,))
    return bool(deleted.rowcount)
