"""UDP echo (RFC 862 section 3), guarded against reflection and amplification.

An open UDP echo service answers whoever a datagram claims to come from, so a spoofed source turns it
into a traffic reflector, and a spoofed well-known port (echo 7, chargen 19, ...) into a loop between
two servers. The guards, in the order a datagram meets them:

- datagrams from source ports below 1024 are never answered (no service talks from there to us);
- each source address has a token bucket for datagrams and bytes per second (one second of burst),
  so no address, real or spoofed, gets more than the configured rate reflected at it;
- the reply is the datagram itself: never larger than the request, so nothing is amplified;
- at most `udp_max_sources` buckets exist per worker: memory is bounded by configuration, and a flood
  of spoofed sources gets nothing answered rather than an unbounded table.
"""

from __future__ import annotations

import socket
import time

from . import stats

BATCH = 64  # datagrams per readiness event: the other connections get their turn after that
MAX_DATAGRAM = 65535
IDLE_BUCKET_S = 1.0  # a bucket untouched this long is full again, the same as no bucket


class RateLimiter:
    """Per-source token buckets: `packets` datagrams and `octets` bytes per second, one second of burst."""

    __slots__ = ("buckets", "counts", "max_sources", "octets", "packets")

    def __init__(self, packets: float, octets: float, max_sources: int, counts: list[int]) -> None:
        self.packets = packets
        self.octets = octets
        self.max_sources = max_sources
        self.counts = counts
        self.buckets: dict[str, list[float]] = {}  # source -> [datagram tokens, byte tokens, refilled at]

    def allow(self, source: str, size: int, now: float) -> bool:
        bucket = self.buckets.get(source)
        if bucket is None:
            if len(self.buckets) >= self.max_sources:
                self.counts[stats.UDP_DROPPED_SOURCES] += 1
                return False
            bucket = self.buckets[source] = [self.packets, self.octets, now]
        else:
            elapsed = now - bucket[2]
            if elapsed > 0:
                bucket[0] = min(self.packets, bucket[0] + elapsed * self.packets)
                bucket[1] = min(self.octets, bucket[1] + elapsed * self.octets)
                bucket[2] = now
        if bucket[0] < 1 or bucket[1] < size:
            self.counts[stats.UDP_DROPPED_RATE] += 1
            return False
        bucket[0] -= 1
        bucket[1] -= size
        return True

    def prune(self, now: float) -> None:
        """Forget the sources whose buckets have refilled: they are as good as new ones."""
        if self.buckets:
            self.buckets = {src: b for src, b in self.buckets.items() if now - b[2] < IDLE_BUCKET_S}


class UdpEcho:
    """One UDP socket of this worker's slot."""

    __slots__ = ("counts", "limiter", "sock")

    def __init__(self, sock: socket.socket, limiter: RateLimiter, counts: list[int]) -> None:
        self.sock = sock
        self.limiter = limiter
        self.counts = counts

    def serve(self) -> None:
        """Answer what is queued, up to BATCH datagrams (level-triggered: the rest comes next turn)."""
        recvfrom, sendto, allow, counts = (
            self.sock.recvfrom,
            self.sock.sendto,
            self.limiter.allow,
            self.counts,
        )
        now = time.monotonic()
        for _ in range(BATCH):
            try:
                data, source = recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError:
                continue  # a queued ICMP error for an earlier reply: nothing to answer
            size = len(data)
            counts[stats.UDP_RECEIVED_PACKETS] += 1
            counts[stats.UDP_RECEIVED_BYTES] += size
            if source[1] < 1024:
                counts[stats.UDP_DROPPED_PORT] += 1
                continue
            if not allow(source[0], size, now):
                continue
            try:
                sendto(data, source)
            except OSError:  # EAGAIN (send buffer full), unreachable...: UDP may drop, we never queue
                counts[stats.UDP_DROPPED_SEND] += 1
                continue
            counts[stats.UDP_SENT_PACKETS] += 1
            counts[stats.UDP_SENT_BYTES] += size
