"""Unit tests of pure pieces (idle wheel, addresses, listener sets, the launcher); no daemon is started.
The worker's own parts are tested in tests/test_worker_parts.py.

Sockets are real (socketpair, loopback TCP) and every blocking call has a timeout.
"""

from __future__ import annotations

import argparse
import fcntl
import itertools
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import conftest
import pytest
from conftest import free_port, has_ipv6
from echod import daemon
from echod.idle import IdleWheel
from echod.listeners import Address, BindError, ListenerSet, parse_address

# -- IdleWheel ---------------------------------------------------------------------------------------


def drain_wheel(wheel: IdleWheel, tick: int) -> list[int]:
    return sorted(wheel.expired(tick))


def test_wheel_expires_exactly_after_timeout() -> None:
    last = [0] * 16
    wheel = IdleWheel(5, last, tick=100)
    last[3] = 100
    wheel.add(3, 100)
    assert len(wheel) == 1
    for tick in range(101, 105):
        assert drain_wheel(wheel, tick) == [], f"expired at tick {tick}, only {tick - 100} s idle"
    assert drain_wheel(wheel, 105) == [3]
    assert len(wheel) == 0
    assert drain_wheel(wheel, 200) == []  # forgotten once expired


def test_wheel_traffic_reschedules() -> None:
    last = [0] * 16
    wheel = IdleWheel(5, last, tick=0)
    last[4] = 0
    wheel.add(4, 0)
    assert drain_wheel(wheel, 2) == []
    last[4] = 3  # traffic at tick 3: now due at 8
    assert drain_wheel(wheel, 5) == []
    assert len(wheel) == 1
    assert drain_wheel(wheel, 7) == []
    last[4] = 7  # traffic again: due at 12
    assert drain_wheel(wheel, 8) == []
    assert drain_wheel(wheel, 11) == []
    assert drain_wheel(wheel, 12) == [4]
    assert len(wheel) == 0


def test_wheel_traffic_at_deadline_tick_reschedules() -> None:
    last = [0] * 8
    wheel = IdleWheel(3, last, tick=0)
    wheel.add(1, 0)
    last[1] = 3  # traffic in the very second the deadline falls
    assert drain_wheel(wheel, 3) == []
    assert drain_wheel(wheel, 5) == []
    assert drain_wheel(wheel, 6) == [1]


def test_wheel_only_idle_connections_expire() -> None:
    last = [0] * 32
    wheel = IdleWheel(10, last, tick=0)
    for fd in range(5, 15):
        wheel.add(fd, 0)
    for tick in range(1, 10):
        for fd in range(5, 15, 2):  # the odd fds keep talking
            last[fd] = tick
        assert drain_wheel(wheel, tick) == []
    assert drain_wheel(wheel, 10) == [6, 8, 10, 12, 14]
    assert len(wheel) == 5
    assert drain_wheel(wheel, 18) == []
    assert drain_wheel(wheel, 19) == [5, 7, 9, 11, 13]
    assert len(wheel) == 0


def test_wheel_remove_forgets() -> None:
    last = [0] * 16
    wheel = IdleWheel(5, last, tick=0)
    wheel.add(3, 0)
    wheel.add(4, 0)
    wheel.remove(3)
    wheel.remove(3)  # twice is harmless
    wheel.remove(9)  # never added: harmless
    assert len(wheel) == 1
    assert drain_wheel(wheel, 5) == [4]
    assert drain_wheel(wheel, 1000) == []
    assert len(wheel) == 0


def test_wheel_memory_follows_open_connections_under_churn() -> None:
    """100,000 connections come and go on 50 descriptors within one second: the bucket keeps about
    the open ones (removed entries are compacted away), and each fd still expires exactly once."""
    last = [0] * 128
    wheel = IdleWheel(5, last, tick=0)
    for n in range(100_000):
        fd = 10 + n % 50
        wheel.remove(fd)  # the connection that had this fd closed...
        wheel.add(fd, 0)  # ...and a new one got it
    bucket = wheel.buckets[5]
    assert len(wheel) == 50
    assert len(bucket.fds) <= bucket.limit <= 4 * 50 + 256, len(bucket.fds)
    assert drain_wheel(wheel, 5) == list(range(10, 60))
    assert len(wheel) == 0


