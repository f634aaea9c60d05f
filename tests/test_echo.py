"""Echo behaviour of the real `echod run` over real loopback sockets (RFC 862 and the operator contract).

Every test talks to a spawned daemon through real TCP sockets and reads its Prometheus endpoint. Socket
timeouts and `wait_for` deadlines turn a hang into a failure; nothing here asserts speed.
"""

from __future__ import annotations

import contextlib
import os
import random
import selectors
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import (
    Daemon,
    DaemonFactory,
    connect_small_buffers,
    echo_roundtrip,
    free_port,
    has_ipv6,
    one_worker,
    open_fds,
    push_until_stuck,
    recv_exactly,
    rss_bytes,
    stop_process,
    wait_for,
    wait_metrics,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


@pytest.fixture(params=["copy", "splice", "auto"])
def echod(request: pytest.FixtureRequest, echod: DaemonFactory) -> DaemonFactory:
    """Every test here runs in each I/O mode: os.read/os.write, splice(2) through pipes, and auto."""

    def start(*extra: str, **kwargs: Any) -> Daemon:
        daemon = echod("--io-mode", request.param, *extra, **kwargs)
        daemon.io_mode = request.param  # type: ignore[attr-defined]
        return daemon

    return start


KIB = 1024
MIB = 1024 * KIB

ACCEPTED = "echod_connections_accepted_total"
ACTIVE = "echod_connections_active"
BUFFERED = "echod_buffered_bytes"
RECEIVED = "echod_received_bytes_total"
SENT = "echod_sent_bytes_total"
PAUSES = "echod_backpressure_pauses_total"
DROPPED = "echod_dropped_bytes_total"
RESTARTS = "echod_worker_restarts_total"
REJECTED_LIMIT = 'echod_connections_rejected_total{reason="limit"}'


def closed(reason: str) -> str:
    return f'echod_connections_closed_total{{reason="{reason}"}}'


# -- helpers ------------------------------------------------------------------------------------------


def assert_same_bytes(got: bytes | bytearray, expected: bytes, what: str = "echo") -> None:
    """Byte-exact comparison that reports sizes and the first differing offset instead of a huge diff."""
    if got == expected:
        return
    common = min(len(got), len(expected))
    first = common
    step = 64 * KIB
    for start in range(0, common, step):
        if got[start : start + step] != expected[start : start + step]:
            end = min(start + step, common)
            first = next((i for i in range(start, end) if got[i] != expected[i]), end)
            break
    raise AssertionError(
        f"{what}: got {len(got)} bytes, expected {len(expected)}; first difference at offset {first}"
    )


def recv_or_reset(sock: socket.socket, size: int = 1) -> bytes:
    """recv(), reading a reset by the peer as the end of the stream."""
    try:
        return sock.recv(size)
    except ConnectionResetError:
        return b""


def sleep_until_fraction(fraction: float) -> None:
    """Sleep until CLOCK_MONOTONIC (shared by every process on the host) reaches `fraction` of a second."""
    now = time.monotonic()
    target = int(now) + fraction
    if target < now + 0.05:
        target += 1
    time.sleep(target - now)


# -- byte-exact echo ----------------------------------------------------------------------------------


def test_echo_one_byte(echod):
    daemon = echod(workers=1)
    with daemon.connect(timeout=5) as sock:
        assert echo_roundtrip(sock, b"\xa5") == b"\xa5"
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(16) == b"", "echod sent more than the one byte it was given"


def test_echo_10_mib_with_concurrent_reader(echod):
    daemon = echod(workers=1)
    payload = os.urandom(10 * MIB)
    received = bytearray()
    errors: list[BaseException] = []
    eof = threading.Event()

    with daemon.connect(timeout=15) as sock:

        def reader() -> None:
            try:
                while True:
                    data = sock.recv(MIB)
                    if not data:
                        eof.set()
                        return
                    received.extend(data)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        thread.join(20)
        assert not thread.is_alive(), f"reader still waiting after 20 s with {len(received)} bytes"
    assert not errors, errors
    assert eof.is_set(), "no EOF after the echo of a half-closed connection"
    assert_same_bytes(received, payload)


@dataclass
class Peer:
    sock: socket.socket
    payload: bytes
    sent: int = 0
    received: bytearray = field(default_factory=bytearray)


def test_500_concurrent_connections_random_chunks(echod):
    daemon = echod(workers=2)
    wait_for(lambda: len(daemon.workers()) == 2, 10, "two workers")
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    peers: list[Peer] = []
    sel = selectors.DefaultSelector()
    try:
        for _ in range(500):
            sock = daemon.connect(timeout=5)
            sock.setblocking(False)
            peer = Peer(sock, rng.randbytes(rng.randint(1, 48 * KIB)))
            peers.append(peer)
            sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, peer)

        open_peers = len(peers)
        deadline = time.monotonic() + 20
        while open_peers:
            assert time.monotonic() < deadline, (
                f"seed {seed}: {open_peers} of {len(peers)} connections unfinished after 20 s"
            )
            for key, mask in sel.select(timeout=1.0):
                peer = key.data
                if mask & selectors.EVENT_WRITE and peer.sent < len(peer.payload):
                    chunk = rng.randint(1, 8 * KIB)
                    try:
                        peer.sent += peer.sock.send(peer.payload[peer.sent : peer.sent + chunk])
                    except BlockingIOError:
                        pass
                    if peer.sent == len(peer.payload):
                        peer.sock.shutdown(socket.SHUT_WR)
                        sel.modify(peer.sock, selectors.EVENT_READ, peer)
                if mask & selectors.EVENT_READ:
                    try:
                        data = peer.sock.recv(rng.randint(1, 64 * KIB))
                    except BlockingIOError:
                        continue
                    if not data:
                        sel.unregister(peer.sock)
                        open_peers -= 1
                        continue
                    start = len(peer.received)
                    peer.received += data
                    assert data == peer.payload[start : start + len(data)], (
                        f"seed {seed}: wrong bytes at offset {start} of a {len(peer.payload)}-byte stream"
                    )
    finally:
        sel.close()
        for peer in peers:
            peer.sock.close()

    for index, peer in enumerate(peers):
        assert peer.sent == len(peer.payload)
        assert_same_bytes(peer.received, peer.payload, f"seed {seed}, connection {index}")
    total = sum(len(peer.payload) for peer in peers)
    wait_metrics(
        daemon,
        lambda m: (
            m[ACCEPTED] == 500 and m[closed("client")] == 500 and m[RECEIVED] == total and m[SENT] == total
        ),
        f"500 accepted and closed by the client, {total} bytes received and sent",
    )


