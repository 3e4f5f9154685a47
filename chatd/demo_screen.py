"""``chatd demo``: the side-by-side view of what the clients see and what the server stored.

Plain text in two columns, at least MIN_WIDTH and at most MAX_WIDTH wide
whatever the terminal says: the clients' view on the left (wrapped, so no
message text is cut) and the server's on the right (cut with ``…``).
"""

from __future__ import annotations

import itertools
import shutil
import sys
import textwrap
from collections.abc import Sequence
from typing import IO, Final

from chatd.inspection import EnvelopeRow

MIN_WIDTH: Final = 100  # columns of the side-by-side view, at least...
MAX_WIDTH: Final = 120  # ...and at most, whatever the terminal says
CIPHERTEXT_CHARS: Final = 40  # characters of each stored ciphertext shown


# -- the side-by-side view ---------------------------------------------------------------------


def fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` columns (ending in ``…`` when cut) and padded to it.

    One character counts as one column: the demo prints only such characters.
    """
    if len(text) > width:
        text = text[: width - 1] + "…"
    return text.ljust(width)


class Screen:
    """Plain-text output in two columns: the clients' view and the server's."""

    def __init__(self, width: int, out: IO[str] | None = None) -> None:
        self.width = max(MIN_WIDTH, min(MAX_WIDTH, width))
        # The right column wants room for one envelope row (see envelope_row).
        self.left = max(38, self.width - 3 - (ENVELOPE_ROW_FIXED + CIPHERTEXT_CHARS))
        self.right = self.width - 3 - self.left
        self.out = out if out is not None else sys.stdout

    @classmethod
    def for_terminal(cls) -> Screen:
        return cls(shutil.get_terminal_size((MAX_WIDTH, 24)).columns)

    def line(self, text: str = "") -> None:
        print(fit(text, self.width).rstrip(), file=self.out, flush=True)

    def table_header(self) -> None:
        self.columns(["what the clients see"], ["what the server stored (ciphertext only)"])
        print(f"{'═' * self.left}═╪═{'═' * self.right}", file=self.out, flush=True)

    def step(self, title: str) -> None:
        head = f"── {title} "
        if len(head) <= self.left:
            text = f"{head.ljust(self.left, '─')}─┼─{'─' * self.right}"
        else:
            text = fit(head, self.width).rstrip() + " "
            text = text.ljust(self.width, "─")
        print(text, file=self.out, flush=True)

    def wrapped(self, text: str) -> None:
        """Full-width text, wrapped rather than cut (for lists that must show whole)."""
        for piece in textwrap.wrap(
            text, self.width, subsequent_indent="    ", break_on_hyphens=False
        ):
            print(piece, file=self.out, flush=True)

    def columns(self, left: Sequence[str], right: Sequence[str]) -> None:
        """Print ``left`` (wrapped, so no message text is cut) beside ``right`` (cut with …)."""
        wrapped = [
            piece
            for text in left
            for piece in (textwrap.wrap(text, self.left, subsequent_indent="    ") or [""])
        ]
        for a, b in itertools.zip_longest(wrapped, right, fillvalue=""):
            row = f"{fit(a, self.left)} │ {fit(b, self.right)}"
            print(row.rstrip(), file=self.out, flush=True)


# -- showing the server's database -----------------------------------------------------------


ENVELOPE_ROW_FIXED: Final = 31  # columns of an envelope row besides the ciphertext


def envelope_header(width: int) -> str:
    chars = max(10, width - ENVELOPE_ROW_FIXED)
    title = "ciphertext, as stored"
    return f"{'id':>3} {'recipient':<13} {'from':<6} {title:<{chars}} {'bytes':>5}"


def envelope_row(row: EnvelopeRow, width: int) -> str:
    chars = max(10, width - ENVELOPE_ROW_FIXED)
    if row.ciphertext is None:
        shown, size = f"({row.kind} receipt: no content)", "-"
    else:
        shown, size = row.ciphertext.decode("ascii", "replace"), str(len(row.ciphertext))
    sender = row.sender or "-"
    return f"{row.id:>3} {row.recipient_device_id:<13} {sender:<6} {fit(shown, chars)} {size:>5}"
