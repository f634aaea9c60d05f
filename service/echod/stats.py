"""Counters shared between processes without locks.

One table of unsigned 64-bit ints is created by the master before it forks anything. Row 0 holds
the master's own state, row 1 the totals of workers that are gone, and every worker process writes only
its own row, once a second and at exit. Aligned 8-byte stores are atomic on the platforms echod runs on,
so readers never see a torn value; the master folds a dead worker's row into the retired row under a
sequence counter so that a reader can retry instead of seeing a sum that goes backwards.
"""

from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass
from typing import Final

from . import histograms

# Worker row fields. Counters first (these are folded into the retired row), gauges after. Final:
# the compiled worker modules (build.py) inline these numbers instead of looking each up per use.
ACCEPTED: Final = 0
CLOSED_CLIENT: Final = 1
CLOSED_TIMEOUT: Final = 2
CLOSED_ERROR: Final = 3
CLOSED_SHUTDOWN: Final = 4
REJECTED_LIMIT: Final = 5
REJECTED_EMFILE: Final = 6
RECEIVED_BYTES: Final = 7
SENT_BYTES: Final = 8
PARTIAL_WRITES: Final = 9
BACKPRESSURE_PAUSES: Final = 10
DROPPED_BYTES: Final = 11
HANDED_OVER: Final = 12  # established connections passed to a successor worker
REJECTED_PER_IP: Final = 13
CLOSED_PROXY: Final = 14  # PROXY protocol header missing, malformed or too slow
CLOSED_REJECTED: Final = 15  # refused once its PROXY header named the client (max_connections_per_ip)
UDP_RECEIVED_PACKETS: Final = 16
UDP_RECEIVED_BYTES: Final = 17
UDP_SENT_PACKETS: Final = 18
UDP_SENT_BYTES: Final = 19
UDP_DROPPED_PORT: Final = 20  # from a well-known port: never answered (echo/chargen loops, reflection)
UDP_DROPPED_RATE: Final = 21  # over the source's token bucket
UDP_DROPPED_SOURCES: Final = 22  # udp_max_sources sources already being tracked
UDP_DROPPED_SEND: Final = 23  # the reply could not be sent (socket buffer full, unreachable)
CLOSED_TLS: Final = 24  # TLS handshake failed or timed out, or the TLS stream broke (worker/tls.py)
TLS_HANDSHAKES_OK: Final = 25
TLS_HANDSHAKES_FAILED: Final = 26
COUNTERS: Final = 27
ACTIVE: Final = 27
BUFFERED: Final = 28
PID: Final = 29
GENERATION: Final = 30
STATE: Final = 31  # see STATE_* below
HEARTBEAT_MS: Final = 32  # CLOCK_MONOTONIC milliseconds, written from the worker's own event loop
SLOT: Final = 33
HANDOVER_PID: Final = 34  # written by the master before it retires the worker: whom to pass connections to
TLS_ACTIVE: Final = 35  # open TLS connections (also counted in ACTIVE)
# Connection insight (histograms.py lays it out): counters and histograms, folded like the counters.
INSIGHT: Final = 36
FIELDS: Final = INSIGHT + histograms.FIELDS
FOLDED = (*range(COUNTERS), *range(INSIGHT, FIELDS))

STATE_FREE: Final = 0
STATE_STARTING: Final = 1
STATE_ACCEPTING: Final = 2
STATE_DRAINING: Final = 3

CLOSE_REASONS = {
    "client": CLOSED_CLIENT,
    "timeout": CLOSED_TIMEOUT,
    "error": CLOSED_ERROR,
    "shutdown": CLOSED_SHUTDOWN,
    "proxy_protocol": CLOSED_PROXY,
    "rejected": CLOSED_REJECTED,
    "tls": CLOSED_TLS,
}
REJECT_REASONS = {"limit": REJECTED_LIMIT, "emfile": REJECTED_EMFILE, "per_ip": REJECTED_PER_IP}
UDP_DROP_REASONS = {
    "source_port": UDP_DROPPED_PORT,
    "rate_limit": UDP_DROPPED_RATE,
    "too_many_sources": UDP_DROPPED_SOURCES,
    "send_failed": UDP_DROPPED_SEND,
}

# Master row fields.
M_SEQUENCE: Final = 0  # odd while the master is folding a row
M_GENERATION: Final = 1
M_WORKERS_WANTED: Final = 2
M_WORKER_RESTARTS: Final = 3
M_RELOAD_SUCCESS: Final = 4
M_RELOAD_FAILURE: Final = 5
M_LAST_RELOAD_OK: Final = 6
M_MASTER_PID: Final = 7
M_LAYOUT: Final = 8  # LAYOUT: a successor only carries totals over from a table it understands
M_CARRIED: Final = 9  # 1 once the predecessor's totals are folded into ours (in-place upgrade)
MASTER_COUNTERS = (M_WORKER_RESTARTS, M_RELOAD_SUCCESS, M_RELOAD_FAILURE)

