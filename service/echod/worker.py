"""A worker process: one level-triggered `select.epoll` loop serving its slot's listening sockets.

Hot-path design (see bench/README.md for the measurements behind it):
- Connections are bare file descriptors read and written with `os.read`/`os.write`: no socket object,
  no per-connection object while the echo goes out whole. `table[fd]` is None for such a connection,
  a `Connection` while it has state (pending output, paused, half-closed), a `_Listener` for a
  listening socket and `_CLOSED` otherwise, so one list lookup both finds the state and routes the event.
- Level-triggered, one `read` per ready connection per loop turn: a fast client cannot starve the
  others, and the steady state needs no extra read to reach EAGAIN and no `epoll_ctl`.
  Edge triggering was tried and reverted (docs/io-models.md): no gain measurable in echod, and the
  short-read rule it needs has exceptions (the EOF behind data, an urgent mark) that each stall a client.
- EPOLLOUT is registered only while output is pending.
- Counters are plain ints; the hot loop keeps bytes in locals and everything is published to the
  shared-memory row once a second. Idle tracking is one list store per read (`last[fd] = tick`).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from . import handover, proxy, stats
from .config import Settings
from .connection import Connection, Watermarks
from .idle import IdleWheel
from .udp import RateLimiter, UdpEcho

log = logging.getLogger("echod.worker")

EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
EPOLLERR, EPOLLHUP, EPOLLRDHUP = select.EPOLLERR, select.EPOLLHUP, select.EPOLLRDHUP
READING = EPOLLIN | EPOLLRDHUP
ACCEPT_BATCH = 64  # connections accepted per listener per loop turn while a queue lasts (see _accept)
ACCEPT_STREAK = 8  # turns in a row a listener must be ready before it is accepted from in batches
MAX_EVENTS = 1024
FLUSH_GRACE = 3.0  # seconds a stop spends flushing what was read before closing anyway
EMFILE_PAUSE = 1.0  # seconds accepting stays off when even the reserve fd cannot be had
RETIRE_ACCEPT_GRACE = 1.0  # seconds a retiring worker keeps accepting (see SIGUSR2)


_REPORTED = (
    (stats.DROPPED_BYTES, "dropped %d bytes read but not echoed (client reset, idle timeout or shutdown)"),
    (stats.REJECTED_LIMIT, "rejected %d connections: max_connections reached"),
    (stats.REJECTED_EMFILE, "rejected %d connections: out of file descriptors"),
    (stats.REJECTED_PER_IP, "rejected %d connections: max_connections_per_ip reached"),
)


class _Listener:
    __slots__ = ("proxy", "sock", "streak", "turn")

    def __init__(self, sock: socket.socket, proxy: bool = False) -> None:
        self.sock = sock
        self.proxy = proxy  # its connections begin with a PROXY protocol header
        self.turn = -2  # the loop turn that last reported it ready
        self.streak = 0  # consecutive turns it has been ready since a batch last emptied its queue


class _Inbox(_Listener):
    """Our handover socket: retiring workers connect here to pass connections."""


class _Channel(_Listener):
    """One retiring worker's handover connection."""


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


_CLOSED = _Sentinel("closed")  # no connection on this fd
_WAKEUP = _Sentinel("wakeup")  # the signal wake-up pipe


