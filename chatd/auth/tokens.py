"""Bearer tokens, recovery codes and invite codes: made from ``secrets``, stored hashed.

Only hashes are stored, so a copy of the database does not hand out working
sessions, recovery codes or invites. The hash is plain SHA-256, not Argon2:

* A password is chosen by a person and may be guessable, so its hash must be
  slow and salted to make each guess expensive.
* These values are chosen by the server from ``secrets`` (a CSPRNG) and carry
  at least 112 bits of entropy (tokens and invites 256, recovery codes 120).
  Nobody can enumerate 2**112 candidates however fast the hash is, so a
  slow hash would add cost to every request and no safety. This is the rule
  of ASVS 5.0 6.5.2 for lookup secrets: with 112 bits or more, a standard
  hash without salt is acceptable.

A fast, unsalted hash also makes the lookup a single indexed equality
(``WHERE token_hash = ?``). The index compares hashes, not tokens, so any
timing it leaks is about a hash of the guess, which does not help anyone
build a valid token.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from typing import Final

from chatd.errors import InputError

TOKEN_BYTES: Final = 32  # random bytes (256 bits) in a session token or invite code
#: Longest token accepted for hashing, in characters. A real token is 43
#: (URL-safe base64 of 32 bytes without padding); longer input is refused
#: before any work is done on it.
TOKEN_MAX_CHARS: Final = 64

RECOVERY_CODE_BYTES: Final = 15  # random bytes (120 bits) in a recovery code
RECOVERY_CODE_CHARS: Final = 24  # base32 characters (5 bits each) in a recovery code
RECOVERY_CODE_GROUP: Final = 4  # characters per dash-separated group when shown
RECOVERY_CODES_PER_SET: Final = 10  # codes handed out together
#: Longest typed recovery code looked at, in characters (24 plus generous
#: room for spaces and dashes).
RECOVERY_CODE_INPUT_MAX: Final = 64

_BASE32_ALPHABET: Final = frozenset("abcdefghijklmnopqrstuvwxyz234567")


class MalformedTokenError(InputError):
    """The input cannot be a token or code we issued (too long, wrong characters).

    The message never repeats the input.
    """


def new_token() -> str:
    """A new session token: 256 random bits as URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def new_invite_code() -> str:
    """A new invite code: 256 random bits, like a token; hash it with :func:`token_hash`.

    Never one that starts with ``-``: a person pastes it after ``chat
    --invite``, where a leading dash reads as an option (about 1 code in 64
    would; those are drawn again, so the code stays uniform over the rest)."""
    while True:
        code = secrets.token_urlsafe(TOKEN_BYTES)
        if not code.startswith("-"):
            return code


def token_hash(token: str) -> bytes:
    """The SHA-256 digest (32 bytes) of a token or invite code, as stored.

    Any string of up to :data:`TOKEN_MAX_CHARS` characters hashes, even one
    that no issued token could be (non-ASCII, a lone surrogate from a JSON
    escape): its digest simply matches nothing, so callers need only check the
    length. Raises :class:`MalformedTokenError` for longer input.
    """
    if len(token) > TOKEN_MAX_CHARS:
        raise MalformedTokenError(f"a token is at most {TOKEN_MAX_CHARS} characters")
    # surrogatepass: a lone surrogate is bad input, not a reason to raise.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def new_recovery_codes(n: int = RECOVERY_CODES_PER_SET) -> list[str]:
    """``n`` new recovery codes, each 120 random bits.

    Each is shown as 24 lowercase base32 characters (``a``-``z``, ``2``-``7``)
    in six groups of four, e.g. ``abcd-efgh-ijkl-mnop-qrst-uv23``: easy to
    read aloud and to copy from paper.
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    codes = []
    for _ in range(n):
        chars = base64.b32encode(secrets.token_bytes(RECOVERY_CODE_BYTES)).decode("ascii")
        chars = chars.lower()
        codes.append(
            "-".join(
                chars[i : i + RECOVERY_CODE_GROUP]
                for i in range(0, RECOVERY_CODE_CHARS, RECOVERY_CODE_GROUP)
            )
        )
    return codes


def normalize_recovery_code(raw: str) -> str | None:
    """The canonical form of a typed recovery code, or None if it cannot be one.

    Spaces (any whitespace) and dashes are dropped and letters lowercased, so
    ``ABCD EFGH...`` and ``abcd-efgh-...`` are the same code. The result is
    exactly 24 characters of the base32 alphabet, or the input is malformed.
    """
    if len(raw) > RECOVERY_CODE_INPUT_MAX or not raw.isascii():
        return None
    code = "".join(raw.split()).replace("-", "").lower()
    if len(code) != RECOVERY_CODE_CHARS or not set(code) <= _BASE32_ALPHABET:
        return None
    return code


def recovery_code_hash(code: str) -> bytes:
    """The SHA-256 digest (32 bytes) of a recovery code, as stored.

    The code is normalised first (:func:`normalize_recovery_code`), so the
    shown form and any typed variant hash the same. No salt and no slow hash:
    120 bits of entropy is above the 112 bits ASVS 5.0 6.5.2 asks for.

    Raises :class:`MalformedTokenError` if ``code`` is not a recovery code.
    """
    normal = normalize_recovery_code(code)
    if normal is None:
        raise MalformedTokenError(
            f"a recovery code is {RECOVERY_CODE_CHARS} characters from a-z and 2-7"
        )
    return hashlib.sha256(normal.encode("ascii")).digest()
