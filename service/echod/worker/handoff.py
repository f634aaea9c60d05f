"""Live handover, the worker's side: pass established connections to a successor, take them in.

The wire format and the sockets are handover.py's. A retiring worker connects to the successor the
master names in its statistics row (HANDOVER_PID) and sends every plain connection at once; one with
pending output is paused and follows once that output is sent (worker/echo.py), so no byte it has
read is left behind. Whatever a client sends meanwhile waits in the kernel for the successor.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from .. import handover, stats
from .core import EPOLLIN, EPOLLOUT, READING, Core
from .output import Conn

log = logging.getLogger("echod.worker")

EMFILE_PAUSE = 1.0  # seconds the inbox stays unwatched when a channel cannot get a descriptor


class Inbox:
    """Our handover socket: retiring workers connect here to pass connections."""

    __slots__ = ("handoff", "sock")

    def __init__(self, sock: socket.socket, handoff: Handoff) -> None:
        self.sock = sock
        self.handoff = handoff

    def on_event(self, fd: int, ev: int) -> None:
        self.handoff.take_channel(fd, self.sock)


class Channel:
    """One retiring worker's handover connection to us."""

    __slots__ = ("handoff", "sock")

    def __init__(self, sock: socket.socket, handoff: Handoff) -> None:
        self.sock = sock
        self.handoff = handoff

    def on_event(self, fd: int, ev: int) -> None:
        self.handoff.receive(fd, self.sock)


class Handoff:
    def __init__(self, core: Core, row: memoryview) -> None:
        self.core = core
        self.row = row
        self.outbox: socket.socket | None = None  # to the successor, while handing connections over
        self.outbox_pid = 0
        self.inbox_fd = -1
        self.inbox_resume_at = 0.0  # the inbox is unwatched until then (out of descriptors)

    @property
    def active(self) -> bool:
        """Connections are moving to a successor: whatever drains or completes follows them."""
        return self.outbox is not None

    def listen(self) -> None:
        inbox = handover.listen()
        self.core.watch(inbox.fileno(), Inbox(inbox, self))

    # -- receiving ------------------------------------------------------------------------------
    def take_channel(self, fd: int, inbox: socket.socket) -> None:
        try:
            chan = handover.accept(inbox)
        except OSError as exc:
            # Out of descriptors (EMFILE): the channel and the connections in it wait in the kernel
            # until there is room. Unwatch the inbox meanwhile, or level-triggered epoll would spin.
            log.warning("cannot take connections handed over (%s): trying again in %.0f s", exc, EMFILE_PAUSE)
            self.core.ep.unregister(fd)
            self.inbox_resume_at = time.monotonic() + EMFILE_PAUSE
            self.inbox_fd = fd
            return
        if chan is not None:
            self.core.watch(chan.fileno(), Channel(chan, self))

    def resume_inbox(self, now: float) -> None:
        if self.inbox_resume_at and now >= self.inbox_resume_at:
            self.inbox_resume_at = 0.0
            self.core.ep.register(self.inbox_fd, EPOLLIN)

    def receive(self, fd: int, chan: socket.socket) -> None:
        core = self.core
        received = handover.receive(chan)
        if isinstance(received, handover.Truncated):
            log.error("%d connections handed over were lost: out of file descriptors", received.lost)
            core.counts[stats.CLOSED_ERROR] += received.lost
            received = received.kept
        if received is None:
            core.release(fd)
            chan.close()
            return
        for conn, ip in received:
            core.adopt(conn)
            core.peers.adopt(conn, ip)  # counted against its address, never refused: it is established
        if self.outbox is not None:  # we are retiring ourselves: pass them straight on
            self.send_over([conn for conn, _ip in received])

    # -- sending --------------------------------------------------------------------------------
    def keep_going(self) -> None:
        """Retired: (re)connect to the successor the master names now, which may have changed since
        (a later reload retired the first one): nothing may stay behind with a worker that exits."""
        successor = self.row[stats.HANDOVER_PID]
        if successor and successor != self.outbox_pid:
            self._hand_over(successor)

    def _hand_over(self, successor: int) -> None:
        """Pass every connection to `successor`; those with unsent output follow once it is sent."""
        if self.outbox is not None:
            self.outbox.close()
            self.outbox, self.outbox_pid = None, 0
        try:
            self.outbox = handover.connect(successor)
        except OSError as exc:
            log.warning("cannot hand connections over to worker %d (%s): retrying", successor, exc)
            return
        self.outbox_pid = successor
        table = self.core.table
        plain = [fd for fd, state in enumerate(table) if state is None]
        self.send_over(plain)
        if self.outbox is None:  # that failed: keep_going tries again in a second
            return
        for fd, state in enumerate(table):
            if isinstance(state, Conn):
                self.pass_on(fd)
        log.info("handed %d connections over to worker %d", len(plain), successor)

    def pass_on(self, fd: int) -> None:
        """Hand `fd` over now, or once the output it owes is sent (worker/echo.py's flush)."""
        state = self.core.table[fd]
        if state is None:
            self.send_over([fd])
        elif isinstance(state, Conn) and not state.eof:
            state.paused = True  # read nothing more: what the client sends now is the successor's
            self.core.ep.modify(fd, EPOLLOUT)

    def send_over(self, fds: list[int]) -> None:
        core = self.core
        for fd in fds:
            core.ep.unregister(fd)  # from here on the bytes the client sends wait for the successor
        outbox = self.outbox
        assert outbox is not None, "send_over is only called while handing over"
        try:
            handover.send(outbox, fds, [core.peers.header_address(fd) for fd in fds])
        except OSError as exc:
            sent = exc.sent if isinstance(exc, handover.PartialHandover) else 0
            log.warning("handover failed (%s): serving %d connections here for now", exc, len(fds) - sent)
            outbox.close()
            self.outbox, self.outbox_pid = None, 0
            for fd in fds[sent:]:
                core.ep.register(fd, READING)
            fds = fds[:sent]  # those are the successor's already
        for fd in fds:
            core.release(fd)
            os.close(fd)  # the successor holds its own descriptor for the same socket
        core.open -= len(fds)
        core.counts[stats.HANDED_OVER] += len(fds)
