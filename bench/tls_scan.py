"""The complete TLS scan: sslyze, every scan command it has, and Mozilla's
"modern" profile, against a real ``chatd serve``'s relay and blob listeners.

It makes a fresh data dir with ``chatd init``, a throwaway CA and a 30-day
ECDSA P-256 leaf for 127.0.0.1 (tests/tls_scan.py: what the modern profile
asks of a certificate), sets ``relay.tls_certificate`` and
``relay.tls_private_key`` (the blob listener uses the same certificate),
starts the daemon and runs the sslyze command line:

    sslyze --mozilla_config=modern --certinfo_ca_file CA 127.0.0.1:RELAY 127.0.0.1:BLOBS

with every scan command named (certificate, every protocol version's cipher
suites, curves, Heartbleed, ROBOT, CCS injection, renegotiation, compression,
fallback SCSV, EMS, early data, session resumption, HTTP headers), then the
modern check. Its full result summary is printed,
then one line per listener with the seconds the whole scan took. Exits 0
only when both listeners comply.

    .venv/bin/python bench/tls_scan.py [--days 30]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _daemon import Daemon, init_data_dir, set_settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.tls_scan import issue_certificate  # noqa: E402 - the repo root is on the path only now

#: Every scan command of sslyze 6 (--mozilla_config alone queues only those
#: its check needs; this adds resumption, early data and HTTP headers).
ALL_SCAN_COMMANDS = (
    "--certinfo",
    "--sslv2",
    "--sslv3",
    "--tlsv1",
    "--tlsv1_1",
    "--tlsv1_2",
    "--tlsv1_3",
    "--elliptic_curves",
    "--heartbleed",
    "--robot",
    "--openssl_ccs",
    "--reneg",
    "--compression",
    "--fallback",
    "--ems",
    "--early_data",
    "--resum",
    "--http_headers",
)
SCAN_TIMEOUT = 600  # seconds the complete scan of both listeners may take


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=30, help="the leaf's lifespan (default 30)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="chatd-tls-") as tmp:
        data_dir = Path(tmp)
        config = init_data_dir(data_dir)
        cert = issue_certificate(data_dir, days=args.days)
        set_settings(
            config,
            "relay",
            {"port": 0, "tls_certificate": cert.chain.name, "tls_private_key": cert.key.name},
        )
        set_settings(config, "attachments", {"port": 0})
        daemon = Daemon(config, data_dir)
        daemon.start()
        try:
            daemon.wait_ready()
            _, relay_port = daemon.relay_url()
            blobs_url = daemon.status.split("blobs ", 1)[1].split(",", 1)[0].split()[0]
            blobs_port = int(blobs_url.rsplit(":", 1)[1].split("/", 1)[0])
            targets = {"relay": relay_port, "blobs": blobs_port}
            command = [
                sys.executable,
                "-m",
                "sslyze",
                "--mozilla_config=modern",
                *ALL_SCAN_COMMANDS,
                f"--certinfo_ca_file={cert.ca}",
                *(f"127.0.0.1:{port}" for port in targets.values()),
            ]
            started = time.perf_counter()
            scan = subprocess.run(  # noqa: S603 - our own interpreter and arguments
                command, capture_output=True, text=True, timeout=SCAN_TIMEOUT, check=False
            )
            elapsed = time.perf_counter() - started
        finally:
            code, _ = daemon.stop()
    print(scan.stdout)
    if scan.stderr.strip():
        print(scan.stderr, file=sys.stderr)
    verdict = (
        "compliant" if scan.returncode == 0 else f"NOT compliant (sslyze exit {scan.returncode})"
    )
    for name, port in targets.items():
        print(f"{name} 127.0.0.1:{port}: Mozilla modern {verdict}")
    print(f"complete scan of both listeners: {elapsed:.1f} s; chatd exit code {code}")
    return 0 if scan.returncode == 0 and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
