"""Test harness: spawn the real `echod run` on free loopback ports and talk to it over real sockets."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from prometheus_client.parser import text_string_to_metric_families

ECHOD = [sys.executable, "-m", "echod"]


def fuzz_settings(examples: int) -> settings:
    """Hypothesis settings for the fuzz tests: reproducible (derandomized, no database), no deadline."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def _below_the_ephemeral_range() -> Iterator[int]:
    """Ports under the kernel's ephemeral range, in random order, each handed out once per process.

    bind(0) answers from the ephemeral range, where every outgoing connect() also takes its source
    port: a port found free that way was taken by some client before echod bound it (a clean-clone CI
    run: "cannot bind 127.0.0.1:46907: Address already in use"). Below the range only explicit binds
    land, and handing each port out once keeps two of our own requests apart."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    ports = list(range(max(1024, low - 12000), low))
    # Under pytest-xdist every test process hands out its own share (port % count == its index), so
    # that two processes never pick the same port between the bind check and echod's bind.
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if worker.startswith("gw") and count:
        ports = [port for port in ports if port % int(count) == int(worker[2:])]
    random.shuffle(ports)
    yield from ports


_PORTS = _below_the_ephemeral_range()


def free_port(host: str = "127.0.0.1", kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for port in _PORTS:
        with socket.socket(family, kind) as sock:
            try:
                sock.bind((host, port))
            except OSError:  # somebody's: try the next
                continue
            return port
    with socket.socket(family, kind) as sock:  # no such range here (or used up): the kernel's pick
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    """Poll until predicate() is truthy; fail the test (never hang) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(part) for part in text.split()]


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def server_sockets(port: int) -> dict[int, int]:
    """The server sides of IPv4 connections to local `port` that the kernel still lists (/proc/net/tcp):
    client port -> socket inode, 0 for one no process holds any more (TIME_WAIT, orphaned). The
    listening socket itself, if any, is under client port 0."""
    found: dict[int, int] = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if int(parts[1].split(":")[1], 16) == port:
            found[int(parts[2].split(":")[1], 16)] = int(parts[9])
    return found


def state(pid: int) -> str:
    """The process's state letter from /proc (R, S, T, Z, ...); "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def alive(pid: int) -> bool:
    return state(pid) not in ("", "Z")


def stop_process(pid: int, timeout: float = 10.0) -> None:
    """SIGSTOP `pid` and wait until it has stopped. kill() only makes the signal pending: a worker it
    wakes from epoll_wait can still collect the events that arrive before it stops, and act on them
    once continued, apart from what came later. test_access_log.py's FIN-then-reset test, which needs
    both in one event, failed 3 of 40 runs beside other tests without this wait (and the one for the
    reset), none of 40 with them."""
    os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: state(pid) == "T", timeout, f"process {pid} to stop")


class Daemon:
    """A spawned `echod run` and helpers to observe it."""

    def __init__(self, tmp: Path, args: list[str], env: dict[str, str] | None, listen: list[str],
                 metrics_port: int | None) -> None:  # fmt: skip
        self.tmp = tmp
        self.listen = listen
        self.metrics_port = metrics_port
        self.log_path = tmp / f"echod-{len(list(tmp.glob('echod-*.log')))}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("ECHOD_", "NOTIFY_SOCKET"))}
        if "--config" not in args:  # never pick up a real /etc/echod/echod.toml
            empty = tmp / "empty.toml"
            empty.touch()
            full_env["ECHOD_CONFIG"] = str(empty)
        full_env.update(env or {})
        self.log_file = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [*ECHOD, "run", *args],
            stdin=subprocess.DEVNULL,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def port(self) -> int:
        return int(self.listen[0].rsplit(":", 1)[1])

    @property
    def host(self) -> str:
        return self.listen[0].rsplit(":", 1)[0].strip("[]")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 15.0) -> Daemon:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"echod exited with {self.proc.returncode}:\n{self.log()}")
            return "ready:" in self.log()

        wait_for(ready, timeout, "echod to become ready")
        return self

    def workers(self) -> list[int]:
        return sorted(
            pid for pid in children(self.pid) if comm(pid).startswith("echod-worker") and alive(pid)
        )

    def metrics_process(self) -> int | None:
        return next((pid for pid in children(self.pid) if comm(pid) == "echod-metrics"), None)

    def connect(self, index: int = 0, timeout: float = 10.0) -> socket.socket:
        host, port = self.listen[index].rsplit(":", 1)
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def http(self, path: str) -> tuple[int, str]:
        assert self.metrics_port is not None, "metrics are off for this daemon"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metrics(self) -> dict[str, float]:
        """Samples by name with labels folded in: 'echod_connections_closed_total{reason="client"}'."""
        status, text = self.http("/metrics")
        assert status == 200, text
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait_exit(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"echod did not exit within {timeout} s:\n{self.log()}") from None

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.send_signal(signum)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.log_file.close()


DaemonFactory = Callable[..., Daemon]


@pytest.fixture
def echod(tmp_path: Path) -> Iterator[DaemonFactory]:
    """Factory: echod(workers=2, extra=[...], env={...}, metrics=True, listen=[...], ready=True)."""
    spawned: list[Daemon] = []

    def start(
        *extra: str,
        workers: int = 2,
        listen: list[str] | None = None,
        metrics: bool = True,
        env: dict[str, str] | None = None,
        ready: bool = True,
    ) -> Daemon:
        listen = listen or [f"127.0.0.1:{free_port()}"]
        metrics_port = free_port() if metrics else None
        args = ["--workers", str(workers), "--metrics-listen", f"127.0.0.1:{metrics_port}" if metrics else ""]
        for address in listen:
            args += ["--listen", address]
        daemon = Daemon(tmp_path, [*args, *extra], env, listen, metrics_port)
        spawned.append(daemon)
        return daemon.wait_ready() if ready else daemon

    yield start
    for daemon in spawned:
        daemon.kill()


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test that spawns echod through the `echod` fixture must be marked integration, or the fast
    `pytest -m "not integration"` run would start daemons; fail it, saying so, before it does."""
    if "echod" in getattr(item, "fixturenames", ()) and item.get_closest_marker("integration") is None:
        pytest.fail(f"{item.nodeid} uses the echod fixture: mark it @pytest.mark.integration", pytrace=False)


