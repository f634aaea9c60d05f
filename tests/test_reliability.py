"""Fault injection against the real `echod run`: floods of slow readers, mass resets and half-closes,
connect-and-vanish, the per-address limit, running out of file descriptors, signal storms and a
slowloris on the metrics endpoint.

Every test drives a spawned daemon over loopback sockets (127.0.0.0/8 only) and reads its Prometheus
endpoint. Waits are liveness deadlines (`wait_for`, socket timeouts): a hang fails the test, and nothing
here asserts speed. The memory test prints its measured figures (run with `-s` to see them).

Clients that must make echod hold output set a small receive/send buffer and a small MSS before they
connect (see `stuck_client`): on loopback the kernel would otherwise absorb megabytes per connection in
echod's own socket buffers, and a thousand such clients would push gigabytes before echod ever had to
hold a byte itself.
"""

from __future__ import annotations

import functools
import os
import random
import resource
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import conftest
import pytest
from conftest import (
    Daemon,
    alive,
    echo_roundtrip,
    free_port,
    one_worker,
    open_fds,
    push_until_stuck,
    recv_exactly,
    rss_bytes,
    wait_for,
)

pytestmark = pytest.mark.integration

KIB = 1024
MIB = 1024 * KIB
LIVENESS = 15.0  # seconds: generous deadline for anything echod should do "at once"
CLK_TCK = os.sysconf("SC_CLK_TCK")

ACCEPTED = "echod_connections_accepted_total"
ACTIVE = "echod_connections_active"
BUFFERED = "echod_buffered_bytes"
DROPPED = "echod_dropped_bytes_total"
PAUSES = "echod_backpressure_pauses_total"
RESTARTS = "echod_worker_restarts_total"
WORKERS = "echod_workers"
RELOAD_OK = 'echod_config_reloads_total{result="success"}'
RELOAD_FAILED = 'echod_config_reloads_total{result="failure"}'


def closed(reason: str) -> str:
    return f'echod_connections_closed_total{{reason="{reason}"}}'


def rejected(reason: str) -> str:
    return f'echod_connections_rejected_total{{reason="{reason}"}}'


# -- helpers ------------------------------------------------------------------------------------------

# Fault injection works the daemon harder than the plain echo tests: a more generous default deadline.
wait_metrics = functools.partial(conftest.wait_metrics, timeout=LIVENESS)


def delta(now: dict[str, float], base: dict[str, float], name: str) -> float:
    return now.get(name, 0.0) - base.get(name, 0.0)


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def stuck_client(
    daemon: Daemon, buffers: int = 4 * KIB, mss: int = 1460, source: str | None = None
) -> socket.socket:
    """A non-blocking client with small kernel buffers and a small MSS, all set before connecting.

    echod's side of a loopback connection autotunes its send buffer from the MSS (about 2.5 MiB with the
    64 KiB loopback MSS, about 100 KiB with 1460) whatever this client does; with a 1460-byte MSS a few
    hundred KiB per connection are enough to make echod hold output of its own.
    """
    host, port = daemon.listen[0].rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffers)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffers)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
    if source is not None:
        sock.bind((source, 0))
    sock.settimeout(LIVENESS)
    sock.connect((host, int(port)))
    sock.setblocking(False)
    return sock


