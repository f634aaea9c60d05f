"""TLS listeners under the limits (issue 17's leftovers): max_connections, max_connections_per_ip on a
plain and a PROXY+TLS listener, a TLS connection across a USR2 upgrade, and the worker's budget for
pending output (max_buffered_bytes) pausing a TLS connection that must read again once drained.

The client is an `ssl.SSLObject` over a non-blocking socket (`Duplex`, tests/test_tls.py): it sends and
reads in one thread, so a test can write far more than the kernel buffers hold before it reads, without
deadlock.
"""

from __future__ import annotations

import random
import re
import signal
import socket
import ssl
import time
from collections.abc import Callable

import pytest
from conftest import (
    Daemon,
    DaemonFactory,
    alive,
    children,
    comm,
    connect_small_buffers,
    one_worker,
    wait_for,
    wait_metrics,
)
from echod.proxy import header_v1, header_v2
from test_tls import ACTIVE, FAILED, IO_TIMEOUT, OK, TLS_ACTIVE, Duplex, Pki, tls_daemon, tls_options

KIB = 1024
MIB = 1024 * KIB
REJECTED_LIMIT = 'echod_connections_rejected_total{reason="limit"}'
REJECTED_PER_IP = 'echod_connections_rejected_total{reason="per_ip"}'
CLOSED_REJECTED = 'echod_connections_closed_total{reason="rejected"}'
CLOSED_TIMEOUT = 'echod_connections_closed_total{reason="timeout"}'
CLOSED_SHUTDOWN = 'echod_connections_closed_total{reason="shutdown"}'
PAUSES = "echod_backpressure_pauses_total"
BUFFERED = "echod_buffered_bytes"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def tcp(daemon: Daemon, source: str = "127.0.0.1", header: bytes = b"") -> socket.socket:
    sock = socket.create_connection((daemon.host, daemon.port), IO_TIMEOUT, source_address=(source, 0))
    sock.sendall(header)  # a PROXY header goes in clear text, before the ClientHello
    return sock


def refused(make: Callable[[], Duplex]) -> None:
    """The connection is closed before (or instead of) a TLS handshake: never served."""
    with pytest.raises((ssl.SSLError, ConnectionError)):
        make().close()


def push_tls_until_stuck(clients: list[Duplex], quiet: float = 1.0, timeout: float = 60.0) -> None:
    """Send what each client holds, never reading, until no byte has moved for `quiet` s.

    Whether echod stopped reading is for its metrics to say (echod_backpressure_pauses_total), not
    what a client has left to send: on loopback the kernel may take all of it, the accepted socket's
    receive buffer growing up to tcp_rmem's maximum (32 MiB here). In runs beside other tests, all
    16 MiB of a client were sent: `ss -tm` showed 12.9 MB waiting in receive buffers autotuned to
    13-19 MB, behind the 3.8 MB echod had written and paused on."""
    deadline = time.monotonic() + timeout
    last = time.monotonic()
    while time.monotonic() - last < quiet:
        assert time.monotonic() < deadline, "the clients kept sending: echod never stopped reading"
        if sum(client.pump(0, read=False) for client in clients):
            last = time.monotonic()
        else:
            time.sleep(0.02)


# -- max_connections ----------------------------------------------------------------------------------
@pytest.mark.integration
def test_max_connections_closes_the_extra_tls_connection_at_accept(echod: DaemonFactory, pki: Pki) -> None:
    daemon = tls_daemon(echod, [tls_options(pki)], "--max-connections", "3", workers=1)
    ctx, rng = pki.client_context(), random.Random(1)
    admitted = [Duplex(tcp(daemon), ctx) for _ in range(3)]
    try:
        wait_metrics(daemon, lambda m: m[TLS_ACTIVE] == 3 and m[OK] == 3, "three TLS connections")
        refused(lambda: Duplex(tcp(daemon), ctx))
        metrics = wait_metrics(daemon, lambda m: m[REJECTED_LIMIT] == 1, "one rejection for the limit")
        assert metrics[ACTIVE] == 3 and metrics[FAILED] == 0, metrics  # closed at accept: no handshake
        for client in admitted:
            payload = rng.randbytes(256 * KIB)
            assert client.echo(payload) == payload
        admitted.pop(0).close()
        wait_metrics(daemon, lambda m: m[ACTIVE] == 2, "one connection closed")
        admitted.append(Duplex(tcp(daemon), ctx))
        assert admitted[-1].echo(b"room again") == b"room again"
        refused(lambda: Duplex(tcp(daemon), ctx))
        metrics = wait_metrics(daemon, lambda m: m[REJECTED_LIMIT] == 2, "a second rejection")
        assert metrics[ACTIVE] == 3 and metrics[OK] == 4 and metrics[FAILED] == 0, metrics
        for client in admitted:
            assert client.echo(b"still here") == b"still here"
    finally:
        for client in admitted:
            client.close()
    wait_metrics(daemon, lambda m: m[ACTIVE] == 0, "every connection closed")


