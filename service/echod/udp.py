"""UDP echo (RFC 862 section 3), guarded against reflection and amplification.

An open UDP echo service answers whoever a datagram claims to come from, so a spoofed source turns it
into a traffic reflector, and a spoofed well-known port (echo 7, chargen 19, ...) into a loop between
two servers. The guards, in the order a datagram meets them:

- datagrams from source ports below 1024 are never answered (no service talks from there to us), nor
  from the ports echod itself serves UDP on (two echo servers would otherwise bounce one datagram
  between them for ever);
- each source has a token bucket for datagrams and bytes per second (one second of burst), so no
  address, real or spoofed, gets more than the configured rate reflected at it. A source is an IPv4
  address or an IPv6 /64 (one site owns a whole /64; rotating through it must not multiply the
  rate), and the master steers every datagram of one source to the same worker (listeners.py), so
  the limit holds for the whole daemon, not per worker;
- the reply is the datagram itself: never larger than the request, so nothing is amplified;
- at most `udp_max_sources` buckets exist per worker: memory is bounded by configuration, and a flood
  of spoofed sources gets nothing answered rather than an unbounded table.
"""

from __future__ import annotations

import socket
import time

from . import stats

_MAPPED = "::ffff:"  # an IPv4 client on a dual-stack socket (socket-activated without V6ONLY)


def source_key(host: str) -> str | bytes:
    """The rate-limited unit a datagram comes from: an IPv4 address, or an IPv6 /64."""
    if ":" not in host:
        return host
    if host.startswith(_MAPPED) and "." in host:
        return host[len(_MAPPED) :]
    return socket.inet_pton(socket.AF_INET6, host.partition("%")[0])[:8]


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
        self.buckets: dict[str | bytes, list[float]] = {}  # source -> [datagram, byte tokens, refilled at]

    def allow(self, host: str, size: int, now: float) -> bool:
        source = source_key(host)
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

    __slots__ = ("counts", "deny", "limiter", "sock")

    def __init__(
        self, sock: socket.socket, limiter: RateLimiter, counts: list[int], deny: frozenset[int]
    ) -> None:
        self.sock = sock
        self.limiter = limiter
        self.counts = counts
        self.deny = deny  # source ports above 1023 never answered: our own UDP echo ports

    def on_event(self, fd: int, ev: int) -> None:
        self.serve()

    def serve(self) -> None:
        """Answer what is queued, up to BATCH datagrams (level-triggered: the rest comes next turn)."""
        recvfrom, sendto = self.sock.recvfrom, self.sock.sendto
        allow, counts, deny = self.limiter.allow, self.counts, self.deny
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
            if source[1] < 1024 or source[1] in deny:
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
