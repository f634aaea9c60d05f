"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
import time


def _address() -> str | None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return None
    return "\0" + path[1:] if path.startswith("@") else path  # "@" = abstract namespace


# In-place upgrade under systemd with NotifyAccess=main: systemd accepts messages from its main process
# only. A new master is not that process until the old one has named it (MAINPID=): until then it holds
# its messages back (release() sends the latest at once); the old master, once it has named its
# successor, says nothing more. Either would otherwise be refused, each time with a warning in the
# journal ("reception only permitted for main PID").
_held = False
_silenced = False
_latest_held: tuple[str, ...] = ()


def notify(*lines: str) -> bool:
    """Send `KEY=value` lines as one message; returns False when there is no one to tell."""
    global _latest_held
    if _silenced:
        return False
    if _held:
        if any(not line.startswith("WATCHDOG=") for line in lines):
            _latest_held = lines
        return False
    address = _address()
    if address is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto("\n".join(lines).encode(), address)
        except OSError:
            return False
    return True


def ready(status: str) -> bool:
    return notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")


def reloading(status: str) -> bool:
    # systemd >= 253 pairs RELOADING=1 with the monotonic time of the request.
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}", f"STATUS={status}")


def stopping(status: str) -> bool:
    return notify("STOPPING=1", f"STATUS={status}")


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), if systemd asked for them."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def hold() -> None:
    """New master of an in-place upgrade: keep messages back until the old master has named us."""
    global _held
    _held = True


def release(send_held: bool = True) -> bool:
    """We are systemd's main process now: send the latest held message (unless `send_held` is False:
    it carries MAINPID= and READY=1, which only a confirmed successor may say), and a watchdog ping
    (the old master's last one may be most of WatchdogSec= ago). Either way nothing is held any more."""
    global _held, _latest_held
    if not _held:
        return False
    _held = False
    lines, _latest_held = (_latest_held if send_held else ()), ()
    if watchdog_interval() is not None:
        lines = (*lines, "WATCHDOG=1")
    return notify(*lines) if lines else False


def hand_over(pid: int, status: str) -> bool:
    """Old master of an in-place upgrade: name the new master systemd's main process, then fall silent."""
    global _silenced
    sent = notify(f"MAINPID={pid}", "READY=1", f"STATUS={status}")
    _silenced = True
    return sent
