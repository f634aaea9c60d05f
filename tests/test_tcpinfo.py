"""tcpinfo.py's reading of struct tcp_info, checked independently against `ss -ti` (iproute2 parses the
same structure through netlink's INET_DIAG_INFO, not through our offsets) on a held loopback connection."""

from __future__ import annotations

import re
import socket
import subprocess

from echod import tcpinfo


def ss_info(local: tuple[str, int], peer: tuple[str, int]) -> str:
    result = subprocess.run(
        [
            "ss",
            "-tinH",
            "state",
            "established",
            "src",
            f"{local[0]}:{local[1]}",
            "dst",
            f"{peer[0]}:{peer[1]}",
        ],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return result.stdout


def field(text: str, pattern: str) -> str:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in ss output: {text!r}"
    return match.group(1)


def test_tcp_info_matches_ss_for_a_held_connection() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname(), timeout=5)
        conn, _ = server.accept()
        with client, conn:
            # Odd sizes each way, so that a wrong offset cannot land on an equal neighbour.
            client.sendall(b"a" * 12345)
            got = 0
            while got < 12345:
                got += len(conn.recv(65536))
            conn.sendall(b"b" * 777)
            got = 0
            while got < 777:
                got += len(client.recv(65536))
            raw = tcpinfo.fetch(conn.fileno())
            assert raw is not None
            info = tcpinfo.parse(raw)
            text = ss_info(conn.getsockname(), conn.getpeername())
            assert info is not None
            assert info.size >= tcpinfo.FULL_SIZE  # this kernel has every field we use
            assert info.state == 1  # ESTABLISHED
            assert info.bytes_received == int(field(text, r"bytes_received:(\d+)")) == 12345
            assert info.bytes_acked == int(field(text, r"bytes_acked:(\d+)"))
            assert info.bytes_sent == int(field(text, r"bytes_sent:(\d+)")) == 777
            v = tcpinfo.values(raw)
            assert v is not None and v == info[: len(v)]
            assert tcpinfo.bytes_out(v) == 777 and tcpinfo.bytes_in(v, fin=True) == 12345
            assert info.snd_cwnd == int(field(text, r"cwnd:(\d+)"))
            assert info.pmtu == int(field(text, r"pmtu:(\d+)"))
            rtt, rttvar = field(text, r" rtt:([\d.]+/[\d.]+)").split("/")
            # ss shows milliseconds with 3 decimals; the connection is idle, so the values hold still.
            assert abs(info.rtt_us - float(rtt) * 1000) <= 1
            assert abs(info.rttvar_us - float(rttvar) * 1000) <= 1
            assert abs(info.min_rtt_us - float(field(text, r"minrtt:([\d.]+)")) * 1000) <= 1
            retrans = re.search(r"retrans:\d+/(\d+)", text)
            assert info.retransmits == (int(retrans.group(1)) if retrans else 0)


def test_a_short_struct_leaves_out_what_the_kernel_lacks() -> None:
    """A kernel older than 4.6 returns 144 bytes: min_rtt and delivery_rate are absent, not zero."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname(), timeout=5)
        conn, _ = server.accept()
        with client, conn:
            raw = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, tcpinfo.ASK)
    short = tcpinfo.parse(raw[:144])
    assert short is not None
    v = tcpinfo.values(raw[:144])
    assert v is not None
    fields = tcpinfo.log_fields(v)
    assert "min_rtt_us" not in fields and "delivery_rate_bps" not in fields
    assert {"rtt_us", "rttvar_us", "retransmits", "snd_cwnd", "pmtu"} <= set(fields)
    assert tcpinfo.bytes_out(v) == short.bytes_acked  # no bytes_sent before Linux 5.5
    assert tcpinfo.parse(raw[:64]) is None