def test_wheel_reuse_of_fd_after_remove() -> None:
    last = [0] * 16
    wheel = IdleWheel(5, last, tick=0)
    wheel.add(3, 0)
    wheel.remove(3)  # closed at tick 0
    last[3] = 4
    wheel.add(3, 4)  # a new connection on the same fd at tick 4
    assert drain_wheel(wheel, 5) == []
    assert drain_wheel(wheel, 8) == []
    assert drain_wheel(wheel, 9) == [3]


def test_wheel_far_future_tick_processes_every_bucket() -> None:
    last = [0] * 64
    wheel = IdleWheel(7, last, tick=0)
    for fd in range(10, 50):
        tick = fd % 13
        last[fd] = tick
        wheel.add(fd, tick)
    for fd in range(10, 50, 3):
        last[fd] += 20  # some had traffic later: rescheduled first, still due long before the end
    last[60] = 500_000
    wheel.add(60, 500_000)  # one whose bucket lies far ahead of the last sweep
    assert drain_wheel(wheel, 1_000_000) == [*range(10, 50), 60]
    assert len(wheel) == 0
    assert not any(wheel.buckets.values())
    assert wheel.swept == 1_000_000


def test_wheel_skipped_ticks_catch_up() -> None:
    last = [0] * 16
    wheel = IdleWheel(2, last, tick=0)
    wheel.add(1, 0)  # due 2
    last[2] = 1
    wheel.add(2, 1)  # due 3
    last[3] = 5
    wheel.add(3, 5)  # due 7
    assert drain_wheel(wheel, 6) == [1, 2]  # ticks 1..6 processed in one call
    assert drain_wheel(wheel, 7) == [3]


def test_wheel_going_back_in_time_expires_nothing() -> None:
    last = [0] * 8
    wheel = IdleWheel(2, last, tick=10)
    last[1] = 10
    wheel.add(1, 10)
    assert drain_wheel(wheel, 5) == []
    assert len(wheel) == 1
    assert drain_wheel(wheel, 12) == [1]


# -- parse_address ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port", "family", "canonical"),
    [
        ("127.0.0.1:7007", "127.0.0.1", 7007, socket.AF_INET, "127.0.0.1:7007"),
        ("10.1.2.3:0", "10.1.2.3", 0, socket.AF_INET, "10.1.2.3:0"),
        ("0.0.0.0:65535", "0.0.0.0", 65535, socket.AF_INET, "0.0.0.0:65535"),
        ("[::1]:7007", "::1", 7007, socket.AF_INET6, "[::1]:7007"),
        ("[::]:80", "::", 80, socket.AF_INET6, "[::]:80"),
        ("[2001:DB8:0:0::1]:443", "2001:db8::1", 443, socket.AF_INET6, "[2001:db8::1]:443"),
        ("*:7007", "0.0.0.0", 7007, socket.AF_INET, "0.0.0.0:7007"),
        ("localhost:7007", "127.0.0.1", 7007, socket.AF_INET, "127.0.0.1:7007"),
        ("  127.0.0.1:1  ", "127.0.0.1", 1, socket.AF_INET, "127.0.0.1:1"),
    ],
)
def test_parse_address_valid(text: str, host: str, port: int, family: int, canonical: str) -> None:
    address = parse_address(text)
    assert (address.host, address.port, address.family) == (host, port, family)
    assert str(address) == canonical
    assert parse_address(str(address)) == address


