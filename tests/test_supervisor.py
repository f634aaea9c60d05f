"""Unit tests of the master's supervision (supervisor.py); no daemon is started.

Children are real processes (so that SIGKILL, SIGUSR2 and waitpid act on processes of this test), but
the fork is a fake: it runs a stand-in instead of a worker, which would need listening sockets and take a
while to start. The test reaps each child itself and hands its wait status to the supervisor, as the
master's loop does.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator

import pytest
from echod import stats
from echod.config_load import load_settings
from echod.listeners import ListenerSet
from echod.stats import Stats
from echod.supervisor import MAX_BACKOFF, QUICK_DEATH, Supervisor

CHILD_LIFETIME = 30.0  # a stand-in nobody kills exits by itself after this, should a test fail early


class FakeFork:
    """Stands in for process.Forker.fork: a real child that crashes at once (`crash`) or waits to be
    signalled, never the worker body it is given."""

    def __init__(self) -> None:
        self.crash = False
        self.names: list[str] = []
        self.pids: list[int] = []

    def __call__(self, body: Callable[[], int], keep: list[socket.socket], name: str) -> int:
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            code = 1
            try:
                for signum in (signal.SIGTERM, signal.SIGUSR2, signal.SIGQUIT, signal.SIGINT):
                    signal.signal(signum, signal.SIG_DFL)
                if self.crash:
                    code = 3
                else:
                    time.sleep(CHILD_LIFETIME)
                    code = 0
            finally:
                os._exit(code)
        self.names.append(name)
        self.pids.append(pid)
        return pid


@pytest.fixture
def fork() -> Iterator[FakeFork]:
    fake = FakeFork()
    yield fake
    for pid in fake.pids:  # only children of this test: whatever is left of them
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


@pytest.fixture
def caplog_master(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="echod.master")
    return caplog


def supervisor(fork: FakeFork, workers: int) -> Supervisor:
    settings = load_settings({"workers": workers})
    return Supervisor(settings, ListenerSet(settings.backlog), Stats(worker_rows=16), fork, os.getpid())


def fill(sup: Supervisor, now: float | None = None) -> None:
    """What the master's loop does each turn: a worker for every vacant slot."""
    for slot in sup.vacant_slots(time.monotonic() if now is None else now):
        sup.spawn(slot)


def reap(sup: Supervisor, pid: int, stopping: bool = False) -> int:
    _, status = os.waitpid(pid, 0)
    assert sup.exited(pid, status, stopping)
    return status


def pid_in_slot(sup: Supervisor, slot: int) -> int:
    (pid,) = [w.pid for w in sup.workers.values() if w.slot == slot and not w.retiring]
    return pid


def restarts(sup: Supervisor) -> int:
    return sup.stats.master[stats.M_WORKER_RESTARTS]


def test_every_slot_gets_one_worker(fork: FakeFork) -> None:
    sup = supervisor(fork, workers=2)
    assert sup.vacant_slots(time.monotonic()) == [0, 1]
    fill(sup)
    assert fork.names == ["echod-worker-0", "echod-worker-1"]
    assert sup.vacant_slots(time.monotonic()) == []
    assert sup.current_pids() == fork.pids
    for worker in sup.workers.values():
        row = sup.stats.row(worker.row)
        assert (row[stats.PID], row[stats.SLOT], row[stats.GENERATION]) == (worker.pid, worker.slot, 1)


def test_quick_deaths_back_off_exponentially_up_to_the_cap(
    fork: FakeFork, caplog_master: pytest.LogCaptureFixture
) -> None:
    sup = supervisor(fork, workers=1)
    fork.crash = True
    fill(sup)
    reap(sup, fork.pids[-1])  # the first quick death: replaced at once
    assert len(fork.pids) == 2 and sup.backoff[0].deaths == 1
    assert "crash loop" not in caplog_master.text
    for deaths, delay in [(2, 0.5), (3, 1.0), (4, 2.0), (5, 4.0), (6, 8.0), (7, 16.0), (8, MAX_BACKOFF)]:
        before = time.monotonic()
        reap(sup, fork.pids[-1])
        after = time.monotonic()
        backoff = sup.backoff[0]
        assert backoff.deaths == deaths
        assert before + delay <= backoff.not_before <= after + delay
        assert f"slot 0 crash loop: next start in {delay:.1f} s" in caplog_master.text
        assert not sup.workers, "a slot in backoff got a worker before its time"
        assert sup.vacant_slots(after) == []
        assert sup.vacant_slots(backoff.not_before) == [0]
        fill(sup, now=backoff.not_before)
    assert restarts(sup) == 8
    assert f"worker {fork.pids[0]} (slot 0) died: exit code 3; replacing it" in caplog_master.text


