"""The echo of one connection once it has state: pending output, backpressure, half-close, a stop.

The common case never comes here: a plain connection whose echo goes out whole is served by the loop's
fast path (worker/loop.py). This is the slow path, for events on a `Conn` (worker/output.py) and for a
plain connection's rarer events (EPOLLERR, EPOLLHUP, EPOLLRDHUP).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from .. import stats
from .core import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP, READING, Core
from .handoff import Handoff
from .output import FULL, Conn, MemoryOutput, Output, Watermarks
from .splice import Splicer

Splice = Callable[[int, int], None]


class Echo:
    def __init__(
        self, core: Core, marks: Watermarks, handoff: Handoff, io_mode: str, write_buffer_high: int
    ) -> None:
        self.core = core
        self.marks = marks
        self.handoff = handoff  # while retiring with a successor, drained connections move on
        # `splice(fd, tick)` echoes a plain connection whose spliced[fd] is set (never in copy mode).
        self.splice: Splice = _no_splice
        if io_mode != "copy":
            self.splice = Splicer(core, self, write_buffer_high, auto=io_mode == "auto").build()

    def on_conn(self, fd: int, ev: int, conn: Conn) -> None:
        if ev & EPOLLERR:
            self.core.fail(fd)
            return
        if ev & (EPOLLOUT | EPOLLHUP):
            self.flush(fd, conn)
            state = self.core.table[fd]
            if state is None:  # drained: it is a plain connection again, spliced or copied
                if ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP):
                    if self.core.spliced[fd]:
                        self.splice(fd, self.core.tick)
                    else:
                        self.read_plain(fd)
                return
            if state is not conn:  # closed or handed over
                return
        if ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP):
            self.read(fd, conn)

    # -- reading --------------------------------------------------------------------------------
    def read(self, fd: int, conn: Conn) -> None:
        if conn.paused or conn.eof:
            return
        if conn.closing:
            self._discard(fd, conn)
            return
        core = self.core
        try:
            moved = conn.out.fill(fd, core.read_size)
        except OSError as exc:
            core.close(fd, "error", exc)
            return
        if moved > 0:
            core.last[fd] = core.tick
            core.counts[stats.RECEIVED_BYTES] += moved
            core.buffered += moved
            self.maybe_pause(fd, conn)
        elif moved == 0:
            self.eof(fd, conn)
        elif moved == FULL:  # a pipe full in pages if not in bytes: wait until it drains
            conn.paused = True
            core.counts[stats.BACKPRESSURE_PAUSES] += 1
            core.ep.modify(fd, EPOLLOUT)

    def _recv(self, fd: int) -> bytes | None:
        """One read; None if nothing came (would block) or the connection failed and is closed."""
        try:
            return os.read(fd, self.core.read_size)
        except BlockingIOError:
            return None
        except OSError as exc:
            self.core.close(fd, "error", exc)
            return None

    def _discard(self, fd: int, conn: Conn) -> None:
        """A stop is closing it: what the client still sends is read and dropped until its FIN."""
        data = self._recv(fd)
        if data is None:
            return
        if not data:
            self.eof(fd, conn)
        else:
            self.core.counts[stats.DROPPED_BYTES] += len(data)

    def read_plain(self, fd: int) -> None:
        """One read of a plain connection outside the fast path, the copy way whatever its mode: a
        connection just drained, or one that splice cannot read (worker/splice.py)."""
        data = self._recv(fd)
        if data is None:
            return
        if not data:
            self.eof(fd, None)
            return
        self.core.last[fd] = self.core.tick
        self.core.counts[stats.RECEIVED_BYTES] += len(data)
        self.echo(fd, data)

    def eof(self, fd: int, conn: Conn | None) -> None:
        """The client half-closed: send back everything read, then close our side."""
        if conn is None or not len(conn):
            self.core.close(fd, "shutdown" if conn is not None and conn.closing else "client")
            return
        conn.eof = True
        self.core.ep.modify(fd, EPOLLOUT)

    # -- writing --------------------------------------------------------------------------------
    def echo(self, fd: int, data: bytes) -> None:
        """Send `data` back to a plain connection; keep what the kernel does not take."""
        core = self.core
        try:
            n = os.write(fd, data)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            core.counts[stats.DROPPED_BYTES] += len(data)
            core.close(fd, "error", exc)
            return
        core.counts[stats.SENT_BYTES] += n
        if n != len(data):
            self.buffer(fd, data, n)

    def buffer(self, fd: int, data: bytes, sent: int) -> None:
        """The kernel took only `sent` bytes of `data`: keep the rest and wait for EPOLLOUT."""
        self.keep(fd, MemoryOutput(memoryview(data)[sent:]))

    def keep(self, fd: int, out: Output) -> None:
        """A plain connection now has pending output in `out`."""
        core = self.core
        conn = Conn(out, self)
        core.table[fd] = conn
        core.buffered += len(out)
        core.counts[stats.PARTIAL_WRITES] += 1
        if not self.maybe_pause(fd, conn):
            core.ep.modify(fd, READING | EPOLLOUT)

    def maybe_pause(self, fd: int, conn: Conn) -> bool:
        # Its own high watermark, or the worker's budget for all pending output (max_buffered_bytes):
        # then every connection that adds pending output stops reading until the total drains.
        if not self.marks.should_pause(conn) and (conn.paused or not self.core.over_budget()):
            return False
        conn.paused = True
        self.core.counts[stats.BACKPRESSURE_PAUSES] += 1
        self.core.ep.modify(fd, EPOLLOUT)
        return True

    def flush(self, fd: int, conn: Conn) -> None:
        core = self.core
        try:
            n = conn.out.flush(fd)
        except OSError as exc:
            core.close(fd, "error", exc)
            return
        core.counts[stats.SENT_BYTES] += n
        core.buffered -= n
        if n:
            core.last[fd] = core.tick
        if len(conn):
            handing_over = self.handoff.active
            if self.marks.should_resume(conn) and not (conn.eof or handing_over or core.over_budget()):
                conn.paused = False
                core.ep.modify(fd, READING | EPOLLOUT)
        elif conn.closing:
            self.shut(fd, conn)
        elif conn.eof:
            core.close(fd, "client")
        else:
            conn.release()
            core.table[fd] = None
            if self.handoff.active:  # everything it read went out: now it can move
                self.handoff.send_over([fd])
            else:
                core.ep.modify(fd, READING)

    # -- a stop ---------------------------------------------------------------------------------
    def begin_close(self) -> None:
        """Stop echoing: flush what was read, shut our side, discard the rest until the client's FIN.
        Pending output moves to memory (a pipe is read out once, here)."""
        core = self.core
        for fd, state in enumerate(core.table):
            if state is None or isinstance(state, Conn):
                data = b"" if state is None else state.out.take()
                if state is not None:
                    state.release()
                closing = Conn(MemoryOutput(data), self, closing=True)
                core.table[fd] = closing
                if data:
                    core.ep.modify(fd, EPOLLOUT | EPOLLIN | EPOLLRDHUP)
                else:
                    self.shut(fd, closing)

    def shut(self, fd: int, conn: Conn) -> None:
        if conn.shut:
            return
        conn.shut = True
        sock = socket.socket(fileno=fd)  # borrowed for shutdown(), which os lacks; detached below
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            sock.detach()
            self.core.close(fd, "error", exc)
            return
        sock.detach()
        if conn.eof:  # the client's FIN is already in: nothing left to wait for
            self.core.close(fd, "shutdown")
        else:
            self.core.ep.modify(fd, EPOLLIN | EPOLLRDHUP)

    def close_all(self) -> None:
        core = self.core
        for fd, state in enumerate(core.table):
            if state is None or isinstance(state, Conn):
                core.close(fd, "shutdown")


def _no_splice(fd: int, tick: int) -> None:
    raise AssertionError("copy mode never splices")  # spliced[fd] is never set in copy mode
