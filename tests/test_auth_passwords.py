"""Password policy and Argon2id hashing, as a person setting a password sees them."""

from __future__ import annotations

import pytest
from zxcvbn.frequency_lists import FREQUENCY_LISTS

from chatd.auth.passwords import (
    COMMON_PASSWORDS_CHECKED,
    PASSWORD_MAX,
    PASSWORD_MIN,
    Argon2Params,
    PasswordHasher,
    PasswordPolicyError,
    check_password_policy,
    is_common_password,
    load_common_passwords,
)

RANKED = FREQUENCY_LISTS["passwords"]
# Small parameters keep the tests fast; real servers use the defaults or more.
FAST = Argon2Params(memory_kib=8, time_cost=1, parallelism=1)
GOOD = "correct horse battery staple"


@pytest.fixture(scope="module")
def hasher() -> PasswordHasher:
    return PasswordHasher(FAST)


# -- policy: length -----------------------------------------------------------


def test_limits() -> None:
    assert (PASSWORD_MIN, PASSWORD_MAX, COMMON_PASSWORDS_CHECKED) == (12, 128, 10_000)


def test_length_bounds() -> None:
    with pytest.raises(PasswordPolicyError, match="too short: use at least 12"):
        check_password_policy("k7#vQ2m!xZ9p"[:11])
    check_password_policy("k7#vQ2m!xZ9p")  # 12
    check_password_policy("k7#vQ2m!xZ9p" * 10 + "k7#vQ2m!")  # 128
    with pytest.raises(PasswordPolicyError, match="too long: use at most 128"):
        check_password_policy("k7#vQ2m!xZ9p" * 10 + "k7#vQ2m!x")  # 129
    with pytest.raises(PasswordPolicyError, match="too short"):
        check_password_policy("")


def test_length_counts_code_points_not_bytes() -> None:
    check_password_policy("\U0001f511" * 12)  # 12 code points, 48 UTF-8 bytes
    with pytest.raises(PasswordPolicyError, match="too short"):
        check_password_policy("\u00e9" * 11)  # 22 UTF-8 bytes, still 11 characters
    check_password_policy("\U0001f511" * 128)
    with pytest.raises(PasswordPolicyError, match="too long"):
        check_password_policy("\U0001f511" * 129)


def test_whitespace_counts_and_is_kept() -> None:
    check_password_policy("  kq8 zr2w  ")  # 12 with the spaces, 8 without
    with pytest.raises(PasswordPolicyError, match="too short"):
        check_password_policy(" kq8 zr2w  ")  # 11


@pytest.mark.parametrize(
    "password",
    [
        "\u043f\u0430\u0440\u043e\u043b\u044c \u043a\u043e\u0448\u043a\u0438",  # Cyrillic words
        "\u6c34\u6ce2\u7b11\u3044\u98a8\u3068\u5149\u306e\u6b4c\u304c\u8074\u3053",  # 12 CJK
        "cafe\u0301 cre\u0300me bru\u0302le\u0301e",  # combining accents
        "tab\tand\nnewline ok",
    ],
)
def test_unicode_passwords_accepted(password: str) -> None:
    check_password_policy(password)


def test_lone_surrogate_refused_without_echo() -> None:
    with pytest.raises(PasswordPolicyError, match="not valid Unicode") as info:
        check_password_policy("abcdefghijk\ud800")
    assert "abcdefghijk" not in str(info.value)


# -- policy: common passwords -------------------------------------------------


def test_common_list_is_the_first_ten_thousand() -> None:
    common = load_common_passwords()
    assert len(common) == COMMON_PASSWORDS_CHECKED
    assert load_common_passwords() is common  # loaded once
    assert RANKED[0] in common and RANKED[9_999] in common
    assert RANKED[10_000] not in common


@pytest.mark.parametrize(
    ("password", "rank"),
    [
        ("qwerty123456", 1_849),
        ("123qweasdzxc", 849),
        ("counterstrike", 9_354),  # near the end of the checked range
        ("123456789qwerty", 9_989),
    ],
)
def test_common_passwords_refused(password: str, rank: int) -> None:
    assert RANKED[rank] == password  # the fixture is really at that rank
    assert is_common_password(password)
    with pytest.raises(PasswordPolicyError, match="10,000 most common") as info:
        check_password_policy(password)
    assert password not in str(info.value)


def test_common_check_ignores_case() -> None:
    assert is_common_password("QWERTY123456")
    with pytest.raises(PasswordPolicyError, match="most common"):
        check_password_policy("CounterStrike")


@pytest.mark.parametrize(
    ("password", "rank"),
    [
        ("password1234", 11_382),
        ("playstation3", 15_560),  # around rank 15,000: beyond the checked list
        ("12345678987654321", 15_403),
    ],
)
def test_less_common_passwords_accepted(password: str, rank: int) -> None:
    assert RANKED[rank] == password
    assert not is_common_password(password)
    check_password_policy(password)


def test_short_common_passwords_are_common_too() -> None:
    assert is_common_password("password")
    assert is_common_password("123456")
    assert not is_common_password(GOOD)


# -- policy: username ---------------------------------------------------------