def connect_from(daemon: Daemon, source: str) -> socket.socket:
    """A blocking client bound to a given loopback source address."""
    sock = socket.create_connection((daemon.host, daemon.port), timeout=LIVENESS, source_address=(source, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def reset(sock: socket.socket) -> None:
    """Abortive close: SO_LINGER 0 makes close() send RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def closed_by_peer(sock: socket.socket, timeout: float = LIVENESS) -> bool:
    """True once the peer closes (EOF or reset); False if it sends bytes; TimeoutError if neither."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


class Pinger(threading.Thread):
    """Echoes small payloads on already open connections in a loop; every miss is recorded."""

    def __init__(self, socks: list[socket.socket], pause: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.socks = socks
        self.pause = pause
        self.halt = threading.Event()
        self.ok = 0
        self.errors: list[str] = []

    def run(self) -> None:
        n = 0
        while not self.halt.is_set():
            for index, sock in enumerate(self.socks):
                n += 1
                payload = b"ping %d %s\n" % (n, os.urandom(8).hex().encode())
                try:
                    got = echo_roundtrip(sock, payload)
                except OSError as exc:
                    self.errors.append(f"pinger {index}, echo {n}: {exc!r}")
                    return
                if got != payload:
                    self.errors.append(f"pinger {index}, echo {n}: got {got!r}, sent {payload!r}")
                    return
                self.ok += 1
            self.halt.wait(self.pause)

    def wait_more(self, count: int, what: str) -> None:
        target = self.ok + count
        wait_for(lambda: self.ok >= target or self.errors, 4 * LIVENESS, what)
        assert not self.errors, self.errors

    def finish(self) -> None:
        self.halt.set()
        self.join(2 * LIVENESS)
        assert not self.is_alive(), "pinger hung despite its socket timeouts"


# -- 1,000 slow readers ---------------------------------------------------------------------------------

# Worker RSS may exceed the pending output it holds by allocator slack (bytearrays over-allocate and
# glibc keeps freed heap memory), by the transient bytes of each read and by the per-connection tables.
RSS_ALLOWANCE = 16 * MIB
PER_CONNECTION = 200  # bytes of worker memory per open connection (README, "Memory bound")


class Sampler(threading.Thread):
    """Samples echod_buffered_bytes and the worker's RSS every 0.1 s; keeps the peaks."""

    def __init__(self, daemon: Daemon, worker: int) -> None:
        super().__init__(daemon=True)
        self.daemon_ = daemon
        self.worker = worker
        self.halt = threading.Event()
        self.peak_buffered = 0.0
        self.peak_rss = 0
        self.samples = 0
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.peak_rss = max(self.peak_rss, rss_bytes(self.worker))
                self.peak_buffered = max(self.peak_buffered, self.daemon_.metrics()[BUFFERED])
                self.samples += 1
            except Exception as exc:
                self.errors.append(repr(exc))
                return
            self.halt.wait(0.1)

    def finish(self) -> None:
        self.halt.set()
        self.join(2 * LIVENESS)


@pytest.mark.timeout(150)
def test_thousand_slow_readers_stay_within_the_memory_bound(echod):
    high, low, read_size, budget = 64 * KIB, 16 * KIB, 16 * KIB, 8 * MIB
    readers, honest = 1000, 4
    daemon = echod(
        "--write-buffer-high", str(high), "--write-buffer-low", str(low), "--read-size", str(read_size),
        "--max-buffered-bytes", str(budget),
        workers=1,
    )  # fmt: skip
    worker = one_worker(daemon, LIVENESS)
    with daemon.connect(timeout=LIVENESS) as warm:
        payload = os.urandom(256 * KIB)
        assert echo_roundtrip(warm, payload) == payload
    wait_metrics(daemon, lambda m: m[ACTIVE] == 0, "the warm-up connection to close")
    rss_before = rss_bytes(worker)

    conns = readers + honest
    # README: a worker holds at most min(N x (high + read_size), max_buffered_bytes + N x read_size) bytes
    # of pending output, plus about 200 bytes per open connection.
    worst_pending = min(conns * (high + read_size), budget + conns * read_size)
    rss_bound = worst_pending + conns * PER_CONNECTION + RSS_ALLOWANCE

    pinger = Pinger([daemon.connect(timeout=LIVENESS) for _ in range(honest)])
    sampler = Sampler(daemon, worker)
    stuck: list[socket.socket] = []
    try:
        pinger.start()
        sampler.start()
        for _ in range(readers):
            stuck.append(stuck_client(daemon))
        pushed = push_until_stuck(stuck, 4 * MIB, time.monotonic() + 60, quiet=1.5, block_size=64 * KIB)
        steady = wait_metrics(
            daemon,
            lambda m: m[ACTIVE] == conns and m[BUFFERED] > budget,
            "every slow reader connected and the worker's budget for pending output in use",
            timeout=2 * LIVENESS,
        )
        # Held there, the honest clients must still get their echoes.
        pinger.wait_more(10 * honest, "honest pingers to keep getting echoes while 1,000 readers are stuck")
        time.sleep(1.5)  # a little longer in the stuck state for the sampler
        pinger.wait_more(honest, "honest pingers after the hold")
    finally:
        sampler.finish()
        pinger.finish()
        close_all(stuck)
    assert not sampler.errors, sampler.errors
    assert not pinger.errors, pinger.errors
    growth = sampler.peak_rss - rss_before
    print(
        f"\n[slow readers] {readers} readers + {honest} pingers on 1 worker, high {high // KIB} KiB, "
        f"low {low // KIB} KiB, read_size {read_size // KIB} KiB, max_buffered_bytes {budget // MIB} MiB; "
        f"clients pushed {pushed / MIB:.1f} MiB; {sampler.samples} samples"
        f"\n[slow readers] peak echod_buffered_bytes {sampler.peak_buffered / MIB:.2f} MiB "
        f"(steady {steady[BUFFERED] / MIB:.2f} MiB), bound min(N x (high + read_size), "
        f"max_buffered_bytes + N x read_size) = {worst_pending / MIB:.2f} MiB for N = {conns}"
        f"\n[slow readers] worker RSS {rss_before / MIB:.1f} -> peak {sampler.peak_rss / MIB:.1f} MiB, "
        f"growth {growth / MIB:.2f} MiB; bound {rss_bound / MIB:.2f} MiB = pending bound "
        f"+ {conns} x {PER_CONNECTION} B + {RSS_ALLOWANCE // MIB} MiB allowance"
    )
    assert sampler.peak_buffered <= worst_pending, (
        f"echod_buffered_bytes peaked at {sampler.peak_buffered:.0f}, "
        f"above the documented bound {worst_pending}"
    )
    assert growth <= rss_bound, (
        f"worker RSS grew by {growth / MIB:.1f} MiB, above the documented bound {rss_bound / MIB:.1f} MiB"
    )
    after = wait_metrics(
        daemon,
        lambda m: m[ACTIVE] == honest and m[BUFFERED] == 0,
        "every slow reader's connection closed and its pending output released",
    )
    assert after[PAUSES] > 0
    assert after[RESTARTS] == 0, daemon.log()
    assert daemon.workers() == [worker], "the worker was replaced during the test"
    with daemon.connect(timeout=LIVENESS) as fresh:
        assert echo_roundtrip(fresh, b"after the flood") == b"after the flood"
    close_all(pinger.socks)


# -- mass resets, half-closes, connect-and-vanish ------------------------------------------------------


@pytest.mark.timeout(90)
def test_mass_reset_with_pending_output(echod):
    victims_n = 100
    # Default watermarks (256 KiB high, 64 KiB low). Copy mode, for exact descriptor accounting: in
    # splice and auto mode a connection with pending output also holds a pipe (test_echo covers that).
    daemon = echod("--io-mode", "copy", workers=1)
    worker = one_worker(daemon, LIVENESS)
    bystander = daemon.connect(timeout=LIVENESS)
    assert echo_roundtrip(bystander, b"before") == b"before"
    base = wait_metrics(daemon, lambda m: m[ACTIVE] == 1, "the bystander to be counted")
    fds_before = open_fds(worker)

    victims = [stuck_client(daemon) for _ in range(victims_n)]
    try:
        push_until_stuck(victims, 8 * MIB, time.monotonic() + 60, quiet=1.5, block_size=64 * KIB)
        # Every victim paused at its high watermark: echod itself holds output for each of them.
        held = wait_metrics(
            daemon,
            lambda m: (
                m[ACTIVE] == victims_n + 1
                and delta(m, base, PAUSES) >= victims_n
                and m[BUFFERED] >= victims_n * 64 * KIB
            ),
            "echod to hold output for every victim",
            timeout=2 * LIVENESS,
        )
        assert open_fds(worker) == fds_before + victims_n
        # All at once: RST from every victim while its output is pending.
        for sock in victims:
            reset(sock)
    finally:
        close_all(victims)

    after = wait_metrics(
        daemon,
        lambda m: delta(m, base, closed("error")) == victims_n and m[ACTIVE] == 1 and m[BUFFERED] == 0,
        f"{victims_n} resets counted as errors and their output released",
    )
    assert delta(after, base, DROPPED) >= held[BUFFERED], (
        f"{held[BUFFERED]:.0f} bytes were pending when the clients reset, "
        f"but only {delta(after, base, DROPPED):.0f} were counted as dropped"
    )
    assert delta(after, base, closed("client")) == 0
    wait_for(lambda: open_fds(worker) == fds_before, LIVENESS, f"worker fds back to {fds_before}")
    assert daemon.workers() == [worker], "the worker died on the resets"
    assert after[RESTARTS] == 0
    assert echo_roundtrip(bystander, b"after the resets") == b"after the resets"
    with daemon.connect(timeout=LIVENESS) as fresh:
        assert echo_roundtrip(fresh, b"fresh") == b"fresh"
    bystander.close()
    assert "Traceback" not in daemon.log(), daemon.log()


@pytest.mark.timeout(120)
def test_mass_half_close_with_pending_output(echod):
    # High watermark above every payload: each client can send all of it before reading a byte, and
    # echod has to hold what the kernel buffers cannot.
    clients = 60
    daemon = echod("--write-buffer-high", str(2 * MIB), "--write-buffer-low", str(512 * KIB), workers=1)
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    sizes = [rng.randint(1, 64) if i % 10 == 0 else rng.randint(256 * KIB, MIB) for i in range(clients)]
    payloads = [rng.randbytes(size) for size in sizes]
    socks = [stuck_client(daemon) for _ in range(clients)]
    sel = selectors.DefaultSelector()
    try:
        sent = [0] * clients
        deadline = time.monotonic() + 4 * LIVENESS
        while any(sent[i] < sizes[i] for i in range(clients)):
            assert time.monotonic() < deadline, f"seed {seed}: clients could not send their payloads"
            moved = 0
            for i, sock in enumerate(socks):
                if sent[i] < sizes[i]:
                    try:
                        n = sock.send(payloads[i][sent[i] : sent[i] + 64 * KIB])
                    except BlockingIOError:
                        continue
                    sent[i] += n
                    moved += n
            if not moved:
                time.sleep(0.01)
        held = wait_metrics(
            daemon,
            lambda m: m[ACTIVE] == clients and m[BUFFERED] >= 8 * MIB,
            "echod to hold pending output on the large connections",
            timeout=2 * LIVENESS,
        )
        # All at once: half-close every connection while its echo is still pending.
        for sock in socks:
            sock.shutdown(socket.SHUT_WR)
        received = [bytearray() for _ in range(clients)]
        for i, sock in enumerate(socks):
            sel.register(sock, selectors.EVENT_READ, i)
        eof = 0
        deadline = time.monotonic() + 6 * LIVENESS
        while eof < clients:
            assert time.monotonic() < deadline, (
                f"seed {seed}: {clients - eof} connections without EOF; "
                f"{sum(map(len, received))} of {sum(sizes)} bytes back"
            )
            for key, _mask in sel.select(timeout=1.0):
                i = key.data
                data = socks[i].recv(256 * KIB)
                if data:
                    received[i] += data
                    assert len(received[i]) <= sizes[i], f"seed {seed}: client {i} got more than it sent"
                else:
                    sel.unregister(socks[i])
                    eof += 1
    finally:
        sel.close()
        close_all(socks)
    for i in range(clients):
        assert len(received[i]) == sizes[i], (
            f"seed {seed}: client {i}: {len(received[i])} of {sizes[i]} bytes"
        )
        assert received[i] == payloads[i], f"seed {seed}: client {i}: the echo differs"
    after = wait_metrics(
        daemon,
        lambda m: m[closed("client")] == clients and m[ACTIVE] == 0,
        f"{clients} connections closed by their clients",
    )
    print(f"\n[half-close] {clients} connections, {held[BUFFERED] / MIB:.1f} MiB pending when half-closed")
    assert after[closed("error")] == 0
    assert after[DROPPED] == 0
    assert after[BUFFERED] == 0


@pytest.mark.timeout(90)
def test_connect_and_vanish_leaks_nothing(echod):
    per_round, rounds = 150, 3
    daemon = echod(workers=1)
    worker = one_worker(daemon, LIVENESS)
    with daemon.connect(timeout=LIVENESS) as warm:
        assert echo_roundtrip(warm, b"warm") == b"warm"
    base = wait_metrics(daemon, lambda m: m[ACTIVE] == 0 and m[closed("client")] == 1, "warm-up closed")
    fds_before = open_fds(worker)
    rss_after_round: list[int] = []
    for r in range(1, rounds + 1):
        for _ in range(per_round):
            # Connect, then close without sending a byte (FIN) ...
            socket.create_connection((daemon.host, daemon.port), timeout=LIVENESS).close()
            # ... and connect, then reset at once.
            reset(socket.create_connection((daemon.host, daemon.port), timeout=LIVENESS))
        now = wait_metrics(
            daemon,
            lambda m, r=r: (
                delta(m, base, ACCEPTED) == 2 * per_round * r
                and delta(m, base, closed("client")) == per_round * r
                and delta(m, base, closed("error")) == per_round * r
                and m[ACTIVE] == 0
            ),
            f"round {r}: every connection accepted and closed (FIN as client, RST as error)",
        )
        assert now[BUFFERED] == 0 and delta(now, base, DROPPED) == 0
        for reason in ("timeout", "shutdown"):
            assert delta(now, base, closed(reason)) == 0, reason
        for reason in ("limit", "emfile", "per_ip"):
            assert delta(now, base, rejected(reason)) == 0, reason
        wait_for(
            lambda: open_fds(worker) == fds_before, LIVENESS, f"round {r}: worker fds back to {fds_before}"
        )
        rss_after_round.append(rss_bytes(worker))
    growth = rss_after_round[-1] - rss_after_round[0]
    assert growth < 2 * MIB, f"worker RSS grew by {growth / KIB:.0f} KiB over {rounds - 1} more rounds"
    assert daemon.workers() == [worker]
    with daemon.connect(timeout=LIVENESS) as sock:
        assert echo_roundtrip(sock, b"still here") == b"still here"


# -- per-address limit ------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_per_ip_limit_rejects_only_the_crowded_address(echod):
    daemon = echod("--max-connections-per-ip", "3", workers=1)
    local = [connect_from(daemon, "127.0.0.1") for _ in range(3)]
    others: list[socket.socket] = []
    try:
        for index, sock in enumerate(local):
            payload = f"local {index}".encode()
            assert echo_roundtrip(sock, payload) == payload
        wait_metrics(daemon, lambda m: m[ACTIVE] == 3, "three connections from 127.0.0.1")

        with connect_from(daemon, "127.0.0.1") as fourth:
            try:
                assert closed_by_peer(fourth), "the 4th connection from 127.0.0.1 got bytes"
            except TimeoutError:
                pytest.fail("the 4th connection from 127.0.0.1 was left open (max_connections_per_ip = 3)")
        wait_metrics(
            daemon,
            lambda m: m[rejected("per_ip")] == 1 and m[ACTIVE] == 3 and m[rejected("limit")] == 0,
            "one rejection for the per-address limit",
        )

        # Another loopback source address is not affected, up to its own limit.
        for index in range(3):
            sock = connect_from(daemon, "127.0.0.2")
            others.append(sock)
            assert sock.getsockname()[0] == "127.0.0.2"
            payload = f"other {index}".encode()
            assert echo_roundtrip(sock, payload) == payload
        wait_metrics(daemon, lambda m: m[ACTIVE] == 6 and m[rejected("per_ip")] == 1, "3 + 3 connections")

        # Closing one from 127.0.0.1 frees its slot.
        local.pop(0).close()
        wait_metrics(daemon, lambda m: m[ACTIVE] == 5, "the closed connection to be counted")
        again = connect_from(daemon, "127.0.0.1")
        local.append(again)
        assert echo_roundtrip(again, b"room again") == b"room again"
        wait_metrics(
            daemon, lambda m: m[ACTIVE] == 6 and m[rejected("per_ip")] == 1, "the replacement admitted"
        )
        for sock in [*local, *others]:
            assert echo_roundtrip(sock, b"still here") == b"still here"
    finally:
        close_all(local + others)


@pytest.mark.timeout(60)
def test_per_ip_limit_holds_after_a_reload(echod):
    # A reload hands the established connections over to the new worker (README): the limit is per
    # address and worker, so the new worker must count them and still refuse a 4th.
    daemon = echod("--max-connections-per-ip", "3", "--shutdown-timeout", "5", workers=1)
    local = [connect_from(daemon, "127.0.0.1") for _ in range(3)]
    try:
        for sock in local:
            assert echo_roundtrip(sock, b"before") == b"before"
        old = one_worker(daemon, LIVENESS)
        daemon.send_signal(signal.SIGHUP)
        wait_metrics(daemon, lambda m: m[RELOAD_OK] == 1, "the reload to complete")
        wait_for(
            lambda: old not in daemon.workers() and len(daemon.workers()) == 1, LIVENESS, "old worker gone"
        )
        wait_metrics(
            daemon,
            lambda m: m["echod_connections_handed_over_total"] == 3 and m[ACTIVE] == 3,
            "the three connections handed over to the new worker",
        )
        for sock in local:
            assert echo_roundtrip(sock, b"after") == b"after"
        with connect_from(daemon, "127.0.0.1") as fourth:
            try:
                assert closed_by_peer(fourth, timeout=5), "the 4th connection from 127.0.0.1 got bytes"
            except TimeoutError:
                pytest.fail(
                    "after a reload the new worker admitted a 4th connection from 127.0.0.1 although it "
                    "serves the 3 handed-over ones (max_connections_per_ip = 3)"
                )
        wait_metrics(daemon, lambda m: m[rejected("per_ip")] == 1, "the 4th counted as rejected (per_ip)")
    finally:
        close_all(local)


# -- out of file descriptors -----------------------------------------------------------------------------


class LimitedDaemon(Daemon):
    """conftest's Daemon, started under `ulimit -n NOFILE` (soft and hard) by a shell that execs echod."""

    def __init__(self, tmp: Path, args: list[str], listen: list[str], metrics_port: int, nofile: int) -> None:
        self.tmp = tmp
        self.listen = listen
        self.metrics_port = metrics_port
        self.log_path = tmp / f"echod-{len(list(tmp.glob('echod-*.log')))}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ECHOD_", "NOTIFY_SOCKET"))}
        empty = tmp / "empty.toml"
        empty.touch()
        env["ECHOD_CONFIG"] = str(empty)
        self.log_file = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            ["/bin/sh", "-c", f'ulimit -n {nofile} && exec "$0" "$@"', sys.executable, "-m", "echod",
             "run", *args],
            stdin=subprocess.DEVNULL,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )  # fmt: skip


