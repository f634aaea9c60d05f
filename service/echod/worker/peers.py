"""Client addresses per connection, and max_connections_per_ip.

An address is remembered for a connection when the limit is on (to count it down at close) or when a
PROXY protocol header named it (a handover passes it on: the successor cannot read the header again).
"""

from __future__ import annotations

import socket


class Peers:
    __slots__ = ("by_fd", "count", "last_rejected", "limit", "named")

    def __init__(self, limit: int) -> None:
        self.limit = limit  # per worker; 0 = no limit
        self.count: dict[str, int] = {}  # open connections by client address, when limited
        self.by_fd: dict[int, str] = {}  # fd -> client address, when limited or named by a PROXY header
        # The fds of by_fd whose address a PROXY header gave (here or before a handover), not the
        # socket: only these go along with a handover, so that a successor logs any other connection
        # as its socket's HOST:PORT rather than as the bare address the limit counted.
        self.named: set[int] = set()
        self.last_rejected = ""  # the address last refused, for the log

    def admit(self, fd: int, ip: str, named: bool = False) -> bool:
        """Count a new connection from `ip` against the limit; False (and nothing counted) if over it.
        `named`: a PROXY header gave `ip`."""
        count = self.count.get(ip, 0)
        if count >= self.limit:
            self.last_rejected = ip
            return False
        self.count[ip] = count + 1
        self.by_fd[fd] = ip
        if named:
            self.named.add(fd)
        return True

    def name(self, fd: int, ip: str) -> None:
        """Remember an address a PROXY header gave (no limit to count against)."""
        self.by_fd[fd] = ip
        self.named.add(fd)

    def adopt(self, fd: int, ip: str) -> None:
        """An established connection handed over, with the address a PROXY header gave it ("" if none):
        counted against its address, never refused."""
        if ip:
            self.by_fd[fd] = ip
            self.named.add(fd)
            if self.limit:
                self.count[ip] = self.count.get(ip, 0) + 1
        elif self.limit:
            self.count_socket(fd)

    def count_socket(self, fd: int) -> None:
        """Count a connection by its socket's own peer address (no PROXY header named one)."""
        sock = socket.socket(fileno=fd)  # borrowed: detached below, never closed
        try:
            ip = sock.getpeername()[0]
        except OSError:
            return
        finally:
            sock.detach()
        self.count[ip] = self.count.get(ip, 0) + 1
        self.by_fd[fd] = ip

    def header_address(self, fd: int) -> str:
        """The address a PROXY header gave connection `fd`; "" if none did."""
        return self.by_fd.get(fd, "") if fd in self.named else ""

    def forget(self, fd: int) -> None:
        if not self.by_fd:
            return
        if self.named:
            self.named.discard(fd)
        ip = self.by_fd.pop(fd, None)
        if ip is not None and ip in self.count:
            count = self.count[ip] - 1
            if count:
                self.count[ip] = count
            else:
                del self.count[ip]
