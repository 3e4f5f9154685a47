"""``/send-file`` and ``/save``: attachments in the terminal client.

A file is encrypted on this device and uploaded as ciphertext by the client
library (:mod:`chatd.client.attachments`); the message that carries its key
goes to the open conversation, direct or room. ``/save N`` downloads the
file of message N of the open conversation, numbered as ``/history`` shows
them (1 is the oldest), checks its SHA-256 and size, decrypts it and writes
it: into the current directory under the sender's file name, or to PATH.
The history keeps the attachment, so ``/save`` works after a restart.

So that nobody has to count, a message that carries a file ends with what to
type to save it: `` (/save N)`` in ``/history`` and when it arrives (with
``/open NAME, then`` or ``/room #NAME, then`` first when it arrives in a
conversation that is not the open one).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Final

import trio

from chatd.client import (
    AttachmentError,
    AttachmentMismatchError,
    Client,
    ClientError,
    DecryptionError,
    ServerRefusedError,
)
from chatd.client.room_store import RoomInfo
from chatd.client.store import HistoryEntry

from .commands import Command, Refused, UsageError
from .display import clean, save_hint

FILE_COMMANDS: Final = (
    Command(
        "send-file",
        "/send-file <path>",
        "send a file to the open conversation, encrypted on this device",
    ),
    Command(
        "save",
        "/save <N> [path]",
        "save the file of message N (as /history numbers them) here, or to path",
    ),
)

#: What the server's refusals of an upload or download mean here.
_REFUSALS: Final = {
    "too_large": "the file is over the server's size limit for attachments",
    "quota_exceeded": "your attachment quota on the server is used up; wait until older "
    "files expire",
    "blob_not_found": "the file is no longer on the server (it expired) or was not sent "
    "to this device",
    "attachments_unavailable": "this server does not take attachments",
}


async def arrival_hint(
    client: Client,
    message_id: str,
    *,
    peer_user_id: int | None,
    room_id: int | None,
    open_first: str = "",
) -> str:
    """The save hint for a file message that just arrived: its number in the
    history of its conversation (a room when ``room_id`` is set). Nothing
    when the store cannot say (the message is shown anyway)."""
    try:
        if room_id is not None:
            entries = await client.rooms.history(room_id)
        else:
            entries = await client.history(peer_user_id)
    except ClientError:
        return ""
    for number, entry in enumerate(entries, 1):
        if entry.message_id == message_id:
            return save_hint(number, open_first)
    return ""


def _expand(typed: str) -> Path:
    """A typed path, ``~`` expanded, relative ones against the working directory."""
    return Path(typed).expanduser().absolute()


def _refusal(exc: ServerRefusedError) -> Refused:
    return Refused(_REFUSALS.get(exc.code, clean(str(exc))))


class FileCommands:
    """The attachment commands; ``target`` is the open conversation (a
    user id for a direct one, a room, or None)."""

    def __init__(
        self,
        client: Client,
        say: Callable[[str], None],
        target: Callable[[], int | RoomInfo | None],
        background: Callable[[str, Callable[[], Awaitable[None]]], None],
    ) -> None:
        self.client = client
        self.say = say
        self.target = target
        self.background = background  # finishes a command in its own task

    def _open(self) -> int | RoomInfo:
        target = self.target()
        if target is None:
            raise UsageError("no conversation open: /open <username> or /room <room> first")
        return target

    async def cmd_send_file(self, args: list[str]) -> None:
        if not args:
            raise UsageError("usage: /send-file <path>")
        target = self._open()
        path = await trio.to_thread.run_sync(_expand, " ".join(args))
        if not await trio.to_thread.run_sync(path.is_file):
            raise UsageError(f"no such file: {clean(str(path))}")
        # The upload may take a while: it goes on in its own task, and its
        # outcome is said when it ends, while the person types on.
        self.background("send-file", partial(self._send_file, target, path))

    async def _send_file(self, target: int | RoomInfo, path: Path) -> None:
        try:
            if isinstance(target, RoomInfo):
                _, attachment = await self.client.rooms.send_file(target.room_id, path)
            else:
                _, attachment = await self.client.send_file(target, path)
        except ServerRefusedError as exc:
            raise _refusal(exc) from None
        except AttachmentError as exc:
            raise Refused(clean(str(exc))) from None
        except OSError as exc:
            raise Refused(f"cannot read {clean(str(path))}: {exc.strerror}") from None
        self.say(f"✓ sent file {clean(attachment.name)} ({attachment.plain_size} bytes)")

    async def cmd_save(self, args: list[str]) -> None:
        if not 1 <= len(args) <= 2 or not args[0].isdigit():
            raise UsageError("usage: /save <N> [path], N as /history numbers the messages")
        target = self._open()
        entries = await self._history(target)
        number = int(args[0])
        if not 1 <= number <= len(entries):
            raise UsageError(f"there is no message {number} here (1 to {len(entries)})")
        attachment = entries[number - 1].attachment
        if attachment is None:
            raise UsageError(f"message {number} carries no file")
        where = await trio.to_thread.run_sync(_expand, args[1] if len(args) == 2 else ".")
        try:
            saved = await self.client.save_file(attachment, where)
        except ServerRefusedError as exc:
            raise _refusal(exc) from None
        except AttachmentMismatchError:
            raise Refused(
                "hash mismatch: the downloaded file is not the one the message names;"
                " nothing was saved"
            ) from None
        except AttachmentError as exc:
            raise Refused(clean(str(exc))) from None
        except DecryptionError:
            raise Refused("the file does not decrypt; nothing was saved") from None
        self.say(f"✓ saved {clean(str(saved))} ({attachment.plain_size} bytes)")

    async def _history(self, target: int | RoomInfo) -> list[HistoryEntry]:
        if isinstance(target, RoomInfo):
            return await self.client.rooms.history(target.room_id)
        return await self.client.history(target)