def test_password_equal_to_username_refused() -> None:
    key = "maximilian.schmidt"
    for password in [key, key.upper(), "Maximilian.Schmidt"]:
        with pytest.raises(PasswordPolicyError, match="same as the username") as info:
            check_password_policy(password, username_key=key)
        assert key not in str(info.value).lower()
    # Fullwidth letters fold the same way the username did.
    fullwidth = "".join(chr(ord(c) + 0xFEE0) for c in "maximilian") + ".schmidt"
    with pytest.raises(PasswordPolicyError, match="same as the username"):
        check_password_policy(fullwidth, username_key=key)
    check_password_policy(key + "!", username_key=key)
    check_password_policy(key)  # no username given: nothing to compare


# -- hashing ------------------------------------------------------------------


def test_argon2_defaults_are_the_owasp_minimum() -> None:
    params = Argon2Params()
    assert (params.memory_kib, params.time_cost, params.parallelism) == (19_456, 2, 1)
    stored = PasswordHasher().hash(GOOD)
    assert stored.startswith("$argon2id$v=19$m=19456,t=2,p=1$")


def test_argon2_params_refuse_impossible_values() -> None:
    with pytest.raises(ValueError, match="parallelism"):
        Argon2Params(parallelism=0)
    with pytest.raises(ValueError, match="time_cost"):
        Argon2Params(time_cost=0)
    with pytest.raises(ValueError, match="memory_kib"):
        Argon2Params(memory_kib=15, parallelism=2)


def test_hash_verifies(hasher: PasswordHasher) -> None:
    stored = hasher.hash(GOOD)
    assert stored.startswith("$argon2id$")
    assert GOOD not in stored
    assert hasher.verify(stored, GOOD) is True


def test_hashes_are_salted(hasher: PasswordHasher) -> None:
    assert hasher.hash(GOOD) != hasher.hash(GOOD)


def test_wrong_password_is_false_not_an_error(hasher: PasswordHasher) -> None:
    stored = hasher.hash(GOOD)
    assert hasher.verify(stored, GOOD + " ") is False
    assert hasher.verify(stored, "") is False
    assert hasher.verify(stored, GOOD[:-1]) is False


def test_case_and_whitespace_are_part_of_the_password(hasher: PasswordHasher) -> None:
    stored = hasher.hash("Password with Spaces ")
    assert hasher.verify(stored, "Password with Spaces ")
    assert not hasher.verify(stored, "password with spaces ")
    assert not hasher.verify(stored, "Password with Spaces")
    assert not hasher.verify(stored, "Password  with Spaces ")


def test_unicode_passwords_hash_as_typed(hasher: PasswordHasher) -> None:
    composed = "caf\u00e9 au lait!"
    decomposed = "cafe\u0301 au lait!"
    stored = hasher.hash(composed)
    assert hasher.verify(stored, composed)
    assert not hasher.verify(stored, decomposed)  # no normalisation of passwords
    emoji = "\U0001f511\U0001f512 secret \U0001f5dd"
    assert hasher.verify(hasher.hash(emoji), emoji)


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "not a hash",
        "$argon2id$v=19$m=8,t=1,p=1$AAAA$AAAA",  # well-formed but too short to verify
        "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$!!!!",
        "$2b$12$abcdefghijklmnopqrstuuCjUbhXWEWm5FQgrIKYlrYp0ZHsUnTDe",  # bcrypt
        "$argon2id$v=19$m=8,t=1,p=1$\u00e9\u00e9$x",  # non-ASCII
    ],
)
def test_damaged_or_foreign_hash_is_false(hasher: PasswordHasher, stored: str) -> None:
    assert hasher.verify(stored, GOOD) is False
    assert hasher.needs_rehash(stored) in (True, False)  # never raises


def test_unparseable_hash_needs_rehash(hasher: PasswordHasher) -> None:
    assert hasher.needs_rehash("not a hash") is True


def test_lone_surrogate_password_is_false(hasher: PasswordHasher) -> None:
    assert hasher.verify(hasher.hash(GOOD), "\ud800") is False


def test_needs_rehash_when_parameters_change(hasher: PasswordHasher) -> None:
    stored = hasher.hash(GOOD)
    assert hasher.needs_rehash(stored) is False
    assert PasswordHasher(FAST).needs_rehash(stored) is False  # same params, new instance
    for other in [
        Argon2Params(memory_kib=16, time_cost=1, parallelism=1),
        Argon2Params(memory_kib=8, time_cost=2, parallelism=1),
        Argon2Params(memory_kib=16, time_cost=1, parallelism=2),
    ]:
        stronger = PasswordHasher(other)
        assert stronger.needs_rehash(stored) is True
        # Old hashes still verify after the change, so users can log in and be rehashed.
        assert stronger.verify(stored, GOOD) is True
        assert stronger.needs_rehash(stronger.hash(GOOD)) is False


def test_dummy_hash(hasher: PasswordHasher) -> None:
    dummy = hasher.dummy_hash
    assert dummy is hasher.dummy_hash  # made once
    assert dummy.startswith("$argon2id$v=19$m=8,t=1,p=1$")  # same cost as real hashes
    assert hasher.needs_rehash(dummy) is False
    for guess in ["", GOOD, "password", dummy]:
        assert hasher.verify(dummy, guess) is False
    assert PasswordHasher(FAST).dummy_hash != dummy  # a random secret per instance
