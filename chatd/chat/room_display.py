"""How the terminal client prints rooms: pure functions, no I/O.

Room names, topics and usernames come from other people, so they go through
:func:`chatd.chat.display.clean` like message text. Highlighting (bold
``@you``) is added *after* cleaning, so only our own escape sequences reach
the terminal.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Final

from chatd.client import ServerRefusedError
from chatd.client.room_delivery import RoomDelivery
from chatd.client.room_events import BAD_CIPHERTEXT, REPLAY, WRONG_ROOM, RoomUpdate
from chatd.client.room_store import RoomInfo

from .commands import Refused
from .display import clean, message_lines

CANNOT_DECRYPT: Final = "✗ cannot decrypt — ask the sender to resend"
#: Why a message no key will open could not be decrypted (RoomUndecryptable.cause).
UNDECRYPTABLE_WHY: Final = {
    BAD_CIPHERTEXT: "it arrived damaged, or was forged",
    WRONG_ROOM: "it was written for another room",
    REPLAY: "it repeats an earlier message",
}
HELD: Final = "… waiting for its key (it shows once the key comes)"
MENTIONS_YOU: Final = " (mentions you)"
BOLD: Final = "\x1b[1m"
PLAIN: Final = "\x1b[0m"

#: Who did something, when the server made the event without a user
#: (a server admin acting through the admin API).
ADMIN: Final = "a server admin"


def label(name: str) -> str:
    """``#general``: a room's name as shown (cleaned)."""
    return "#" + clean(name)


def room_summary(room: RoomInfo) -> str:
    """``#general (id 3): channel, 4 members, you are owner — topic``."""
    kind = room.kind
    if room.kind == "channel" and room.invite_only:
        kind = "invite-only channel"
    members = f"{room.member_count} member" + ("" if room.member_count == 1 else "s")
    text = f"{label(room.name)} (id {room.room_id}): {kind}, {members}"
    if room.role is not None:
        text += f", you are {room.role}"
    if room.topic:
        text += f" — {clean(room.topic)}"
    return text


def highlight(line: str, username: str) -> str:
    """``line`` (already cleaned) with each ``@username`` in bold."""
    pattern = re.compile(rf"(?<![\w@])@{re.escape(username)}(?![\w.-])", re.IGNORECASE)
    return pattern.sub(lambda m: f"{BOLD}{m.group(0)}{PLAIN}", line)


def room_message_lines(
    prefix: str, text: str | None, suffix: str, *, mentioned: bool, me: str, bold: bool
) -> list[str]:
    """A room message as terminal lines; a message that mentions us ends
    with ``(mentions you)``, and with ``bold`` the ``@me`` in it is bold."""
    if mentioned:
        suffix += MENTIONS_YOU
    lines = message_lines(prefix, text, suffix)
    if mentioned and bold:
        lines = [highlight(line, me) for line in lines]
    return lines


def undecryptable_text(cause: str) -> str:
    """What a room message that cannot be decrypted shows, with why when no
    key will change it (a missing key may still come: no reason is given)."""
    why = UNDECRYPTABLE_WHY.get(cause)
    return CANNOT_DECRYPT + (f" ({why})" if why else "")


def unreachable_note(delivery: RoomDelivery) -> str:
    """`` (2 not reachable: queue full)`` for members none of whose devices
    could take the message, or nothing."""
    if not delivery.unreachable:
        return ""
    return f" ({delivery.unreachable} not reachable: queue full)"


def room_mark(state: str, delivery: RoomDelivery | None) -> str:
    """The delivery mark of our room message in the history."""
    if state == "sending":
        return "… not sent yet"
    if delivery is None or not delivery.members:
        return "✓"
    got = f"{delivery.delivered} of {delivery.members}"
    note = unreachable_note(delivery)
    if state == "expired":
        return (f"✗ expired, delivered to {got}" if delivery.expired else f"✗ {got}") + note
    if delivery.delivered:
        return f"✓✓ {got}{note}"
    return "✓" + note


def delivery_notice(delivery: RoomDelivery, state: str | None, quoted: str) -> str:
    """The live line about how far our room message got."""
    got = f"{delivery.delivered} of {delivery.members}"
    note = unreachable_note(delivery)
    if state == "expired" and delivery.expired:
        who = "the others" if not delivery.unreachable else str(delivery.expired)
        return f"✗ delivered to {got} {quoted}: expired for {who} (dropped unread){note}"
    if state == "expired":
        return f"✗ delivered to {got} {quoted}{note}"
    return f"✓✓ delivered to {got} {quoted}{note}"


def event_text(update: RoomUpdate, name_of: Callable[[int | None], str]) -> str:
    """What a room event says, for example ``carol was removed by alice``.
    ``name_of`` gives ``you`` for us and a cleaned name for others."""
    user = name_of(update.user_id)
    you = user == "you"
    by = f" by {name_of(update.by_user_id)}" if update.by_user_id is not None else f" by {ADMIN}"
    topic = clean(update.topic or "")
    match update.type:
        case "created":
            about = f" (topic: {topic})" if topic else ""
            return f"{name_of(update.by_user_id)} created the room{about}"
        case "joined":
            return f"{user} joined"
        case "invited":
            return f"{name_of(update.by_user_id)} invited {user}"
        case "invite_revoked":
            return f"{user}'s invitation was taken back{by}"
        case "declined":
            return f"{user} declined the invitation"
        case "left":
            return f"{user} left"
        case "removed":
            return f"{user} {'were' if you else 'was'} removed{by}"
        case "role":
            role = clean(update.role or "?")
            return f"{user} {'are' if you else 'is'} now {role}" + (
                f" (set{by})" if update.by_user_id != update.user_id else ""
            )
        case "topic":
            shown = f"topic: {topic}" if topic else "the topic was cleared"
            return f"{shown} (set{by})"
        case "devices":
            return f"{user}'s devices changed (see /members)"
        case "deleted":
            return f"the room was deleted{by}"
        case other:
            return f"room event {clean(other)}"


def refusal(exc: ServerRefusedError, room: RoomInfo, needs: str = "") -> str | None:
    """What a refused room request means for the person, or None for a code
    that has nothing to do with rooms."""
    name = label(room.name)
    match exc.code:
        case "room_not_found":
            return f"{name} does not exist (any more), or you are not in it"
        case "not_member":
            return f"you are not a member of {name}: /join {clean(room.name)} first"
        case "not_invited":
            return f"{name} is invite-only: a member must /invite you first"
        case "forbidden":
            return needs or f"your role in {name} does not allow that"
        case "already_member":
            return f"they are already a member of {name}"
        case "user_not_found":
            return f"they are not a member of {name}, nor invited"
        case "last_owner":
            return (
                f"you are the last owner of {name}: make someone else owner first"
                " (/role <username> owner)"
            )
        case "room_full":
            return f"{name} has the most members the server allows"
        case "too_many_rooms":
            return "the server holds the most rooms it allows; delete one first"
    return None


@contextlib.contextmanager
def refusals(room: RoomInfo, needs: str = "") -> Iterator[None]:
    """Turn the server's room refusals into :class:`Refused` with a clear reason."""
    try:
        yield
    except ServerRefusedError as exc:
        reason = refusal(exc, room, needs)
        if reason is None:
            raise
        raise Refused(reason) from None
