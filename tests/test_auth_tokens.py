"""Tokens, recovery codes and invite codes: random, well-formed, hashed stably."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest

from chatd.auth.tokens import (
    TOKEN_MAX_CHARS,
    MalformedTokenError,
    new_invite_code,
    new_recovery_codes,
    new_token,
    normalize_recovery_code,
    recovery_code_hash,
    token_hash,
)

_URLSAFE = re.compile(r"[A-Za-z0-9_-]{43}")
_RECOVERY = re.compile(r"[a-z2-7]{4}(-[a-z2-7]{4}){5}")


def test_tokens_are_256_bit_urlsafe_and_unique() -> None:
    tokens = {new_token() for _ in range(200)}
    assert len(tokens) == 200
    for token in tokens:
        assert _URLSAFE.fullmatch(token)
        assert len(base64.urlsafe_b64decode(token + "=")) == 32
        assert len(token) <= TOKEN_MAX_CHARS


def test_invite_codes_are_256_bit_urlsafe_and_unique() -> None:
    codes = {new_invite_code() for _ in range(200)}
    assert len(codes) == 200
    assert all(_URLSAFE.fullmatch(code) for code in codes)


def test_no_invite_code_starts_with_a_dash() -> None:
    """``chat --invite -abc...`` would read the code as an option (1 in 64 did)."""
    assert not any(new_invite_code().startswith("-") for _ in range(2_000))


def test_token_hash_is_sha256() -> None:
    token = new_token()
    digest = token_hash(token)
    assert digest == hashlib.sha256(token.encode()).digest()
    assert len(digest) == 32
    assert token_hash(token) == digest  # stable: usable as a lookup key
    assert token_hash(new_token()) != digest
    assert token_hash(new_invite_code()) != digest


def test_token_hash_refuses_overlong_input() -> None:
    assert len(token_hash("x" * TOKEN_MAX_CHARS)) == 32
    with pytest.raises(MalformedTokenError, match="at most 64") as info:
        token_hash("x" * (TOKEN_MAX_CHARS + 1))
    assert "xxxx" not in str(info.value)  # the input is never echoed
    assert isinstance(MalformedTokenError("x"), ValueError)


def test_token_hash_of_junk_up_to_the_limit_never_raises() -> None:
    # Callers only check the length; anything that short must hash (to nothing issued).
    for junk in ["", "t\u00f6ken", "\ud800", "\x00" * TOKEN_MAX_CHARS, "\U0001f511" * 64]:
        assert len(token_hash(junk)) == 32
    assert token_hash("\ud800") != token_hash("\udc00")


def test_recovery_codes_shape() -> None:
    codes = new_recovery_codes()
    assert len(codes) == 10
    assert len(set(codes)) == 10
    for code in codes:
        assert _RECOVERY.fullmatch(code), code
        raw = code.replace("-", "").upper()
        assert len(base64.b32decode(raw)) == 15  # 120 bits
    assert len(new_recovery_codes(3)) == 3
    with pytest.raises(ValueError):
        new_recovery_codes(0)


def test_recovery_codes_use_the_whole_alphabet() -> None:
    seen = set("".join(new_recovery_codes(50)).replace("-", ""))
    assert seen == set("abcdefghijklmnopqrstuvwxyz234567")


def test_normalize_recovery_code_accepts_typed_variants() -> None:
    code = new_recovery_codes(1)[0]
    plain = code.replace("-", "")
    variants = [
        code,
        code.upper(),
        plain,
        " ".join(code.split("-")),
        f"  {code}  ",
        code.replace("-", " - "),
        "\t" + plain.upper() + "\n",
    ]
    for variant in variants:
        assert normalize_recovery_code(variant) == plain


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "abcd-efgh-ijkl-mnop-qrst-uvw",  # 23 characters
        "abcd-efgh-ijkl-mnop-qrst-uvwxy",  # 25 characters
        "abcd-efgh-ijkl-mnop-qrst-uvw1",  # 1 is not base32
        "abcd-efgh-ijkl-mnop-qrst-uvw8",  # 8 is not base32
        "abcd-efgh-ijkl-mnop-qrst-uvw=",
        "abcd_efgh_ijkl_mnop_qrst_uvwx",  # underscores are not separators
        "abcd-efgh-ijkl-mnop-qrst-uvw\u212a",  # KELVIN SIGN lowercases to k: refused
        "\u0430bcd-efgh-ijkl-mnop-qrst-uvwx",  # Cyrillic a
        "a" * 24 + " " * 41,  # over the 64-character input bound
    ],
)
def test_normalize_recovery_code_refuses_malformed(raw: str) -> None:
    assert normalize_recovery_code(raw) is None


def test_recovery_code_hash_is_sha256_of_normal_form() -> None:
    code = new_recovery_codes(1)[0]
    plain = code.replace("-", "")
    digest = recovery_code_hash(code)
    assert digest == hashlib.sha256(plain.encode()).digest()
    assert recovery_code_hash(code.upper().replace("-", " ")) == digest
    assert recovery_code_hash(new_recovery_codes(1)[0]) != digest


def test_recovery_code_hash_refuses_malformed() -> None:
    with pytest.raises(MalformedTokenError, match="24 characters") as info:
        recovery_code_hash("not-a-code-0000")
    assert "not-a-code" not in str(info.value)
