"""Counters shared between processes without locks.

One `RawArray` of unsigned 64-bit ints is created by the master before it forks anything. Row 0 holds
the master's own state, row 1 the totals of workers that are gone, and every worker process writes only
its own row, once a second and at exit. Aligned 8-byte stores are atomic on the platforms echod runs on,
so readers never see a torn value; the master folds a dead worker's row into the retired row under a
sequence counter so that a reader can retry instead of seeing a sum that goes backwards.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from multiprocessing.sharedctypes import RawArray
from typing import Any

# Worker row fields. Counters first (these are folded into the retired row), gauges after.
ACCEPTED = 0
CLOSED_CLIENT = 1
CLOSED_TIMEOUT = 2
CLOSED_ERROR = 3
CLOSED_SHUTDOWN = 4
REJECTED_LIMIT = 5
REJECTED_EMFILE = 6
RECEIVED_BYTES = 7
SENT_BYTES = 8
PARTIAL_WRITES = 9
BACKPRESSURE_PAUSES = 10
DROPPED_BYTES = 11
HANDED_OVER = 12  # established connections passed to a successor worker
COUNTERS = 13
ACTIVE = 13
BUFFERED = 14
PID = 15
GENERATION = 16
STATE = 17  # see STATE_* below
HEARTBEAT_MS = 18  # CLOCK_MONOTONIC milliseconds, written from the worker's own event loop
SLOT = 19
HANDOVER_PID = 20  # written by the master before it retires the worker: whom to pass connections to
FIELDS = 24

STATE_FREE = 0
STATE_STARTING = 1
STATE_ACCEPTING = 2
STATE_DRAINING = 3

CLOSE_REASONS = {
    "client": CLOSED_CLIENT,
    "timeout": CLOSED_TIMEOUT,
    "error": CLOSED_ERROR,
    "shutdown": CLOSED_SHUTDOWN,
}
REJECT_REASONS = {"limit": REJECTED_LIMIT, "emfile": REJECTED_EMFILE}

# Master row fields.
M_SEQUENCE = 0  # odd while the master is folding a row
M_GENERATION = 1
M_WORKERS_WANTED = 2
M_WORKER_RESTARTS = 3
M_RELOAD_SUCCESS = 4
M_RELOAD_FAILURE = 5
M_LAST_RELOAD_OK = 6
M_MASTER_PID = 7

MASTER_ROW = 0
RETIRED_ROW = 1
FIRST_WORKER_ROW = 2


def monotonic_ms() -> int:
    return int(time.monotonic() * 1000)


class Stats:
    """The shared table; `rows` worker rows are enough for two full generations during a reload."""

    def __init__(self, worker_rows: int) -> None:
        self.rows = FIRST_WORKER_ROW + worker_rows
        self.array: Any = RawArray("Q", self.rows * FIELDS)
        self.master = self.row(MASTER_ROW)
        self.master[M_LAST_RELOAD_OK] = 1

    def row(self, index: int) -> memoryview:
        start = index * FIELDS * 8
        return memoryview(self.array).cast("B")[start : start + FIELDS * 8].cast("Q")

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
        for field in range(COUNTERS):
            retired[field] += row[field]
        for field in range(FIELDS):
            row[field] = 0
        master[M_SEQUENCE] += 1

    # -- reader side ------------------------------------------------------------------------------
    def snapshot(self) -> tuple[list[int], list[list[int]]]:
        """Consistent (master row, [live worker rows with the retired row first])."""
        for _ in range(100):
            before = self.master[M_SEQUENCE]
            if before % 2 == 0:
                rows = [self.row(i).tolist() for i in range(RETIRED_ROW, self.rows)]
                if self.master[M_SEQUENCE] == before:
                    return self.master.tolist(), rows
            time.sleep(0.001)
        return self.master.tolist(), [self.row(i).tolist() for i in range(RETIRED_ROW, self.rows)]

    def live_rows(self) -> Iterator[memoryview]:
        for index in range(FIRST_WORKER_ROW, self.rows):
            row = self.row(index)
            if row[STATE] != STATE_FREE:
                yield row
