"""The deployment kit, driven for real: systemd units (systemd-analyze), socket activation
(systemd-socket-activate), daemon mode (`echod start/stop/reload/status`), privilege drop, HAProxy in
front of two instances, logrotate, the Kubernetes manifests, the Containerfile and deploy/install.sh.

Every wait is a deadline and every subprocess has a timeout, so a hang fails the test instead of
stalling the run. Only loopback addresses are used.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    ECHOD,
    DaemonFactory,
    alive,
    children,
    comm,
    echo_roundtrip,
    free_port,
    kill_group,
    start_haproxy,
    wait_for,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNITS = ROOT / "systemd"
# The console script next to the interpreter running the tests (.venv/bin/echod under `make test`).
ECHOD_BIN = shutil.which("echod", path=str(Path(sys.executable).parent))
INSTALLED_ECHOD = "/opt/echod/venv/bin/echod"  # the path the shipped units use
LIVENESS = 15.0  # seconds: generous deadline for anything that should happen at once
CMD_TIMEOUT = 60.0


# -- helpers ------------------------------------------------------------------------------------
def clean_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The test's environment without echod/systemd variables, with an empty configuration file (so a
    real /etc/echod/echod.toml is never read)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ECHOD_", "NOTIFY_SOCKET", "LISTEN_"))}
    empty = tmp / "empty.toml"
    empty.touch()
    env["ECHOD_CONFIG"] = str(empty)
    env.update(extra)
    return env


def run(cmd: list[str], timeout: float = CMD_TIMEOUT, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kwargs
    )


def echod_bin() -> str:
    assert ECHOD_BIN, f"no echod console script next to {sys.executable} (pip install -e . first)"
    return ECHOD_BIN


def echoes(host: str, port: int, payload: bytes = b"ping\n", timeout: float = 5.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            return echo_roundtrip(sock, payload) == payload
    except OSError:
        return False


def assert_echo(port: int, payload: bytes = b"hello, echod\n", timeout: float = LIVENESS) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        assert echo_roundtrip(sock, payload) == payload


def proc_ids(pid: int) -> tuple[list[int], list[int]]:
    """(real, effective, saved, fs) uids and gids from /proc/PID/status."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return [int(v) for v in fields["Uid"]], [int(v) for v in fields["Gid"]]


def log_of(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def substitute(text: str, replacements: dict[str, str]) -> str:
    """Replace every key in one pass; each must occur, so that a drift in the shipped file fails."""
    for old in replacements:
        assert old in text, f"{old!r} not found: the shipped file changed, update the test"
    pattern = re.compile("|".join(re.escape(old) for old in sorted(replacements, key=len, reverse=True)))
    return pattern.sub(lambda m: replacements[m.group(0)], text)


# -- systemd units ------------------------------------------------------------------------------
def units_with_real_binary(tmp: Path) -> Path:
    """Copies of the units whose Exec* lines point at this checkout's echod, so that verify can check
    that the binary exists and is executable (it fails for /opt/echod/venv/bin/echod here)."""
    unitdir = tmp / "units"
    unitdir.mkdir()
    for name in ("echod.service", "echod.socket"):
        text = (UNITS / name).read_text()
        if name == "echod.service":
            assert INSTALLED_ECHOD in text
            text = text.replace(INSTALLED_ECHOD, echod_bin())
        (unitdir / name).write_text(text)
    return unitdir


def test_systemd_units_verify(tmp_path: Path) -> None:
    unitdir = units_with_real_binary(tmp_path)
    result = run(["systemd-analyze", "verify", "./echod.service", "./echod.socket"], cwd=unitdir)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # verify exits 0 on unknown keys and unparsable values: it only warns, naming the unit file.
    problems = [
        line
        for line in output.splitlines()
        if "echod" in line or "Unknown" in line or "ignoring" in line.lower() or "Failed" in line
    ]
    assert not problems, output


def test_systemd_service_security_exposure(tmp_path: Path) -> None:
    unitdir = units_with_real_binary(tmp_path)
    result = run(["systemd-analyze", "security", "--offline=true", str(unitdir / "echod.service")])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    match = re.search(r"Overall exposure level for echod\.service: (\d+(?:\.\d+)?)", output)
    assert match, output
    exposure = float(match.group(1))
    assert exposure <= 1.5, output


# -- socket activation --------------------------------------------------------------------------
def test_socket_activation_serves_echo(tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "activate.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "--fdname=echo",
             echod_bin(), "run", "--workers", "2", "--metrics-listen", ""],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=clean_env(tmp_path), start_new_session=True,
        )  # fmt: skip
    try:
        wait_for(lambda: "Listening on" in log_of(log_path) or proc.poll() is not None, LIVENESS,
                 "systemd-socket-activate to listen")  # fmt: skip
        assert proc.poll() is None, log_of(log_path)
        # The first connection makes systemd-socket-activate exec echod, which must accept it from fd 3.
        assert_echo(port, b"first connection, queued before echod started\n")
        for i in range(5):
            assert_echo(port, f"connection {i}\n".encode())
        log = log_of(log_path)
        assert f"using socket-activated listener 127.0.0.1:{port}" in log, log
        # exec keeps the pid: LISTEN_PID named echod's own pid, and the master is that process.
        assert comm(proc.pid) == "echod-master", log
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(LIVENESS + 30) == 0, log_of(log_path)
    finally:
        kill_group(proc)


