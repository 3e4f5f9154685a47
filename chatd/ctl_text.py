"""What every ``chatctl`` command module shares: argument types and the text it prints.

Kept apart from :mod:`chatd.chatctl` so that the command modules
(:mod:`chatd.ctl_rooms`, :mod:`chatd.ctl_backup`, :mod:`chatd.ctl_consent`,
:mod:`chatd.ctl_privacy`) need not import the module that imports them.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

#: ``call(method, path, **httpx_kwargs)``: one admin API request, its JSON answer.
Call = Callable[..., Any]


def positive_id(text: str) -> int:
    """An argparse type: a positive integer id."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def when(ms: int) -> str:
    """A unix-millisecond time as UTC text."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) + "Z"


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """Rows under their headers, in left-aligned columns."""
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def named(user_id: int | None, username: str | None) -> str:
    """A user as ``42 (bob)``; None is the server admin."""
    if user_id is None:
        return "server admin"
    return f"{user_id} ({username})" if username else str(user_id)


def more(text: str, hint: str | None) -> str:
    """``text``, and how to see the next page when there is one."""
    return f"{text}\n(more: {hint})" if hint else text
