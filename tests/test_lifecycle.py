"""Lifecycle of the real daemon: worker supervision, signals, reload, log rotation, start failures.

Every test drives `echod run` with real signals over loopback sockets. Waits are liveness deadlines
(`wait_for`, socket timeouts) so that a hang fails the test instead of stalling the run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Daemon, alive, comm, echo_roundtrip, free_port, recv_exactly, stop_process, wait_for

pytestmark = pytest.mark.integration

LIVENESS = 10.0  # seconds: generous deadline for anything echod should do "at once"


# -- helpers ------------------------------------------------------------------------------------
def metric(daemon: Daemon, name: str) -> float | None:
    return daemon.metrics().get(name)


def wait_metric(daemon: Daemon, name: str, expected: float, timeout: float = LIVENESS) -> None:
    seen: list[float | None] = []

    def check() -> bool:
        seen.append(metric(daemon, name))
        return seen[-1] == expected

    try:
        wait_for(check, timeout, f"{name} == {expected}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last value {seen[-1] if seen else None}\n{daemon.log()}") from None


def wait_counter(daemon: Daemon, name: str, minimum: float, timeout: float = LIVENESS) -> float:
    """Wait until counter `name` reaches `minimum` and return the value seen."""
    value = wait_for(lambda: (lambda v: v if v is not None and v >= minimum else None)(metric(daemon, name)),
                     timeout, f"{name} >= {minimum}")  # fmt: skip
    return float(value)  # type: ignore[arg-type]


def echoes(daemon: Daemon, payload: bytes = b"ping\n") -> bool:
    with daemon.connect(timeout=LIVENESS) as sock:
        return echo_roundtrip(sock, payload) == payload


def refuses(host: str, port: int) -> bool:
    try:
        sock = socket.create_connection((host, port), timeout=2)
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:  # the listener closed during our handshake (seen once in CI): ask again
        return False
    sock.close()
    return False


def all_gone(pids: list[int]) -> bool:
    return not any(alive(pid) for pid in pids)


class Prober(threading.Thread):
    """Opens fresh connections in a loop and checks each echoes and closes cleanly."""

    def __init__(self, daemon: Daemon) -> None:
        super().__init__(daemon=True)
        self.target = daemon
        self.halt = threading.Event()
        self.ok = 0
        self.errors: list[str] = []

    def run(self) -> None:
        n = 0
        while not self.halt.is_set():
            n += 1
            payload = f"probe {n}\n".encode() * 10
            try:
                with self.target.connect(timeout=LIVENESS) as sock:
                    got = echo_roundtrip(sock, payload)
                    sock.shutdown(socket.SHUT_WR)
                    tail = sock.recv(1)
                if got != payload or tail != b"":
                    self.errors.append(f"probe {n}: echoed {got[:40]!r}..., then {tail!r}")
                else:
                    self.ok += 1
            except OSError as exc:
                self.errors.append(f"probe {n}: {exc!r}")
            time.sleep(0.01)

    def finish(self) -> None:
        self.halt.set()
        self.join(2 * LIVENESS)
        assert not self.is_alive(), "prober hung"


@pytest.fixture
def echod_conf(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Like `echod`, but passes no --workers flag, so that the worker count can come from --config."""
    spawned: list[Daemon] = []

    def start(*extra: str) -> Daemon:
        listen = [f"127.0.0.1:{free_port()}"]
        metrics_port = free_port()
        args = ["--listen", listen[0], "--metrics-listen", f"127.0.0.1:{metrics_port}", *extra]
        daemon = Daemon(tmp_path, args, None, listen, metrics_port)
        spawned.append(daemon)
        return daemon.wait_ready()

    yield start
    for daemon in spawned:
        daemon.kill()


