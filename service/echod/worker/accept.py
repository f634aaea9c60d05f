"""Accepting: one connection per event unless a queue lasts, the EMFILE reserve, max_connections and
max_connections_per_ip. Accepting is kept apart from the connections' handlers, as nginx keeps
ngx_event_accept apart from the echo."""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import ssl
import time
from collections.abc import Callable
from typing import Final, Protocol

from .. import stats
from ..udp import RateLimiter, UdpEcho
from .access_log import host_port
from .core import EPOLLIN, Core

log = logging.getLogger("echod.worker")

ACCEPT_BATCH: Final = 64  # connections accepted per listener per loop turn while a queue lasts (see accept)
ACCEPT_STREAK: Final = 8  # turns in a row a listener must be ready before it is accepted from in batches
EMFILE_PAUSE: Final = 1.0  # seconds accepting stays off when even the reserve fd cannot be had


class HeaderPhase(Protocol):
    """Where a PROXY listener's connections go first (worker/proxied.py); TLS, if any, follows."""

    def start(self, fd: int, tls: ssl.SSLContext | None) -> None: ...


class TlsPhase(Protocol):
    """Where a TLS listener's connections go (worker/tls.py)."""

    def start(self, fd: int, context: ssl.SSLContext, data: bytes = b"") -> None: ...


class Listener:
    """One listening socket of our slot."""

    __slots__ = ("acceptor", "proxy", "sock", "streak", "text", "tls", "turn")

    def __init__(
        self, sock: socket.socket, proxy: bool, acceptor: Acceptor, tls: ssl.SSLContext | None = None
    ) -> None:
        self.sock = sock
        self.text = host_port(sock.getsockname())  # HOST:PORT, for the access log
        self.proxy = proxy  # its connections begin with a PROXY protocol header
        self.tls = tls  # its connections speak TLS (after the PROXY header, if any)
        self.acceptor = acceptor
        self.turn = -2  # the loop turn that last reported it ready
        self.streak = 0  # consecutive turns it has been ready since a batch last emptied its queue

    def on_event(self, fd: int, ev: int) -> None:
        self.acceptor.accept(self)