# -- what arrives while the worker is not looking: one epoll event for many reads -----------------------


def queue_while_stopped(daemon: Daemon, sock: socket.socket, payload: bytes, fin: bool) -> bytes:
    """Send what echod's receive queue takes while its worker is SIGSTOPped (then the FIN, if `fin`), so
    that it all reaches the worker as one epoll event. Returns the part of `payload` that was sent."""
    worker = one_worker(daemon)
    sock.setblocking(False)
    sent = 0
    stop_process(worker)
    try:
        with contextlib.suppress(BlockingIOError):
            while sent < len(payload):
                sent += sock.send(payload[sent : sent + 65536])
        if fin:
            sock.shutdown(socket.SHUT_WR)
        time.sleep(0.2)  # let every segment (and the FIN) land in echod's receive queue
    finally:
        os.kill(worker, signal.SIGCONT)
    sock.settimeout(10)
    return payload[:sent]


@pytest.mark.parametrize("size", [100, 256 * KIB])
def test_data_and_eof_reported_together_are_both_served(echod, size):
    # Data and FIN that arrive together come as one event (EPOLLIN|EPOLLRDHUP), and the larger payload
    # also takes many full 1 KiB reads with nothing new arriving between them. A loop that waited for
    # more news (edge triggering without care) would leave the echo or the EOF unserved until the idle
    # timeout: the test hangs.
    daemon = echod("--read-size", "1024", workers=1)
    with connect_small_buffers(daemon, timeout=10) as sock:
        assert echo_roundtrip(sock, b"registered") == b"registered"
        payload = queue_while_stopped(daemon, sock, random.Random(size).randbytes(size), fin=True)
        assert len(payload) >= min(size, 16 * KIB), f"only {len(payload)} bytes queued"
        echoed = recv_exactly(sock, len(payload) + 1)  # stops early at EOF; one more byte would be extra
        assert_same_bytes(echoed, payload, "echo of what came with the FIN")
        assert sock.recv(16) == b"", "no EOF after the echo"
    wait_metrics(daemon, lambda m: m[closed("client")] == 1 and m[ACTIVE] == 0, "the connection closed")


