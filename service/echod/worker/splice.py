"""Zero-copy echo (`io_mode = "splice"` and `"auto"`): socket -> pipe -> socket with splice(2).

The bytes never enter Python: no bytes object per read, no copy into user space and back. The worker
keeps one empty "scratch" pipe; a ready connection is spliced into it and straight out again. When the
kernel takes only part of the output, whatever is left is already in the scratch pipe, so that pipe
becomes the connection's output (a `PipeOutput`) and the worker takes a fresh scratch pipe from a
small pool. Connections hold a pipe (two descriptors) only while output is pending; the pipe's size is
the write_buffer_high watermark.

A pipe counts its capacity in pages, not bytes: a pipe of 64 pages holds 64 small segments at most. So
besides the byte watermarks, a connection whose pipe is full (splice into it would block) stops reading
until the pipe drains, like one at write_buffer_high.

When no pipe of the right size can be had (out of descriptors, fs.pipe-user-pages-soft), the pending
bytes are read out of the pipe into a `MemoryOutput`: the connection goes on, nothing is lost.

io_mode = "auto" starts each connection in copy mode, moves it to splice once a read brings BULK bytes
or more, and back once a splice brings less than SMALL (bench/README.md: splice costs less per byte for
large messages, a little more per message for small ones).
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Final, Protocol

from .. import stats
from .core import Core
from .output import FULL, Conn, MemoryOutput, Output

log = logging.getLogger("echod.worker")

NONBLOCK: Final = os.SPLICE_F_NONBLOCK | os.SPLICE_F_MOVE
# Empty pipes kept for reuse. Few: an idle pipe still counts its capacity against the user's
# fs.pipe-user-pages-soft (16384 pages), beyond which new pipes get 2 pages only.
IDLE_PIPES: Final = 8
BULK: Final = 16384  # auto mode: a read at least this large moves the connection to splice ...
SMALL: Final = 4096  # ... and a splice smaller than this moves it back to copy


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


class PipeOutput:
    """Pending output that sits in a pipe, filled and drained with splice(2)."""

    __slots__ = ("pending", "pool", "r", "w")

    def __init__(self, r: int, w: int, pending: int, pool: PipePool | None) -> None:
        self.r, self.w, self.pending = r, w, pending
        self.pool = pool  # where the pipe goes back once empty; None: closed instead

    def __len__(self) -> int:
        return self.pending

    def fill(self, fd: int, size: int) -> int:
        try:
            moved = os.splice(fd, self.w, size, None, None, NONBLOCK)
        except BlockingIOError:  # the pipe is full (in pages if not in bytes)
            return FULL
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
        chunks = []
        while self.pending:
            chunk = os.read(self.r, self.pending)
            chunks.append(chunk)
            self.pending -= len(chunk)
        return b"".join(chunks)

    def release(self) -> None:
        if self.r < 0:
            return
        if self.pending or self.pool is None:  # not empty: never reuse it
            os.close(self.r)
            os.close(self.w)
        else:
            self.pool.put(self.r, self.w)
        self.r = self.w = -1


class EchoParts(Protocol):
    """What the splice path shares with the copy path (worker/echo.py's `Echo`, which owns the Splicer)."""

    def eof(self, fd: int, conn: Conn | None) -> None: ...

    def keep(self, fd: int, out: Output) -> None: ...

    def read_plain(self, fd: int) -> None: ...


class Splicer:
    """The echo of a plain connection in splice mode: socket -> scratch pipe -> socket."""

    def __init__(self, core: Core, echo: EchoParts, write_buffer_high: int, auto: bool) -> None:
        self.core = core
        self.echo = echo
        self.small = SMALL if auto else 0
        self.pipes = PipePool(write_buffer_high)
        self.scratch_r, self.scratch_w = self.pipes.get(sized=False)  # a small one still works

    def build(self) -> Callable[[int, int], None]:
        """Build `splice(fd, tick)` for one ready connection: a closure for the same reason as the
        loop's fast path (worker/loop.py): it runs once per spliced read."""
        move, core = os.splice, self.core
        last, spliced, size, counts = core.last, core.spliced, core.read_size, core.counts
        close, eof, keep, discard, step_over = (
            core.close, self.echo.eof, self._keep, self._discard_scratch, self.echo.read_plain
        )  # fmt: skip
        small, RECEIVED, SENT = self.small, stats.RECEIVED_BYTES, stats.SENT_BYTES

        def splice(fd: int, tick: int) -> None:
            scratch_r, scratch_w = self.scratch_r, self.scratch_w  # replaced whenever a connection keeps one
            try:
                k = move(fd, scratch_w, size, None, None, NONBLOCK)
            except BlockingIOError:
                # Reported readable, yet splice moved nothing: splice stops at TCP's urgent mark
                # (MSG_OOB) for good, and only a read steps over it, so read once the copy way (or
                # level-triggered epoll would report this socket, and splice refuse it, on every turn).
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

    def _discard_scratch(self, pending: int) -> None:
        PipeOutput(self.scratch_r, self.scratch_w, pending, None).take()
        self.core.counts[stats.DROPPED_BYTES] += pending

    def _keep(self, fd: int, pending: int) -> None:
        """The scratch pipe holds `pending` bytes for `fd`: it becomes fd's output."""
        out: Output = PipeOutput(self.scratch_r, self.scratch_w, pending, self.pipes)
        try:
            self.scratch_r, self.scratch_w = self.pipes.get()
        except OSError as exc:
            log.debug("no pipe for pending output (%s): buffering in memory", exc.strerror)
            out = MemoryOutput(out.take())  # the scratch pipe is empty again and stays ours
        self.echo.keep(fd, out)