class AwaitingHeader:
    """A connection on a PROXY protocol listener whose header is not complete yet."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data = b""


class Closing(Connection):
    """A connection being closed by a stop: flush, then shut down our side and discard until EOF."""

    __slots__ = ("shut",)

    def __init__(self, data: bytes | bytearray = b"") -> None:
        super().__init__(data)
        self.shut = False


def _sock_for(fd: int) -> socket.socket:
    # A borrowed socket object for the rare calls os lacks (shutdown); detach() before it is dropped.
    return socket.socket(fileno=fd)


class Worker:
    def __init__(
        self,
        settings: Settings,
        listeners: list[socket.socket],
        row: memoryview,
        master_pid: int,
        proxied: frozenset[int] = frozenset(),
    ) -> None:
        self.settings = settings
        self.listeners = listeners
        self.proxied = proxied  # listening fds whose connections begin with a PROXY header
        self.awaiting: dict[int, float] = {}  # fd -> when its PROXY header is overdue
        self.row = row
        self.master_pid = master_pid
        self.read_size = settings.read_size
        self.max_connections = settings.max_connections
        self.budget = settings.max_buffered_bytes
        self.per_ip_limit = settings.max_connections_per_ip
        self.per_ip: dict[str, int] = {}  # open connections by client address, when limited
        self.peer: dict[int, str] = {}  # fd -> client address, when limited or named by a PROXY header
        self.last_rejected = ""  # the address last refused by max_connections_per_ip, for the log
        self.marks = Watermarks(settings.write_buffer_high, settings.write_buffer_low)
        self.counts = [0] * stats.COUNTERS
        self.limiter = RateLimiter(
            settings.udp_rate_packets, settings.udp_rate_bytes, settings.udp_max_sources, self.counts
        )
        self.reported = [0] * stats.COUNTERS  # counts already logged by _report
        self.open = 0
        self.buffered = 0
        self.table: list[Any] = [_CLOSED] * 1024
        self.last: list[int] = [0] * 1024
        # Splice (SpliceWorker): fd -> echoed through a pipe now; a read of `bulk` bytes moves a
        # connection there, and new connections start there with `splice_first`. Never, in copy mode.
        self.bulk = sys.maxsize
        self.splice_first = False
        self.spliced: list[bool] = [False] * 1024
        self.tick = int(time.monotonic())
        self.turn = 0  # loop turns so far
        self.wheel: IdleWheel | None = None
        if settings.idle_timeout > 0:
            # Ticks are truncated seconds, so traffic stamped at tick T happened in [T, T+1): one more
            # second guarantees a connection is never closed before idle_timeout of silence.
            self.wheel = IdleWheel(math.ceil(settings.idle_timeout) + 1, self.last, self.tick)
        self.ep = select.epoll()
        self.reserve_fd = -1
        self.accepting = False
        self.accept_resume_at = 0.0
        self.inbox_resume_at, self.inbox_fd = 0.0, -1  # the handover inbox, unwatched while out of fds
        self.signalled: list[int] = []
        self.drain_deadline: float | None = None  # set by a graceful stop or retirement
        self.retire_at: float | None = None  # when a retiring worker stops accepting
        self.retired = False  # listeners closed for good
        self.close_deadline: float | None = None  # set once connections are being closed
        self.outbox: socket.socket | None = None  # to the successor, while handing connections over
        self.outbox_pid = 0
        self.next_housekeeping = 0.0

    # -- set-up ---------------------------------------------------------------------------------
    def _install_signals(self) -> None:
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wakeup_fd = rfd
        signal.set_wakeup_fd(wfd)
        self._grow(rfd)
        self.table[rfd] = _WAKEUP
        self.ep.register(rfd, EPOLLIN)
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
        ignored = (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)
        for signum in handled:
            signal.signal(signum, self._on_signal)
        for signum in ignored:
            signal.signal(signum, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # The master forks us with these blocked, so that none can kill us before the handlers exist.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {*handled, *ignored, signal.SIGCHLD})

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signalled.append(signum)

    def _start_accepting(self) -> None:
        # Our own UDP echo ports are never answered as sources (two echo servers would ping-pong).
        udp_ports = frozenset(s.getsockname()[1] for s in self.listeners if s.type == socket.SOCK_DGRAM)
        for sock in self.listeners:
            fd = sock.fileno()
            self._grow(fd)
            if sock.type == socket.SOCK_DGRAM:
                self.table[fd] = UdpEcho(sock, self.limiter, self.counts, udp_ports)
            else:
                self.table[fd] = _Listener(sock, fd in self.proxied)
            # Exclusive: when workers share a socket (reload overlap, socket activation), one wakes.
            self.ep.register(fd, EPOLLIN | select.EPOLLEXCLUSIVE)
        self.accepting = True

    def _stop_accepting(self) -> None:
        for sock in self.listeners:
            fd = sock.fileno()
            if self.accepting:
                self.ep.unregister(fd)
            self.table[fd] = _CLOSED
        self.accepting = False

    def run(self) -> int:
        self._install_signals()
        self.reserve_fd = self._open_reserve()
        self._watch(handover.listen(), _Inbox)
        self._start_accepting()
        self.row[stats.STATE] = stats.STATE_ACCEPTING
        self._publish()
        try:
            self._loop()
        finally:
            self._publish()
        return 0

    # -- the loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        poll, monotonic = self.ep.poll, time.monotonic
        serve = self.serve = self._server()
        now = monotonic()
        turn = 0
        while True:
            events = poll(max(0.0, self.next_housekeeping - now), MAX_EVENTS)
            now = monotonic()
            self.tick = tick = int(now)
            self.turn = turn = turn + 1
            serve(events, tick)
            # next_housekeeping is also forced to 0 by a signal, see _drain_wakeup.
            if now >= self.next_housekeeping and self._housekeeping(now):
                return

    def _server(self) -> Callable[[list[tuple[int, int]], int], None]:
        """Build `serve(events, tick)`, which handles one loop turn's events.

        Everything the per-event path touches is bound here once, as a closure cell: no attribute or
        global lookups per event, and no set-up per turn either (a loop turn carries about three events
        under load, and building these locals on every turn cost 470 ns of it; now 180 ns).
        `table`, `last`, `spliced` and `counts` are only ever changed in place for this reason.
        """
        read, write, table, last, size, counts = (
            os.read, os.write, self.table, self.last, self.read_size, self.counts
        )  # fmt: skip
        slow, close, eof, buffer, splice = self._event, self._close, self._eof, self._buffer, self._splicer()
        spliced, bulk = self.spliced, self.bulk
        IN, RECEIVED, SENT, DROPPED = EPOLLIN, stats.RECEIVED_BYTES, stats.SENT_BYTES, stats.DROPPED_BYTES

        def serve(events: list[tuple[int, int]], tick: int) -> None:
            """A plain connection that is only readable takes the fast path; the rest go to _event."""
            received = sent = 0
            for fd, ev in events:
                state = table[fd]
                if state is None and ev == IN:
                    if spliced[fd]:
                        splice(fd, tick)
                        continue
                    try:
                        data = read(fd, size)
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        close(fd, "error", exc)
                        continue
                    if not data:
                        eof(fd, None)
                        continue
                    last[fd] = tick
                    k = len(data)
                    received += k
                    if k >= bulk:
                        spliced[fd] = True
                    try:
                        n = write(fd, data)
                    except BlockingIOError:
                        n = 0
                    except OSError as exc:  # reset between the read and the write
                        counts[DROPPED] += k
                        close(fd, "error", exc)
                        continue
                    sent += n
                    if n != k:
                        buffer(fd, data, n)
                else:
                    slow(fd, ev, state)
            counts[RECEIVED] += received
            counts[SENT] += sent

        return serve

    def _splicer(self) -> Callable[[int, int], None]:
        """Build `splice(fd, tick)`, the echo of a spliced connection: SpliceWorker's; none here, where
        no connection is ever spliced."""

        def splice(fd: int, tick: int) -> None:
            raise NotImplementedError("copy mode never splices")

        return splice

    def _event(self, fd: int, ev: int, state: Any) -> None:
        if state is _CLOSED:
            return
        if state.__class__ is _Listener:
            self._accept(state)
            return
        if state.__class__ is UdpEcho:
            state.serve()
            return
        if state is _WAKEUP:
            self._drain_wakeup()
            return
        if state.__class__ is _Inbox:
            self._take_channel(fd, state.sock)
            return
        if state.__class__ is _Channel:
            self._receive(fd, state.sock)
            return
        if ev & EPOLLERR:
            self._fail(fd)
            return
        if state.__class__ is AwaitingHeader:
            self._read_header(fd, state)
            return
        if state is not None and ev & (EPOLLOUT | EPOLLHUP):
            self._flush(fd, state)
            state = self.table[fd]
            if state is _CLOSED:
                return
        if ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP):
            self._read(fd, state)

    # -- connection events ----------------------------------------------------------------------
    def _recv(self, fd: int) -> bytes | None:
        """One read; None if nothing came (would block) or the connection failed and is closed."""
        try:
            return os.read(fd, self.read_size)
        except BlockingIOError:
            return None
        except OSError as exc:
            self._close(fd, "error", exc)
            return None

    def _read(self, fd: int, conn: Connection | None) -> None:
        if conn is not None and (conn.paused or conn.eof):
            return
        data = self._recv(fd)
        if data is None:
            return
        if not data:
            self._eof(fd, conn)
            return
        if conn.__class__ is Closing:
            self.counts[stats.DROPPED_BYTES] += len(data)
            return
        self.last[fd] = self.tick
        self.counts[stats.RECEIVED_BYTES] += len(data)
        if conn is None:
            self._echo(fd, data)
        else:
            conn.append(data)
            self.buffered += len(data)
            self._maybe_pause(fd, conn)

    def _echo(self, fd: int, data: bytes) -> None:
        try:
            n = os.write(fd, data)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self.counts[stats.DROPPED_BYTES] += len(data)
            self._close(fd, "error", exc)
            return
        self.counts[stats.SENT_BYTES] += n
        if n != len(data):
            self._buffer(fd, data, n)

    def _buffer(self, fd: int, data: bytes, sent: int) -> None:
        """The kernel took only `sent` bytes of `data`: keep the rest and wait for EPOLLOUT."""
        conn = Connection(memoryview(data)[sent:])
        self.table[fd] = conn
        self.buffered += len(conn)
        self.counts[stats.PARTIAL_WRITES] += 1
        if not self._maybe_pause(fd, conn):
            self.ep.modify(fd, READING | EPOLLOUT)

    def _over_budget(self) -> bool:
        return 0 < self.budget < self.buffered

    def _maybe_pause(self, fd: int, conn: Connection) -> bool:
        # Its own high watermark, or the worker's budget for all pending output (max_buffered_bytes):
        # then every connection that adds pending output stops reading until the total drains.
        if not self.marks.should_pause(conn) and (conn.paused or not self._over_budget()):
            return False
        conn.paused = True
        self.counts[stats.BACKPRESSURE_PAUSES] += 1
        self.ep.modify(fd, EPOLLOUT)
        return True

    def _flush(self, fd: int, conn: Connection) -> None:
        try:
            n = conn.flush(fd)
        except OSError as exc:
            self._close(fd, "error", exc)
            return
        self.counts[stats.SENT_BYTES] += n
        self.buffered -= n
        if n:
            self.last[fd] = self.tick
        if len(conn):
            handing_over = self.outbox is not None
            if self.marks.should_resume(conn) and not (conn.eof or handing_over or self._over_budget()):
                conn.paused = False
                self.ep.modify(fd, READING | EPOLLOUT)
        elif conn.__class__ is Closing:
            self._shut(fd, conn)
        elif conn.eof:
            self._close(fd, "client")
        elif self.outbox is not None:  # everything it read went out: now it can move
            self.table[fd] = None
            self._send_over([fd])
        else:
            self.table[fd] = None
            self.ep.modify(fd, READING)

    def _eof(self, fd: int, conn: Connection | None) -> None:
        """The client half-closed: send back everything read, then close our side."""
        if conn is None or not len(conn):
            self._close(fd, "shutdown" if conn.__class__ is Closing else "client")
            return
        conn.eof = True
        self.ep.modify(fd, EPOLLOUT)

    def _fail(self, fd: int) -> None:
        # EPOLLERR: the next read reports the real error (ECONNRESET, ETIMEDOUT...), as asyncio does.
        try:
            os.read(fd, 1)
            error: OSError | None = None
        except OSError as exc:
            error = exc
        self._close(fd, "error", error)

    def _close(self, fd: int, reason: str, error: OSError | None = None) -> None:
        conn = self.table[fd]
        if conn.__class__ is AwaitingHeader:
            del self.awaiting[fd]
        elif conn is not None and len(conn):
            pending = len(conn)
            self.buffered -= pending
            self.counts[stats.DROPPED_BYTES] += pending
        self.table[fd] = _CLOSED
        if self.wheel is not None:
            self.wheel.remove(fd)
        if self.peer:
            self._forget_peer(fd)
        os.close(fd)  # also removes it from the epoll set: nothing else holds this file
        self.open -= 1
        self.counts[stats.CLOSE_REASONS[reason]] += 1
        if error is not None and log.isEnabledFor(logging.DEBUG):
            log.debug("connection closed on error: %s", error.strerror or error)

    # -- accepting ------------------------------------------------------------------------------
    def _accept(self, listener: _Listener) -> None:
        """One connection per event, like nginx without multi_accept, until the listener has been
        ready for ACCEPT_STREAK turns in a row: then batches, until one empties the queue.

        Accepting until EAGAIN on every event costs an accept4 that finds nothing, which allocates
        and frees a socket in the kernel (4.6 us here from Python, against 1.3 us for a read that
        finds nothing), and under churn that is about every other connection. Level-triggered epoll
        reports a listener with more waiting on the next turn anyway; the streak keeps a connection
        storm from being accepted at one per turn behind a busy loop's thousand events."""
        lsock = listener.sock
        turn = self.turn
        listener.streak = listener.streak + 1 if listener.turn == turn - 1 else 0
        listener.turn = turn
        batch = ACCEPT_BATCH if listener.streak >= ACCEPT_STREAK else 1
        for _ in range(batch):
            try:
                # _accept() is what socket.accept() calls: the bare fd, without building a socket
                # object (and its enum conversions) only to detach it again.
                fd, addr = lsock._accept()  # type: ignore[attr-defined]
            except BlockingIOError:
                listener.streak = 0
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._shed(lsock)
                    return
                continue  # ECONNABORTED, EPROTO...: that connection is gone, the next may not be
            if self.open >= self.max_connections:
                os.close(fd)
                self.counts[stats.REJECTED_LIMIT] += 1
                continue
            if self.per_ip_limit and not listener.proxy and not self._admit(fd, addr[0]):
                os.close(fd)
                self.counts[stats.REJECTED_PER_IP] += 1
                continue
            os.set_blocking(fd, False)
            self._adopt(fd)
            self.counts[stats.ACCEPTED] += 1
            if listener.proxy:  # the client's address is in the header: limits wait for it
                self.table[fd] = AwaitingHeader()
                self.awaiting[fd] = time.monotonic() + self.settings.proxy_protocol_timeout

    def _admit(self, fd: int, ip: str) -> bool:
        count = self.per_ip.get(ip, 0)
        if count >= self.per_ip_limit:
            self.last_rejected = ip
            return False
        self.per_ip[ip] = count + 1
        self.peer[fd] = ip
        return True

    def _read_header(self, fd: int, state: AwaitingHeader) -> None:
        """Read until the PROXY header is whole; strip it, then echo whatever followed it."""
        data = self._recv(fd)
        if data is None:
            return
        if not data:  # closed before sending a whole header
            self._close(fd, "proxy_protocol")
            return
        data = state.data + data
        try:
            parsed = proxy.parse(data)
        except proxy.ProxyError as exc:
            log.debug("connection closed: %s", exc)
            self._close(fd, "proxy_protocol")
            return
        if parsed is None:  # incomplete; parse() never lets it grow past proxy.MAX_HEADER
            state.data = data
            return
        length, source = parsed
        del self.awaiting[fd]
        self.table[fd] = None
        if not self._admit_proxied(fd, source):
            return
        rest = data[length:]
        if rest:
            self.last[fd] = self.tick
            self.counts[stats.RECEIVED_BYTES] += len(rest)
            self._echo(fd, rest)
        if self.outbox is not None:  # retiring: pass it on like the others
            self._pass_on(fd)

    def _admit_proxied(self, fd: int, source: proxy.Source) -> bool:
        if source is None:  # LOCAL or UNKNOWN: the proxy speaks for itself
            if self.per_ip_limit:
                self._count_peer(fd)
            return True
        if log.isEnabledFor(logging.DEBUG):
            log.debug("connection from %s port %d (PROXY protocol)", *source)
        if self.per_ip_limit and not self._admit(fd, source[0]):
            self.counts[stats.REJECTED_PER_IP] += 1
            self._close(fd, "rejected")
            return False
        self.peer[fd] = source[0]
        return True

    def _count_peer(self, fd: int) -> None:
        sock = _sock_for(fd)
        try:
            ip = sock.getpeername()[0]
        except OSError:
            return
        finally:
            sock.detach()
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        self.peer[fd] = ip

    def _forget_peer(self, fd: int) -> None:
        ip = self.peer.pop(fd, None)
        if ip is not None and ip in self.per_ip:
            count = self.per_ip[ip] - 1
            if count:
                self.per_ip[ip] = count
            else:
                del self.per_ip[ip]

    def _shed(self, lsock: socket.socket) -> None:
        """Out of descriptors: free the reserve fd to accept-and-close what is queued (libuv's trick).

        Without this, level-triggered epoll would report the listener ready forever and spin the CPU.
        If even the reserve cannot be had back, stop accepting for a moment instead.
        """
        if self.reserve_fd >= 0:
            os.close(self.reserve_fd)
            self.reserve_fd = -1
            for _ in range(ACCEPT_BATCH):
                try:
                    conn, _addr = lsock.accept()
                except OSError:
                    break
                conn.close()
                self.counts[stats.REJECTED_EMFILE] += 1
            self.reserve_fd = self._open_reserve()
        if self.reserve_fd < 0 and self.accepting:
            log.warning("out of file descriptors: not accepting for %.0f s", EMFILE_PAUSE)
            self._stop_accepting()
            self.accept_resume_at = time.monotonic() + EMFILE_PAUSE

    @staticmethod
    def _open_reserve() -> int:
        try:
            return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return -1

    def _grow(self, fd: int) -> None:
        if fd >= len(self.table):
            extra = max(fd + 1, 2 * len(self.table)) - len(self.table)
            self.table.extend([_CLOSED] * extra)
            self.last.extend([0] * extra)
            self.spliced.extend([self.splice_first] * extra)

    # -- once a second ----------------------------------------------------------------------------
    def _housekeeping(self, now: float) -> bool:
        """Periodic work; returns True when the worker should exit."""
        self.next_housekeeping = now + 1.0
        self._handle_signals()
        if self.wheel is not None and self.close_deadline is None:
            for fd in self.wheel.expired(self.tick):
                self._close(fd, "timeout")
        for fd in [fd for fd, deadline in self.awaiting.items() if now >= deadline]:
            self._close(fd, "proxy_protocol")
        self.limiter.prune(now)
        if self.accept_resume_at and now >= self.accept_resume_at:
            self.accept_resume_at = 0.0
            self.reserve_fd = self._open_reserve()
            self._start_accepting()
        if self.inbox_resume_at and now >= self.inbox_resume_at:
            self.inbox_resume_at = 0.0
            self.ep.register(self.inbox_fd, EPOLLIN)
        if os.getppid() != self.master_pid and self.close_deadline is None:
            log.warning("master %d is gone: stopping", self.master_pid)
            self._begin_close(now)
        self._report()
        self._publish()
        return self._stop_due(now)

    def _report(self) -> None:
        """Log what went wrong since the last second, one line per kind, never one per connection."""
        for field, text in _REPORTED:
            new = self.counts[field] - self.reported[field]
            if new:
                if field == stats.REJECTED_PER_IP and self.last_rejected:
                    log.warning(text + " (the last for %s)", new, self.last_rejected)
                else:
                    log.warning(text, new)
                self.reported[field] = self.counts[field]

    def _publish(self) -> None:
        row = self.row
        for field, value in enumerate(self.counts):
            row[field] = value
        row[stats.ACTIVE] = self.open
        row[stats.BUFFERED] = self.buffered
        row[stats.HEARTBEAT_MS] = stats.monotonic_ms()

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self.wakeup_fd, 512):
                pass
        except BlockingIOError:
            pass
        self.next_housekeeping = 0.0  # handle the signals on this very turn

    def _handle_signals(self) -> None:
        now = time.monotonic()
        while self.signalled:
            signum = self.signalled.pop(0)
            if signum == signal.SIGUSR1:
                from .logs import reopen

                reopen()
            elif signum == signal.SIGTERM:
                self._retire()
                self._drain_by(now + self.settings.shutdown_timeout)
            elif signum == signal.SIGUSR2 and self.retire_at is None and not self.retired:
                # Retirement (reload, fewer workers): the master has already steered new connections
                # away from our sockets; keep accepting a little longer so that handshakes still in
                # flight to them are served instead of reset when the socket closes.
                self.row[stats.STATE] = stats.STATE_DRAINING
                self.retire_at = now + RETIRE_ACCEPT_GRACE
                self._drain_by(now + self.settings.shutdown_timeout)
                self.next_housekeeping = min(self.next_housekeeping, self.retire_at)
            elif signum in (signal.SIGINT, signal.SIGQUIT):
                self._retire()
                self._begin_close(now)

    def _drain_by(self, deadline: float) -> None:
        if self.drain_deadline is None or deadline < self.drain_deadline:
            self.drain_deadline = deadline

    def _retire(self) -> None:
        """Stop accepting for good; pass our connections on if the master named a successor."""
        self.row[stats.STATE] = stats.STATE_DRAINING
        self.retire_at = None
        if self.retired:
            return
        self.retired = True
        self._stop_accepting()
        self.accept_resume_at = 0.0
        for sock in self.listeners:
            sock.close()  # our copy only: the master keeps the socket and its queue
        if self.close_deadline is None:
            self._keep_handing_over()

    # -- live handover ----------------------------------------------------------------------------
    def _watch(self, sock: socket.socket, kind: type[_Listener]) -> None:
        fd = sock.fileno()
        self._grow(fd)
        self.table[fd] = kind(sock)
        self.ep.register(fd, EPOLLIN)

    def _take_channel(self, fd: int, inbox: socket.socket) -> None:
        try:
            chan = handover.accept(inbox)
        except OSError as exc:
            # Out of descriptors (EMFILE): the channel and the connections in it wait in the kernel
            # until there is room. Unwatch the inbox meanwhile, or level-triggered epoll would spin.
            log.warning("cannot take connections handed over (%s): trying again in %.0f s", exc, EMFILE_PAUSE)
            self.ep.unregister(fd)
            self.inbox_resume_at = time.monotonic() + EMFILE_PAUSE
            self.inbox_fd = fd
            return
        if chan is not None:
            self._watch(chan, _Channel)

    def _keep_handing_over(self) -> None:
        """Retired: (re)connect to the successor the master names now, which may have changed since
        (a later reload retired the first one): nothing may stay behind with a worker that exits."""
        successor = self.row[stats.HANDOVER_PID]
        if successor and successor != self.outbox_pid:
            self._hand_over(successor)

    def _hand_over(self, successor: int) -> None:
        """Pass every connection to `successor`; those with unsent output follow once it is sent."""
        if self.outbox is not None:
            self.outbox.close()
            self.outbox, self.outbox_pid = None, 0
        try:
            self.outbox = handover.connect(successor)
        except OSError as exc:
            log.warning("cannot hand connections over to worker %d (%s): retrying", successor, exc)
            return
        self.outbox_pid = successor
        plain = [fd for fd, state in enumerate(self.table) if state is None]
        self._send_over(plain)
        if self.outbox is None:  # that failed: _keep_handing_over tries again in a second
            return
        for fd, state in enumerate(self.table):
            if isinstance(state, Connection):
                self._pass_on(fd)
        log.info("handed %d connections over to worker %d", len(plain), successor)

    def _pass_on(self, fd: int) -> None:
        """Hand `fd` over now, or once the output it owes is sent (see _flush)."""
        state = self.table[fd]
        if state is None:
            self._send_over([fd])
        elif isinstance(state, Connection) and not state.eof:
            state.paused = True  # read nothing more: what the client sends now is the successor's
            self.ep.modify(fd, EPOLLOUT)

    def _send_over(self, fds: list[int]) -> None:
        for fd in fds:
            self.ep.unregister(fd)  # from here on the bytes the client sends wait for the successor
        try:
            assert self.outbox is not None
            handover.send(self.outbox, fds, [self.peer.get(fd, "") for fd in fds])
        except OSError as exc:
            sent = exc.sent if isinstance(exc, handover.PartialHandover) else 0
            log.warning("handover failed (%s): serving %d connections here for now", exc, len(fds) - sent)
            self.outbox.close()  # type: ignore[union-attr]
            self.outbox, self.outbox_pid = None, 0
            for fd in fds[sent:]:
                self.ep.register(fd, READING)
            fds = fds[:sent]  # those are the successor's already
        for fd in fds:
            self.table[fd] = _CLOSED
            if self.wheel is not None:
                self.wheel.remove(fd)
            if self.peer:
                self._forget_peer(fd)
            os.close(fd)  # the successor holds its own descriptor for the same socket
        self.open -= len(fds)
        self.counts[stats.HANDED_OVER] += len(fds)

    def _receive(self, fd: int, chan: socket.socket) -> None:
        received = handover.receive(chan)
        if isinstance(received, handover.Truncated):
            log.error("%d connections handed over were lost: out of file descriptors", received.lost)
            self.counts[stats.CLOSED_ERROR] += received.lost
            received = received.kept
        if received is None:
            self.table[fd] = _CLOSED
            chan.close()
            return
        for conn, ip in received:
            self._adopt(conn)
            # Count it against its address (never refused: it is established).
            if ip:
                self.peer[conn] = ip
                if self.per_ip_limit:
                    self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
            elif self.per_ip_limit:
                self._count_peer(conn)
        if self.outbox is not None:  # we are retiring ourselves: pass them straight on
            self._send_over([conn for conn, _ip in received])

    def _adopt(self, fd: int) -> None:
        """Serve a connection: a fresh one from accept, or an established one handed to us."""
        self._grow(fd)
        self.table[fd] = None
        self.last[fd] = self.tick
        self.spliced[fd] = self.splice_first
        self.ep.register(fd, READING)
        if self.wheel is not None:
            self.wheel.add(fd, self.tick)
        self.open += 1

    # -- stopping -------------------------------------------------------------------------------
    def _stop_due(self, now: float) -> bool:
        if self.retire_at is not None and now >= self.retire_at:
            self._retire()
        elif self.retired and self.close_deadline is None:
            self._keep_handing_over()
        if self.drain_deadline is None and self.close_deadline is None:
            return False
        if self.open == 0 and self.retired:
            return True
        if self.close_deadline is None and self.drain_deadline is not None and now >= self.drain_deadline:
            self._begin_close(now)
        if self.close_deadline is not None and now >= self.close_deadline:
            self._close_all()
            return True
        return False

    def _begin_close(self, now: float) -> None:
        """Stop echoing: flush what was read, shut our side, discard the rest until the client's FIN."""
        if self.close_deadline is not None:
            return
        self._retire()
        self.close_deadline = now + FLUSH_GRACE
        for fd in list(self.awaiting):  # nothing read from them yet that could be owed
            self._close(fd, "shutdown")
        for fd, state in enumerate(self.table):
            if state is None or isinstance(state, Connection):
                closing = Closing(state.take() if state is not None else b"")
                self.table[fd] = closing
                if closing.buf:
                    self.ep.modify(fd, EPOLLOUT | EPOLLIN | EPOLLRDHUP)
                else:
                    self._shut(fd, closing)

    def _shut(self, fd: int, conn: Closing) -> None:
        if conn.shut:
            return
        conn.shut = True
        sock = _sock_for(fd)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            sock.detach()
            self._close(fd, "error", exc)
            return
        sock.detach()
        if conn.eof:  # the client's FIN is already in: nothing left to wait for
            self._close(fd, "shutdown")
        else:
            self.ep.modify(fd, EPOLLIN | EPOLLRDHUP)

    def _close_all(self) -> None:
        for fd, state in enumerate(self.table):
            if state is None or isinstance(state, Connection):
                self._close(fd, "shutdown")


def run_worker(
    settings: Settings,
    listeners: list[socket.socket],
    row: memoryview,
    master_pid: int,
    proxied: frozenset[int] = frozenset(),
) -> int:
    """The body of a worker process: serve the slot's sockets until told to stop; the exit code."""
    if settings.io_mode == "copy":
        return Worker(settings, listeners, row, master_pid, proxied).run()
    from .splice import SpliceWorker  # splice.py builds on this module

    return SpliceWorker(settings, listeners, row, master_pid, proxied).run()