def test_parse_address_equal_spellings() -> None:
    assert parse_address("localhost:9") == parse_address("127.0.0.1:9")
    assert parse_address("*:9") == parse_address("0.0.0.0:9")
    assert parse_address("[0:0:0:0:0:0:0:1]:9") == parse_address("[::1]:9")
    assert parse_address("127.0.0.1:9") != parse_address("127.0.0.1:10")
    assert len({parse_address("localhost:9"), parse_address("127.0.0.1:9")}) == 1


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("nope", "expected host:port"),
        ("1.2.3.4", "expected host:port"),
        ("", "expected host:port"),
        ("[::1]", r"expected \[v6addr\]:port"),
        ("[::1]7007", r"expected \[v6addr\]:port"),
        ("::1:80", "write IPv6 addresses as"),
        ("host:99999", "port must be"),
        ("127.0.0.1:65536", "port must be"),
        ("127.0.0.1:-1", "port must be"),
        ("127.0.0.1:", "port must be"),
        ("127.0.0.1:http", "port must be"),
        ("[::1]:70000", "port must be"),
        ("host:80", "is not an IP address"),
        ("example.com:80", "is not an IP address"),
        ("256.0.0.1:80", "is not an IP address"),
        ("[nope]:80", "is not an IP address"),
    ],
)
def test_parse_address_errors(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as info:
        parse_address(text)
    assert repr(text.strip()) in str(info.value)


# -- ListenerSet ----------------------------------------------------------------------------------------


@pytest.fixture
def listeners() -> Iterator[list[ListenerSet]]:
    """Collects ListenerSets so that every one is closed even when a test fails."""
    made: list[ListenerSet] = []
    yield made
    for item in made:
        item.close()


def new_set(made: list[ListenerSet], backlog: int = 16) -> ListenerSet:
    item = ListenerSet(backlog)
    made.append(item)
    return item


def ports(group: list[socket.socket]) -> set[int]:
    return {sock.getsockname()[1] for sock in group}


def accepts(group: list[socket.socket], host: str, port: int) -> bool:
    """A real connection to host:port is queued on one of the group's sockets."""
    with socket.create_connection((host, port), timeout=5):
        ready, _, _ = select.select(group, [], [], 5)
        for sock in ready:
            conn, _ = sock.accept()
            conn.close()
        return bool(ready)


def test_listener_port_zero_shares_one_port(listeners: list[ListenerSet]) -> None:
    lset = new_set(listeners)
    address = parse_address("127.0.0.1:0")
    lset.open([address], 3)
    group = lset.sockets[address]
    assert len(group) == 3
    (port,) = ports(group)
    assert port != 0
    assert lset.bound_address(address) == Address("127.0.0.1", port, socket.AF_INET)
    assert lset.addresses == [address]
    assert all(not sock.getblocking() for sock in group)
    assert accepts(group, "127.0.0.1", port)


def test_listener_fixed_port_and_slots(listeners: list[ListenerSet]) -> None:
    port = free_port()
    lset = new_set(listeners)
    a = parse_address(f"127.0.0.1:{port}")
    b = parse_address("127.0.0.1:0")
    lset.open([a, b], 2)
    assert ports(lset.sockets[a]) == {port}
    assert len(lset.sockets[b]) == 2
    assert lset.slot(0) == [lset.sockets[a][0], lset.sockets[b][0]]
    assert lset.slot(1) == [lset.sockets[a][1], lset.sockets[b][1]]
    assert lset.slot(2) == []
    assert len(lset.filenos()) == 4
    assert accepts(lset.sockets[a], "127.0.0.1", port)


@pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback")
def test_listener_ipv6(listeners: list[ListenerSet]) -> None:
    lset = new_set(listeners)
    address = parse_address("[::1]:0")
    lset.open([address], 2)
    group = lset.sockets[address]
    (port,) = ports(group)
    assert port != 0
    assert all(sock.family == socket.AF_INET6 for sock in group)
    assert str(lset.bound_address(address)) == f"[::1]:{port}"
    assert accepts(group, "::1", port)


def queued(sock: socket.socket) -> int:
    """Accept (and close) every connection queued on a non-blocking listening socket."""
    count = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


def test_listener_new_address_is_steered_to_the_active_slots_at_once(listeners: list[ListenerSet]) -> None:
    """A reload to fewer workers binds a new address for the old count of slots (3 here), and only
    the new workers (1) accept on it: whatever the kernel hashed to sockets 1 and 2 would wait there
    unaccepted and be reset when they are closed. `active` steers the new address from the start."""
    lset = new_set(listeners, backlog=64)
    kept = parse_address("127.0.0.1:0")
    lset.open([kept], 3)
    added = parse_address(f"127.0.0.1:{free_port()}")
    lset.open([kept, added], 3, active=1)
    group = lset.sockets[added]
    assert len(group) == 3
    clients = [socket.create_connection(("127.0.0.1", added.port), timeout=5) for _ in range(30)]
    try:
        assert [queued(sock) for sock in group] == [30, 0, 0]
    finally:
        for client in clients:
            client.close()


def test_listener_second_set_on_same_port_fails(listeners: list[ListenerSet]) -> None:
    first = new_set(listeners)
    address = parse_address("127.0.0.1:0")
    first.open([address], 2)
    port = first.bound_address(address).port
    second = new_set(listeners)
    with pytest.raises(BindError, match=str(port)):
        second.open([parse_address(f"127.0.0.1:{port}")], 2)
    assert second.sockets == {}
    assert len(first.sockets[address]) == 2  # the first keeps serving
    assert accepts(first.sockets[address], "127.0.0.1", port)


def test_listener_port_held_by_other_program_fails(listeners: list[ListenerSet]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as other:
        port = other.getsockname()[1]
        lset = new_set(listeners)
        with pytest.raises(BindError, match="in use"):
            lset.open([parse_address(f"127.0.0.1:{port}")], 1)
        assert lset.sockets == {}


def test_listener_failed_open_leaves_set_unchanged(listeners: list[ListenerSet]) -> None:
    held = new_set(listeners)
    held.open([parse_address("127.0.0.1:0")], 1)
    busy = held.bound_address(parse_address("127.0.0.1:0")).port
    free = free_port()

    lset = new_set(listeners)
    kept = parse_address("127.0.0.1:0")
    lset.open([kept], 2)
    before = list(lset.sockets[kept])
    with pytest.raises(BindError) as info:
        lset.open([kept, parse_address(f"127.0.0.1:{free}"), parse_address(f"127.0.0.1:{busy}")], 2)
    assert lset.addresses == [kept]
    assert lset.sockets[kept] == before
    # Nothing was left listening on the free port (closed, not merely unreferenced: the traceback held
    # in `info` keeps open()'s locals alive): a plain socket can take it.
    with socket.create_server(("127.0.0.1", free)) as plain:
        assert plain.getsockname()[1] == free
    assert str(busy) in str(info.value)


def test_listener_open_again_keeps_sockets(listeners: list[ListenerSet]) -> None:
    lset = new_set(listeners)
    address = parse_address("127.0.0.1:0")
    lset.open([address], 2)
    before = list(lset.sockets[address])
    lset.open([address], 2)
    assert lset.sockets[address] == before


def test_listener_resize_and_shrink(listeners: list[ListenerSet]) -> None:
    lset = new_set(listeners)
    address = parse_address("127.0.0.1:0")
    lset.open([address], 2)
    port = lset.bound_address(address).port
    lset.resize(5)
    group = lset.sockets[address]
    assert len(group) == 5
    assert ports(group) == {port}
    assert len(lset.filenos()) == 5
    assert accepts(group, "127.0.0.1", port)

    dropped = group[2:]
    lset.shrink(2)
    assert len(lset.sockets[address]) == 2
    assert all(sock.fileno() == -1 for sock in dropped)
    assert len(lset.filenos()) == 2
    assert lset.slot(2) == []
    assert accepts(lset.sockets[address], "127.0.0.1", port)

    lset.resize(3)  # growing again after a shrink binds the same port
    assert len(lset.sockets[address]) == 3
    assert ports(lset.sockets[address]) == {port}
    lset.resize(1)  # resize never shrinks
    assert len(lset.sockets[address]) == 3


def test_listener_open_with_more_slots_grows(listeners: list[ListenerSet]) -> None:
    lset = new_set(listeners)
    address = parse_address("127.0.0.1:0")
    lset.open([address], 1)
    port = lset.bound_address(address).port
    lset.open([address], 4)
    assert len(lset.sockets[address]) == 4
    assert ports(lset.sockets[address]) == {port}


def test_listener_close(listeners: list[ListenerSet]) -> None:
    lset = new_set(listeners)
    a = parse_address("127.0.0.1:0")
    b = parse_address(f"127.0.0.1:{free_port()}")
    lset.open([a, b], 2)
    port_a = lset.bound_address(a).port
    socks = [sock for group in lset.sockets.values() for sock in group]
    lset.close_address(b)
    assert lset.addresses == [a]
    lset.close()
    assert lset.sockets == {}
    assert lset.filenos() == set()
    assert all(sock.fileno() == -1 for sock in socks)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port_a), timeout=5).close()
    # The ports are free again: another set can take them.
    again = new_set(listeners)
    again.open([parse_address(f"127.0.0.1:{port_a}"), b], 1)
    assert len(again.filenos()) == 2


