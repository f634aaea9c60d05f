"""The per-event path of a worker's loop (worker/loop.py runs it once per turn).

A plain connection (table[fd] is None) is read and echoed right here, as a bare file descriptor; every
other state handles its own event (worker/core.py). This is the code that runs per message: see
bench/README.md for the measurements behind each choice.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import cast

from .. import stats
from .core import EPOLLERR, EPOLLIN, Core
from .echo import Echo

Serve = Callable[[list[tuple[int, int]], int], None]
# What the fast path hands os.read/os.write: Python ints it already has, never re-boxed per call (below).
_Read = Callable[[object, object], bytes]
_Write = Callable[[object, bytes], int]


def fast_path(core: Core, echo: Echo, bulk: int) -> Serve:
    """Build `serve(events, tick)`, which handles one loop turn's events.

    Everything the per-event path touches is bound here once, as a closure cell: no attribute or
    global lookups per event, and no set-up per turn either (a loop turn carries about three events
    under load, and building these locals on every turn cost 470 ns of it; now 180 ns).

    Compiled, an `int` local is a C integer, boxed again into a new Python int whenever it is
    passed to a Python function or stored in a list (any value above 256). So the values the fast
    path passes on stay Python objects: the descriptor as epoll gave it, the read size boxed here
    once, the tick boxed once per turn and stored into `last` as that one object. Re-boxing cost
    an allocation per call and per store (the fd twice per message past fd 256, the size and the
    tick once each), and `last` then held a distinct int per connection, freed on its next store.
    """
    read, write = cast(_Read, os.read), cast(_Write, os.write)
    table, counts = core.table, core.counts
    last = cast("list[object]", core.last)  # holds ints, stored as the boxed tick (see above)
    size: object = core.read_size
    close, fail, eof, buffer = core.close, core.fail, echo.eof, echo.buffer
    splice = echo.splice
    spliced = core.spliced
    IN, ERR = EPOLLIN, EPOLLERR
    RECEIVED, SENT, DROPPED = stats.RECEIVED_BYTES, stats.SENT_BYTES, stats.DROPPED_BYTES

    def serve(events: list[tuple[int, int]], tick: int) -> None:
        """A plain connection takes the fast path; every other state handles its own event."""
        received = sent = 0
        stamp: object = tick
        # The same list, its fds seen as objects (see fast_path); not cast(): interpreted, a call per turn.
        items: list[tuple[object, int]] = events  # type: ignore[assignment]
        for fdo, ev in items:
            # Not cast(int, fdo): interpreted, that is a call per event (65 ns of a 4.4 us message).
            fd: int = fdo  # type: ignore[assignment]  # the same object, unboxed by mypyc
            state = table[fd]
            if state is not None:
                state.on_event(fd, ev)
                continue
            if ev != IN and ev & ERR:  # readable with RDHUP/HUP reads below, and sees the EOF
                fail(fd)
                continue
            if spliced[fd]:
                splice(fd, tick)
                continue
            try:
                data = read(fdo, size)
            except BlockingIOError:
                continue
            except OSError as exc:
                close(fd, "error", exc)
                continue
            if not data:
                eof(fd, None)
                continue
            last[fd] = stamp
            k = len(data)
            received += k
            if k >= bulk:
                spliced[fd] = True
            try:
                n = write(fdo, data)
            except BlockingIOError:
                n = 0
            except OSError as exc:  # reset between the read and the write
                counts[DROPPED] += k
                close(fd, "error", exc)
                continue
            sent += n
            if n != k:
                buffer(fd, data, n)
        counts[RECEIVED] += received
        counts[SENT] += sent

    return serve
