"""The access log and the per-connection histograms (issue 18), against the real daemon.

One line per closed TCP connection; bytes from TCP_INFO at close; reasons as the closed counter's;
sampling; a FIFO nobody reads must neither block echo nor grow memory; USR1 through a real logrotate;
histograms whose counts equal the connections closed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    ECHOD,
    Daemon,
    DaemonFactory,
    echo_roundtrip,
    free_port,
    one_worker,
    recv_exactly,
    rss_bytes,
    server_sockets,
    stop_process,
    wait_for,
    wait_metrics,
)
from echod.proxy import header_v1

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
TYPES: dict[str, type] = {
    "ts": str, "worker": int, "listener": str, "client": str, "duration_s": float, "bytes_in": int,
    "bytes_out": int, "reason": str, "rtt_us": int, "rttvar_us": int, "min_rtt_us": int,
    "retransmits": int, "snd_cwnd": int, "pmtu": int, "delivery_rate_bps": int,
}  # fmt: skip
TS = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"


def lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_client(path: Path, sock_names: dict[str, str], count: int) -> dict[str, dict[str, Any]]:
    """Wait until every client in `sock_names` (client text -> name) has its line; name -> line."""

    def found() -> dict[str, dict[str, Any]] | None:
        seen = {sock_names[e["client"]]: e for e in lines(path) if e["client"] in sock_names}
        return seen if len(seen) >= count else None

    result = wait_for(found, 15, f"{count} access-log lines in {path}")
    assert isinstance(result, dict)
    return result


def name(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def close_with_fin(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    assert recv_exactly(sock, len(payload) + 1) == payload
    sock.close()


def test_json_lines_types_bytes_and_reasons(echod: DaemonFactory, tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    d = echod("--access-log", str(path), "--idle-timeout", "1", "--shutdown-timeout", "0")
    names: dict[str, str] = {}
    for size in (0, 1, 70_001, 1_000_000):  # a plain echo, and one that splices and buffers
        sock = d.connect()
        names[name(sock)] = f"client-{size}"
        close_with_fin(sock, os.urandom(size))
    reset = d.connect()
    names[name(reset)] = "reset"
    assert echo_roundtrip(reset, b"x" * 333) == b"x" * 333
    reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    reset.close()
    idle = d.connect()
    names[name(idle)] = "idle"
    assert echo_roundtrip(idle, b"y" * 44) == b"y" * 44
    seen = by_client(path, names, 6)
    idle.close()
    held = d.connect()
    names[name(held)] = "held"
    assert echo_roundtrip(held, b"z" * 55) == b"z" * 55
    assert d.stop() == 0
    seen = by_client(path, names, 7)
    held.close()

    for size in (0, 1, 70_001, 1_000_000):
        entry = seen[f"client-{size}"]
        assert (entry["bytes_in"], entry["bytes_out"], entry["reason"]) == (size, size, "client"), entry
    assert (seen["reset"]["bytes_in"], seen["reset"]["reason"]) == (333, "error"), seen["reset"]
    assert (seen["idle"]["bytes_in"], seen["idle"]["bytes_out"], seen["idle"]["reason"]) == (
        44,
        44,
        "timeout",
    )
    assert seen["idle"]["duration_s"] >= 1.0
    assert (seen["held"]["bytes_in"], seen["held"]["bytes_out"], seen["held"]["reason"]) == (
        55,
        55,
        "shutdown",
    )
    for entry in seen.values():
        assert set(entry) == set(TYPES), entry  # this kernel has every TCP_INFO field
        for key, kind in TYPES.items():
            assert type(entry[key]) is kind, (key, entry)
        assert re.match(TS, entry["ts"]), entry["ts"]
        assert entry["listener"] == d.listen[0]
        assert entry["worker"] in (0, 1)
        assert 0 < entry["rtt_us"] < 100_000 and entry["pmtu"] > 0 and entry["snd_cwnd"] > 0


def test_rejected_at_the_limit_is_logged_with_zero_bytes(echod: DaemonFactory, tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    d = echod("--access-log", str(path), "--max-connections", "1", workers=1)
    first = d.connect()
    assert echo_roundtrip(first, b"hello") == b"hello"
    second = d.connect()
    assert second.recv(10) == b""  # accepted and closed at once
    entry = by_client(path, {name(second): "second"}, 1)["second"]
    assert (entry["reason"], entry["bytes_in"], entry["bytes_out"]) == ("limit", 0, 0), entry
    assert entry["listener"] == d.listen[0]
    second.close()
    first.close()


def test_proxy_listener_logs_the_headers_client(echod: DaemonFactory, tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    port = free_port()
    address = f"127.0.0.1:{port}"
    d = echod(
        "--access-log", str(path), "--listeners", json.dumps({address: {"proxy_protocol": True}}),
        listen=[address],
    )  # fmt: skip
    sock = d.connect()
    sock.sendall(header_v1(("192.0.2.7", 40123), ("127.0.0.1", port)))
    close_with_fin(sock, b"q" * 1000)
    bad = d.connect()
    bad.sendall(b"GET / HTTP/1.0\r\n\r\n")
    assert bad.recv(10) == b""
    bad_name = name(bad)
    bad.close()

    def entries() -> list[dict[str, Any]] | None:
        found = lines(path)
        return found if len(found) >= 2 else None

    result = wait_for(entries, 15, "two access-log lines")
    assert isinstance(result, list)
    good = next(e for e in result if e["client"] == "192.0.2.7:40123")
    assert (good["bytes_in"], good["bytes_out"], good["reason"]) == (1000, 1000, "client"), good
    failed = next(e for e in result if e["client"] == bad_name)
    assert failed["reason"] == "proxy_protocol", failed


def test_text_format_and_sampling(echod: DaemonFactory, tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    d = echod("--access-log", str(path), "--access-log-format", "text", "--access-log-sample", "0.1")
    total = 2000
    for _ in range(total):
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as sock:
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(10) == b""
    wait_metrics(
        d, lambda m: m.get("echod_connection_duration_seconds_count", 0) >= total, "every close observed"
    )
    time.sleep(0.5)  # a last turn's lines
    text = path.read_text().splitlines()
    # Binomial(2000, 0.1): mean 200, standard deviation 13.4; 100..300 is more than 7 of them.
    assert 100 <= len(text) <= 300, len(text)
    for line in text:
        fields = dict(part.split("=", 1) for part in line.split()[1:])
        assert fields["reason"] == "client" and fields["bytes_in"] == "0", line
        assert {"worker", "listener", "client", "duration_s", "rtt_us", "retransmits"} <= set(fields)


def test_a_fifo_nobody_reads_neither_blocks_echo_nor_grows_memory(
    echod: DaemonFactory, tmp_path: Path
) -> None:
    fifo = tmp_path / "access.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # opened, never read: the pipe fills up
    try:
        d = echod("--access-log", str(fifo), workers=1)
        worker = one_worker(d)
        payload = b"p" * 100

        def churn(count: int) -> None:
            for _ in range(count):
                with d.connect() as sock:
                    assert echo_roundtrip(sock, payload) == payload

        churn(1000)  # fills the 64 KiB pipe many times over
        before = rss_bytes(worker)
        started = time.monotonic()
        churn(2000)
        assert time.monotonic() - started < 60
        after = rss_bytes(worker)
        metrics = wait_metrics(
            d,
            lambda m: m.get("echod_connection_duration_seconds_count", 0) >= 3000,
            "every close published",
        )
        assert metrics["echod_access_log_dropped_lines_total"] > 0
        assert after - before < 8 << 20, (before, after)
        # The pipe holds whole lines only: each write was a batch of complete lines.
        data = os.read(reader, 1 << 20)
        assert data and data.endswith(b"\n")
        for line in data.splitlines():
            json.loads(line)
    finally:
        os.close(reader)


def test_usr1_through_logrotate_reopens_the_access_log(tmp_path: Path) -> None:
    logdir = tmp_path / "log"
    logdir.mkdir()
    pidfile = tmp_path / "echod.pid"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECHOD_")}
    (tmp_path / "empty.toml").touch()
    env["ECHOD_CONFIG"] = str(tmp_path / "empty.toml")

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*ECHOD, *args], capture_output=True, text=True, timeout=60, env=env)

    started = ctl(
        "start", "--daemon-pidfile", str(pidfile), "--listen", f"127.0.0.1:{port}", "--metrics-listen", "",
        "--log-file", str(logdir / "echod.log"), "--access-log", str(logdir / "access.log"), "--workers", "2",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:

        def one(tag: bytes) -> str:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(tag)
                sock.shutdown(socket.SHUT_WR)
                assert recv_exactly(sock, len(tag) + 1) == tag
                return name(sock)

        before = one(b"before")
        wait_for(lambda: before in (logdir / "access.log").read_text(), 10, "the first line")
        config = tmp_path / "logrotate.conf"
        shipped = (REPO / "deploy" / "logrotate" / "echod").read_text()
        config.write_text(
            shipped.replace("/var/log/echod/", f"{logdir}/").replace("/run/echod/echod.pid", str(pidfile))
        )
        config.chmod(0o644)
        rotated = subprocess.run(
            ["logrotate", "--force", "--state", str(tmp_path / "state"), str(config)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert rotated.returncode == 0, rotated.stdout + rotated.stderr
        assert before in (logdir / "access.log.1").read_text()
        wait_for(lambda: "log file reopened" in (logdir / "echod.log").read_text(), 10, "the reopen")
        time.sleep(0.5)  # the workers handle USR1 in their next housekeeping
        after = one(b"after")
        wait_for(lambda: after in (logdir / "access.log").read_text(), 10, "a line in the new file")
        assert after not in (logdir / "access.log.1").read_text()
    finally:
        stopped = ctl("stop", "--pidfile", str(pidfile), "--timeout", "30")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def test_histograms_count_every_close_and_pass_promtool(echod: DaemonFactory) -> None:
    d = echod()  # no access log: the histograms are always on
    for size in (0, 10, 5000, 200_000):
        close_with_fin(d.connect(), b"h" * size)
    metrics = wait_metrics(
        d, lambda m: m.get("echod_connection_duration_seconds_count") == 4, "four closes observed"
    )
    closed = sum(v for k, v in metrics.items() if k.startswith("echod_connections_closed_total"))
    for family in ("echod_connection_duration_seconds", "echod_connection_bytes", "echod_tcp_rtt_seconds"):
        assert metrics[f"{family}_count"] == closed == 4
        assert metrics[f'{family}_bucket{{le="+Inf"}}'] == 4
    assert metrics["echod_connection_bytes_sum"] == 205_010
    assert metrics['echod_connection_bytes_bucket{le="0.0"}'] == 1
    # Loopback: every smoothed RTT well under a millisecond.
    assert metrics['echod_tcp_rtt_seconds_bucket{le="0.001"}'] == 4
    assert metrics["echod_tcp_retransmitted_segments_total"] == 0
    status, text = d.http("/metrics")
    assert status == 200
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_access_log_on_the_service_logs_stream(echod: DaemonFactory) -> None:
    d: Daemon = echod("--access-log", "-")
    sock = d.connect()
    client = name(sock)
    close_with_fin(sock, b"s" * 10)
    wait_for(lambda: f'"client":"{client}"' in d.log(), 10, "the line on stderr")
    line = next(line for line in d.log().splitlines() if f'"client":"{client}"' in line)
    assert json.loads(line)["bytes_in"] == 10
    assert stat.S_ISREG(os.stat(d.log_path).st_mode)  # opened anew through /proc/self/fd/2
    os.kill(d.pid, signal.SIGUSR1)  # nothing to reopen on stderr: still serving
    assert echo_roundtrip(d.connect(), b"ok") == b"ok"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("per_ip", [0, 5], ids=["no-limit", "per-ip-limit"])
def test_a_connection_handed_over_on_reload_is_logged_once_with_its_client(
    echod: DaemonFactory, tmp_path: Path, per_ip: int
) -> None:
    """The new worker closes it: one line, with the socket's HOST:PORT (the per-IP limit keeps only the
    bare address, which must not stand in for it) and the bytes of the connection's whole life."""
    path = tmp_path / "access.log"
    d = echod("--access-log", str(path), "--max-connections-per-ip", str(per_ip), workers=1)
    sock = d.connect(timeout=5)
    client = name(sock)
    assert echo_roundtrip(sock, b"b" * 100) == b"b" * 100
    old = one_worker(d)
    d.send_signal(signal.SIGHUP)
    wait_metrics(d, lambda m: m["echod_connections_handed_over_total"] == 1, "the handover")
    wait_for(lambda: old not in d.workers(), 15, "the old worker to exit")
    close_with_fin(sock, b"a" * 50)
    entry = by_client(path, {client: "it"}, 1)["it"]
    assert (entry["bytes_in"], entry["bytes_out"], entry["reason"]) == (150, 150, "client"), entry
    assert entry["listener"] == d.listen[0], entry
    assert [e["client"] for e in lines(path)].count(client) == 1