# -- max_connections_per_ip ---------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("proxied", [False, True], ids=["accept-address", "proxy-header"])
def test_per_ip_limit_on_a_tls_listener(echod: DaemonFactory, pki: Pki, proxied: bool) -> None:
    """Per client address: the one accept() gives, or on a PROXY+TLS listener the one the clear-text
    header names (every TCP connection then comes from 127.0.0.1, which must not count)."""
    daemon = tls_daemon(
        echod, [tls_options(pki, proxy_protocol=proxied)], "--max-connections-per-ip", "2", workers=1
    )
    ctx, destination, ports = pki.client_context(), (daemon.host, daemon.port), iter(range(40000, 41000))
    crowded, other = ("198.51.100.7", "198.51.100.8") if proxied else ("127.0.0.1", "127.0.0.2")

    def client(ip: str) -> Duplex:
        if not proxied:
            return Duplex(tcp(daemon, source=ip), ctx)
        port = next(ports)
        header = (header_v1 if port % 2 else header_v2)((ip, port), destination)  # both versions
        return Duplex(tcp(daemon, header=header), ctx)

    opened = [client(crowded), client(crowded)]
    try:
        refused(lambda: client(crowded))
        opened.append(client(other))
        for i, conn in enumerate(opened):
            assert conn.echo(b"client %d" % i) == b"client %d" % i
        metrics = wait_metrics(daemon, lambda m: m[REJECTED_PER_IP] == 1 and m[ACTIVE] == 3, "one rejection")
        assert metrics[OK] == 3 and metrics[FAILED] == 0 and metrics[REJECTED_LIMIT] == 0, metrics
        assert metrics[CLOSED_REJECTED] == (1 if proxied else 0), metrics  # a PROXY one was adopted first
        text = f"max_connections_per_ip reached (the last for {crowded})"
        wait_for(lambda: text in daemon.log(), 10, f"log line with {text!r}")
        opened.pop(0).close()  # frees one of the crowded address's places
        wait_metrics(daemon, lambda m: m[ACTIVE] == 2, "the close")
        opened.append(client(crowded))
        refused(lambda: client(crowded))
        for i, conn in enumerate(opened):
            payload = random.Random(i).randbytes(100 * KIB)
            assert conn.echo(payload) == payload
        metrics = wait_metrics(daemon, lambda m: m[REJECTED_PER_IP] == 2 and m[ACTIVE] == 3, "2 rejections")
        assert metrics[OK] == 4 and metrics[FAILED] == 0, metrics
    finally:
        for conn in opened:
            conn.close()
    wait_metrics(daemon, lambda m: m[ACTIVE] == 0, "every connection closed")