@pytest.fixture
def limited_echod(tmp_path: Path) -> Iterator[Callable[..., LimitedDaemon]]:
    spawned: list[LimitedDaemon] = []

    def start(nofile: int, *extra: str) -> LimitedDaemon:
        listen = [f"127.0.0.1:{free_port()}"]
        metrics_port = free_port()
        args = [
            "--workers",
            "1",
            "--listen",
            listen[0],
            "--metrics-listen",
            f"127.0.0.1:{metrics_port}",
            *extra,
        ]
        daemon = LimitedDaemon(tmp_path, args, listen, metrics_port, nofile)
        spawned.append(daemon)
        daemon.wait_ready()
        return daemon

    yield start
    for daemon in spawned:
        daemon.kill()


@pytest.mark.timeout(90)
def test_out_of_file_descriptors_sheds_without_spinning(limited_echod):
    nofile = 64
    daemon = limited_echod(nofile)
    worker = one_worker(daemon, LIVENESS)
    limits = Path(f"/proc/{worker}/limits").read_text()
    assert any(line.startswith("Max open files") and f" {nofile} " in line for line in limits.splitlines())
    capacity = nofile - open_fds(worker)
    assert 5 < capacity < nofile, f"worker has {open_fds(worker)} fds open of {nofile}"

    attempts = capacity + 20
    socks = [daemon.connect(timeout=LIVENESS) for _ in range(attempts)]
    served: list[socket.socket] = []
    shed = 0
    try:
        for sock in socks:
            try:
                sock.sendall(b"?")
                data = sock.recv(1)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            except TimeoutError:
                pytest.fail(f"a connection beyond the fd limit hung for {LIVENESS:g} s instead of being shed")
            if data == b"?":
                served.append(sock)
            else:
                assert data == b"", data
                shed += 1
                sock.close()
        assert len(served) == capacity, (
            f"{len(served)} connections served with {capacity} descriptors free (of {nofile})"
        )
        assert shed >= 20, f"only {shed} of {attempts} connections were shed with {capacity} fds free"
        wait_metrics(
            daemon,
            lambda m: m[rejected("emfile")] == shed and m[ACTIVE] == len(served),
            f"{shed} connections counted as rejected (emfile), {len(served)} active",
        )

        # Sustained overload: clients keep connecting while every descriptor is in use.
        halt = threading.Event()
        overload = {"attempts": 0, "shed": 0, "other": []}

        def hammer() -> None:
            while not halt.is_set():
                overload["attempts"] += 1
                try:
                    with daemon.connect(timeout=LIVENESS) as extra:
                        overload["shed"] += closed_by_peer(extra)
                except OSError as exc:
                    overload["other"].append(repr(exc))
                halt.wait(0.005)

        cpu_before = cpu_seconds(worker)
        thread = threading.Thread(target=hammer, daemon=True)
        thread.start()
        time.sleep(3.0)
        halt.set()
        thread.join(2 * LIVENESS)
        cpu_used = cpu_seconds(worker) - cpu_before
        assert not thread.is_alive()
        assert not overload["other"], overload["other"][:5]
        assert overload["attempts"] > 10 and overload["shed"] == overload["attempts"], overload
        assert cpu_used < 1.0, (
            f"the worker used {cpu_used:.2f} s of CPU in 3 s while out of descriptors: it spins"
        )
        for sock in served:
            assert echo_roundtrip(sock, b"served") == b"served", "a served connection stopped echoing"
        print(
            f"\n[emfile] RLIMIT_NOFILE {nofile}: {len(served)} served, {shed} shed; 3 s of overload: "
            f"{overload['attempts']} connects shed, worker CPU {cpu_used:.3f} s"
        )
    finally:
        close_all(socks)

    # Once clients close, new connections are served again, as many as before.
    wait_metrics(daemon, lambda m: m[ACTIVE] == 0, "every connection closed")
    again = [daemon.connect(timeout=LIVENESS) for _ in range(len(served))]
    try:
        for index, sock in enumerate(again):
            payload = f"again {index}".encode()
            assert echo_roundtrip(sock, payload) == payload, (
                f"connection {index} not served after the overload"
            )
    finally:
        close_all(again)
    assert daemon.workers() == [worker]
    assert daemon.metrics()[RESTARTS] == 0
    assert "connections: out of file descriptors" in daemon.log(), daemon.log()


