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

from chatd.client import DeviceRecord, HistoryEntry, ShortAuthString, VerificationError
from chatd.client.verification import VERIFICATION_TIMEOUT

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


def save_hint(number: int, open_first: str = "") -> str:
    """`` (/save N)``, the end of a line that shows a message carrying a file;
    ``open_first`` (``/open bob``) when N is in another conversation."""
    then = f"{open_first}, then " if open_first else ""
    return f" ({then}/save {number})"


def history_lines(entry: HistoryEntry, sender: str, number: int | None = None) -> list[str]:
    """One history entry (message ``number`` of its conversation); one that
    carries a file ends with `` (/save N)``, outgoing ones with their
    delivery mark."""
    suffix = save_hint(number) if entry.attachment is not None and number else ""
    if entry.direction == "out":
        suffix += "  " + MARKS.get(entry.state, entry.state)
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


#: Why an emoji (SAS) verification ended, by its cancel code (docs/CLIENT.md);
#: other codes, from other clients, are shown as they came.
SAS_ENDED: Final = {
    "mismatched_sas": "the emoji differ",
    "mac_mismatch": (
        "the device's key is not the one the server gave you: someone may be in the"
        " middle (compare fingerprints in person: /fingerprint, /verify)"
    ),
    "commitment_mismatch": (
        "the other device's key is not the one it committed to: someone may be in the middle"
    ),
    "bad_key": "the other device sent an unusable key",
    "unexpected_message": "the two devices got out of step; start again with /sas",
    "timeout": f"it was not finished within {VERIFICATION_TIMEOUT / 60:.0f} minutes",
    "busy": "busy with another verification; try again in a moment",
    "send_failed": "the other device could not be reached",
}


def sas_lines(sas: ShortAuthString) -> list[str]:
    """The seven emoji with their names on one line, then the three numbers."""
    return [
        "Emoji:   " + "   ".join(f"{emoji} {name}" for emoji, name in sas.emoji),
        "Numbers: " + " ".join(str(n) for n in sas.decimals),
    ]


def verification_ended(who: str, error: VerificationError) -> str:
    """The line saying that the verification with ``who`` (already cleaned)
    ended without verifying anything. The other side's reason is cleaned."""
    why = SAS_ENDED.get(error.code, f"code {clean(error.code)}")
    if error.remote:
        shown = clean(error.reason)
        said = f' (they wrote: "{shown}")' if shown and shown != why else ""
        if error.code == "user":
            return f"! {who} cancelled the verification{said}. It is NOT verified."
        return f"! {who} cancelled the verification: {why}{said}. It is NOT verified."
    if error.code == "user":
        return f"! verification with {who} cancelled. It is NOT verified."
    if error.code == "mismatched_sas":
        return f"! verification with {who} cancelled: {why}. It is NOT verified."
    return f"! verification with {who} failed: {why}. It is NOT verified."