class Acceptor:
    def __init__(
        self,
        core: Core,
        listeners: list[socket.socket],
        proxied: frozenset[int],
        max_connections: int,
        limiter: RateLimiter,
        headers: HeaderPhase,
        contexts: dict[int, ssl.SSLContext] | None = None,
        tls: TlsPhase | None = None,
    ) -> None:
        self.core = core
        self.listeners = listeners
        self.proxied = proxied  # listening fds whose connections begin with a PROXY header
        self.max_connections = max_connections
        self.limiter = limiter
        self.headers = headers
        self.contexts = contexts or {}  # listening fd -> its TLS server context
        self.tls = tls
        self.accepting = False
        self.retired = False  # listeners closed for good
        self.resume_at = 0.0  # accepting is off until then (out of descriptors)
        self.reserve_fd = open_reserve()
        # The access log's record of a connection rejected here (worker/insight.py), when it is on.
        self.log_reject: Callable[[int, str, tuple[str, int], str], None] | None = None

    def start(self) -> None:
        core = self.core
        # Our own UDP echo ports are never answered as sources (two echo servers would ping-pong).
        udp_ports = frozenset(s.getsockname()[1] for s in self.listeners if s.type == socket.SOCK_DGRAM)
        for sock in self.listeners:
            fd = sock.fileno()
            core.grow(fd)
            if sock.type == socket.SOCK_DGRAM:
                core.table[fd] = UdpEcho(sock, self.limiter, core.counts, udp_ports)
            else:
                core.table[fd] = Listener(sock, fd in self.proxied, self, self.contexts.get(fd))
            # Exclusive: when workers share a socket (reload overlap, socket activation), one wakes.
            core.ep.register(fd, EPOLLIN | select.EPOLLEXCLUSIVE)
        self.accepting = True

    def stop(self) -> None:
        for sock in self.listeners:
            fd = sock.fileno()
            if self.accepting:
                self.core.ep.unregister(fd)
            self.core.release(fd)
        self.accepting = False

    def retire(self) -> None:
        """Stop accepting for good (a retirement or a stop)."""
        if self.retired:
            return
        self.retired = True
        self.stop()
        self.resume_at = 0.0
        for sock in self.listeners:
            sock.close()  # our copy only: the master keeps the socket and its queue

    def resume(self, now: float) -> None:
        if self.resume_at and now >= self.resume_at:
            self.resume_at = 0.0
            self.reserve_fd = open_reserve()
            self.start()

    def accept(self, listener: Listener) -> None:
        """One connection per event, like nginx without multi_accept, until the listener has been
        ready for ACCEPT_STREAK turns in a row: then batches, until one empties the queue.

        Accepting until EAGAIN on every event costs an accept4 that finds nothing, which allocates
        and frees a socket in the kernel (4.6 us here from Python, against 1.3 us for a read that
        finds nothing), and under churn that is about every other connection (bench/README.md).
        Level-triggered epoll reports a listener with more waiting on the next turn anyway; the
        streak keeps a connection storm from being accepted at one per turn behind a busy loop's
        thousand events."""
        core = self.core
        lsock = listener.sock
        turn = core.turn
        listener.streak = listener.streak + 1 if listener.turn == turn - 1 else 0
        listener.turn = turn
        batch = ACCEPT_BATCH if listener.streak >= ACCEPT_STREAK else 1
        counts, peers = core.counts, core.peers
        for _ in range(batch):
            try:
                # _accept() is what socket.accept() calls: the bare fd, without building a socket
                # object (and its enum conversions) only to detach it again.
                fd, addr = lsock._accept()  # type: ignore[attr-defined]  # private, see above
            except BlockingIOError:
                listener.streak = 0
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.shed(listener)
                    return
                continue  # ECONNABORTED, EPROTO...: that connection is gone, the next may not be
            if core.open >= self.max_connections:
                if self.log_reject is not None:
                    self.log_reject(fd, "limit", addr, listener.text)
                os.close(fd)
                counts[stats.REJECTED_LIMIT] += 1
                continue
            if peers.limit and not listener.proxy and not peers.admit(fd, addr[0]):
                if self.log_reject is not None:
                    self.log_reject(fd, "per_ip", addr, listener.text)
                os.close(fd)
                counts[stats.REJECTED_PER_IP] += 1
                continue
            _set_blocking(fd, False)
            core.adopt(fd)
            if core.keep_peers:  # the access log's
                core.peer[fd] = addr
                core.via[fd] = listener.text
            counts[stats.ACCEPTED] += 1
            if listener.proxy:  # the client's address is in the header: limits wait for it
                self.headers.start(fd, listener.tls)
            elif listener.tls is not None and self.tls is not None:
                self.tls.start(fd, listener.tls)

    def shed(self, listener: Listener) -> None:
        """Out of descriptors: free the reserve fd to accept-and-close what is queued (libuv's trick).

        Without this, level-triggered epoll would report the listener ready forever and spin the CPU.
        If even the reserve cannot be had back, stop accepting for a moment instead.
        """
        if self.reserve_fd >= 0:
            os.close(self.reserve_fd)
            self.reserve_fd = -1
            for _ in range(ACCEPT_BATCH):
                try:
                    conn, addr = listener.sock.accept()
                except OSError:
                    break
                if self.log_reject is not None:
                    self.log_reject(conn.fileno(), "emfile", addr, listener.text)
                conn.close()
                self.core.counts[stats.REJECTED_EMFILE] += 1
            self.reserve_fd = open_reserve()
        if self.reserve_fd < 0 and self.accepting:
            log.warning("out of file descriptors: not accepting for %.0f s", EMFILE_PAUSE)
            self.stop()
            self.resume_at = time.monotonic() + EMFILE_PAUSE


# Compiled, a C static: not a lookup of `set_blocking` in the os module per connection.
_set_blocking: Final = os.set_blocking


def open_reserve() -> int:
    """A spare descriptor, closed to make room when accept fails with EMFILE (-1 if none)."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1