def lowest_free_fd(pid: int) -> int:
    used = {int(name) for name in os.listdir(f"/proc/{pid}/fd")}
    return next(fd for fd in range(len(used) + 1) if fd not in used)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("room", ["later", "for-the-channel-only"])
def test_handover_to_a_worker_out_of_descriptors(echod, room):
    """TTOU retires slot 1, which hands its connections to slot 0; slot 0 has no descriptor free.

    "later": the channel (and the connections in it) must wait in the kernel until slot 0 has room
    again, then every connection echoes. "for-the-channel-only": slot 0 can take the channel but not
    the connections in it; the kernel closes those, and slot 0 must say so and count them. In both,
    slot 0 and its own connections live on; an uncaught EMFILE used to kill it."""
    daemon = echod(workers=2)
    socks = [daemon.connect(timeout=LIVENESS) for _ in range(40)]
    try:
        for index, sock in enumerate(socks):
            assert echo_roundtrip(sock, b"%d" % index) == b"%d" % index
        by_slot = {conftest.comm(pid): pid for pid in daemon.workers()}
        keeper, leaver = by_slot["echod-worker-0"], by_slot["echod-worker-1"]
        limits = resource.prlimit(keeper, resource.RLIMIT_NOFILE)
        free = lowest_free_fd(keeper)  # every fd below it is in use: with this limit, none is left
        resource.prlimit(keeper, resource.RLIMIT_NOFILE, (free + (room != "later"), limits[1]))
        daemon.send_signal(signal.SIGTTOU)
        if room == "later":
            wait_for(lambda: "cannot take connections handed over" in daemon.log(), LIVENESS, "EMFILE")
            assert alive(keeper), daemon.log()
            resource.prlimit(keeper, resource.RLIMIT_NOFILE, limits)
        else:
            wait_for(lambda: "connections handed over were lost" in daemon.log(), LIVENESS, "the loss")
            resource.prlimit(keeper, resource.RLIMIT_NOFILE, limits)
        wait_for(lambda: not alive(leaver), LIVENESS, "the retired worker to exit")
        echoed = lost = 0
        for index, sock in enumerate(socks):
            payload = b"after %d" % index
            try:
                reply = echo_roundtrip(sock, payload)
            except (ConnectionResetError, BrokenPipeError):
                reply = b""
            assert reply in (payload, b""), reply
            echoed += reply == payload
            lost += reply == b""
        if room == "later":
            assert lost == 0, f"{lost} of 40 connections lost while slot 0 was out of descriptors"
        else:
            assert 0 < lost < 40, f"{lost} of 40 lost: the test needs connections on both workers"
            wait_metrics(daemon, lambda m: m[closed("error")] >= lost, f"{lost} closed (error)")
        assert daemon.workers() == [keeper]
        assert daemon.metrics()[RESTARTS] == 0, daemon.log()
        assert "Traceback" not in daemon.log(), daemon.log()
    finally:
        close_all(socks)