def test_data_behind_urgent_byte_is_echoed(echod):
    # TCP's recvmsg stops at the urgent mark, so a short read has not emptied the socket when urgent data
    # is pending (a loop that took it for "empty", edge triggering's rule, would stall what follows).
    # Without SO_OOBINLINE the urgent byte itself is not part of the stream echod reads, nor echoes.
    # splice(2) never steps over the mark: in splice mode (and auto, once 64 KiB reads moved the
    # connection to splice) echod must read past it instead of spinning on a socket it cannot splice.
    daemon = echod(workers=1)
    worker = one_worker(daemon)
    bulk = random.Random(5).randbytes(64 * KIB)
    with daemon.connect(timeout=10) as sock:
        assert echo_roundtrip(sock, b"registered") == b"registered"
        sock.sendall(bulk)
        assert_same_bytes(recv_exactly(sock, len(bulk)), bulk, "bulk echo")
        stop_process(worker)
        try:
            sock.sendall(bulk[: 8 * KIB])  # large enough for auto mode to stay in splice mode
            sock.send(b"!", socket.MSG_OOB)
            sock.sendall(b"def")
            time.sleep(0.2)  # let all three land in echod's receive queue
        finally:
            os.kill(worker, signal.SIGCONT)
        assert_same_bytes(recv_exactly(sock, 8 * KIB + 3), bulk[: 8 * KIB] + b"def", "echo around the mark")
        assert echo_roundtrip(sock, b"still here") == b"still here"


def test_burst_of_many_reads_is_echoed_without_more_traffic(echod):
    # A burst queued at once and nothing after it: every read but the last is full, and edge-triggered
    # epoll would say nothing more until the client sends again, which this client does not do.
    daemon = echod("--read-size", "1024", workers=1)
    with connect_small_buffers(daemon, timeout=10) as sock:
        assert echo_roundtrip(sock, b"registered") == b"registered"
        payload = queue_while_stopped(daemon, sock, random.Random(3).randbytes(256 * KIB), fin=False)
        assert len(payload) >= 16 * KIB, f"only {len(payload)} bytes queued"
        assert_same_bytes(recv_exactly(sock, len(payload)), payload, "echo of the burst")
        assert echo_roundtrip(sock, b"still here") == b"still here"


# -- half-close, reset, backpressure -------------------------------------------------------------------


def test_half_close_returns_everything_then_eof(echod):
    # The client writes all 6 MiB before it reads a byte, with small socket buffers of its own, so the echo
    # does not fit in the kernel's buffers and echod has to hold part of it. An echo server that honours
    # its write buffer high watermark must stop reading from a client that does not read (the contract's
    # backpressure), so for this client not to deadlock the watermark is set above what it sends.
    daemon = echod("--write-buffer-high", str(16 * MIB), "--write-buffer-low", str(MIB), workers=1)
    payload = os.urandom(6 * MIB)
    with connect_small_buffers(daemon, timeout=15) as sock:
        sock.sendall(payload)
        wait_metrics(
            daemon, lambda m: m[BUFFERED] > 0, "echod to hold the part of the echo the kernel cannot"
        )
        sock.shutdown(socket.SHUT_WR)
        echoed = recv_exactly(sock, len(payload) + 1)  # stops early at EOF; one more byte would be extra
        assert_same_bytes(echoed, payload, "echo after half-close")
        assert sock.recv(16) == b"", "no EOF after the echo"
    wait_metrics(
        daemon,
        lambda m: (
            m[closed("client")] == 1 and m[closed("error")] == 0 and m[DROPPED] == 0 and m[BUFFERED] == 0
        ),
        "one connection closed with reason client, nothing dropped",
    )


