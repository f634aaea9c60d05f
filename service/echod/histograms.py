"""Per-connection histograms and TCP counters: their buckets and their place in a worker's stats row.

Workers count into a plain list (worker/insight.py) and publish it with their other counters once a
second; stats.py places this block after the row's own fields and folds it like any counter when a
worker exits; metrics.py turns it into Prometheus histograms. Each histogram takes one field per
bucket (not cumulative: a worker only adds 1 to one field per observation), one for +Inf and one
for the sum, all integers: durations and RTTs are kept in microseconds.

Buckets are fixed, chosen for echo traffic on LAN and WAN paths: RTTs from loopback (tens of µs)
through a LAN (under 1 ms) to intercontinental paths (100-300 ms) and bufferbloat (1 s); connection
durations from a one-shot exchange (ms) to a held session (an hour); bytes in powers of 8 from an
empty connection to a bulk transfer.
"""

from __future__ import annotations

from typing import Final, NamedTuple


class Histogram(NamedTuple):
    name: str
    help: str
    bounds: tuple[int, ...]  # inclusive upper bounds, in `unit`s
    per: int  # `bounds` units per base unit (seconds, bytes): 1_000_000 for microseconds
    first: int  # its first field, relative to the block


# Plain counters of the block, first.
ACCESS_LOG_DROPPED: Final = 0  # access-log lines dropped (worker/access_log.py)
TCP_RETRANSMITS: Final = 1  # retransmitted segments (tcpi_total_retrans) of the connections closed

_US = 1_000_000
DURATION_US = (
    1_000, 5_000, 25_000, 100_000, 500_000, 1_000_000, 5_000_000, 30_000_000, 60_000_000,
    300_000_000, 900_000_000, 3_600_000_000,
)  # fmt: skip
BYTES = (0, 64, 512, 4096, 32768, 262144, 1 << 21, 1 << 24, 1 << 27, 1 << 30, 1 << 33)
RTT_US = (
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
)  # fmt: skip

DURATION = Histogram("echod_connection_duration_seconds", "Connection lifetimes", DURATION_US, _US, 2)
BYTES_ECHOED = Histogram(
    "echod_connection_bytes", "Bytes echoed per connection", BYTES, 1, DURATION.first + len(DURATION_US) + 2
)
RTT = Histogram(
    "echod_tcp_rtt_seconds",
    "Smoothed TCP round-trip time of each connection at close",
    RTT_US,
    _US,
    BYTES_ECHOED.first + len(BYTES) + 2,
)
ALL = (DURATION, BYTES_ECHOED, RTT)
FIELDS = RTT.first + len(RTT_US) + 2


def sum_field(h: Histogram) -> int:
    return h.first + len(h.bounds) + 1


def cumulative(h: Histogram, block: list[int]) -> tuple[list[tuple[str, float]], float]:
    """Prometheus buckets (le, cumulative count) and the sum in base units, from a block's fields."""
    buckets: list[tuple[str, float]] = []
    running = 0
    for index, bound in enumerate(h.bounds):
        running += block[h.first + index]
        buckets.append((repr(bound / h.per), running))
    running += block[h.first + len(h.bounds)]
    buckets.append(("+Inf", running))
    return buckets, block[sum_field(h)] / h.per
