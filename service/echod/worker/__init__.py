"""The worker process (see worker/loop.py for the loop, docs/architecture.md for the parts)."""

from __future__ import annotations

import socket
import ssl

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
    contexts: dict[int, ssl.SSLContext] | None = None,
) -> int:
    """The body of a worker process: serve the slot's sockets until told to stop; the exit code.
    `contexts`: listening fd -> TLS server context, built by the master (tls_config.py)."""
    return Worker(settings, listeners, row, master_pid, proxied, contexts).run()
