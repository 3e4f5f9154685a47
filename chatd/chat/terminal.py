"""Typed lines from the terminal, read inside Trio.

The terminal stays in its ordinary line mode (the kernel does the editing:
backspace, Ctrl-U, Ctrl-W, and Ctrl-R to redraw the line after incoming
messages were printed over it). We read the finished lines from a *second*
open file description of the same terminal (its ``/dev/pts/N`` path opened
again), wrapped in :class:`trio.lowlevel.FdStream`. FdStream puts its file
description in non-blocking mode; had we used ``dup(0)``, that would have
switched stdout to non-blocking too (stdin and stdout usually share one
description), and prints could fail with EAGAIN. Reading is an ordinary
Trio checkpoint, so cancelling it is clean.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import termios
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Final

import trio

READ_BYTES: Final = 4096  # bytes per read
MAX_LINE_BYTES: Final = 65_536  # a longer "line" is handed over in pieces


class LineReader:
    """Lines from a byte stream, decoded as UTF-8 (bad bytes become U+FFFD)."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._buffer = ""
        self._eof = False

    async def readline(self) -> str | None:
        """The next line without its line ending; None at end of input
        (Ctrl-D on an empty line). Text typed before a final Ctrl-D counts
        as a line."""
        while True:
            newline = self._buffer.find("\n")
            if newline >= 0:
                line, self._buffer = self._buffer[:newline], self._buffer[newline + 1 :]
                return line.rstrip("\r")
            if len(self._buffer) >= MAX_LINE_BYTES:
                line, self._buffer = self._buffer, ""
                return line
            if self._eof:
                line, self._buffer = self._buffer, ""
                return line or None
            try:
                data = await self._stream.receive_some(READ_BYTES)
            except trio.BrokenResourceError:  # EIO: the terminal went away
                data = b""
            if not data:
                self._eof = True
                self._buffer += self._decoder.decode(b"", final=True)
            else:
                self._buffer += self._decoder.decode(data)


@asynccontextmanager
async def open_terminal_lines(fd: int = 0) -> AsyncIterator[LineReader]:
    """Lines typed at the terminal on ``fd`` (which must be a terminal)."""
    tty = os.open(os.ttyname(fd), os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
    stream = trio.lowlevel.FdStream(tty)  # owns tty from here on
    try:
        yield LineReader(stream)
    finally:
        await stream.aclose()


@contextlib.contextmanager
def echo_off(fd: int = 0) -> Iterator[None]:
    """Typed characters are not shown (for a password) until the block ends.
    Does nothing if ``fd`` is not a terminal."""
    try:
        before = termios.tcgetattr(fd)
    except termios.error:
        yield
        return
    quiet = list(before)
    quiet[3] &= ~termios.ECHO  # lflag
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, before)