def test_reset_mid_stream(echod):
    daemon = echod(workers=1)
    worker = one_worker(daemon)
    bystander = daemon.connect(timeout=5)
    assert echo_roundtrip(bystander, b"before") == b"before"
    wait_metrics(daemon, lambda m: m[ACTIVE] == 1, "the bystander to be counted as active")
    fds_before = open_fds(worker)

    victim = daemon.connect(timeout=5)
    victim.setblocking(False)
    pushed = push_until_stuck([victim], 64 * MIB, time.monotonic() + 10)
    assert pushed > 0
    wait_metrics(daemon, lambda m: m[BUFFERED] > 0, "echod to hold output for the victim")
    # In splice mode a connection holds a pipe (two more descriptors) while its output is pending; in
    # auto mode too once its reads were large, unless the output stuck in a copy-mode buffer first.
    expected = {"copy": {1}, "splice": {3}, "auto": {1, 3}}[daemon.io_mode]
    assert open_fds(worker) - fds_before in expected, (open_fds(worker), fds_before)

    # Abortive close: RST while echod still has output pending for this connection.
    victim.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    victim.close()

    wait_metrics(
        daemon,
        lambda m: m[closed("error")] == 1 and m[ACTIVE] == 1 and m[BUFFERED] == 0 and m[DROPPED] > 0,
        "the reset to be counted (reason error, dropped bytes) and its buffer released",
    )
    wait_for(lambda: open_fds(worker) == fds_before, 10, f"worker fds back to {fds_before}")
    assert daemon.proc.poll() is None, daemon.log()
    assert daemon.workers() == [worker], "the worker died on a reset"
    assert daemon.metrics()[RESTARTS] == 0

    assert echo_roundtrip(bystander, b"after reset") == b"after reset"
    with daemon.connect(timeout=5) as fresh:
        assert echo_roundtrip(fresh, b"fresh") == b"fresh"
    bystander.close()
    assert "Traceback" not in daemon.log(), daemon.log()
    # SPEC: bytes lost to a client reset are counted *and logged* (one line per second, not per event).
    wait_for(lambda: "bytes read but not echoed" in daemon.log(), 5, "the drop to be logged")


def test_slow_readers_bounded_memory(echod):
    high, low, read_size, clients = 64 * KIB, 16 * KIB, 16 * KIB, 200
    # Each client sends more than the kernel can hold for it on loopback: echod's own socket send buffer
    # autotunes to about 4 MiB (net.ipv4.tcp_wmem) whatever the client does, so 2 MiB per client would
    # all fit there and echod would never have to stop reading.
    per_client = 6 * MIB
    daemon = echod(
        "--write-buffer-high", str(high), "--write-buffer-low", str(low), "--read-size", str(read_size),
        workers=1,
    )  # fmt: skip
    worker = one_worker(daemon)
    with daemon.connect(timeout=5) as warm:
        payload = os.urandom(64 * KIB)
        assert_same_bytes(echo_roundtrip(warm, payload), payload, "warm-up echo")
    rss_before = rss_bytes(worker)

    stuck: list[socket.socket] = []
    try:
        for _ in range(clients):
            stuck.append(connect_small_buffers(daemon))
        pushed = push_until_stuck(stuck, per_client, time.monotonic() + 15, quiet=1.0)
        samples = wait_metrics(
            daemon,
            lambda m: m[ACTIVE] == clients and m[PAUSES] > 0,
            "backpressure pauses with every slow reader connected",
        )
        # Pending output can never exceed high + one read per connection; RSS may add allocator slack.
        assert samples[BUFFERED] <= clients * (high + read_size), samples[BUFFERED]
        bound = clients * (high + read_size) + 24 * MIB
        growth = 0
        for _ in range(10):  # the peak over a second, while echod is still settling
            growth = max(growth, rss_bytes(worker) - rss_before)
            time.sleep(0.1)
        assert growth < bound, (
            f"worker RSS grew by {growth / MIB:.1f} MiB (bound {bound / MIB:.1f} MiB) while "
            f"{clients} clients pushed {pushed / MIB:.1f} MiB without reading"
        )

        # While they are stuck, a fresh client still gets its echo.
        with daemon.connect(timeout=5) as fresh:
            payload = os.urandom(32 * KIB)
            assert_same_bytes(echo_roundtrip(fresh, payload), payload, "echo while 200 readers are stuck")
    finally:
        for sock in stuck:
            sock.close()
    wait_metrics(daemon, lambda m: m[ACTIVE] == 0 and m[BUFFERED] == 0, "all slow readers gone")


# -- idle timeout and connection limit -----------------------------------------------------------------


