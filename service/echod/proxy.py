"""PROXY protocol v1 and v2 headers (HAProxy's proxy-protocol.txt), parsed and never echoed.

`parse` is fed the bytes a connection has sent so far and tells whether they hold a whole header yet.
The header is the only thing read before echoing starts, so its size is capped (MAX_HEADER): a client
that sends endless TLVs or a v1 line without CRLF costs at most that much memory, then is closed.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from typing import Protocol

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest valid v1 line, CRLF included (spec section 2.1)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version/command, family/transport, length
MAX_HEADER = 4096  # a v2 header (TLVs included) above this is refused

# The family/transport bytes the spec defines -> the size of one address, 0 where there is no IP
# (UNSPEC, AF_UNIX): then the connection keeps its own address.
_V2_ADDRESS_SIZE = {0x00: 0, 0x11: 4, 0x12: 4, 0x21: 16, 0x22: 16, 0x31: 0, 0x32: 0}
_V1_ADDRESS_CHARS = re.compile(rb"[0-9A-Fa-f:.]+")  # no IPv6 scope ("%eth0"): it could carry anything


class ProxyError(ValueError):
    """The connection did not start with a valid PROXY protocol header."""


Source = tuple[str, int] | None  # None: the header names no client (LOCAL, UNKNOWN, AF_UNIX)


def parse(data: bytes) -> tuple[int, Source] | None:
    """(header length, client address) once `data` holds a whole header, None while it may still.

    Raises ProxyError as soon as `data` cannot be the start of a valid header.
    """
    if data[:12] == V2_SIGNATURE[: len(data[:12])] and data[:1] == b"\r":
        return _parse_v2(data) if len(data) >= len(V2_SIGNATURE) else None
    if data[:6] == V1_PREFIX[: len(data[:6])]:
        return _parse_v1(data) if len(data) >= len(V1_PREFIX) else None
    raise ProxyError("no PROXY protocol header")


def _parse_v1(data: bytes) -> tuple[int, Source] | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX or b"\n" in data[:V1_MAX]:
            raise ProxyError("PROXY v1 line not terminated by CRLF within 107 bytes")
        return None
    if b"\n" in data[:end]:  # a bare LF before the CRLF: never a line a proxy sends
        raise ProxyError("PROXY v1 line not terminated by CRLF within 107 bytes")
    fields = data[len(V1_PREFIX) : end].split(b" ")
    if fields[0] == b"UNKNOWN":
        return end + 2, None
    if len(fields) != 5 or fields[0] not in (b"TCP4", b"TCP6"):
        raise ProxyError(f"malformed PROXY v1 line {data[:end]!r}")
    version = 4 if fields[0] == b"TCP4" else 6
    source = _v1_address(fields[1], version)
    _v1_address(fields[2], version)
    port = _v1_port(fields[3])
    _v1_port(fields[4])
    return end + 2, (source, port)


def _v1_address(text: bytes, version: int) -> str:
    try:
        if not _V1_ADDRESS_CHARS.fullmatch(text):
            raise ValueError
        address = ipaddress.ip_address(text.decode("ascii"))
    except ValueError:
        raise ProxyError(f"PROXY v1: {text!r} is not an IP address") from None
    if address.version != version:
        raise ProxyError(f"PROXY v1: {text!r} is not an IPv{version} address")
    return str(address)


def _v1_port(text: bytes) -> int:
    # Decimal 0..65535 without a sign, spaces or leading zeros, as the spec writes it.
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[:1] == b"0") or int(text) > 65535:
        raise ProxyError(f"PROXY v1: {text!r} is not a port")
    return int(text)


def _parse_v2(data: bytes) -> tuple[int, Source] | None:
    if len(data) < V2_FIXED:
        return None
    version_command, family_transport, length = struct.unpack_from("!BBH", data, 12)
    if version_command >> 4 != 2:
        raise ProxyError(f"PROXY v2: unsupported version {version_command >> 4}")
    command = version_command & 0xF
    if command > 1:
        raise ProxyError(f"PROXY v2: unknown command {command}")
    total = V2_FIXED + length
    if total > MAX_HEADER:
        raise ProxyError(f"PROXY v2: header of {total} bytes is over the {MAX_HEADER}-byte limit")
    size = _V2_ADDRESS_SIZE.get(family_transport)
    if size is None and command == 1:  # LOCAL ignores the family, whatever it says (spec 2.2)
        raise ProxyError(f"PROXY v2: unknown address family/transport 0x{family_transport:02x}")
    if len(data) < total:
        return None
    if command == 0 or not size:  # LOCAL (health check) or no IP to report
        return total, None
    if length < 2 * size + 4:
        raise ProxyError(f"PROXY v2: address block of {length} bytes is too short")
    # ipaddress, as for v1, so that both spell a client alike (IPv4-mapped addresses differ otherwise).
    source = str(ipaddress.ip_address(data[V2_FIXED : V2_FIXED + size]))
    (port,) = struct.unpack_from("!H", data, V2_FIXED + 2 * size)
    return total, (source, port)


class HeaderEvents(Protocol):
    """Who reads a connection's header (worker/proxied.py)."""

    def on_header(self, fd: int, ev: int, state: AwaitingHeader) -> None: ...


class AwaitingHeader:
    """The PROXY header phase of one connection: the bytes so far, and when the header is overdue.

    Nothing is echoed and no per-IP limit applies until the header is whole: it names the client.
    """

    __slots__ = ("data", "deadline", "events")

    def __init__(self, events: HeaderEvents, deadline: float) -> None:
        self.data = b""
        self.deadline = deadline
        self.events = events

    def on_event(self, fd: int, ev: int) -> None:
        self.events.on_header(fd, ev, self)

    def feed(self, chunk: bytes) -> tuple[bytes, Source] | None:
        """Add what the connection sent: (the bytes after the header, the client) once the header is
        whole, None while it is not. Raises ProxyError for anything but a valid header; never holds
        more than MAX_HEADER bytes (parse() refuses a longer one)."""
        data = self.data + chunk
        parsed = parse(data)
        if parsed is None:
            self.data = data
            return None
        length, source = parsed
        self.data = b""
        return data[length:], source


def header_v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A v1 header, as a proxy sends it (used by the tests and the benchmark)."""
    family = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def header_v2(source: tuple[str, int], destination: tuple[str, int], tlvs: bytes = b"") -> bytes:
    """A v2 PROXY/STREAM header, as a proxy sends it (used by the tests)."""
    af = socket.AF_INET6 if ":" in source[0] else socket.AF_INET
    addresses = socket.inet_pton(af, source[0]) + socket.inet_pton(af, destination[0])
    body = addresses + struct.pack("!HH", source[1], destination[1]) + tlvs
    family = 0x21 if af == socket.AF_INET6 else 0x11
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, family, len(body)) + body
