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
from typing import Final

from .. import histograms, tcpinfo
from ..config import Settings
from ..histograms import BYTES_ECHOED, DURATION, RTT, sum_field
from ..tcpinfo import RETRANSMITS as _AT_RETRANSMITS  # literal Finals: inlined when compiled
from ..tcpinfo import RTT as _AT_RTT
from .access_log import AccessLog, host_port
from .core import Core

_FIN_POSSIBLE: Final = frozenset(("client", "shutdown"))


def build(core: Core, settings: Settings, slot: int, listeners: list[socket.socket]) -> Insight:
    """The worker's Insight, with its access log open when the configuration asks for one."""
    insight = Insight(core, None, settings.access_log_sample, slot)
    if settings.access_log:
        insight.access = AccessLog(
            settings.access_log, settings.access_log_format, settings.log.file, insight.hist, slot
        )
        insight.access.open()
        # Addresses are kept per connection only for the log: about 200 B a connection otherwise.
        core.keep_addresses()
        core.closing = insight.logged
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
        """Every close while the access log is off: the histograms only."""
        self.observe(fd)

    def observe(self, fd: int) -> tuple[int, tuple[int, ...] | None]:
        """Count connection `fd` into the histograms; its duration (us) and TCP_INFO values.

        The whole of what issue 18 adds to a connection's life when the log is off: 1.6 us compiled,
        1.9 interpreted (bench/close_path.py), of about 20 us a churned connection costs the worker."""
        hist = self.hist
        duration_us = int((_monotonic() - self.core.born[fd]) * 1_000_000)
        hist[_DURATION_FIRST + _bisect(_DURATION_BOUNDS, duration_us)] += 1
        hist[_DURATION_SUM] += duration_us
        raw = tcpinfo.fetch(fd)
        v = None if raw is None else tcpinfo.values(raw)
        if v is None:
            hist[_BYTES_FIRST] += 1  # nothing known echoed: the 0-byte bucket
            return duration_us, None
        rtt = v[_AT_RTT]
        hist[_RTT_FIRST + _bisect(_RTT_BOUNDS, rtt)] += 1
        hist[_RTT_SUM] += rtt
        hist[_RETRANSMITS] += v[_AT_RETRANSMITS]
        out = tcpinfo.bytes_out(v)
        hist[_BYTES_FIRST + _bisect(_BYTES_BOUNDS, out)] += 1
        hist[_BYTES_SUM] += out
        return duration_us, v

    def logged(self, fd: int, reason: str) -> None:
        """Every close while the access log is on: the histograms, then (sampled) its line."""
        duration_us, v = self.observe(fd)
        access = self.access
        if access is None or (self.sample < 1.0 and random.random() >= self.sample):
            return
        core = self.core
        bytes_in = bytes_out = 0
        if v is not None:
            fin = reason in _FIN_POSSIBLE or core.fin_in == fd
            bytes_in = max(0, tcpinfo.bytes_in(v, fin) - core.header_bytes.get(fd, 0))
            bytes_out = tcpinfo.bytes_out(v)
        listener, client = core.via[fd], core.peer[fd]
        if client is not None and listener:
            client_text = host_port(client)
        else:  # handed over: neither is known here
            listener, peer = self._addresses(fd)
            # The PROXY header's address came along (Peers), its port did not.
            client_text = core.peers.header_address(fd) or (host_port(peer) if peer is not None else "")
        access.add(listener, client_text, duration_us, bytes_in, bytes_out, reason, v)

    def rejected(self, fd: int, reason: str, peer: tuple[str, int], listener: str) -> None:
        """A connection accepted and closed at once (limits, out of descriptors): logged, no bytes."""
        if self.access is None or (self.sample < 1.0 and random.random() >= self.sample):
            return
        self.access.add(listener, host_port(peer), 0, 0, 0, reason, None)

    def _addresses(self, fd: int) -> tuple[str, tuple[str, int] | None]:
        """The listener's text (found by the connection's local address) and the socket's peer."""
        sock = socket.socket(fileno=fd)  # borrowed (its family read from the kernel), detached below
        try:
            local: tuple[str, int] = sock.getsockname()[:2]
        except OSError:
            local = ("", 0)
        peer = None
        try:
            peer = sock.getpeername()[:2]
        except OSError:  # reset: the kernel has forgotten it
            pass
        sock.detach()
        listener = self.listeners.get(local) or self.listeners.get((_wildcard(local[0]), local[1]), "")
        return listener, peer


# Final: compiled, each is a C static (an int a C integer), where a plain module global costs a dict
# lookup per use; observe() made 17 of them per close (build/ops.txt of a mypyc build).
_DURATION_FIRST: Final = DURATION.first
_DURATION_BOUNDS: Final = DURATION.bounds
_DURATION_SUM: Final = sum_field(DURATION)
_BYTES_FIRST: Final = BYTES_ECHOED.first
_BYTES_BOUNDS: Final = BYTES_ECHOED.bounds
_BYTES_SUM: Final = sum_field(BYTES_ECHOED)
_RTT_FIRST: Final = RTT.first
_RTT_BOUNDS: Final = RTT.bounds
_RTT_SUM: Final = sum_field(RTT)
_RETRANSMITS: Final = histograms.TCP_RETRANSMITS
_monotonic: Final = time.monotonic
_bisect: Final = bisect_left


def _wildcard(host: str) -> str:
    return "::" if ":" in host else "0.0.0.0"
