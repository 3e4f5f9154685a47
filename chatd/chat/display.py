"""How the terminal client prints things: pure functions, no I/O.

Everything that another person controls (message text, usernames, device
names) goes through :func:`clean` before it reaches the terminal, so a message
cannot move the cursor, clear the screen, fake a "verified" line or reorder
text with bidirectional overrides.
"""

from __future__ import annotations

import time
import unicodedata
from typing import Final

from chatd.client import DeviceRecord, HistoryEntry

EXCERPT_CHARS: Final = 40  # characters of a message quoted in delivery notices
FINGERPRINT_HEX: Final = 64  # hex digits in a fingerprint (16 groups of 4)

#: What an outgoing message's delivery state looks like.
MARKS: Final = {
    "sending": "… not sent yet",
    "sent": "✓",
    "delivered": "✓✓",
    "expired": "✗ expired",
}

# Bidirectional embeddings, overrides and isolates: they reorder the text shown.
_BIDI: Final = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_LINE_BREAKS: Final = frozenset("\u2028\u2029\x85")


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clean(text: str) -> str:
    """``text`` made safe for one terminal line: control characters (line
    breaks included), and bidi controls become visible escapes such as ``\\x1b``."""
    out = []
    for ch in text:
        if ch == "\t":
            out.append(" ")
        elif unicodedata.category(ch) == "Cc" or ch in _BIDI or ch in _LINE_BREAKS:
            out.append(_escape(ch))
        else:
            out.append(ch)
    return "".join(out)


def message_lines(prefix: str, text: str | None, suffix: str = "") -> list[str]:
    """A message as terminal lines: ``prefix`` + the first line, then the
    other lines of a multi-line message indented, then ``suffix``."""
    if text is None:
        return [f"{prefix}(this message could not be decrypted){suffix}"]
    parts = [clean(p) for p in text.replace("\r\n", "\n").split("\n")]
    lines = [prefix + parts[0]] + ["    " + p for p in parts[1:]]
    lines[-1] += suffix
    return lines


def clock(unix_ms: int) -> str:
    """``[12:01]``, local time."""
    return time.strftime("[%H:%M]", time.localtime(unix_ms / 1000))


def stamp(unix_ms: int) -> str:
    """``[2025-05-01 12:01]``, local time (history lines)."""
    return time.strftime("[%Y-%m-%d %H:%M]", time.localtime(unix_ms / 1000))


def excerpt(text: str) -> str:
    """The start of a message, quoted, for delivery notices."""
    shown = clean(text)
    if len(shown) > EXCERPT_CHARS:
        shown = shown[: EXCERPT_CHARS - 1] + "…"
    return f'"{shown}"'


def history_lines(entry: HistoryEntry, sender: str) -> list[str]:
    """One history entry; outgoing messages end with their delivery mark."""
    suffix = ""
    if entry.direction == "out":
        suffix = "  " + MARKS.get(entry.state, entry.state)
    return message_lines(f"{stamp(entry.sent_at)} {sender}: ", entry.text, suffix)


def device_line(device: DeviceRecord, own_device_id: str) -> str:
    """``    DEVICEID  "name"  verified`` (or ``UNVERIFIED``, ``this device``)."""
    if device.device_id == own_device_id:
        status = "this device"
    else:
        status = "verified" if device.verified else "UNVERIFIED"
    if not device.current:
        status += ", removed (no longer in the directory)"
    return f'    {clean(device.device_id)}  "{clean(device.name)}"  {status}'


def normalize_fingerprint(typed: str) -> str | None:
    """``typed`` as 16 upper-case groups of 4 hex digits, or None if it is not
    64 hex digits (spaces anywhere are ignored)."""
    digits = "".join(typed.split()).upper()
    if len(digits) != FINGERPRINT_HEX or any(c not in "0123456789ABCDEF" for c in digits):
        return None
    return " ".join(digits[i : i + 4] for i in range(0, FINGERPRINT_HEX, 4))
