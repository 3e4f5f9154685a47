"""The sender's HTTP/1.1 client (chatd/push/http11.py) over real sockets:
keep-alive reuse, a peer that closes the connection, TLS with the URL's
host as the server name (a certificate made here, trusted by the test's
context only)."""

from __future__ import annotations

import datetime
import ssl
from functools import partial
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from chatd.push.http11 import Client, PostError

from .test_push import Receiver, receiver


async def test_connections_are_kept_alive_until_the_peer_says_close() -> None:
    async with receiver() as rx:
        client = Client(user_agent="t", max_idle=4)
        key = ("http", "127.0.0.1", rx.port, "127.0.0.1")
        assert await client.post(key, "/a", [("Host", "x")], b"1") == 201
        assert await client.post(key, "/b", [("Host", "x")], b"2") == 201
        assert rx.connections == 1
        rx.close_after_answer = True
        assert await client.post(key, "/c", [("Host", "x")], b"3") == 201
        await rx.wait_closed()
        assert await client.post(key, "/d", [("Host", "x")], b"4") == 201
        assert rx.connections == 2 and [r.target for r in rx.received][-1] == b"/d"
        await client.aclose()


def certificate(tmp: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.mark.parametrize(("server_name", "ok"), [("push.test", True), ("other.test", False)])
async def test_tls_checks_the_urls_host_not_the_address(
    short_tmp: Path, server_name: str, ok: bool
) -> None:
    cert, key = certificate(short_tmp, "push.test")
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    client_tls = ssl.create_default_context(cafile=str(cert))
    rx = Receiver()

    async def handle(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, server_tls, server_side=True, https_compatible=True)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError:
            return  # the client refused our certificate
        await rx.handle(tls)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        client = Client(user_agent="t", max_idle=4, tls=client_tls)
        key_ = ("https", "127.0.0.1", port, server_name)
        if ok:
            assert await client.post(key_, "/up", [("Host", server_name)], b"{}") == 201
            assert rx.received[0].headers[b"host"] == b"push.test"
        else:
            with pytest.raises(PostError):
                await client.post(key_, "/up", [("Host", server_name)], b"{}")
            assert rx.received == []
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_a_kept_alive_connection_closed_as_it_is_reused_is_replaced_once() -> None:
    """The peer closes an idle connection just as the next POST goes out on
    it (the request is read, no answer comes): the POST goes again, on a new
    connection."""
    answer = b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n"
    connections = 0

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        first = connections == 1
        async with stream:
            while await stream.receive_some(65536):
                if not first:
                    await stream.send_all(answer)
                    continue
                await stream.send_all(answer)  # answers once, then drops the next request
                first = False
                await stream.receive_some(65536)
                return

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        client = Client(user_agent="t", max_idle=4)
        key = ("http", "127.0.0.1", port, "127.0.0.1")
        assert await client.post(key, "/a", [("Host", "x")], b"1") == 201
        assert await client.post(key, "/b", [("Host", "x")], b"2") == 201
        assert connections == 2
        await client.aclose()
        nursery.cancel_scope.cancel()
