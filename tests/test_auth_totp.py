"""TOTP: the codes an authenticator app shows are accepted once, near in time."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pyotp
import pytest

from chatd.auth.totp import new_totp_secret, provisioning_uri, verify_totp

SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
NOW = 1_700_000_015.0  # 15 s into a step
STEP = int(NOW // 30)


def code_at(t: float, secret: str = SECRET) -> str:
    return pyotp.TOTP(secret).at(t)


def test_new_secret_is_160_bits_base32() -> None:
    secrets = {new_totp_secret() for _ in range(50)}
    assert len(secrets) == 50
    for secret in secrets:
        assert len(secret) == 32
        assert len(pyotp.TOTP(secret).byte_secret()) == 20


def test_provisioning_uri() -> None:
    uri = provisioning_uri(SECRET, "alice")
    parts = urlsplit(uri)
    assert (parts.scheme, parts.netloc, parts.path) == ("otpauth", "totp", "/chatd:alice")
    query = parse_qs(parts.query)
    assert query["secret"] == [SECRET]
    assert query["issuer"] == ["chatd"]
    assert "example" in provisioning_uri(SECRET, "alice", issuer="example")
    # An app given this URI makes codes that verify.
    app = pyotp.parse_uri(uri)
    assert verify_totp(SECRET, app.at(NOW), last_step=None, now=NOW) == STEP


def test_current_code_accepted_returns_step() -> None:
    assert verify_totp(SECRET, code_at(NOW), last_step=None, now=NOW) == STEP


def test_step_boundaries() -> None:
    start = STEP * 30.0
    assert verify_totp(SECRET, code_at(start), last_step=None, now=start) == STEP
    assert verify_totp(SECRET, code_at(start), last_step=None, now=start + 29.999) == STEP


def test_one_step_either_side_accepted() -> None:
    assert verify_totp(SECRET, code_at(NOW - 30), last_step=None, now=NOW) == STEP - 1
    assert verify_totp(SECRET, code_at(NOW + 30), last_step=None, now=NOW) == STEP + 1


def test_two_steps_away_refused() -> None:
    for offset in (-60, -90, 60, 90):
        code = code_at(NOW + offset)
        if code in {code_at(NOW - 30), code_at(NOW), code_at(NOW + 30)}:
            continue  # a coincidental collision would make this test meaningless
        assert verify_totp(SECRET, code, last_step=None, now=NOW) is None


def test_replay_refused() -> None:
    code = code_at(NOW)
    step = verify_totp(SECRET, code, last_step=None, now=NOW)
    assert step == STEP
    assert verify_totp(SECRET, code, last_step=step, now=NOW) is None
    assert verify_totp(SECRET, code, last_step=step, now=NOW + 10) is None
    # The next step's code still works after that.
    assert verify_totp(SECRET, code_at(NOW + 30), last_step=step, now=NOW + 30) == STEP + 1


def test_older_code_refused_after_newer_used() -> None:
    newer = verify_totp(SECRET, code_at(NOW + 30), last_step=None, now=NOW)
    assert newer == STEP + 1
    assert verify_totp(SECRET, code_at(NOW), last_step=newer, now=NOW) is None
    assert verify_totp(SECRET, code_at(NOW - 30), last_step=newer, now=NOW) is None


def test_spaces_ignored() -> None:
    code = code_at(NOW)
    for typed in (
        f"{code[:3]} {code[3:]}",
        f" {code} ",
        f"{code}\n",
        f"{code[:3]}\u00a0{code[3:]}",
    ):
        assert verify_totp(SECRET, typed, last_step=None, now=NOW) == STEP


@pytest.mark.parametrize(
    "typed",
    [
        "",
        "12345",
        "1234567",  # 7 digits
        "12345a",
        "abcdef",
        "-12345",
        "+12345",
        "12.345",
        "\u0661\u0662\u0663\u0664\u0665\u0666",  # Arabic-Indic digits are digits to isdigit
        "\uff11\uff12\uff13\uff14\uff15\uff16",  # fullwidth digits
        "1" * 6 + " " * 40,  # over the input bound
    ],
)
def test_malformed_codes_refused(typed: str) -> None:
    assert verify_totp(SECRET, typed, last_step=None, now=NOW) is None


def test_seven_digit_code_containing_the_valid_one_refused() -> None:
    code = code_at(NOW)
    assert verify_totp(SECRET, code + "0", last_step=None, now=NOW) is None
    assert verify_totp(SECRET, "0" + code, last_step=None, now=NOW) is None


def test_code_for_another_secret_refused() -> None:
    other = new_totp_secret()
    code = code_at(NOW, other)
    if code not in {code_at(NOW - 30), code_at(NOW), code_at(NOW + 30)}:
        assert verify_totp(SECRET, code, last_step=None, now=NOW) is None


def test_near_epoch_does_not_fail() -> None:
    assert verify_totp(SECRET, code_at(5.0), last_step=None, now=5.0) == 0
    assert verify_totp(SECRET, code_at(35.0), last_step=None, now=5.0) == 1
