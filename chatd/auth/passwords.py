"""Password policy and Argon2id password hashing.

Policy (checked when a password is set, never at login): 12 to 128
characters, counted as Unicode code points exactly as typed. Nothing is
truncated, stripped or case-changed, so spaces and case are part of the
password, and a passphrase of ordinary words is the easy way to comply. A
password may not be one of the 10,000 most common passwords, nor the
username. There are no composition rules (no "one digit, one symbol") and no
forced expiry, as NIST SP 800-63B and OWASP ASVS 5.0 ask.

Hashing uses Argon2id through argon2-cffi; no cryptography is hand-rolled
here. Hashing and verifying are blocking and CPU- and memory-heavy by design
(tens of milliseconds and 19 MiB each at the default cost): callers run them
in a worker thread (``trio.to_thread.run_sync``) and bound how many run at
once, never on the event loop.
"""

from __future__ import annotations

import functools
import secrets
import threading
import unicodedata
from dataclasses import dataclass
from typing import Final

import argon2
from argon2.exceptions import InvalidHashError, VerificationError

from chatd.errors import InputError
from chatd.memory import release_freed_memory

PASSWORD_MIN: Final = 12  # characters (Unicode code points)
PASSWORD_MAX: Final = 128  # characters (Unicode code points)
#: How many of the most common passwords (zxcvbn's frequency list) are refused.
COMMON_PASSWORDS_CHECKED: Final = 10_000


class PasswordPolicyError(InputError):
    """The new password breaks the policy. ``str(err)`` says which rule.

    The message never contains the password.
    """


@functools.cache
def load_common_passwords() -> frozenset[str]:
    """The :data:`COMMON_PASSWORDS_CHECKED` most common passwords, lowercase.

    Loaded on first use and kept: importing zxcvbn's frequency lists takes
    about 0.3 s, so the daemon may call this once at startup, in a thread,
    to keep that pause off the first registration.
    """
    # zxcvbn ships no type information (no py.typed, no stubs); the one value
    # used here is a dict of lists of str, checked by the slice below.
    from zxcvbn.frequency_lists import (  # type: ignore[import-untyped]
        FREQUENCY_LISTS,
    )

    ranked: list[str] = FREQUENCY_LISTS["passwords"]  # most frequent first
    return frozenset(ranked[:COMMON_PASSWORDS_CHECKED])


def is_common_password(password: str) -> bool:
    """Whether ``password`` is among the most common passwords, ignoring case."""
    return password.lower() in load_common_passwords()


def check_password_policy(password: str, *, username_key: str | None = None) -> None:
    """Check a new password against the policy (see the module docstring).

    ``username_key`` is the account's normalised username
    (:func:`chatd.auth.usernames.normalize_username`); a password equal to it,
    compared after the same NFKC normalisation and case folding, is refused.
    Only the comparison folds; the password itself is used as typed.

    Raises :class:`PasswordPolicyError` naming the rule that was broken.
    """
    if len(password) < PASSWORD_MIN:
        raise PasswordPolicyError(
            f"the password is too short: use at least {PASSWORD_MIN} characters "
            "(a few ordinary words with spaces between them work well)"
        )
    if len(password) > PASSWORD_MAX:
        raise PasswordPolicyError(
            f"the password is too long: use at most {PASSWORD_MAX} characters"
        )
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (possible via a JSON "\ud800" escape) cannot be
        # hashed as UTF-8 and is not something a person can type.
        raise PasswordPolicyError(
            "the password contains characters that are not valid Unicode text"
        ) from None
    if is_common_password(password):
        raise PasswordPolicyError(
            f"the password is one of the {COMMON_PASSWORDS_CHECKED:,} most common "
            "passwords and would be guessed quickly; choose another"
        )
    if username_key is not None and (
        unicodedata.normalize("NFKC", password).casefold() == username_key
    ):
        raise PasswordPolicyError("the password must not be the same as the username")


@dataclass(frozen=True, slots=True)
class Argon2Params:
    """Argon2id cost parameters.

    The defaults are the minimum that the OWASP Password Storage Cheat Sheet
    recommends for Argon2id and that ASVS 5.0 level 2 relies on: 19 MiB of
    memory (m=19456 KiB), 2 iterations (t=2), 1 lane (p=1). Raising memory is
    the better way to raise the cost.

    Smaller values are accepted here (down to Argon2's own limits) so tests
    can hash quickly; the config loader, not this class, refuses settings
    below the defaults for a real server.
    """

    memory_kib: int = 19_456  # KiB of memory per hash
    time_cost: int = 2  # passes over that memory
    parallelism: int = 1  # lanes (threads) per hash

    def __post_init__(self) -> None:
        if self.parallelism < 1:
            raise ValueError("Argon2 parallelism must be at least 1")
        if self.time_cost < 1:
            raise ValueError("Argon2 time_cost must be at least 1")
        if self.memory_kib < 8 * self.parallelism:
            raise ValueError("Argon2 memory_kib must be at least 8 x parallelism")


class PasswordHasher:
    """Hash and verify passwords with Argon2id (argon2-cffi).

    Every method is blocking and CPU-heavy: run it in a worker thread. The
    instance is safe to share between threads.
    """

    def __init__(self, params: Argon2Params | None = None) -> None:
        self.params = params if params is not None else Argon2Params()
        self._hasher = argon2.PasswordHasher(
            time_cost=self.params.time_cost,
            memory_cost=self.params.memory_kib,
            parallelism=self.params.parallelism,
            type=argon2.Type.ID,
        )
        self._dummy_hash: str | None = None
        self._dummy_lock = threading.Lock()

    def hash(self, password: str) -> str:
        """Hash ``password`` with a fresh random salt; returns the PHC string.

        The string carries the algorithm, the parameters and the salt, so a
        later change of parameters still verifies old hashes.
        """
        try:
            return self._hasher.hash(password)
        finally:
            release_freed_memory()  # the hash's buffer; see chatd.memory

    def verify(self, stored_hash: str, password: str) -> bool:
        """Whether ``password`` matches ``stored_hash``. Never raises for a bad guess.

        False for a wrong password, and also for a stored hash that is not an
        Argon2 hash or is damaged, or a password that is not valid Unicode
        text: none of those may let anyone in, and none is the caller's to
        handle differently.
        """
        try:
            encoded = password.encode("utf-8")
            return self._hasher.verify(stored_hash.encode("ascii"), encoded)
        except (VerificationError, InvalidHashError, UnicodeEncodeError):
            return False
        finally:
            release_freed_memory()  # the hash's buffer; see chatd.memory

    def needs_rehash(self, stored_hash: str) -> bool:
        """Whether ``stored_hash`` was made with other parameters than these.

        Call it after a successful :meth:`verify`, while the password is at
        hand, and store a new :meth:`hash` if so. True also for a hash that
        cannot be parsed, since it should be replaced too.
        """
        try:
            return self._hasher.check_needs_rehash(stored_hash)
        except InvalidHashError:
            return True

    @property
    def dummy_hash(self) -> str:
        """A hash of a random secret, made once with these parameters.

        A login for a username that does not exist verifies the password
        against this hash, so it costs the same time as a login for one that
        does, and response times do not tell which usernames exist. The
        verification always fails: nobody knows the secret, and it is
        discarded. Made on first use (one hash's worth of CPU), then reused.
        """
        with self._dummy_lock:
            if self._dummy_hash is None:
                self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(32))
            return self._dummy_hash
