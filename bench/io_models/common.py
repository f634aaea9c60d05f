"""Plumbing shared by the IO-model echo servers (server_*.py): options, the listening socket, statistics.

None of this runs per message. The servers are for comparison only: each one is the smallest correct echo
server for its model (partial writes are kept and sent later, and while output is pending the connection is
not read, so memory stays bounded), with nothing else (no timeouts, no limits, no graceful stop: SIGTERM
ends them).

Statistics: every loop server counts its waiting calls (select/poll/epoll_wait), the descriptors those
calls reported, the reads that found nothing (EAGAIN) and the connections it refused. SIGUSR1 makes the
server print them on stdout as one line, `STATS {json}`, so a driver can take the difference over a window.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

# glibc's fd_set is a fixed 1024-bit array (FD_SETSIZE): select() can watch descriptors 0..1023 only, and
# CPython's select.select() raises ValueError for any other. It is a limit on the descriptor's *number*.
FD_SETSIZE = 1024

CALLS, EVENTS, EAGAIN, REFUSED = range(4)
NAMES = ("calls", "events", "eagain", "refused")
counts = [0, 0, 0, 0]  # the loops index this list directly: one list store per waiting call
ACCEPT_BATCH = 64  # connections accepted per readiness report of the listening socket


def options(description: str | None, extra: Callable[[argparse.ArgumentParser], None] | None = None):
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    ap.add_argument("--port", type=int, default=0, help="0: any free port (printed as LISTENING <port>)")
    ap.add_argument("--backlog", type=int, default=4096)
    ap.add_argument("--read-size", type=int, default=65536, help="bytes asked for per read")
    ap.add_argument("--cpu", type=int, help="pin the server to this CPU")
    if extra is not None:
        extra(ap)
    args = ap.parse_args()
    if not ipaddress.ip_address(args.host).is_loopback:
        ap.error("--host must be a loopback address: these servers are benchmark fixtures")
    if args.read_size < 1:
        ap.error("--read-size must be positive")
    if args.cpu is not None:
        os.sched_setaffinity(0, [args.cpu])
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:  # so that the descriptor limit is never the reason a model stops accepting
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
    return args


def listen(args: argparse.Namespace, blocking: bool = False, extra_stats: Callable[[], dict] | None = None):
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(args.backlog)
    sock.setblocking(blocking)

    def report(_signum: int, _frame: Any) -> None:
        stats: dict[str, Any] = dict(zip(NAMES, counts, strict=True))
        if extra_stats is not None:
            stats.update(extra_stats())
        os.write(1, f"STATS {json.dumps(stats)}\n".encode())  # not print(): safe inside a signal handler

    signal.signal(signal.SIGUSR1, report)
    print(f"LISTENING {sock.getsockname()[1]}", flush=True)
    return sock


def refuse(fd: int, why: str) -> None:
    """Close a connection the model cannot serve; say so on stderr (the first time, then every 100th)."""
    os.close(fd)
    counts[REFUSED] += 1
    if counts[REFUSED] == 1 or counts[REFUSED] % 100 == 0:
        print(f"refused connection #{counts[REFUSED]}: {why}", file=sys.stderr, flush=True)
