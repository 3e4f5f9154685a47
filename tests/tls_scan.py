"""Test certificates from a throwaway CA, and the sslyze scan against Mozilla's
"modern" TLS profile. Shared by tests/test_tls_scan.py (the bounded run) and
bench/tls_scan.py (the complete one).

The CA comes from trustme. The leaf is built here with ``cryptography``
(signed by that CA's key) because trustme always marks subjectAltName
critical while also filling the subject, which RFC 5280 §4.2.1.6 reserves
for an empty subject; the strict path validator sslyze uses (cryptography's)
rejects such a leaf, so every trust store would report the chain unverified.
The leaf is what Mozilla's modern profile asks of a certificate: an ECDSA
P-256 key, signed with ecdsa-with-SHA256, valid for at most 90 days.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
from collections.abc import Iterable
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sslyze import (
    ScanCommand,
    ScanCommandsExtraArguments,
    Scanner,
    ServerNetworkLocation,
    ServerScanRequest,
    ServerScanResult,
)
from sslyze.mozilla_tls_profile.tls_config_checker import (
    SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
    MozillaTlsConfiguration,
    ServerNotCompliantWithTlsConfiguration,
    TlsConfigurationEnum,
    check_server_against_tls_configuration,
)
from sslyze.plugins.certificate_info.implementation import CertificateInfoExtraArgument


@dataclasses.dataclass(frozen=True)
class ScanCertificate:
    ca: Path  # the CA certificate (PEM) the scan trusts
    chain: Path  # the leaf alone (the CA is the trust anchor), for relay.tls_certificate
    key: Path  # the leaf's private key, for relay.tls_private_key (0600)


def issue_certificate(
    directory: Path, *, days: int = 30, key_type: str = "ecdsa"
) -> ScanCertificate:
    """Write a CA, and a leaf for 127.0.0.1 and localhost valid ``days`` days,
    into ``directory``. ``key_type`` "rsa" makes a 2048-bit RSA leaf (which the
    modern profile refuses: the scan's negative control)."""
    ca = trustme.CA()
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
        ec.generate_private_key(ec.SECP256R1())
        if key_type == "ecdsa"
        else rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(san, critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    found = ScanCertificate(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    found.ca.write_bytes(ca.cert_pem.bytes())
    found.chain.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    found.key.touch(mode=0o600)
    found.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return found


def scan(
    ports: Iterable[int], ca: Path, commands: Iterable[ScanCommand] = ()
) -> list[ServerScanResult]:
    """Scan 127.0.0.1 on each port (blocking; run it in a thread) with the
    commands the modern check needs plus ``commands``, trusting ``ca``."""
    extra = ScanCommandsExtraArguments(
        certificate_info=CertificateInfoExtraArgument(custom_ca_file=ca)
    )
    scanner = Scanner()
    scanner.queue_scans(
        [
            ServerScanRequest(
                server_location=ServerNetworkLocation("127.0.0.1", port, ip_address="127.0.0.1"),
                scan_commands={*SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER, *commands},
                scan_commands_extra_arguments=extra,
            )
            for port in ports
        ]
    )
    return list(scanner.get_results())


def modern_issues(result: ServerScanResult) -> dict[str, str]:
    """What keeps the scanned server from Mozilla's modern profile ({} when
    compliant). Raises ServerScanResultIncomplete if a needed command failed."""
    modern = MozillaTlsConfiguration.get(TlsConfigurationEnum.MOZILLA_MODERN)
    try:
        check_server_against_tls_configuration(result, modern)
    except ServerNotCompliantWithTlsConfiguration as exc:
        return exc.issues
    return {}
