"""Wake-up POSTs in C: libcurl's multi interface (pycurl), driven from Trio.

Why libcurl and not httpx (which DESIGN.md names for outbound HTTP): the
push sender's CPU per wake-up is what competes with live messages when
1,000 wake-ups a second go out on a 2-core machine. Measured with
``bench/push_sender.py`` (1,000 wake-ups a second to a receiver that
answers after 1 s, CPU time of the sender process from /proc): httpx with
httpcore took about 1.3 ms per POST, the h11 client that replaced it (pure
Python on Trio streams) about 300 us, the sender with this module about
110 us, of which libcurl itself (the kernel's TCP included) is about 60 us
(docs/OPERATIONS.md section 17 has the figures and the commands). Here the
HTTP, TLS and the connection cache are libcurl's C; Python does a few
``setopt`` calls per POST and one loop round per few milliseconds.

What every POST gets (``Poster.post``):

* **Pinned to the checked address.** The URL keeps the endpoint's host
  (for the ``Host`` header, TLS's server name and certificate check), and
  ``CURLOPT_CONNECT_TO`` sends the connection to the address the SSRF
  guard checked (an IP literal, so libcurl resolves nothing). Unlike
  ``CURLOPT_RESOLVE``, whose entries go into the multi handle's shared DNS
  cache (where a concurrent POST to the same host could replace them), it
  is a per-transfer setting, and libcurl keys its kept-alive connections by
  it, so a connection is only reused for the same address. As a second
  lock, ``CURLOPT_OPENSOCKETFUNCTION`` refuses to open a socket to any
  other address (should libcurl ever read the URL's host differently from
  :func:`chatd.push.guard.parse_target` and look a name up itself).
* **No redirects** (``FOLLOWLOCATION`` off: a 3xx is the caller's to
  judge), **http and https only** (``PROTOCOLS``), **no proxy** (``PROXY``
  "" and ``NOPROXY`` "*": the environment's ``http_proxy`` and friends are
  ignored, as the guard's checks would mean nothing through a proxy).
* **TLS** verified (peer and host name) against certifi's CA bundle, the
  one httpx used, or ``ca_file``; HTTP/1.1 only.
* **Keep-alive**: libcurl's connection cache, at most ``max_connections``
  connections (``CURLMOPT_MAXCONNECTS``), none older than ``IDLE_SECONDS``
  (``MAXAGE_CONN``); a kept-alive connection the peer closed is noticed
  (or the request is sent again once on a new one, by libcurl).
* **Bounded**: ``timeout`` seconds for the whole POST (``TIMEOUT_MS``:
  connecting, TLS, sending, the answer); the answer's body is discarded,
  and one longer than ``MAX_BODY`` bytes ends the transfer (the status
  already came).

Driving it: libcurl tells which sockets to watch (the socket callback,
kept in an epoll set of our own) and when to call it back (the timer
callback). :meth:`Poster.serve`, one task, waits on that epoll set's
descriptor (``trio.lowlevel.wait_readable``: one Trio wait for all the
sockets; a new POST writes to an eventfd in the set to end the wait) or
the timer, hands what is ready to ``socket_action``, collects the finished
transfers, and then rests ``ROUND_GAP`` before the next round, so that
under load one round serves many sockets (at 1,000 POSTs a second, tens of
events a round instead of one Trio wake-up each). A finished POST
is reported to its ``on_done`` callback with the answer's status code, or
None if no answer came (no connection, TLS refused, the timeout, a broken
answer).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import select
import socket
from collections.abc import Callable
from typing import Final, NoReturn

import certifi
import pycurl
import trio

from chatd.log import fields

log = logging.getLogger("chatd.push.poster")

IDLE_SECONDS: Final = 30  # a kept-alive connection older than this is not reused
MAX_BODY: Final = 16 * 1024  # bytes of an answer's body, at most (then the transfer ends)
RECEIVE_BUFFER: Final = 4096  # bytes of libcurl's receive buffer per transfer
SEND_BUFFER: Final = 16 * 1024  # bytes of its upload buffer per transfer (libcurl's minimum)
#: Seconds between two rounds of the loop, at least: under load a round
#: serves every socket that became ready meanwhile (wake-ups do not need
#: millisecond latency; the CPU per wake-up is what counts).
ROUND_GAP: Final = 0.005

#: Called with the answer's status code, or None if no answer came.
OnDone = Callable[[int | None], None]

_EPOLL_TO_CURL: Final = (
    (select.EPOLLIN, pycurl.CSELECT_IN),
    (select.EPOLLOUT, pycurl.CSELECT_OUT),
    (select.EPOLLERR | select.EPOLLHUP, pycurl.CSELECT_ERR),
)
_CURL_TO_EPOLL: Final = {
    pycurl.POLL_IN: select.EPOLLIN,
    pycurl.POLL_OUT: select.EPOLLOUT,
    pycurl.POLL_INOUT: select.EPOLLIN | select.EPOLLOUT,
}


def _discard(_data: bytes) -> None:
    """The answer's body: not kept (its size is bounded by MAXFILESIZE)."""


