"""Supervision: one worker per slot of the current generation, forked, reaped, replaced, killed if hung.

A slot is a worker's place: worker *i* accepts on socket *i* of every listen address (listeners.py).
Workers of an older generation (before a reload) or beyond the worker count (after TTOU) are *retiring*:
they hand their connections over and exit, and they never fill a slot again.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass

from . import stats
from .config import Settings
from .listeners import Address, ListenerSet
from .process import KILL_GRACE, Fork, describe
from .stats import Stats
from .worker import FLUSH_GRACE, run_worker

log = logging.getLogger("echod.master")  # the master's lines, wherever they are written

QUICK_DEATH = 2.0  # a worker that dies younger than this counts towards crash-loop backoff
MAX_BACKOFF = 30.0


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


@dataclass
class Backoff:
    """A slot whose workers keep dying young: how often in a row, and when it may have the next one."""

    deaths: int
    not_before: float


class Supervisor:
    """The workers of every generation, and what the current generation is: its settings, its number,
    how many slots it has and which addresses (being dropped by a reload) its new workers leave out."""

    def __init__(
        self, settings: Settings, listeners: ListenerSet, table: Stats, fork: Fork, master_pid: int
    ) -> None:
        self.settings = settings
        self.listeners = listeners
        self.stats = table
        self.fork = fork
        self.master_pid = master_pid
        self.generation = 1
        self.wanted = settings.worker_count
        self.dropping: frozenset[Address] = frozenset()  # a reload closes these once it completes
        self.workers: dict[int, WorkerProc] = {}  # pid -> worker, every generation
        self.backoff: dict[int, Backoff] = {}  # slot -> its crash loop

    # -- the current generation ---------------------------------------------------------------
    def begin_generation(self, settings: Settings, dropping: frozenset[Address]) -> None:
        """A reload: from now on new workers run `settings`; the old ones retire once these accept."""
        self.settings = settings
        self.generation += 1
        self.wanted = settings.worker_count
        self.dropping = dropping

    def dropped(self) -> frozenset[Address]:
        """The reload completed: the addresses it dropped are closed now; returns them."""
        dropping, self.dropping = self.dropping, frozenset()
        return dropping

    def spawn_all(self) -> None:
        for slot in range(self.wanted):
            self.spawn(slot)

    def resize(self, wanted: int) -> None:
        """TTIN/TTOU: the slots beyond `wanted` retire their workers (the listeners are steered first)."""
        self.wanted = wanted
        for worker in list(self.workers.values()):
            if worker.generation == self.generation and worker.slot >= wanted:
                self.retire(worker)

    def vacant_slots(self, now: float) -> list[int]:
        """Slots without a worker of the current generation, except those a crash loop holds back."""
        # A retiring worker no longer fills its slot: after TTOU then TTIN the slot needs a new one.
        current = {
            w.slot for w in self.workers.values() if w.generation == self.generation and not w.retiring
        }
        return [
            slot
            for slot in range(self.wanted)
            if slot not in current and (slot not in self.backoff or now >= self.backoff[slot].not_before)
        ]

    def current_pids(self) -> list[int]:
        """The pid serving each slot (0 where none does): whom retiring workers hand over to."""
        by_slot = {
            w.slot: w.pid for w in self.workers.values() if w.generation == self.generation and not w.retiring
        }
        return [by_slot.get(slot, 0) for slot in range(self.wanted)]

    def generation_ready(self) -> bool:
        accepting = sum(
            1
            for w in self.workers.values()
            if w.generation == self.generation
            and not w.retiring
            and self.stats.row(w.row)[stats.STATE] == stats.STATE_ACCEPTING
        )
        return accepting >= self.wanted

    def status_line(self) -> str:
        return f"generation {self.generation}, {self.wanted} workers"

    def publish(self) -> None:
        master = self.stats.master
        master[stats.M_GENERATION] = self.generation
        master[stats.M_WORKERS_WANTED] = self.wanted
        master[stats.M_MASTER_PID] = self.master_pid

    # -- starting and watching workers ----------------------------------------------------------
    def spawn(self, slot: int) -> None:
        listeners = self.listeners.slot(slot, skip=self.dropping)
        proxied = frozenset(self.listeners.filenos_of(self.settings.proxy_addresses()))
        contexts = {  # built when the settings were loaded: a reload re-reads the certificates
            fd: context
            for address, context in self.settings.tls_addresses().items()
            for fd in self.listeners.filenos_of({address})
        }
        row = self.stats.claim_row(0, slot, self.generation)
        settings, master_pid = self.settings, self.master_pid
        pid = self.fork(
            lambda: run_worker(settings, listeners, self.stats.row(row), master_pid, proxied, contexts),
            keep=listeners,
            name=f"echod-worker-{slot}",
        )
        self.stats.row(row)[stats.PID] = pid
        self.workers[pid] = WorkerProc(pid, slot, self.generation, row, time.monotonic())
        log.debug("worker %d started in slot %d (generation %d)", pid, slot, self.generation)

    def check_heartbeats(self) -> None:
        limit_ms = self.settings.heartbeat_timeout * 1000
        now_ms = stats.monotonic_ms()
        for worker in list(self.workers.values()):
            row = self.stats.row(worker.row)
            if now_ms - row[stats.HEARTBEAT_MS] > limit_ms and not worker.killed:
                self.kill(worker, signal.SIGKILL, f"no heartbeat for {self.settings.heartbeat_timeout:g} s")

    def kill_overdue(self, now: float) -> None:
        """SIGKILL for retiring workers still running past their deadline."""
        for worker in self.workers.values():
            if worker.kill_at is not None and now >= worker.kill_at and not worker.killed:
                self.kill(worker, signal.SIGKILL, "did not finish retiring in time")

    def kill(self, worker: WorkerProc, signum: int, why: str) -> None:
        worker.killed = True
        log.warning("killing worker %d (slot %d): %s", worker.pid, worker.slot, why)
        try:
            os.kill(worker.pid, signum)
        except ProcessLookupError:
            pass

    def kill_all(self, why: str) -> None:
        for worker in list(self.workers.values()):
            self.kill(worker, signal.SIGKILL, why)

    def signal_all(self, signum: int) -> None:
        for worker in self.workers.values():
            try:
                os.kill(worker.pid, signum)
            except ProcessLookupError:
                pass

    # -- workers that exit ----------------------------------------------------------------------
    def exited(self, pid: int, status: int, stopping: bool) -> bool:
        """A reaped child: if it was a worker, account for it and replace it where it is missed."""
        worker = self.workers.pop(pid, None)
        if worker is None:
            return False
        self._worker_exited(worker, status, stopping)
        if not stopping:
            self._close_unused_sockets()
        return True

    def _worker_exited(self, worker: WorkerProc, status: int, stopping: bool) -> None:
        self.stats.release_row(worker.row)
        if worker.retiring or stopping:
            log.info("worker %d (slot %d) exited: %s", worker.pid, worker.slot, describe(status))
            return
        log.error("worker %d (slot %d) died: %s; replacing it", worker.pid, worker.slot, describe(status))
        self.stats.master[stats.M_WORKER_RESTARTS] += 1
        if worker.generation != self.generation or worker.slot >= self.wanted:
            return
        now = time.monotonic()
        deaths = self.backoff[worker.slot].deaths if worker.slot in self.backoff else 0
        if now - worker.started < QUICK_DEATH:
            deaths += 1
            delay = 0.0 if deaths == 1 else min(MAX_BACKOFF, 0.5 * 2 ** (deaths - 2))
            if delay:
                log.warning("slot %d crash loop: next start in %.1f s", worker.slot, delay)
            self.backoff[worker.slot] = Backoff(deaths, now + delay)
        else:
            self.backoff.pop(worker.slot, None)
        if worker.slot not in self.backoff or now >= self.backoff[worker.slot].not_before:
            self.spawn(worker.slot)

    def _close_unused_sockets(self) -> None:
        """Close the slot sockets beyond the worker count once no worker accepts on them any more."""
        if not any(w.slot >= self.wanted for w in self.workers.values()):
            self.listeners.shrink(self.wanted)

    # -- retiring -------------------------------------------------------------------------------
    def retire(self, worker: WorkerProc, successors: list[int] | None = None) -> None:
        """SIGUSR2: drain the accept queue, hand connections to the successor of the same slot (if
        any), serve the rest until shutdown_timeout, exit."""
        if worker.retiring:
            return
        worker.retiring = True
        pids = successors if successors is not None else self.current_pids()
        if pids:
            self.stats.row(worker.row)[stats.HANDOVER_PID] = pids[worker.slot % len(pids)]
        worker.kill_at = time.monotonic() + self.settings.shutdown_timeout + FLUSH_GRACE + KILL_GRACE
        try:
            os.kill(worker.pid, signal.SIGUSR2)  # retire: drain the accept queue, then finish like TERM
        except ProcessLookupError:
            pass

    def retire_old_generations(self) -> None:
        for worker in list(self.workers.values()):
            if worker.generation != self.generation:
                self.retire(worker)

    def retire_all(self, successors: list[int]) -> None:
        """An upgrade: every worker hands over to the new master's worker of its slot."""
        for worker in list(self.workers.values()):
            self.retire(worker, successors)

    def refresh_handover_targets(self) -> None:
        """Point every retiring worker at the worker that serves its slot now: a later reload may
        have retired the successor it was first given before it got round to the handover."""
        pids = self.current_pids()
        if not pids or not all(pids):
            return
        for worker in self.workers.values():
            if worker.retiring:
                row = self.stats.row(worker.row)
                target = pids[worker.slot % len(pids)]
                if row[stats.HANDOVER_PID] and row[stats.HANDOVER_PID] != target:
                    row[stats.HANDOVER_PID] = target
