"""Usernames: one normal form for uniqueness, lookup and display checks.

Usernames are 3 to 32 characters long and use only the lowercase letters
``a``-``z``, the digits ``0``-``9`` and the separators ``.``, ``_`` and
``-``. A username starts with a letter or a digit and never has two
separators in a row. Case does not matter: ``Alice``, ``ALICE`` and ``alice``
are the same account, and so are lookalikes that Unicode folds to the same
letters (fullwidth ``ａｌｉｃｅ`` is ``alice``). Letters from other scripts are
refused, so nobody can register a Cyrillic or Greek twin of an existing name.

How: the input is NFKC-normalised (compatibility forms such as fullwidth
letters, ligatures and the Kelvin sign become their plain ASCII letters), then
case-folded (``casefold``, which also maps ``ß`` to ``ss``), then checked
against the ASCII rules above. Whatever survives normalisation as a non-ASCII
character is refused rather than kept, because confusable letters across
scripts (Cyrillic ``а`` against Latin ``a``) do not fold onto each other and
would otherwise make two names that look the same. The normalised string is
the key: it is what the store keeps unique and what lookups use.
"""

from __future__ import annotations

import itertools
import unicodedata
from typing import Final

from chatd.errors import InputError

USERNAME_MIN: Final = 3  # characters, after normalisation
USERNAME_MAX: Final = 32  # characters, after normalisation
#: Longest input looked at, in characters, before normalising. NFKC can expand
#: a character up to 18-fold, so this bounds the work one request can cause.
USERNAME_INPUT_MAX: Final = 64
#: How much of a refused input an error message quotes, in characters.
_ECHO_MAX: Final = 32

_SEPARATORS: Final = frozenset("._-")
_ALLOWED: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789") | _SEPARATORS

#: The same rules for a name already in its plain ASCII spelling (any case),
#: as a regular expression that means the same in Python and in JSON Schema
#: (ECMA 262); with the length limits above, it is what the admin API's OpenAPI
#: document promises for a new username. Lookalike spellings that only fold to
#: such a name (fullwidth letters, ligatures) do not match it. The lookahead
#: after ``$`` keeps Python's ``$`` from matching before a final newline.
USERNAME_PATTERN: Final = r"^[A-Za-z0-9](?:[._-]?[A-Za-z0-9])*[._-]?$(?!\n)"

#: What is allowed, in one sentence; every :class:`UsernameError` ends with it.
USERNAME_RULES: Final = (
    f"a username is {USERNAME_MIN} to {USERNAME_MAX} characters from a-z, 0-9, "
    "'.', '_' and '-', starts with a letter or digit, and has no two of '.', '_', "
    "'-' in a row (case does not matter)"
)


class UsernameError(InputError):
    """The username is not allowed. ``str(err)`` says why and what is allowed.

    The message quotes at most the first 32 characters of the input, which
    belongs to the person who typed it.
    """


def _refuse(raw: str, reason: str) -> UsernameError:
    shown = raw[:_ECHO_MAX] + ("..." if len(raw) > _ECHO_MAX else "")
    return UsernameError(f"username {shown!r} is not allowed: {reason}; {USERNAME_RULES}")


def normalize_username(raw: str) -> str:
    """Return the normal form of ``raw``: the key for uniqueness and lookup.

    Two inputs name the same account exactly when their keys are equal.

    Raises :class:`UsernameError` if ``raw`` is longer than
    :data:`USERNAME_INPUT_MAX` characters, or if its normal form breaks a rule
    (length, a character outside ``a-z 0-9 . _ -``, a leading separator, two
    separators in a row).
    """
    if len(raw) > USERNAME_INPUT_MAX:
        raise _refuse(raw, f"it is longer than {USERNAME_INPUT_MAX} characters")
    key = unicodedata.normalize("NFKC", raw).casefold()
    for ch in key:
        if ch not in _ALLOWED:
            raise _refuse(raw, f"{ch!r} (U+{ord(ch):04X}) is not an allowed character")
    if len(key) < USERNAME_MIN:
        raise _refuse(raw, f"it is shorter than {USERNAME_MIN} characters")
    if len(key) > USERNAME_MAX:
        raise _refuse(raw, f"it is longer than {USERNAME_MAX} characters")
    if key[0] in _SEPARATORS:
        raise _refuse(raw, f"it starts with {key[0]!r}")
    for a, b in itertools.pairwise(key):
        if a in _SEPARATORS and b in _SEPARATORS:
            raise _refuse(raw, f"it has two separators in a row ({a + b!r})")
    return key
