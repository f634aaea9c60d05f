"""The worker's per-fd table and the bookkeeping every connection shares: adopt, close, count.

`table[fd]` is the state of descriptor `fd`, and its type routes the event (nginx's connection carries
its own handlers the same way):

- `None`: a plain connection whose echo went out whole. It has no object at all; the loop's fast path
  (worker/loop.py) reads and writes it as a bare file descriptor.
- a `Handler`: anything else (a connection with pending output, a listener, the signal pipe, a
  handover channel, a connection awaiting its PROXY header), whose `on_event` handles the event.
- `CLOSED`: nothing open on this fd any more; an event still queued for it in this turn is ignored.

`table`, `last` and `spliced` are only ever changed in place: the fast path binds them once.
"""

from __future__ import annotations

import logging
import os
import select
from array import array
from collections.abc import Callable
from time import monotonic
from typing import Final, Protocol

from .. import stats
from ..idle import IdleWheel
from .output import Conn
from .peers import Peers

log: Final = logging.getLogger("echod.worker")

# Final (here and for what close and adopt use below): compiled, each is a C static rather than a
# dict lookup per use, and stats' field numbers are inlined.
EPOLLIN: Final = select.EPOLLIN
EPOLLOUT: Final = select.EPOLLOUT
EPOLLERR: Final = select.EPOLLERR
EPOLLHUP: Final = select.EPOLLHUP
EPOLLRDHUP: Final = select.EPOLLRDHUP
READING: Final = EPOLLIN | EPOLLRDHUP
INITIAL_FDS: Final = 1024
_CLOSE_REASONS: Final = stats.CLOSE_REASONS
_close_fd: Final = os.close
_monotonic: Final = monotonic


class Handler(Protocol):
    """The state of a descriptor that is not a plain connection: it handles its own events."""

    def on_event(self, fd: int, ev: int) -> None: ...


class Closed:
    """No connection on this fd."""

    __slots__ = ()

    def on_event(self, fd: int, ev: int) -> None:
        pass


CLOSED: Final = Closed()


class Owing:
    """Base of a state other than `Conn` that holds pending output `close` must account for: a TLS
    connection (worker/tls.py). len() = its bytes in `Core.buffered`; release() = it is closed."""

    __slots__ = ()

    def __len__(self) -> int:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError


class Core:
    """The table and the counts; every part of the worker holds this one object."""

    def __init__(self, epoll: select.epoll, read_size: int, budget: int, peers: Peers) -> None:
        self.ep = epoll
        self.read_size = read_size
        self.budget = budget  # max_buffered_bytes: all connections' pending output; 0 = no limit
        self.peers = peers
        self.table: list[Handler | None] = [CLOSED] * INITIAL_FDS
        self.last: list[int] = [0] * INITIAL_FDS  # tick of each connection's last traffic
        # Splice (io_mode splice/auto): fd -> echoed through a pipe now; never set in copy mode.
        self.splice_first = False
        self.spliced: list[bool] = [False] * INITIAL_FDS
        # Per connection, for its close (worker/insight.py): when it was adopted (an array: no float
        # object per connection), and, only while the access log is on (keep_peers), the client's
        # address from accept or a PROXY header and its listener's text (None and "": ask the socket).
        self.born = array("d", bytes(8 * INITIAL_FDS))
        self.keep_peers = False  # see keep_addresses; until then peer and via stay empty
        self.peer: list[tuple[str, int] | None] = []
        self.via: list[str] = []
        self.header_bytes: dict[int, int] = {}  # fd -> length of its PROXY header (TCP_INFO counts it)
        self.closing: Callable[[int, str], None] = _nothing  # sees every connection just before close
        self.fin_in = -1  # during its close: the fd whose failing read found the client's FIN (fail)
        self.counts = [0] * stats.COUNTERS
        self.tick = 0  # whole seconds of CLOCK_MONOTONIC, as of this loop turn
        self.turn = 0  # loop turns so far
        self.open = 0  # client connections
        self.buffered = 0  # bytes of pending output, all connections
        self.wheel: IdleWheel | None = None

    def grow(self, fd: int) -> None:
        if fd >= len(self.table):
            extra = max(fd + 1, 2 * len(self.table)) - len(self.table)
            self.table.extend([CLOSED] * extra)
            self.last.extend([0] * extra)
            self.spliced.extend([self.splice_first] * extra)
            self.born.frombytes(bytes(8 * extra))
            if self.keep_peers:
                self.peer.extend([None] * extra)
                self.via.extend([""] * extra)

    def keep_addresses(self) -> None:
        """Keep each connection's client address and listener from now on (the access log is on)."""
        self.keep_peers = True
        self.peer[:] = [None] * len(self.table)
        self.via[:] = [""] * len(self.table)

    def watch(self, fd: int, state: Handler, events: int = EPOLLIN) -> None:
        """Register a descriptor that is not a client connection (listener, pipe, channel)."""
        self.grow(fd)
        self.table[fd] = state
        self.ep.register(fd, events)

    def adopt(self, fd: int) -> None:
        """Serve a connection: a fresh one from accept, or an established one handed to us."""
        self.grow(fd)
        self.table[fd] = None
        self.last[fd] = self.tick
        self.spliced[fd] = self.splice_first
        self.born[fd] = _monotonic()
        if self.keep_peers:
            self.peer[fd] = None
            self.via[fd] = ""
        self.ep.register(fd, READING)
        if self.wheel is not None:
            self.wheel.add(fd, self.tick)
        self.open += 1

    def over_budget(self) -> bool:
        return 0 < self.budget < self.buffered

    def release(self, fd: int) -> None:
        """Forget `fd` (closed, or handed over): the table, the idle wheel and its client address."""
        self.table[fd] = CLOSED
        if self.wheel is not None:
            self.wheel.remove(fd)
        self.peers.forget(fd)
        if self.header_bytes:
            self.header_bytes.pop(fd, None)

    def _drop(self, pending: int) -> None:
        """Pending output lost with its connection."""
        if pending:
            self.buffered -= pending
            self.counts[stats.DROPPED_BYTES] += pending

    def close(self, fd: int, reason: str, error: OSError | None = None) -> None:
        state = self.table[fd]
        # Two tests, not isinstance(state, (Conn, Owing)): mypyc narrowed that union to Conn and the
        # compiled worker died with "Conn object expected; got TlsConn" (tests/test_tls.py).
        if isinstance(state, Conn):  # noqa: SIM114 (see above)
            self._drop(len(state))
            state.release()
        elif isinstance(state, Owing):
            self._drop(len(state))
            state.release()
        self.closing(fd, reason)
        self.release(fd)
        _close_fd(fd)  # also removes it from the epoll set: nothing else holds this file
        self.open -= 1
        self.counts[_CLOSE_REASONS[reason]] += 1
        if error is not None and log.isEnabledFor(logging.DEBUG):
            log.debug("connection closed on error: %s", error.strerror or error)

    def fail(self, fd: int) -> None:
        """EPOLLERR: the next read reports the real error (ECONNRESET, ETIMEDOUT...), as asyncio does.

        A read that returns the client's FIN instead (a reset came right behind it, before we read)
        tells the close's observer so: the kernel counted the FIN in TCP_INFO's bytes received, and the
        reset left no state that says so (worker/insight.py)."""
        error: OSError | None = None
        try:
            if not os.read(fd, 1):
                self.fin_in = fd
        except OSError as exc:
            error = exc
        self.close(fd, "error", error)
        self.fin_in = -1


def _nothing(fd: int, reason: str) -> None:
    pass
