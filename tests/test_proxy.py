"""PROXY protocol v1/v2 per listener: the parser alone, then the real daemon behind fake and real proxies.

- `echod.proxy.parse` is checked against hand-built headers (HAProxy's proxy-protocol.txt), every prefix
  of a valid header (it must ask for more, never fail early), malformed headers (ProxyError), and with
  Hypothesis: round trips of random addresses, and arbitrary bytes (only ProxyError may come out, a
  header is never longer than the data nor MAX_HEADER, and more data never changes a verdict).
- The live tests start `echod run` with a PROXY listener (`--listeners`, or `[listeners."ADDR"]` in a
  TOML file) and check from the outside what a client gets back and what /metrics counts: the header
  is stripped and not counted as received bytes, malformed/slow/truncated headers close the connection
  (`echod_connections_closed_total{reason="proxy_protocol"}`), max_connections_per_ip counts the
  header's address, and a listener without proxy_protocol echoes a header like any other data.
- HAProxy (send-proxy and send-proxy-v2) in front of echod: echo works end to end and echod's debug log
  names the real client (bound to 127.0.0.2), not HAProxy.

Some tests pin bugs these tests found (v1 IPv6 scope ids, v1/v2 spelling IPv4-mapped clients apart,
family/transport bytes the spec leaves undefined, bytes after a header completed during a reload, two
listener keys for one address).
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import signal
import socket
import struct
import subprocess
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    ECHOD,
    Daemon,
    DaemonFactory,
    echo_roundtrip,
    free_port,
    fuzz_settings,
    kill_group,
    one_worker,
    recv_exactly,
    start_haproxy,
    stop_process,
    wait_for,
    wait_metrics,
)
from echod.proxy import MAX_HEADER, V2_SIGNATURE, ProxyError, header_v1, header_v2, parse
from hypothesis import example, given
from hypothesis import strategies as st

pytestmark = pytest.mark.timeout(60)

EX_CONFIG = 78
CLOSED_PROXY = 'echod_connections_closed_total{reason="proxy_protocol"}'
CLOSED_CLIENT = 'echod_connections_closed_total{reason="client"}'
CLOSED_REJECTED = 'echod_connections_closed_total{reason="rejected"}'
CLOSED_TIMEOUT = 'echod_connections_closed_total{reason="timeout"}'
REJECTED_PER_IP = 'echod_connections_rejected_total{reason="per_ip"}'
RECEIVED = "echod_received_bytes_total"
ACCEPTED = "echod_connections_accepted_total"
ACTIVE = "echod_connections_active"
RESTARTS = "echod_worker_restarts_total"
IO_TIMEOUT = 10.0  # seconds any socket operation may take before the test fails instead of hanging

FUZZ = fuzz_settings(300)


# -- hand-built headers (from the spec, not from echod.proxy's own builders) ---------------------------------
def v1(line: str) -> bytes:
    return line.encode("ascii") + b"\r\n"


def v2(version_command: int, family_transport: int, body: bytes, length: int | None = None) -> bytes:
    """A v2 header; `length` overrides the length field (to build lying headers)."""
    size = len(body) if length is None else length
    return V2_SIGNATURE + struct.pack("!BBH", version_command, family_transport, size) + body


def inet4(src: str, dst: str, sport: int, dport: int) -> bytes:
    return socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)


def inet6(src: str, dst: str, sport: int, dport: int) -> bytes:
    pton = socket.inet_pton
    return pton(socket.AF_INET6, src) + pton(socket.AF_INET6, dst) + struct.pack("!HH", sport, dport)


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


PROXY, LOCAL = 0x21, 0x20  # version 2 with command PROXY / LOCAL
TCP4, TCP6, UNIX_STREAM, UNSPEC = 0x11, 0x21, 0x31, 0x00
TLVS = tlv(0x01, b"h2") + tlv(0x02, b"echo.example") + tlv(0x04, b"\0" * 7)  # ALPN, AUTHORITY, NOOP
V1_LONGEST = v1(f"PROXY UNKNOWN {'f' * 4}{':ffff' * 7} {'f' * 4}{':ffff' * 7} 65535 65535")  # 107 bytes

VALID: dict[str, tuple[bytes, tuple[str, int] | None]] = {
    "v1-tcp4": (v1("PROXY TCP4 192.0.2.1 198.51.100.2 56324 443"), ("192.0.2.1", 56324)),
    "v1-tcp6": (v1("PROXY TCP6 2001:db8::1 2001:db8::2 65535 0"), ("2001:db8::1", 65535)),
    "v1-tcp6-long-form": (v1("PROXY TCP6 2001:0db8:0:0:0:0:0:0001 ::1 1 2"), ("2001:db8::1", 1)),
    "v1-port-0": (v1("PROXY TCP4 0.0.0.0 255.255.255.255 0 0"), ("0.0.0.0", 0)),
    "v1-unknown": (v1("PROXY UNKNOWN"), None),
    "v1-unknown-with-addresses": (v1("PROXY UNKNOWN 2001:db8::1 2001:db8::2 1 2"), None),
    "v1-unknown-107-bytes": (V1_LONGEST, None),
    "v2-ipv4": (v2(PROXY, TCP4, inet4("192.0.2.1", "198.51.100.2", 56324, 443)), ("192.0.2.1", 56324)),
    "v2-ipv4-tlvs": (v2(PROXY, TCP4, inet4("192.0.2.9", "198.51.100.2", 1, 2) + TLVS), ("192.0.2.9", 1)),
    "v2-ipv4-udp": (v2(PROXY, 0x12, inet4("192.0.2.3", "198.51.100.2", 53, 53)), ("192.0.2.3", 53)),
    "v2-ipv6": (v2(PROXY, TCP6, inet6("2001:db8::1", "2001:db8::2", 65535, 443)), ("2001:db8::1", 65535)),
    "v2-ipv6-tlvs": (v2(PROXY, TCP6, inet6("2001:db8::7", "::1", 7, 8) + TLVS), ("2001:db8::7", 7)),
    "v2-local": (v2(LOCAL, UNSPEC, b""), None),
    "v2-local-with-addresses": (v2(LOCAL, TCP4, inet4("192.0.2.1", "198.51.100.2", 1, 2)), None),
    "v2-local-short-address-block": (v2(LOCAL, TCP4, b"\0" * 3), None),  # LOCAL: the block is ignored
    "v2-unix": (v2(PROXY, UNIX_STREAM, b"/run/a.sock".ljust(108, b"\0") + b"/run/b".ljust(108, b"\0")), None),
    "v2-unspec": (v2(PROXY, UNSPEC, b""), None),
    "v2-unspec-with-tlvs": (v2(PROXY, UNSPEC, TLVS), None),
    "v2-max-size": (
        v2(PROXY, TCP4, inet4("192.0.2.1", "198.51.100.2", 1, 2) + tlv(0x04, b"\0" * 4065)),
        ("192.0.2.1", 1),
    ),
}
assert len(V1_LONGEST) == 107 and len(VALID["v2-max-size"][0]) == MAX_HEADER

MALFORMED: dict[str, bytes] = {
    "v1-bare-lf-before-crlf": b"PROXY UNKNOWN \n\r\n",  # found by test_fuzz_arbitrary_bytes
    "http-request": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "lowercase-v1": v1("proxy TCP4 192.0.2.1 198.51.100.2 1 2"),
    "misspelt-v1": v1("PROXZ TCP4 192.0.2.1 198.51.100.2 1 2"),
    "v1-without-space": v1("PROXY"),
    "bad-v2-signature": V2_SIGNATURE[:-1] + b"X" + bytes([PROXY, TCP4, 0, 12]) + b"\0" * 12,
    "v1-no-crlf-in-107-bytes": b"PROXY UNKNOWN " + b"f" * 100,
    "v1-108-bytes": V1_LONGEST[:-2] + b"f\r\n",
    "v1-bare-lf": b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\n",
    "v1-bare-cr": b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\rX\r\n",
    "v1-bad-ip": v1("PROXY TCP4 192.0.2.256 198.51.100.2 1 2"),
    "v1-short-ip": v1("PROXY TCP4 192.0.2 198.51.100.2 1 2"),
    "v1-hostname": v1("PROXY TCP4 localhost 198.51.100.2 1 2"),
    "v1-bad-destination-ip": v1("PROXY TCP4 192.0.2.1 198.51.100 1 2"),
    "v1-ipv6-in-tcp4": v1("PROXY TCP4 2001:db8::1 2001:db8::2 1 2"),
    "v1-ipv4-in-tcp6": v1("PROXY TCP6 192.0.2.1 198.51.100.2 1 2"),
    "v1-port-65536": v1("PROXY TCP4 192.0.2.1 198.51.100.2 65536 2"),
    "v1-destination-port-65536": v1("PROXY TCP4 192.0.2.1 198.51.100.2 1 65536"),
    "v1-leading-zero-port": v1("PROXY TCP4 192.0.2.1 198.51.100.2 080 2"),
    "v1-signed-port": v1("PROXY TCP4 192.0.2.1 198.51.100.2 +80 2"),
    "v1-negative-port": v1("PROXY TCP4 192.0.2.1 198.51.100.2 -1 2"),
    "v1-hex-port": v1("PROXY TCP4 192.0.2.1 198.51.100.2 0x50 2"),
    "v1-double-space": v1("PROXY TCP4 192.0.2.1  198.51.100.2 1 2"),
    "v1-trailing-space": v1("PROXY TCP4 192.0.2.1 198.51.100.2 1 2 "),
    "v1-missing-field": v1("PROXY TCP4 192.0.2.1 198.51.100.2 1"),
    "v1-extra-field": v1("PROXY TCP4 192.0.2.1 198.51.100.2 1 2 3"),
    "v1-unknown-protocol": v1("PROXY UDP4 192.0.2.1 198.51.100.2 1 2"),
    "v1-empty": v1("PROXY "),
    "v1-non-ascii": b"PROXY TCP4 192.0.2.\xd9\xa1 198.51.100.2 1 2\r\n",  # an Arabic-Indic digit
    "v2-version-1": v2(0x11, TCP4, inet4("192.0.2.1", "198.51.100.2", 1, 2)),
    "v2-version-3": v2(0x31, TCP4, inet4("192.0.2.1", "198.51.100.2", 1, 2)),
    "v2-command-2": v2(0x22, TCP4, inet4("192.0.2.1", "198.51.100.2", 1, 2)),
    "v2-command-15": v2(0x2F, TCP4, inet4("192.0.2.1", "198.51.100.2", 1, 2)),
    "v2-unknown-family": v2(PROXY, 0x41, inet4("192.0.2.1", "198.51.100.2", 1, 2)),
    "v2-unknown-transport": v2(PROXY, 0x13, inet4("192.0.2.1", "198.51.100.2", 1, 2)),
    # Refused from its fixed 16 bytes alone, before any of the 4081 announced bytes arrive.
    "v2-over-max-header": v2(PROXY, TCP4, b"", length=MAX_HEADER - 16 + 1),
    "v2-length-65535": v2(PROXY, TCP4, b"", length=65535),
    "v2-ipv4-block-too-short": v2(PROXY, TCP4, inet4("192.0.2.1", "198.51.100.2", 1, 2)[:11]),
    "v2-ipv6-block-too-short": v2(PROXY, TCP6, inet6("2001:db8::1", "::1", 1, 2)[:35]),
    "v2-ipv6-block-of-ipv4-size": v2(PROXY, TCP6, inet4("192.0.2.1", "198.51.100.2", 1, 2)),
}


@pytest.mark.parametrize(("header", "source"), VALID.values(), ids=VALID.keys())
def test_valid_header_is_parsed(header: bytes, source: tuple[str, int] | None) -> None:
    assert parse(header) == (len(header), source)
    # What follows the header is the client's data, never part of the header, even if it looks like one.
    for rest in (b"hello\r\n", header, b"\r\n\r\n\x00\r\nQUIT\n", b"\0" * 5000):
        assert parse(header + rest) == (len(header), source)


@pytest.mark.parametrize(("header", "source"), VALID.values(), ids=VALID.keys())
def test_every_prefix_of_a_valid_header_asks_for_more(header: bytes, source: object) -> None:
    for size in range(len(header)):
        assert parse(header[:size]) is None, f"prefix of {size} bytes: {header[:size]!r}"


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_header_is_refused(data: bytes) -> None:
    with pytest.raises(ProxyError):
        parse(data)
    with pytest.raises(ProxyError):  # whatever follows: the verdict is the same
        parse(data + b"\r\n" + b"x" * MAX_HEADER)


def test_builders_make_the_headers_the_spec_describes() -> None:
    """header_v1/header_v2 (used by the live tests below) build exactly the hand-written headers."""
    assert header_v1(("192.0.2.1", 56324), ("198.51.100.2", 443)) == VALID["v1-tcp4"][0]
    assert header_v2(("192.0.2.1", 56324), ("198.51.100.2", 443)) == VALID["v2-ipv4"][0]
    assert header_v2(("2001:db8::7", 7), ("::1", 8), TLVS) == VALID["v2-ipv6-tlvs"][0]


# -- service bugs, pinned (see the report in the module docstring) -------------------------------------------
@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
        b"PROXY TCP6 fe80::1%x\nFAKE-LOG-LINE ::1 1 2\r\n",
        b"PROXY TCP6 fe80::1%\x1b[31m ::1 1 2\r\n",
    ],
    ids=["scope", "scope-with-lf", "scope-with-esc"],
)
def test_v1_refuses_a_scoped_ipv6_address(line: bytes) -> None:
    with pytest.raises(ProxyError):
        parse(line)


@pytest.mark.parametrize("family_transport", [0x10, 0x20, 0x30, 0x01, 0x02])
def test_v2_refuses_family_transport_pairs_the_spec_leaves_undefined(family_transport: int) -> None:
    with pytest.raises(ProxyError):
        parse(v2(PROXY, family_transport, inet6("2001:db8::1", "::1", 1, 2)))


@pytest.mark.parametrize("client", ["::ffff:192.0.2.1", "::192.0.2.1"])
def test_v1_and_v2_name_an_ipv4_mapped_client_alike(client: str) -> None:
    from_v1 = parse(header_v1((client, 1), ("::1", 2)))
    from_v2 = parse(header_v2((client, 1), ("::1", 2)))
    assert from_v1 is not None and from_v2 is not None
    assert from_v1[1] == from_v2[1]


# -- Hypothesis ----------------------------------------------------------------------------------------------
@FUZZ
@given(
    source=st.ip_addresses(),
    port=st.integers(0, 65535),
    dport=st.integers(0, 65535),
    version=st.sampled_from([1, 2]),
    tlvs=st.binary(max_size=600),
    payload=st.binary(max_size=300),
)
@example(
    source=ipaddress.ip_address("255.255.255.255"), port=65535, dport=0, version=1, tlvs=b"", payload=b""
)
@example(source=ipaddress.ip_address("::"), port=0, dport=65535, version=2, tlvs=b"", payload=V2_SIGNATURE)
def test_fuzz_built_headers_parse_back(
    source: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, dport: int, version: int, tlvs: bytes,
    payload: bytes,
) -> None:  # fmt: skip
    destination = ("198.51.100.2", dport) if source.version == 4 else ("2001:db8::2", dport)
    if version == 1:
        header = header_v1((str(source), port), destination)
    else:
        header = header_v2((str(source), port), destination, tlvs)
    result = parse(header + payload)
    assert result is not None
    length, named = result
    assert length == len(header)
    assert named is not None and named[1] == port
    assert named[0] == str(source)  # one spelling per address, whichever version named it
    assert parse(header[: len(header) - 1]) is None


def check_parse_properties(data: bytes) -> None:
    """What the worker relies on, for any bytes a client may send."""
    try:
        result = parse(data)
    except ProxyError:
        result = "error"
    if result is None:
        # The worker keeps reading while parse() says "more": that may never exceed MAX_HEADER.
        assert len(data) < MAX_HEADER
    elif result != "error":
        length, source = result
        assert 0 < length <= min(len(data), MAX_HEADER)
        if source is not None:
            ip, port = source
            ipaddress.ip_address(ip)
            assert 0 <= port <= 65535
        # The header delimits itself: alone, it parses the same, and every prefix asks for more.
        assert parse(data[:length]) == result
        for size in {*range(min(length, 40)), length // 2, length - 1}:
            assert parse(data[:size]) is None, f"prefix of {size} bytes of {data[:length]!r}"
    # More bytes never change a verdict already reached.
    if result is not None:
        for extra in (b"\r\n", b"\0" * 64, data):
            try:
                again = parse(data + extra)
            except ProxyError:
                again = "error"
            assert again == result, f"{data!r} + {extra!r}"


def _v1_field() -> st.SearchStrategy[bytes]:
    addresses = st.ip_addresses().map(lambda a: str(a).encode())
    protocols = st.sampled_from([b"TCP4", b"TCP6", b"UNKNOWN", b"TCP5", b""])
    ports = st.one_of(st.integers(-5, 70000).map(lambda p: str(p).encode()), st.sampled_from([b"00", b"01"]))
    return st.one_of(addresses, protocols, ports, st.binary(max_size=8))


@st.composite
def v1_like(draw: st.DrawFn) -> bytes:
    fields = draw(st.lists(_v1_field(), max_size=7))
    end = draw(st.sampled_from([b"\r\n", b"\n", b"\r", b"", b"\r\nrest"]))
    return b"PROXY " + b" ".join(fields) + end


@FUZZ
@given(
    data=st.one_of(st.binary(max_size=300), v1_like(), st.binary(max_size=120).map(lambda b: b"PROXY " + b))
)
@example(data=b"")
@example(data=b"\r")
@example(data=b"PROXY ")
@example(data=b"P" * MAX_HEADER)
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    check_parse_properties(data)


@st.composite
def v2_like(draw: st.DrawFn) -> bytes:
    version_command = draw(st.one_of(st.sampled_from([0x20, 0x21]), st.integers(0, 255)))
    family_transport = draw(
        st.one_of(st.sampled_from([0x00, 0x11, 0x12, 0x21, 0x22, 0x31]), st.integers(0, 255))
    )
    body = draw(st.binary(max_size=300))
    length = draw(st.one_of(st.just(len(body)), st.integers(0, 300), st.integers(0, 65535)))
    return V2_SIGNATURE + struct.pack("!BBH", version_command, family_transport, length) + body


@FUZZ
@given(data=st.one_of(v2_like(), st.binary(max_size=300).map(lambda b: V2_SIGNATURE + b)))
@example(data=V2_SIGNATURE + bytes([PROXY, TCP4, 0x0F, 0xF0]) + b"\0" * (MAX_HEADER - 16))
@example(data=V2_SIGNATURE + bytes([PROXY, TCP6, 0, 36]) + b"\0" * 35)
def test_fuzz_bytes_after_a_v2_signature(data: bytes) -> None:
    check_parse_properties(data)


# -- live daemon helpers -------------------------------------------------------------------------------------
def proxied_daemon(
    echod: DaemonFactory, *extra: str, workers: int = 2, plain: bool = False, config: Path | None = None
) -> Daemon:
    """A daemon whose first listen address has proxy_protocol (debug log on); `plain` adds a second one
    without it. With `config`, the listener table goes in that TOML file instead of --listeners."""
    proxied = f"127.0.0.1:{free_port()}"
    listen = [proxied, f"127.0.0.1:{free_port()}"] if plain else [proxied]
    if config is None:
        options = ["--listeners", json.dumps({proxied: {"proxy_protocol": True}})]
    else:
        config.write_text(f'[listeners."{proxied}"]\nproxy_protocol = true\n')
        options = ["--config", str(config)]
    return echod(*options, "--log-level", "debug", *extra, workers=workers, listen=listen)


def connect(daemon: Daemon, index: int = 0) -> socket.socket:
    sock = daemon.connect(index, timeout=IO_TIMEOUT)
    sock.settimeout(IO_TIMEOUT)
    return sock


def read_until_closed(sock: socket.socket, timeout: float = IO_TIMEOUT) -> bytes:
    """Everything the server sends until it closes (FIN or RST); TimeoutError if it does not close."""
    sock.settimeout(timeout)
    got = bytearray()
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    return bytes(got)


def send_slowly(sock: socket.socket, data: bytes, pause: float = 0.005) -> None:
    """One byte per send (TCP_NODELAY is on), with a pause so that each tends to be its own segment."""
    for i in range(len(data)):
        sock.sendall(data[i : i + 1])
        time.sleep(pause)  # pacing only: what is checked is the echo that follows


def counted(**expected: float) -> Callable[[dict[str, float]], bool]:
    """A wait_metrics predicate: every named sample (keys from the constants above) has that value."""
    names = {
        "proxy": CLOSED_PROXY, "client": CLOSED_CLIENT, "rejected": CLOSED_REJECTED,
        "per_ip": REJECTED_PER_IP, "received": RECEIVED, "accepted": ACCEPTED, "active": ACTIVE,
    }  # fmt: skip
    return lambda m: all(m.get(names[key]) == value for key, value in expected.items())


# -- live: header stripped, rest echoed ----------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("io_mode", ["copy", "splice"])
def test_header_is_stripped_and_what_follows_is_echoed(echod: DaemonFactory, io_mode: str) -> None:
    daemon = proxied_daemon(echod, "--io-mode", io_mode)
    destination = ("127.0.0.1", daemon.port)
    big = random.Random(7).randbytes(100_000)  # longer than one read: header and data span reads
    cases = [
        (header_v1(("192.0.2.1", 40001), destination), b"v1 payload\n", ("192.0.2.1", 40001)),
        (header_v1(("2001:db8::1", 40002), ("::1", 7)), b"v1 over IPv6\n", ("2001:db8::1", 40002)),
        (header_v2(("192.0.2.2", 40003), destination), b"v2 payload\n", ("192.0.2.2", 40003)),
        (header_v2(("2001:db8::2", 40004), ("::1", 7), TLVS), b"v2 with TLVs\n", ("2001:db8::2", 40004)),
        (header_v2(("192.0.2.3", 40005), destination), big, ("192.0.2.3", 40005)),
        # The header is parsed once: a second one right behind it is the client's data.
        (header_v1(("192.0.2.4", 40006), destination), header_v1(("192.0.2.66", 1), destination),
         ("192.0.2.4", 40006)),
        (VALID["v1-unknown"][0], b"unknown: the proxy speaks for itself\n", None),
        (VALID["v2-local"][0], b"LOCAL: a health check\n", None),
    ]  # fmt: skip
    received = 0
    for header, payload, _source in cases:
        with connect(daemon) as sock:
            sock.sendall(header + payload)
            assert recv_exactly(sock, len(payload)) == payload, f"after {header!r}"
            assert echo_roundtrip(sock, b"and more\n") == b"and more\n"
            received += len(payload) + len(b"and more\n")
            sock.shutdown(socket.SHUT_WR)
            assert read_until_closed(sock) == b""  # nothing else came back: no header
    for _header, _payload, source in cases:
        if source is not None:
            line = f"connection from {source[0]} port {source[1]} (PROXY protocol)"
            wait_for(lambda line=line: line in daemon.log(), 10, f"log line {line!r}")
    # Header bytes are not received bytes: only the payloads count.
    metrics = wait_metrics(daemon, counted(client=len(cases), active=0), "every connection closed")
    assert metrics[RECEIVED] == received, metrics
    assert metrics[CLOSED_PROXY] == 0


@pytest.mark.integration
def test_header_data_and_eof_in_one_event(echod: DaemonFactory) -> None:
    # Header, payload and FIN queued while the worker is stopped reach it as one epoll event
    # (EPOLLIN|EPOLLRDHUP): after the header read it must still see the EOF, or the connection hangs.
    daemon = proxied_daemon(echod, workers=1)
    worker = one_worker(daemon)
    payload = b"after the header, then EOF\n"
    with connect(daemon) as sock:
        wait_metrics(daemon, counted(accepted=1), "the connection accepted")
        stop_process(worker)
        try:
            sock.sendall(header_v1(("192.0.2.9", 40009), ("127.0.0.1", daemon.port)) + payload)
            sock.shutdown(socket.SHUT_WR)
            time.sleep(0.2)  # let it all land in echod's receive queue
        finally:
            os.kill(worker, signal.SIGCONT)
        assert read_until_closed(sock) == payload
    wait_metrics(daemon, counted(client=1, active=0), "the connection closed by the client's EOF")


@pytest.mark.integration
def test_header_split_into_many_segments(echod: DaemonFactory) -> None:
    daemon = proxied_daemon(echod, workers=1)
    destination = ("127.0.0.1", daemon.port)
    headers = [
        header_v1(("192.0.2.11", 50011), destination),
        header_v2(("2001:db8::11", 50012), ("::1", 7), TLVS),
    ]
    for n, header in enumerate(headers):
        payload = f"payload {n} after a header sent byte by byte\n".encode()
        with connect(daemon) as sock:
            send_slowly(sock, header)
            assert echo_roundtrip(sock, payload) == payload
    with connect(daemon) as sock:  # and the last header byte in the same segment as the payload
        header = header_v2(("192.0.2.12", 50013), destination)
        send_slowly(sock, header[:-1])
        sock.sendall(header[-1:] + b"tail")
        assert recv_exactly(sock, 4) == b"tail"
    for ip, port in (("192.0.2.11", 50011), ("2001:db8::11", 50012), ("192.0.2.12", 50013)):
        line = f"connection from {ip} port {port} (PROXY protocol)"
        wait_for(lambda line=line: line in daemon.log(), 10, f"log line {line!r}")
    wait_metrics(daemon, counted(client=3, proxy=0, active=0), "three clean closes")


def malformed_samples(count: int, seed: int) -> list[bytes]:
    """Valid headers with a few random bytes changed, kept when parse() refuses them outright (a change
    that leaves the header valid, or makes it ask for more bytes, is skipped)."""
    rng = random.Random(seed)
    found: list[bytes] = []
    while len(found) < count:
        source = (str(ipaddress.IPv4Address(rng.getrandbits(32))), rng.randrange(65536))
        header = bytearray(rng.choice([header_v1, header_v2])(source, ("127.0.0.1", 7)))
        for _ in range(rng.randint(1, 3)):
            header[rng.randrange(len(header))] = rng.randrange(256)
        data = bytes(header) + b"must not come back"
        try:
            parse(data)
        except ProxyError:
            found.append(data)
    return found


@pytest.mark.integration
def test_malformed_and_truncated_headers_close_the_connection(echod: DaemonFactory) -> None:
    daemon = proxied_daemon(echod)
    workers = daemon.workers()
    samples = [
        MALFORMED["http-request"],
        MALFORMED["v1-no-crlf-in-107-bytes"] + b"f" * 200,
        MALFORMED["v1-port-65536"] + b"data",
        MALFORMED["v2-command-2"] + b"data",
        MALFORMED["v2-ipv4-block-too-short"],
        MALFORMED["v2-over-max-header"],  # the 16 fixed bytes alone: refused without waiting for more
        *malformed_samples(8, seed=2024),
    ]
    for data in samples:
        with connect(daemon) as sock:
            sock.sendall(data)
            assert read_until_closed(sock) == b"", f"echoed something after {data!r}"
    # Closed before the header was whole: also a PROXY protocol failure.
    truncated = [header_v1(("192.0.2.1", 1), ("127.0.0.1", 7))[:20], V2_SIGNATURE[:5], V2_SIGNATURE + b"\x21"]
    for data in truncated:
        with connect(daemon) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            assert read_until_closed(sock) == b""
    failures = len(samples) + len(truncated)
    # The daemon is fine: a good connection is served, by the same workers.
    with connect(daemon) as sock:
        sock.sendall(header_v2(("192.0.2.1", 1), ("127.0.0.1", 7)) + b"still here")
        assert recv_exactly(sock, 10) == b"still here"
    metrics = wait_metrics(
        daemon, lambda m: m[CLOSED_CLIENT] == 1 and m[CLOSED_PROXY] >= failures, "the failures to be counted"
    )
    assert metrics[CLOSED_PROXY] == failures, metrics
    assert metrics[RECEIVED] == len(b"still here"), "bytes of refused headers were counted as received"
    assert metrics[RESTARTS] == 0
    assert daemon.workers() == workers
    assert "Traceback" not in daemon.log()


@pytest.mark.integration
def test_header_timeout_closes_silent_and_slow_connections(echod: DaemonFactory) -> None:
    daemon = proxied_daemon(echod, "--proxy-protocol-timeout", "1", workers=1)
    served = connect(daemon)
    served.sendall(header_v1(("192.0.2.1", 1), ("127.0.0.1", 7)))  # whole header: the timeout is over
    silent = connect(daemon)
    partial_v1 = connect(daemon)
    partial_v1.sendall(b"PROXY TCP4 192.0.2.1")
    partial_v2 = connect(daemon)
    partial_v2.sendall(V2_SIGNATURE + b"\x21\x11\x00")
    with served, silent, partial_v1, partial_v2:
        for sock in (silent, partial_v1, partial_v2):
            assert read_until_closed(sock, timeout=10) == b""
        assert (
            echo_roundtrip(served, b"the whole header came in time\n") == b"the whole header came in time\n"
        )
        metrics = wait_metrics(daemon, counted(proxy=3), "three header timeouts")
        assert metrics[CLOSED_TIMEOUT] == 0 and metrics[ACTIVE] == 1, metrics


@pytest.mark.integration
def test_per_ip_limit_counts_the_address_in_the_header(echod: DaemonFactory) -> None:
    # Every connection comes from 127.0.0.1 (the "proxy"): only the header tells the clients apart.
    daemon = proxied_daemon(echod, "--max-connections-per-ip", "1", workers=1)
    destination = ("127.0.0.1", daemon.port)
    first = connect(daemon)
    first.sendall(header_v1(("198.51.100.7", 1001), destination))
    assert echo_roundtrip(first, b"first\n") == b"first\n"
    with connect(daemon) as second:
        second.sendall(header_v2(("198.51.100.7", 1002), destination) + b"second\n")
        assert read_until_closed(second) == b"", "a second connection from 198.51.100.7 was served"
    with connect(daemon) as other:
        other.sendall(header_v1(("198.51.100.8", 1003), destination))
        assert echo_roundtrip(other, b"another client\n") == b"another client\n"
        assert echo_roundtrip(first, b"first again\n") == b"first again\n"
        wait_metrics(daemon, counted(rejected=1, per_ip=1, proxy=0), "one per-IP rejection")
        text = "max_connections_per_ip reached (the last for 198.51.100.7)"
        wait_for(lambda: text in daemon.log(), 10, f"log line with {text!r}")
        first.close()  # frees 198.51.100.7's place
        wait_metrics(daemon, counted(client=1), "the first connection's close")
        with connect(daemon) as again:
            again.sendall(header_v2(("198.51.100.7", 1004), destination) + b"my turn\n")
            assert recv_exactly(again, 8) == b"my turn\n"
    metrics = wait_metrics(daemon, counted(active=0), "every connection closed")
    assert metrics[CLOSED_REJECTED] == 1 and metrics[REJECTED_PER_IP] == 1, metrics


@pytest.mark.integration
def test_listener_without_proxy_protocol_echoes_a_header_as_data(
    echod: DaemonFactory, tmp_path: Path
) -> None:
    # The listener table comes from a TOML file here: [listeners."127.0.0.1:PORT"] proxy_protocol = true.
    daemon = proxied_daemon(echod, plain=True, config=tmp_path / "listeners.toml")
    destination = ("127.0.0.1", daemon.port)
    data = header_v1(("192.0.2.1", 1), destination) + header_v2(("192.0.2.2", 2), destination) + b"tail\n"
    with connect(daemon, 1) as plain:
        assert echo_roundtrip(plain, data) == data
    with connect(daemon, 1) as plain:
        garbage = MALFORMED["v2-command-2"] + MALFORMED["v1-bare-lf"]
        assert echo_roundtrip(plain, garbage) == garbage
    with connect(daemon, 0) as proxied:  # the same bytes on the PROXY listener: the first header goes
        rest = data[len(header_v1(("192.0.2.1", 1), destination)) :]
        proxied.sendall(data)
        assert recv_exactly(proxied, len(rest)) == rest
    metrics = wait_metrics(daemon, counted(client=3), "three closes")
    assert metrics[CLOSED_PROXY] == 0
    assert metrics[RECEIVED] == len(data) + len(garbage) + len(rest)


@pytest.mark.integration
def test_bytes_after_a_header_completed_during_a_reload_are_echoed(echod: DaemonFactory) -> None:
    daemon = proxied_daemon(echod, "--proxy-protocol-timeout", "30", workers=1)
    destination = ("127.0.0.1", daemon.port)
    established = connect(daemon)
    established.sendall(header_v1(("192.0.2.1", 1), destination))
    waiting = connect(daemon)  # accepted by the old worker, no header yet
    with established, waiting:
        assert echo_roundtrip(established, b"before\n") == b"before\n"
        wait_metrics(daemon, counted(accepted=2), "both connections accepted")
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: "handed 1 connections over" in daemon.log(), 15, "the old worker to hand over")
        assert echo_roundtrip(established, b"after\n") == b"after\n"
        waiting.settimeout(3)
        payload = b"sent with the header\n"
        waiting.sendall(header_v1(("192.0.2.2", 2), destination) + payload)
        assert recv_exactly(waiting, len(payload)) == payload


# -- HAProxy in front ----------------------------------------------------------------------------------------
HAPROXY_CFG = """\
global
    maxconn 256

defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend v1
    bind 127.0.0.1:{v1_port}
    default_backend echod-v1

backend echod-v1
    server echod {echod} send-proxy

frontend v2
    bind 127.0.0.1:{v2_port}
    default_backend echod-v2

backend echod-v2
    server echod {echod} send-proxy-v2
"""


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Callable[[str], dict[str, int]]]:
    """Start HAProxy in front of an echod address; returns {"v1": port, "v2": port} of its frontends."""
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(echod_address: str) -> dict[str, int]:
        ports = {"v1": free_port(), "v2": free_port()}
        config = tmp_path / "haproxy.cfg"
        config.write_text(HAPROXY_CFG.format(v1_port=ports["v1"], v2_port=ports["v2"], echod=echod_address))
        log_path = tmp_path / "haproxy.log"
        procs.append((start_haproxy(config, log_path), log_path))
        return ports

    yield start
    for proc, log_path in procs:
        kill_group(proc)
        print(log_path.read_text(errors="replace"))


def client_via(port: int, source: str = "127.0.0.2") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT, source_address=(source, 0))
    sock.settimeout(IO_TIMEOUT)
    return sock


@pytest.mark.integration
def test_haproxy_send_proxy_v1_and_v2(echod: DaemonFactory, haproxy: Callable[[str], dict[str, int]]) -> None:
    daemon = proxied_daemon(echod)
    frontends = haproxy(daemon.listen[0])
    probes = 0
    for port in frontends.values():

        def answers(port: int = port) -> bool:
            nonlocal probes
            try:
                with client_via(port) as sock:
                    probes += 1
                    return echo_roundtrip(sock, b"probe\n") == b"probe\n"
            except ConnectionRefusedError:
                return False

        wait_for(answers, 15, f"haproxy to answer on port {port}")
    clients: list[tuple[socket.socket, bytes]] = []
    try:
        for version, port in frontends.items():
            for i in range(5):
                sock = client_via(port, source=f"127.0.0.{2 + i % 2}")  # 127.0.0.2 and .3, never HAProxy's
                clients.append((sock, f"through haproxy send-proxy {version}, client {i}\n".encode()))
        for sock, payload in clients:
            sock.sendall(payload)
        for sock, payload in clients:
            assert recv_exactly(sock, len(payload)) == payload
        for sock, _payload in clients:
            ip, port = sock.getsockname()[:2]
            line = f"connection from {ip} port {port} (PROXY protocol)"
            wait_for(lambda line=line: line in daemon.log(), 10, f"echod to log {line!r}")
        # HAProxy itself connects from 127.0.0.1: that address must never be taken for the client's.
        assert "connection from 127.0.0.1 " not in daemon.log()
    finally:
        for sock, _payload in clients:
            sock.close()
    total = probes + len(clients)
    metrics = wait_metrics(daemon, counted(accepted=total, active=0), f"{total} connections closed")
    assert metrics[CLOSED_PROXY] == 0, metrics
    assert metrics[CLOSED_CLIENT] == total, metrics


# -- check-config --------------------------------------------------------------------------------------------
def check_config(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("ECHOD_")}
    return subprocess.run(
        [*ECHOD, "check-config", "--config", "/dev/null", *args],
        env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


@pytest.mark.integration
def test_check_config_accepts_a_proxy_listener(tmp_path: Path) -> None:
    result = check_config(
        tmp_path, "--listen", "127.0.0.1:7001", "--listen", "127.0.0.1:7002",
        "--listeners", '{"127.0.0.1:7002": {"proxy_protocol": true}}', "--proxy-protocol-timeout", "2.5",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    effective = tomllib.loads(result.stdout)
    assert effective["listeners"]["127.0.0.1:7002"]["proxy_protocol"] is True
    assert effective["proxy_protocol_timeout"] == 2.5


@pytest.mark.integration
@pytest.mark.parametrize(
    ("listeners", "named"),
    [
        ('{"127.0.0.1:7002": {"proxy_protocol": true}}', 'listeners."127.0.0.1:7002"'),
        ('{"127.0.0.1:7001": {"proxy_protocl": true}}', "proxy_protocl"),
        ('{"127.0.0.1:7001": {"proxy_protocol": [1]}}', "proxy_protocol"),
        ('{"127.0.0.1:7001": {"proxy_protocol": "yes"}}', "proxy_protocol"),
        ('{"127.0.0.1:7001": {"proxy_protocol": 1}}', "proxy_protocol"),
        ('{"nonsense": {"proxy_protocol": true}}', "listeners.nonsense"),
        ('{"127.0.0.1:7001": ', "listeners"),
        ('["127.0.0.1:7001"]', "listeners"),
    ],
    ids=[
        "not-a-listen-address",
        "unknown-option",
        "not-a-boolean",
        "string-for-boolean",
        "number-for-boolean",
        "not-an-address",
        "bad-json",
        "not-a-table",
    ],
)
def test_check_config_refuses_bad_listener_options(tmp_path: Path, listeners: str, named: str) -> None:
    result = check_config(tmp_path, "--listen", "127.0.0.1:7001", "--listeners", listeners)
    assert result.returncode == EX_CONFIG, result.stdout + result.stderr
    assert named in result.stderr, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr


@pytest.mark.integration
@pytest.mark.parametrize("timeout", ["0", "-1", "3601", "soon"])
def test_check_config_refuses_a_bad_header_timeout(tmp_path: Path, timeout: str) -> None:
    result = check_config(tmp_path, "--listen", "127.0.0.1:7001", "--proxy-protocol-timeout", timeout)
    assert result.returncode == EX_CONFIG, result.stdout + result.stderr
    assert "proxy_protocol_timeout" in result.stderr, result.stderr


@pytest.mark.integration
def test_check_config_refuses_two_keys_for_one_address(tmp_path: Path) -> None:
    listeners = '{"localhost:7001": {"proxy_protocol": true}, "127.0.0.1:7001": {"proxy_protocol": false}}'
    result = check_config(tmp_path, "--listen", "127.0.0.1:7001", "--listeners", listeners)
    assert result.returncode == EX_CONFIG, result.stdout


@pytest.mark.parametrize("family_transport", [0x00, 0x10, 0x23, 0x45, 0xFF])
def test_v2_local_is_accepted_whatever_the_family(family_transport: int) -> None:
    """Spec 2.2: with LOCAL the receiver uses the real endpoints and ignores the family byte."""
    header = v2(0x20, family_transport, b"\x01" * 7)
    assert parse(header + b"data") == (len(header), None)


@pytest.mark.integration
def test_reload_refuses_to_flip_proxy_protocol_on_a_kept_address(
    echod: DaemonFactory, tmp_path: Path
) -> None:
    """Old and new workers share a kept address's queue during a reload: they must read it alike."""
    config = tmp_path / "flip.toml"
    daemon = proxied_daemon(echod, config=config, workers=1)
    config.write_text(config.read_text().replace("proxy_protocol = true", "proxy_protocol = false"))
    daemon.send_signal(signal.SIGHUP)
    wait_metrics(daemon, lambda m: m['echod_config_reloads_total{result="failure"}'] == 1, "a failed reload")
    assert "proxy_protocol cannot change on a reload" in daemon.log()
    destination = ("127.0.0.1", daemon.port)
    with connect(daemon) as sock:  # still the PROXY listener it was
        sock.sendall(header_v1(("192.0.2.9", 9), destination) + b"kept")
        assert recv_exactly(sock, 4) == b"kept"
