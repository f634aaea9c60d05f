"""What each connection saw, taken once at its close: histograms, TCP counters and the access log.

Core.close calls `closed` just before the descriptor goes: one TCP_INFO read (tcpinfo.py) gives the
RTT, the retransmissions and the bytes each way, so nothing is counted per message (worker/loop.py's
fast path is untouched); the start time is stamped at adopt. The histogram block is published with the
worker's counters once a second (histograms.py lays it out).

A handed-over connection is observed once, by the worker that closes it: its bytes are the connection's
whole life (the kernel counts them), its duration runs from the handover.
"""

from __future__ import annotations

import random
import socket
import time
from bisect import bisect_left

from .. import histograms, tcpinfo
from ..config import Settings
from ..histograms import BYTES_ECHOED, DURATION, RTT, sum_field
from .access_log import AccessLog, Record
from .core import Core

_FIN_POSSIBLE = frozenset(("client", "shutdown"))


def build(core: Core, settings: Settings, slot: int, listeners: list[socket.socket]) -> Insight:
    """The worker's Insight, with its access log open when the configuration asks for one."""
    insight = Insight(core, None, settings.access_log_sample, slot)
    if settings.access_log:
        insight.access = AccessLog(
            settings.access_log, settings.access_log_format, settings.log.file, insight.hist
        )
        insight.access.open()
    insight.know_listeners(listeners)
    return insight


class Insight:
    def __init__(self, core: Core, access: AccessLog | None, sample: float, slot: int) -> None:
        self.core = core
        self.hist = [0] * histograms.FIELDS  # the row's insight block; published by the loop
        self.access = access
        self.sample = sample
        self.slot = slot
        self.listeners: dict[tuple[str, int], str] = {}  # a listening socket's address -> its text
        core.closing = self.closed

    def know_listeners(self, socks: list[socket.socket]) -> None:
        for sock in socks:
            if sock.type == socket.SOCK_STREAM:
                address = sock.getsockname()
                self.listeners[address[:2]] = host_port(address)

    def closed(self, fd: int, reason: str) -> None:
        core, hist = self.core, self.hist
        now = time.monotonic()
        duration_us = int((now - core.born[fd]) * 1_000_000)
        hist[DURATION.first + bisect_left(DURATION.bounds, duration_us)] += 1
        hist[_DURATION_SUM] += duration_us
        info = tcpinfo.read(fd)
        bytes_in = bytes_out = 0
        if info is not None:
            bytes_in = max(0, info.bytes_in(reason in _FIN_POSSIBLE) - core.header_bytes.get(fd, 0))
            bytes_out = info.bytes_out()
            hist[RTT.first + bisect_left(RTT.bounds, info.rtt_us)] += 1
            hist[_RTT_SUM] += info.rtt_us
            hist[histograms.TCP_RETRANSMITS] += info.retransmits
        hist[BYTES_ECHOED.first + bisect_left(BYTES_ECHOED.bounds, bytes_out)] += 1
        hist[_BYTES_SUM] += bytes_out
        access = self.access
        if access is not None and (self.sample >= 1.0 or random.random() < self.sample):
            local, peer = self._addresses(fd)
            tcp = info.fields() if info is not None else {}
            client = peer or core.peer[fd]
            # Handed over: the PROXY header's address came along (Peers), its port did not.
            named = core.peers.address(fd) if core.peer[fd] is None else ""
            client_text = named or (host_port(client) if client is not None else "")
            access.add(Record(self.slot, local, client_text, duration_us, bytes_in, bytes_out, reason, tcp))

    def rejected(self, fd: int, reason: str, peer: tuple[str, int], lsock: socket.socket) -> None:
        """A connection accepted and closed at once (limits, out of descriptors): logged, no bytes."""
        if self.access is None or (self.sample < 1.0 and random.random() >= self.sample):
            return
        listener = self.listeners.get(lsock.getsockname()[:2], "")
        self.access.add(Record(self.slot, listener, host_port(peer), 0, 0, 0, reason, {}))

    def _addresses(self, fd: int) -> tuple[str, tuple[str, int] | None]:
        """The listener's text (found by the connection's local address) and, when accept gave us
        none (a connection handed over), the socket's peer."""
        sock = socket.socket(fileno=fd)  # borrowed (its family read from the kernel), detached below
        try:
            local: tuple[str, int] = sock.getsockname()[:2]
        except OSError:
            local = ("", 0)
        peer = None
        if self.core.peer[fd] is None:
            try:
                peer = sock.getpeername()[:2]
            except OSError:  # reset: the kernel has forgotten it
                pass
        sock.detach()
        listener = self.listeners.get(local) or self.listeners.get((_wildcard(local[0]), local[1]), "")
        return listener, peer


_DURATION_SUM, _BYTES_SUM, _RTT_SUM = sum_field(DURATION), sum_field(BYTES_ECHOED), sum_field(RTT)


def _wildcard(host: str) -> str:
    return "::" if ":" in host else "0.0.0.0"


def host_port(address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
