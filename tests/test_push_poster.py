"""The sender's HTTP client (chatd/push/poster.py: libcurl's multi
interface driven from Trio) over real sockets: keep-alive reuse, a peer
that closes the connection, the pinned address, TLS with the URL's host as
the server name (a certificate made here, trusted by this test only),
proxies from the environment ignored, other protocols refused, the
timeout, a long answer."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pycurl
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from chatd.push.poster import MAX_BODY, Poster, _Transfer

from .test_push import Receiver, receiver

ANSWER = b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n"


@asynccontextmanager
async def running(**kwargs: Any) -> AsyncIterator[Poster]:
    poster = Poster(user_agent="t", max_connections=4, **kwargs)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poster.serve)
            yield poster
            nursery.cancel_scope.cancel()
    finally:
        poster.close()


async def post(
    poster: Poster,
    url: str,
    address: str = "127.0.0.1",
    *,
    body: bytes = b"{}",
    timeout: float = 10.0,
) -> int | None:
    """POST and wait for the answer's status (None: no answer)."""
    host, _, port = url.split("/")[2].rpartition(":")
    answers: list[int | None] = []
    done = trio.Event()

    def on_done(status: int | None) -> None:
        answers.append(status)
        done.set()

    headers = ["Content-Type: application/json"]
    poster.post(url, address, int(port), host, headers, body, timeout, on_done)
    with trio.fail_after(timeout + 5):
        await done.wait()
    return answers[0]


@asynccontextmanager
async def raw_server(handle: Any) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def test_connections_are_kept_alive_until_the_peer_says_close() -> None:
    async with receiver() as rx, running() as poster:
        assert await post(poster, rx.url("/a")) == 201
        assert await post(poster, rx.url("/b")) == 201
        assert rx.connections == 1
        rx.close_after_answer = True
        assert await post(poster, rx.url("/c")) == 201
        await rx.wait_closed()
        assert await post(poster, rx.url("/d")) == 201
        assert rx.connections == 2 and [r.target for r in rx.received][-1] == b"/d"


async def test_the_post_goes_to_the_pinned_address_under_the_urls_host() -> None:
    """The host is a name nothing resolves: libcurl looks nothing up, it
    connects to the address given and names the URL's host."""
    async with receiver() as rx, running() as poster:
        assert await post(poster, rx.url("/up?x=1", host="push.invalid")) == 201
        [got] = rx.received
        assert got.headers[b"host"] == f"push.invalid:{rx.port}".encode()
        assert (got.method, got.target, got.body) == (b"POST", b"/up?x=1", b"{}")
        assert got.headers[b"content-type"] == b"application/json"


def test_a_socket_to_any_other_address_is_refused() -> None:
    """The second lock: the socket callback opens a socket to the checked
    address only, whatever address libcurl came to."""
    opened: list[socket.socket] = []
    transfer = _Transfer(pycurl.Curl(), opened)
    transfer.address = ipaddress.ip_address("127.0.0.1")
    inet, stream = int(socket.AF_INET), int(socket.SOCK_STREAM)
    assert transfer.open_socket(0, (inet, stream, 6, ("10.0.0.7", 443))) == pycurl.SOCKET_BAD
    sock = transfer.open_socket(0, (inet, stream, 6, ("127.0.0.1", 443)))
    assert isinstance(sock, socket.socket) and opened == [sock]
    sock.close()
    transfer.curl.close()