class _Transfer:
    """One easy handle, and what its current POST needs."""

    __slots__ = ("curl", "opened", "address", "on_done", "connect_to", "headers", "timeout_ms")

    def __init__(self, curl: pycurl.Curl, opened: list[socket.socket]) -> None:
        self.curl = curl
        self.opened = opened  # the Poster's list of sockets to close
        self.address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
        self.on_done: OnDone | None = None
        # What the handle was last set to: set again only when it changes.
        self.connect_to = ""
        self.headers: list[str] | None = None
        self.timeout_ms = 0

    def open_socket(
        self, _purpose: int, address: tuple[int, int, int, tuple[object, ...]]
    ) -> object:
        """libcurl's socket(2): only to the address the guard checked."""
        family, socktype, protocol, peer = address
        try:
            ok = ipaddress.ip_address(str(peer[0])) == self.address
        except ValueError:
            ok = False
        if not ok:
            log.warning("push.unchecked_address_refused")
            return pycurl.SOCKET_BAD
        sock = socket.socket(family, socktype, protocol)
        # pycurl uses a dup() of it: this one is closed at the next round
        # (not left to the garbage collector, which would warn).
        self.opened.append(sock)
        return sock


class Poster:
    """POSTs over one libcurl multi handle. Not a service by itself:
    :meth:`serve` must run (in the owner's nursery) for POSTs to progress;
    :meth:`close` ends the POSTs in flight (their ``on_done`` is not called)
    and closes every connection."""

    def __init__(
        self, *, user_agent: str, max_connections: int, ca_file: str | None = None
    ) -> None:
        self.user_agent = user_agent
        self.ca_file = ca_file or certifi.where()
        self._multi = pycurl.CurlMulti()
        self._multi.setopt(pycurl.M_SOCKETFUNCTION, self._on_socket)
        self._multi.setopt(pycurl.M_TIMERFUNCTION, self._on_timer)
        self._multi.setopt(pycurl.M_MAXCONNECTS, max_connections)
        self._epoll = select.epoll()
        self._watched: dict[int, int] = {}  # fd -> epoll mask
        self._deadline = math.inf  # when libcurl wants socket_action(TIMEOUT)
        # A new POST while serve waits makes the kick readable (a write to an
        # eventfd in the epoll set) rather than cancelling the wait: a
        # cancellation costs Trio an exception.
        self._kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._kick, select.EPOLLIN)
        self._idle = False  # serve waits; a new POST kicks it
        self._kicked = False
        self._running: dict[pycurl.Curl, _Transfer] = {}
        # Finished easy handles, reused (a new one costs a dozen setopts);
        # at most max_connections, as many as POSTs are ever in flight.
        self._free: list[_Transfer] = []
        self._max_free = max_connections
        self._opened: list[socket.socket] = []  # handed to libcurl (which dup()s them): to close

    # -- POSTs ----------------------------------------------------------------------------

    def post(
        self,
        url: str,
        address: str,
        port: int,
        host: str,
        headers: list[str],
        body: bytes,
        timeout: float,
        on_done: OnDone,
    ) -> None:
        """Start POSTing ``body`` to ``url`` (whose host is ``host`` and port
        ``port``) over a connection to ``address`` (an IP the guard checked),
        with ``headers`` ("Name: value"; pass the same list object for the
        same headers: it is then handed to libcurl once per handle), within
        ``timeout`` seconds; call ``on_done`` when it ends. Never blocks."""
        transfer = self._free.pop() if self._free else self._new_transfer()
        curl = transfer.curl
        curl.setopt(pycurl.URL, url)
        connect_to = f"{_bracket(host)}:{port}:{_bracket(address)}:{port}"
        if connect_to != transfer.connect_to:
            curl.setopt(pycurl.CONNECT_TO, [connect_to])
            transfer.connect_to = connect_to
            transfer.address = ipaddress.ip_address(address)
        if headers is not transfer.headers:  # the caller keeps one list per kind
            curl.setopt(pycurl.HTTPHEADER, headers)
            transfer.headers = headers
        timeout_ms = max(1, int(timeout * 1000))
        if timeout_ms != transfer.timeout_ms:
            curl.setopt(pycurl.TIMEOUT_MS, timeout_ms)
            transfer.timeout_ms = timeout_ms
        curl.setopt(pycurl.POSTFIELDS, body)
        transfer.on_done = on_done
        self._running[curl] = transfer
        self._multi.add_handle(curl)  # calls _on_timer(0): the next round starts it
        if self._idle and not self._kicked:
            self._kicked = True
            os.eventfd_write(self._kick, 1)

    def _new_transfer(self) -> _Transfer:
        curl = pycurl.Curl()
        transfer = _Transfer(curl, self._opened)
        for option, value in (
            (pycurl.POST, 1),
            (pycurl.NOSIGNAL, 1),
            (pycurl.USERAGENT, self.user_agent),
            (pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS),
            (pycurl.FOLLOWLOCATION, 0),
            (pycurl.PROXY, ""),
            (pycurl.NOPROXY, "*"),
            (pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1),
            (pycurl.CAINFO, self.ca_file),
            (pycurl.SSL_VERIFYPEER, 1),
            (pycurl.SSL_VERIFYHOST, 2),
            (pycurl.MAXAGE_CONN, IDLE_SECONDS),
            (pycurl.MAXFILESIZE_LARGE, MAX_BODY),
            # Small buffers: an answer is a status line and a few headers,
            # a body is < 1 KiB; the defaults (16 and 64 KiB per transfer)
            # made ~80 MiB at 1,000 POSTs in flight.
            (pycurl.BUFFERSIZE, RECEIVE_BUFFER),
            (pycurl.UPLOAD_BUFFERSIZE, SEND_BUFFER),
            (pycurl.WRITEFUNCTION, _discard),
            (pycurl.OPENSOCKETFUNCTION, transfer.open_socket),
        ):
            curl.setopt(option, value)
        return transfer

    def _finish(self, curl: pycurl.Curl) -> None:
        transfer = self._running.pop(curl)
        status = int(curl.getinfo(pycurl.RESPONSE_CODE))
        self._multi.remove_handle(curl)
        on_done, transfer.on_done = transfer.on_done, None
        if len(self._free) < self._max_free:
            self._free.append(transfer)
        else:
            curl.close()
        if on_done is not None:
            # An answer whose status came but whose body broke, overran
            # MAX_BODY or timed out still counts by its status.
            on_done(status if status >= 100 else None)

    # -- the loop -------------------------------------------------------------------------

    def _on_socket(self, what: int, fd: int, _multi: object, _socketp: object) -> None:
        if what == pycurl.POLL_REMOVE:
            if self._watched.pop(fd, None) is not None:
                try:
                    self._epoll.unregister(fd)
                except OSError:
                    pass  # libcurl closed it first: epoll forgot it by itself
            return
        mask = _CURL_TO_EPOLL[what]
        was = self._watched.get(fd)
        if was == mask:
            return
        self._watched[fd] = mask
        if was is None:
            try:
                self._epoll.register(fd, mask)
            except FileExistsError:  # a closed fd's number, reused
                self._epoll.modify(fd, mask)
        else:
            self._epoll.modify(fd, mask)

    def _on_timer(self, timeout_ms: int) -> None:
        # Called from within libcurl's calls only: in a round (which looks at
        # the deadline next), or in post() (which kicks a waiting serve).
        self._deadline = math.inf if timeout_ms < 0 else trio.current_time() + timeout_ms / 1000

    def _round(self) -> None:
        """Hand libcurl what is ready, then collect the finished POSTs."""
        for sock in self._opened:
            sock.close()
        self._opened.clear()
        action = self._multi.socket_action
        for fd, events in self._epoll.poll(0):
            if fd == self._kick:
                os.eventfd_read(self._kick)
                self._kicked = False
                continue
            flags = 0
            for epoll_bit, curl_bit in _EPOLL_TO_CURL:
                if events & epoll_bit:
                    flags |= curl_bit
            action(fd, flags)
        if self._deadline <= trio.current_time():
            self._deadline = math.inf
            action(pycurl.SOCKET_TIMEOUT, 0)
        while True:
            queued, done, failed = self._multi.info_read()
            for curl in done:
                self._finish(curl)
            for curl, _code, _message in failed:
                self._finish(curl)
            if not queued:
                return

    async def serve(self) -> NoReturn:
        """Run the POSTs: a round, a rest of ``ROUND_GAP``, and unless
        libcurl's timer is due by then, a wait for a socket, a new POST (the
        kick) or the timer; until cancelled (then :meth:`close`)."""
        epoll_fd = self._epoll.fileno()
        while True:
            if self._deadline > trio.current_time() + ROUND_GAP:
                self._idle = True
                with trio.move_on_at(self._deadline):
                    await trio.lowlevel.wait_readable(epoll_fd)
                self._idle = False
            self._round()
            await trio.sleep(ROUND_GAP)

    def close(self) -> None:
        """End the POSTs in flight (no ``on_done``) and close every connection."""
        for curl, transfer in list(self._running.items()):
            transfer.on_done = None
            self._multi.remove_handle(curl)
            curl.close()
        self._running.clear()
        for transfer in self._free:
            transfer.curl.close()
        self._free.clear()
        for sock in self._opened:
            sock.close()
        self._opened.clear()
        self._multi.close()
        self._epoll.close()
        os.close(self._kick)
        if self._watched:
            log.debug("push.poster_closed", extra=fields(sockets=len(self._watched)))
        self._watched.clear()


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
