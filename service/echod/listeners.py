"""Listening sockets, owned by the master for its whole life.

For every listen address the master binds one SO_REUSEPORT socket per worker slot. Worker *i* accepts
on socket *i*; because the master keeps its copy open, a worker that exits or is replaced never makes
the kernel drop the connections queued on that socket (README.md, "Reloads, scaling and upgrades without
a single lost connection").
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import logging
import os
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("echod.listeners")

SD_LISTEN_FDS_START = 3
SO_ATTACH_REUSEPORT_CBPF = 51  # <asm-generic/socket.h>
# Classic BPF: A = skb->hash (ancillary load); A %= active; return A.
_BPF_LD_W_ABS, _BPF_ALU_MOD_K, _BPF_RET_A = 0x20, 0x94, 0x16
_BPF_TAX, _BPF_ALU_XOR_X = 0x07, 0xAC
_SKF_AD_RXHASH = (-0x1000 + 32) & 0xFFFFFFFF
_SKF_NET_OFF = -0x100000  # loads relative to the IP header


class _SockFilter(ctypes.Structure):  # struct sock_filter
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):  # struct sock_fprog
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def _attach_steering(sock: socket.socket, active: int) -> None:
    """TCP: new connections by flow hash, to the first `active` sockets of the group."""
    _attach(sock, [(_BPF_LD_W_ABS, _SKF_AD_RXHASH), (_BPF_ALU_MOD_K, active), (_BPF_RET_A, 0)])


def _attach_source_steering(sock: socket.socket, active: int) -> None:
    """UDP: datagrams by source address (IPv6: its /64), so that every datagram of one source meets the
    same worker and its rate limit, whatever source ports a spoofer varies."""

    def net(offset: int) -> int:
        return (_SKF_NET_OFF + offset) & 0xFFFFFFFF

    if sock.family == socket.AF_INET:
        source = [(_BPF_LD_W_ABS, net(12))]
    else:
        source = [(_BPF_LD_W_ABS, net(8)), (_BPF_TAX, 0), (_BPF_LD_W_ABS, net(12)), (_BPF_ALU_XOR_X, 0)]
    _attach(sock, [*source, (_BPF_ALU_MOD_K, active), (_BPF_RET_A, 0)])


def _attach(sock: socket.socket, code: list[tuple[int, int]]) -> None:
    program = (_SockFilter * len(code))(*(_SockFilter(op, 0, 0, k) for op, k in code))
    # `program` stays alive until setsockopt has copied it into the kernel.
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(_SockFprog(len(program), program)))


class BindError(Exception):
    """An address cannot be bound (in use, permission): exit code 69."""


@dataclass(frozen=True, order=True)
class Address:
    host: str
    port: int
    family: int = field(compare=False)
    udp: bool = False  # a UDP echo socket (udp_listen) rather than a TCP listener

    def __str__(self) -> str:
        text = f"[{self.host}]:{self.port}" if self.family == socket.AF_INET6 else f"{self.host}:{self.port}"
        return "udp://" + text if self.udp else text

    @property
    def socktype(self) -> int:
        return socket.SOCK_DGRAM if self.udp else socket.SOCK_STREAM


def parse_address(text: str) -> Address:
    """`host:port` or `[v6addr]:port`; host must be an IP literal, `*` or `localhost`."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r}: expected [v6addr]:port")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r}: expected host:port")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: port must be a number from 0 to 65535")
    if host in ("", "*"):
        host = "0.0.0.0"
    elif host == "localhost":
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    if ip.version == 6 and not text.startswith("["):
        raise ValueError(f"{text!r}: write IPv6 addresses as [addr]:port")
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return Address(str(ip), int(port_text), family)


def bind_socket(address: Address, backlog: int, reuse_port: bool = True) -> socket.socket:
    sock = socket.socket(address.family, address.socktype)
    try:
        if not address.udp:  # for UDP, SO_REUSEADDR would let unrelated sockets share the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if address.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))
        if not address.udp:
            # Linux copies TCP_NODELAY to accepted sockets, which saves a setsockopt per connection.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot bind {address}: {exc.strerror or exc}") from None
    return sock


def _probe(address: Address) -> None:
    """Refuse an address someone else listens on.

    SO_REUSEPORT would otherwise let a second echod (same user) join the first one's port group
    silently; a probe bound without SO_REUSEPORT fails with EADDRINUSE if anything listens there.
    """
    probe = socket.socket(address.family, address.socktype)
    try:
        if not address.udp:  # TCP: tolerate TIME_WAIT leftovers, not listeners
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if address.family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        probe.bind((address.host, address.port))
    except OSError as exc:
        reason = "address in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise BindError(f"cannot bind {address}: {reason}") from None
    finally:
        probe.close()


def somaxconn() -> int | None:
    try:
        return int(Path("/proc/sys/net/core/somaxconn").read_text())
    except (OSError, ValueError):
        return None


def systemd_sockets(environ: MutableMapping[str, str]) -> list[socket.socket]:
    """Listening sockets passed by systemd socket activation (sd_listen_fds(3)), if they are ours.

    Variables left behind for another process (LISTEN_PID not ours) are ignored. The variables are
    removed either way so that nothing we start takes them for its own.
    """
    pid, count = environ.pop("LISTEN_PID", ""), environ.pop("LISTEN_FDS", "")
    environ.pop("LISTEN_FDNAMES", None)
    if not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return []
    found = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        if sock.type not in (socket.SOCK_STREAM, socket.SOCK_DGRAM) or sock.family not in (
            socket.AF_INET,
            socket.AF_INET6,
        ):
            raise BindError(f"socket-activated fd {fd} is not a TCP or UDP socket")
        if sock.type == socket.SOCK_STREAM:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        found.append(sock)
    return found