# -- worker supervision -------------------------------------------------------------------------
def test_sigkilled_worker_is_replaced(echod):
    daemon = echod(workers=2)
    before = daemon.workers()
    assert len(before) == 2
    wait_metric(daemon, "echod_worker_restarts_total", 0)
    prober = Prober(daemon)
    prober.start()
    try:
        wait_for(lambda: prober.ok >= 50, LIVENESS, "probes before the kill")
        accepted = wait_counter(daemon, "echod_connections_accepted_total", 30)
        victim = before[0]
        os.kill(victim, signal.SIGKILL)
        after = wait_for(
            lambda: (lambda now: now if len(now) == 2 and victim not in now else None)(daemon.workers()),
            LIVENESS,
            "a replacement worker",
        )
        assert before[1] in after, "the surviving worker must not be touched"
        done = prober.ok
        wait_for(lambda: prober.ok >= done + 5, LIVENESS, "probes after the replacement")
    finally:
        prober.finish()
    since_replacement = prober.ok - done
    assert prober.errors == [], prober.errors
    wait_metric(daemon, "echod_worker_restarts_total", 1)
    wait_metric(daemon, "echod_workers", 2)
    # Counters stay monotonic: what the dead worker had published is kept, and every probe accepted
    # by a live worker since the replacement is added on top.
    wait_counter(daemon, "echod_connections_accepted_total", accepted + since_replacement)
    assert f"worker {victim} " in daemon.log() and "died: killed by SIGKILL" in daemon.log()
    assert daemon.http("/healthz")[0] == 200


def test_stopped_worker_is_killed_on_missed_heartbeat(echod):
    daemon = echod("--heartbeat-timeout", "2", workers=2)
    before = daemon.workers()
    assert len(before) == 2
    victim = before[1]
    os.kill(victim, signal.SIGSTOP)
    try:
        wait_for(lambda: not alive(victim), LIVENESS, f"stopped worker {victim} to be killed")
        after = wait_for(
            lambda: (lambda now: now if len(now) == 2 else None)(daemon.workers()),
            LIVENESS,
            "a replacement worker",
        )
    finally:
        if alive(victim):
            os.kill(victim, signal.SIGKILL)
    assert victim not in after and before[0] in after
    log = daemon.log()
    assert f"killing worker {victim} " in log and "no heartbeat" in log, log
    wait_metric(daemon, "echod_worker_restarts_total", 1)
    assert echoes(daemon)
    wait_for(lambda: daemon.http("/healthz")[0] == 200, LIVENESS, "/healthz 200 again")


# -- stopping -----------------------------------------------------------------------------------
def test_sigterm_echoes_every_pending_byte(echod):
    daemon = echod(workers=2)
    # Loopback buffers absorb a few MiB per connection on their own: a small client receive buffer
    # and 8 MiB per client make sure echod itself holds pending output (backpressure) when TERM comes.
    clients, size = 4, 8 << 20
    payloads = [os.urandom(size) for _ in range(clients)]
    socks = []
    for _ in range(clients):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.settimeout(30)
        sock.connect((daemon.host, daemon.port))
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
        # Every connection paused at write_buffer_high (256 KiB; at most 320 KiB each), so only all
        # four together reach 1 MiB of output pending inside echod.
        wait_for(
            lambda: (metric(daemon, "echod_buffered_bytes") or 0) >= clients * 256 * 1024,
            LIVENESS,
            "echod to hold pending echoes on every connection",
        )
        daemon.send_signal(signal.SIGTERM)
        wait_for(lambda: refuses(daemon.host, daemon.port), 5, "the listen port to refuse after TERM")
        for index, (sock, payload) in enumerate(zip(socks, payloads, strict=True)):
            got = recv_exactly(sock, size)
            assert len(got) == size, f"client {index}: {len(got)} of {size} bytes came back"
            assert got == payload, f"client {index}: echo differs"
            assert sock.recv(1) == b"", f"client {index}: no EOF after the echo"
        for thread in senders:
            thread.join(LIVENESS)
    finally:
        for sock in socks:
            sock.close()
    assert send_errors == []
    assert daemon.wait_exit(LIVENESS) == 0, daemon.log()
    assert "graceful stop" in daemon.log()
    assert "killing worker" not in daemon.log(), "workers had to be SIGKILLed to stop"


def test_sigterm_with_idle_connection_honours_shutdown_timeout(echod):
    daemon = echod("--shutdown-timeout", "2", workers=2)
    with daemon.connect(timeout=LIVENESS) as sock:
        assert echo_roundtrip(sock, b"before\n") == b"before\n"
        daemon.send_signal(signal.SIGTERM)
        # Once the port refuses, the workers have begun stopping: the open connection must still echo.
        wait_for(lambda: refuses(daemon.host, daemon.port), 5, "the listen port to refuse after TERM")
        assert echo_roundtrip(sock, b"while draining\n") == b"while draining\n"
        sock.settimeout(15)
        assert sock.recv(1) == b"", "expected EOF once shutdown_timeout passed"
        # The client keeps its side open: echod must not wait for it forever.
        assert daemon.wait_exit(15) == 0, daemon.log()
    assert "killing worker" not in daemon.log(), "workers had to be SIGKILLed to stop"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGQUIT], ids=["INT", "QUIT"])
