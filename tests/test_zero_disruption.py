"""Zero disruption: reloads, scaling, worker death and in-place upgrades under continuous load.

A load harness (`Load`) keeps LONG_LIVED connections doing ping-pong with random payloads, each in its
own thread, and a second kind of thread opens a fresh connection every few milliseconds, echoes a
random payload, half-closes and expects EOF. Every byte is compared. Long-lived connections never
reconnect: the first error on one is recorded and its thread stops, so "no failure" also means "the same
TCP connection from start to end". Every socket operation has a deadline (STALL): a stalled echo is a
failure, never a hang.

Daemons here run with a short `shutdown_timeout` (SHUTDOWN_TIMEOUT): a retiring worker that failed to
hand a connection over closes it once that passes, so a missed handover shows up within the test as a
lost long-lived connection instead of hiding behind the 30 s default.

Reload and upgrade tests print the long-lived echo p99 of a steady window and of the disruption window,
and the totals that crossed the disruptions (run with `-s` to see them). Timings are printed only, never
asserted.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import re
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import Daemon, alive, children, comm, free_port, server_sockets, wait_for

pytestmark = pytest.mark.integration

LIVENESS = 15.0  # seconds: generous deadline for anything echod should do "at once"
STALL = 10.0  # seconds: an echo (or connect) that takes longer than this is a failure
LONG_LIVED = 20  # ping-pong connections that must survive every disruption
STEADY = 2.0  # seconds of undisturbed load measured before the first disruption
SHUTDOWN_TIMEOUT = "5"  # seconds; see the module docstring
TAG = "[zero-disruption]"


# -- load harness -------------------------------------------------------------------------------
@dataclass
class Failure:
    kind: str  # refused | reset | mismatch | stall | error
    who: str
    detail: str
    at: float = field(default_factory=time.monotonic)

    def __str__(self) -> str:
        return f"{self.who}: {self.kind}: {self.detail}"


def _classify(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return "reset"
    if isinstance(exc, TimeoutError):
        return "stall"
    return "error"


class _EOF(Exception):
    """The peer closed while bytes were still owed to us."""


def _recv_exactly(sock: socket.socket, size: int, deadline: float) -> bytes:
    """Exactly `size` bytes before `deadline`; TimeoutError past it, _EOF if the peer closes first."""
    chunks = bytearray()
    while len(chunks) < size:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{len(chunks)} of {size} bytes after {STALL:g} s")
        sock.settimeout(left)
        data = sock.recv(min(1 << 20, size - len(chunks)))
        if not data:
            raise _EOF(f"EOF after {len(chunks)} of {size} bytes")
        chunks += data
    return bytes(chunks)


def _send_all(sock: socket.socket, payload: bytes, deadline: float) -> None:
    sock.settimeout(max(0.001, deadline - time.monotonic()))
    sock.sendall(payload)


class LongLived(threading.Thread):
    """One connection doing ping-pong until told to stop; never reconnects."""

    def __init__(self, load: Load, index: int) -> None:
        super().__init__(daemon=True, name=f"long-{index}")
        self.load = load
        self.index = index
        self.rng = random.Random(index * 7919 + os.getpid())
        self.sock = socket.create_connection((load.host, load.port), timeout=STALL)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.local = self.sock.getsockname()
        self.port = self.local[1]
        self.echoes = 0
        self.bytes = 0
        self.latencies: list[tuple[float, float]] = []  # (completed at, seconds)
        self.failure: Failure | None = None

    @property
    def who(self) -> str:
        return f"long-lived #{self.index} (client port {self.port})"

    def _payload(self) -> bytes:
        # Mostly small messages, now and then one big enough to be written in parts.
        size = self.rng.randint(1, 2048) if self.rng.random() < 0.9 else self.rng.randint(2049, 96 * 1024)
        return self.rng.randbytes(size)

    def _fail(self, kind: str, detail: str) -> None:
        self.failure = Failure(kind, self.who, detail)
        self.load.failures.append(self.failure)
        self.sock.close()  # never reused: a long-lived connection does not reconnect

    def roundtrip(self, payload: bytes) -> bool:
        started = time.monotonic()
        deadline = started + STALL
        try:
            _send_all(self.sock, payload, deadline)
            got = _recv_exactly(self.sock, len(payload), deadline)
        except _EOF as exc:
            self._fail("reset", f"unexpected {exc} (echo #{self.echoes + 1})")
            return False
        except OSError as exc:
            self._fail(_classify(exc), f"{exc!r} (echo #{self.echoes + 1})")
            return False
        done = time.monotonic()
        if got != payload:
            first = next(i for i, (a, b) in enumerate(zip(got, payload, strict=True)) if a != b)
            self._fail(
                "mismatch", f"echo #{self.echoes + 1}: {len(payload)} bytes, first difference at {first}"
            )
            return False
        self.echoes += 1
        self.bytes += len(payload)
        self.latencies.append((done, done - started))
        return True

    def run(self) -> None:
        while not self.load.halt.is_set():
            if not self.roundtrip(self._payload()):
                return
            self.load.halt.wait(self.load.long_pause)

    def finish(self) -> None:
        """After the load stopped: still the same connection, still echoing, and a clean close."""
        if self.failure is not None:
            self.sock.close()
            return
        try:
            if self.sock.getsockname() != self.local:
                self._fail("error", f"socket now bound to {self.sock.getsockname()}, was {self.local}")
                return
            if not self.roundtrip(b"final check %d\n" % self.index):
                return
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(STALL)
            tail = self.sock.recv(1)
            if tail != b"":
                self._fail("mismatch", f"expected EOF after half-close, got {tail!r}")
        except OSError as exc:
            self._fail(_classify(exc), f"at the final half-close: {exc!r}")
        finally:
            self.sock.close()


class ShortLived(threading.Thread):
    """Opens a new connection every few ms: echo a random payload, half-close, expect EOF, close."""

    def __init__(self, load: Load, index: int) -> None:
        super().__init__(daemon=True, name=f"short-{index}")
        self.load = load
        self.index = index
        self.rng = random.Random(index * 104729 + os.getpid())
        self.done = 0
        self.bytes = 0
        self.failures = 0

    def _fail(self, kind: str, n: int, detail: str) -> None:
        self.failures += 1
        self.load.failures.append(Failure(kind, f"short-lived #{self.index}.{n}", detail))

    def one(self, n: int) -> None:
        payload = self.rng.randbytes(self.rng.randint(1, 4096))
        deadline = time.monotonic() + STALL
        try:
            sock = socket.create_connection((self.load.host, self.load.port), timeout=STALL)
        except OSError as exc:
            self._fail(_classify(exc), n, f"connect: {exc!r}")
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _send_all(sock, payload, deadline)
            got = _recv_exactly(sock, len(payload), deadline)
            if got != payload:
                self._fail("mismatch", n, f"{len(payload)} bytes echoed differently")
                return
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            tail = sock.recv(1)
            if tail != b"":
                self._fail("mismatch", n, f"expected EOF after the echo, got {tail!r}")
                return
        except _EOF as exc:
            self._fail("reset", n, f"unexpected {exc}")
            return
        except OSError as exc:
            self._fail(_classify(exc), n, repr(exc))
            return
        finally:
            sock.close()
        self.done += 1
        self.bytes += len(payload)

    def run(self) -> None:
        n = 0
        while not self.load.halt.is_set():
            n += 1
            self.one(n)
            self.load.halt.wait(self.load.short_pause)


class Load:
    """K long-lived ping-pong connections plus a stream of short connections against one address."""

    def __init__(
        self,
        host: str,
        port: int,
        long_lived: int = LONG_LIVED,
        short_threads: int = 1,
        long_pause: float = 0.01,
        short_pause: float = 0.003,
    ) -> None:
        self.host, self.port = host, port
        self.long_pause, self.short_pause = long_pause, short_pause
        self.halt = threading.Event()
        self.failures: list[Failure] = []
        self.started_at = 0.0
        self.long = [LongLived(self, i) for i in range(long_lived)]
        self.short = [ShortLived(self, i) for i in range(short_threads)]

    def start(self) -> Load:
        if self.started_at:
            return self
        self.started_at = time.monotonic()
        for thread in [*self.long, *self.short]:
            thread.start()
        return self

    def stop(self) -> None:
        self.halt.set()
        for thread in [*self.long, *self.short]:
            thread.join(STALL + 5)
        hung = [t.name for t in [*self.long, *self.short] if t.is_alive()]
        assert not hung, f"load threads hung despite socket timeouts: {hung}"
        for conn in self.long:
            conn.finish()

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if not self.halt.is_set():
            self.halt.set()
            for thread in [*self.long, *self.short]:
                thread.join(STALL + 5)
            for conn in self.long:
                conn.sock.close()

    # -- observing --------------------------------------------------------------------------------
    def progress(self) -> tuple[list[int], int]:
        return [c.echoes for c in self.long], sum(s.done for s in self.short)

    def wait_progress(self, what: str, echoes: int = 3, short: int = 3, skip: set[int] | None = None) -> None:
        """Every live long-lived connection echoes `echoes` more times and `short` more connections
        complete: proof that service goes on (a failed connection ends the wait with its failure)."""
        skip = skip or set()
        before, short_before = self.progress()

        def moved() -> bool:
            now, short_now = self.progress()
            lagging = [
                c.index
                for c in self.long
                if c.index not in skip and c.failure is None and now[c.index] < before[c.index] + echoes
            ]
            return not lagging and short_now >= short_before + short

        try:
            wait_for(moved, LIVENESS, f"load to progress {what}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; failures so far: {self.describe_failures()}") from None

    def count(self, kind: str, long: bool | None = None) -> int:
        return sum(
            1 for f in self.failures if f.kind == kind and (long is None or f.who.startswith("long") == long)
        )

    def describe_failures(self, limit: int = 10) -> str:
        shown = "; ".join(str(f) for f in self.failures[:limit])
        more = len(self.failures) - limit
        return f"{len(self.failures)} failures: {shown}" + (f" (and {more} more)" if more > 0 else "")

    def p99(self, start: float, end: float) -> tuple[float | None, int]:
        """p99 of long-lived echo latencies completed in [start, end), in ms, and the sample count."""
        samples = sorted(lat for c in self.long for done, lat in c.latencies if start <= done < end)
        if not samples:
            return None, 0
        return 1000 * samples[max(0, math.ceil(0.99 * len(samples)) - 1)], len(samples)

    def totals(self) -> dict[str, int]:
        return {
            "long_connections": len(self.long),
            "long_survivors": sum(1 for c in self.long if c.failure is None),
            "long_echoes": sum(c.echoes for c in self.long),
            "long_bytes": sum(c.bytes for c in self.long),
            "short_connections": sum(s.done for s in self.short),
            "short_bytes": sum(s.bytes for s in self.short),
        }

    def assert_clean(self, daemon: Daemon) -> None:
        assert self.failures == [], f"{self.describe_failures()}\n{diagnose(daemon)}"

    def report(
        self, title: str, events: str, steady: tuple[float, float], window: tuple[float, float]
    ) -> None:
        t = self.totals()
        steady_p99, steady_n = self.p99(*steady)
        window_p99, window_n = self.p99(*window)

        def ms(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.2f} ms"

        refused, reset = self.count("refused"), self.count("reset")
        mismatch, other = self.count("mismatch"), self.count("stall") + self.count("error")
        print(
            f"\n{TAG} {title}: {t['long_survivors']}/{t['long_connections']} long-lived connections stayed"
            f" the same TCP connection across {events}: {t['long_echoes']} echoes,"
            f" {t['long_bytes'] / 1e6:.2f} MB verified byte for byte"
        )
        print(
            f"{TAG} {title}: {t['short_connections']} short-lived connections opened, echoed and closed"
            f" ({t['short_bytes'] / 1e6:.2f} MB verified) during the run"
        )
        print(
            f"{TAG} {title}: failures: {refused} refused, {reset} reset, {mismatch} mismatched,"
            f" {other} stalled/other"
        )
        print(
            f"{TAG} {title}: long-lived echo p99: steady {ms(steady_p99)} (n={steady_n},"
            f" {steady[1] - steady[0]:.1f} s) vs during {ms(window_p99)} (n={window_n},"
            f" {window[1] - window[0]:.1f} s)"
        )


# -- observing echod ----------------------------------------------------------------------------
def metric(daemon: Daemon, name: str) -> float | None:
    return daemon.metrics().get(name)


def wait_metric(daemon: Daemon, name: str, check: Callable[[float], bool], what: str) -> float:
    seen: list[float | None] = [None]

    def ok() -> bool:
        seen[0] = metric(daemon, name)
        return seen[0] is not None and check(seen[0])

    try:
        wait_for(ok, LIVENESS, f"{name} {what}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last value {seen[0]}\n{daemon.log()[-4000:]}") from None
    assert seen[0] is not None
    return seen[0]


def workers_of(master: int) -> list[int]:
    return sorted(pid for pid in children(master) if comm(pid).startswith("echod-worker") and alive(pid))


def diagnose(daemon: Daemon, load: Load | None = None, pids: Collection[int] = ()) -> str:
    """What a failure message needs: echod's warnings and errors, which connections the given (old)
    workers still hold, and the end of the log."""
    log = daemon.log()
    problems = [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line]
    text = "--- echod warnings and errors ---\n" + ("\n".join(problems[-30:]) or "(none)")
    lingering = [pid for pid in pids if alive(pid)]
    if load is not None and lingering:
        held = owners(daemon.port, [c.port for c in load.long if c.failure is None], lingering)
        for pid in lingering:
            ports = sorted(port for port, owner in held.items() if owner == pid)
            text += f"\n--- worker {pid} ({comm(pid)}) still holds long-lived client ports {ports}"
    return text + "\n--- echod log, last lines ---\n" + "\n".join(log.splitlines()[-25:])


def wait_workers(
    daemon: Daemon, master: int, count: int, exclude: Collection[int] = (), load: Load | None = None
) -> list[int]:
    """Wait until `master` has exactly `count` workers and none of `exclude` (retired ones) is alive."""
    try:
        found = wait_for(
            lambda: (lambda now: now if len(now) == count and not any(alive(p) for p in exclude) else None)(
                workers_of(master)
            ),
            LIVENESS,
            f"{count} workers under master {master} and none of the retired ones left",
        )
    except AssertionError as exc:
        now = workers_of(master)
        raise AssertionError(
            f"{exc}: workers now {now}; retired but alive: {[p for p in exclude if alive(p)]}\n"
            + diagnose(daemon, load, [*now, *exclude])
        ) from None
    return list(found)  # type: ignore[call-overload]


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def owners(server_port: int, client_ports: list[int], pids: list[int]) -> dict[int, int | None]:
    """client port -> pid of the worker holding the server side of that loopback connection."""
    inode_of = {port: inode for port, inode in server_sockets(server_port).items() if inode}
    held = {pid: _socket_inodes(pid) for pid in pids}
    return {
        port: next((pid for pid, inodes in held.items() if inode_of.get(port) in inodes), None)
        for port in client_ports
    }


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture
def echod_file(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """A daemon without --workers, so that the worker count comes from its --config file."""
    spawned: list[Daemon] = []

    def start(config: Path, *extra: str) -> Daemon:
        listen = [f"127.0.0.1:{free_port()}"]
        metrics_port = free_port()
        args = [
            "--config",
            str(config),
            "--listen",
            listen[0],
            "--metrics-listen",
            f"127.0.0.1:{metrics_port}",
        ]
        daemon = Daemon(tmp_path, [*args, *extra], None, listen, metrics_port)
        spawned.append(daemon)
        return daemon.wait_ready()

    yield start
    for daemon in spawned:
        daemon.kill()


def start_load(daemon: Daemon, **kwargs: float) -> Load:
    load = Load(daemon.host, daemon.port, **kwargs)  # type: ignore[arg-type]
    load.start()
    try:
        load.wait_progress("before any disruption")
    except BaseException:
        load.__exit__()
        raise
    return load


def steady_window(load: Load) -> tuple[float, float]:
    start = time.monotonic()
    time.sleep(STEADY)
    return start, time.monotonic()


# -- 1. reloads ---------------------------------------------------------------------------------
def test_twenty_reloads_under_load_lose_nothing(echod):
    daemon = echod("--shutdown-timeout", SHUTDOWN_TIMEOUT, workers=2)
    first = daemon.workers()
    assert len(first) == 2
    reloads = 20
    with start_load(daemon) as load:
        steady = steady_window(load)
        began = time.monotonic()
        replaced: set[int] = set()  # every worker that ran before some reload: all must retire
        for n in range(1, reloads + 1):
            replaced.update(daemon.workers())
            daemon.send_signal(signal.SIGHUP)
            wait_metric(
                daemon, 'echod_config_reloads_total{result="success"}', lambda v, n=n: v >= n, f">= {n}"
            )
            load.wait_progress(f"after reload {n}", echoes=1, short=1)
        current = wait_workers(daemon, daemon.pid, 2, exclude=replaced, load=load)
        ended = time.monotonic()
        load.wait_progress("after the last old worker left")
        load.stop()
    load.report("20 x SIGHUP", f"{reloads} reloads", steady, (began, ended))
    load.assert_clean(daemon)
    assert not set(current) & replaced
    assert metric(daemon, 'echod_config_reloads_total{result="success"}') == reloads
    assert metric(daemon, 'echod_config_reloads_total{result="failure"}') == 0
    handed = wait_metric(daemon, "echod_connections_handed_over_total", lambda v: v > 0, "> 0")
    print(f"{TAG} 20 x SIGHUP: echod_connections_handed_over_total = {handed:g}")
    wait_metric(daemon, "echod_workers", lambda v: v == 2, "== 2")
    assert daemon.log().count("reload complete") == reloads
    assert "killing worker" not in daemon.log()
    assert daemon.http("/healthz")[0] == 200


# -- 2. reload that changes the worker count ----------------------------------------------------
def test_reload_changing_worker_count_under_load(echod_file, tmp_path):
    config = tmp_path / "workers.toml"
    config.write_text("workers = 2\n")
    daemon = echod_file(config, "--shutdown-timeout", SHUTDOWN_TIMEOUT)
    assert len(daemon.workers()) == 2
    with start_load(daemon) as load:
        steady = steady_window(load)
        began = time.monotonic()
        for n, count in enumerate((4, 1), start=1):
            old = set(daemon.workers())
            config.write_text(f"workers = {count}\n")
            daemon.send_signal(signal.SIGHUP)
            wait_metric(
                daemon, 'echod_config_reloads_total{result="success"}', lambda v, n=n: v == n, f"== {n}"
            )
            new = wait_workers(daemon, daemon.pid, count, exclude=old, load=load)
            assert not set(new) & old, "a reload must replace every worker"
            load.wait_progress(f"after the reload to {count} workers")
        ended = time.monotonic()
        load.stop()
    load.report("reload workers 2 -> 4 -> 1", "2 reloads (2 -> 4 -> 1 workers)", steady, (began, ended))
    load.assert_clean(daemon)
    wait_metric(daemon, "echod_workers", lambda v: v == 1, "== 1")
    wait_metric(daemon, "echod_connections_handed_over_total", lambda v: v > 0, "> 0")
    assert metric(daemon, 'echod_config_reloads_total{result="failure"}') == 0
    assert "killing worker" not in daemon.log()


# -- 3. scaling with TTIN / TTOU ----------------------------------------------------------------
def test_ttin_ttou_under_load(echod):
    daemon = echod("--shutdown-timeout", SHUTDOWN_TIMEOUT, workers=2)
    steps = [(signal.SIGTTIN, 3), (signal.SIGTTOU, 2), (signal.SIGTTOU, 1), (signal.SIGTTIN, 2),
             (signal.SIGTTIN, 3), (signal.SIGTTOU, 2), (signal.SIGTTOU, 1)]  # fmt: skip
    with start_load(daemon) as load:
        steady = steady_window(load)
        began = time.monotonic()
        for signum, count in steps:
            before = set(daemon.workers())
            daemon.send_signal(signum)
            wait_metric(daemon, "echod_workers_configured", lambda v, c=count: v == c, f"== {count}")
            now = wait_workers(daemon, daemon.pid, count, load=load)
            if signum == signal.SIGTTIN:
                assert before < set(now), "TTIN must add a worker and keep the others"
            else:
                assert set(now) < before, "TTOU must retire one worker and keep the others"
            load.wait_progress(f"after {signal.Signals(signum).name} to {count} workers")
        ended = time.monotonic()
        load.stop()
    load.report(
        "TTIN/TTOU", f"{len(steps)} scaling steps (2->3->2->1->2->3->2->1 workers)", steady, (began, ended)
    )
    load.assert_clean(daemon)
    # 2 -> 1 retires the slot-1 worker, which held long-lived connections: they were handed over.
    wait_metric(daemon, "echod_connections_handed_over_total", lambda v: v > 0, "> 0")
    wait_metric(daemon, "echod_worker_restarts_total", lambda v: v == 0, "== 0")
    assert "killing worker" not in daemon.log()


# -- 4. a worker is SIGKILLed -------------------------------------------------------------------
def test_sigkilled_worker_under_load(echod):
    daemon = echod(workers=2)
    with start_load(daemon) as load:
        load.wait_progress("before the kill")
        workers = daemon.workers()
        held = owners(daemon.port, [c.port for c in load.long], workers)
        assert None not in held.values(), f"cannot tell which worker serves which connection: {held}"
        victim = max(workers, key=lambda pid: sum(1 for owner in held.values() if owner == pid))
        doomed = {c.index for c in load.long if held[c.port] == victim}
        os.kill(victim, signal.SIGKILL)
        after = wait_workers(daemon, daemon.pid, 2, exclude={victim})
        assert set(workers) - {victim} < set(after), "the surviving worker must not be touched"
        load.wait_progress("after the replacement", skip=doomed)
        wait_for(
            lambda: all(load.long[i].failure is not None for i in doomed),
            LIVENESS,
            "the killed worker's connections to fail (not hang)",
        )
        load.stop()
    lost = {c.index for c in load.long if c.failure is not None}
    print(
        f"\n{TAG} SIGKILL worker: killed worker {victim} held {len(doomed)} of {len(load.long)} long-lived"
        f" connections; lost {len(lost)}; {len(load.long) - len(lost)} survived;"
        f" {load.totals()['short_connections']} short-lived connections completed"
    )
    assert lost == doomed, f"only the killed worker's connections may be lost: {load.describe_failures()}"
    assert all(load.long[i].failure.kind == "reset" for i in doomed)  # type: ignore[union-attr]
    short = [f for f in load.failures if f.who.startswith("short")]
    assert load.count("refused") == 0 and load.count("mismatch") == 0, load.describe_failures()
    assert load.count("stall") == 0 and load.count("error") == 0, load.describe_failures()
    # Only a connection in flight on the killed worker may be reset: at most one per short-lived thread.
    assert len(short) <= len(load.short), load.describe_failures()
    wait_metric(daemon, "echod_worker_restarts_total", lambda v: v == 1, "== 1")
    wait_metric(daemon, "echod_workers", lambda v: v == 2, "== 2")
    assert f"worker {victim} " in daemon.log() and "died: killed by SIGKILL" in daemon.log()
    wait_for(lambda: daemon.http("/healthz")[0] == 200, LIVENESS, "/healthz 200")


# -- 5. a broken configuration is refused under load --------------------------------------------
def test_broken_toml_reload_under_load(echod, tmp_path):
    config = tmp_path / "broken.toml"
    config.write_text("idle_timeout = 60\n")
    daemon = echod("--config", str(config), "--shutdown-timeout", SHUTDOWN_TIMEOUT, workers=2)
    before = daemon.workers()
    with start_load(daemon) as load:
        steady = steady_window(load)
        began = time.monotonic()
        config.write_text("idle_timeout = = 60\n[log\n")
        daemon.send_signal(signal.SIGHUP)
        wait_metric(daemon, 'echod_config_reloads_total{result="failure"}', lambda v: v == 1, "== 1")
        wait_metric(daemon, "echod_config_last_reload_successful", lambda v: v == 0, "== 0")
        load.wait_progress("after the failed reload")
        assert daemon.workers() == before, "a failed reload must not touch the workers"
        # Fixed again, a reload goes through, still without a single failure.
        config.write_text("idle_timeout = 120\n")
        daemon.send_signal(signal.SIGHUP)
        wait_metric(daemon, 'echod_config_reloads_total{result="success"}', lambda v: v == 1, "== 1")
        wait_workers(daemon, daemon.pid, 2, exclude=set(before), load=load)
        load.wait_progress("after the good reload")
        ended = time.monotonic()
        load.stop()
    load.report("broken TOML", "1 failed reload and 1 good one", steady, (began, ended))
    load.assert_clean(daemon)
    assert "reload failed" in daemon.log() and "invalid TOML" in daemon.log()
    assert metric(daemon, 'echod_config_reloads_total{result="failure"}') == 1
    wait_metric(daemon, "echod_config_last_reload_successful", lambda v: v == 1, "== 1")


# -- 6. in-place upgrade ------------------------------------------------------------------------
def new_master(daemon: Daemon, old: int) -> int:
    """The pid of the master that `old` upgraded to, once it reports ready; fails at once if `old` logs
    that it refused or failed the upgrade."""
    ready = re.compile(rf"echod\.master\[{old}\]: upgrade: new master (\d+) is ready")
    refused = re.compile(rf"^.*echod\.master\[{old}\]: upgrade (?:refused|failed|already).*$", re.MULTILINE)

    def outcome() -> re.Match[str] | None:
        log = daemon.log()
        if bad := refused.search(log):
            raise AssertionError(
                f"SIGUSR2 to master {old} did not upgrade: {bad.group(0)}\n{diagnose(daemon)}"
            )
        return ready.search(log)

    found = wait_for(outcome, 2 * LIVENESS, f"master {old} to report its successor ready")
    return int(found.group(1))  # type: ignore[union-attr]


def test_inplace_upgrade_twice_under_load(echod):
    daemon = echod("--shutdown-timeout", SHUTDOWN_TIMEOUT, workers=2)
    first = daemon.pid
    first_workers = daemon.workers()
    with start_load(daemon) as load:
        steady = steady_window(load)
        accepted = metric(daemon, "echod_connections_accepted_total")
        assert accepted
        began = time.monotonic()
        daemon.send_signal(signal.SIGUSR2)
        second = new_master(daemon, first)
        assert f"echod.master[{first}]: upgrade: started new master {second}" in daemon.log()
        assert second != first and comm(second) == "echod-master"
        assert daemon.wait_exit(2 * LIVENESS) == 0, diagnose(daemon)
        second_workers = wait_workers(daemon, second, 2, exclude=first_workers, load=load)
        load.wait_progress("after the first upgrade")

        # The first master has exited (exit status 0 seen above): the new one must take an upgrade now.
        os.kill(second, signal.SIGUSR2)
        third = new_master(daemon, second)
        assert third not in (first, second) and comm(third) == "echod-master"
        wait_for(lambda: not alive(second), 2 * LIVENESS, f"master {second} to exit after the second upgrade")
        wait_workers(daemon, third, 2, exclude=second_workers, load=load)
        ended = time.monotonic()
        load.wait_progress("after the second upgrade")
        load.stop()
    load.report("SIGUSR2 upgrade x2", f"2 in-place upgrades (masters {first} -> {second} -> {third})", steady,
                (began, ended))  # fmt: skip
    load.assert_clean(daemon)
    log = daemon.log()
    assert f"echod.master[{second}]: echod stopped" in log, "the second master did not stop cleanly"
    assert "killing worker" not in log, diagnose(daemon)
    assert alive(third) and daemon.http("/healthz")[0] == 200
    # Counters carry across upgrades (README): nothing the earlier masters counted is lost.
    wait_metric(daemon, "echod_connections_accepted_total", lambda v: v >= accepted, f">= {accepted:g}")
    wait_metric(daemon, "echod_connections_handed_over_total", lambda v: v >= 2 * LONG_LIVED, ">= 2 x 20")


# -- 7. sd_notify -------------------------------------------------------------------------------
class Notifications:
    """The test's own $NOTIFY_SOCKET: messages with the sender's pid (SO_PASSCRED), like systemd."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))
        self.seen: list[tuple[int, dict[str, str], float]] = []  # (sender pid, fields, received at)

    def read(self, timeout: float) -> bool:
        self.sock.settimeout(max(0.001, timeout))
        try:
            data, ancillary, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            return False
        pid = next(
            (struct.unpack("3i", d[:12])[0] for lvl, typ, d in ancillary
             if lvl == socket.SOL_SOCKET and typ == socket.SCM_CREDENTIALS),
            0,
        )  # fmt: skip
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.seen.append((pid, fields, time.monotonic()))
        return True

    def expect(
        self, what: str, match: Callable[[int, dict[str, str]], bool], timeout: float = LIVENESS
    ) -> tuple[int, dict[str, str]]:
        """The first message from now on that matches; fails (never hangs) after `timeout`."""
        start = len(self.seen)
        deadline = time.monotonic() + timeout
        while True:
            for pid, fields, _at in self.seen[start:]:
                if match(pid, fields):
                    return pid, fields
            start = len(self.seen)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no sd_notify message {what} within {timeout:g} s; got {self.seen[-8:]}"
                )
            self.read(left)

    def close(self) -> None:
        self.sock.close()