class ListenerSet:
    """address -> one listening socket per worker slot (or one shared socket, if inherited)."""

    def __init__(self, backlog: int) -> None:
        self.backlog = backlog
        self.sockets: dict[Address, list[socket.socket]] = {}
        self.shared: set[Address] = set()  # inherited sockets: every worker accepts on the same one

    def adopt(self, socks: list[socket.socket], shared: bool) -> Address:
        """Take over already-listening sockets (from systemd, or from the master we upgrade)."""
        host, port = socks[0].getsockname()[:2]
        address = Address(host, port, socks[0].family, socks[0].type == socket.SOCK_DGRAM)
        self.sockets[address] = socks
        if shared:
            self.shared.add(address)
        return address

    def groups(self) -> list[tuple[list[socket.socket], bool]]:
        return [(group, address in self.shared) for address, group in self.sockets.items()]

    @property
    def addresses(self) -> list[Address]:
        return list(self.sockets)

    def bound_address(self, address: Address) -> Address:
        """The address as bound (port 0 resolved to the port the kernel chose)."""
        host, port = self.sockets[address][0].getsockname()[:2]
        return Address(host, port, address.family, address.udp)

    def open(self, addresses: list[Address], slots: int, active: int | None = None) -> None:
        """Bind every new address for `slots` slots; addresses already held keep their sockets.

        Everything is bound before anything is kept, so a failure leaves the set as it was. With
        `active`, a new address is steered to its first `active` sockets at once: a reload to fewer
        workers binds `slots` (the old count) for the addresses it keeps, and no worker would ever
        accept what the kernel hashed to the new address's sockets beyond the new count.
        """
        fresh: dict[Address, list[socket.socket]] = {}
        try:
            for address in addresses:
                if address not in self.sockets:
                    fresh[address] = self._bind_group(address, slots)
        except BindError:
            for group in fresh.values():
                for sock in group:
                    sock.close()
            raise
        self.sockets.update(fresh)
        self.resize(slots)
        if active is not None:
            for address in fresh:
                self._steer(address, active)

    def _bind_group(self, address: Address, slots: int) -> list[socket.socket]:
        _probe(address)
        first = bind_socket(address, self.backlog)
        group = [first]
        if address.port == 0:  # every slot must share the port the kernel picked for the first
            address = Address(address.host, first.getsockname()[1], address.family, address.udp)
        try:
            group.extend(bind_socket(address, self.backlog) for _ in range(slots - 1))
        except BindError:
            for sock in group:
                sock.close()
            raise
        return group

    def resize(self, slots: int) -> None:
        """Grow every group to `slots` sockets (shrinking is `shrink`)."""
        for address, group in self.sockets.items():
            if address in self.shared:
                continue
            bound = self.bound_address(address)
            while len(group) < slots:
                group.append(bind_socket(bound, self.backlog))

    def slot(self, index: int, skip: set[Address] | frozenset[Address] = frozenset()) -> list[socket.socket]:
        """Slot `index`'s sockets, except those of `skip` (addresses a reload is dropping)."""
        return [
            group[0] if address in self.shared else group[index]
            for address, group in self.sockets.items()
            if (address in self.shared or index < len(group)) and address not in skip
        ]

    def steer(self, active: int) -> bool:
        """Send new connections only to the first `active` sockets of every group.

        A classic-BPF program on the SO_REUSEPORT group returns `skb hash % active` as the index of
        the socket that gets the connection. Sockets join a group in bind order and we only ever
        remove the last ones, so index i is slot i. Sockets beyond `active` then receive nothing new
        and their queues can be drained before they are closed, so shrinking the worker count resets
        no queued connection. Returns False where the kernel refuses the program.
        """
        ok = True
        for address in self.sockets:
            if address not in self.shared:
                ok = self._steer(address, active) and ok
        return ok

    def _steer(self, address: Address, active: int) -> bool:
        try:
            (_attach_source_steering if address.udp else _attach_steering)(self.sockets[address][0], active)
        except OSError as exc:
            log.warning(
                "cannot steer %s with SO_ATTACH_REUSEPORT_CBPF (%s): fewer workers may reset queued"
                " connections unless net.ipv4.tcp_migrate_req=1",
                address,
                exc.strerror,
            )
            return False
        return True

    def shrink(self, slots: int) -> None:
        for address, group in self.sockets.items():
            while len(group) > max(slots, 1 if address in self.shared else 0):
                group.pop().close()

    def close_address(self, address: Address) -> None:
        self.shared.discard(address)
        for sock in self.sockets.pop(address, []):
            sock.close()

    def close(self) -> None:
        for address in list(self.sockets):
            self.close_address(address)

    def filenos_of(self, addresses: set[Address]) -> set[int]:
        """The sockets of the given addresses, every slot."""
        return {sock.fileno() for address in addresses for sock in self.sockets.get(address, ())}

    def filenos(self) -> set[int]:
        return {sock.fileno() for group in self.sockets.values() for sock in group}
