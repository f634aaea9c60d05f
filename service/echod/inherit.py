"""What passes between an old master and the new one it starts in an in-place upgrade (upgrade.py).

The old master starts `python -m echod run <its own options>` with every listening socket, the metrics
socket, the statistics table and the pidfile lock passed as inherited file descriptors, described in
$ECHOD_INHERIT, and one end of a socket pair: the new master says "ready <worker pids>" on it once its
workers accept, and hears back "main" once the old master has told systemd that the new one is its main
process (notify.hand_over). Until then the new master holds its notifications back (notify.hold):
systemd, with NotifyAccess=main, would refuse them and warn in the journal.

The new master is started by a short-lived intermediate process, so it is orphaned at once and
adopted by PID 1 (under systemd, systemd itself). Named MAINPID while it was the old master's child,
it was "not our child" to systemd, which then could not wait for it: `systemctl stop` sent it SIGTERM
and at once SIGKILL to the whole unit (Result=signal; tests/test_systemd.py). The new master therefore
watches the old one with a pidfd, not with getppid().
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import subprocess
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass

from . import notify

ENV = "ECHOD_INHERIT"
ACK_TIMEOUT = 5.0  # seconds a new master waits for the old one to have named it MAINPID

log = logging.getLogger("echod.upgrade")


@dataclass
class Inherited:
    groups: list[tuple[list[int], bool]]  # listening fds per address in slot order; shared (activated)?
    metrics: int | None
    ready: int
    pidfile: int | None
    stats: int  # the old master's statistics table, so that no counter restarts from zero
    parent: int  # the old master's pid
    parent_fd: int  # a pidfd of the old master: readable once it has exited


def take(environ: MutableMapping[str, str]) -> Inherited | None:
    """The sockets the master that started us handed us, if this process is its successor."""
    text = environ.pop(ENV, "")
    if not text:
        return None
    data = json.loads(text)
    # Our parent is PID 1 by now (see spawn), not the old master. It must still be alive and our
    # channel to it open; otherwise this is a stale variable, not meant for us.
    parent = int(data["parent"])
    try:
        pidfd = os.pidfd_open(parent)
    except OSError:
        return None
    if exited(pidfd) or not _is_open(data["ready"]):
        os.close(pidfd)
        return None
    # systemd named the old master in WATCHDOG_PID: the duty to ping passes to us with the service.
    if environ.get("WATCHDOG_PID") == str(parent):
        environ["WATCHDOG_PID"] = str(os.getpid())
    notify.hold()  # systemd hears from us once the old master has named us MAINPID (report_ready)
    return Inherited(
        groups=[(fds, shared) for fds, shared in data["groups"]],
        metrics=data["metrics"],
        ready=data["ready"],
        pidfile=data["pidfile"],
        stats=data["stats"],
        parent=parent,
        parent_fd=pidfd,
    )


def exited(pidfd: int) -> bool:
    return bool(select.select([pidfd], [], [], 0)[0])  # a pidfd turns readable when its process exits


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def successor_args(argv: list[str]) -> list[str]:
    """Our own command line, as `run`: the successor is already detached if we were."""
    args = list(argv)
    if args and args[0] == "start":
        args[0] = "run"
    return args


def spawn(
    groups: list[tuple[list[socket.socket], bool]],
    metrics_sock: socket.socket | None,
    pidfile_fd: int | None,
    stats_fd: int,
) -> tuple[int, int]:
    """Start the successor; returns (its pid, our end of the socket pair it reports ready on)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ready_r, ready_w = ours.detach(), theirs.detach()
    metrics_fd = metrics_sock.fileno() if metrics_sock is not None else None
    description = {
        "parent": os.getpid(),
        "groups": [([sock.fileno() for sock in socks], shared) for socks, shared in groups],
        "metrics": metrics_fd,
        "ready": ready_w,
        "pidfile": pidfile_fd,
        "stats": stats_fd,
    }
    fds = [fd for socks, _ in groups for fd in (sock.fileno() for sock in socks)] + [ready_w, stats_fd]
    fds += [fd for fd in (metrics_fd, pidfile_fd) if fd is not None]
    argv = [sys.executable, "-m", "echod", *successor_args(sys.argv[1:])]
    try:
        answer = _spawn_orphan(argv, fds, {**os.environ, ENV: json.dumps(description)})
    except OSError:
        os.close(ready_r)
        raise
    finally:
        os.close(ready_w)
    if not answer.isdigit():
        os.close(ready_r)
        raise OSError(answer or "the process that starts it failed")
    os.set_blocking(ready_r, False)
    return int(answer), ready_r


def _spawn_orphan(argv: list[str], fds: list[int], env: dict[str, str]) -> str:
    """Start argv from a child that exits at once; returns the new process's pid, or why not."""
    answer_r, answer_w = os.pipe2(os.O_CLOEXEC)
    try:
        intermediate = os.fork()
    except OSError:
        os.close(answer_r)
        os.close(answer_w)
        raise
    if intermediate == 0:
        code = 1
        try:
            os.close(answer_r)
            proc = subprocess.Popen(argv, pass_fds=fds, env=env)
            os.write(answer_w, str(proc.pid).encode())
            code = 0
        except BaseException as exc:
            os.write(answer_w, str(exc).encode()[:512])
        finally:
            os._exit(code)
    os.close(answer_w)
    chunks = []
    try:
        while chunk := os.read(answer_r, 1024):
            chunks.append(chunk)
    finally:
        os.close(answer_r)
        os.waitpid(intermediate, 0)
    return b"".join(chunks).decode(errors="replace")


def report_ready(fd: int, worker_pids: list[int]) -> None:
    """Successor side: tell the old master we accept, and which workers took over which slot; then
    wait (briefly) for it to answer that it has named us systemd's MAINPID, and only then let our
    held notifications go to systemd."""
    answer = b""
    try:
        os.write(fd, ("ready " + " ".join(map(str, worker_pids)) + "\n").encode())
        if select.select([fd], [], [], ACK_TIMEOUT)[0]:
            answer = os.read(fd, 64)
    except OSError:
        pass
    finally:
        os.close(fd)
    confirmed = answer.startswith(b"main")
    if not confirmed:
        # The old master gave up on us, died, or is an older echod that answers nothing. Our held
        # READY/MAINPID would be refused by systemd, or (NotifyAccess=all) make a master that is being
        # stopped the main process: drop it. Holding on would silence our watchdog pings for good.
        log.warning("upgrade: the old master did not confirm the hand-over within %g s", ACK_TIMEOUT)
    notify.release(send_held=confirmed)


def acknowledge(fd: int) -> None:
    """Old master side: the successor is systemd's main process now (notify.hand_over); tell it."""
    try:
        os.write(fd, b"main\n")
    except OSError:
        pass
    finally:
        os.close(fd)