def test_fast_stop_with_open_connections(echod, signum):
    # With a 60 s shutdown_timeout a graceful stop would hang on these connections: a fast stop must not.
    daemon = echod("--shutdown-timeout", "60", workers=2)
    idle = daemon.connect(timeout=LIVENESS)
    unread = daemon.connect(timeout=LIVENESS)
    payload = os.urandom(64 * 1024)
    try:
        assert echo_roundtrip(idle, b"hello\n") == b"hello\n"
        unread.sendall(payload)
        wait_for(
            lambda: (metric(daemon, "echod_received_bytes_total") or 0) >= len(payload) + 6,
            LIVENESS,
            "echod to read the payload",
        )
        daemon.send_signal(signum)
        assert daemon.wait_exit(LIVENESS) == 0, daemon.log()
        idle.settimeout(LIVENESS)
        assert idle.recv(1) == b""
        unread.settimeout(LIVENESS)
        assert recv_exactly(unread, len(payload)) == payload, "bytes echod had read were dropped"
        assert unread.recv(1) == b""
    finally:
        idle.close()
        unread.close()
    assert "fast stop" in daemon.log()
    assert "killing worker" not in daemon.log(), "workers had to be SIGKILLed to stop"


# -- reload -------------------------------------------------------------------------------------
def test_sighup_reload_applies_new_worker_count(echod_conf, tmp_path):
    config = tmp_path / "reload.toml"
    config.write_text("workers = 2\n")
    daemon = echod_conf("--config", str(config))
    old = daemon.workers()
    assert len(old) == 2
    wait_metric(daemon, 'echod_config_reloads_total{result="success"}', 0)
    prober = Prober(daemon)
    with daemon.connect(timeout=LIVENESS) as sock:
        assert echo_roundtrip(sock, b"before reload\n") == b"before reload\n"
        prober.start()
        try:
            wait_for(lambda: prober.ok >= 3, LIVENESS, "probes before the reload")
            config.write_text("workers = 3\n")
            daemon.send_signal(signal.SIGHUP)
            new = wait_for(
                lambda: (lambda now: now if len(now) == 3 else None)(
                    [pid for pid in daemon.workers() if pid not in old]
                ),
                LIVENESS,
                "3 new workers",
            )
            wait_metric(daemon, 'echod_config_reloads_total{result="success"}', 1)
            # Old workers without connections retire; at most the one holding `sock` stays.
            wait_for(lambda: sum(alive(pid) for pid in old) <= 1, LIVENESS, "old workers to exit")
            assert echo_roundtrip(sock, b"after reload\n") == b"after reload\n"
            done = prober.ok
            wait_for(lambda: prober.ok >= done + 5, LIVENESS, "probes after the reload")
        finally:
            prober.finish()
        assert echo_roundtrip(sock, b"still here\n") == b"still here\n"
    wait_for(lambda: all_gone(old), LIVENESS, "the last old worker to exit once its client left")
    assert prober.errors == [], prober.errors
    assert daemon.workers() == sorted(new)
    wait_metric(daemon, "echod_workers", 3)
    wait_metric(daemon, 'echod_config_reloads_total{result="failure"}', 0)
    wait_metric(daemon, "echod_config_last_reload_successful", 1)
    # Counters survive the reload: retired workers' totals are kept (every probe plus `sock`).
    wait_counter(daemon, "echod_connections_accepted_total", prober.ok + 1)
    assert "reload complete" in daemon.log()
    assert daemon.http("/healthz")[0] == 200