def test_idle_timeout_closes_idle_but_not_talking_connection(echod):
    daemon = echod("--idle-timeout", "2", workers=1)
    idle = daemon.connect(timeout=5)
    talker = daemon.connect(timeout=5)
    assert echo_roundtrip(idle, b"hi") == b"hi"
    idle_since = time.monotonic()
    idle.setblocking(False)
    idle_closed_after: float | None = None

    end = idle_since + 5.5  # well past twice the timeout
    while time.monotonic() < end:
        payload = os.urandom(32)
        assert echo_roundtrip(talker, payload) == payload, "the talking connection lost its echo"
        if idle_closed_after is None:
            try:
                data = idle.recv(16)
            except BlockingIOError:
                pass
            except ConnectionResetError:
                idle_closed_after = time.monotonic() - idle_since
            else:
                assert data == b"", f"unexpected bytes on the idle connection: {data!r}"
                idle_closed_after = time.monotonic() - idle_since
        time.sleep(0.5)

    assert idle_closed_after is not None, "the idle connection was not closed within 5.5 s (timeout 2 s)"
    payload = os.urandom(32)
    assert echo_roundtrip(talker, payload) == payload
    wait_metrics(
        daemon,
        lambda m: m[closed("timeout")] == 1 and m[ACTIVE] == 1,
        "exactly one timeout close, the talker still open",
    )
    idle.close()
    talker.close()


def test_idle_timeout_counts_from_last_traffic(echod):
    # A connection must be idle for the whole idle_timeout before echod closes it. Workers reap idle
    # connections in their once-a-second housekeeping; SIGUSR1 (reopen the log) makes them run it at once,
    # which pins its phase on CLOCK_MONOTONIC so that this check does not depend on luck.
    timeout = 2.0
    daemon = echod("--idle-timeout", str(int(timeout)), workers=1)
    one_worker(daemon)
    sleep_until_fraction(0.05)
    daemon.send_signal(signal.SIGUSR1)
    sleep_until_fraction(0.93)
    with daemon.connect(timeout=8) as sock:
        assert echo_roundtrip(sock, b"x") == b"x"
        last_traffic = time.monotonic()
        assert recv_or_reset(sock) == b""
        idle_for = time.monotonic() - last_traffic
    assert idle_for >= timeout - 0.25, (
        f"closed after only {idle_for:.2f} s of idleness with idle_timeout = {timeout:.0f} s"
    )
    wait_metrics(daemon, lambda m: m[closed("timeout")] == 1, "one timeout close")


def test_max_connections(echod):
    daemon = echod("--max-connections", "5", workers=1)
    admitted = [daemon.connect(timeout=5) for _ in range(5)]
    try:
        for index, sock in enumerate(admitted):
            payload = f"conn {index}".encode()
            assert echo_roundtrip(sock, payload) == payload

        with daemon.connect(timeout=5) as extra:
            try:
                data = recv_or_reset(extra, 16)
            except TimeoutError:
                pytest.fail("the 6th connection was left open beyond max_connections = 5")
            assert data == b"", data
        wait_metrics(
            daemon, lambda m: m[REJECTED_LIMIT] == 1 and m[ACTIVE] == 5, "one rejection for the limit, 5 open"
        )
        for sock in admitted:
            assert echo_roundtrip(sock, b"still here") == b"still here"

        admitted.pop(0).close()
        wait_metrics(daemon, lambda m: m[closed("client")] == 1 and m[ACTIVE] == 4, "one client close")
        replacement = daemon.connect(timeout=5)
        admitted.append(replacement)
        assert echo_roundtrip(replacement, b"room again") == b"room again"
        wait_metrics(
            daemon,
            lambda m: m[ACTIVE] == 5 and m[REJECTED_LIMIT] == 1,
            "the replacement admitted, not rejected",
        )
    finally:
        for sock in admitted:
            sock.close()


# -- listen addresses ----------------------------------------------------------------------------------


def test_two_listen_addresses(echod):
    p1, p2 = free_port("127.0.0.1"), free_port("127.0.0.2")
    daemon = echod(listen=[f"127.0.0.1:{p1}", f"127.0.0.2:{p2}"], workers=1)
    for index, address in enumerate([("127.0.0.1", p1), ("127.0.0.2", p2)]):
        with daemon.connect(index, timeout=5) as sock:
            assert sock.getpeername() == address
            payload = os.urandom(4 * KIB)
            assert_same_bytes(echo_roundtrip(sock, payload), payload, f"echo on {address}")
    wait_metrics(daemon, lambda m: m[ACCEPTED] == 2, "one connection accepted per address")