# -- echod start's launcher -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("said", "code", "stderr"),
    [
        (b"ready\n", 0, ""),
        (b"listen 127.0.0.1:1: in use\n", daemon.EX_RUNTIME, "in use"),
        (None, daemon.EX_RUNTIME, "exited before it was ready"),  # the daemon died: EOF
        (b"", daemon.EX_RUNTIME, "not ready after 0.5 s"),  # alive, silent: `start` must not hang
    ],
    ids=["ready", "error", "died", "silent"],
)
def test_start_waits_for_the_daemons_word_but_not_for_ever(
    capsys: pytest.CaptureFixture[str], said: bytes | None, code: int, stderr: str
) -> None:
    read_end, write_end = os.pipe()
    if said:
        os.write(write_end, said)
    if said is None:
        os.close(write_end)
    started = time.monotonic()
    try:
        assert daemon._await_ready(read_end, timeout=0.5) == code
    finally:
        if said is not None:
            os.close(write_end)
    assert time.monotonic() - started < 5
    assert stderr in capsys.readouterr().err


# -- worker/malloc.py --------------------------------------------------------------------------------

_FASTBIN_PROBE = """
import ctypes, sys
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "off":
    from echod.worker.malloc import no_fastbins
    no_fastbins()
blocks = [libc.malloc(48) for _ in range(200)]  # past tcache's 7: the rest go to a fastbin
for block in blocks:
    libc.free(block)
print(libc.mallinfo2().fsmblks)
"""


