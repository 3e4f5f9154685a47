"""The server's terms and privacy notice in ``chat``: asked at login, ``/consent``.

When the operator has set a version the user has not accepted, the server
serves them nothing else until they do (docs/PROTOCOL.md §8.15). At login,
:func:`ask_at_login` (the ``accept_consent`` callback of
:func:`chatd.client.open_client`) shows each document (kind, version, title
and the URL to read it at) and asks ``Accept? [y/N]``; anything but yes ends
chat with a clear message. While chat runs, a new version (or a revocation on
another device) is announced by :func:`announce`, and ``/consent`` shows the
documents, accepts them (``/consent accept``) or withdraws an acceptance
(``/consent revoke terms``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Final

from chatd.client import AcceptConsent, Client, ConsentDocument, ServerRefusedError

from .commands import Command, Refused, UsageError
from .display import clean

Say = Callable[[str], None]
#: Reads one typed line (None at end of input); the argument is the prompt.
Ask = Callable[[str], Awaitable[str | None]]

CONSENT_COMMANDS: Final = (
    Command(
        "consent",
        "/consent [accept/revoke <kind>]",
        "the server's terms and privacy notice: show them, accept them, or withdraw acceptance",
    ),
)
KINDS: Final = ("terms", "privacy")
NAMES: Final = {"terms": "terms of service", "privacy": "privacy notice"}


def document_line(document: ConsentDocument) -> str:
    """One document as a line: its name, version, title and where to read it."""
    name = NAMES.get(document.kind, clean(document.kind))
    title = f' "{clean(document.title)}"' if document.title else ""
    where = f": read it at {clean(document.url)}" if document.url else ""
    return f"    {name}, version {clean(document.version)}{title}{where}"


def show(say: Say, documents: Sequence[ConsentDocument]) -> None:
    for document in documents:
        say(document_line(document))


def ask_at_login(say: Say, ask: Ask) -> AcceptConsent:
    """The ``accept_consent`` callback: show the documents, ask once."""

    async def accept(documents: list[ConsentDocument]) -> bool:
        say("Before you continue, the server asks you to accept:")
        show(say, documents)
        answer = await ask("Accept? [y/N]")
        return (answer or "").strip().lower() in ("y", "yes")

    return accept


def announce(say: Say, documents: Sequence[ConsentDocument]) -> None:
    """A pushed ``consent_required``, as the person should read it."""
    if not documents:
        say("-- the terms were accepted on another device: chat works again --")
        return
    say("! the server asks you to accept a new version before you continue:")
    show(say, documents)
    say("! read them, then type /consent accept (until then the server refuses requests)")


class ConsentCommands:
    """``/consent``: show, accept, revoke."""

    def __init__(self, client: Client, say: Say) -> None:
        self.client = client
        self.say = say

    async def cmd_consent(self, args: list[str]) -> None:
        if not args:
            status = await self.client.consent_status()
            if not status.documents:
                self.say("-- this server asks nobody to accept terms --")
                return
            for document in status.documents:
                state = "to accept" if document.kind in status.required else "accepted"
                self.say(f"{document_line(document)} ({state})")
            if status.required:
                self.say("Type /consent accept to accept them.")
            return
        action = args[0].lower()
        if action == "accept" and len(args) == 1:
            status = await self.client.consent_status()
            todo = [d for d in status.documents if d.kind in status.required]
            if not todo:
                self.say("-- nothing to accept: you accepted every current document --")
                return
            for document in todo:
                await self._call(self.client.accept_consent(document.kind, document.version))
                self.say(f"-- accepted: {document_line(document).strip()} --")
            return
        if action == "revoke" and len(args) == 2 and args[1].lower() in KINDS:
            kind = args[1].lower()
            await self._call(self.client.revoke_consent(kind))
            self.say(
                f"-- you withdrew your acceptance of the {NAMES[kind]}: the server refuses"
                " everything else until you /consent accept again --"
            )
            return
        raise UsageError("usage: /consent, /consent accept, or /consent revoke terms|privacy")

    async def _call(self, request: Awaitable[None]) -> None:
        try:
            await request
        except ServerRefusedError as exc:
            if exc.code == "consent_version_mismatch":
                raise Refused("a newer version was set meanwhile: see /consent") from None
            if exc.code == "consent_not_set":
                raise Refused("the server has no such document") from None
            raise
