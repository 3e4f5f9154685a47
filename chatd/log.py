"""Structured logging to stderr, one event per line, for journald.

Call sites log a short event name plus fields::

    log.info("relay.connect", extra=fields(peer=mask_ip(addr), conns=n))

Two defences keep secrets out: call sites never pass them, and the formatter
replaces the value of any field whose name looks secret (token, password,
key, secret, authorization) with ``[redacted]`` in case one slips through.
Client addresses are masked by :func:`mask_ip` unless ``log.mask_client_ips``
is off.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import sys
import time
from typing import Any, Final, TextIO

from chatd.config import LogSettings

_FIELDS: Final = "chatd_fields"
_SECRET_WORDS: Final = ("token", "password", "secret", "key", "authorization", "cookie")
REDACTED: Final = "[redacted]"

_mask_ips = True


def fields(**values: Any) -> dict[str, Any]:
    """Wrap structured fields for ``logger.x(msg, extra=fields(...))``."""
    return {_FIELDS: values}


def mask_ip(address: str | None) -> str:
    """Mask a client address to its /24 (IPv4) or /48 (IPv6) network.

    Returns the address unchanged when masking is off, and ``"-"`` for an
    address that is missing or not an IP (a unix socket peer, say).
    """
    if not address:
        return "-"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return "-"
    if not _mask_ips:
        return str(ip)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def client_network(address: str | None) -> str:
    """The key rate limits use for a client: its IPv4 address, or its IPv6 /64.

    Independent of ``log.mask_client_ips``: an IPv6 client must not escape a
    limit by rotating addresses inside its own /64.
    """
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return "-"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.version == 4:
        return str(ip)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False))


def _is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS) and not lowered.endswith("_count")


def _logfmt_value(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' ="\\') or any(ord(c) < 32 for c in text):
        return json.dumps(text)
    return text


class StructuredFormatter(logging.Formatter):
    """Formats records as logfmt or JSON lines with redaction."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.json = style == "json"

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, value in getattr(record, _FIELDS, {}).items():
            if value is not None:
                event[name] = REDACTED if _is_secret_name(name) else value
        if record.exc_info and record.exc_info[0] is not None:
            # The exception type and location only: messages of third-party
            # exceptions could carry data we do not control.
            exc_type, _, tb = record.exc_info
            event["error"] = exc_type.__name__
            while tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            if tb is not None:
                event["at"] = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"
        if self.json:
            return json.dumps(event, default=str, separators=(",", ":"))
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in event.items())


def configure(settings: LogSettings, stream: TextIO | None = None) -> None:
    """Route all logging (chatd's and libraries') through one formatter to stderr."""
    global _mask_ips
    _mask_ips = settings.mask_client_ips
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(StructuredFormatter(settings.format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.level.upper())
    # Library loggers that are chatty at info, or that log peer data we mask
    # ourselves (hypercorn's access log carries full client addresses).
    # httpx logs every request (with its URL: a push endpoint's topic) at info.
    for name in ("hypercorn.access", "trio-websocket", "quart.serving", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("hypercorn.error").setLevel(max(logging.WARNING, root.level))
