"""Live connection handover: a retiring worker passes its established sockets to a successor.

Each worker listens on an abstract Unix SOCK_SEQPACKET socket named after its pid. A retiring worker
stops reading a connection, makes sure nothing it has read is still unsent, and passes the file
descriptor with SCM_RIGHTS; whatever the client sends meanwhile waits in the kernel's receive buffer
for the successor, so the byte stream stays whole and in order, and the client never notices.

Each message carries, beside the descriptors, the client address the sender knew for each of them
("" for none): a PROXY protocol header has been consumed, so the successor cannot learn it again.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import NamedTuple

MAX_FDS = 250  # per message: SCM_MAX_FD is 253
_MAGIC = b"echod-handover-1\n"
_MAX_DATA = len(_MAGIC) + MAX_FDS * 46  # 45 characters is the longest IPv6 text, plus a separator
_TIMEOUT = 2.0


def _name(pid: int) -> str:
    return f"\0echod-handover-{pid}"


def listen() -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.bind(_name(os.getpid()))
    sock.listen(16)
    sock.setblocking(False)
    return sock


def accept(lsock: socket.socket) -> socket.socket | None:
    """A channel from a retiring worker; None unless the peer runs as our own user. Raises OSError
    (EMFILE...) when there is no descriptor for it: the channel then stays queued."""
    try:
        chan, _ = lsock.accept()
    except (BlockingIOError, ConnectionAbortedError):
        return None
    creds = chan.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    if uid != os.getuid():
        chan.close()
        return None
    chan.setblocking(False)
    return chan


class Truncated(NamedTuple):
    """The kernel had no descriptor for `lost` of the connections in a message and closed them."""

    kept: list[tuple[int, str]]
    lost: int


def receive(chan: socket.socket) -> list[tuple[int, str]] | Truncated | None:
    """(fd, client address or "") for one message; [] if none is ready; None once the sender is done."""
    try:
        data, fds, flags, _addr = socket.recv_fds(chan, _MAX_DATA, MAX_FDS)
    except BlockingIOError:
        return []
    except OSError:
        return None
    if not data and not fds and not flags & socket.MSG_CTRUNC:
        return None
    peers = data[len(_MAGIC) :].decode("ascii", "replace").split("\n") if data.startswith(_MAGIC) else []
    if flags & socket.MSG_CTRUNC:  # one address per descriptor sent: the kernel installs them in order
        if len(peers) < len(fds):
            peers = [""] * len(fds)
        return Truncated(list(zip(fds, peers, strict=False)), max(1, len(peers) - len(fds)))
    if len(peers) != len(fds) or flags & socket.MSG_TRUNC:  # an older sender, or cut short: no addresses
        peers = [""] * len(fds)
    return list(zip(fds, peers, strict=True))


def connect(pid: int) -> socket.socket:
    chan = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    chan.settimeout(_TIMEOUT)
    try:
        chan.connect(_name(pid))
    except OSError:
        chan.close()
        raise
    return chan


class PartialHandover(OSError):
    """Some messages went over before one failed: `sent` descriptors are the successor's now."""

    def __init__(self, error: OSError, sent: int) -> None:
        super().__init__(error.errno, error.strerror)
        self.sent = sent


def send(chan: socket.socket, fds: list[int], peers: list[str]) -> None:
    for start in range(0, len(fds), MAX_FDS):
        # No IPv6 scope ("%eth0"): an address must fit its 46 bytes, and text is ASCII whatever happens.
        text = "\n".join(peer.partition("%")[0] for peer in peers[start : start + MAX_FDS])
        try:
            socket.send_fds(chan, [_MAGIC + text.encode("ascii", "replace")], fds[start : start + MAX_FDS])
        except OSError as exc:
            if start:
                raise PartialHandover(exc, start) from exc
            raise
