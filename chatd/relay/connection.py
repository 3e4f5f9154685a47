"""One client connection: its protocol state, its send queue, and its close.

A :class:`Connection` owns everything that goes out on its socket. Three
kinds of frames wait to be written:

* **answers** to the client's messages, kept in request order by
  :class:`~chatd.protocol.delivery.Replies` (a pipelined ``send`` holds a
  slot until its outcome is known; answers behind it wait);
* **pushes**: news the client did not ask for (``presence``,
  ``typing_notice``, ``key_count``, a Pong);
* **envelopes** handed to its :class:`~chatd.protocol.delivery.Delivery`,
  made into ``deliver`` frames only when they are written, so that however
  many arrive between two writes they go out in as few frames as possible.

A writer task runs only while there is something to write: it takes
everything waiting, writes it with one ``send_all`` under the send timeout
and looks again, and ends when nothing is left. Idle connections have no
writer. A room entry wakes every member device's connections at once; for
those the :class:`Flusher`, one task for all connections, takes what each
has waiting and writes it with one non-blocking ``write`` (no task, cancel
scope or deadline per connection: a third less server CPU per copy in a
200-member room). Only what the socket does not take at once (a slow peer;
TLS, where the flusher writes nothing) gets a writer task. Direct traffic
keeps its writer tasks: pipelined, a writer that stays alive across
several rounds gathers more per write than the flusher does (measured
with bench/relay.py). Answers and
pushes together are bounded by ``relay.send_queue_frames`` (more closes the
connection with 1008 "send queue full"); envelopes are bounded by the
delivery window instead, so deliveries alone never overflow the queue.

Closing: :meth:`Connection.close` records why and wakes the task reading
the connection, which ends it: :meth:`Connection.finish` lets the writer
flush (for at most CLOSE_TIMEOUT) or stops it, then :meth:`Connection.hang_up`
writes the Close frame and waits briefly for the peer's. After a write was
interrupted (a send timeout, or the writer cancelled) a frame may have been
cut off in the middle, so nothing, not even a Close frame, is written after it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

import trio

from chatd.auth.models import SessionGrant
from chatd.log import fields, mask_ip
from chatd.protocol import core
from chatd.protocol import frames as f
from chatd.protocol.catalog import ServerFrame
from chatd.protocol.delivery import Delivery, Replies, deliver_batches
from chatd.relay.ws import WebSocket

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from chatd.relay.registry import DeviceState, RelayStats

log = logging.getLogger("chatd.relay")

MAX_READ_PAUSE: Final = 2.0  # seconds a connection's reading may be paused at once
CLOSE_TIMEOUT: Final = 2.0  # seconds for a closing write to finish and for the peer's Close
REASON_SEND_TIMEOUT: Final = "send timeout"
REASON_DEVICE_CONNECTIONS: Final = "too many connections for this device"
#: Closes after which a write in progress is stopped at once rather than
#: given CLOSE_TIMEOUT: the peer takes no data, or another of the device's
#: connections took its place (what the write holds is freed now).
_STOP_WRITING: Final = frozenset((REASON_SEND_TIMEOUT, REASON_DEVICE_CONNECTIONS))
_NOT_SENT: Final = frozenset((1005, 1006, 1015))  # "no status", "abnormal", "TLS": local only


class Flusher:
    """Writes for every connection that has something waiting, in one task,
    once the task that queued it yields (so a burst goes out in one write)."""

    def __init__(self) -> None:
        self._waiting: dict[Connection, None] = {}  # in the order they woke
        self._wake = trio.Event()

    def add(self, conn: Connection) -> None:
        if not self._waiting:
            self._wake.set()
        self._waiting[conn] = None

    async def flush_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            waiting, self._waiting = self._waiting, {}
            for conn in waiting:
                conn.flush_now()
            await trio.lowlevel.checkpoint()  # let others run between rounds


class Connection:
    """One live client connection (see the module docstring)."""

    __slots__ = (
        "ws",
        "proto",
        "peer",
        "grant",
        "delivery",
        "device",
        "watching",
        "accepted",
        "closing",
        "read_scope",
        "resume_reading_at",
        "_nursery",
        "_flusher",
        "_queue_limit",
        "_send_timeout",
        "_replies",
        "_pushes",
        "_writer",
        "_writer_done",
        "_drained",
        "_out_closed",
        "_peer_gone",
        "_cut_off",
        "_finished",
        "_echo",
        "_stats",
    )

    def __init__(
        self,
        ws: WebSocket,
        proto: core.ServerConnection,
        peer: str,
        *,
        nursery: trio.Nursery,
        flusher: Flusher | None = None,
        send_queue_frames: int,
        send_timeout: float,
        window: int,
        stats: RelayStats | None = None,
    ) -> None:
        self.ws = ws
        self.proto = proto
        self.peer = peer
        self.grant: SessionGrant | None = None  # the session, once authenticated
        self.delivery = Delivery(window)
        self.device: DeviceState | None = None  # its device's shared state, with a session
        self.watching: set[int] | None = None  # users whose presence it is told about
        self.accepted: dict[str, str] = {}  # consent: kind -> version its user accepts
        self.closing: core.Close | None = None  # why it is ending, once it is
        self.read_scope: trio.CancelScope | None = None  # the reader's wait, to wake it
        self.resume_reading_at = 0.0  # trio time a read pause ends (0: no pause)
        self._nursery = nursery
        self._flusher = flusher
        self._queue_limit = send_queue_frames
        self._send_timeout = send_timeout
        self._stats = stats  # counts the envelopes it delivers
        self._replies: Replies | None = None  # made on the first answer
        self._pushes: list[bytes] = []
        self._writer: trio.CancelScope | None = None  # the writer task's scope while it runs
        self._writer_done: trio.Event | None = None
        self._drained: trio.Event | None = None  # set when no answer slot waits
        self._out_closed = False  # finishing: nothing new is queued
        self._peer_gone = False  # the peer hung up: nothing can be written
        self._cut_off = False  # a write was interrupted: the stream may end mid-frame
        self._finished = False  # finish() is done: only hang_up() writes from now on
        self._echo = core.CLOSE_NORMAL  # the code our Close answers a peer's Close with

    def pause_reading(self, seconds: float) -> None:
        """Read nothing more of this connection for ``seconds`` (at most
        MAX_READ_PAUSE) once the message being handled is done: the task
        reading it waits (see :meth:`chatd.relay.server.Relay._serve`)."""
        until = trio.current_time() + min(seconds, MAX_READ_PAUSE)
        self.resume_reading_at = max(self.resume_reading_at, until)

    # -- queuing -----------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Frames waiting in the send queue (answers and pushes)."""
        return len(self._pushes) + (len(self._replies) if self._replies is not None else 0)

    def _room(self) -> bool:
        if self._out_closed or self.closing is not None:
            return False
        if self.queued >= self._queue_limit:
            self.close(core.Close(core.CLOSE_POLICY, core.REASON_SEND_QUEUE_FULL))
            return False
        return True

    def answer(self, frames: list[bytes]) -> None:
        """Answer the client's latest message (after every earlier answer)."""
        if frames and self._room():
            if self._replies is None:
                self._replies = Replies()
            self._replies.answer(frames)
            self.wake()

    def reserve(self, *, silent: bool = False) -> int | None:
        """Keep the next place in the answers for an outcome to come; None if
        the connection is closing. Fill it with :meth:`fill`. A silent place
        (filled with no frame) takes no room in the send queue."""
        if silent:
            if self._out_closed or self.closing is not None:
                return None
        elif not self._room():
            return None
        if self._replies is None:
            self._replies = Replies()
        return self._replies.reserve(silent=silent)

    def fill(self, handle: int, frames: list[bytes]) -> None:
        """The answer for a place kept by :meth:`reserve`."""
        replies = self._replies
        if replies is None:
            return
        replies.fill(handle, frames)
        if not replies.waiting and self._drained is not None:
            self._drained.set()
            self._drained = None
        self.wake()

    @property
    def waiting_answers(self) -> int:
        """Answers whose outcome is not known yet (pipelined requests in flight)."""
        return self._replies.waiting if self._replies is not None else 0

    async def wait_answers(self, below: int = 1, *, closing_too: bool = False) -> None:
        """Wait until fewer than ``below`` answers are still waiting (or the
        connection is closing, unless ``closing_too``)."""
        while self.waiting_answers >= below and (closing_too or self.closing is None):
            if self._drained is None:
                self._drained = trio.Event()
            await self._drained.wait()

    def push(self, frame: bytes) -> None:
        """Queue news for the client (an encoded frame, not an answer)."""
        if self._peer_gone or not self._room():
            return
        self._pushes.append(self.ws.frame(frame.decode()))
        self.wake()

    def push_frame(self, frame: ServerFrame) -> None:
        self.push(core.encode(frame))

    def control(self, data: bytes) -> None:
        """Queue a control frame made by the WebSocket layer (a Pong)."""
        if not self._peer_gone and not self._out_closed:
            self._pushes.append(data)
            self.wake()

    # -- writing -------------------------------------------------------------------

    def wake(self, *, fan_out: bool = False) -> None:
        """Something may be waiting to be written: make sure a writer will
        write it. ``fan_out``: one event woke many connections (a room entry),
        so the flusher writes it; otherwise a writer task of its own."""
        if self._writer is None and not self._peer_gone and not self._finished:
            if fan_out and self._flusher is not None and not self._out_closed:
                self._flusher.add(self)
            else:
                self._start_writer(b"")

    def _start_writer(self, rest: bytes, *, cut: bool = False) -> None:
        """A writer task, to write ``rest`` (what a write left; ``cut``: of a
        frame it began) and everything that waits after it."""
        if cut:
            self._cut_off = True  # until the rest of that frame is out
        self._writer = trio.CancelScope()
        self._nursery.start_soon(self._write, self._writer, rest)

    def flush_now(self) -> None:
        """Write what waits, as far as the socket takes it at once (the
        flusher calls this); a writer task writes the rest."""
        if self._writer is not None or self._peer_gone or self._finished or self._out_closed:
            return  # a writer runs, or finish() has taken over
        try:
            data = self._gather()
            if not data:
                return
            written = self.ws.try_send(data)
        except trio.BrokenResourceError:
            self._peer_gone = True
            return
        except Exception:
            log.exception("relay.connection_failed", extra=fields(peer=mask_ip(self.peer)))
            self.close(core.Close(core.CLOSE_INTERNAL_ERROR, core.REASON_INTERNAL))
            return
        if written < len(data):
            self._start_writer(data[written:], cut=written > 0)

    def _gather(self) -> bytes:
        """Everything that may be written now, as the bytes of its frames."""
        texts: list[bytes] = []
        if self._replies is not None:
            texts += self._replies.take()
        frame = self.ws.frame
        out = [frame(t.decode()) for t in texts]
        if self._pushes:
            out += self._pushes
            self._pushes = []
        if self.delivery.ready and self.device is not None:
            envelopes = self.delivery.take_ready(self.device.ledger.outstanding)
            if self._stats is not None:
                self._stats.delivered += len(envelopes)
            for batch in deliver_batches(envelopes):
                out.append(frame(core.encode(f.Deliver(envelopes=batch)).decode()))
        return b"".join(out)

    async def _write(self, scope: trio.CancelScope, rest: bytes) -> None:
        """The writer task (see the module docstring)."""
        try:
            with scope:
                while not self._peer_gone:
                    data = rest + self._gather() if rest else self._gather()
                    rest = b""
                    if not data:
                        return
                    with trio.move_on_after(self._send_timeout) as stuck:
                        try:
                            await self.ws.send_all(data)
                        except trio.Cancelled:
                            self._cut_off = True  # maybe in the middle of a frame
                            raise
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            self._peer_gone = True
                            return
                    if stuck.cancelled_caught:
                        self._cut_off = True  # maybe in the middle of a frame
                        self.close(core.Close(core.CLOSE_POLICY, REASON_SEND_TIMEOUT))
                        return
                    self._cut_off = False  # every frame begun is out
        except Exception:
            # A bug: the connection ends with 1011, as a failing handler would.
            log.exception("relay.connection_failed", extra=fields(peer=mask_ip(self.peer)))
            self.close(core.Close(core.CLOSE_INTERNAL_ERROR, core.REASON_INTERNAL))
        finally:
            self._writer = None
            if self._writer_done is not None:
                self._writer_done.set()

    # -- closing -------------------------------------------------------------------

    def peer_closed(self, code: int) -> None:
        """The peer sent its Close with ``code``: ours will echo it (RFC 6455
        5.5.1), but for the codes that never go on the wire."""
        if code not in _NOT_SENT:
            self._echo = code

    def close(self, close: core.Close) -> None:
        """End the connection with ``close`` (the first reason given wins); the
        task reading it is woken and finishes it."""
        if self.closing is None:
            self.closing = close
        if self.read_scope is not None:
            self.read_scope.cancel()

    async def finish(self, *, flush: bool) -> None:
        """Stop queuing and settle the writer. With ``flush``, answers still
        owed are awaited and what is queued is written, for at most
        CLOSE_TIMEOUT in all; without, what is queued is dropped, but a write
        in progress may finish in that time (so a Close frame can follow it).
        After a send timeout, or when another connection of the device took
        this one's place, the writer is stopped at once. Once this returns,
        nothing but :meth:`hang_up` writes to the connection."""
        deadline = trio.current_time() + CLOSE_TIMEOUT
        if flush and self.waiting_answers and not self._out_closed:
            with trio.move_on_at(deadline):
                await self.wait_answers(closing_too=True)
        self._out_closed = True
        if flush:
            self.wake()
        else:
            self._pushes.clear()
            self._replies = None
            self.delivery.ready.clear()
        writer = self._writer
        if writer is not None:
            close = self.closing
            if close is not None and close.reason in _STOP_WRITING:
                writer.cancel()
            else:
                writer.deadline = min(writer.deadline, deadline)
            self._writer_done = trio.Event()
            await self._writer_done.wait()
        self._finished = True

    async def hang_up(self) -> None:
        """Write our Close frame, if one is due. The WebSocket server then
        closes the stream, lingering for the peer's Close (see ws.linger_close)."""
        close = self.closing
        if self._cut_off or self._peer_gone:
            if close is not None and self._cut_off:
                log.info("relay.close", extra=fields(peer=mask_ip(self.peer), reason=close.reason))
            return
        if close is None:
            close = core.Close(self._echo, "")
        elif close.code != core.CLOSE_GOING_AWAY:
            log.info(
                "relay.close",
                extra=fields(peer=mask_ip(self.peer), code=close.code, reason=close.reason),
            )
        frame = self.ws.close_frame(close.code, close.reason)
        if frame:
            with trio.move_on_after(CLOSE_TIMEOUT):
                try:
                    await self.ws.send_all(frame)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the peer is gone
