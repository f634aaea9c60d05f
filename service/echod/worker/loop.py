"""A worker process: one level-triggered `select.epoll` loop serving its slot's listening sockets.

Hot-path design (bench/README.md has the measurements behind it):
- Connections are bare file descriptors read and written with `os.read`/`os.write`: no socket object,
  no per-connection object while the echo goes out whole. `table[fd]` is None for such a connection
  and a handler object otherwise (worker/core.py), so one list lookup both finds the state and routes
  the event.
- Level-triggered, one `read` per ready connection per loop turn: a fast client cannot starve the
  others, and the steady state needs no extra read to reach EAGAIN and no `epoll_ctl`.
  Edge triggering was tried and reverted (docs/io-models.md): no gain measurable in echod, and the
  short-read rule it needs has exceptions (the EOF behind data, an urgent mark) that each stall a client.
- EPOLLOUT is registered only while output is pending (worker/echo.py).
- Counters are plain ints; the hot loop keeps bytes in locals and everything is published to the
  shared-memory row once a second. Idle tracking is one list store per read (`last[fd] = tick`).

The parts: accepting (worker/accept.py), the echo of a connection with state (worker/echo.py, its
output in worker/output.py or worker/splice.py), the PROXY header phase (worker/proxied.py), handover
(worker/handoff.py) and the lifecycle (worker/lifecycle.py); the per-event path is worker/fastpath.py.
This module wires them and runs the loop.
"""

from __future__ import annotations

import logging
import math
import os
import select
import signal
import socket
import ssl
import sys
import time
from typing import Final

from .. import logs, stats
from ..config import Settings
from ..idle import IdleWheel
from ..udp import RateLimiter
from .accept import Acceptor
from .core import Core
from .echo import Echo
from .fastpath import fast_path
from .handoff import Handoff
from .insight import build as build_insight
from .lifecycle import Lifecycle, Phase
from .malloc import no_fastbins
from .output import Watermarks
from .peers import Peers
from .proxied import Proxied
from .splice import BULK
from .tls import Tls

log = logging.getLogger("echod.worker")

# Final: compiled, read per loop turn as constants, not looked up in the module dict each time.
MAX_EVENTS: Final = 1024
LOG_BATCH: Final = 64  # access-log lines written at once
LOG_DELAY: Final = 0.1  # seconds a line waits at most
HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
IGNORED = (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)

_REPORTED = (
    (stats.DROPPED_BYTES, "dropped %d bytes read but not echoed (client reset, idle timeout or shutdown)"),
    (stats.REJECTED_LIMIT, "rejected %d connections: max_connections reached"),
    (stats.REJECTED_EMFILE, "rejected %d connections: out of file descriptors"),
    (stats.REJECTED_PER_IP, "rejected %d connections: max_connections_per_ip reached"),
)


class Wakeup:
    """The signal wake-up pipe's read end: its bytes are the numbers of the signals received (what
    signal.set_wakeup_fd writes), queued for this very turn's housekeeping.

    The numbers come from the pipe, not from the Python-level handler: in the compiled build the
    handler runs only when interpreted code next runs, after _handle_signals had already found the
    queue empty, so a TERM waited for the next second's housekeeping (a review of the mypyc build)."""

    __slots__ = ("fd", "worker")

    def __init__(self, fd: int, worker: Worker) -> None:
        self.fd = fd
        self.worker = worker

    def on_event(self, fd: int, ev: int) -> None:
        signalled = self.worker.signalled
        try:
            while chunk := os.read(self.fd, 512):
                signalled.extend(chunk)
        except BlockingIOError:
            pass
        self.worker.next_housekeeping = 0.0  # handle the signals on this very turn


