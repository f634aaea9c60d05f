"""The worker process (see worker/loop.py for the loop, docs/architecture.md for the parts)."""

from __future__ import annotations

import socket

from ..config import Settings
from .lifecycle import FLUSH_GRACE
from .loop import Worker

__all__ = ["FLUSH_GRACE", "Worker", "run_worker"]


def run_worker(
    settings: Settings,
    listeners: list[socket.socket],
    row: memoryview,
    master_pid: int,
    proxied: frozenset[int] = frozenset(),
) -> int:
    """The body of a worker process: serve the slot's sockets until told to stop; the exit code."""
    return Worker(settings, listeners, row, master_pid, proxied).run()