def test_stale_listen_pid_is_ignored(tmp_path: Path) -> None:
    """LISTEN_FDS left behind for another process (LISTEN_PID not echod's): echod binds --listen itself
    and leaves fd 3 alone, although fd 3 is a real listening socket it could have adopted."""
    port = free_port()
    decoy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    decoy.bind(("127.0.0.1", 0))
    decoy.listen()
    decoy_port = decoy.getsockname()[1]
    # Put the decoy at fd 3 and exec echod (same pid), as systemd would, but with someone else's pid.
    wrapper = "import os, sys; os.dup2(int(sys.argv[1]), 3); os.execv(sys.argv[2], sys.argv[2:])"
    env = clean_env(tmp_path, LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="echo")
    log_path = tmp_path / "stale.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", wrapper, str(decoy.fileno()), echod_bin(), "run", "--workers", "1",
             "--metrics-listen", "", "--listen", f"127.0.0.1:{port}"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            pass_fds=(decoy.fileno(),), start_new_session=True,
        )  # fmt: skip
    try:
        wait_for(lambda: "ready:" in log_of(log_path) or proc.poll() is not None, LIVENESS, "echod ready")
        assert proc.poll() is None, log_of(log_path)
        assert_echo(port)
        log = log_of(log_path)
        assert "socket-activated" not in log, log
        assert f"listen 127.0.0.1:{port}," in log, log
        assert str(decoy_port) not in log, log
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(LIVENESS + 30) == 0, log_of(log_path)
    finally:
        kill_group(proc)
        decoy.close()


