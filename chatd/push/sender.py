"""The push sender: the child process that POSTs wake-ups.

Theory of operation
-------------------
Sending a wake-up costs CPU: the SSRF guard's checks, the RFC 8291
encryption (a new P-256 key pair and an ECDH each time, about 190 us when
the device gave keys) and the HTTP client's own work per request. The
client is libcurl (:mod:`chatd.push.poster`, not httpx as DESIGN.md
suggests): measured with bench/push_sender.py (1,000 wake-ups a second, a
receiver answering after 1 s), this process took about 1.3 ms of CPU per
wake-up with httpx, about 300 us with the pure-Python h11 client that
followed, and about 110 us with libcurl (of which libcurl itself, the
kernel's TCP included, about 60 us). On the
relay's event loop that CPU competed with live messages, so the notifier
(:mod:`chatd.push.notifier`, in the daemon) keeps only the cheap part,
which devices to wake and when (coalescing, retries, the bounded queue, the
endpoints), and hands each due wake-up to this process, ``python -m
chatd.push sender``, as a *job*. The sender runs under its own interpreter
and GIL, at a lower CPU priority than the relay (``SCHED_IDLE``, or
nice ``SENDER_NICE`` where that is refused): live messages come first,
wake-ups take what CPU is left. Its outcomes go back in batches (each
waits ``OUTCOME_LINGER`` for others), so under load the daemon reads them
tens at a time.

The link is the child's stdin and stdout, one JSON object a line (msgspec
structs, strict):

* parent -> sender: one :class:`Setup` first, then :class:`Job` lines
  (a job id, the endpoint's URL and keys, nothing else);
* sender -> parent: one :class:`Outcome` per job, in the order they finish.

For each job the sender checks the target again (resolving the host with
its own DNS lookup, :func:`chatd.push.guard.checked_addresses`; the
verdict on a URL whose host is an IP literal depends on nothing that can
change while the process runs, so it is kept), builds the wake-up
(:func:`chatd.push.wakeup.wake_up_request`) and POSTs it to the checked
address (:mod:`chatd.push.poster`: libcurl, pinned to that address,
keep-alive connections, no redirects, no proxies), at most
``Setup.concurrency`` at once (the parent never sends more outstanding
jobs than that either), each bounded by ``Setup.timeout_seconds``
(resolving, connecting, the answer). It never retries: the outcome goes
back, and the parent decides (retry later, drop the endpoint, give up).

Stopping: end of file on stdin (the parent closed the pipe, or died)
abandons the POSTs in flight and exits with status 0. SIGTERM and SIGINT
are ignored: a stop signal for the whole process group (systemd, Ctrl-C in
a terminal) is the daemon's to act on, and the daemon closes the pipe when
it stops. Its log lines go to stderr, which it shares with the daemon.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import os
import signal
import sys
from typing import Final

import msgspec
import trio

from chatd.config import LogSettings
from chatd.log import configure, fields
from chatd.push.guard import (
    PushRefused,
    Resolver,
    Target,
    checked_addresses,
    parse_networks,
    parse_target,
    resolve_host,
)
from chatd.push.poster import Poster
from chatd.push.resolver import KEEP_SECONDS, SharedResolver
from chatd.push.wakeup import Endpoint, wake_up_request

log = logging.getLogger("chatd.push.sender")

USER_AGENT: Final = "chatd-push"
SENDER_NICE: Final = 10  # added niceness: the relay's live traffic comes first
MAX_LINE: Final = 64 * 1024  # bytes of one link line, at most (a job is < 3 KiB)
READ_SIZE: Final = 65_536  # bytes read from the link at a time
#: Seconds an outcome waits for others to go with it: the daemon then reads
#: outcomes tens at a time under load instead of waking for each one.
OUTCOME_LINGER: Final = 0.01
LITERAL_URLS: Final = 65_536  # URLs whose guard verdict is kept (an IP-literal host), at most


class Result(enum.Enum):
    """The outcome of one wake-up POST."""

    SENT = "sent"  # 2xx
    GONE = "gone"  # 404 or 410: the endpoint is dropped
    RETRY = "retry"  # no connection, timeout, 408, 429, 5xx
    REFUSED = "refused"  # the SSRF guard, a redirect, another 4xx: given up
    SKIPPED = "skipped"  # the endpoint went away, or the device came back


class Setup(msgspec.Struct, forbid_unknown_fields=True, tag="setup"):
    """The first line to the sender: what it needs of the config."""

    timeout_seconds: float
    ttl_seconds: int
    concurrency: int
    allowed_networks: tuple[str, ...]
    log_level: str = "info"
    log_format: str = "logfmt"


class Job(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, tag="job"):
    """One wake-up to send: the endpoint, and an id the outcome names."""

    id: int
    url: str
    p256dh: str | None = None
    auth: str | None = None


class Outcome(msgspec.Struct, forbid_unknown_fields=True, tag="outcome"):
    """What became of job ``id``: a :class:`Result` value."""

    id: int
    result: str


ToSender = Setup | Job
encode = msgspec.json.Encoder().encode


class LinkError(Exception):
    """The other end of the link wrote something that is not a message."""


class LineReader:
    """Splits a byte stream into lines (without the newline), at most MAX_LINE long."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self._buffer = bytearray()
        self._unread: list[bytes] = []

    async def receive_line(self) -> bytes | None:
        """The next line; None at end of file."""
        if not self._unread:
            self._unread = await self.receive_lines()
            if not self._unread:
                return None
        return self._unread.pop(0)

    async def receive_lines(self) -> list[bytes]:
        """The complete lines that have come, at least one; [] at end of file."""
        if self._unread:
            lines, self._unread = self._unread, []
            return lines
        while True:
            end = self._buffer.rfind(b"\n")
            if end >= 0:
                lines = bytes(self._buffer[:end]).split(b"\n")
                del self._buffer[: end + 1]
                return lines
            if len(self._buffer) > MAX_LINE:
                raise LinkError("a line longer than MAX_LINE")
            data = await self.stream.receive_some(READ_SIZE)
            if not data:
                return []
            self._buffer += data