def one_worker(daemon: Daemon, timeout: float = 10.0) -> int:
    workers = wait_for(lambda: daemon.workers(), timeout, "a worker process")
    assert isinstance(workers, list) and len(workers) == 1, workers
    return workers[0]


def connect_small_buffers(
    daemon: Daemon, buffers: int = 16 * 1024, timeout: float | None = None
) -> socket.socket:
    """A client with small, fixed kernel buffers (set before connecting); non-blocking unless `timeout`.

    On loopback the kernel would otherwise autotune this client's buffers to megabytes and absorb much of
    what it sends and of the unread echo, so echod would hardly ever need to hold any output itself.
    """
    host, port = daemon.listen[0].rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffers)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffers)
    sock.settimeout(5)
    sock.connect((host, int(port)))
    sock.settimeout(timeout)
    if timeout is None:
        sock.setblocking(False)
    return sock


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Last-resort cleanup of a process started in its own session by a test."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def start_haproxy(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """The real HAProxy in the foreground (-db) in its own session, its output in `log`."""
    with log.open("wb") as out:
        return subprocess.Popen(
            ["haproxy", "-f", str(config), "-db"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def echo_roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    return recv_exactly(sock, len(payload))


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        data = sock.recv(min(1 << 20, size - len(chunks)))
        if not data:
            break
        chunks += data
    return bytes(chunks)


def push_until_stuck(
    socks: list[socket.socket], budget: int, deadline: float, quiet: float = 0.5, block_size: int = 256 * 1024
) -> int:
    """Send up to `budget` bytes on each non-blocking socket (never reading) until nothing more moves.

    Returns the bytes sent in all. Stops once no socket has taken a byte for `quiet` seconds, when every
    budget is spent, or at `deadline`.
    """
    block = random.randbytes(block_size)
    left = {sock: budget for sock in socks}
    total = 0
    last_progress = time.monotonic()
    while left and time.monotonic() < deadline:
        moved = 0
        for sock in list(left):
            while left[sock]:
                try:
                    n = sock.send(block[: min(len(block), left[sock])])
                except BlockingIOError:
                    break
                left[sock] -= n
                moved += n
            if not left[sock]:
                del left[sock]
        total += moved
        now = time.monotonic()
        if moved:
            last_progress = now
        elif now - last_progress > quiet:
            break
        else:
            time.sleep(0.02)
    return total


def wait_metrics(
    daemon: Daemon, predicate: Callable[[dict[str, float]], object], what: str, timeout: float = 10.0
) -> dict[str, float]:
    """Poll /metrics until predicate(samples) holds; on timeout the failure shows the last echod_* samples."""
    last: dict[str, float] = {}

    def check() -> object:
        nonlocal last
        last = daemon.metrics()
        return predicate(last)

    try:
        wait_for(check, timeout, what)
    except AssertionError as exc:
        shown = {k: v for k, v in sorted(last.items()) if k.startswith("echod_") and "master" not in k}
        raise AssertionError(f"{exc}; last metrics: {shown}\nlog:\n{daemon.log()[-4000:]}") from None
    return last


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to test an installed echod that is not this checkout's source (README "Building"): the
    compiled venv holds a non-editable install, which `make test` rebuilds whenever service/ changes,
    but a bare `pytest` after an edit would test the old copy."""
    import echod

    installed = Path(echod.__file__).resolve().parent
    source = Path(__file__).resolve().parent.parent / "service" / "echod"
    if installed == source:
        return
    differ = sorted(
        str(path.relative_to(source))
        for path in source.rglob("*.py")
        if not (installed / path.relative_to(source)).is_file()
        or (installed / path.relative_to(source)).read_bytes() != path.read_bytes()
    )
    if differ:
        pytest.exit(f"{installed} is not built from {source} ({', '.join(differ[:5])} differ): run make test")


# -- parallel runs (pytest-xdist) ---------------------------------------------------------------------
# `make test` runs the suite in TEST_JOBS processes (Makefile): most of a test's time is spent waiting on
# the daemon (idle timeouts, drains, reloads), so 4 processes on 2 cores ran the compiled suite in
# 165-193 s against 548 s in one. Each test is its own unit of work, except the files named here,
# whose module fixtures are too dear to build once per process: test_systemd.py boots a container and
# installs echod into it (40-90 s), and two containers at once broke a restart in one of them.
ONE_PROCESS = ("test_systemd.py",)


def _scope(nodeid: str) -> str:
    """The unit of work a test belongs to: its file for ONE_PROCESS files, otherwise itself."""
    path = nodeid.split("::", 1)[0]
    return path if path.rsplit("/", 1)[-1] in ONE_PROCESS else nodeid


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Like `--dist loadgroup` with ONE_PROCESS grouped. Not loadgroup's own xdist_group mark: pytest
    9.2 ignores the node id suffix it relies on, so the grouped tests ran spread over every process
    (pytest-xdist issue 1386). The largest unit is handed out first (xdist's loadscopereorder)."""
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scope(nodeid)

    return Scheduling(config, log)  # type: ignore[arg-type]