# -- daemon mode: echod start / stop / reload / status -----------------------------------------
class Ctl:
    """`echod start|stop|reload|status` with a pidfile and a log file in tmp; remembers what it
    started so that the fixture can always stop it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.pidfile = tmp / "run" / "echod.pid"
        self.log = tmp / "echod-daemon.log"
        self.env = clean_env(tmp)
        self.pidfiles: set[Path] = set()

    def __call__(
        self, command: str, *args: str, timeout: float = CMD_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        return run([*ECHOD, command, *args], timeout=timeout, env=self.env)

    def start(self, port: int, *extra: str, pidfile: Path | None = None) -> subprocess.CompletedProcess[str]:
        pidfile = pidfile or self.pidfile
        self.pidfiles.add(pidfile)
        return self(
            "start", "--daemon-pidfile", str(pidfile), "--listen", f"127.0.0.1:{port}",
            "--metrics-listen", "", "--log-file", str(self.log), "--workers", "2", *extra,
        )  # fmt: skip

    def ctl(self, command: str, pidfile: Path | None = None) -> subprocess.CompletedProcess[str]:
        args = ["--pidfile", str(pidfile or self.pidfile)]
        if command == "stop":
            args += ["--timeout", "30"]
        return self(command, *args)

    def pid(self, pidfile: Path | None = None) -> int:
        return int((pidfile or self.pidfile).read_text().split()[0])

    def pid_now(self) -> int | None:
        """The pidfile's pid, or None while it is being rewritten: an upgraded master truncates and
        rewrites the file it took over (upgrade.Pidfile.write_pid), and a reader in between finds it
        empty (daemon.running_pid reads again then). A clean-clone CI run read it there."""
        text = self.pidfile.read_text().split()
        return int(text[0]) if text else None

    def cleanup(self) -> None:
        for pidfile in self.pidfiles:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.ctl("stop", pidfile)
            try:
                pid = self.pid(pidfile)
            except (OSError, ValueError, IndexError):
                continue
            if alive(pid) and comm(pid).startswith("echod"):  # last resort: the pid is still ours
                for child in children(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def ctl(tmp_path: Path) -> Iterator[Ctl]:
    control = Ctl(tmp_path)
    try:
        yield control
    finally:
        control.cleanup()


def test_daemon_lifecycle(ctl: Ctl) -> None:
    port = free_port()
    started = ctl.start(port)
    assert started.returncode == 0, started.stderr + log_of(ctl.log)
    assert_echo(port)
    pid = ctl.pid()
    assert comm(pid) == "echod-master"

    status = ctl.ctl("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert str(pid) in status.stdout

    second = ctl.start(port)
    assert second.returncode != 0
    assert "already running" in second.stderr, second.stderr
    assert ctl.pid() == pid and alive(pid), "a refused start must leave the running daemon alone"
    assert_echo(port)

    reload = ctl.ctl("reload")
    assert reload.returncode == 0, reload.stderr
    wait_for(lambda: "reload complete" in log_of(ctl.log), LIVENESS, "'reload complete' in the log")
    assert_echo(port)

    stop = ctl.ctl("stop")
    assert stop.returncode == 0, stop.stdout + stop.stderr + log_of(ctl.log)
    wait_for(lambda: not alive(pid), LIVENESS, "the master to be gone")
    status = ctl.ctl("status")
    assert status.returncode == 3, status.stdout + status.stderr
    assert not ctl.pidfile.exists()
    assert not echoes("127.0.0.1", port, timeout=2.0)


def test_upgrade_of_a_started_daemon_hands_over_the_pidfile(ctl: Ctl) -> None:
    """SIGUSR2 to a daemon from `echod start`: the new master takes over the locked pidfile."""
    port = free_port()
    started = ctl.start(port)
    assert started.returncode == 0, started.stderr + log_of(ctl.log)
    old = ctl.pid()
    os.kill(old, signal.SIGUSR2)
    wait_for(lambda: ctl.pid_now() not in (old, None), LIVENESS, "the pidfile to name the new master")
    new = ctl.pid()
    wait_for(lambda: not alive(old), LIVENESS, "the old master to exit")
    assert comm(new) == "echod-master" and alive(new), log_of(ctl.log)
    assert "upgrade failed" not in log_of(ctl.log), log_of(ctl.log)
    assert_echo(port)
    status = ctl.ctl("status")
    assert status.returncode == 0 and str(new) in status.stdout, status.stdout + status.stderr
    stop = ctl.ctl("stop")
    assert stop.returncode == 0, stop.stdout + stop.stderr + log_of(ctl.log)
    wait_for(lambda: not alive(new), LIVENESS, "the new master to be gone")
    assert ctl.ctl("status").returncode == 3
    assert not ctl.pidfile.exists()


def test_stop_during_an_upgrade_stops_the_new_master_too(ctl: Ctl, tmp_path: Path) -> None:
    """`echod stop` while a USR2 upgrade's new master is still starting: both must go. Left alone,
    the new master came up after the old one had exited and served on, while `stop` (the pidfile
    gone with the old master) reported the service stopped."""
    hook = tmp_path / "slow-upgrade"
    hook.mkdir()
    # A new master that is slow to start (it alone has ECHOD_INHERIT): once it has taken its inherited
    # sockets (and so popped the variable), its next log call sleeps 4 s, in its own thread. Not
    # earlier: a successor whose parent is already gone runs as a fresh instance (and fails, the port
    # held by its own inherited sockets). Not SIGSTOP: a stopped process in the group that the old
    # master's exit orphans gets SIGHUP from the kernel. Not a thread that waits for the variable to
    # go and then holds logging's lock: with 4 test processes on 2 cores the new master logged, got
    # ready and took over before that thread ran (a `make test` run), and `stop` met no upgrade.
    (hook / "sitecustomize.py").write_text(
        "import logging, os, time\n"
        "if 'ECHOD_INHERIT' in os.environ:\n"
        "    _log, _stalled = logging.Logger._log, []\n"
        "    def _slow_log(self, *args, **kwargs):\n"
        "        if 'ECHOD_INHERIT' not in os.environ and not _stalled:\n"
        "            _stalled.append(True)\n"
        "            time.sleep(4)\n"
        "        return _log(self, *args, **kwargs)\n"
        "    logging.Logger._log = _slow_log\n"
    )
    ctl.env["PYTHONPATH"] = str(hook)
    port = free_port()
    started = ctl.start(port)
    assert started.returncode == 0, started.stderr + log_of(ctl.log)
    old = ctl.pid()
    os.kill(old, signal.SIGUSR2)
    found: list[int] = []

    def new_master() -> bool:
        found[:] = [int(m) for m in re.findall(r"upgrade: started new master (\d+)", log_of(ctl.log))]
        return bool(found)

    wait_for(new_master, LIVENESS, "the upgrade to start a new master")
    new = found[0]
    try:
        stop = ctl.ctl("stop")
        assert stop.returncode == 0, stop.stdout + stop.stderr + log_of(ctl.log)
        assert not alive(old)
        wait_for(lambda: not alive(new), LIVENESS, "the new master to be stopped as well")
    finally:
        if alive(new):
            os.kill(new, signal.SIGKILL)
    assert "stopping during an upgrade" in log_of(ctl.log)
    assert ctl.ctl("status").returncode == 3
    with pytest.raises(ConnectionRefusedError):  # nothing serves the port any more
        socket.create_connection(("127.0.0.1", port), timeout=LIVENESS).close()


def test_stale_pidfile_reported_and_does_not_block_start(ctl: Ctl) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait(CMD_TIMEOUT)
    ctl.pidfile.parent.mkdir(parents=True)
    ctl.pidfile.write_text(f"{dead.pid}\n")

    status = ctl.ctl("status")
    assert status.returncode == 1, status.stdout + status.stderr

    port = free_port()
    started = ctl.start(port)
    assert started.returncode == 0, started.stderr + log_of(ctl.log)
    assert ctl.pid() != dead.pid
    assert comm(ctl.pid()) == "echod-master"
    assert ctl.ctl("status").returncode == 0
    assert_echo(port)
    stop = ctl.ctl("stop")
    assert stop.returncode == 0, stop.stdout + stop.stderr


def test_start_on_busy_port_fails_with_address(ctl: Ctl) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = ctl.start(port)
    assert started.returncode == 69, started.stderr  # SPEC: 69 = cannot bind a listen address
    assert f"127.0.0.1:{port}" in started.stderr
    assert ctl.ctl("status").returncode == 3


def test_start_with_bad_config_exits_78(ctl: Ctl, tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("workerz = 4\n")
    started = ctl.start(free_port(), "--config", str(config))
    assert started.returncode == 78, started.stderr
    assert "workerz" in started.stderr
    assert ctl.ctl("status").returncode == 3


def test_reload_and_stop_when_not_running(ctl: Ctl) -> None:
    reload = ctl.ctl("reload")
    assert reload.returncode == 1, reload.stdout + reload.stderr
    stop = ctl.ctl("stop")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    status = ctl.ctl("status")
    assert status.returncode == 3, status.stdout + status.stderr


# -- privilege drop -----------------------------------------------------------------------------
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")


@root_only
@pytest.mark.parametrize("metrics", [False, True], ids=["metrics-off", "metrics-on"])
def test_privilege_drop_to_nobody(echod: DaemonFactory, metrics: bool) -> None:
    nobody = pwd.getpwnam("nobody").pw_uid
    nogroup = grp.getgrnam("nogroup").gr_gid
    daemon = echod("--daemon-user", "nobody", "--daemon-group", "nogroup", workers=2, metrics=metrics)
    with daemon.connect() as sock:
        assert echo_roundtrip(sock, b"as nobody\n") == b"as nobody\n"
    workers = daemon.workers()
    assert len(workers) == 2, daemon.log()
    processes = [daemon.pid, *workers]
    if metrics:
        assert daemon.http("/healthz")[0] == 200, daemon.log()
        metrics_pid = daemon.metrics_process()
        assert metrics_pid is not None, daemon.log()
        processes.append(metrics_pid)
    for pid in processes:
        uids, gids = proc_ids(pid)
        assert uids == [nobody] * 4, f"{comm(pid)} ({pid}) runs with uids {uids}"
        assert gids == [nogroup] * 4, f"{comm(pid)} ({pid}) runs with gids {gids}"
        groups = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if line.startswith("Groups:"))  # fmt: skip
        assert groups.split()[1:] in ([], [str(nogroup)]), f"{comm(pid)} keeps root's groups: {groups}"


@root_only
def test_privilege_drop_gives_away_no_log_but_a_regular_file(echod: DaemonFactory, tmp_path: Path) -> None:
    """log.file may name a terminal or /dev/stdout: handing that to daemon.user would give it the
    admin's terminal. Only a regular log file changes owner (here: a FIFO, which must stay root's)."""
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo, 0o666)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # echod's open for appending needs a reader
    lines = bytearray()

    def said(text: bytes) -> bool:
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(reader, 65536):
                lines.extend(chunk)
        return text in lines

    try:
        daemon = echod("--daemon-user", "nobody", "--log-file", str(fifo), workers=1, ready=False)
        wait_for(lambda: said(b"ready:"), LIVENESS, "ready: in the FIFO")
        with daemon.connect() as sock:
            assert echo_roundtrip(sock, b"fifo\n") == b"fifo\n"
        assert all(proc_ids(pid)[0] == [pwd.getpwnam("nobody").pw_uid] * 4 for pid in daemon.workers())
        assert fifo.stat().st_uid == 0, "a log that is not a regular file was given to daemon.user"
    finally:
        os.close(reader)


@root_only
@pytest.mark.parametrize("flag", ["--daemon-user", "--daemon-group"])
def test_privilege_drop_to_unknown_account_fails(tmp_path: Path, flag: str) -> None:
    name = "no-such-echod-account"
    result = run(
        [*ECHOD, "run", flag, name, "--listen", f"127.0.0.1:{free_port()}", "--metrics-listen", "",
         "--workers", "1"],
        env=clean_env(tmp_path),
    )  # fmt: skip
    assert result.returncode != 0
    assert name in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


# -- HAProxy ------------------------------------------------------------------------------------
def test_haproxy_config_is_valid() -> None:
    result = run(["haproxy", "-c", "-f", str(DEPLOY / "haproxy" / "haproxy.cfg")])
    assert result.returncode == 0, result.stdout + result.stderr


def haproxy_status(stats_socket: Path) -> dict[str, str]:
    """server name -> status (UP, DOWN, ...) from the runtime API's `show stat`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(stats_socket))
        sock.sendall(b"show stat\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    name, status = header.index("svname"), header.index("status")
    rows = [line.split(",") for line in lines[1:] if line]
    return {row[name]: row[status] for row in rows if row[0] == "echod" and row[name] != "BACKEND"}


def test_haproxy_balances_and_drops_a_stopped_instance(echod: DaemonFactory, tmp_path: Path) -> None:
    first, second = echod(workers=1), echod(workers=1)
    front = free_port()
    stats_socket = tmp_path / "haproxy.sock"
    config = substitute(
        (DEPLOY / "haproxy" / "haproxy.cfg").read_text(),
        {
            "127.0.0.1:7000": f"127.0.0.1:{front}",
            "127.0.0.1:7007": first.listen[0],
            "127.0.0.1:7008": second.listen[0],
            "check port 9640": f"check port {first.metrics_port}",
            "check port 9641": f"check port {second.metrics_port}",
            "/run/haproxy-echod.sock": str(stats_socket),
        },
    )
    config_path = tmp_path / "haproxy.cfg"
    config_path.write_text(config)
    log_path = tmp_path / "haproxy.log"
    proxy = start_haproxy(config_path, log_path)
    try:

        def state() -> dict[str, str]:
            assert proxy.poll() is None, f"haproxy exited with {proxy.returncode}:\n{log_of(log_path)}"
            try:
                return haproxy_status(stats_socket)
            except OSError:
                return {}

        def wait_state(predicate: Callable[[dict[str, str]], bool], what: str) -> None:
            seen: list[dict[str, str]] = []
            try:
                wait_for(lambda: predicate(seen.append(state()) or seen[-1]), 30, what)
            except AssertionError as exc:
                raise AssertionError(f"{exc}; last state {seen[-1]}\n{log_of(log_path)}") from None

        wait_state(lambda s: s == {"echod-1": "UP", "echod-2": "UP"}, "both servers UP")
        for i in range(10):
            assert echoes("127.0.0.1", front, f"through haproxy {i}\n".encode()), log_of(log_path)

        assert first.stop(signal.SIGTERM) == 0, first.log()
        wait_state(lambda s: s.get("echod-1") == "DOWN", "haproxy to mark echod-1 DOWN")
        assert state()["echod-2"] == "UP", log_of(log_path)
        for i in range(20):
            payload = f"after echod-1 stopped, connection {i}\n".encode()
            assert echoes("127.0.0.1", front, payload), f"connection {i} failed\n{log_of(log_path)}"
        assert proxy.poll() is None, log_of(log_path)
    finally:
        kill_group(proxy)


# -- logrotate ----------------------------------------------------------------------------------
def test_logrotate_config_parses() -> None:
    result = run(["logrotate", "-d", str(DEPLOY / "logrotate" / "echod")])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # logrotate -d exits 0 even for unknown directives; it prints "error: ..." for them.
    assert "error" not in output.lower(), output


def rotate(ctl: Ctl, logdir: Path, tmp_path: Path) -> None:
    """One forced rotation with the shipped logrotate file, its paths moved to `logdir` and ctl's pidfile."""
    config = tmp_path / "logrotate.conf"
    config.write_text(
        substitute(
            (DEPLOY / "logrotate" / "echod").read_text(),
            {"/var/log/echod/": f"{logdir}/", "/run/echod/echod.pid": str(ctl.pidfile)},
        )
    )
    config.chmod(0o644)
    result = run(["logrotate", "--force", "--state", str(tmp_path / "logrotate.state"), str(config)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_logrotate_rotation_makes_the_daemon_reopen_its_log(ctl: Ctl, tmp_path: Path) -> None:
    """A real rotation with the shipped file (paths moved into tmp): postrotate finds the daemon
    through its pidfile and SIGUSR1 makes it write to the new file."""
    logdir = tmp_path / "log"
    logdir.mkdir()
    ctl.log = logdir / "echod.log"
    port = free_port()
    started = ctl.start(port)
    assert started.returncode == 0, started.stderr + log_of(ctl.log)
    rotate(ctl, logdir, tmp_path)
    rotated = logdir / "echod.log.1"
    assert rotated.exists(), sorted(p.name for p in logdir.iterdir())
    assert "ready:" in rotated.read_text()
    wait_for(lambda: "log file reopened" in log_of(ctl.log), LIVENESS, "the daemon to reopen its log")
    assert "log file reopened" not in rotated.read_text()
    assert_echo(port)
    stop = ctl.ctl("stop")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert "echod stopped" in log_of(ctl.log)


@root_only
def test_logrotate_and_reload_work_after_dropping_privileges(ctl: Ctl, tmp_path: Path) -> None:
    """The log file is opened as root, then the master becomes nobody: the file must be nobody's, or
    the first rotation's SIGUSR1 (and every reload, which checks the file) fails for lack of access."""
    logdir = Path(tempfile.mkdtemp(prefix="echod-test-log-"))  # tmp_path's parents are root's 0700
    try:
        logdir.chmod(0o755)  # root's, like /var/log/echod
        ctl.log = logdir / "echod.log"
        readable = logdir / "echod.toml"  # a reload re-reads it as nobody, like /etc/echod/echod.toml
        readable.write_text("")
        readable.chmod(0o644)
        ctl.env["ECHOD_CONFIG"] = str(readable)
        port = free_port()
        started = ctl.start(port, "--daemon-user", "nobody", "--daemon-group", "nogroup")
        assert started.returncode == 0, started.stderr + log_of(ctl.log)
        assert ctl.log.stat().st_uid == pwd.getpwnam("nobody").pw_uid
        reload = ctl.ctl("reload")
        assert reload.returncode == 0, reload.stdout + reload.stderr
        wait_for(
            lambda: "reload complete" in log_of(ctl.log) or "reload failed" in log_of(ctl.log),
            LIVENESS,
            "the reload to end",
        )
        assert "reload complete" in log_of(ctl.log), log_of(ctl.log)
        rotate(ctl, logdir, tmp_path)
        wait_for(lambda: "log file reopened" in log_of(ctl.log), LIVENESS, "the daemon to reopen its log")
        assert "cannot reopen" not in log_of(logdir / "echod.log.1")
        assert alive(ctl.pid())
        assert_echo(port)
        stop = ctl.ctl("stop")
        assert stop.returncode == 0, stop.stdout + stop.stderr
    finally:
        shutil.rmtree(logdir, ignore_errors=True)


# -- Kubernetes and the container image -------------------------------------------------------
def load_manifest(name: str) -> dict:  # type: ignore[type-arg]
    import yaml  # PyYAML, a dependency of kubernetes-validate

    docs = [doc for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text()) if doc]
    assert len(docs) == 1, f"{name}: expected one document"
    return docs[0]  # type: ignore[no-any-return]


def check_config(tmp: Path, args: list[str], env: dict[str, str]) -> None:
    """The flags and ECHOD_* variables a manifest passes must be ones echod accepts."""
    assert args[0] == "run", args
    result = run([*ECHOD, "check-config", *args[1:]], env=clean_env(tmp, **env))
    assert result.returncode == 0, result.stderr


def test_kubernetes_manifests_validate(tmp_path: Path) -> None:
    import kubernetes_validate

    deployment, service = load_manifest("deployment.yaml"), load_manifest("service.yaml")
    podmonitor, kustomization = load_manifest("podmonitor.yaml"), load_manifest("kustomization.yaml")
    for version in ("1.28.0", kubernetes_validate.latest_version()):
        for resource in (deployment, service):
            try:
                kubernetes_validate.validate(resource, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                raise AssertionError(f"{resource['kind']} (k8s {version}) at {path}: {exc.message}") from None

    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == ["deployment.yaml", "podmonitor.yaml", "service.yaml"]

    assert deployment["kind"] == "Deployment"
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"echo": 7007, "metrics": 9640}
    for probe in ("livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz"
        assert get["port"] in (9640, "metrics"), get
    # The kubelet probes the pod IP: metrics must not listen on loopback only (the default).
    args = container["args"]
    assert args[args.index("--metrics-listen") + 1] == "0.0.0.0:9640"
    check_config(tmp_path, args, {e["name"]: e["value"] for e in container.get("env", [])})
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][kind].keys(), container["resources"]
    pod_security, security = pod["spec"]["securityContext"], container["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] != 0
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]

    assert service["kind"] == "Service"
    assert service["spec"]["selector"].items() <= labels.items()
    assert {(p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        (7007, "echo"),
        (9640, "metrics"),
    }

    assert podmonitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert podmonitor["kind"] == "PodMonitor"
    assert podmonitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = podmonitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    assert endpoint.get("path", "/metrics") == "/metrics"


def test_containerfile(tmp_path: Path, echod: DaemonFactory) -> None:
    """Cannot be built here: check what can be checked without a container engine, and run the
    HEALTHCHECK command against a real echod."""
    text = (DEPLOY / "container" / "Containerfile").read_text()
    lines = re.sub(r"\\\n\s*", " ", text).splitlines()  # join continuation lines
    instructions = [
        line.strip().split(None, 1) for line in lines if line.strip() and not line.startswith("#")
    ]
    stages = [args for op, args in instructions if op == "FROM"]
    assert stages and stages[-1].split()[0] == "python:3.11-slim", stages
    final = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM") :]
    ops = {op: args for op, args in final}  # the last of each instruction in the final stage
    user = ops["USER"].split(":")[0]
    assert user not in ("root", "0"), user
    healthcheck = ops["HEALTHCHECK"]
    probe = json.loads(healthcheck[healthcheck.index(" CMD ") + 5 :])
    assert probe[0] == "python" and any("/healthz" in arg and ":9640/" in arg for arg in probe), probe
    daemon = echod(workers=1)
    probe_here = [sys.executable, *(arg.replace(":9640/", f":{daemon.metrics_port}/") for arg in probe[1:])]
    healthy = run(probe_here)
    assert healthy.returncode == 0, healthy.stderr
    assert daemon.stop() == 0, daemon.log()
    assert run(probe_here).returncode != 0, "the healthcheck passes with echod stopped"
    command = json.loads(ops["ENTRYPOINT"]) + json.loads(ops["CMD"])
    assert command == ["echod", "run", "--listen", "0.0.0.0:7007", "--metrics-listen", "0.0.0.0:9640"]
    check_config(tmp_path, command[1:], {})
    for op, args in instructions:  # everything copied from the build context exists
        if op == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), source


# -- deploy/install.sh --------------------------------------------------------------------------
def snapshot(*roots: Path) -> dict[str, tuple[int, int, int]]:
    """path -> (mtime_ns, size, mode) of every file and directory under roots (bytecode caches aside)."""
    seen = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            if "__pycache__" in path.parts:
                continue
            info = path.lstat()
            seen[str(path)] = (info.st_mtime_ns, info.st_size, info.st_mode)
    return seen


def test_install_script(tmp_path: Path) -> None:
    """A full install into tmp (a real venv, dependencies from pip's cache or index: ~10-20 s)."""
    prefix, confdir = tmp_path / "prefix", tmp_path / "conf"
    unitdir, logrotatedir = tmp_path / "systemd", tmp_path / "logrotate.d"
    env = clean_env(
        tmp_path, PREFIX=str(prefix), CONFDIR=str(confdir), UNITDIR=str(unitdir),
        LOGROTATEDIR=str(logrotatedir),
    )  # fmt: skip
    del env["ECHOD_CONFIG"]
    assert os.access(DEPLOY / "install.sh", os.X_OK), "deploy/install.sh must be executable"
    # install.sh installs the checkout it lives in: give it a private copy, so that edits made to this
    # checkout while the test runs cannot make the second run (rightly) reinstall.
    checkout = tmp_path / "checkout"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for part in ("service", "config", "systemd", "deploy"):
        shutil.copytree(ROOT / part, checkout / part, ignore=ignore)
    for part in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / part, checkout / part)
    install = [str(checkout / "deploy" / "install.sh")]

    first = run(install, timeout=150, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    installed = prefix / "venv" / "bin" / "echod"
    config = confdir / "echod.toml"
    assert config.read_text() == (checkout / "config" / "echod.toml").read_text()
    assert (logrotatedir / "echod").read_text() == (checkout / "deploy" / "logrotate" / "echod").read_text()
    service = (unitdir / "echod.service").read_text()
    assert f"ExecStart={installed} run\n" in service
    assert f"Environment=ECHOD_CONFIG={config}\n" in service
    assert "/opt/echod" not in service and "/etc/echod" not in service
    assert (unitdir / "echod.socket").read_text() == (checkout / "systemd" / "echod.socket").read_text()
    if not Path("/run/systemd/system").is_dir():
        assert "systemd is not PID 1" in first.stdout, first.stdout
    # The installed units point at the installed binary, which therefore exists and is executable.
    verify = run(["systemd-analyze", "verify", "./echod.service", "./echod.socket"], cwd=unitdir)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # The package was built from a copy: the checkout has no build/ or *.egg-info afterwards.
    assert not (checkout / "build").exists()
    assert not list(checkout.glob("service/*.egg-info"))

    # Idempotent: a second run succeeds, changes nothing, and keeps the operator's configuration.
    config.write_text(config.read_text().replace("\nworkers = 0\n", "\nworkers = 3\n"))
    assert "workers = 3" in config.read_text()
    before = snapshot(prefix, confdir, unitdir, logrotatedir)
    second = run(install, timeout=150, env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert snapshot(prefix, confdir, unitdir, logrotatedir) == before, second.stdout
    assert "workers = 3" in config.read_text()

    version = run([str(installed), "--version"])
    assert version.returncode == 0 and version.stdout.startswith("echod "), version.stdout + version.stderr
    if os.environ.get("EXPECT_ECHOD_BUILD") == "compiled":  # make test: install.sh compiles where it can
        assert "(compiled" in version.stdout, version.stdout
    effective = run([str(installed), "check-config", "--config", str(config)])
    assert effective.returncode == 0, effective.stderr
    assert "workers = 3" in effective.stdout

    uninstall = run([*install, "--uninstall"], env=env)
    assert uninstall.returncode == 0, uninstall.stdout + uninstall.stderr
    for gone in (unitdir / "echod.service", unitdir / "echod.socket", logrotatedir / "echod", prefix):
        assert not gone.exists(), f"{gone} left behind"
    assert "workers = 3" in config.read_text(), "--uninstall without --purge keeps the configuration"

    purge = run([*install, "--uninstall", "--purge"], env=env)
    assert purge.returncode == 0, purge.stdout + purge.stderr
    assert not config.exists()
