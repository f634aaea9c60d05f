"""UDP echo of the real daemon (`udp_listen`) and its reflection guards, over real loopback datagrams.

Every guard is shown from the outside: what a client gets back, and what /metrics counts. Sources are
told apart by their address, so the tests use several addresses of 127.0.0.0/8 (all of it is loopback).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Daemon, DaemonFactory, free_port, has_ipv6, rss_bytes, wait_for, wait_metrics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

RX = "echod_udp_received_packets_total"
RX_BYTES = "echod_udp_received_bytes_total"
TX = "echod_udp_sent_packets_total"
TX_BYTES = "echod_udp_sent_bytes_total"
RESTARTS = "echod_worker_restarts_total"
# Seconds of token refill allowed beyond the client's own sending time: the worker may be scheduled
# late on a busy machine. Small against what the tests tell apart (2x the rate, or no limit at all).
SLACK_S = 0.5


def dropped(reason: str) -> str:
    return f'echod_udp_dropped_packets_total{{reason="{reason}"}}'


def free_udp_port(host: str = "127.0.0.1") -> int:
    return free_port(host, socket.SOCK_DGRAM)


def client(source: str = "127.0.0.1", port: int = 0, timeout: float = 2.0) -> socket.socket:
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((source, port))
    sock.settimeout(timeout)
    return sock


def answers(sock: socket.socket, quiet: float = 0.5) -> list[tuple[bytes, tuple]]:
    """Every datagram that arrives until none has for `quiet` seconds."""
    got = []
    sock.settimeout(quiet)
    try:
        while True:
            got.append(sock.recvfrom(70000))
    except TimeoutError:
        return got


@pytest.fixture
def udp_echod(echod: DaemonFactory) -> Iterator[Callable[..., tuple[Daemon, tuple[str, int]]]]:
    def start(*extra: str, workers: int = 1, host: str = "127.0.0.1") -> tuple[Daemon, tuple[str, int]]:
        address = (host, free_udp_port(host))
        text = f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
        return echod("--udp-listen", text, *extra, workers=workers), address

    yield start


def test_udp_echoes_each_datagram_exactly(udp_echod) -> None:
    daemon, address = udp_echod(workers=2)
    sizes = [1, 64, 1400, 9000, 60000]
    with client() as sock:
        for size in sizes:
            payload = os.urandom(size)
            sock.sendto(payload, address)
            data, source = sock.recvfrom(70000)
            assert data == payload, f"{size}-byte datagram echoed as {len(data)} bytes"
            assert source == address, "the reply must come from the address the client sent to"
    total = sum(sizes)
    wait_metrics(
        daemon,
        lambda m: (
            m[RX] == len(sizes) and m[TX] == len(sizes) and m[RX_BYTES] == total and m[TX_BYTES] == total
        ),
        "every datagram counted in and out",
    )
    # TCP on the same daemon is unaffected.
    with daemon.connect(timeout=5) as tcp:
        tcp.sendall(b"tcp too")
        assert tcp.recv(16) == b"tcp too"


@pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback on this machine")
def test_udp_over_ipv6(udp_echod) -> None:
    _daemon, address = udp_echod(host="::1")
    with client("::1") as sock:
        sock.sendto(b"six", address)
        data, _ = sock.recvfrom(100)
    assert data == b"six"


def test_datagrams_from_well_known_ports_are_never_answered(udp_echod) -> None:
    """Spoofed echo/chargen sources would make two servers bounce datagrams forever."""
    daemon, address = udp_echod()
    low = next(port for port in range(1000, 1023) if _bindable_udp(port))
    with client(port=low, timeout=1) as sock:
        for _ in range(5):
            sock.sendto(b"loop?", address)
        assert answers(sock) == [], "a datagram from a port below 1024 was answered"
    wait_metrics(daemon, lambda m: m[dropped("source_port")] == 5 and m[TX] == 0, "5 drops for the port")
    with client() as sock:  # an ordinary port still gets its echo
        sock.sendto(b"fine", address)
        assert sock.recvfrom(100)[0] == b"fine"


def test_datagrams_from_our_own_udp_port_are_never_answered(udp_echod) -> None:
    """Two echo servers on the same port would bounce one spoofed datagram between them for ever."""
    daemon, address = udp_echod()
    with client("127.0.0.9", port=address[1], timeout=1) as sock:  # another address, echod's own port
        sock.sendto(b"ping-pong?", address)
        assert answers(sock) == []
    wait_metrics(daemon, lambda m: m[dropped("source_port")] == 1 and m[TX] == 0, "the drop counted")


def test_rate_limit_holds_across_workers_whatever_the_source_port(udp_echod) -> None:
    """The kernel would spread one address's source ports over the workers, each with its own
    buckets; echod steers datagrams by source address, so the limit holds for the whole daemon."""
    rate, ports, sent = 20, 16, 160
    daemon, address = udp_echod("--udp-rate-packets", str(rate), workers=2)
    socks = [client("127.0.0.10") for _ in range(ports)]
    try:
        start = time.monotonic()
        for i in range(sent):
            socks[i % ports].sendto(b"%d" % i, address)
        elapsed = time.monotonic() - start
        time.sleep(0.5)
        got = 0
        for sock in socks:
            sock.setblocking(False)
            while True:
                try:
                    sock.recvfrom(100)
                except BlockingIOError:
                    break
                got += 1
    finally:
        for sock in socks:
            sock.close()
    bound = rate + int(rate * (elapsed + SLACK_S)) + 1
    assert rate <= got <= bound, f"{got} of {sent} answered from {ports} ports, expected {rate}..{bound}"
    wait_metrics(daemon, lambda m: m[TX] == got and m[dropped("rate_limit")] == sent - got, "counted")


def _bindable_udp(port: int) -> bool:
    try:
        client(port=port).close()
    except OSError:
        return False
    return True


def test_rate_limit_per_source_in_datagrams(udp_echod) -> None:
    rate, sent = 20, 200
    daemon, address = udp_echod("--udp-rate-packets", str(rate))
    with client("127.0.0.2") as flood, client("127.0.0.3") as other:
        start = time.monotonic()
        for i in range(sent):
            flood.sendto(b"%d" % i, address)
        elapsed = time.monotonic() - start
        got = answers(flood)
        # One second of burst, plus what refills while the flood is being sent.
        bound = rate + int(rate * (elapsed + SLACK_S)) + 1
        assert rate <= len(got) <= bound, f"{len(got)} of {sent} answered, expected {rate}..{bound}"
        other.sendto(b"someone else", address)  # the flood's bucket is not shared with another source
        assert other.recvfrom(100)[0] == b"someone else"
    wait_metrics(
        daemon,
        lambda m: m[dropped("rate_limit")] == sent - len(got) and m[TX] == len(got) + 1,
        "every unanswered datagram counted as rate_limit",
    )
    # The bucket refills: a second later the same source is answered again.
    time.sleep(1.1)
    with client("127.0.0.2") as again:
        again.sendto(b"later", address)
        assert again.recvfrom(100)[0] == b"later"


def test_rate_limit_per_source_in_bytes(udp_echod) -> None:
    daemon, address = udp_echod("--udp-rate-bytes", "10000", "--udp-rate-packets", "1000")
    with client("127.0.0.4") as sock:
        for _ in range(10):
            sock.sendto(b"x" * 2000, address)
        got = answers(sock)
        # 10,000 bytes per second: 5 of 2,000 bytes at once, one more per 0.2 s the worker takes.
        assert 5 <= len(got) <= 5 + int(SLACK_S / 0.2), f"{len(got)} answered"
        sock.sendto(b"y" * 20000, address)  # larger than a whole second's budget: never answered
        assert answers(sock) == []
    wait_metrics(daemon, lambda m: m[dropped("rate_limit")] == 11 - len(got), "byte-rate drops counted")


def test_source_table_is_bounded(udp_echod) -> None:
    """More sources than udp_max_sources: the newcomers get nothing until some go quiet."""
    daemon, address = udp_echod("--udp-max-sources", "2")
    a, b, c = client("127.0.0.5"), client("127.0.0.6"), client("127.0.0.7")
    try:
        for sock in (a, b):
            sock.sendto(b"hello", address)
            assert sock.recvfrom(100)[0] == b"hello"
        c.sendto(b"third", address)
        assert answers(c) == [], "a third source was answered with udp_max_sources = 2"
        wait_metrics(daemon, lambda m: m[dropped("too_many_sources")] == 1, "the third source counted")

        def third_answered() -> bool:
            c.sendto(b"later", address)
            return any(data == b"later" for data, _ in answers(c, quiet=0.3))

        wait_for(third_answered, 10, "the third source to be answered once the others went quiet")
    finally:
        for sock in (a, b, c):
            sock.close()


def test_spoofed_source_flood_keeps_memory_bounded(udp_echod) -> None:
    """Thousands of source addresses (127.x.y.z) against a 1,000-source table: RSS stays put."""
    daemon, address = udp_echod("--udp-max-sources", "1000")
    worker = wait_for(daemon.workers, 10, "a worker")[0]
    with client() as warm:
        warm.sendto(b"warm", address)
        warm.recvfrom(100)
    before = rss_bytes(worker)
    sources = [f"127.{i // 250 + 10}.{i % 250 + 1}.1" for i in range(4000)]
    start = time.monotonic()
    for i, source in enumerate(sources):
        with client(source) as sock:
            sock.sendto(b"spoof", address)
        if i % 100 == 99:  # paced, so that the kernel's receive buffer has no reason to drop any
            time.sleep(0.01)
    elapsed = time.monotonic() - start
    last: list[float] = []

    def settled(m: dict[str, float]) -> bool:
        last.append(m[RX])
        return len(last) > 1 and last[-1] == last[-2] and m[RX] >= 0.95 * len(sources)

    samples = wait_metrics(daemon, settled, "the flood to be read")
    drops = sum(samples[dropped(r)] for r in ("source_port", "rate_limit", "too_many_sources", "send_failed"))
    assert samples[TX] + drops == samples[RX], "every datagram answered or counted as dropped"
    assert samples[dropped("too_many_sources")] > 0, "the 1,000-source table never filled up"
    if elapsed < 0.9:  # no bucket was idle long enough to be pruned while the flood lasted
        assert samples[TX] <= 1000 + 1, samples[TX]
    growth = rss_bytes(worker) - before
    assert growth < 4 * 1024 * 1024, f"worker RSS grew by {growth} bytes for 4,000 sources"
    assert daemon.metrics()[RESTARTS] == 0


def test_reload_turns_udp_on_and_off(echod: DaemonFactory, tmp_path: Path) -> None:
    port = free_udp_port()
    tcp = f"127.0.0.1:{free_port()}"
    config = tmp_path / "udp.toml"
    config.write_text(f'listen = ["{tcp}"]\n')
    daemon = echod("--config", str(config), listen=[tcp], workers=1)
    address = ("127.0.0.1", port)
    with client() as sock:
        sock.sendto(b"off", address)
        assert answers(sock) == [], "UDP answered although udp_listen is empty"

    config.write_text(f'listen = ["{tcp}"]\nudp_listen = ["127.0.0.1:{port}"]\n')
    daemon.send_signal(signal.SIGHUP)
    wait_metrics(daemon, lambda m: m['echod_config_reloads_total{result="success"}'] == 1, "the reload")

    def echoed() -> bool:
        with client() as sock:
            sock.sendto(b"on", address)
            return answers(sock, quiet=0.3) == [(b"on", address)]

    wait_for(echoed, 10, "UDP echo after the reload")

    config.write_text(f'listen = ["{tcp}"]\n')
    daemon.send_signal(signal.SIGHUP)
    wait_metrics(daemon, lambda m: m['echod_config_reloads_total{result="success"}'] == 2, "the 2nd reload")
    wait_for(lambda: _bindable(port), 10, "the UDP port to be released")


def _bindable(port: int) -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True
