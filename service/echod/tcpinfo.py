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
from typing import Final, NamedTuple

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
# Final throughout: compiled, a literal is inlined and anything else is a C static, not a dict lookup
# per close (worker/insight.py).
FULL_SIZE: Final = 216  # everything above is there from this length on
ASK: Final = 232  # bytes asked for: enough for every field used, whatever the kernel's own size
STATE_CLOSE: Final = 7
STATE_CLOSE_WAIT: Final = 8
STATE_LAST_ACK: Final = 9
STATE_CLOSING: Final = 11
STATE_TIME_WAIT: Final = 6
_FIN_IN: Final = frozenset((STATE_CLOSE_WAIT, STATE_LAST_ACK, STATE_CLOSING, STATE_TIME_WAIT))


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


_IPPROTO_TCP: Final = socket.IPPROTO_TCP
_TCP_INFO: Final = socket.TCP_INFO
_AF_INET: Final = int(socket.AF_INET)
_SOCK_STREAM: Final = int(socket.SOCK_STREAM)
_borrow: Final = _socket.socket
_unpack: Final = _FULL.unpack_from

# Positions in `values()`' tuple (the order of _FIELDS).
STATE: Final = 0
PMTU: Final = 1
RTT: Final = 2
RTTVAR: Final = 3
CWND: Final = 4
RETRANSMITS: Final = 5
ACKED: Final = 6
RECEIVED: Final = 7
NOTSENT: Final = 8
MIN_RTT: Final = 9
RATE: Final = 10
SENT: Final = 11
RETRANS: Final = 12


def fetch(fd: int) -> bytes | None:
    """The raw TCP_INFO of connection `fd`, None if the kernel gives none (not a TCP socket)."""
    # Borrowed as the bare C socket type (socket.socket's Python layer doubles the cost), with family
    # and type given; CPython 3.11's constructor still checks the descriptor with a getsockname
    # (bench/results/profile-compiled-2026-12-03.md). getsockopt works on the descriptor whatever its
    # family (IPv6 too). detach(): the caller closes it. 0.9-1.2 us in all here, 0.55 of it the
    # getsockopt; re-initialising one kept socket object is no cheaper, nor is ctypes' getsockopt (1.4).
    sock = _borrow(_AF_INET, _SOCK_STREAM, 0, fd)
    try:
        return sock.getsockopt(_IPPROTO_TCP, _TCP_INFO, ASK)
    except OSError:
        return None
    finally:
        sock.detach()


def values(raw: bytes) -> tuple[int, ...] | None:
    """The fields of _FIELDS as a plain tuple, read at every close (worker/insight.py): one unpack on
    a kernel that has them all (0.2 us, against 0.7 for building a TcpInfo). On an older kernel a
    missing field is -1, and what was acknowledged stands for what was written (see bytes_out)."""
    if len(raw) >= FULL_SIZE:
        return _unpack(raw)
    info = parse(raw)
    if info is None:
        return None
    fields = list(info[: RETRANS + 1])
    fields[SENT], fields[RETRANS], fields[NOTSENT] = max(0, info.bytes_acked), 0, 0
    return tuple(fields)


def bytes_out(v: tuple[int, ...]) -> int:
    """Bytes echod wrote to the connection (sent once, or still waiting to be)."""
    return v[SENT] - v[RETRANS] + v[NOTSENT]


def bytes_in(v: tuple[int, ...], fin: bool) -> int:
    """Bytes the client sent. Its FIN takes a sequence number, which tcpi_bytes_received counts: it
    is in when the state says so, or, in CLOSE (our FIN acknowledged too, or a reset), when `fin`
    says the close may have followed it."""
    state = v[STATE]
    fin = state in _FIN_IN or (fin and state == STATE_CLOSE)
    return max(0, v[RECEIVED] - 1) if fin else max(0, v[RECEIVED])


def log_fields(v: tuple[int, ...]) -> dict[str, int]:
    """The access log's TCP fields the kernel gave (a missing one is left out, never invented)."""
    out = {
        "rtt_us": v[RTT],
        "rttvar_us": v[RTTVAR],
        "min_rtt_us": v[MIN_RTT],
        "retransmits": v[RETRANSMITS],
        "snd_cwnd": v[CWND],
        "pmtu": v[PMTU],
        # bits per second, as `ss -ti` shows delivery_rate
        "delivery_rate_bps": v[RATE] * 8 if v[RATE] >= 0 else -1,
    }
    return {key: value for key, value in out.items() if value >= 0}


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
