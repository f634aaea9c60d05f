"""The master process: its main loop, the signals it handles, and its own lifecycle.

The work is done by its parts, each built by startup.py and handed in: `Supervisor` (supervisor.py) keeps
one worker per slot, `Reloader` (reload.py) runs reloads and scaling, `Upgrader` (upgrade.py) the
in-place upgrade, `MetricsProcess` and `SignalQueue` (process.py) the metrics child and the signals.

Signals are queued by their handlers and handled here, in the loop, through `handlers`: one
`handle_<name>` method per signal (see process.py for why nothing runs inside a handler). Once the master
is stopping, only TERM, INT and QUIT are handled.

The master's state is held by whoever owns it, not in one set of flags: `ready` and `stopping` here, the
reload still starting in `Reloader.started`, the new master starting (or taken over) in
`Upgrader.successor`. A reload and an upgrade may overlap (HUP during USR2 and the reverse), which is why
they are not one enum.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import build, logs, notify
from .process import KILL_GRACE, Fork, MetricsProcess, SignalQueue, describe, reap_children, set_process_name
from .reload import Reloader
from .supervisor import Supervisor
from .upgrade import Upgrader
from .worker import FLUSH_GRACE

log = logging.getLogger("echod.master")

STOP_SIGNALS = frozenset((signal.SIGTERM, signal.SIGINT, signal.SIGQUIT))


@dataclass
class Stopping:
    """The master stops (TERM, INT, QUIT) or leaves the service to a new master (SIGUSR2): no worker is
    replaced any more, and no signal but TERM, INT and QUIT is handled."""

    deadline: float  # when the workers still running get SIGKILL (then again every KILL_GRACE)


class Master:
    """Runs the loop: handle the queued signals, reap, supervise (or see a stop through), sleep."""

    def __init__(
        self,
        *,
        signals: SignalQueue,
        fork: Fork,
        supervisor: Supervisor,
        reloader: Reloader,
        upgrader: Upgrader,
        metrics: MetricsProcess,
        watchdog_every: float | None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.signals = signals
        self.fork = fork
        self.supervisor = supervisor
        self.listeners = supervisor.listeners
        self.reloader = reloader
        self.upgrader = upgrader
        self.metrics = metrics
        self.on_ready = on_ready  # `echod start`'s launcher waits for this (daemon.py)
        self.pid = supervisor.master_pid
        self.ready = False  # every worker of the first generation accepted (sd_notify READY=1 sent)
        self.stopping: Stopping | None = None
        self.watchdog_every = watchdog_every
        self.next_watchdog = 0.0
        self.handlers: dict[int, Callable[[], None]] = {
            signal.SIGTERM: self.handle_term,
            signal.SIGINT: self.handle_int,
            signal.SIGQUIT: self.handle_quit,
            signal.SIGHUP: self.handle_hup,
            signal.SIGUSR1: self.handle_usr1,
            signal.SIGUSR2: self.handle_usr2,
            signal.SIGTTIN: self.handle_ttin,
            signal.SIGTTOU: self.handle_ttou,
            signal.SIGCHLD: self.handle_chld,
        }

    # -- main loop ------------------------------------------------------------------------------
    def run(self) -> int:
        if os.getpid() != self.pid:  # workers would watch for the wrong parent
            raise RuntimeError("the master must run in the process that built it (after daemonizing)")
        set_process_name("echod-master")
        self.signals.install()
        self.supervisor.publish()
        self.metrics.start(self.fork, self.supervisor.settings.heartbeat_timeout)
        self.listeners.steer(self.supervisor.wanted)
        log.info(
            "echod %s starting: listen %s, %d workers, metrics %s",
            build.describe(),
            ", ".join(str(self.listeners.bound_address(a)) for a in self.listeners.addresses),
            self.supervisor.wanted,
            self.supervisor.settings.metrics.listen or "off",
        )
        while True:
            if self.signals.pending:
                self._handle_signals()
            self._reap()
            if self.stopping is not None:
                if not self.supervisor.workers:
                    break
                self._escalate_stop(self.stopping)
            else:
                self._supervise()
            self._ping_watchdog()
            busy = self.reloader.in_progress or self.upgrader.successor is not None or not self.ready
            self.signals.wait(0.05 if busy else 1.0)
        self.metrics.stop()
        self.upgrader.pidfile.release(self.supervisor.settings.daemon.pidfile)
        notify.status("stopped")
        log.info("echod stopped")
        return 0

    def _ping_watchdog(self) -> None:
        # From the master's own loop, so it proves the loop turns (a side thread would not).
        now = time.monotonic()
        if self.watchdog_every and now >= self.next_watchdog:
            notify.watchdog()
            self.next_watchdog = now + self.watchdog_every

    def _reap(self) -> None:
        for pid, status in reap_children():
            if self.metrics.exited(pid):
                if self.stopping is None:
                    log.error("metrics process %d exited (%s); restarting it", pid, describe(status))
                    self.metrics.start(self.fork, self.supervisor.settings.heartbeat_timeout)
                continue
            self.supervisor.exited(pid, status, stopping=self.stopping is not None)

    def _supervise(self) -> None:
        sup, now = self.supervisor, time.monotonic()
        for slot in sup.vacant_slots(now):
            sup.spawn(slot)
        sup.check_heartbeats()
        self.upgrader.check_predecessor()
        if not self.reloader.in_progress:
            sup.refresh_handover_targets()
        if self.reloader.in_progress:
            self.reloader.finish(now)
        elif not self.ready and sup.generation_ready():
            self._announce_ready()
        if self.upgrader.successor is not None:
            successors = self.upgrader.poll(now)
            if successors is not None:
                self._hand_over(successors)
        sup.kill_overdue(now)
        sup.publish()

    def _announce_ready(self) -> None:
        self.ready = True
        log.info("ready: %d workers accepting", self.supervisor.wanted)
        notify.ready(self.supervisor.status_line())
        self.upgrader.announce_ready(self.pid, self.supervisor.current_pids())
        if self.on_ready is not None:
            self.on_ready()

    # -- signals --------------------------------------------------------------------------------
    def _handle_signals(self) -> None:
        while self.signals.pending:
            signum = self.signals.pending.pop(0)
            if signum != signal.SIGCHLD:  # SIGCHLD only wakes the loop: it reaps on every turn
                log.debug("signal %s", signal.Signals(signum).name)
            if self.stopping is not None and signum not in STOP_SIGNALS:
                continue
            self.handlers[signum]()

    def handle_term(self) -> None:
        self._begin_stop(fast=False)

    def handle_int(self) -> None:
        self._begin_stop(fast=True)

    def handle_quit(self) -> None:
        self._begin_stop(fast=True)

    def handle_hup(self) -> None:
        self.reloader.reload()

    def handle_usr1(self) -> None:
        if logs.reopen():
            log.info("log file reopened")
        self.supervisor.signal_all(signal.SIGUSR1)

    def handle_usr2(self) -> None:
        self.upgrader.start(self.metrics.sock)

    def handle_ttin(self) -> None:
        self.reloader.scale(self.supervisor.wanted + 1)

    def handle_ttou(self) -> None:
        self.reloader.scale(self.supervisor.wanted - 1)

    def handle_chld(self) -> None:
        """Nothing to do: the signal woke the loop, which reaps on every turn."""

    # -- stopping -------------------------------------------------------------------------------
    def _begin_stop(self, fast: bool) -> None:
        if self.stopping is not None and not fast:
            return
        if self.upgrader.successor is not None and self.stopping is None:
            self.upgrader.abandon()
        notify.stopping("stopping")
        log.info("%s stop: closing listeners", "fast" if fast else "graceful")
        self.listeners.close()
        grace = FLUSH_GRACE if fast else self.supervisor.settings.shutdown_timeout + FLUSH_GRACE
        self.stopping = Stopping(deadline=time.monotonic() + grace + KILL_GRACE)
        self.supervisor.signal_all(signal.SIGQUIT if fast else signal.SIGTERM)

    def _hand_over(self, successors: list[int]) -> None:
        """Leave the service to the new master: its workers take over our workers' connections."""
        grace = self.supervisor.settings.shutdown_timeout + FLUSH_GRACE
        self.stopping = Stopping(deadline=time.monotonic() + grace + KILL_GRACE)
        self.supervisor.retire_all(successors)

    def _escalate_stop(self, stopping: Stopping) -> None:
        if time.monotonic() >= stopping.deadline:
            self.supervisor.kill_all("still running past the stop deadline")
            stopping.deadline += KILL_GRACE