class Worker:
    def __init__(
        self,
        settings: Settings,
        listeners: list[socket.socket],
        row: memoryview,
        master_pid: int,
        proxied: frozenset[int] = frozenset(),
        contexts: dict[int, ssl.SSLContext] | None = None,
    ) -> None:
        self.settings = settings
        self.row = row
        self.master_pid = master_pid
        self.core = core = Core(
            select.epoll(),
            settings.read_size,
            settings.max_buffered_bytes,
            Peers(settings.max_connections_per_ip),
        )
        core.tick = int(time.monotonic())
        if settings.idle_timeout > 0:
            # Ticks are truncated seconds, so traffic stamped at tick T happened in [T, T+1): one more
            # second guarantees a connection is never closed before idle_timeout of silence.
            core.wheel = IdleWheel(math.ceil(settings.idle_timeout) + 1, core.last, core.tick)
        self.limiter = RateLimiter(
            settings.udp_rate_packets, settings.udp_rate_bytes, settings.udp_max_sources, core.counts
        )
        self.handoff = Handoff(core, row)
        marks = Watermarks(settings.write_buffer_high, settings.write_buffer_low)
        self.echo = Echo(core, marks, self.handoff, settings.io_mode, settings.write_buffer_high)
        self.tls = Tls(core, marks, settings.tls_handshake_timeout)  # TLS listeners (worker/tls.py)
        self.proxied = Proxied(core, self.echo, self.handoff, settings.proxy_protocol_timeout, self.tls)
        self.acceptor = Acceptor(
            core, listeners, proxied, settings.max_connections, self.limiter, self.proxied,
            contexts, self.tls,
        )  # fmt: skip
        self.insight = build_insight(core, settings, int(row[stats.SLOT]), listeners)
        self.access = self.insight.access
        if self.access is not None:
            self.acceptor.log_reject = self.insight.rejected
        # io_mode: "copy" never splices; "splice" splices every connection; "auto" moves a connection
        # to splice once a read brings BULK bytes (worker/splice.py).
        self.bulk = sys.maxsize
        if settings.io_mode != "copy":
            auto = settings.io_mode == "auto"
            self.bulk = BULK if auto else 0
            core.splice_first = not auto
            core.spliced[:] = [core.splice_first] * len(core.spliced)
        self.lifecycle = Lifecycle(self, settings.shutdown_timeout)
        self.reported = [0] * stats.COUNTERS  # counts already logged by _report
        self.signalled: list[int] = []
        self.next_housekeeping = 0.0

    # -- lifecycle hooks (worker/lifecycle.py) -------------------------------------------------------
    def open_connections(self) -> int:
        return self.core.open

    def stop_accepting(self) -> None:
        self.acceptor.retire()
        self.handoff.keep_going()

    def begin_close(self) -> None:
        self.proxied.close_all()
        self.echo.begin_close()
        self.tls.begin_close()

    def close_all(self) -> None:
        self.echo.close_all()
        self.tls.close_all()

    # -- set-up ---------------------------------------------------------------------------------
    def run(self) -> int:
        no_fastbins()  # worker/malloc.py: a malloc_consolidate per message otherwise
        self._install_signals()
        self.handoff.listen()
        self.acceptor.start()
        self.row[stats.STATE] = stats.STATE_ACCEPTING
        self._publish()
        try:
            self._loop()
        finally:
            if self.access is not None:
                self.access.flush()
            self._publish()
        return 0

    def _install_signals(self) -> None:
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wfd)
        self.core.watch(rfd, Wakeup(rfd, self))
        for signum in HANDLED:
            signal.signal(signum, self._on_signal)
        for signum in IGNORED:
            signal.signal(signum, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # The master forks us with these blocked, so that none can kill us before the handlers exist.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {*HANDLED, *IGNORED, signal.SIGCHLD})

    def _on_signal(self, signum: int, _frame: object) -> None:
        """Nothing: the wake-up pipe carries the signal's number to the loop (see Wakeup)."""

    # -- the loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        core = self.core
        poll, monotonic = core.ep.poll, time.monotonic
        serve = fast_path(self.core, self.echo, self.bulk)
        # The access log's lines go out together: a turn's, or under churn up to LOG_BATCH lines' or
        # LOG_DELAY seconds' (a 330 B line to a file: 1.2 us as its own write, 0.2 us in a write of 64).
        pending, flush = ([], _no_flush) if self.access is None else (self.access.lines, self.access.flush)
        now = monotonic()
        turn, log_by = 0, 0.0
        while True:
            events = poll(max(0.0, self.next_housekeeping - now), MAX_EVENTS)
            now = monotonic()
            core.tick = tick = int(now)
            core.turn = turn = turn + 1
            serve(events, tick)
            if pending and (now >= log_by or len(pending) >= LOG_BATCH):
                flush()
                log_by = now + LOG_DELAY
            # next_housekeeping is also forced to 0 by a signal, see Wakeup.
            if now >= self.next_housekeeping and self._housekeeping(now):
                return

    # -- once a second ----------------------------------------------------------------------------
    def _housekeeping(self, now: float) -> bool:
        """Periodic work; returns True when the worker should exit."""
        self.next_housekeeping = now + 1.0
        core, lifecycle = self.core, self.lifecycle
        self._handle_signals(now)
        phase = lifecycle.advance(now)
        if core.wheel is not None and phase not in (Phase.CLOSING, Phase.DONE):
            for fd in core.wheel.expired(core.tick):
                core.close(fd, "timeout")
        self.proxied.expire(now)
        self.tls.expire(now)
        self.limiter.prune(now)
        self.acceptor.resume(now)
        self.handoff.resume_inbox(now)
        if self.access is not None:
            self.access.retry()
        if phase is Phase.DRAINING:
            self.handoff.keep_going()
        if os.getppid() != self.master_pid and not lifecycle.close_asked:
            log.warning("master %d is gone: stopping", self.master_pid)
            lifecycle.stop_fast()
        phase = lifecycle.advance(now)
        self.row[stats.STATE] = stats.STATE_ACCEPTING if lifecycle.accepting else stats.STATE_DRAINING
        self._report()
        if self.access is not None:  # lines of connections closed above (timeouts) go out now
            self.access.flush()
        self._publish()
        return phase is Phase.DONE

    def _handle_signals(self, now: float) -> None:
        lifecycle = self.lifecycle
        while self.signalled:
            signum = self.signalled.pop(0)
            if signum == signal.SIGUSR1:
                logs.reopen()
                if self.access is not None:
                    self.access.reopen()
            elif signum == signal.SIGTERM:
                lifecycle.stop(now)
            elif signum == signal.SIGUSR2:  # retirement: a reload, or fewer workers
                lifecycle.retire(now)
                if lifecycle.retire_at is not None:
                    self.next_housekeeping = min(self.next_housekeeping, lifecycle.retire_at)
            elif signum in (signal.SIGINT, signal.SIGQUIT):
                lifecycle.stop_fast()

    def _report(self) -> None:
        """Log what went wrong since the last second, one line per kind, never one per connection."""
        counts = self.core.counts
        for field, text in _REPORTED:
            new = counts[field] - self.reported[field]
            if new:
                last_rejected = self.core.peers.last_rejected
                if field == stats.REJECTED_PER_IP and last_rejected:
                    log.warning(text + " (the last for %s)", new, last_rejected)
                else:
                    log.warning(text, new)
                self.reported[field] = counts[field]
        self.tls.report()

    def _publish(self) -> None:
        row, core = self.row, self.core
        for field, value in enumerate(core.counts):
            row[field] = value
        for field, value in enumerate(self.insight.hist, stats.INSIGHT):
            row[field] = value
        row[stats.ACTIVE] = core.open
        row[stats.BUFFERED] = core.buffered
        row[stats.TLS_ACTIVE] = self.tls.active
        row[stats.HEARTBEAT_MS] = stats.monotonic_ms()


def _no_flush() -> None:
    pass