# -- USR2 upgrade -------------------------------------------------------------------------------------
@pytest.mark.integration
def test_tls_connection_stays_with_its_retiring_worker_across_a_usr2_upgrade(
    echod: DaemonFactory, pki: Pki
) -> None:
    daemon = tls_daemon(echod, [tls_options(pki)], "--shutdown-timeout", "60", workers=1)
    ctx, rng, old_master = pki.client_context(), random.Random(3), daemon.pid
    old_worker = one_worker(daemon)
    conn = Duplex(tcp(daemon), ctx)
    try:
        payload = rng.randbytes(MIB)
        assert conn.echo(payload) == payload
        daemon.send_signal(signal.SIGUSR2)
        ready = re.compile(rf"echod\.master\[{old_master}\]: upgrade: new master (\d+) is ready")
        found = wait_for(lambda: ready.search(daemon.log()), 30, "the new master to be ready")
        assert isinstance(found, re.Match)
        new_master = int(found.group(1))
        wait_for(lambda: any(comm(p).startswith("echod-worker") for p in children(new_master)), 10, "worker")
        # The old worker closes its listeners and hands its plain connections over: none, TLS stays.
        handed = re.compile(rf"echod\.worker\[{old_worker}\]: handed 0 connections over to worker \d+")
        wait_for(lambda: handed.search(daemon.log()), 15, "the old worker to stop accepting")
        for size in (1, 64 * KIB, MIB):
            payload = rng.randbytes(size)
            assert conn.echo(payload) == payload, f"{size} bytes after the upgrade"
        fresh = Duplex(tcp(daemon), ctx)  # only the new worker accepts now
        assert fresh.echo(b"new after the upgrade") == b"new after the upgrade"
        fresh.close()
        assert alive(old_worker) and daemon.proc.poll() is None, "the old generation left its TLS connection"
        assert conn.echo(b"still the old worker") == b"still the old worker"
    finally:
        conn.close()
    wait_for(lambda: not alive(old_worker), 15, "the old worker to exit once its TLS connection closed")
    assert daemon.wait_exit(15) == 0
    wait_for(lambda: f"upgrade complete: old master {old_master} has exited" in daemon.log(), 10, "the log")
    fresh = Duplex(tcp(daemon), ctx)
    assert fresh.echo(b"after the old master") == b"after the old master"
    fresh.close()
    metrics = wait_metrics(daemon, lambda m: m[ACTIVE] == 0 and m[OK] == 3, "every connection closed")
    assert metrics["echod_connections_handed_over_total"] == 0 and metrics[CLOSED_SHUTDOWN] == 0, metrics
    assert metrics[FAILED] == 0 and metrics['echod_connections_closed_total{reason="tls"}'] == 0, metrics


# -- max_buffered_bytes -------------------------------------------------------------------------------
@pytest.mark.integration
def test_tls_connection_paused_by_the_worker_budget_reads_again_once_drained(
    echod: DaemonFactory, pki: Pki
) -> None:
    """Regression (9fc5408): a TLS connection paused by the worker's budget (not its own watermark)
    stayed paused once its output drained while other connections kept the worker over budget: with
    nothing pending nothing re-armed it, and it stalled until idle_timeout."""
    high, budget, idle = 64 * KIB, 64 * KIB, 120
    daemon = tls_daemon(
        echod, [tls_options(pki)], "--write-buffer-high", str(high), "--write-buffer-low", str(16 * KIB),
        "--read-size", str(16 * KIB), "--max-buffered-bytes", str(budget), "--idle-timeout", str(idle),
        workers=1,
    )  # fmt: skip
    ctx = pki.client_context()
    # Two clients that never read hold the worker's budget for the whole test.
    hogs = [Duplex(connect_small_buffers(daemon, timeout=IO_TIMEOUT), ctx) for _ in range(2)]
    victim = Duplex(connect_small_buffers(daemon, timeout=IO_TIMEOUT), ctx)
    try:
        for hog in hogs:
            hog.send(random.randbytes(16 * MIB))
        push_tls_until_stuck(hogs)
        held = wait_metrics(daemon, lambda m: m[BUFFERED] > budget and m[PAUSES] >= 2, "the budget spent")
        payload = random.Random(4).randbytes(16 * MIB)
        victim.send(payload)
        push_tls_until_stuck([victim])
        wait_metrics(daemon, lambda m: m[PAUSES] > held[PAUSES], "the victim paused")
        # Now it reads: each time its output drains, echod must read from it again, budget or not.
        started = time.monotonic()
        got = victim.wait_echo(len(payload), timeout=30)
        echoed, waited = len(got), time.monotonic() - started
        assert echoed == len(payload), (
            f"{echoed} of {len(payload)} bytes echoed within {waited:.0f} s "
            f"(idle_timeout {idle} s): the paused TLS connection stalled"
        )
        assert got == payload, "echo differs"
        metrics = daemon.metrics()
        assert metrics[CLOSED_TIMEOUT] == 0 and metrics[BUFFERED] > budget, metrics  # hogs still hold it
    finally:
        for client in (victim, *hogs):
            client.close()
    wait_metrics(daemon, lambda m: m[ACTIVE] == 0 and m[BUFFERED] == 0, "every connection closed")
