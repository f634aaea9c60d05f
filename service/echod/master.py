"""The master process: owns the listening sockets, forks and supervises workers, handles signals.

Signal handlers only queue the signal number; `signal.set_wakeup_fd` makes the master's wait return,
and the main loop handles the queue (gunicorn's arbiter does the same), so nothing that logs, forks or
reaps ever runs inside a handler.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import logs, notify, stats, upgrade
from .config import MAX_WORKERS, ConfigError, Settings
from .listeners import Address, BindError, ListenerSet, bind_socket, parse_address
from .stats import Stats
from .worker import FLUSH_GRACE, run_worker

log = logging.getLogger("echod.master")

HANDLED_SIGNALS = (
    signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
    signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD,
)  # fmt: skip
QUICK_DEATH = 2.0  # a worker that dies younger than this counts towards crash-loop backoff
MAX_BACKOFF = 30.0
PR_SET_NAME = 15  # prctl(2)
KILL_GRACE = 5.0  # seconds past a stop's own deadline before stragglers get SIGKILL
READY_TIMEOUT = 30.0  # seconds a new generation has to start accepting during a reload


@dataclass
class WorkerProc:
    pid: int
    slot: int
    generation: int
    row: int
    started: float
    retiring: bool = False
    kill_at: float | None = None  # when a retiring worker gets SIGKILL
    killed: bool = False


class Master:
    def __init__(
        self,
        settings: Settings,
        load: Callable[[], Settings],
        listeners: ListenerSet,
        metrics_sock: socket.socket | None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.load = load
        self.listeners = listeners
        self.metrics_sock = metrics_sock
        self.on_ready = on_ready
        self.pid = os.getpid()
        self.stats = Stats(worker_rows=2 * MAX_WORKERS + 8)
        # Imported here, before privileges are dropped (the new user may not read the install), and
        # only if needed: workers never carry prometheus_client.
        self._metrics = importlib.import_module(".metrics", __package__) if metrics_sock else None
        self.generation = 1
        self.wanted = settings.worker_count
        self.workers: dict[int, WorkerProc] = {}  # pid -> worker, every generation
        self.metrics_pid = 0
        self.queue: list[int] = []
        self.backoff: dict[int, tuple[int, float]] = {}  # slot -> (quick deaths, earliest restart)
        self.stopping = False
        self.stop_deadline = 0.0
        self.ready = False
        self.reload_started: float | None = None
        self.pending_close: set[Address] = set()  # addresses to close once a reload completes
        self.predecessor_ready_fd: int | None = None  # set when we are an in-place upgrade
        self.pidfile_fd: int | None = None  # the locked pidfile, handed on by an upgrade
        self.pidfile_inherited = False  # from the master we upgraded: ours to remove at exit
        self.successor: Successor | None = None
        self.predecessor_pid = 0  # the master we upgraded from, until it has exited
        self.watchdog_every = notify.watchdog_interval()
        self.next_watchdog = 0.0

    # -- main loop ------------------------------------------------------------------------------
    def run(self) -> int:
        self.pid = os.getpid()  # daemonizing forks between __init__ and here
        set_process_name("echod-master")
        self._install_signals()
        self._publish_state()
        self._start_metrics()
        self.listeners.steer(self.wanted)
        log.info(
            "echod starting: listen %s, %d workers, metrics %s",
            ", ".join(str(self.listeners.bound_address(a)) for a in self.listeners.addresses),
            self.wanted,
            self.settings.metrics.listen or "off",
        )
        while True:
            if self.queue:
                self._handle_signals()
            self._reap()
            if self.stopping:
                if not self.workers:
                    break
                self._escalate_stop()
            else:
                self._supervise()
            self._ping_watchdog()
            busy = self.reload_started is not None or self.successor is not None or not self.ready
            self._wait(0.05 if busy else 1.0)
        self._stop_metrics()
        self._release_inherited_pidfile()
        notify.status("stopped")
        log.info("echod stopped")
        return 0

    def _release_inherited_pidfile(self) -> None:
        """An upgraded master took the pidfile over from `echod start`: remove it as that would have."""
        if not self.pidfile_inherited or self.pidfile_fd is None:
            return
        path = self.settings.daemon.pidfile
        try:
            if os.path.samestat(os.fstat(self.pidfile_fd), os.stat(path)):
                os.unlink(path)
        except OSError:
            pass
        os.close(self.pidfile_fd)
        self.pidfile_fd = None

    def _ping_watchdog(self) -> None:
        # From the master's own loop, so it proves the loop turns (a side thread would not).
        now = time.monotonic()
        if self.watchdog_every and now >= self.next_watchdog:
            notify.watchdog()
            self.next_watchdog = now + self.watchdog_every

    def _wait(self, timeout: float) -> None:
        if self.queue:
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

    def _install_signals(self) -> None:
        self.wakeup_r, self.wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wakeup_w)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, self._enqueue)

    def _enqueue(self, signum: int, _frame: object) -> None:
        self.queue.append(signum)

    def _handle_signals(self) -> None:
        while self.queue:
            signum = self.queue.pop(0)
            if signum == signal.SIGCHLD:
                continue  # _reap runs on every turn
            log.debug("signal %s", signal.Signals(signum).name)
            if signum == signal.SIGTERM:
                self._begin_stop(fast=False)
            elif signum in (signal.SIGINT, signal.SIGQUIT):
                self._begin_stop(fast=True)
            elif self.stopping:
                continue
            elif signum == signal.SIGHUP:
                self._reload()
            elif signum == signal.SIGUSR1:
                if logs.reopen():
                    log.info("log file reopened")
                self._signal_workers(signal.SIGUSR1)
            elif signum == signal.SIGUSR2:
                self._upgrade()
            elif signum == signal.SIGTTIN:
                self._scale(self.wanted + 1)
            elif signum == signal.SIGTTOU:
                self._scale(self.wanted - 1)

    # -- workers --------------------------------------------------------------------------------
    def _spawn(self, slot: int) -> None:
        listeners = self.listeners.slot(slot, skip=self.pending_close)
        proxied = frozenset(self.listeners.filenos_of(self.settings.proxy_addresses()))
        row = self.stats.claim_row(0, slot, self.generation)
        pid = self._fork(
            lambda: run_worker(self.settings, listeners, self.stats.row(row), self.pid, proxied),
            keep=listeners,
            name=f"echod-worker-{slot}",
        )
        self.stats.row(row)[stats.PID] = pid
        self.workers[pid] = WorkerProc(pid, slot, self.generation, row, time.monotonic())
        log.debug("worker %d started in slot %d (generation %d)", pid, slot, self.generation)

    def _fork(self, body: Callable[[], int], keep: list[socket.socket], name: str) -> int:
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
        signal.set_wakeup_fd(-1)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        os.close(self.wakeup_r)
        os.close(self.wakeup_w)
        kept = {sock.fileno() for sock in keep}
        for fd in self.listeners.filenos() - kept:
            os.close(fd)
        if self.metrics_sock is not None and self.metrics_sock.fileno() not in kept:
            os.close(self.metrics_sock.fileno())

    def _supervise(self) -> None:
        now = time.monotonic()
        # A retiring worker no longer fills its slot: after TTOU then TTIN the slot needs a new one.
        current = {
            w.slot for w in self.workers.values() if w.generation == self.generation and not w.retiring
        }
        for slot in range(self.wanted):
            if slot not in current and now >= self.backoff.get(slot, (0, 0.0))[1]:
                self._spawn(slot)
        self._check_heartbeats()
        self._check_predecessor()
        if self.reload_started is None:
            self._refresh_handover_targets()
        if self.reload_started is not None:
            self._finish_reload(now)
        elif not self.ready and self._generation_ready():
            self._announce_ready()
        if self.successor is not None:
            self._check_successor(now)
        for worker in self.workers.values():
            if worker.kill_at is not None and now >= worker.kill_at and not worker.killed:
                self._kill(worker, signal.SIGKILL, "did not finish retiring in time")
        self._publish_state()

    def _check_predecessor(self) -> None:
        if self.predecessor_pid and os.getppid() != self.predecessor_pid:
            self.stats.carry_predecessor()  # its rows are final now: they become part of our totals
            log.info("upgrade complete: old master %d has exited", self.predecessor_pid)
            self.predecessor_pid = 0

    def _refresh_handover_targets(self) -> None:
        """Point every retiring worker at the worker that serves its slot now: a later reload may
        have retired the successor it was first given before it got round to the handover."""
        pids = self._current_pids()
        if not pids or not all(pids):
            return
        for worker in self.workers.values():
            if worker.retiring:
                row = self.stats.row(worker.row)
                target = pids[worker.slot % len(pids)]
                if row[stats.HANDOVER_PID] and row[stats.HANDOVER_PID] != target:
                    row[stats.HANDOVER_PID] = target

    def _announce_ready(self) -> None:
        self.ready = True
        log.info("ready: %d workers accepting", self.wanted)
        notify.ready(self._status_line())
        if self.pidfile_fd is not None:  # we took over the pidfile (and its lock) in an upgrade
            os.ftruncate(self.pidfile_fd, 0)
            os.pwrite(self.pidfile_fd, f"{self.pid}\n".encode(), 0)
        if self.predecessor_ready_fd is not None:
            upgrade.report_ready(self.predecessor_ready_fd, self._current_pids())
            self.predecessor_ready_fd = None
        if self.on_ready is not None:
            self.on_ready()

    def _current_pids(self) -> list[int]:
        by_slot = {
            w.slot: w.pid for w in self.workers.values() if w.generation == self.generation and not w.retiring
        }
        return [by_slot.get(slot, 0) for slot in range(self.wanted)]

    def _generation_ready(self) -> bool:
        accepting = sum(
            1
            for w in self.workers.values()
            if w.generation == self.generation
            and not w.retiring
            and self.stats.row(w.row)[stats.STATE] == stats.STATE_ACCEPTING
        )
        return accepting >= self.wanted

    def _check_heartbeats(self) -> None:
        limit_ms = self.settings.heartbeat_timeout * 1000
        now_ms = stats.monotonic_ms()
        for worker in list(self.workers.values()):
            row = self.stats.row(worker.row)
            if now_ms - row[stats.HEARTBEAT_MS] > limit_ms and not worker.killed:
                self._kill(worker, signal.SIGKILL, f"no heartbeat for {self.settings.heartbeat_timeout:g} s")

    def _kill(self, worker: WorkerProc, signum: int, why: str) -> None:
        worker.killed = True
        log.warning("killing worker %d (slot %d): %s", worker.pid, worker.slot, why)
        try:
            os.kill(worker.pid, signum)
        except ProcessLookupError:
            pass

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.metrics_pid:
                self.metrics_pid = 0
                if not self.stopping:
                    log.error("metrics process %d exited (%s); restarting it", pid, _describe(status))
                    self._start_metrics()
                continue
            worker = self.workers.pop(pid, None)
            if worker is not None:
                self._worker_exited(worker, status)
                if not self.stopping:
                    self._close_unused_sockets()

    def _worker_exited(self, worker: WorkerProc, status: int) -> None:
        self.stats.release_row(worker.row)
        expected = worker.retiring or self.stopping
        if expected:
            log.info("worker %d (slot %d) exited: %s", worker.pid, worker.slot, _describe(status))
            return
        log.error("worker %d (slot %d) died: %s; replacing it", worker.pid, worker.slot, _describe(status))
        self.stats.master[stats.M_WORKER_RESTARTS] += 1
        if worker.generation != self.generation or worker.slot >= self.wanted:
            return
        now = time.monotonic()
        deaths, _ = self.backoff.get(worker.slot, (0, 0.0))
        if now - worker.started < QUICK_DEATH:
            deaths += 1
            delay = 0.0 if deaths == 1 else min(MAX_BACKOFF, 0.5 * 2 ** (deaths - 2))
            if delay:
                log.warning("slot %d crash loop: next start in %.1f s", worker.slot, delay)
            self.backoff[worker.slot] = (deaths, now + delay)
        else:
            self.backoff.pop(worker.slot, None)
        if now >= self.backoff.get(worker.slot, (0, 0.0))[1]:
            self._spawn(worker.slot)

    def _signal_workers(self, signum: int) -> None:
        for worker in self.workers.values():
            try:
                os.kill(worker.pid, signum)
            except ProcessLookupError:
                pass

    def _retire(self, worker: WorkerProc, successors: list[int] | None = None) -> None:
        """SIGUSR2: drain the accept queue, hand connections to the successor of the same slot (if
        any), serve the rest until shutdown_timeout, exit."""
        if worker.retiring:
            return
        worker.retiring = True
        pids = successors if successors is not None else self._current_pids()
        if pids:
            self.stats.row(worker.row)[stats.HANDOVER_PID] = pids[worker.slot % len(pids)]
        worker.kill_at = time.monotonic() + self.settings.shutdown_timeout + FLUSH_GRACE + KILL_GRACE
        try:
            os.kill(worker.pid, signal.SIGUSR2)  # retire: drain the accept queue, then finish like TERM
        except ProcessLookupError:
            pass

    # -- scaling and reload ---------------------------------------------------------------------
    def _scale(self, wanted: int) -> None:
        if not 1 <= wanted <= MAX_WORKERS:
            log.warning("worker count stays at %d (limits 1..%d)", self.wanted, MAX_WORKERS)
            return
        log.info("workers: %d -> %d", self.wanted, wanted)
        if wanted > self.wanted:
            try:
                self.listeners.resize(wanted)
            except BindError as exc:
                log.error("cannot add a worker: %s", exc)
                return
        self.wanted = wanted
        self.listeners.steer(wanted)  # before retiring anyone: nothing new may reach their sockets
        for worker in list(self.workers.values()):
            if worker.generation == self.generation and worker.slot >= wanted:
                self._retire(worker)
        self._publish_state()

    def _close_unused_sockets(self) -> None:
        """Close the slot sockets beyond the worker count once no worker accepts on them any more."""
        if not any(w.slot >= self.wanted for w in self.workers.values()):
            self.listeners.shrink(self.wanted)

    def _reload(self) -> None:
        log.info("reloading configuration")
        notify.reloading("reloading")
        if self.reload_started is not None:  # a newer configuration supersedes one still starting
            self._count_reload_success(superseded=True)
        held = set(self.listeners.addresses)
        try:
            new = self.load()
            logs.check_file(new.log.file)
            self._check_proxy_unchanged(new, held)
            addresses = new.all_addresses
            if self.listeners.shared:  # socket-activated: systemd owns the addresses
                addresses = self.listeners.addresses
            self.listeners.open(addresses, max(new.worker_count, self.wanted), active=new.worker_count)
            metrics_sock = self._rebind_metrics(new)
        except Exception as exc:  # whatever went wrong, the running configuration keeps serving
            for address in set(self.listeners.addresses) - held:  # bound for a reload that failed
                self.listeners.close_address(address)
            if not isinstance(exc, (ConfigError, BindError, OSError)):
                log.exception("unexpected error while reloading (please report it)")
            self._reload_failed(str(exc))
            return
        logs.setup(new.log.level, new.log.format, new.log.file)
        self.settings = new
        self.generation += 1
        self.wanted = new.worker_count
        self.reload_started = time.monotonic()
        self.pending_close = (self.pending_close | held) - set(addresses)
        if metrics_sock is not self.metrics_sock:
            self._stop_metrics()
            if self.metrics_sock is not None:
                self.metrics_sock.close()
            self.metrics_sock = metrics_sock
            self._start_metrics()
        for slot in range(self.wanted):
            self._spawn(slot)
        self._publish_state()

    def _check_proxy_unchanged(self, new: Settings, held: set[Address]) -> None:
        """Old and new workers share a kept address's queue for a while: they must read it alike."""
        kept = held & set(new.addresses)
        changed = sorted(str(a) for a in (new.proxy_addresses() ^ self.settings.proxy_addresses()) & kept)
        if changed:
            raise ConfigError(
                f"listeners: proxy_protocol cannot change on a reload for {', '.join(changed)}, which stays"
                " open (old and new workers share its queue); restart echod, or use another address"
            )

    def _count_reload_success(self, superseded: bool = False) -> None:
        self.stats.master[stats.M_RELOAD_SUCCESS] += 1
        self.stats.master[stats.M_LAST_RELOAD_OK] = 1
        if superseded:
            log.info("reload to generation %d superseded by a newer one", self.generation)
        else:
            log.info("reload complete: generation %d, %d workers", self.generation, self.wanted)

    def _reload_failed(self, why: str) -> None:
        log.error("reload failed, keeping the running configuration:\n%s", why)
        self.stats.master[stats.M_RELOAD_FAILURE] += 1
        self.stats.master[stats.M_LAST_RELOAD_OK] = 0
        notify.notify("READY=1", f"STATUS=reload failed; {self._status_line()}")

    def _finish_reload(self, now: float) -> None:
        """Retire the old generation once every new worker accepts (or the new one gave up)."""
        assert self.reload_started is not None
        if not self._generation_ready():
            if now - self.reload_started < READY_TIMEOUT:
                return
            log.error("new workers not ready after %.0f s; retiring the old ones anyway", READY_TIMEOUT)
        self.listeners.steer(self.wanted)
        for worker in list(self.workers.values()):
            if worker.generation != self.generation:
                self._retire(worker)
        for address in self.pending_close:
            self.listeners.close_address(address)
        self.reload_started = None
        self.pending_close = set()
        self._count_reload_success()
        notify.notify("READY=1", f"STATUS={self._status_line()}")

    # -- in-place upgrade -------------------------------------------------------------------------
    def _upgrade(self) -> None:
        self._check_predecessor()
        if self.predecessor_pid:
            log.warning("upgrade refused: the previous upgrade's old master %d is still finishing",
                        self.predecessor_pid)  # fmt: skip
            return
        if self.successor is not None:
            log.warning("upgrade already in progress (new master %d)", self.successor.pid)
            return
        try:
            pid, ready_fd = upgrade.spawn(
                self.listeners.groups(), self.metrics_sock, self.pidfile_fd, self.stats.fd
            )
        except OSError as exc:
            log.error("upgrade failed: cannot start a new master: %s", exc)
            return
        log.info("upgrade: started new master %d", pid)
        self.successor = Successor(pid, ready_fd, time.monotonic() + READY_TIMEOUT)

    def _check_successor(self, now: float) -> None:
        successor = self.successor
        assert successor is not None
        try:
            message = os.read(successor.ready_fd, 4096).decode()
        except BlockingIOError:
            if now > successor.deadline:
                self._upgrade_failed(f"not ready after {READY_TIMEOUT:.0f} s")
            return
        if not message.startswith("ready"):
            self._upgrade_failed("it exited before it was ready")
            return
        os.close(successor.ready_fd)
        log.info("upgrade: new master %d is ready; retiring this one", successor.pid)
        notify.notify(f"MAINPID={successor.pid}", "READY=1", f"STATUS=upgraded to master {successor.pid}")
        self.pidfile_fd = None  # the successor holds the lock now
        pids = [int(pid) for pid in message.split()[1:] if pid.isdigit() and int(pid)]
        self._hand_over(pids)

    def _upgrade_failed(self, why: str) -> None:
        assert self.successor is not None
        log.error("upgrade failed, this master keeps serving: new master %d: %s", self.successor.pid, why)
        self._end_successor()

    def _abandon_upgrade(self) -> None:
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

    def _hand_over(self, successors: list[int]) -> None:
        """Leave the service to the new master: its workers take over our workers' connections."""
        self.stopping = True
        grace = self.settings.shutdown_timeout + FLUSH_GRACE
        self.stop_deadline = time.monotonic() + grace + KILL_GRACE
        for worker in list(self.workers.values()):
            self._retire(worker, successors)

    # -- stopping -------------------------------------------------------------------------------
    def _begin_stop(self, fast: bool) -> None:
        if self.stopping and not fast:
            return
        if self.successor is not None and not self.stopping:
            self._abandon_upgrade()
        self.stopping = True
        notify.stopping("stopping")
        log.info("%s stop: closing listeners", "fast" if fast else "graceful")
        self.listeners.close()
        grace = FLUSH_GRACE if fast else self.settings.shutdown_timeout + FLUSH_GRACE
        self.stop_deadline = time.monotonic() + grace + KILL_GRACE
        self._signal_workers(signal.SIGQUIT if fast else signal.SIGTERM)

    def _escalate_stop(self) -> None:
        if time.monotonic() >= self.stop_deadline:
            for worker in list(self.workers.values()):
                self._kill(worker, signal.SIGKILL, "still running past the stop deadline")
            self.stop_deadline += KILL_GRACE

    # -- metrics --------------------------------------------------------------------------------
    def _rebind_metrics(self, new: Settings) -> socket.socket | None:
        if new.metrics.listen == self.settings.metrics.listen:
            return self.metrics_sock
        return bind_metrics(new.metrics.listen)

    def _start_metrics(self) -> None:
        if self.metrics_sock is None or self.stopping:
            return
        if self._metrics is None:  # metrics switched on by a reload
            self._metrics = importlib.import_module(".metrics", __package__)
        sock, timeout = self.metrics_sock, self.settings.heartbeat_timeout
        self.metrics_pid = self._fork(
            lambda: self._metrics.serve(sock, self.stats, timeout, self.pid),
            keep=[sock],
            name="echod-metrics",
        )

    def _stop_metrics(self) -> None:
        if self.metrics_pid:
            try:
                os.kill(self.metrics_pid, signal.SIGTERM)
                os.waitpid(self.metrics_pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.metrics_pid = 0

    def _publish_state(self) -> None:
        master = self.stats.master
        master[stats.M_GENERATION] = self.generation
        master[stats.M_WORKERS_WANTED] = self.wanted
        master[stats.M_MASTER_PID] = self.pid

    def _status_line(self) -> str:
        return f"generation {self.generation}, {self.wanted} workers"


@dataclass
class Successor:
    pid: int
    ready_fd: int
    deadline: float


def set_process_name(name: str) -> None:
    """Set /proc/self/comm, which ps, top and pkill show: tells master, workers and metrics apart."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def bind_metrics(listen: str) -> socket.socket | None:
    if not listen:
        return None
    return bind_socket(parse_address(listen), backlog=64, reuse_port=False)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"
