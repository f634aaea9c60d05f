"""Per-connection state for the connections that need any.

A connection whose echo went out whole has no object at all: the worker keeps plain connections as
bare file descriptors (see worker.py). A `Connection` exists only while output is pending, reading is
paused, or the client has half-closed, and is dropped again once the buffer drains.

Pending output is one bytearray: appending copies each chunk once, and `del buf[:n]` after a partial
send is O(1) amortised in CPython (bytearray keeps a start offset), so draining a large buffer in small
sends is linear, not quadratic. A bytearray also keeps tiny chunks from costing an object each.
"""

from __future__ import annotations

import os


class Connection:
    __slots__ = ("buf", "eof", "paused")

    def __init__(self, data: bytes | memoryview = b"") -> None:
        self.buf = bytearray(data)
        self.paused = False  # reading stopped: pending output reached the high watermark
        self.eof = False  # the client half-closed: flush, then close

    def __len__(self) -> int:
        """Pending output in bytes."""
        return len(self.buf)

    def take(self) -> bytes | bytearray:
        """The pending output, handed to whoever sends it instead (see worker.Closing)."""
        return self.buf

    def append(self, data: bytes) -> None:
        self.buf += data

    def flush(self, fd: int) -> int:
        """Send as much as the kernel takes; returns the bytes sent (0 when it would block).

        Raises OSError (other than EAGAIN) when the connection is broken.
        """
        try:
            sent = os.write(fd, self.buf)
        except BlockingIOError:
            return 0
        del self.buf[:sent]
        return sent


class Watermarks:
    """When to stop reading from a connection and when to start again."""

    __slots__ = ("high", "low")

    def __init__(self, high: int, low: int) -> None:
        if not 0 <= low < high:
            raise ValueError(f"need 0 <= low ({low}) < high ({high})")
        self.high = high
        self.low = low

    def should_pause(self, conn: Connection) -> bool:
        return not conn.paused and len(conn) >= self.high

    def should_resume(self, conn: Connection) -> bool:
        return conn.paused and len(conn) <= self.low
