"""Setting up TOTP in the terminal: a QR code, the secret as text, a first
code, and the recovery codes shown once.

Used in two places: at login, when the server restricts the session until
the account has TOTP (``mfa_enrollment_required``, an admin or moderator
under the shipped ``auth.require_mfa = "admins"``), as the ``enroll_totp``
callback of :func:`chatd.client.open_client`; and by ``/totp on`` in the
running chat (:mod:`chatd.chat.account`).
"""

from __future__ import annotations

import io
from collections.abc import Awaitable, Callable
from typing import Final

import segno

from chatd.client import Account, ServerRefusedError, TotpSecret

from .display import clean

CODE_TRIES: Final = 5  # wrong first codes before enrolment gives up

Say = Callable[[str], None]
#: Reads one typed line (None at end of input); the argument is the prompt.
Ask = Callable[[str], Awaitable[str | None]]


def qr_lines(uri: str) -> list[str]:
    """``uri`` as a QR code of text lines (two modules per character cell)."""
    out = io.StringIO()
    segno.make(uri, error="l").terminal(out=out, compact=True)
    return out.getvalue().splitlines()


def grouped(secret: str) -> str:
    """A base32 secret in groups of four, easier to type."""
    return " ".join(secret[i : i + 4] for i in range(0, len(secret), 4))


def show_secret(say: Say, pending: TotpSecret) -> None:
    say("Scan this QR code with your authenticator app:")
    for line in qr_lines(pending.provisioning_uri):
        say(line)
    say(f"Or type this secret into the app (TOTP, 6 digits, 30 s): {grouped(pending.secret)}")


def show_recovery_codes(say: Say, codes: list[str]) -> None:
    say("Recovery codes: each one works once, instead of a TOTP code, if you lose the app.")
    say("Write them down or store them safely now: they are not shown again.")
    for code in codes:
        say(f"    {clean(code)}")


async def confirm_with_code(say: Say, ask: Ask, account: Account) -> list[str] | None:
    """Ask for the app's first code until the server accepts one. Returns the
    recovery codes, or None if the person gave up (an empty line)."""
    for _ in range(CODE_TRIES):
        code = await ask("Type the 6-digit code the app shows now (an empty line gives up):")
        if not code or not code.strip():
            return None
        try:
            return await account.confirm_totp(code.strip())
        except ServerRefusedError as exc:
            if exc.code == "rate_limited":  # wrong codes make the server wait longer
                say("! too many tries just now: wait a few seconds, then type the next code")
                continue
            if exc.code != "mfa_failed":
                raise
            say("! that code is not right: check the app (and this machine's clock), then again")
    say(f"! {CODE_TRIES} wrong codes: giving up")
    return None


def enrol_at_login(say: Say, ask: Ask, password: str) -> Callable[[Account], Awaitable[None]]:
    """The ``enroll_totp`` callback for :func:`chatd.client.open_client`:
    walks the person through enrolment with the password they just typed."""

    async def enrol(account: Account) -> None:
        say("This account needs a second factor (TOTP) before it can chat. Set it up now.")
        pending = await account.enroll_totp(password)
        show_secret(say, pending)
        codes = await confirm_with_code(say, ask, account)
        if codes is None:
            return  # open_client logs the session out and refuses the login
        say("✓ TOTP is on: from now on, logging in asks for a code from the app.")
        show_recovery_codes(say, codes)

    return enrol
