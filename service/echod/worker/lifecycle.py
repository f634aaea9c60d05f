r"""The worker's lifecycle as one explicit phase, advanced in one place (`Lifecycle.advance`).

    ACCEPTING --USR2--> RETIRING --(1 s)--> DRAINING --(open == 0)----------------> DONE
        |                   |                  |  \--(shutdown_timeout)--> CLOSING --(open == 0,
        +------TERM---------+------------------+                            |       or FLUSH_GRACE)--> DONE
        +------INT/QUIT, master gone ----------+----------------------------+

- ACCEPTING: serving and accepting.
- RETIRING (USR2: a reload or fewer workers): the master has already steered new connections away
  from our sockets; we keep accepting RETIRE_ACCEPT_GRACE longer, so that handshakes still in flight to
  them are served instead of reset when our copy of the socket closes.
- DRAINING: listeners closed; connections are handed to the successor the master names (if any), the
  rest served until they close or shutdown_timeout passes.
- CLOSING: stop echoing: flush what was read, shut our side, discard until the client's FIN; after
  FLUSH_GRACE whatever is left is closed.
- DONE: the worker exits.
"""

from __future__ import annotations

import enum
from typing import Protocol

FLUSH_GRACE = 3.0  # seconds a stop spends flushing what was read before closing anyway
RETIRE_ACCEPT_GRACE = 1.0  # seconds a retiring worker keeps accepting


class Phase(enum.Enum):
    ACCEPTING = "accepting"
    RETIRING = "retiring"
    DRAINING = "draining"
    CLOSING = "closing"
    DONE = "done"


class Hooks(Protocol):
    """What each phase does on entry; the worker (worker/loop.py) supplies it."""

    def open_connections(self) -> int: ...

    def stop_accepting(self) -> None:
        """Entering DRAINING: close the listeners for good and start handing connections over."""
        ...

    def begin_close(self) -> None:
        """Entering CLOSING."""
        ...

    def close_all(self) -> None:
        """CLOSING ran out of time."""
        ...


class Lifecycle:
    def __init__(self, hooks: Hooks, shutdown_timeout: float) -> None:
        self.hooks = hooks
        self.shutdown_timeout = shutdown_timeout
        self.phase = Phase.ACCEPTING
        self.retire_at: float | None = None  # when accepting stops, once asked
        self.drain_deadline: float | None = None  # when DRAINING gives way to CLOSING
        self.close_asked = False
        self.close_deadline = 0.0

    # -- requests (signals, the master's death): recorded here, carried out by advance() -------------
    def retire(self, now: float) -> None:
        """USR2: accept a little longer, then drain."""
        if self.phase is Phase.ACCEPTING and self.retire_at is None:
            self.retire_at = now + RETIRE_ACCEPT_GRACE
            self._drain_by(now + self.shutdown_timeout)

    def stop(self, now: float) -> None:
        """TERM: stop accepting now, drain until shutdown_timeout."""
        if self.retire_at is None or now < self.retire_at:
            self.retire_at = now
        self._drain_by(now + self.shutdown_timeout)

    def stop_fast(self) -> None:
        """INT or QUIT, or the master is gone: close now, flushing what was read."""
        self.close_asked = True

    def _drain_by(self, deadline: float) -> None:
        if self.drain_deadline is None or deadline < self.drain_deadline:
            self.drain_deadline = deadline

    @property
    def accepting(self) -> bool:
        """Still taking connections: the master counts the worker as ready."""
        return self.phase is Phase.ACCEPTING and self.retire_at is None

    # -- the one place the phase changes ----------------------------------------------------------
    def advance(self, now: float) -> Phase:
        hooks = self.hooks
        if self.phase is Phase.ACCEPTING and (self.retire_at is not None or self.close_asked):
            self.phase = Phase.RETIRING
        if self.phase is Phase.RETIRING and (
            self.close_asked or (self.retire_at is not None and now >= self.retire_at)
        ):
            self.phase = Phase.DRAINING
            hooks.stop_accepting()
        if self.phase is Phase.DRAINING:
            if hooks.open_connections() == 0:
                self.phase = Phase.DONE
            elif self.close_asked or (self.drain_deadline is not None and now >= self.drain_deadline):
                self.phase = Phase.CLOSING
                self.close_deadline = now + FLUSH_GRACE
                hooks.begin_close()
        if self.phase is Phase.CLOSING:
            if hooks.open_connections() == 0:
                self.phase = Phase.DONE
            elif now >= self.close_deadline:
                hooks.close_all()
                self.phase = Phase.DONE
        return self.phase