async def test_proxies_from_the_environment_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    async with receiver() as proxy, receiver() as rx:
        for name in ("http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.setenv(name, proxy.url("/"))
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        async with running() as poster:
            assert await post(poster, rx.url("/up", host="push.invalid")) == 201
        assert len(rx.received) == 1 and proxy.received == []


@pytest.mark.parametrize("scheme", ["ftp", "gopher", "dict", "telnet"])
async def test_other_protocols_are_refused(scheme: str) -> None:
    """Only http and https: whatever else a URL names gets no connection."""
    connections = 0

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        await stream.aclose()

    async with raw_server(handle) as port, running() as poster:
        assert await post(poster, f"{scheme}://127.0.0.1:{port}/up") is None
    assert connections == 0


async def test_a_slow_answer_ends_at_the_timeout_and_frees_its_slot() -> None:
    async with receiver() as rx, running() as poster:
        rx.hold = trio.Event()
        started = trio.current_time()
        assert await post(poster, rx.url("/slow"), timeout=0.3) is None
        assert trio.current_time() - started >= 0.3
        rx.hold.set()
        rx.hold = None
        assert await post(poster, rx.url("/next")) == 201


async def test_a_redirect_is_answered_not_followed() -> None:
    async with receiver() as rx, receiver() as elsewhere, running() as poster:
        rx.statuses = [307]
        rx.location = elsewhere.url("/stolen").encode()
        assert await post(poster, rx.url("/up")) == 307
        assert elsewhere.received == []


async def test_a_long_answer_is_cut_off_but_its_status_counts() -> None:
    """An answer whose body runs past MAX_BODY ends the transfer (and its
    connection); the status came first and is what the caller gets."""
    head = b"HTTP/1.1 410 Gone\r\ncontent-length: %d\r\n\r\n" % (MAX_BODY * 4)

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(65536)
            await stream.send_all(head + b"x" * (MAX_BODY * 4))
            await stream.receive_some(65536)

    async with raw_server(handle) as port, running() as poster:
        assert await post(poster, f"http://127.0.0.1:{port}/up") == 410


async def test_no_answer_is_none() -> None:
    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(65536)  # the request, then the connection closes

    async with raw_server(handle) as port, running() as poster:
        assert await post(poster, f"http://127.0.0.1:{port}/up") is None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]
    async with running() as poster:
        assert await post(poster, f"http://127.0.0.1:{free}/up") is None  # refused


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


def tls_receiver(
    tmp: Path,
) -> tuple[Path, Receiver, Callable[[trio.SocketStream], Awaitable[None]]]:
    """A receiver behind TLS with a certificate for push.test that no public
    CA signed: its certificate file, the receiver, and the stream handler."""
    cert, key = certificate(tmp, "push.test")
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    rx = Receiver()

    async def handle(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, server_tls, server_side=True, https_compatible=True)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError:
            return  # the client refused our certificate
        await rx.handle(tls)

    return cert, rx, handle


@pytest.mark.parametrize(("server_name", "ok"), [("push.test", True), ("other.test", False)])
async def test_tls_checks_the_urls_host_not_the_address(
    short_tmp: Path, server_name: str, ok: bool
) -> None:
    cert, rx, handle = tls_receiver(short_tmp)
    async with raw_server(handle) as port, running(ca_file=str(cert)) as poster:
        status = await post(poster, f"https://{server_name}:{port}/up")
    if ok:
        assert status == 201
        assert rx.received[0].headers[b"host"] == f"push.test:{port}".encode()
    else:
        assert status is None
        assert rx.received == []


async def test_certificates_are_checked_against_certifis_bundle(short_tmp: Path) -> None:
    """Without ca_file, a certificate no public CA signed is refused."""
    _, rx, handle = tls_receiver(short_tmp)
    async with raw_server(handle) as port, running() as poster:
        assert await post(poster, f"https://push.test:{port}/up") is None
    assert rx.received == []


async def test_a_kept_alive_connection_closed_as_it_is_reused_is_replaced_once() -> None:
    """The peer closes an idle connection just as the next POST goes out on
    it (the request is read, no answer comes): the POST goes again, on a new
    connection."""
    connections = 0

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        first = connections == 1
        async with stream:
            while await stream.receive_some(65536):
                if not first:
                    await stream.send_all(ANSWER)
                    continue
                await stream.send_all(ANSWER)  # answers once, then drops the next request
                first = False
                await stream.receive_some(65536)
                return

    async with raw_server(handle) as port, running() as poster:
        assert await post(poster, f"http://127.0.0.1:{port}/a") == 201
        assert await post(poster, f"http://127.0.0.1:{port}/b") == 201
    assert connections == 2
