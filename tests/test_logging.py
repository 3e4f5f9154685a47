"""Structured logs: masked client addresses, no secrets."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from chatd import log as chatd_log
from chatd.config import LogSettings
from chatd.log import fields, mask_ip


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    chatd_log.configure(LogSettings(level="debug"), stream)
    yield stream
    chatd_log.configure(LogSettings())
    logging.getLogger().handlers.clear()


@pytest.mark.parametrize(
    ("address", "masked"),
    [
        ("203.0.113.77", "203.0.113.0/24"),
        ("2001:db8:abcd:12:1:2:3:4", "2001:db8:abcd::/48"),
        ("::ffff:198.51.100.9", "198.51.100.0/24"),
        ("", "-"),
        (None, "-"),
        ("not-an-ip", "-"),
    ],
)
def test_client_addresses_are_masked(address: str | None, masked: str) -> None:
    assert mask_ip(address) == masked


def test_masking_can_be_turned_off() -> None:
    chatd_log.configure(LogSettings(mask_client_ips=False), io.StringIO())
    try:
        assert mask_ip("203.0.113.77") == "203.0.113.77"
    finally:
        chatd_log.configure(LogSettings(), io.StringIO())


def test_logfmt_lines_carry_fields_and_redact_secret_names(captured: io.StringIO) -> None:
    logging.getLogger("chatd.test").info(
        "event.name",
        extra=fields(
            peer=mask_ip("203.0.113.5"),
            admin_token="s3cr3t-value",
            db_key="k" * 64,
            password="hunter2hunter2",
            note="two words",
        ),
    )
    line = captured.getvalue().strip()
    assert "msg=event.name" in line
    assert "peer=203.0.113.0/24" in line
    assert 'note="two words"' in line
    for secret in ("s3cr3t-value", "k" * 64, "hunter2hunter2", "203.0.113.5 "):
        assert secret not in line
    assert line.count("[redacted]") == 3


def test_json_format_is_one_object_per_line() -> None:
    stream = io.StringIO()
    chatd_log.configure(LogSettings(format="json"), stream)
    try:
        logging.getLogger("chatd.test").warning("x.y", extra=fields(n=3, token="abc"))
        event = json.loads(stream.getvalue())
    finally:
        chatd_log.configure(LogSettings(), io.StringIO())
    assert event["msg"] == "x.y"
    assert event["level"] == "warning"
    assert event["n"] == 3
    assert event["token"] == "[redacted]"


def test_exception_messages_are_not_logged(captured: io.StringIO) -> None:
    try:
        raise ValueError("password=hunter2hunter2")
    except ValueError:
        logging.getLogger("chatd.test").exception("failed")
    line = captured.getvalue()
    assert "error=ValueError" in line
    assert "hunter2" not in line


def test_level_filters(captured: io.StringIO) -> None:
    chatd_log.configure(LogSettings(level="warning"), captured)
    logging.getLogger("chatd.test").info("quiet")
    logging.getLogger("chatd.test").error("loud")
    assert "quiet" not in captured.getvalue()
    assert "loud" in captured.getvalue()
