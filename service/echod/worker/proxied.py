"""Connections on a PROXY protocol listener, until their header is read (the phase is proxy.py's).

The header names the client, so max_connections_per_ip is applied once it is whole; whatever followed
the header in the same read is echoed at once.
"""

from __future__ import annotations

import logging
import os
import ssl
import time

from .. import proxy, stats
from .core import EPOLLERR, Core
from .echo import Echo
from .handoff import Handoff
from .tls import Tls

log = logging.getLogger("echod.worker")


class Proxied:
    def __init__(self, core: Core, echo: Echo, handoff: Handoff, timeout: float, tls: Tls) -> None:
        self.core = core
        self.echo = echo
        self.handoff = handoff
        self.timeout = timeout  # proxy_protocol_timeout
        # fd -> its header phase. An entry may outlive its connection (closed by a stop or an error);
        # `expire` drops it when it comes due, and a new connection on the same fd replaces it.
        self.awaiting: dict[int, proxy.AwaitingHeader] = {}
        # PROXY + TLS (HAProxy's send-proxy to an ssl server): fd -> the context its handshake uses
        # once the clear-text header is read.
        self.tls = tls
        self.then_tls: dict[int, ssl.SSLContext] = {}

    def start(self, fd: int, tls: ssl.SSLContext | None = None) -> None:
        state = proxy.AwaitingHeader(self, time.monotonic() + self.timeout)
        if tls is not None:
            self.then_tls[fd] = tls
        else:
            self.then_tls.pop(fd, None)
        self.core.table[fd] = state
        self.awaiting[fd] = state

    def on_header(self, fd: int, ev: int, state: proxy.AwaitingHeader) -> None:
        """Read until the PROXY header is whole; strip it, then echo whatever followed it."""
        core = self.core
        if ev & EPOLLERR:
            core.fail(fd)
            return
        try:
            chunk = os.read(fd, core.read_size)
        except BlockingIOError:
            return
        except OSError as exc:
            core.close(fd, "error", exc)
            return
        if not chunk:  # closed before sending a whole header
            core.close(fd, "proxy_protocol")
            return
        before = len(state.data)
        try:
            done = state.feed(chunk)
        except proxy.ProxyError as exc:
            log.debug("connection closed: %s", exc)
            core.close(fd, "proxy_protocol")
            return
        if done is None:
            return
        rest, source = done
        del self.awaiting[fd]
        core.table[fd] = None
        context = self.then_tls.pop(fd, None)
        if core.keep_peers:  # the access log's: its client, and bytes TCP_INFO counts but not echoed
            core.header_bytes[fd] = before + len(chunk) - len(rest)
            if source is not None:
                core.peer[fd] = source
        if not self._admit(fd, source):
            return
        if context is not None:  # what followed the header starts the handshake
            self.tls.start(fd, context, rest)
            return
        if rest:
            core.last[fd] = core.tick
            core.counts[stats.RECEIVED_BYTES] += len(rest)
            self.echo.echo(fd, rest)
        if self.handoff.active:  # retiring: pass it on like the others
            self.handoff.pass_on(fd)

    def _admit(self, fd: int, source: proxy.Source) -> bool:
        peers = self.core.peers
        if source is None:  # LOCAL or UNKNOWN: the proxy speaks for itself
            if peers.limit:
                peers.count_socket(fd)
            return True
        if log.isEnabledFor(logging.DEBUG):
            log.debug("connection from %s port %d (PROXY protocol)", *source)
        if peers.limit:
            if not peers.admit(fd, source[0], named=True):
                self.core.counts[stats.REJECTED_PER_IP] += 1
                self.core.close(fd, "rejected")
                return False
        else:
            peers.name(fd, source[0])
        return True

    def expire(self, now: float) -> None:
        """Close the connections whose header is overdue."""
        table = self.core.table
        for fd, state in list(self.awaiting.items()):
            if table[fd] is not state:  # gone already
                del self.awaiting[fd]
            elif now >= state.deadline:
                del self.awaiting[fd]
                self.core.close(fd, "proxy_protocol")

    def close_all(self) -> None:
        """A stop: nothing was read from these that could be owed."""
        table = self.core.table
        for fd, state in list(self.awaiting.items()):
            if table[fd] is state:
                self.core.close(fd, "shutdown")
        self.awaiting.clear()