def test_sd_notify_lifecycle(echod, tmp_path):
    path = tmp_path / "notify.sock"
    assert len(str(path)) < 100, "tmp_path too long for an AF_UNIX address"
    notes = Notifications(path)
    try:
        daemon = echod(workers=2, env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000"})
        master = daemon.pid
        pid, ready = notes.expect("READY=1 once ready", lambda p, f: f.get("READY") == "1")
        assert pid == master, f"READY=1 came from pid {pid}, not the master {master}"
        assert ready.get("STATUS"), f"READY=1 without STATUS=: {ready}"
        assert ready.get("MAINPID", str(master)) == str(master), ready

        # The watchdog keeps being fed: WATCHDOG_USEC=2 s asks for a ping at least every 2 s.
        watch_start = len(notes.seen)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            notes.read(deadline - time.monotonic())
        pings = [p for p, f, _ in notes.seen[watch_start:] if f.get("WATCHDOG") == "1"]
        assert len(pings) >= 2, f"{len(pings)} WATCHDOG=1 messages in 5 s: {notes.seen[watch_start:]}"
        assert set(pings) == {master}, pings

        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        daemon.send_signal(signal.SIGHUP)
        _, reloading = notes.expect("RELOADING=1 after SIGHUP", lambda p, f: f.get("RELOADING") == "1")
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        usec = reloading.get("MONOTONIC_USEC", "")
        assert usec.isdigit(), f"RELOADING=1 without a MONOTONIC_USEC integer: {reloading}"
        assert before <= int(usec) <= after, f"MONOTONIC_USEC={usec} not within [{before}, {after}]"
        _, reloaded = notes.expect("READY=1 after the reload", lambda p, f: f.get("READY") == "1")
        assert reloaded.get("STATUS"), reloaded
        wait_metric(daemon, 'echod_config_reloads_total{result="success"}', lambda v: v == 1, "== 1")

        daemon.send_signal(signal.SIGUSR2)
        _, moved = notes.expect(
            "MAINPID=<new master> from the old master", lambda p, f: p == master and "MAINPID" in f
        )
        successor = new_master(daemon, master)
        assert moved["MAINPID"] == str(successor), f"MAINPID={moved['MAINPID']}, new master is {successor}"
        assert daemon.wait_exit(2 * LIVENESS) == 0, daemon.log()[-4000:]
        notes.expect(
            "WATCHDOG=1 from the new master", lambda p, f: p == successor and f.get("WATCHDOG") == "1"
        )

        os.kill(successor, signal.SIGTERM)
        notes.expect(
            "STOPPING=1 from the serving master after SIGTERM",
            lambda p, f: p == successor and f.get("STOPPING") == "1",
        )
        wait_for(lambda: not alive(successor), LIVENESS, "the new master to stop")
        assert f"echod.master[{successor}]: echod stopped" in daemon.log()
    finally:
        notes.close()
