"""SysV-style daemon mode: `echod start | stop | reload | status`, a flock'd pidfile, privilege drop.

`start` binds everything in the launching process (so "address in use" is reported there), then forks a
child that daemonizes with python-daemon. The daemon reports over a pipe once every worker accepts, or
why it could not start, and `start` exits with that result: it never returns 0 for a daemon that died.
`run` is the same without the detaching: what systemd starts.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import grp
import logging
import os
import pwd
import select
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import logs
from .config import ConfigError, Settings
from .config_load import config_path, load_settings
from .inherit import exited
from .startup import Prepared, build_master, config_failure, prepare

EX_RUNTIME = 1
READY_TIMEOUT = 60.0

# LSB init-script status codes.
STATUS_RUNNING = 0
STATUS_DEAD_PIDFILE = 1
STATUS_NOT_RUNNING = 3


class AlreadyRunning(Exception):
    pass


class PidFile:
    """A pidfile guarded by `flock`: the kernel drops the lock when the daemon dies, so a stale file
    never blocks a start, and a second instance is refused while the first holds it."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.fd = -1
        self.handed_over = False  # an in-place upgrade's new master holds the lock and the file now

    def __enter__(self) -> PidFile:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(
                f"already running (pid {read_pid(self.path)}, pidfile {self.path})"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            if not self.handed_over:
                with contextlib.suppress(OSError):
                    self.path.unlink()
            os.close(self.fd)
            self.fd = -1


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def is_locked(path: Path) -> bool:
    """True while a live daemon holds the pidfile's lock."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


# A locked pidfile found empty is read again this often (see running_pid); the rewrite it waits for is
# two system calls.
_REREADS = 20
_REREAD_PAUSE = 0.005  # seconds


def running_pid(path: Path) -> int | None:
    """The pid of the live daemon that holds the pidfile's lock, or None.

    Locked but empty is a pidfile being written: PidFile locks before it writes, and an upgraded
    master rewrites the file it took over in place (upgrade.Pidfile.write_pid). It is read again for a
    moment rather than answered "not running", which made `echod stop` return 0 with the daemon up."""
    for _ in range(_REREADS):
        if not is_locked(path):
            return None
        pid = read_pid(path)
        if pid is not None:
            return pid
        time.sleep(_REREAD_PAUSE)
    return None


def drop_privileges(user: str, group: str, access_log: str = "") -> None:
    """Switch to `user`/`group` after binding; raise PermissionError rather than keep running as root.
    The access log is created first, for the workers to open as `user` (logs.give_access_log)."""
    if not user and not group:
        return
    gid = grp.getgrnam(group).gr_gid if group else None
    uid = pwd.getpwnam(user).pw_uid if user else None
    if gid is None and uid is not None:
        gid = pwd.getpwuid(uid).pw_gid
    logs.give_to(uid)
    logs.give_access_log(access_log, uid)
    if os.getuid() == 0 and gid is not None:
        os.setgroups([])
    if gid is not None:
        os.setgid(gid)
    if uid is not None:
        os.setuid(uid)
        if os.getuid() == 0 or os.geteuid() == 0:
            raise PermissionError(f"still root after switching to {user!r}")


# -- commands ------------------------------------------------------------------------------------
def _pidfile_path(args: argparse.Namespace) -> Path:
    """--pidfile, else daemon.pidfile of the configuration (exits 78 if that is invalid)."""
    if args.pidfile:
        return Path(args.pidfile)
    try:
        settings = load_settings({}, config_path(args.config, os.environ))
    except ConfigError as exc:
        raise SystemExit(config_failure(exc)) from None
    return Path(settings.daemon.pidfile)


def cmd_status(args: argparse.Namespace) -> int:
    path = _pidfile_path(args)
    pid = running_pid(path)
    if pid is not None:
        print(f"echod is running (pid {pid})")
        return STATUS_RUNNING
    if path.exists():
        print(f"echod is not running, but {path} exists")
        return STATUS_DEAD_PIDFILE
    print("echod is not running")
    return STATUS_NOT_RUNNING


def cmd_reload(args: argparse.Namespace) -> int:
    pid = running_pid(_pidfile_path(args))
    if pid is None:
        print("echod is not running", file=sys.stderr)
        return 1
    os.kill(pid, signal.SIGHUP)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    path = _pidfile_path(args)
    pid = running_pid(path)
    if pid is None:
        print("echod is not running")
        return 0
    try:
        # A pidfd, not the bare pid: the signal cannot reach a recycled pid, and we can see the exit.
        pidfd: int | None = os.pidfd_open(pid)
    except ProcessLookupError:
        pidfd = None  # gone between the read and now; its lock goes with it
    try:
        if pidfd is not None:
            with contextlib.suppress(ProcessLookupError):  # it exited in between: wait out the lock
                signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        deadline = time.monotonic() + args.timeout
        # The lock alone is not the exit: the master releases it (python-daemon's context.close) before
        # it has exited, and during an upgrade the new master shares it. A CI run saw `stop` return with
        # the old master still alive (tests/test_deploy.py, stop during an upgrade).
        while is_locked(path) or (pidfd is not None and not exited(pidfd)):
            if time.monotonic() > deadline:
                print(f"echod (pid {pid}) still running after {args.timeout:g} s", file=sys.stderr)
                return 1
            time.sleep(0.05)
    finally:
        if pidfd is not None:
            os.close(pidfd)
    print(f"echod stopped (pid {pid})")
    return 0


def run(load: Callable[[], Settings]) -> int:
    """`echod run`: the master in the foreground."""
    prepared = prepare(load)
    if not isinstance(prepared, Prepared):
        return prepared
    master = build_master(prepared)
    settings = prepared.settings
    try:
        drop_privileges(settings.daemon.user, settings.daemon.group, settings.access_log)
    except (OSError, KeyError) as exc:
        print(f"echod: cannot drop privileges: {exc}", file=sys.stderr)
        return EX_RUNTIME
    try:
        return master.run()
    except Exception:
        logging.getLogger("echod").exception("master failed")
        return EX_RUNTIME


def start(load: Callable[[], Settings]) -> int:
    """`echod start`: daemonize; return once accepting connections."""
    try:
        settings = load()
    except ConfigError:
        settings = None  # prepare() reports it with the right exit code
    if settings is not None and (pid := running_pid(Path(settings.daemon.pidfile))) is not None:
        print(f"echod: already running (pid {pid}, pidfile {settings.daemon.pidfile})", file=sys.stderr)
        return EX_RUNTIME
    prepared = prepare(load)
    if not isinstance(prepared, Prepared):
        return prepared
    ready_r, ready_w = os.pipe()
    if os.fork():
        os.close(ready_w)
        prepared.listeners.close()
        return _await_ready(ready_r)
    os.close(ready_r)
    os._exit(_daemon_main(prepared, ready_w))


def _await_ready(ready_r: int, timeout: float = READY_TIMEOUT) -> int:
    """The launcher: wait for the daemon's word (or its death, seen as EOF on the pipe), but not for
    ever: a daemon alive but never ready (workers crash-looping) must not hang `echod start`."""
    message = b""
    deadline = time.monotonic() + timeout
    with os.fdopen(ready_r, "rb", buffering=0) as pipe:
        while not message.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([pipe], [], [], left)[0]:
                print(
                    f"echod: could not start: the daemon was not ready after {timeout:g} s; it may still be"
                    " running: see its log, `echod status` and `echod stop`",
                    file=sys.stderr,
                )
                return EX_RUNTIME
            chunk = pipe.read(4096)
            if not chunk:
                break
            message += chunk
    text = message.decode(errors="replace").strip()
    if text == "ready":
        return 0
    print(f"echod: could not start: {text or 'the daemon exited before it was ready'}", file=sys.stderr)
    return EX_RUNTIME


def _daemon_main(prepared: Prepared, ready_w: int) -> int:
    import daemon  # python-daemon: untyped, see [[tool.mypy.overrides]] in pyproject.toml

    settings = prepared.settings
    keep = [*prepared.filenos(), ready_w]

    unsaid = [ready_w]  # the launcher hears one word; the fd number may be reused after that

    def report(text: str) -> None:
        if not unsaid:
            return
        fd = unsaid.pop()
        try:
            os.write(fd, (text.replace("\n", "; ") + "\n").encode())
        except OSError:  # the launcher gave up waiting (EPIPE)
            pass
        finally:
            os.close(fd)

    pidfile = PidFile(settings.daemon.pidfile)
    context = daemon.DaemonContext(
        files_preserve=keep,
        pidfile=pidfile,
        umask=0o022,
        working_directory="/",
        detach_process=True,
        signal_map={},
        stderr=sys.stderr if not settings.log.file else None,
    )
    logs.detach()  # python-daemon closes every descriptor; ours must not be reused behind our back
    try:
        context.open()
        # Built here, not before the fork: only now are its pid and the pidfile's descriptor known.
        master = build_master(prepared, pidfile_fd=pidfile.fd, on_ready=lambda: report("ready"))
        logs.setup(settings.log.level, settings.log.format, settings.log.file)
        drop_privileges(settings.daemon.user, settings.daemon.group, settings.access_log)
    except (AlreadyRunning, OSError, KeyError) as exc:
        report(str(exc) if not isinstance(exc, KeyError) else f"unknown user or group {exc}")
        return EX_RUNTIME
    except daemon.daemon.DaemonOSEnvironmentError as exc:
        report(str(exc))
        return EX_RUNTIME
    try:
        return master.run()
    except Exception as exc:  # the launcher must hear why, not just see EOF
        report(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        pidfile.handed_over = master.upgrader.handed_over
        context.close()  # removes the pidfile; os._exit() below would skip python-daemon's atexit hook