def test_no_fastbins_keeps_freed_small_blocks_out_of_fastbins() -> None:
    """glibc's own count of bytes in fastbins: some by default, none once the worker turned them off."""

    def fastbin_bytes(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _FASTBIN_PROBE, mode], capture_output=True, text=True,
                             timeout=30, check=True)  # fmt: skip
        return int(out.stdout)

    assert fastbin_bytes("on") > 0  # the probe sees fastbins at all (glibc's default)
    assert fastbin_bytes("off") == 0


# -- access-log lines ---------------------------------------------------------------------------------


@pytest.mark.parametrize("duration_us", [0, 7, 999_999, 1_000_000, 1_234_567, 90_061_000_001])
@pytest.mark.parametrize("ms", [0, 9, 999])
def test_json_line_fast_path_writes_the_same_text_as_the_format(duration_us: int, ms: int) -> None:
    """add() builds nearly every line with _json_line (pieces joined, faster compiled); any other line
    comes from _json's %-format. Both must give the same text, and it must be the JSON the log promises."""
    import json

    from echod.worker import access_log

    tcp = (1, 65535, 57, 19, 10, 3, 0, 0, 0, 11, 123_456_789, 0, 0)  # tcpinfo.values() order
    args = ("2026-12-03T17:00:00", ms, 3, "127.0.0.1:7007", "[::1]:40000", duration_us, 10, 20, "client")
    head = (*args[:5], duration_us / 1e6, *args[6:])
    line = access_log._json_line(*args, tcp)
    assert line == access_log._json(head, tcp)
    entry = json.loads(line)
    assert entry["ts"] == f"2026-12-03T17:00:00.{ms:03d}Z"
    assert entry["duration_s"] == pytest.approx(duration_us / 1e6, abs=1e-9)
    assert (entry["rtt_us"], entry["min_rtt_us"], entry["delivery_rate_bps"]) == (57, 11, 987_654_312)


