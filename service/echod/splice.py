"""Zero-copy echo (`io_mode = "splice"` and `"auto"`): socket -> pipe -> socket with splice(2).

The bytes never enter Python: no bytes object per read, no copy into user space and back. The worker
keeps one empty "scratch" pipe; a ready connection is spliced into it and straight out again. When the
kernel takes only part of the output, whatever is left is already in the scratch pipe, so that pipe
becomes the connection's output buffer (a `Piped`) and the worker takes a fresh scratch pipe from a
small pool. Connections hold a pipe (two descriptors) only while output is pending; the pipe's size is
the write_buffer_high watermark.

A pipe counts its capacity in pages, not bytes: a pipe of 64 pages holds 64 small segments at most. So
besides the byte watermarks, a connection whose pipe is full (splice into it would block) stops reading
until the pipe drains, like one at write_buffer_high.

When no pipe of the right size can be had (out of descriptors, fs.pipe-user-pages-soft), the pending
bytes are read out of the pipe into a plain Connection buffer: the connection goes on, nothing is lost.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import stats
from .connection import Connection
from .worker import EPOLLIN, EPOLLOUT, READING, Worker

log = logging.getLogger("echod.worker")

NONBLOCK = os.SPLICE_F_NONBLOCK | os.SPLICE_F_MOVE
# Empty pipes kept for reuse. Few: an idle pipe still counts its capacity against the user's
# fs.pipe-user-pages-soft (16384 pages), beyond which new pipes get 2 pages only.
IDLE_PIPES = 8
BULK = 16384  # auto mode: a read at least this large moves the connection to splice ...
SMALL = 4096  # ... and a splice smaller than this moves it back to copy


class Piped(Connection):
    """A connection whose pending output sits in a pipe.

    It has no `buf`: every Connection method that touches one is replaced here, and only SpliceWorker,
    which reads into it with `fill` instead of `append`, ever holds one.
    """

    __slots__ = ("pending", "r", "w")

    def __init__(self, r: int, w: int, pending: int) -> None:
        self.r, self.w, self.pending = r, w, pending
        self.paused = False
        self.eof = False

    def __len__(self) -> int:
        return self.pending

    def fill(self, fd: int, size: int) -> int:
        """Splice what the client sent into the pipe; 0 at EOF; BlockingIOError when nothing moved."""
        moved = os.splice(fd, self.w, size, None, None, NONBLOCK)
        self.pending += moved
        return moved

    def flush(self, fd: int) -> int:
        try:
            sent = os.splice(self.r, fd, self.pending, None, None, NONBLOCK)
        except BlockingIOError:
            return 0
        self.pending -= sent
        return sent

    def take(self) -> bytes:
        """Read the pending output out of the pipe (stop or fallback: rare, so a copy is fine)."""
        chunks = []
        while self.pending:
            chunk = os.read(self.r, self.pending)
            chunks.append(chunk)
            self.pending -= len(chunk)
        return b"".join(chunks)

    def append(self, data: bytes) -> None:
        raise TypeError("a Piped connection is filled with fill(), not append()")


class PipePool:
    """Empty pipes of one size, so that a partial write costs no pipe2() in the steady state."""

    def __init__(self, size: int) -> None:
        self.size = _pipe_size(size)
        self.idle: list[tuple[int, int]] = []
        self.warned = False

    def get(self, sized: bool = True) -> tuple[int, int]:
        """An empty pipe (read end, write end); OSError (EMFILE...) when none can be made.

        Past fs.pipe-user-pages-soft the kernel hands out 2-page pipes only; with `sized` that is an
        error too (a connection is better off with a memory buffer than with an 8 KiB pipe).
        """
        if self.idle:
            return self.idle.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, self.size)
        except OSError as exc:
            if not self.warned:
                self.warned = True
                log.warning(
                    "pipes cannot be sized to %d bytes (%s; fs.pipe-user-pages-soft reached?): pending"
                    " output is buffered in memory instead",
                    self.size,
                    exc.strerror,
                )
            if sized:
                os.close(r)
                os.close(w)
                raise
        return r, w

    def put(self, r: int, w: int) -> None:
        if len(self.idle) < IDLE_PIPES:
            self.idle.append((r, w))
        else:
            os.close(r)
            os.close(w)


def _pipe_size(wanted: int) -> int:
    """The pipe size for a watermark: at least a page, at most what an unprivileged user may set."""
    try:
        limit = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    except (OSError, ValueError):
        limit = 1 << 20
    return max(os.sysconf("SC_PAGE_SIZE"), min(wanted, limit))


class SpliceWorker(Worker):
    """A Worker whose plain connections echo through splice(2) instead of os.read/os.write.

    io_mode = "auto" runs this worker too: each connection starts in copy mode, moves to splice once a
    read brings BULK bytes or more, and back once a splice brings less than SMALL (bench/README.md:
    splice costs less per byte for large messages, a little more per message for small ones).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        auto = self.settings.io_mode == "auto"
        self.bulk = BULK if auto else 0
        self.small = SMALL if auto else 0
        self.splice_first = not auto
        self.spliced[:] = [self.splice_first] * len(self.table)

    def run(self) -> int:
        self.pipes = PipePool(self.settings.write_buffer_high)
        self.scratch_r, self.scratch_w = self.pipes.get(sized=False)  # a small one still works
        return super().run()

    def _splicer(self) -> Callable[[int, int], None]:
        """Build `splice(fd, tick)`: socket -> scratch pipe -> socket, for one ready connection.

        A closure for the same reason as Worker._server: it runs once per spliced read.
        """
        move, last, spliced, size, counts = os.splice, self.last, self.spliced, self.read_size, self.counts
        close, eof, keep, discard, step_over = (
            self._close,
            self._eof,
            self._keep,
            self._discard_scratch,
            self._step_over,
        )
        small, RECEIVED, SENT = self.small, stats.RECEIVED_BYTES, stats.SENT_BYTES

        def splice(fd: int, tick: int) -> None:
            scratch_r, scratch_w = self.scratch_r, self.scratch_w  # replaced whenever a connection keeps one
            try:
                k = move(fd, scratch_w, size, None, None, NONBLOCK)
            except BlockingIOError:
                step_over(fd)
                return
            except OSError as exc:
                close(fd, "error", exc)
                return
            if not k:
                eof(fd, None)
                return
            last[fd] = tick
            counts[RECEIVED] += k
            if k < small:
                spliced[fd] = False
            try:
                n = move(scratch_r, fd, k, None, None, NONBLOCK)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                discard(k)
                close(fd, "error", exc)
                return
            counts[SENT] += n
            if n != k:
                keep(fd, k - n)

        return splice

    def _step_over(self, fd: int) -> None:
        """Reported readable, yet splice moved nothing: splice stops at TCP's urgent mark (MSG_OOB) for
        good, and only a read steps over it, so read once the copy way (or level-triggered epoll would
        report this socket, and splice refuse it, on every turn: a worker spinning on one byte)."""
        Worker._read(self, fd, None)

    def _discard_scratch(self, pending: int) -> None:
        Piped(self.scratch_r, self.scratch_w, pending).take()
        self.counts[stats.DROPPED_BYTES] += pending

    def _keep(self, fd: int, pending: int) -> None:
        """The scratch pipe holds `pending` bytes for `fd`: it becomes fd's buffer."""
        conn: Connection = Piped(self.scratch_r, self.scratch_w, pending)
        try:
            self.scratch_r, self.scratch_w = self.pipes.get()
        except OSError as exc:
            log.debug("no pipe for pending output (%s): buffering in memory", exc.strerror)
            conn = Connection(conn.take())
        self.table[fd] = conn
        self.buffered += pending
        self.counts[stats.PARTIAL_WRITES] += 1
        if not self._maybe_pause(fd, conn):
            self.ep.modify(fd, READING | EPOLLOUT)

    def _read(self, fd: int, conn: Connection | None) -> None:
        if conn is None:
            self.serve([(fd, EPOLLIN)], self.tick)  # readable with RDHUP/HUP: the plain path sees the EOF
        elif conn.__class__ is not Piped:
            super()._read(fd, conn)  # a byte buffer (after a PROXY header, or no pipe to be had)
        elif not (conn.paused or conn.eof):
            self._fill(fd, conn)  # type: ignore[arg-type]

    def _fill(self, fd: int, conn: Piped) -> None:
        try:
            moved = conn.fill(fd, self.read_size)
        except BlockingIOError:  # the pipe is full (in pages if not in bytes): wait until it drains
            conn.paused = True
            self.counts[stats.BACKPRESSURE_PAUSES] += 1
            self.ep.modify(fd, EPOLLOUT)
            return
        except OSError as exc:
            self._close(fd, "error", exc)
            return
        if not moved:
            self._eof(fd, conn)
            return
        self.last[fd] = self.tick
        self.counts[stats.RECEIVED_BYTES] += moved
        self.buffered += moved
        self._maybe_pause(fd, conn)

    def _flush(self, fd: int, conn: Connection) -> None:
        super()._flush(fd, conn)
        if conn.__class__ is Piped and not len(conn) and self.table[fd] is not conn:
            self._release(conn)  # type: ignore[arg-type]

    def _close(self, fd: int, reason: str, error: OSError | None = None) -> None:
        conn = self.table[fd]
        super()._close(fd, reason, error)
        if conn.__class__ is Piped:
            self._release(conn)

    def _release(self, conn: Piped) -> None:
        if conn.r < 0:
            return
        if conn.pending:  # closed with output pending: that pipe is not empty, do not reuse it
            os.close(conn.r)
            os.close(conn.w)
        else:
            self.pipes.put(conn.r, conn.w)
        conn.r = conn.w = -1

    def _begin_close(self, now: float) -> None:
        # Closing keeps its output in memory: pipes are read out once, at stop.
        if self.close_deadline is None:
            for fd, state in enumerate(self.table):
                if state.__class__ is Piped:
                    self.table[fd] = Connection(state.take())
                    self._release(state)
        super()._begin_close(now)