@pytest.mark.parametrize("how", ["reload", "ttou"])
def test_fewer_workers_resets_no_connection(echod_conf, tmp_path, how):
    """A reload or SIGTTOU that drops a worker slot must not reset connections queued on its socket.

    The old slot-2 worker is stopped while clients connect, so the kernel queues a good third of the
    connections on its listening socket (SO_REUSEPORT) instead of them being accepted at once: what a
    busy worker sees under load, made deterministic. All of them were accepted by the kernel before
    the reload and must be echoed by someone afterwards.
    """
    config = tmp_path / "shrink.toml"
    config.write_text("workers = 3\n")
    daemon = echod_conf("--config", str(config))
    old = daemon.workers()
    assert len(old) == 3
    busy = next(pid for pid in old if comm(pid) == "echod-worker-2")
    socks: list[socket.socket] = []
    stop_process(busy)
    try:
        for index in range(400):
            sock = daemon.connect(timeout=LIVENESS)
            socks.append(sock)
            sock.sendall(b"%d\n" % index)
        if how == "reload":
            config.write_text("workers = 2\n")
            daemon.send_signal(signal.SIGHUP)
            wait_metric(daemon, 'echod_config_reloads_total{result="success"}', 1)
        else:
            daemon.send_signal(signal.SIGTTOU)
            wait_metric(daemon, "echod_workers_configured", 2)
    finally:
        os.kill(busy, signal.SIGCONT)
    failures: list[str] = []
    deadline = time.monotonic() + 2 * LIVENESS
    try:
        for index, sock in enumerate(socks):
            expected = b"%d\n" % index
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                got = recv_exactly(sock, len(expected))
            except OSError as exc:
                failures.append(f"connection {index}: {exc!r}")
                continue
            if got != expected:
                failures.append(f"connection {index}: echoed {got!r}")
    finally:
        for sock in socks:
            sock.close()
    assert failures == [], f"{len(failures)} of {len(socks)} connections lost: {failures[:5]}"
    retired = old if how == "reload" else [busy]  # TTOU retires only the last slot's worker
    wait_for(lambda: all_gone(retired), LIVENESS, "retired workers to exit")
    wait_for(lambda: len(daemon.workers()) == 2, LIVENESS, "2 workers")
    assert echoes(daemon)


def test_sighup_with_broken_toml_keeps_serving(echod, tmp_path):
    config = tmp_path / "broken.toml"
    config.write_text("idle_timeout = 60\n")
    daemon = echod("--config", str(config), workers=2)
    before = daemon.workers()
    with daemon.connect(timeout=LIVENESS) as sock:
        assert echo_roundtrip(sock, b"before\n") == b"before\n"
        config.write_text("idle_timeout = = 60\n[log\n")
        daemon.send_signal(signal.SIGHUP)
        wait_metric(daemon, 'echod_config_reloads_total{result="failure"}', 1)
        wait_metric(daemon, "echod_config_last_reload_successful", 0)
        wait_metric(daemon, 'echod_config_reloads_total{result="success"}', 0)
        log = daemon.log()
        assert "reload failed" in log and str(config) in log and "invalid TOML" in log, log
        assert echo_roundtrip(sock, b"after\n") == b"after\n"
    assert daemon.workers() == before, "a failed reload must not touch the workers"
    assert echoes(daemon)
    assert daemon.http("/healthz")[0] == 200
    # Valid TOML with an invalid value is refused the same way, and the log names the key.
    config.write_text("idle_timeout = -1\n")
    daemon.send_signal(signal.SIGHUP)
    wait_metric(daemon, 'echod_config_reloads_total{result="failure"}', 2)
    wait_for(lambda: "idle_timeout: invalid value" in daemon.log(), LIVENESS, "the bad key in the log")
    assert daemon.workers() == before
    # A file that is not UTF-8 (tomllib raises UnicodeDecodeError, not TOMLDecodeError) likewise.
    config.write_bytes(b"# caf\xe9\nidle_timeout = 30\n")
    daemon.send_signal(signal.SIGHUP)
    wait_metric(daemon, 'echod_config_reloads_total{result="failure"}', 3)
    wait_for(lambda: "not UTF-8" in daemon.log(), LIVENESS, "the encoding named in the log")
    assert daemon.workers() == before
    assert echoes(daemon)
    # Fixing the file and reloading again recovers.
    config.write_text("idle_timeout = 30\n")
    daemon.send_signal(signal.SIGHUP)
    wait_metric(daemon, 'echod_config_reloads_total{result="success"}', 1)
    wait_metric(daemon, "echod_config_last_reload_successful", 1)
    wait_metric(daemon, 'echod_config_reloads_total{result="failure"}', 3)
    assert echoes(daemon)