# -- signal storms ----------------------------------------------------------------------------------------


def reloads_settled(daemon: Daemon, workers: int) -> bool:
    """The last reload handled has finished (or failed) and only the current workers are left."""
    log = daemon.log()
    started = log.rfind("reloading configuration")
    finished = max(log.rfind("reload complete"), log.rfind("reload failed"))
    return started >= 0 and finished > started and len(daemon.workers()) == workers


@pytest.mark.timeout(120)
def test_hundred_sighups_in_a_burst(echod):
    workers = 2
    daemon = echod("--shutdown-timeout", "5", workers=workers)
    pinger = Pinger([daemon.connect(timeout=LIVENESS)], pause=0.01)
    pinger.start()
    try:
        pinger.wait_more(20, "echoes before the burst")
        for _ in range(100):
            os.kill(daemon.pid, signal.SIGHUP)
        time.sleep(0.5)
        pinger.wait_more(20, "echoes right after the burst")

        try:
            wait_for(lambda: reloads_settled(daemon, workers), 6 * LIVENESS, "the reloads to finish")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{daemon.log()[-6000:]}") from None
        pinger.wait_more(20, "echoes after the reloads settled")
    finally:
        pinger.finish()
    assert not pinger.errors, pinger.errors
    assert daemon.proc.poll() is None, daemon.log()
    handled = daemon.log().count("reloading configuration")
    samples = wait_metrics(
        daemon,
        lambda m: m[WORKERS] == workers and m["echod_workers_configured"] == workers,
        f"{workers} current workers",
    )
    print(f"\n[sighup burst] 100 sent, {handled} handled, reload counters {samples[RELOAD_OK]:.0f} ok")
    assert samples[RELOAD_OK] + samples[RELOAD_FAILED] == handled, (
        f"{handled} reloads handled (log), but the counters say {samples[RELOAD_OK]:.0f} succeeded and "
        f"{samples[RELOAD_FAILED]:.0f} failed"
    )
    assert samples[RESTARTS] == 0, daemon.log()
    assert samples["echod_config_last_reload_successful"] == 1
    assert daemon.http("/healthz")[0] == 200
    assert "Traceback" not in daemon.log(), daemon.log()[-6000:]
    close_all(pinger.socks)


