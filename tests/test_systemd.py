"""echod under a real systemd: installed with deploy/install.sh into a throwaway container whose PID 1 is
systemd 252 (tests/systemd_box.py), then started, reloaded, upgraded, watched and stopped the way
operators do it, with the unit's full hardening (DynamicUser, ProtectSystem=strict, seccomp, ...).

One container per module (booting takes seconds, installing a few more); the tests run in file order
and each leaves echod.service running with the base configuration. The container shares the machine's
network: every port is a free one, never echod's defaults.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import free_port, recv_exactly, wait_for
from systemd_box import BootFailed, Box, cannot_boot

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
UNIT = "echod.service"
SOURCE = "/opt/echod-src"
WHEELS = "/opt/echod-wheels"
SHUTDOWN_TIMEOUT = 5  # echod's, in the container's configuration: keeps graceful stops short
TIMEOUT_STOP = 45  # the unit's TimeoutStopSec=
WATCHDOG_SEC = 2  # the watchdog test's drop-in
HANDED_OVER = "echod_connections_handed_over_total"
REPORT: dict[str, object] = {}  # figures of this run, printed when the module ends (pytest -s shows them)


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """echod's dependencies and its build requirements as wheels, built once on this machine:
    the container's install.sh then installs offline (PIP_NO_INDEX) in a few seconds."""
    reason = cannot_boot()
    if reason:
        pytest.skip(f"cannot boot a systemd container here: {reason}")
    wheels = tmp_path_factory.mktemp("wheels")
    with (ROOT / "pyproject.toml").open("rb") as handle:
        build_requires = tomllib.load(handle)["build-system"]["requires"]  # setuptools, mypy (mypyc)
    # echod's own wheel is only the way to its dependencies' wheels: built interpreted, which is quick;
    # install.sh in the container builds echod itself from the source, compiled as a user gets it.
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
         "--wheel-dir", str(wheels), str(ROOT), *build_requires],
        capture_output=True, text=True, timeout=300, env={**os.environ, "ECHOD_COMPILE": "0"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return wheels


@dataclass
class Ports:
    tcp: int = field(default_factory=free_port)
    proxy: int = field(default_factory=free_port)
    metrics: int = field(default_factory=free_port)
    udp: int = field(default_factory=free_port)
    activated: int = field(default_factory=free_port)


@dataclass
class Echod:
    """echod.service in the container, with its ports and the helpers the tests share."""

    box: Box
    ports: Ports

    def config(self, **extra: object) -> str:
        values: dict[str, object] = {
            "listen": [f"127.0.0.1:{self.ports.tcp}", f"127.0.0.1:{self.ports.proxy}"],
            "workers": 2,
            "shutdown_timeout": SHUTDOWN_TIMEOUT,
            "udp_listen": [f"127.0.0.1:{self.ports.udp}"],
        }
        log = {"level": "info", "format": extra.pop("log_format", "text")}
        values.update(extra)
        lines = [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        lines += ["", f'[listeners."127.0.0.1:{self.ports.proxy}"]', "proxy_protocol = true"]
        lines += ["", "[metrics]", f'listen = "127.0.0.1:{self.ports.metrics}"']
        lines += ["", "[log]", *(f"{k} = {json.dumps(v)}" for k, v in log.items())]
        return "\n".join(lines) + "\n"

    def configure(self, **extra: object) -> None:
        self.box.write("/etc/echod/echod.toml", self.config(**extra))

    def show(self, *props: str) -> dict[str, str]:
        return self.box.show(UNIT, *props)

    def prop(self, name: str) -> str:
        return self.box.prop(UNIT, name)

    def main_pid(self) -> int:
        return int(self.prop("MainPID"))

    def http(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.ports.metrics}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError as exc:
            return 0, str(exc)

    def metric(self, name: str) -> float | None:
        status, text = self.http("/metrics")
        if status != 200:
            return None
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else None

    def wait_active(self, timeout: float = 30.0) -> None:
        wait_for(lambda: self.prop("ActiveState") == "active" and self.prop("SubState") == "running",
                 timeout, "echod.service to be active (running)")  # fmt: skip

    def reset(self) -> None:
        """Back to the base configuration, running, its failure state and counters cleared."""
        self.box.remove("/etc/systemd/system/echod.service.d/test.conf")
        self.configure()
        self.box.systemctl("daemon-reload")
        self.box.systemctl("stop", UNIT, "echod.socket", check=False)
        self.box.systemctl("reset-failed", UNIT, check=False)
        self.box.systemctl("start", UNIT)
        self.wait_active()


@pytest.fixture(scope="module")
def box(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path) -> Box:
    began = time.monotonic()
    the_box = Box(tmp_path_factory.mktemp("box"))

    def finish() -> None:
        the_box.teardown()  # whatever happened: power off; the overlay goes with its mount namespace
        REPORT["module_seconds"] = round(time.monotonic() - began, 1)
        print(f"\n[test_systemd] figures of this run: {json.dumps(REPORT, indent=1)}")

    request.addfinalizer(finish)
    try:
        the_box.boot()
    except BootFailed as exc:
        if "cannot mount" in str(exc):
            pytest.skip(f"cannot boot a systemd container here: {exc}")
        raise
    REPORT["boot_seconds"] = round(the_box.boot_seconds, 2)
    return the_box


@pytest.fixture(scope="module")
def echod(box: Box, wheelhouse: Path) -> Echod:
    """echod installed by deploy/install.sh with Debian's /usr/bin/python3, offline from the wheelhouse;
    the configuration is written first (install.sh keeps an existing one), so the unit that install.sh
    enables and starts serves on free ports."""
    service = Echod(box, Ports())
    service.configure()
    box.copy_in(
        ROOT, ["pyproject.toml", "setup.py", "README.md", "service", "config", "systemd", "deploy"], SOURCE
    )
    box.copy_in(wheelhouse.parent, [wheelhouse.name], "/opt")
    box.sh(f"mv /opt/{wheelhouse.name} {WHEELS}")
    began = time.monotonic()
    install = box.command(
        ["env", "PYTHON=/usr/bin/python3", "PIP_NO_INDEX=1", f"PIP_FIND_LINKS={WHEELS}",
         "sh", f"{SOURCE}/deploy/install.sh"],
        timeout=300,
    )  # fmt: skip
    REPORT["install_seconds"] = round(time.monotonic() - began, 1)
    assert "echod.service enabled and running" in install.stdout, install.stdout + install.stderr
    service.wait_active()
    return service


@pytest.fixture
def running(echod: Echod) -> Iterator[Echod]:
    """Each test starts from a running service with the base configuration, and leaves one behind."""
    if echod.prop("ActiveState") != "active" or echod.prop("SubState") != "running":
        echod.reset()
    yield echod
    if echod.prop("ActiveState") != "active" or echod.box.sh(
        "test -e /etc/systemd/system/echod.service.d/test.conf", check=False
    ).returncode == 0:  # fmt: skip
        echod.reset()


# -- clients ------------------------------------------------------------------------------------
def connect(port: int, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def roundtrip(port: int, payload: bytes, timeout: float = 20.0) -> bytes:
    """Send payload from one thread while reading the echo in this one (4 MiB would fill both buffers)."""
    with connect(port, timeout) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
        sender.start()
        echoed = recv_exactly(sock, len(payload))
        sender.join(timeout)
        return echoed


def assert_echoes(port: int) -> None:
    assert roundtrip(port, b"x") == b"x"
    big = random.randbytes(4 << 20)
    echoed = roundtrip(port, big)
    assert len(echoed) == len(big) and echoed == big, f"4 MiB echo: got {len(echoed)} bytes back"


class Load:
    """Persistent connections that echo without pause, plus a churn of short connections, in threads.

    Every failure (refused, reset, wrong or missing bytes) is recorded: a reload or an upgrade under
    this load must leave `failures` empty, and the persistent connections must keep working across it.
    """

    def __init__(self, port: int, persistent: int = 6) -> None:
        self.port = port
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.failures: list[str] = []
        self.bytes = 0
        self.exchanges = 0
        self.churned = 0
        self.socks = [connect(port) for _ in range(persistent)]
        self.threads = [threading.Thread(target=self._persistent, args=(s,), daemon=True) for s in self.socks]
        self.threads.append(threading.Thread(target=self._churn, daemon=True))

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _fail(self, what: str) -> None:
        with self.lock:
            self.failures.append(what)

    def _persistent(self, sock: socket.socket) -> None:
        rng = random.Random()
        try:
            while not self.stopping.is_set():
                payload = rng.randbytes(rng.randint(1, 32 * 1024))
                sock.sendall(payload)
                echoed = recv_exactly(sock, len(payload))
                if echoed != payload:
                    self._fail(f"persistent: sent {len(payload)} bytes, {len(echoed)} came back (or differ)")
                    return
                with self.lock:
                    self.bytes += 2 * len(payload)
                    self.exchanges += 1
                time.sleep(0.005)
        except OSError as exc:
            self._fail(f"persistent: {exc!r}")

    def _churn(self) -> None:
        while not self.stopping.is_set():
            try:
                with connect(self.port, timeout=10) as sock:
                    sock.sendall(b"ping\n")
                    if recv_exactly(sock, 5) != b"ping\n":
                        self._fail("churn: no echo")
                        continue
                with self.lock:
                    self.churned += 1
                    self.bytes += 10
            except OSError as exc:
                self._fail(f"churn: {exc!r}")
            time.sleep(0.01)

    def snapshot(self) -> tuple[int, int]:
        with self.lock:
            return self.exchanges, self.churned

    def wait_progress(self, timeout: float = 10.0) -> None:
        """Every persistent connection and the churn move on from now (proves they still work)."""
        exchanges, churned = self.snapshot()

        def moved() -> bool:
            now = self.snapshot()
            return now[0] >= exchanges + 2 * len(self.socks) and now[1] > churned

        wait_for(moved, timeout, "the load to make progress")

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(30)
        for sock in self.socks:
            sock.close()

    def figures(self) -> dict[str, object]:
        return {
            "persistent_connections": len(self.socks),
            "short_connections": self.churned,
            "echo_exchanges": self.exchanges,
            "bytes": self.bytes,
            "failures": len(self.failures),
        }


def journal_problems(text: str) -> list[str]:
    """Lines of systemd's own complaints about echod's process handling."""
    markers = ("not our child", "only permitted for main PID", "Killing process", "code=killed",
               "Failed with result", "Main process exited", "Watchdog timeout")  # fmt: skip
    return [line for line in text.splitlines() if any(m in line for m in markers)]


def wait_journal(box: Box, after: str, needle: str, timeout: float = 30.0) -> str:
    found: list[str] = []

    def seen() -> bool:
        found[:] = [box.journal(UNIT, after)]
        return needle in found[0]

    try:
        wait_for(seen, timeout, f"{needle!r} in the journal")
    except AssertionError as exc:
        raise AssertionError(f"{exc}:\n{found[0][-4000:] if found else ''}") from None
    return found[0]


def one_worker_fewer_than_1(box: Box, cursor: str) -> None:
    """TTOU, TTOU (refused with a warning), TTIN: 2 -> 1 -> 1 -> 2 workers, one signal at a time (a
    second TTOU sent before the first is handled would merge with it)."""
    for signal_name, logged in (("TTOU", "workers: 2 -> 1"), ("TTOU", "worker count stays at 1"),
                                ("TTIN", "workers: 1 -> 2")):  # fmt: skip
        box.systemctl("kill", "-s", signal_name, "--kill-whom=main", UNIT)
        wait_journal(box, cursor, logged, timeout=10)


# -- tests --------------------------------------------------------------------------------------
def test_start_completes_once_every_worker_accepts(running: Echod) -> None:
    box = running.box
    box.systemctl("stop", UNIT)
    cursor = box.cursor()
    began = time.monotonic()
    box.systemctl("start", UNIT)  # Type=notify: returns once echod sent READY=1
    REPORT["systemctl_start_seconds"] = round(time.monotonic() - began, 2)
    # /healthz answers 200 only while every configured worker accepts: at once, not eventually.
    status, body = running.http("/healthz")
    assert status == 200, body
    times = running.show("ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic")
    REPORT["exec_to_ready_seconds"] = round(
        (int(times["ActiveEnterTimestampMonotonic"]) - int(times["ExecMainStartTimestampMonotonic"])) / 1e6, 2
    )
    log = box.journal(UNIT, cursor)
    ready, started = log.find("ready: 2 workers accepting"), log.find("Started echod.service")
    assert 0 <= ready < started, log
    # check-config --quiet in ExecStartPre=: the effective configuration is not dumped into the journal.
    assert "shutdown_timeout = " not in log and "[metrics]" not in log, log
    assert not journal_problems(log), log

    assert_echoes(running.ports.tcp)
    with connect(running.ports.proxy) as sock:  # PROXY v1 header, then the echo
        sock.sendall(b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 7007\r\nhello")
        assert recv_exactly(sock, 5) == b"hello"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(5)
        udp.bind(("127.0.0.1", 0))
        udp.sendto(b"datagram", ("127.0.0.1", running.ports.udp))
        assert udp.recvfrom(100)[0] == b"datagram"
    wait_for(lambda: (running.metric("echod_connections_accepted_total") or 0) >= 3, 10, "metrics")
    assert running.metric("echod_workers") == 2

    # Priorities reach journald: a warning (one worker fewer than 1 is refused) is there at -p warning,
    # the info lines are not.
    warn_cursor = box.cursor()
    one_worker_fewer_than_1(box, warn_cursor)
    # (The whole boot's journal: systemd 252's journalctl shows nothing for -p with --after-cursor.)
    warnings = box.command(["journalctl", "-q", "--no-pager", "-u", UNIT, "-p", "warning"]).stdout
    assert "worker count stays at 1" in warnings, warnings
    assert "workers: 1 -> 2" not in warnings and "ready:" not in warnings, warnings


@pytest.mark.parametrize("io_mode", ["copy", "splice", "auto"])
def test_io_modes_under_the_full_hardening(running: Echod, io_mode: str) -> None:
    """Each I/O mode (splice needs pipes and splice(2) through the seccomp filter) in fresh workers."""
    box = running.box
    running.configure(io_mode=io_mode)
    box.systemctl("restart", UNIT)
    running.wait_active()
    cursor = box.cursor()
    assert_echoes(running.ports.tcp)
    log = box.journal(UNIT, cursor)
    assert "died" not in log and "Traceback" not in log, log
    status, body = running.http("/healthz")
    assert status == 200, body
    box.systemctl("status", UNIT, check=False)  # (shown on failure only)
    running.configure()


def test_json_logs_under_journald(running: Echod) -> None:
    box = running.box
    cursor = box.cursor()
    running.configure(log_format="json")
    box.systemctl("reload", UNIT)
    wait_journal(box, cursor, "reload complete")
    one_worker_fewer_than_1(box, cursor)
    entries = []

    def warned() -> bool:
        out = box.command(
            ["journalctl", "-q", "--no-pager", "-u", UNIT, "-o", "json", "-p", "warning"]
        ).stdout
        entries[:] = [e for e in map(json.loads, out.splitlines()) if str(e.get("MESSAGE")).startswith("{")]
        return any("worker count stays" in str(e.get("MESSAGE")) for e in entries)

    wait_for(warned, 10, "a JSON warning in the journal")
    entry = next(e for e in entries if "worker count stays" in str(e.get("MESSAGE")))
    assert entry["PRIORITY"] == "4", entry
    message = json.loads(entry["MESSAGE"])  # the JSON object itself, its <4> prefix consumed by journald
    assert message["level"] == "warning" and "worker count stays" in message["msg"], message
    running.configure()
    box.systemctl("reload", UNIT)
    wait_for(lambda: box.journal(UNIT, cursor).count("reload complete") == 2, 15, "the second reload")


def test_reload_under_load(running: Echod) -> None:
    box = running.box
    cursor = box.cursor()
    main = running.main_pid()
    handed = running.metric(HANDED_OVER) or 0
    with Load(running.ports.tcp) as load:
        load.wait_progress()
        running.configure(workers=3)
        box.systemctl("reload", UNIT)
        wait_journal(box, cursor, "reload complete")
        wait_for(lambda: running.metric("echod_workers") == 3, 10, "3 workers")
        # The retiring workers passed their connections on (SCM_RIGHTS inside the sandbox).
        wait_for(lambda: (running.metric(HANDED_OVER) or 0) >= handed + len(load.socks), 10, "handovers")
        load.wait_progress()  # the connections opened before the reload still echo
        # A broken configuration: the reload job fails, the service stays active with the old one.
        box.write("/etc/echod/echod.toml", running.config(workers=4) + "this is not TOML\n")
        failed = box.systemctl("reload", UNIT, check=False)
        assert failed.returncode != 0, failed.stdout + failed.stderr
        assert running.prop("ActiveState") == "active"
        load.wait_progress()
    REPORT["reload_under_load"] = load.figures()
    assert not load.failures, load.failures[:5]
    assert running.main_pid() == main
    assert running.metric("echod_workers") == 3
    assert running.prop("NRestarts") == "0"
    assert not journal_problems(box.journal(UNIT, cursor))
    running.configure()
    box.systemctl("reload", UNIT)
    wait_for(lambda: running.metric("echod_workers") == 2, 15, "back to 2 workers")


def upgrade(running: Echod, cursor: str) -> int:
    """USR2 to the main process; returns the new MainPID once the old master has gone."""
    box = running.box
    old = running.main_pid()
    box.systemctl("kill", "-s", "USR2", "--kill-whom=main", UNIT)
    wait_for(lambda: running.main_pid() not in (0, old), 30, "MainPID to change")
    new = running.main_pid()
    wait_journal(box, cursor, f"echod.master[{new}]: upgrade complete")
    return new


def assert_clean_stop(running: Echod, cursor: str) -> None:
    box = running.box
    began = time.monotonic()
    box.systemctl("stop", UNIT)
    took = time.monotonic() - began
    state = running.show("ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    log = box.journal(UNIT, cursor)
    assert state["ActiveState"] == "inactive" and state["Result"] == "success", f"{state}\n{log}"
    assert "SIGKILL" not in log and not journal_problems(log), log
    assert took < TIMEOUT_STOP, f"stop took {took:.1f} s"
    assert "echod stopped" in log, log


def test_upgrade_under_load_then_stop(running: Echod) -> None:
    """Issue 16, bug 1: after an upgrade systemd SIGKILLed everything at stop (Result=signal)."""
    box = running.box
    cursor = box.cursor()
    old = running.main_pid()
    handed = running.metric(HANDED_OVER) or 0
    with Load(running.ports.tcp) as load:
        load.wait_progress()
        new = upgrade(running, cursor)
        load.wait_progress()
        wait_for(lambda: (running.metric(HANDED_OVER) or 0) >= handed + len(load.socks), 10, "handovers")
    REPORT["upgrade_under_load"] = load.figures()
    state = running.show("ActiveState", "SubState", "NRestarts", "StatusText", "MainPID")
    procs = box.processes()
    assert_echoes(running.ports.tcp)
    log = box.journal(UNIT, cursor)
    assert_clean_stop(running, cursor)  # graceful: no SIGKILL, inactive with Result=success
    assert not load.failures, load.failures[:5]
    assert new != old and state["ActiveState"] == "active" and state["NRestarts"] == "0", state
    # The status text is the new master's own, not the old one's "upgraded to master N".
    assert state["StatusText"].startswith("generation"), state
    # No "Supervising process N which is not our child", no refused notifications.
    assert not journal_problems(log), log
    assert procs.get(new, (0, ""))[0] == 1, f"the new master is not systemd's child: {procs}"


def test_two_upgrades_then_stop(running: Echod) -> None:
    box = running.box
    cursor = box.cursor()
    first = running.main_pid()
    second = upgrade(running, cursor)
    third = upgrade(running, cursor)
    assert len({first, second, third}) == 3
    assert running.prop("NRestarts") == "0"
    assert running.prop("StatusText").startswith("generation")
    assert_echoes(running.ports.tcp)
    assert_clean_stop(running, cursor)


def test_watchdog(running: Echod) -> None:
    box = running.box
    box.write("/etc/systemd/system/echod.service.d/test.conf", f"[Service]\nWatchdogSec={WATCHDOG_SEC}\n")
    box.systemctl("daemon-reload")
    box.systemctl("restart", UNIT)
    running.wait_active()
    cursor = box.cursor()
    restarts = int(running.prop("NRestarts"))
    # The master pings from its own loop; an upgraded master takes the duty over (WATCHDOG_PID).
    upgrade(running, cursor)
    time.sleep(3 * WATCHDOG_SEC)
    assert int(running.prop("NRestarts")) == restarts, box.journal(UNIT, cursor)
    assert not journal_problems(box.journal(UNIT, cursor)), box.journal(UNIT, cursor)

    # A SIGKILLed worker is echod's business: replaced at once, systemd notices nothing.
    main = running.main_pid()
    workers = [pid for pid, (ppid, comm) in box.processes().items() if ppid == main and "worker" in comm]
    assert workers, box.processes()
    box.sh(f"kill -KILL {workers[0]}")
    wait_journal(box, cursor, f"worker {workers[0]} (slot")
    wait_for(lambda: running.http("/healthz")[0] == 200, 10, "healthz 200 with the replacement worker")
    assert running.main_pid() == main and int(running.prop("NRestarts")) == restarts

    # A hung master (SIGSTOP): systemd's watchdog restarts the service within WatchdogSec.
    stopped = time.monotonic()
    box.sh(f"kill -STOP {main}")
    wait_for(lambda: int(running.prop("NRestarts")) == restarts + 1, WATCHDOG_SEC + 10, "a watchdog restart")
    REPORT["watchdog_restart_seconds"] = round(time.monotonic() - stopped, 1)
    running.wait_active()
    assert running.main_pid() != main
    assert "Watchdog timeout" in box.journal(UNIT, cursor)
    assert_echoes(running.ports.tcp)


def test_stop_flushes_pending_echoes(running: Echod) -> None:
    """Connections with echoes still pending when `systemctl stop` comes: nothing echod read is lost."""
    box = running.box
    cursor = box.cursor()
    socks, sent = [], []
    for _ in range(8):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        sock.connect(("127.0.0.1", running.ports.tcp))
        sock.settimeout(0.2)
        socks.append(sock)
        payload = random.randbytes(512 * 1024)
        done = 0
        try:  # push without reading until nothing moves: echod holds output it cannot deliver
            while done < len(payload):
                done += sock.send(payload[done : done + 65536])
        except (TimeoutError, BlockingIOError):
            pass
        sent.append(payload[:done])
    stop = subprocess.Popen(["nsenter", "-t", str(box.pid1), "-a", "systemctl", "stop", UNIT],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    began = time.monotonic()
    time.sleep(0.5)
    results = []
    for sock, data in zip(socks, sent, strict=True):
        sock.settimeout(TIMEOUT_STOP)
        sock.shutdown(socket.SHUT_WR)
        got = bytearray()
        while chunk := sock.recv(1 << 20):
            got += chunk
        results.append((len(data), len(got), hashlib.sha256(data).digest() == hashlib.sha256(got).digest()))
        sock.close()
    out = stop.communicate(timeout=TIMEOUT_STOP + 15)[0]
    took = time.monotonic() - began
    assert stop.returncode == 0, out
    assert all(ok for _, _, ok in results), results
    assert sum(s for s, _, _ in results) > 0
    state = running.show("ActiveState", "Result")
    assert state == {"ActiveState": "inactive", "Result": "success"}, state
    assert took < TIMEOUT_STOP, took
    assert not journal_problems(box.journal(UNIT, cursor))
    REPORT["stop_with_pending_echoes"] = {"bytes_pending_and_echoed": sum(s for s, _, _ in results),
                                          "stop_seconds": round(took, 1)}  # fmt: skip


def test_socket_activation(running: Echod) -> None:
    box = running.box
    port = running.ports.activated
    box.systemctl("stop", UNIT)
    box.write("/etc/systemd/system/echod.socket.d/test.conf",
              f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{port}\n")  # fmt: skip
    box.systemctl("daemon-reload")
    try:
        box.systemctl("start", "echod.socket")
        assert running.prop("ActiveState") == "inactive"
        cursor = box.cursor()
        with connect(port, timeout=30) as sock:  # the first connection starts echod.service
            sock.sendall(b"first")
            assert recv_exactly(sock, 5) == b"first"
        running.wait_active()
        assert "using socket-activated listener" in box.journal(UNIT, cursor)

        main = running.main_pid()
        box.systemctl("reload", UNIT)
        wait_journal(box, cursor, "reload complete")
        assert running.main_pid() == main
        assert_echoes(port)

        # A restart of the service keeps the socket: connections queue meanwhile, none is refused.
        with Load(port, persistent=0) as load:
            load.wait_progress()
            box.systemctl("restart", UNIT)
            running.wait_active()
            load.wait_progress()
        assert not load.failures, load.failures[:5]
        assert running.main_pid() != main

        stop_cursor = box.cursor()
        box.systemctl("stop", UNIT)
        assert running.show("ActiveState", "Result") == {"ActiveState": "inactive", "Result": "success"}
        assert not journal_problems(box.journal(UNIT, stop_cursor))
        assert box.prop("echod.socket", "ActiveState") == "active"
        assert_echoes(port)  # ... and the socket starts it again
        running.wait_active()
    finally:
        box.systemctl("stop", "echod.socket", UNIT, check=False)
        box.remove("/etc/systemd/system/echod.socket.d/test.conf")
        box.systemctl("daemon-reload")


def test_security_exposure_of_the_running_unit(running: Echod) -> None:
    result = running.box.command(["systemd-analyze", "security", "--no-pager", UNIT], check=False)
    match = re.search(r"Overall exposure level for echod\.service: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    REPORT["security_exposure"] = float(match.group(1))
    assert float(match.group(1)) <= 1.5, result.stdout