# -- scaling ------------------------------------------------------------------------------------
def test_sigttin_sigttou_scale_workers(echod):
    daemon = echod(workers=2)
    wait_metric(daemon, "echod_workers", 2)
    daemon.send_signal(signal.SIGTTIN)
    wait_for(lambda: len(daemon.workers()) == 3, LIVENESS, "3 workers after TTIN")
    wait_metric(daemon, "echod_workers", 3)
    assert echoes(daemon)
    three = daemon.workers()
    daemon.send_signal(signal.SIGTTOU)
    wait_for(lambda: len(daemon.workers()) == 2, LIVENESS, "2 workers after TTOU")
    wait_metric(daemon, "echod_workers", 2)
    assert set(daemon.workers()) < set(three), "TTOU must retire a worker, not replace them"
    daemon.send_signal(signal.SIGTTOU)
    wait_for(lambda: len(daemon.workers()) == 1, LIVENESS, "1 worker after a second TTOU")
    wait_metric(daemon, "echod_workers", 1)
    for _ in range(10):
        assert echoes(daemon)
    wait_metric(daemon, "echod_worker_restarts_total", 0)
    assert daemon.http("/healthz")[0] == 200


# -- log rotation -------------------------------------------------------------------------------
def test_ttin_right_after_ttou_gives_the_retiring_slot_a_new_worker(echod, tmp_path):
    """TTOU retires slot 1's worker, which may linger (here: stopped; for real: slow readers holding
    it up to shutdown_timeout). A TTIN steers connections to slot 1's socket again, so slot 1 needs a
    new worker at once; otherwise they wait in its queue until the old one exits."""
    config = tmp_path / "patient.toml"
    config.write_text("shutdown_timeout = 120\nheartbeat_timeout = 120\n")
    daemon = echod("--config", str(config), workers=2)
    old = next(pid for pid in daemon.workers() if comm(pid) == "echod-worker-1")
    stop_process(old)
    try:
        daemon.send_signal(signal.SIGTTOU)
        wait_for(lambda: "workers: 2 -> 1" in daemon.log(), LIVENESS, "TTOU handled")
        daemon.send_signal(signal.SIGTTIN)
        wait_for(lambda: "workers: 1 -> 2" in daemon.log(), LIVENESS, "TTIN handled")
        wait_for(
            lambda: any(comm(pid) == "echod-worker-1" and pid != old for pid in daemon.workers()),
            LIVENESS,
            "a new worker for slot 1 while the old one still retires",
        )
        for index in range(20):  # about half of them hash to slot 1
            with daemon.connect(timeout=LIVENESS) as sock:
                assert echo_roundtrip(sock, b"%d" % index) == b"%d" % index
        assert alive(old), "the stopped worker was replaced by killing it, not by TTIN"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(old, signal.SIGCONT)
    wait_for(lambda: not alive(old), LIVENESS, "the retired worker to finish once it runs again")
    assert daemon.http("/healthz")[0] == 200


def test_sigusr1_reopens_log_file(echod, tmp_path):
    log_path = tmp_path / "echod.log"
    rotated = tmp_path / "echod.log.1"
    daemon = echod("--log-file", str(log_path), workers=2, ready=False)
    wait_for(lambda: log_path.exists() and "ready:" in log_path.read_text(), LIVENESS, "ready: in log file")
    log_path.rename(rotated)
    daemon.send_signal(signal.SIGUSR1)
    wait_for(
        lambda: log_path.exists() and "log file reopened" in log_path.read_text(),
        LIVENESS,
        "a new log file at the original path",
    )
    daemon.send_signal(signal.SIGTTIN)
    wait_for(lambda: "workers: 2 -> 3" in log_path.read_text(), LIVENESS, "TTIN logged to the new file")
    # Workers reopened too: their lines (here: the master is gone) also land in the new file.
    wait_for(lambda: len(daemon.workers()) == 3, LIVENESS, "3 workers")
    workers = daemon.workers()
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.proc.wait(LIVENESS)
    wait_for(lambda: all_gone(workers), LIVENESS, "workers to exit")
    new_text, old_text = log_path.read_text(), rotated.read_text()
    assert new_text.count("is gone: stopping") == 3, new_text
    assert "ready:" in old_text and "ready:" not in new_text
    for line in ("log file reopened", "workers: 2 -> 3", "is gone"):
        assert line not in old_text, f"{line!r} went to the rotated file"