MASTER_ROW: Final = 0
RETIRED_ROW: Final = 1
FIRST_WORKER_ROW: Final = 2
LAYOUT: Final = FIELDS * 1000 + COUNTERS  # FIELDS grows with the insight block: a new layout


def monotonic_ms() -> int:
    return int(time.monotonic() * 1000)


@dataclass
class Snapshot:
    master: list[int]
    rows: list[list[int]]  # every row whose counters count: retired totals and live workers
    workers: list[list[int]]  # our own live worker rows
    others: list[list[int]]  # a predecessor master's live worker rows (during an upgrade)

    def total(self, field: int) -> int:
        return sum(row[field] for row in self.rows)

    def gauge(self, field: int) -> int:
        return sum(row[field] for row in self.workers) + sum(row[field] for row in self.others)


class Stats:
    """The shared table, in a memfd so that an in-place upgrade can pass it to the new master.

    `worker_rows` rows are enough for two full generations during a reload.
    """

    def __init__(self, worker_rows: int = 0, fd: int | None = None) -> None:
        if fd is None:
            fd = os.memfd_create("echod-stats", os.MFD_CLOEXEC)
            os.ftruncate(fd, (FIRST_WORKER_ROW + worker_rows) * FIELDS * 8)
        self.fd = fd
        self.mmap = mmap.mmap(fd, 0)
        self.words = memoryview(self.mmap).cast("Q")
        self.rows = len(self.words) // FIELDS
        self.master = self.row(MASTER_ROW)
        self.predecessor: Stats | None = None
        if self.master[M_LAYOUT] == 0:
            self.master[M_LAYOUT] = LAYOUT
            self.master[M_LAST_RELOAD_OK] = 1

    def row(self, index: int) -> memoryview:
        return self.words[index * FIELDS : (index + 1) * FIELDS]

    # -- master side ----------------------------------------------------------------------------
    def claim_row(self, pid: int, slot: int, generation: int) -> int:
        for index in range(FIRST_WORKER_ROW, self.rows):
            row = self.row(index)
            if row[STATE] == STATE_FREE:
                row[PID] = pid
                row[SLOT] = slot
                row[GENERATION] = generation
                row[HEARTBEAT_MS] = monotonic_ms()
                row[STATE] = STATE_STARTING
                return index
        raise RuntimeError("no free statistics row")

    def release_row(self, index: int) -> None:
        """Fold a dead worker's counters into the retired totals and free its row."""
        row, retired, master = self.row(index), self.row(RETIRED_ROW), self.master
        master[M_SEQUENCE] += 1
        for field in FOLDED:
            retired[field] += row[field]
        for field in range(FIELDS):
            row[field] = 0
        master[M_SEQUENCE] += 1

    def adopt_predecessor(self, fd: int) -> bool:
        """Count an upgraded-from master's totals as ours while it drains (False: unknown layout)."""
        other = Stats(fd=fd)
        if other.master[M_LAYOUT] != LAYOUT:
            return False
        self.predecessor = other
        return True

    def carry_predecessor(self) -> None:
        """The predecessor is gone and its rows final: fold them in, and stop reading its table."""
        other = self.predecessor
        if other is None:
            return
        _, rows = other._consistent_rows()
        retired, master = self.row(RETIRED_ROW), self.master
        master[M_SEQUENCE] += 1
        for field in FOLDED:
            retired[field] += sum(row[field] for row in rows)
        for field in MASTER_COUNTERS:
            master[field] += other.master[field]
        master[M_CARRIED] = 1
        master[M_SEQUENCE] += 1
        self.predecessor = None

    # -- reader side ------------------------------------------------------------------------------
    def _consistent_rows(self) -> tuple[list[int], list[list[int]]]:
        for _ in range(100):
            before = self.master[M_SEQUENCE]
            if before % 2 == 0:
                rows = [self.row(i).tolist() for i in range(RETIRED_ROW, self.rows)]
                if self.master[M_SEQUENCE] == before:
                    return self.master.tolist(), rows
            time.sleep(0.001)
        return self.master.tolist(), [self.row(i).tolist() for i in range(RETIRED_ROW, self.rows)]

    def snapshot(self) -> Snapshot:
        for _ in range(100):
            before = self.master[M_SEQUENCE]
            master, rows = self._consistent_rows()
            others: list[list[int]] = []
            other = self.predecessor
            if other is not None and not master[M_CARRIED]:
                other_master, other_rows = other._consistent_rows()
                rows += other_rows
                others = [row for row in other_rows[1:] if row[STATE] != STATE_FREE]
                for field in MASTER_COUNTERS:
                    master[field] += other_master[field]
            if self.master[M_SEQUENCE] == before:
                break
        workers = [row for row in rows[1 : self.rows - RETIRED_ROW] if row[STATE] != STATE_FREE]
        return Snapshot(master, rows, workers, others)