@pytest.mark.timeout(90)
def test_usr1_right_after_hup_kills_no_new_worker(echod):
    """HUP forks the new workers, and a USR1 handled in the same turn reaches them at once, before
    they have handlers: it must wait (blocked) until they do, not kill them (USR1's default action)."""
    daemon = echod(workers=2)
    for round_ in range(1, 4):
        os.kill(daemon.pid, signal.SIGHUP)
        os.kill(daemon.pid, signal.SIGUSR1)
        wait_for(lambda: reloads_settled(daemon, 2), LIVENESS, f"reload {round_} to finish")
        wait_metrics(daemon, lambda m, n=round_: m[RELOAD_OK] == n, f"{round_} reloads counted")
    samples = wait_metrics(daemon, lambda m: m[WORKERS] == 2, "2 current workers")
    assert samples[RESTARTS] == 0, daemon.log()
    assert " died:" not in daemon.log(), daemon.log()
    with daemon.connect(timeout=LIVENESS) as sock:
        assert echo_roundtrip(sock, b"still here") == b"still here"


@pytest.mark.timeout(90)
def test_overlapping_reloads_are_all_counted(echod):
    # A HUP that arrives while the previous reload's workers are still starting: each reload the master
    # handles ("reloading configuration" in the log) must end as a success or a failure in the counters.
    daemon = echod("--shutdown-timeout", "5", workers=2)
    pinger = Pinger([daemon.connect(timeout=LIVENESS)], pause=0.01)
    pinger.start()
    try:
        for pair in range(5):
            handled = daemon.log().count("reloading configuration")
            daemon.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + LIVENESS
            while daemon.log().count("reloading configuration") <= handled:  # polled tightly
                assert time.monotonic() < deadline, f"pair {pair}: the first reload did not begin"
                time.sleep(0.002)
            daemon.send_signal(signal.SIGHUP)  # while the first one's new workers are starting
            wait_for(
                lambda handled=handled: daemon.log().count("reloading configuration") > handled + 1,
                LIVENESS,
                f"pair {pair}: the second reload to begin",
            )
            pinger.wait_more(5, f"pair {pair}: echoes during the reloads")
        wait_for(lambda: reloads_settled(daemon, 2), 4 * LIVENESS, "the reloads to finish")
        pinger.wait_more(10, "echoes after the reloads")
    finally:
        pinger.finish()
    assert not pinger.errors, pinger.errors
    log = daemon.log()
    handled = log.count("reloading configuration")
    finished = log.count("reload complete") + log.count("reload failed")
    samples = wait_metrics(daemon, lambda m: m[WORKERS] == 2, "2 current workers")
    assert samples[RELOAD_OK] + samples[RELOAD_FAILED] == handled, (
        f"{handled} reloads handled, {finished} logged as finished, but the counters say "
        f"{samples[RELOAD_OK]:.0f} succeeded and {samples[RELOAD_FAILED]:.0f} failed\n{log[-4000:]}"
    )
    assert samples[RESTARTS] == 0
    close_all(pinger.socks)