def test_ipv6_loopback(echod):
    if not has_ipv6():
        pytest.skip("this host has no IPv6 loopback")
    port = free_port("::1")
    daemon = echod(listen=[f"[::1]:{port}"], workers=1)
    with daemon.connect(timeout=5) as sock:
        assert sock.family == socket.AF_INET6
        assert sock.getpeername()[:2] == ("::1", port)
        payload = os.urandom(4 * KIB)
        assert_same_bytes(echo_roundtrip(sock, payload), payload, "echo over IPv6")


# -- counters ------------------------------------------------------------------------------------------


def test_byte_and_connection_counters_match_traffic(echod):
    daemon = echod(workers=2)
    rng = random.Random()
    connections = 24
    total = 0
    for _ in range(connections):
        with daemon.connect(timeout=5) as sock:
            payload = rng.randbytes(rng.randint(1, 200 * KIB))
            for start in range(0, len(payload), 16 * KIB):
                chunk = payload[start : start + 16 * KIB]
                assert_same_bytes(echo_roundtrip(sock, chunk), chunk)
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(1) == b""
            total += len(payload)
    samples = wait_metrics(
        daemon,
        lambda m: m[ACCEPTED] == connections and m[closed("client")] == connections and m[SENT] == total,
        f"{connections} connections accepted and closed, {total} bytes sent",
    )
    assert samples[RECEIVED] == samples[SENT] == total
    assert samples[ACTIVE] == 0
    assert samples[BUFFERED] == 0
    for reason in ("timeout", "error", "shutdown"):
        assert samples[closed(reason)] == 0, reason


# -- fairness ------------------------------------------------------------------------------------------


def _loop_in_thread(
    stop: threading.Event, errors: list[BaseException], step: Callable[[], None]
) -> threading.Thread:
    def body() -> None:
        try:
            while not stop.is_set():
                step()
        except BaseException as exc:
            if not stop.is_set():
                errors.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread


def test_flood_does_not_starve_pingers(echod):
    daemon = echod(workers=1)
    one_worker(daemon)
    stop = threading.Event()
    errors: list[BaseException] = []
    counts = {"stuck": 0, "duplex_sent": 0, "duplex_read": 0}
    block = os.urandom(256 * KIB)

    # A flood that sends continuously and never reads (echod must stop reading it: backpressure) ...
    stuck = daemon.connect(timeout=5)
    stuck.setblocking(False)
    stuck_sel = selectors.DefaultSelector()
    stuck_sel.register(stuck, selectors.EVENT_WRITE)

    def push_stuck() -> None:
        if stuck_sel.select(timeout=0.1):
            try:
                counts["stuck"] += stuck.send(block)
            except BlockingIOError:
                pass

    # ... and one that sends and reads as fast as it can, so that the worker always has work to do.
    duplex = daemon.connect(timeout=10)

    def push_duplex() -> None:
        duplex.sendall(block)
        counts["duplex_sent"] += len(block)

    def drain_duplex() -> None:
        data = duplex.recv(MIB)
        if not data:
            raise AssertionError("echod closed the duplex flood")
        counts["duplex_read"] += len(data)

    threads = [_loop_in_thread(stop, errors, step) for step in (push_stuck, push_duplex, drain_duplex)]
    pingers = [daemon.connect(timeout=5) for _ in range(4)]
    try:
        wait_for(
            lambda: counts["stuck"] > MIB and counts["duplex_read"] > MIB, 10, "both floods to get going"
        )
        for _ in range(25):
            for sock in pingers:
                payload = os.urandom(64)
                # The socket timeout (5 s) is the latency bound: a starved pinger fails here.
                assert echo_roundtrip(sock, payload) == payload, "a pinger lost its echo during the flood"
            time.sleep(0.05)
        assert not errors, errors
        duplex_before = counts["duplex_read"]
        wait_for(lambda: counts["duplex_read"] > duplex_before, 5, "the duplex flood to keep flowing")
        samples = wait_metrics(
            daemon, lambda m: m[PAUSES] > 0, "the stuck flood to be paused by backpressure"
        )
        assert samples[ACTIVE] == 6
    finally:
        stop.set()
        for sock in (stuck, duplex):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in send or recv
        for thread in threads:
            thread.join(6)
        stuck_sel.close()
        for sock in [stuck, duplex, *pingers]:
            sock.close()
    assert not errors, errors
    assert daemon.proc.poll() is None, daemon.log()
