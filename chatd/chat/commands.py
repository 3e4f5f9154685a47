"""What the terminal client's commands are made of: their description and errors."""

from __future__ import annotations

from dataclasses import dataclass

from chatd.errors import ChatdError


@dataclass(frozen=True)
class Command:
    """One command: its usage line and one sentence of help (shown by /help
    and checked against docs/CHAT.md by the tests)."""

    name: str
    usage: str
    help: str


class UsageError(ChatdError):
    """A command was typed wrongly; the message says how to type it."""


class Refused(ChatdError):
    """The server refused a command; the message says why in the terms of the
    command (shown as ``! /command failed: ...``)."""