@pytest.mark.timeout(90)
def test_sigterm_during_a_reload_delivers_pending_echoes(echod):
    clients, size = 4, 4 * MIB
    daemon = echod(workers=2)
    payloads = [os.urandom(size) for _ in range(clients)]
    socks = []
    for _ in range(clients):
        sock = stuck_client(daemon)
        sock.setblocking(True)
        sock.settimeout(4 * LIVENESS)
        socks.append(sock)
    send_errors: list[str] = []

    def send(sock: socket.socket, payload: bytes) -> None:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            send_errors.append(repr(exc))

    senders = [
        threading.Thread(target=send, args=pair, daemon=True) for pair in zip(socks, payloads, strict=True)
    ]
    try:
        for thread in senders:
            thread.start()
        wait_metrics(
            daemon,
            lambda m: m[BUFFERED] >= clients * 256 * KIB,
            "echod to hold pending echoes on every connection",
            timeout=2 * LIVENESS,
        )
        os.kill(daemon.pid, signal.SIGHUP)
        os.kill(daemon.pid, signal.SIGTERM)
        for index, (sock, payload) in enumerate(zip(socks, payloads, strict=True)):
            got = recv_exactly(sock, size)
            assert len(got) == size, f"client {index}: {len(got)} of {size} bytes came back\n{daemon.log()}"
            assert got == payload, f"client {index}: echo differs"
            assert sock.recv(1) == b"", f"client {index}: no EOF after the echo"
        for thread in senders:
            thread.join(LIVENESS)
    finally:
        close_all(socks)
    assert send_errors == []
    assert daemon.wait_exit(2 * LIVENESS) == 0, daemon.log()
    log = daemon.log()
    assert "reloading configuration" in log and "graceful stop" in log, log
    assert "killing worker" not in log, log
    assert "Traceback" not in log, log


