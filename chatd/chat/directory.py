"""The people on the server and their devices, as the terminal client knows them.

:class:`Directory` keeps the directory fetched last (members by user id and
by username) and says when a device appears that the person was not told
about yet (new devices start unverified). It runs ``/who``, ``/devices``,
``/fingerprint`` and ``/verify`` (a fingerprint typed in; the emoji
verification is :mod:`chatd.chat.verifying`). The other parts of
:class:`chatd.chat.app.ChatApp` find people and name them through it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import trio

from chatd.auth.usernames import UsernameError, normalize_username
from chatd.client import Client, ClientError, DeviceRecord, IdentityChangedError, Member

from .commands import UsageError
from .display import clean, device_line, normalize_fingerprint

Say = Callable[[str], None]


class Directory:
    """Who is on the server, with their devices, for one running chat."""

    def __init__(self, client: Client, say: Say, *, unread: Callable[[int], int]) -> None:
        self.client = client
        self.say = say
        self._unread = unread  # messages not seen yet in the conversation with a user
        self._by_id: dict[int, Member] = {}
        self._by_name: dict[str, Member] = {}
        # Devices this app has shown (or found in the store at start): the
        # library adds devices to the store on its own, so the store cannot
        # tell which ones the person has not been told about yet.
        self._shown: set[tuple[int, str]] | None = None

    def member(self, user_id: int) -> Member | None:
        """The member with ``user_id`` in the directory fetched last."""
        return self._by_id.get(user_id)

    async def refresh(self) -> None:
        """Fetch the directory; announce devices not seen before (unverified)."""
        if self._shown is None:
            self._shown = {(d.user_id, d.device_id) for d in await self.client.devices()}
        before = set(self._shown)
        try:
            members = await self.client.directory()
        except IdentityChangedError as exc:
            self.say(f"!! WARNING: {clean(str(exc))}")
            return
        self._by_id = {m.user_id: m for m in members}
        self._by_name = {}
        for m in members:
            try:
                self._by_name[normalize_username(m.username)] = m
            except UsernameError:
                self._by_name[m.username] = m
        new = [
            d
            for m in members
            for d in m.devices
            if (d.user_id, d.device_id) not in before
            and (d.user_id, d.device_id) != (self.client.user_id, self.client.device_id)
        ]
        self._shown |= {(d.user_id, d.device_id) for m in members for d in m.devices}
        if not before:  # the first run of this store: everything is new
            if new:
                self.say(
                    f"! {len(new)} device(s) of other people are not verified yet:"
                    " see /who, and verify them with /sas"
                )
            return
        for d in new:
            self.say(
                f"! new device for {self.name_of(d.user_id)}: {clean(d.device_id)}"
                f' "{clean(d.name)}", UNVERIFIED (to verify it: /sas {self.name_of(d.user_id)}'
                f" {clean(d.device_id)})"
            )

    def name_of(self, user_id: int) -> str:
        member = self._by_id.get(user_id)
        return clean(member.username) if member else f"user#{user_id}"

    async def describe_device(self, user_id: int, device_id: str) -> str:
        """``bob's device ABC ("phone")``, cleaned; refreshes the directory if
        the user is not known yet. Never raises ClientError."""
        name = ""
        with contextlib.suppress(ClientError, trio.TooSlowError):
            if user_id not in self._by_id:
                await self.refresh()
            for d in await self.client.devices():
                if (d.user_id, d.device_id) == (user_id, device_id) and d.name:
                    name = f' ("{clean(d.name)}")'
        return f"{self.name_of(user_id)}'s device {clean(device_id)}{name}"

    async def find_member(self, typed: str) -> Member:
        """The member called ``typed`` (any case); refreshes the directory once
        if it is not known yet. Raises UsageError."""
        try:
            key = normalize_username(typed)
        except UsernameError:
            raise UsageError(f"{clean(typed[:40])!r} is not a valid username") from None
        if key not in self._by_name:
            await self.refresh()
        member = self._by_name.get(key)
        if member is None:
            raise UsageError(f"no user named {key!r} on this server (see /who)")
        return member

    async def device(self, member: Member, typed: str) -> DeviceRecord | None:
        for refresh in (False, True):
            if refresh:
                await self.refresh()
            for d in await self.client.devices():
                if d.user_id == member.user_id and d.device_id.upper() == typed.upper():
                    return d
        return None

    async def cmd_who(self, args: list[str]) -> None:
        await self.refresh()
        online: set[int] | None
        try:
            reply = await self.client.connection.request("who_is_online")
            online = set(reply.get("online", []))
        except (ClientError, trio.TooSlowError):
            online = None
        devices = {(d.user_id, d.device_id): d for d in await self.client.devices()}
        members = sorted(self._by_id.values(), key=lambda m: m.username)
        self.say(f"{len(members)} people:")
        for m in members:
            notes = ["you"] if m.user_id == self.client.user_id else []
            if online is not None:
                notes.append("online" if m.user_id in online else "offline")
            unread = self._unread(m.user_id)
            if unread:
                notes.append(f"{unread} unread")
            self.say(f"{clean(m.username)} ({', '.join(notes)})" if notes else clean(m.username))
            if not m.devices:
                self.say("    (no device yet)")
            for d in m.devices:
                known = devices.get((d.user_id, d.device_id), d)
                self.say(device_line(known, self.client.device_id))

    async def cmd_devices(self, args: list[str]) -> None:
        devices = await self.client.devices()
        if not devices:
            self.say("-- no devices seen yet: try /who --")
        for user_id in sorted({d.user_id for d in devices}, key=self.name_of):
            self.say(self.name_of(user_id))
            for d in devices:
                if d.user_id == user_id:
                    self.say(device_line(d, self.client.device_id))

    async def cmd_fingerprint(self, args: list[str]) -> None:
        me = self.name_of(self.client.user_id)
        self.say(f"This device: {me} {self.client.device_id}")
        self.say(f"Fingerprint: {self.client.fingerprint}")
        self.say(
            f"Read it to the people who want to verify you; they type"
            f" /verify {me} {self.client.device_id} <fingerprint>"
        )

    async def cmd_verify(self, args: list[str]) -> None:
        if len(args) < 3:
            raise UsageError("usage: /verify <username> <device> <fingerprint>")
        member = await self.find_member(args[0])
        typed = normalize_fingerprint(" ".join(args[2:]))
        if typed is None:
            raise UsageError(
                "a fingerprint is 64 hex digits (16 groups of 4), as /fingerprint shows it"
            )
        device = await self.device(member, args[1])
        if device is None:
            raise UsageError(f"{clean(member.username)} has no device {clean(args[1])} (see /who)")
        who = f"{clean(member.username)}'s device {clean(device.device_id)}"
        try:
            await self.client.verify_device(member.user_id, device.device_id, typed)
        except ClientError:
            self.say(
                f"! the fingerprint does not match {who}: it is NOT verified."
                " Check that you both look at the same device, and that nobody"
                " else's key is in the middle."
            )
            return
        self.say(f'✓ {who} ("{clean(device.name)}") is now verified.')

    async def has_devices(self, peer: Member) -> bool:
        if peer.user_id == self.client.user_id:
            return True  # a note to self is kept even without other devices
        member = self._by_id.get(peer.user_id, peer)
        if not member.devices:
            await self.refresh()
            member = self._by_id.get(peer.user_id, peer)
        return bool(member.devices)
