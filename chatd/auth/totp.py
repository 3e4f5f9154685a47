"""TOTP second factor (RFC 6238) through pyotp: secrets, enrollment URIs, checks.

Codes are the common authenticator-app kind: 6 digits, 30-second steps,
HMAC-SHA1. A code is accepted within one step either side of the server's
clock, to allow for clock drift and for the time it takes to type.

Each code works once. :func:`verify_totp` returns the time step it matched;
the caller stores it and passes it back as ``last_step``, and any code for
that step or an earlier one is then refused. That stops a code seen over a
shoulder or phished from being replayed within its window, and also refuses
an older code after a newer one was used.

Everything here is pure: the time is passed in, so results are reproducible.
"""

from __future__ import annotations

import hmac
from typing import Final

import pyotp

TOTP_DIGITS: Final = 6  # digits in a code
TOTP_STEP_SECONDS: Final = 30  # seconds per time step
TOTP_WINDOW_STEPS: Final = 1  # steps accepted either side of now
TOTP_ISSUER: Final = "chatd"  # issuer shown in authenticator apps by default
#: Longest code input looked at, in characters (6 digits plus room for spaces).
TOTP_INPUT_MAX: Final = 32


def new_totp_secret() -> str:
    """A new TOTP secret: 160 random bits as 32 base32 characters."""
    return pyotp.random_base32()


def provisioning_uri(secret: str, username: str, issuer: str = TOTP_ISSUER) -> str:
    """The ``otpauth://totp/...`` URI to show as a QR code at enrollment."""
    return pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_STEP_SECONDS).provisioning_uri(
        name=username, issuer_name=issuer
    )


def verify_totp(secret: str, code: str, *, last_step: int | None, now: float) -> int | None:
    """Check a typed code; return the time step it matched, or None.

    ``now`` is Unix time in seconds. Whitespace in ``code`` is ignored; what
    is left must be exactly six ASCII digits. The code must match one of the
    steps ``now // 30 - 1`` to ``now // 30 + 1``, and that step must be later
    than ``last_step`` (the step of the last accepted code, None if there was
    none). When a code matches more than one step (a one-in-a-million
    coincidence), the earliest step later than ``last_step`` is returned.

    Raises ValueError only if ``secret`` is not a valid base32 TOTP secret,
    which is a server bug, not bad input.
    """
    if len(code) > TOTP_INPUT_MAX:
        return None
    typed = "".join(code.split())
    if len(typed) != TOTP_DIGITS or not (typed.isascii() and typed.isdigit()):
        return None
    totp = pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_STEP_SECONDS)
    current = int(now // TOTP_STEP_SECONDS)
    matched: int | None = None
    for step in range(current - TOTP_WINDOW_STEPS, current + TOTP_WINDOW_STEPS + 1):
        if step < 0 or (last_step is not None and step <= last_step):
            continue
        if hmac.compare_digest(totp.generate_otp(step), typed) and matched is None:
            matched = step
    return matched