# -- daemon.running_pid -------------------------------------------------------------------------------


def test_a_locked_pidfile_found_empty_is_read_again(tmp_path: Path) -> None:
    """A pidfile being rewritten (locked, empty for an instant: an upgraded master's write_pid) must not
    read as "not running": `echod stop` returned 0 and left the daemon up."""
    path = tmp_path / "echod.pid"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    writer = threading.Timer(0.03, lambda: os.pwrite(fd, b"4242\n", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another open file description: is_locked sees it held
        writer.start()
        assert daemon.running_pid(path) == 4242
        writer.join()
        os.ftruncate(fd, 0)  # locked and empty for good: given up on, after a bounded wait
        started = time.monotonic()
        assert daemon.running_pid(path) is None
        assert time.monotonic() - started < 2.0
    finally:
        writer.cancel()
        writer.join()
        os.close(fd)
    assert daemon.running_pid(path) is None  # unlocked: not running, at once


def test_stop_waits_for_the_exit_not_just_the_lock(tmp_path: Path) -> None:
    """The master lets go of the pidfile's lock before it has exited (python-daemon's context.close),
    and `echod stop` returned in that gap: a CI run found the old master alive after a stop during an
    upgrade. Here a holder that lingers 0.5 s after it drops the lock must be gone when stop returns."""
    path = tmp_path / "echod.pid"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, signal, sys, time\n"
        f"fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT, 0o644)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, f'{os.getpid()}\\n'.encode())\n"
        "def term(*_):\n"
        "    os.close(fd)\n"
        "    time.sleep(0.5)\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, term)\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )], stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"ready\n"
        assert daemon.running_pid(path) == holder.pid
        args = argparse.Namespace(pidfile=str(path), config=None, timeout=10.0)
        assert daemon.cmd_stop(args) == 0
        assert holder.poll() == 0  # exited (a zombie until reaped here), not still on its way out
    finally:
        holder.kill()
        holder.wait(10)


# -- the harness's own free ports (tests/conftest.py) -------------------------------------------------


def test_free_ports_lie_below_the_ephemeral_range_and_never_repeat() -> None:
    """A port from the ephemeral range can be taken by any client's connect() before echod binds it
    (a CI run lost a test to that); and two of one test's ports must never be the same."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(200)] + [free_port(kind=socket.SOCK_DGRAM) for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert all(1024 <= port < low for port in ports), sorted(ports)[-5:]


@pytest.mark.parametrize("index", [0, 3])
def test_parallel_test_processes_draw_ports_from_disjoint_shares(
    monkeypatch: pytest.MonkeyPatch, index: int
) -> None:
    """Under pytest-xdist (`make test`), each process checks a port free and hands it to echod later:
    two processes drawing from one pool could both pick a port in between. Each draws its own share."""
    monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{index}")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "4")
    ports = list(itertools.islice(conftest._below_the_ephemeral_range(), 500))
    assert len(ports) == 500
    assert {port % 4 for port in ports} == {index}


def test_parallel_runs_keep_the_systemd_container_tests_in_one_process() -> None:
    """The scheduler's unit of work (tests/conftest.py): test_systemd.py's tests share one container
    (a module fixture), so they go to one process together; every other test is a unit of its own."""
    assert conftest._scope("tests/test_systemd.py::test_watchdog") == "tests/test_systemd.py"
    assert conftest._scope("tests/test_systemd.py::test_io_modes[copy]") == "tests/test_systemd.py"
    assert conftest._scope("tests/test_echo.py::test_echo[copy]") == "tests/test_echo.py::test_echo[copy]"
