"""What the master's parts share about processes: the signal queue, forking a child, the metrics child.

Signal handlers only queue the signal number; `signal.set_wakeup_fd` makes the master's wait return,
and the main loop handles the queue (gunicorn's arbiter does the same), so nothing that logs, forks or
reaps ever runs inside a handler.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import socket
from collections.abc import Callable, Iterator
from typing import Protocol

from .listeners import ListenerSet, bind_socket, parse_address
from .stats import Stats

# Every part of the master logs as the master: operators and tests grep `echod.master[PID]: ...`.
log = logging.getLogger("echod.master")

HANDLED_SIGNALS = (
    signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
    signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD,
)  # fmt: skip
PR_SET_NAME = 15  # prctl(2)
KILL_GRACE = 5.0  # seconds past a stop's own deadline before stragglers get SIGKILL
READY_TIMEOUT = 30.0  # seconds a new generation (reload) or a new master (upgrade) has to start accepting


class Fork(Protocol):
    """Start `body` in a child process named `name` that keeps only the sockets `keep`; its pid."""

    def __call__(self, body: Callable[[], int], keep: list[socket.socket], name: str) -> int: ...


class SignalQueue:
    """The signals the master was sent and not yet handled, oldest first, and the pipe that wakes it."""

    def __init__(self) -> None:
        self.pending: list[int] = []
        self.wakeup_r, self.wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def install(self) -> None:
        signal.set_wakeup_fd(self.wakeup_w)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, self._enqueue)

    def _enqueue(self, signum: int, _frame: object) -> None:
        self.pending.append(signum)

    def wait(self, timeout: float) -> None:
        """Until a signal arrives or `timeout` passes (at once if one is already queued)."""
        if self.pending:
            return
        try:
            ready, _, _ = select.select([self.wakeup_r], [], [], timeout)
        except InterruptedError:
            return
        if ready:
            try:
                while os.read(self.wakeup_r, 512):
                    pass
            except BlockingIOError:
                pass

    def forget_in_child(self) -> None:
        """A forked child must not run the master's handlers nor hold its wakeup pipe."""
        signal.set_wakeup_fd(-1)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        os.close(self.wakeup_r)
        os.close(self.wakeup_w)


class Forker:
    """Forks the master's children (workers, the metrics process) so that each holds only its sockets."""

    def __init__(self, signals: SignalQueue, listeners: ListenerSet, metrics: MetricsProcess) -> None:
        self.signals = signals
        self.listeners = listeners
        self.metrics = metrics

    def fork(self, body: Callable[[], int], keep: list[socket.socket], name: str) -> int:
        # Signals stay blocked across fork so that none reaches the child's copy of our handlers.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            raise
        if pid:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            return pid
        code = 1
        try:
            self._become_child(keep)
            set_process_name(name)
            # The signals stay blocked until the child has its own handlers in place and unblocks
            # them itself: until then their default action would kill it (a USR1 log reopen, say).
            code = body()
        except BaseException:
            log.exception("child process failed")
        finally:
            logging.shutdown()
            os._exit(code)

    def _become_child(self, keep: list[socket.socket]) -> None:
        self.signals.forget_in_child()
        kept = {sock.fileno() for sock in keep}
        for fd in self.listeners.filenos() - kept:
            os.close(fd)
        metrics_sock = self.metrics.sock
        if metrics_sock is not None and metrics_sock.fileno() not in kept:
            os.close(metrics_sock.fileno())


MetricsServe = Callable[[socket.socket, Stats, float, int], int]


class MetricsProcess:
    """The child that serves /metrics from the shared statistics table, restarted if it dies."""

    def __init__(self, sock: socket.socket | None, stats: Stats, master_pid: int) -> None:
        self.sock = sock
        self.stats = stats
        self.master_pid = master_pid
        self.pid = 0
        # Imported here, before privileges are dropped (the new user may not read the install), and
        # only if needed: workers never carry prometheus_client.
        self._serve = _load_metrics() if sock is not None else None

    def start(self, fork: Fork, heartbeat_timeout: float) -> None:
        if self.sock is None:
            return
        if self._serve is None:  # metrics switched on by a reload
            self._serve = _load_metrics()
        serve, sock, table, master_pid = self._serve, self.sock, self.stats, self.master_pid
        self.pid = fork(
            lambda: serve(sock, table, heartbeat_timeout, master_pid), keep=[sock], name="echod-metrics"
        )

    def stop(self) -> None:
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGTERM)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.pid = 0

    def exited(self, pid: int) -> bool:
        """Whether the child reaped as `pid` was this one (it is then forgotten)."""
        if not pid or pid != self.pid:
            return False
        self.pid = 0
        return True

    def rebind(self, old_listen: str, new_listen: str) -> socket.socket | None:
        """The socket for a reloaded `metrics.listen`: ours while the address stays the same."""
        if new_listen == old_listen:
            return self.sock
        return bind_metrics(new_listen)

    def replace(self, sock: socket.socket | None, fork: Fork, heartbeat_timeout: float) -> None:
        """Serve on `sock` from now on (a reload moved or switched the metrics address)."""
        self.stop()
        if self.sock is not None:
            self.sock.close()
        self.sock = sock
        self.start(fork, heartbeat_timeout)


def _load_metrics() -> MetricsServe:
    from . import metrics  # only where it serves: see MetricsProcess.__init__

    return metrics.serve


def bind_metrics(listen: str) -> socket.socket | None:
    if not listen:
        return None
    return bind_socket(parse_address(listen), backlog=64, reuse_port=False)


def reap_children() -> Iterator[tuple[int, int]]:
    """(pid, wait status) of every child that has exited, without blocking."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


def set_process_name(name: str) -> None:
    """Set /proc/self/comm, which ps, top and pkill show: tells master, workers and metrics apart."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"
