"""A connection's pending output: one interface, two implementations, chosen per connection.

A connection whose echo went out whole has no object at all (worker/core.py). A `Conn` exists only
while output is pending, reading is paused, the client has half-closed, or a stop is flushing it; it
carries its `Output`, the way nginx's connection carries its own recv/send handlers:

- `MemoryOutput`: a bytearray. Appending copies each chunk once, and `del buf[:n]` after a partial
  send is O(1) amortised in CPython (bytearray keeps a start offset), so draining a large buffer in
  small sends is linear, not quadratic; tiny chunks do not cost an object each.
- `PipeOutput` (worker/splice.py): the bytes sit in a pipe and never enter Python.

`io_mode = "auto"` moves a connection between the two per connection, so the choice is an object the
connection holds, not a kind of worker.
"""

from __future__ import annotations

import os
from typing import Final, Protocol

WOULD_BLOCK: Final = -1  # fill(): nothing to read now
# fill(): the output cannot take more now (a pipe full in pages): stop reading until it drains
FULL: Final = -2


class Output(Protocol):
    def __len__(self) -> int:
        """Pending output in bytes."""
        ...

    def fill(self, fd: int, size: int) -> int:
        """Read up to `size` bytes from `fd` into the output: bytes moved, 0 at EOF, or WOULD_BLOCK /
        FULL. Raises OSError when the connection is broken."""
        ...

    def flush(self, fd: int) -> int:
        """Send as much as the kernel takes; returns the bytes sent (0 when it would block). Raises
        OSError (other than EAGAIN) when the connection is broken."""
        ...

    def take(self) -> bytes | bytearray:
        """Empty the output into bytes (a stop, or no pipe to be had: rare, so a copy is fine)."""
        ...

    def release(self) -> None:
        """The connection is done with this output (closed, or drained and dropped)."""
        ...


class MemoryOutput:
    __slots__ = ("buf",)

    def __init__(self, data: bytes | bytearray | memoryview = b"") -> None:
        self.buf = bytearray(data)

    def __len__(self) -> int:
        return len(self.buf)

    def append(self, data: bytes | bytearray) -> None:
        self.buf += data

    def fill(self, fd: int, size: int) -> int:
        try:
            data = os.read(fd, size)
        except BlockingIOError:
            return WOULD_BLOCK
        self.buf += data
        return len(data)

    def flush(self, fd: int) -> int:
        try:
            sent = os.write(fd, self.buf)
        except BlockingIOError:
            return 0
        del self.buf[:sent]
        return sent

    def take(self) -> bytearray:
        buf, self.buf = self.buf, bytearray()
        return buf

    def release(self) -> None:
        pass


class Events(Protocol):
    """Who handles a `Conn`'s events: worker/echo.py's `Echo`."""

    def on_conn(self, fd: int, ev: int, conn: Conn) -> None: ...


class Conn:
    """A client connection that has state: its output, and whether it reads, has half-closed, or is
    being closed by a stop (flush, shut our side, then discard until the client's FIN)."""

    __slots__ = ("closing", "eof", "events", "out", "paused", "shut")

    def __init__(self, out: Output, events: Events, closing: bool = False) -> None:
        self.out = out
        self.events = events
        self.paused = False  # reading stopped: pending output reached the high watermark
        self.eof = False  # the client half-closed: flush, then close
        self.closing = closing  # a stop is closing it
        self.shut = False  # closing, and our side is shut down

    def __len__(self) -> int:
        return len(self.out)

    def on_event(self, fd: int, ev: int) -> None:
        self.events.on_conn(fd, ev, self)

    def release(self) -> None:
        self.out.release()


class Watermarks:
    """When to stop reading from a connection and when to start again."""

    __slots__ = ("high", "low")

    def __init__(self, high: int, low: int) -> None:
        if not 0 <= low < high:
            raise ValueError(f"need 0 <= low ({low}) < high ({high})")
        self.high = high
        self.low = low

    def should_pause(self, conn: Conn) -> bool:
        return not conn.paused and len(conn) >= self.high

    def should_resume(self, conn: Conn) -> bool:
        return conn.paused and len(conn) <= self.low
