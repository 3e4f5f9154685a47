"""Usernames: one key per name people would read as the same, clear refusals."""

from __future__ import annotations

import itertools
import re

import pytest

from chatd.auth.usernames import (
    USERNAME_INPUT_MAX,
    USERNAME_MAX,
    USERNAME_MIN,
    USERNAME_PATTERN,
    USERNAME_RULES,
    UsernameError,
    normalize_username,
)


def test_limits() -> None:
    assert (USERNAME_MIN, USERNAME_MAX, USERNAME_INPUT_MAX) == (3, 32, 64)


@pytest.mark.parametrize(
    "raw",
    [
        "alice",
        "Alice",
        "ALICE",
        "aLiCe",
        "\uff41\uff4c\uff49\uff43\uff45",  # fullwidth "ａｌｉｃｅ"
        "\uff21\uff2c\uff29\uff23\uff25",  # fullwidth "ＡＬＩＣＥ"
    ],
)
def test_case_and_width_variants_share_one_key(raw: str) -> None:
    assert normalize_username(raw) == "alice"


def test_compatibility_forms_fold_to_ascii() -> None:
    assert normalize_username("\u212aate") == "kate"  # KELVIN SIGN
    assert normalize_username("\ufb00ion") == "ffion"  # LATIN SMALL LIGATURE FF
    assert normalize_username("stra\u00dfe") == "strasse"  # sharp s casefolds to ss
    assert normalize_username("stra\u00dfe") == normalize_username("STRASSE")
    assert normalize_username("bob\uff10\uff17") == "bob07"  # fullwidth digits


@pytest.mark.parametrize(
    "raw",
    [
        "\u0430lice",  # Cyrillic a
        "alic\u0435",  # Cyrillic ie, looks like e
        "\u03b1lice",  # Greek alpha
        "j\u00f6rg",  # o with diaeresis: not ASCII after NFKC
        "jo\u0308rg",  # the same, decomposed
        "bob\u0661",  # Arabic-Indic digit one
        "ali\u200bce",  # zero-width space
    ],
)
def test_non_ascii_letters_are_refused(raw: str) -> None:
    with pytest.raises(UsernameError, match=r"is not an allowed character"):
        normalize_username(raw)


def test_homoglyph_error_names_the_code_point() -> None:
    with pytest.raises(UsernameError, match=r"U\+0430"):
        normalize_username("\u0430lice")


@pytest.mark.parametrize(
    "raw",
    ["bob", "a.b", "a_b", "a-b", "0day", "007", "x" * 32, "a.b_c-d", "alice.", "alice_"],
)
def test_valid_names_are_their_own_key(raw: str) -> None:
    assert normalize_username(raw) == raw


def test_length_bounds() -> None:
    assert normalize_username("abc") == "abc"
    assert normalize_username("a" * 32) == "a" * 32
    for raw in ["", "a", "ab"]:
        with pytest.raises(UsernameError, match="shorter than 3"):
            normalize_username(raw)
    with pytest.raises(UsernameError, match="longer than 32"):
        normalize_username("a" * 33)


def test_length_counts_after_normalisation() -> None:
    # One ligature character becomes two letters: "ﬀa" is "ffa", 3 characters.
    assert normalize_username("\ufb00a") == "ffa"
    # 17 sharp s fold to 34 letters: too long although 17 were typed.
    with pytest.raises(UsernameError, match="longer than 32"):
        normalize_username("\u00df" * 17)


def test_overlong_input_refused_before_normalising() -> None:
    with pytest.raises(UsernameError, match="longer than 64") as info:
        normalize_username("a" * 65)
    # At most the first 32 characters of the input are echoed.
    assert "a" * 33 not in str(info.value)
    assert "a" * 32 in str(info.value)


def test_error_echo_is_bounded_for_every_rule() -> None:
    raw = "b" * 40 + "!"
    with pytest.raises(UsernameError) as info:
        normalize_username(raw)
    assert "b" * 33 not in str(info.value)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("al ice", r"' ' \(U\+0020\)"),
        (" alice", r"' ' \(U\+0020\)"),
        ("alice\n", r"'\\n' \(U\+000A\)"),
        ("al@ice", r"'@'"),
        ("al+ice", r"'\+'"),
        ("al/ice", r"'/'"),
        ("ali\u0000ce", r"U\+0000"),
    ],
)
def test_bad_characters(raw: str, reason: str) -> None:
    with pytest.raises(UsernameError, match=reason):
        normalize_username(raw)


@pytest.mark.parametrize("raw", [".alice", "_alice", "-alice", "...", "-ab"])
def test_must_start_with_letter_or_digit(raw: str) -> None:
    with pytest.raises(UsernameError, match="starts with"):
        normalize_username(raw)


@pytest.mark.parametrize("raw", ["al..ice", "al._ice", "al-_ice", "al__ice", "al--ice", "ab.-"])
def test_no_two_separators_in_a_row(raw: str) -> None:
    with pytest.raises(UsernameError, match="two separators in a row"):
        normalize_username(raw)


def test_every_error_says_what_is_allowed() -> None:
    for raw in ["", "a" * 33, "al ice", ".ab", "a..b", "a" * 65]:
        with pytest.raises(UsernameError) as info:
            normalize_username(raw)
        assert str(info.value).endswith(USERNAME_RULES)
    assert isinstance(UsernameError("x"), ValueError)


def test_the_pattern_agrees_with_the_rules_on_every_short_ascii_name() -> None:
    """USERNAME_PATTERN (with the length limits) is what the admin API's OpenAPI
    document promises; it must accept exactly the ASCII names the rules do."""
    alphabet = "aZ0._- \n"
    for length in range(6):
        for chars in itertools.product(alphabet, repeat=length):
            raw = "".join(chars)
            promised = USERNAME_MIN <= len(raw) <= USERNAME_MAX and bool(
                re.search(USERNAME_PATTERN, raw)
            )
            try:
                normalize_username(raw)
            except UsernameError:
                accepted = False
            else:
                accepted = True
            assert promised == accepted, raw
    assert re.search(USERNAME_PATTERN, "a" * USERNAME_MAX)
    assert not re.search(USERNAME_PATTERN, "ａｌｉｃｅ")  # folds to alice, but is not its spelling
