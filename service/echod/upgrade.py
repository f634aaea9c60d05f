"""In-place upgrade (SIGUSR2 to the master): re-execute the installed echod, handing it the sockets.

The old master starts `python -m echod run <its own options>` with every listening socket, the metrics
socket and the pidfile lock passed as inherited file descriptors (described in $ECHOD_INHERIT), and a
pipe on which the new master says "ready <worker pids>". Only then does the old master retire its
workers and exit; if the new master fails, the old one never stopped serving. No listening socket is
ever closed, so not a single connection is refused.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass

ENV = "ECHOD_INHERIT"


@dataclass
class Inherited:
    groups: list[tuple[list[int], bool]]  # listening fds per address in slot order; shared (activated)?
    metrics: int | None
    ready: int
    pidfile: int | None
    stats: int  # the old master's statistics table, so that no counter restarts from zero


def take(environ: MutableMapping[str, str]) -> Inherited | None:
    """The sockets our parent master handed us, if this process is its successor."""
    text = environ.pop(ENV, "")
    if not text:
        return None
    data = json.loads(text)
    if data["parent"] != os.getppid():  # a stale variable, not meant for us
        return None
    return Inherited(
        groups=[(fds, shared) for fds, shared in data["groups"]],
        metrics=data["metrics"],
        ready=data["ready"],
        pidfile=data["pidfile"],
        stats=data["stats"],
    )


def successor_args(argv: list[str]) -> list[str]:
    """Our own command line, as `run`: the successor is already detached if we were."""
    args = list(argv)
    if args and args[0] == "start":
        args[0] = "run"
    return args


def spawn(
    groups: list[tuple[list[socket.socket], bool]],
    metrics_sock: socket.socket | None,
    pidfile_fd: int | None,
    stats_fd: int,
) -> tuple[int, int]:
    """Start the successor; returns (its pid, read end of its readiness pipe)."""
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    metrics_fd = metrics_sock.fileno() if metrics_sock is not None else None
    description = {
        "parent": os.getpid(),
        "groups": [([sock.fileno() for sock in socks], shared) for socks, shared in groups],
        "metrics": metrics_fd,
        "ready": ready_w,
        "pidfile": pidfile_fd,
        "stats": stats_fd,
    }
    fds = [fd for socks, _ in groups for fd in (sock.fileno() for sock in socks)] + [ready_w, stats_fd]
    fds += [fd for fd in (metrics_fd, pidfile_fd) if fd is not None]
    argv = [sys.executable, "-m", "echod", *successor_args(sys.argv[1:])]
    try:
        proc = subprocess.Popen(argv, pass_fds=fds, env={**os.environ, ENV: json.dumps(description)})
    finally:
        os.close(ready_w)
    os.set_blocking(ready_r, False)
    return proc.pid, ready_r


def report_ready(fd: int, worker_pids: list[int]) -> None:
    """Successor side: tell the old master we accept, and which workers took over which slot."""
    try:
        os.write(fd, ("ready " + " ".join(map(str, worker_pids)) + "\n").encode())
        os.close(fd)
    except OSError:
        pass
