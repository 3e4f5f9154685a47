"""sslyze against the real daemon's own TLS listeners (relay and blobs):
Mozilla's "modern" profile must pass. The bounded run of the TLS suite
(docs/RELIABILITY.md section 6); bench/tls_scan.py is the complete one.

Only the scan commands the modern check needs are run (a second or two on
loopback). A negative control shows the check is not vacuous: the same
daemon with a one-year RSA certificate fails it on exactly the
certificate's points, and on nothing of chatd's.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trio

from .conftest import DataDir
from .test_daemon import daemon
from .tls_scan import issue_certificate, modern_issues, scan

#: sslyze loads its bundled trust stores, some of whose old roots carry a
#: negative serial number; cryptography warns about those, not about ours.
pytestmark = pytest.mark.filterwarnings("ignore:Parsed a serial number:UserWarning")

SCAN_BUDGET = 30.0  # seconds both listeners' scans may take together


async def scan_daemon(
    data_dir: DataDir, short_tmp: Path, days: int, key_type: str
) -> dict[str, dict[str, str]]:
    """Start ``chatd serve`` with a fresh test certificate on the relay (the
    blob listener uses the same one), scan both listeners, return each one's
    issues against the modern profile by listener name."""
    cert = issue_certificate(data_dir.path, days=days, key_type=key_type)
    data_dir.configure(
        relay={"port": 0, "tls_certificate": cert.chain.name, "tls_private_key": cert.key.name}
    )
    async with daemon(data_dir, short_tmp) as d:
        status = await d.wait_notify("READY")
        relay_url = d.relay_url()
        blobs_url = status.split("blobs ", 1)[1].split(",", 1)[0].split()[0]
        assert relay_url.startswith("wss://") and blobs_url.startswith("https://")
        ports = {"relay": urlsplit(relay_url).port, "blobs": urlsplit(blobs_url).port}
        with trio.fail_after(SCAN_BUDGET):  # abandoned, not waited for, if it hangs
            results = await trio.to_thread.run_sync(
                scan, list(ports.values()), cert.ca, abandon_on_cancel=True
            )
    by_port = {r.server_location.port: r for r in results}
    return {name: modern_issues(by_port[port]) for name, port in ports.items()}


async def test_both_tls_listeners_pass_mozilla_modern(data_dir: DataDir, short_tmp: Path) -> None:
    issues = await scan_daemon(data_dir, short_tmp, days=30, key_type="ecdsa")
    assert issues == {"relay": {}, "blobs": {}}


async def test_a_long_lived_rsa_certificate_fails_only_on_the_certificate(
    data_dir: DataDir, short_tmp: Path
) -> None:
    issues = await scan_daemon(data_dir, short_tmp, days=365, key_type="rsa")
    for listener in ("relay", "blobs"):
        assert set(issues[listener]) == {"certificate_types", "maximum_certificate_lifespan"}