class Outbox:
    """Lines waiting to be written, written together by :meth:`serve`."""

    def __init__(self, linger: float = 0.0) -> None:
        self._lines: list[bytes] = []
        self._ready = trio.Event()
        self._linger = linger  # seconds to wait after the first line, for more

    def put(self, line: bytes) -> None:
        self._lines.append(line)
        self._lines.append(b"\n")
        self._ready.set()

    def clear(self) -> None:
        self._lines.clear()

    async def serve(self, stream: trio.abc.SendStream) -> None:
        """Write what is put, until cancelled or the stream breaks."""
        while True:
            await self._ready.wait()
            if self._linger:
                await trio.sleep(self._linger)
            self._ready = trio.Event()
            data = b"".join(self._lines)
            self._lines.clear()
            await stream.send_all(data)


def result_of(status: int | None) -> Result:
    """What an answer's status (None: no answer came) means for the wake-up."""
    if status is None:
        return Result.RETRY  # no connection, TLS refused, timed out, a broken answer
    if 200 <= status < 300:
        return Result.SENT
    if status in (404, 410):
        return Result.GONE
    if status in (408, 429) or status >= 500:
        return Result.RETRY
    log.warning("push.refused_by_endpoint", extra=fields(status=status))
    return Result.REFUSED  # a redirect (never followed) or another 4xx


class Jobs:
    """The jobs in hand: each one's check by the SSRF guard, its POST (by
    the :class:`~chatd.push.poster.Poster`) and its outcome (into the
    :class:`Outbox`), at most ``setup.concurrency`` at once."""

    def __init__(
        self,
        setup: Setup,
        poster: Poster,
        outbox: Outbox,
        resolve: Resolver,
        dns_keep: float = KEEP_SECONDS,
    ) -> None:
        self.setup = setup
        self.poster = poster
        self.outbox = outbox
        self.dns = SharedResolver(resolve, dns_keep)
        self.allowed = parse_networks(setup.allowed_networks)
        self.slots = trio.Semaphore(setup.concurrency)
        # The guard's verdict on a URL whose host is an IP literal depends on
        # nothing but the URL and the allowlist, fixed for this process: kept,
        # so that a device's next wake-up skips the parse and the checks.
        # (A host name is checked again for every wake-up, against a DNS
        # answer at most dns_keep seconds old.)
        self._literal: dict[str, tuple[Target, str]] = {}
        self._headers: dict[tuple[tuple[str, str], ...], list[str]] = {}

    async def acquire(self) -> None:
        """Wait for a free slot (checkpoints only if there is none)."""
        try:
            self.slots.acquire_nowait()
        except trio.WouldBlock:
            await self.slots.acquire()

    async def start(self, job: Job, nursery: trio.Nursery) -> None:
        """Check and POST ``job`` (its slot taken): at once if its URL's
        host is an IP literal or a name with a kept DNS answer (the check
        then looks nothing up, so this returns without waiting), else in a
        task that first resolves the name, so a slow DNS answer holds up no
        other job."""
        known = self._literal.get(job.url)
        if known is not None:
            self._post(job, *known, self.setup.timeout_seconds)
            return
        try:
            target = parse_target(job.url)
        except PushRefused:
            log.warning("push.target_refused")
            self._finish(job.id, Result.REFUSED)
            return
        try:
            ipaddress.ip_address(target.host)
        except ValueError:
            if self.dns.knows(target.host, target.port):
                await self._resolve_and_post(job, target)  # returns without waiting
            else:
                nursery.start_soon(self._resolve_and_post, job, target)
            return
        try:
            [address] = await checked_addresses(target, self.allowed, self.dns)
        except PushRefused:
            log.warning("push.target_refused")
            self._finish(job.id, Result.REFUSED)
            return
        if len(self._literal) >= LITERAL_URLS:
            self._literal.clear()
        self._literal[job.url] = (target, address)
        self._post(job, target, address, self.setup.timeout_seconds)

    async def _resolve_and_post(self, job: Job, target: Target) -> None:
        timeout = self.setup.timeout_seconds
        deadline = trio.current_time() + timeout
        try:
            with trio.fail_after(timeout):
                addresses = await checked_addresses(target, self.allowed, self.dns)
        except PushRefused:
            log.warning("push.target_refused")
            self._finish(job.id, Result.REFUSED)
            return
        except (OSError, trio.TooSlowError):
            self._finish(job.id, Result.RETRY)  # no DNS answer now
            return
        self._post(job, target, addresses[0], deadline - trio.current_time())

    def _post(self, job: Job, target: Target, address: str, timeout: float) -> None:
        headers, body = wake_up_request(
            Endpoint(job.url, job.p256dh, job.auth), self.setup.ttl_seconds
        )
        key = tuple(headers.items())
        lines = self._headers.get(key)
        if lines is None:  # one list per kind of wake-up: the Poster then sets it once
            lines = self._headers[key] = [*(f"{k}: {v}" for k, v in key), "Accept:"]
        job_id = job.id
        self.poster.post(
            f"{target.scheme}://{target.host_header}{target.target}",
            address,
            target.port,
            target.host,
            lines,
            body,
            timeout,
            lambda status: self._finish(job_id, result_of(status)),
        )

    def _finish(self, job_id: int, result: Result) -> None:
        self.slots.release()
        self.outbox.put(encode(Outcome(job_id, result.value)))


