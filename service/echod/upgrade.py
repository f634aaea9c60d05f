"""In-place upgrade (SIGUSR2 to the master): re-execute the installed echod, handing it the sockets.

The old master starts a new one with every socket passed on (inherit.py says how), and waits for its
word that its workers accept. Only then does the old master retire its workers and exit; if the new
master fails, the old one never stopped serving. No listening socket is ever closed, so not a single
connection is refused.

Both sides live here: the old master's (`Upgrader.start`, `Upgrader.poll`, handing the pidfile on) and
the new master's (`adopt`, `Predecessor`, writing the pidfile it took over); the wire between them
(the description of what is inherited, starting the new master, the ready/main exchange) is inherit.py.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import dataclass

from . import notify
from .config import Settings
from .inherit import Inherited, acknowledge, exited, report_ready, spawn
from .listeners import Address, ListenerSet, parse_address
from .process import READY_TIMEOUT
from .stats import Stats

log = logging.getLogger("echod.master")  # tests grep `echod.master[PID]: upgrade: started new master N`
startup_log = logging.getLogger("echod")  # what the new master says while it starts (as startup.py)


# -- the new master's side ----------------------------------------------------------------------------
def adopt(inherited: Inherited, listeners: ListenerSet, settings: Settings) -> socket.socket | None:
    """Take over the sockets of the master we are upgrading; returns the metrics socket to keep."""
    wanted = set(settings.all_addresses)
    for fds, shared in inherited.groups:
        socks = [socket.socket(fileno=fd) for fd in fds]
        address = listeners.adopt(socks, shared)
        if not shared and address not in wanted:  # dropped from the configuration meanwhile
            listeners.close_address(address)
    if inherited.metrics is None:
        return None
    sock = socket.socket(fileno=inherited.metrics)
    host, port = sock.getsockname()[:2]
    if settings.metrics.listen and parse_address(settings.metrics.listen) == Address(host, port, sock.family):
        return sock
    sock.close()
    return None


@dataclass
class Predecessor:
    """The master we were started by in an upgrade: it waits for our word, then drains and exits."""

    pid: int
    pidfd: int  # readable once it has exited (it is not our parent: inherit.py)
    ready_fd: int | None  # where it waits for "ready <worker pids>", until we have said it
    running: bool = True  # until it has exited: then its statistics rows are final

    @classmethod
    def adopt(cls, inherited: Inherited, table: Stats) -> Predecessor:
        """The master that started us (inherit.take checked); count its totals as ours while it drains."""
        if not table.adopt_predecessor(inherited.stats):
            startup_log.warning("upgrade: the old master's statistics have another layout; counters restart")
        return cls(inherited.parent, inherited.parent_fd, inherited.ready)

    def has_exited(self) -> bool:
        if self.running and exited(self.pidfd):
            self.running = False
            os.close(self.pidfd)
        return not self.running


class Pidfile:
    """The locked pidfile this master holds, if any: from `echod start` (daemon.py) or taken over from
    the master we upgraded; handed on to our own successor once it is ready."""

    def __init__(self, fd: int | None, inherited: bool) -> None:
        self.fd = fd
        self.inherited = inherited  # from the master we upgraded: ours to remove at exit

    def write_pid(self, pid: int) -> None:
        if self.fd is not None:  # we took over the pidfile (and its lock) in an upgrade
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{pid}\n".encode(), 0)

    def hand_over(self) -> None:
        self.fd = None  # the successor holds the lock now

    def release(self, path: str) -> None:
        """An upgraded master took the pidfile over from `echod start`: remove it as that would have."""
        if not self.inherited or self.fd is None:
            return
        try:
            if os.path.samestat(os.fstat(self.fd), os.stat(path)):
                os.unlink(path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


@dataclass
class Successor:
    """The new master we started; kept once it took over, while our workers hand over to its own."""

    pid: int
    ready_fd: int
    deadline: float


class Upgrader:
    """SIGUSR2 on the old master's side, and what a new master owes the one it replaces."""

    def __init__(
        self, listeners: ListenerSet, table: Stats, pidfile: Pidfile, predecessor: Predecessor | None
    ) -> None:
        self.listeners = listeners
        self.stats = table
        self.pidfile = pidfile
        self.predecessor = predecessor
        self.successor: Successor | None = None

    @property
    def handed_over(self) -> bool:
        """The successor took the service over, and the pidfile with it."""
        return self.successor is not None and self.pidfile.fd is None

    def check_predecessor(self) -> None:
        predecessor = self.predecessor
        if predecessor is not None and predecessor.running and predecessor.has_exited():
            self.stats.carry_predecessor()  # its rows are final now: they become part of our totals
            log.info("upgrade complete: old master %d has exited", predecessor.pid)

    def announce_ready(self, master_pid: int, worker_pids: list[int]) -> None:
        """Our first generation accepts: claim the pidfile, and tell the old master to hand over."""
        self.pidfile.write_pid(master_pid)
        predecessor = self.predecessor
        if predecessor is not None and predecessor.ready_fd is not None:
            report_ready(predecessor.ready_fd, worker_pids)
            predecessor.ready_fd = None

    # -- the old master's side ------------------------------------------------------------------
    def start(self, metrics_sock: socket.socket | None) -> None:
        self.check_predecessor()
        predecessor = self.predecessor
        if predecessor is not None and predecessor.running:
            log.warning("upgrade refused: the previous upgrade's old master %d is still finishing",
                        predecessor.pid)  # fmt: skip
            return
        if self.successor is not None:
            log.warning("upgrade already in progress (new master %d)", self.successor.pid)
            return
        try:
            pid, ready_fd = spawn(self.listeners.groups(), metrics_sock, self.pidfile.fd, self.stats.fd)
        except OSError as exc:
            log.error("upgrade failed: cannot start a new master: %s", exc)
            return
        log.info("upgrade: started new master %d", pid)
        self.successor = Successor(pid, ready_fd, time.monotonic() + READY_TIMEOUT)

    def poll(self, now: float) -> list[int] | None:
        """Once the new master is ready: its worker pids by slot (our workers hand over to them)."""
        successor = self.successor
        assert successor is not None
        try:
            message = os.read(successor.ready_fd, 4096).decode()
        except BlockingIOError:
            if now > successor.deadline:
                self._failed(f"not ready after {READY_TIMEOUT:.0f} s")
            return None
        if not message.startswith("ready"):
            self._failed("it exited before it was ready")
            return None
        log.info("upgrade: new master %d is ready; retiring this one", successor.pid)
        notify.hand_over(successor.pid, f"upgraded to master {successor.pid}")  # then we are silent
        acknowledge(successor.ready_fd)  # the new master may notify systemd now; closes the fd
        self.pidfile.hand_over()
        return [int(pid) for pid in message.split()[1:] if pid.isdigit() and int(pid)]

    def _failed(self, why: str) -> None:
        assert self.successor is not None
        log.error("upgrade failed, this master keeps serving: new master %d: %s", self.successor.pid, why)
        self._end_successor()

    def abandon(self) -> None:
        """A stop while the new master is still starting stops it too: stop means the service. Left
        alone it would come up after we are gone and serve on, an orphan that `echod stop` had already
        reported stopped (our exit removes the pidfile)."""
        assert self.successor is not None
        log.warning("stopping during an upgrade: stopping the new master %d too", self.successor.pid)
        self._end_successor()

    def _end_successor(self) -> None:
        successor = self.successor
        assert successor is not None
        os.close(successor.ready_fd)
        try:
            os.kill(successor.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        self.successor = None