def test_sigusr1_keeps_serving_when_the_log_file_cannot_be_reopened(echod, tmp_path):
    """A directory where the new log file should be: open() fails even for root. The master must log
    that to the old file and keep serving, and a later USR1 must still work."""
    log_path = tmp_path / "echod.log"
    rotated = tmp_path / "echod.log.1"
    daemon = echod("--log-file", str(log_path), workers=1, ready=False)
    wait_for(lambda: log_path.exists() and "ready:" in log_path.read_text(), LIVENESS, "ready: in log file")
    with daemon.connect() as sock:
        assert echo_roundtrip(sock, b"before\n") == b"before\n"
        log_path.rename(rotated)
        log_path.mkdir()
        daemon.send_signal(signal.SIGUSR1)
        wait_for(lambda: "cannot reopen log file" in rotated.read_text(), LIVENESS, "the failure logged")
        assert alive(daemon.pid), rotated.read_text()
        assert echo_roundtrip(sock, b"after\n") == b"after\n"
    with daemon.connect() as sock:
        assert echo_roundtrip(sock, b"new client\n") == b"new client\n"
    log_path.rmdir()
    daemon.send_signal(signal.SIGUSR1)
    wait_for(lambda: log_path.exists() and "log file reopened" in log_path.read_text(), LIVENESS, "a reopen")
    assert daemon.stop() == 0


# -- start failures -----------------------------------------------------------------------------
def test_listen_port_in_use_exits_69(echod):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(8)
        address = f"127.0.0.1:{blocker.getsockname()[1]}"
        daemon = echod(listen=[address], ready=False)
        assert daemon.wait_exit(LIVENESS) == 69, daemon.log()
        assert address in daemon.log()


@pytest.mark.parametrize(
    ("contents", "extra", "expected"),
    [
        ("workers = [\n", (), "invalid TOML"),
        (b"# caf\xe9\nworkers = 1\n", (), "not UTF-8"),
        ("no_such_key = 1\n", (), "no_such_key"),
        ("idle_timeout = -5\n", (), "idle_timeout"),
        (None, ("--write-buffer-low", "300000"), "write_buffer_low"),
        (None, ("--shutdown-timeout", "soon"), "shutdown_timeout"),
    ],
    ids=["broken-toml", "not-utf8", "unknown-key", "bad-value-file", "watermarks-flag", "bad-value-flag"],
)
def test_bad_config_exits_78(echod, tmp_path, contents, extra, expected):
    args = list(extra)
    if contents is not None:
        config = tmp_path / "bad.toml"
        if isinstance(contents, bytes):
            config.write_bytes(contents)
        else:
            config.write_text(contents)
        args += ["--config", str(config)]
    daemon = echod(*args, ready=False)
    assert daemon.wait_exit(LIVENESS) == 78, daemon.log()
    assert expected in daemon.log()


def test_missing_config_file_exits_78(echod, tmp_path):
    missing = tmp_path / "nope.toml"
    daemon = echod("--config", str(missing), ready=False)
    assert daemon.wait_exit(LIVENESS) == 78, daemon.log()
    assert str(missing) in daemon.log()


# -- master death -------------------------------------------------------------------------------
def test_sigkilled_master_leaves_no_orphans(echod):
    daemon = echod(workers=2)
    workers = daemon.workers()
    metrics_pid = daemon.metrics_process()
    assert len(workers) == 2 and metrics_pid is not None
    with daemon.connect(timeout=LIVENESS) as sock:
        assert echo_roundtrip(sock, b"hi\n") == b"hi\n"
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.proc.wait(LIVENESS)
        wait_for(lambda: all_gone([*workers, metrics_pid]), LIVENESS, "workers and metrics process to exit")
        sock.settimeout(LIVENESS)
        assert sock.recv(1) == b""
    assert refuses(daemon.host, daemon.port)


# -- health endpoint ----------------------------------------------------------------------------
def test_healthz_and_unknown_paths(echod):
    daemon = echod(workers=3)
    status, body = daemon.http("/healthz")
    assert status == 200, body
    assert daemon.http("/no-such-page")[0] == 404
    assert daemon.http("/metricsx")[0] == 404
    status, body = daemon.http("/metrics")
    assert status == 200 and "echod_build_info" in body
    wait_metric(daemon, "echod_workers", 3)