@pytest.mark.timeout(60)
def test_sighup_during_stop_is_ignored(echod):
    daemon = echod("--shutdown-timeout", "8", workers=2)
    before = set(daemon.workers())
    sock = daemon.connect(timeout=LIVENESS)
    try:
        assert echo_roundtrip(sock, b"before") == b"before"
        daemon.send_signal(signal.SIGTERM)
        wait_for(lambda: "graceful stop" in daemon.log(), LIVENESS, "the stop to begin")
        for _ in range(20):
            daemon.send_signal(signal.SIGHUP)
            time.sleep(0.02)
        time.sleep(1.0)
        assert echo_roundtrip(sock, b"while stopping") == b"while stopping"
        assert set(daemon.workers()) <= before, "a HUP during the stop started new workers"
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""
    finally:
        sock.close()
    assert daemon.wait_exit(2 * LIVENESS) == 0, daemon.log()
    log = daemon.log()
    stop_at = log.index("graceful stop")
    assert "reloading configuration" not in log[stop_at:], log
    assert "killing worker" not in log, log


# -- metrics endpoint under a slowloris -----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_metrics_slowloris_stalls_neither_metrics_nor_echo(echod):
    daemon = echod(workers=1)
    assert daemon.metrics_port is not None
    request = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slowloris\r\nX-Padding: " + b"a" * 200
    loris = [
        socket.create_connection(("127.0.0.1", daemon.metrics_port), timeout=LIVENESS) for _ in range(20)
    ]
    echo = daemon.connect(timeout=LIVENESS)
    try:
        scrapes = 0
        for second in range(8):
            for sock in loris:
                sock.sendall(request[second : second + 1])  # one header byte per second each
            status, text = daemon.http("/metrics")  # 5 s timeout: a stalled server fails here
            assert status == 200 and ACCEPTED in text
            assert daemon.http("/healthz")[0] == 200
            payload = f"echo {second}".encode()
            assert echo_roundtrip(echo, payload) == payload
            with daemon.connect(timeout=LIVENESS) as fresh:
                assert echo_roundtrip(fresh, b"fresh") == b"fresh"
            scrapes += 1
            time.sleep(1.0)
        assert scrapes == 8
        # The trickling requests are still pending: none of them was answered.
        for sock in loris:
            sock.settimeout(0.2)
            with pytest.raises(TimeoutError):
                sock.recv(1)
    finally:
        close_all([*loris, echo])
    metrics_pid = daemon.metrics_process()
    assert metrics_pid is not None and alive(metrics_pid), "the metrics process died"


@pytest.mark.timeout(90)
def test_splice_without_a_spare_pipe_buffers_in_memory(limited_echod):
    """Splice mode one descriptor short of a pipe: pending output goes to a memory buffer, nothing lost."""
    nofile = 48
    daemon = limited_echod(nofile, "--io-mode", "splice", "--log-level", "debug")
    worker = one_worker(daemon, LIVENESS)
    free = nofile - open_fds(worker)
    held = [daemon.connect(timeout=LIVENESS) for _ in range(free - 2)]
    try:
        for sock in held:  # each one accepted and served
            assert echo_roundtrip(sock, b"x") == b"x"
        pusher = stuck_client(daemon)  # the last descriptor but one: no pipe (two) can be had now
        wait_for(lambda: nofile - open_fds(worker) == 1, LIVENESS, "the pusher to be accepted")
        payload = random.randbytes(4 * MIB)
        sent = 0
        deadline = time.monotonic() + 2 * LIVENESS
        while time.monotonic() < deadline:
            try:
                sent += pusher.send(payload[sent : sent + 64 * KIB])
            except BlockingIOError:
                if daemon.metrics()[BUFFERED]:
                    break
                time.sleep(0.01)
        wait_metrics(daemon, lambda m: m[BUFFERED] > 0, "echod to hold output for the pusher")
        assert nofile - open_fds(worker) == 1, "a pipe was had after all"
        wait_for(lambda: "buffering in memory" in daemon.log(), LIVENESS, "the fallback to be logged")
        pusher.setblocking(True)
        pusher.settimeout(LIVENESS)
        assert recv_exactly(pusher, sent) == payload[:sent], "the echo differs from what was sent"
        pusher.close()
    finally:
        close_all(held)
    assert daemon.workers() == [worker] and "Traceback" not in daemon.log(), daemon.log()