def test_a_worker_that_lived_clears_the_backoff(fork: FakeFork) -> None:
    sup = supervisor(fork, workers=1)
    fork.crash = True
    fill(sup)
    reap(sup, fork.pids[-1])
    reap(sup, fork.pids[-1])
    assert sup.backoff[0].deaths == 2 and not sup.workers
    fork.crash = False
    fill(sup, now=sup.backoff[0].not_before)
    survivor = sup.workers[fork.pids[-1]]
    survivor.started -= QUICK_DEATH  # it served a while before it died
    os.kill(survivor.pid, signal.SIGKILL)
    reap(sup, survivor.pid)
    assert 0 not in sup.backoff
    assert pid_in_slot(sup, 0) == fork.pids[-1] != survivor.pid, "not replaced at once"
    assert restarts(sup) == 3


def test_ttou_retires_the_last_slot_and_ttin_fills_it_anew(
    fork: FakeFork, caplog_master: pytest.LogCaptureFixture
) -> None:
    sup = supervisor(fork, workers=2)
    fill(sup)
    first, second = fork.pids
    sup.resize(1)  # TTOU
    retiring = sup.workers[second]
    assert retiring.retiring and retiring.kill_at is not None
    assert sup.stats.row(retiring.row)[stats.HANDOVER_PID] == first  # slot 1 % 1 worker: slot 0's
    assert sup.vacant_slots(time.monotonic()) == [] and sup.current_pids() == [first]
    sup.resize(2)  # TTIN while the retiring worker still drains: it does not count for its slot
    assert sup.vacant_slots(time.monotonic()) == [1]
    fill(sup)
    third = fork.pids[-1]
    assert sup.current_pids() == [first, third]
    assert os.WTERMSIG(reap(sup, second)) == signal.SIGUSR2  # told to retire (the stand-in just dies)
    assert f"worker {second} (slot 1) exited: killed by SIGUSR2" in caplog_master.text
    assert restarts(sup) == 0 and len(fork.pids) == 3, "a retiring worker's exit was replaced"
    assert sorted(sup.workers) == sorted([first, third])


def test_ttou_retirees_exit_is_no_death(fork: FakeFork) -> None:
    sup = supervisor(fork, workers=3)
    fill(sup)
    sup.resize(1)
    for pid in fork.pids[1:]:
        reap(sup, pid)
    assert sup.current_pids() == fork.pids[:1] and sup.vacant_slots(time.monotonic()) == []
    assert restarts(sup) == 0 and sup.backoff == {}


def test_deaths_outside_the_current_slots_are_counted_not_replaced(fork: FakeFork) -> None:
    sup = supervisor(fork, workers=1)
    fill(sup)
    old = fork.pids[0]
    sup.begin_generation(load_settings({"workers": 1}), frozenset())  # a reload, still starting
    os.kill(old, signal.SIGKILL)
    reap(sup, old)
    assert restarts(sup) == 1 and len(fork.pids) == 1, "a worker of the old generation was replaced"
    assert sup.vacant_slots(time.monotonic()) == [0]  # the reload's own new worker, not a replacement


def test_nothing_is_replaced_while_stopping(fork: FakeFork, caplog_master: pytest.LogCaptureFixture) -> None:
    sup = supervisor(fork, workers=2)
    fill(sup)
    sup.signal_all(signal.SIGTERM)
    for pid in list(fork.pids):
        reap(sup, pid, stopping=True)
    assert not sup.workers and len(fork.pids) == 2 and restarts(sup) == 0
    assert "died" not in caplog_master.text


def test_a_hung_worker_is_killed_and_replaced(
    fork: FakeFork, caplog_master: pytest.LogCaptureFixture
) -> None:
    sup = supervisor(fork, workers=1)
    fill(sup)
    hung = sup.workers[fork.pids[0]]
    timeout_ms = int(sup.settings.heartbeat_timeout * 1000)
    sup.stats.row(hung.row)[stats.HEARTBEAT_MS] = stats.monotonic_ms() - timeout_ms - 1000
    sup.check_heartbeats()
    assert hung.killed
    sup.check_heartbeats()  # killed once, not again on every turn
    assert caplog_master.text.count(f"killing worker {hung.pid}") == 1
    reap(sup, hung.pid)
    assert f"worker {hung.pid} (slot 0) died: killed by SIGKILL; replacing it" in caplog_master.text
    assert pid_in_slot(sup, 0) == fork.pids[-1] != hung.pid and restarts(sup) == 1


def test_a_retiree_past_its_deadline_is_killed(fork: FakeFork) -> None:
    sup = supervisor(fork, workers=2)
    fill(sup)
    sup.resize(1)
    retiring = sup.workers[fork.pids[1]]
    assert retiring.kill_at is not None
    sup.kill_overdue(retiring.kill_at - 1)
    assert not retiring.killed
    sup.kill_overdue(retiring.kill_at)
    assert retiring.killed