async def serve_sender(
    setup: Setup,
    jobs: LineReader,
    outcomes: trio.abc.SendStream,
    *,
    resolve: Resolver = resolve_host,
    dns_keep: float = KEEP_SECONDS,
    ca_file: str | None = None,
) -> None:
    """Run the jobs read from ``jobs`` and write each one's :class:`Outcome`
    to ``outcomes``, until end of file on ``jobs`` (then the POSTs still in
    flight are abandoned). Raises LinkError for a line that is not a job.

    Owns the :class:`~chatd.push.poster.Poster` (libcurl: keep-alive
    connections, no proxies, no redirects; TLS checked against ``ca_file``,
    certifi's bundle by default), its task, the outbox's task and one task
    per DNS lookup. Each DNS answer is reused for ``dns_keep`` seconds
    (:mod:`chatd.push.resolver`)."""
    decoder = msgspec.json.Decoder(ToSender)
    poster = Poster(user_agent=USER_AGENT, max_connections=setup.concurrency, ca_file=ca_file)
    outbox = Outbox(linger=OUTCOME_LINGER)
    work = Jobs(setup, poster, outbox, resolve, dns_keep)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outbox.serve, outcomes)
            nursery.start_soon(poster.serve)
            while lines := await jobs.receive_lines():
                for line in lines:
                    try:
                        job = decoder.decode(line)
                    except msgspec.DecodeError:
                        raise LinkError("a line that is not a job") from None
                    if not isinstance(job, Job):
                        raise LinkError("a second setup line")
                    await work.acquire()
                    await work.start(job, nursery)
            nursery.cancel_scope.cancel()
    finally:
        poster.close()


def lower_priority() -> None:
    """Give the relay's live traffic the CPU first: SCHED_IDLE (the sender
    runs only on CPU time nothing else at normal priority wants), or, where
    that is refused, nice ``SENDER_NICE``. Both only lower the priority, so
    no privilege is needed; a seccomp filter may still refuse them."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return
    except (OSError, AttributeError):  # AttributeError: no SCHED_IDLE on this OS
        pass
    try:
        os.nice(SENDER_NICE)
    except OSError:
        log.warning("push.sender_nice_refused")


async def _main() -> None:
    jobs = LineReader(trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())))
    outcomes = trio.lowlevel.FdStream(os.dup(sys.stdout.fileno()))
    first = await jobs.receive_line()
    if first is None:
        return  # the parent went away before it set us up
    setup = msgspec.json.decode(first, type=Setup)
    configure(LogSettings(level=setup.log_level, format=setup.log_format))
    lower_priority()
    log.info("push.sender_started", extra=fields(pid=os.getpid()))
    await serve_sender(setup, jobs, outcomes)
    log.info("push.sender_stopped")


def main() -> None:
    """``python -m chatd.push sender``: started by the notifier, never by hand."""
    # The daemon owns this process's lifetime: a SIGTERM or Ctrl-C for the
    # whole process group (systemd's stop, a terminal) is the daemon's to
    # handle; it closes our stdin when it is done with us.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    trio.run(_main)