@pytest.mark.timeout(60)
def test_a_fin_then_a_reset_read_together_counts_only_the_bytes_sent(
    echod: DaemonFactory, tmp_path: Path
) -> None:
    """The client half-closes and then resets before echod has read its FIN: echod sees both at once
    (EPOLLERR with the FIN queued; the worker is stopped meanwhile so that it must). The kernel counts
    the FIN's sequence number in tcpi_bytes_received and the reset leaves the socket in CLOSE; bytes_in
    must still be what the client sent, and the reason a reset's."""
    path = tmp_path / "access.log"
    d = echod("--access-log", str(path), workers=1)
    worker = one_worker(d)
    sock = d.connect(timeout=5)
    client = name(sock)
    assert echo_roundtrip(sock, b"abc") == b"abc"
    stop_process(worker)
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset, right behind the FIN
        # The reset has reached echod's side once the kernel has dropped it from its table (CLOSE).
        client_port = int(client.rsplit(":", 1)[1])
        wait_for(lambda: client_port not in server_sockets(d.port), 10, "the reset to reach echod's socket")
    finally:
        os.kill(worker, signal.SIGCONT)
    entry = by_client(path, {client: "it"}, 1)["it"]
    assert (entry["bytes_in"], entry["bytes_out"], entry["reason"]) == (3, 3, "error"), entry
