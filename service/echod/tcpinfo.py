"""TCP_INFO, read once per connection just before it is closed: the kernel's view of the connection.

`getsockopt(IPPROTO_TCP, TCP_INFO)` fills Linux's `struct tcp_info` (include/uapi/linux/tcp.h) and
returns as many bytes as the running kernel knows of it: a field beyond that length is missing (older
kernel) and is left out, never invented. Offsets below are those of the uapi header, checked against
`ss -ti` by tests/test_tcpinfo.py.

Bytes per connection come from here, not from counting in the loop: the echo's fast path
(worker/loop.py) adds nothing per message. `bytes_in` is `tcpi_bytes_received` (Linux >= 4.1), less
the FIN's sequence number once the client's FIN is in; `bytes_out` is what echod wrote to the
connection: `tcpi_bytes_sent - tcpi_bytes_retrans + tcpi_notsent_bytes` (Linux >= 5.5; on older kernels
`tcpi_bytes_acked`, which misses what was written but not yet acknowledged).
"""

from __future__ import annotations

import _socket
import socket
import struct
from typing import NamedTuple

# Offsets in struct tcp_info.
_FIELDS = (
    ("state", 0, "B"),
    ("pmtu", 60, "I"),
    ("rtt_us", 68, "I"),
    ("rttvar_us", 72, "I"),
    ("snd_cwnd", 80, "I"),
    ("retransmits", 100, "I"),  # tcpi_total_retrans: segments retransmitted over the connection's life
    ("bytes_acked", 120, "Q"),  # Linux 4.1
    ("bytes_received", 128, "Q"),  # Linux 4.1
    ("notsent_bytes", 144, "I"),  # Linux 4.6
    ("min_rtt_us", 148, "I"),  # Linux 4.6
    ("delivery_rate", 160, "Q"),  # Linux 4.9, bytes per second
    ("bytes_sent", 200, "Q"),  # Linux 5.5
    ("bytes_retrans", 208, "Q"),  # Linux 5.5
)
FULL_SIZE = 216  # everything above is there from this length on
ASK = 232  # bytes asked for: enough for every field used, whatever the kernel's own size
STATE_CLOSE, STATE_CLOSE_WAIT, STATE_LAST_ACK, STATE_CLOSING, STATE_TIME_WAIT = 7, 8, 9, 11, 6
_FIN_IN = frozenset((STATE_CLOSE_WAIT, STATE_LAST_ACK, STATE_CLOSING, STATE_TIME_WAIT))


def _format() -> struct.Struct:
    fmt, at = "<", 0
    for _name, offset, code in _FIELDS:
        fmt += f"{offset - at}x{code}" if offset > at else code
        at = offset + struct.calcsize("<" + code)
    return struct.Struct(fmt)


_FULL = _format()
assert _FULL.size == FULL_SIZE


class TcpInfo(NamedTuple):
    state: int
    pmtu: int
    rtt_us: int
    rttvar_us: int
    snd_cwnd: int
    retransmits: int
    bytes_acked: int
    bytes_received: int
    notsent_bytes: int
    min_rtt_us: int
    delivery_rate: int
    bytes_sent: int
    bytes_retrans: int
    size: int  # bytes the kernel returned: fields past it are missing (-1 here)

    def bytes_in(self, fin: bool) -> int:
        """Bytes the client sent. Its FIN takes a sequence number, which tcpi_bytes_received counts:
        it is in when the state says so, or, in CLOSE (our FIN acknowledged too, or a reset), when
        `fin` says the close may have followed it."""
        fin = self.state in _FIN_IN or (fin and self.state == STATE_CLOSE)
        return max(0, self.bytes_received - 1) if fin else max(0, self.bytes_received)

    def bytes_out(self) -> int:
        """Bytes echod wrote to the connection (sent once, or still waiting to be)."""
        if self.size >= FULL_SIZE:
            return self.bytes_sent - self.bytes_retrans + self.notsent_bytes
        return max(0, self.bytes_acked)

    def fields(self) -> dict[str, int]:
        """The access log's TCP fields the kernel gave."""
        out = {
            "rtt_us": self.rtt_us,
            "rttvar_us": self.rttvar_us,
            "min_rtt_us": self.min_rtt_us,
            "retransmits": self.retransmits,
            "snd_cwnd": self.snd_cwnd,
            "pmtu": self.pmtu,
            # bits per second, as `ss -ti` shows delivery_rate
            "delivery_rate_bps": self.delivery_rate * 8 if self.delivery_rate >= 0 else -1,
        }
        return {key: value for key, value in out.items() if value >= 0}


_IPPROTO_TCP, _TCP_INFO = socket.IPPROTO_TCP, socket.TCP_INFO
_AF_INET, _SOCK_STREAM = socket.AF_INET, socket.SOCK_STREAM
_unpack = _FULL.unpack_from


def read(fd: int) -> TcpInfo | None:
    """The TCP_INFO of connection `fd`, None if the kernel gives none (not a TCP socket)."""
    # Borrowed as the bare C socket type (socket.socket's Python layer doubles the cost), with family
    # and type given so that the constructor asks the kernel nothing; getsockopt works on the
    # descriptor whatever its family (IPv6 too). detach(): the caller closes it.
    sock = _socket.socket(_AF_INET, _SOCK_STREAM, 0, fd)
    try:
        raw = sock.getsockopt(_IPPROTO_TCP, _TCP_INFO, ASK)
    except OSError:
        return None
    finally:
        sock.detach()
    return parse(raw)


def parse(raw: bytes) -> TcpInfo | None:
    size = len(raw)
    if size >= FULL_SIZE:
        return TcpInfo._make((*_unpack(raw), size))
    if size < 104:  # older than anything echod runs on (Linux 2.6.x)
        return None
    values = [
        struct.unpack_from("<" + code, raw, offset)[0] if offset + struct.calcsize(code) <= size else -1
        for _name, offset, code in _FIELDS
    ]
    return TcpInfo._make((*values, size))
