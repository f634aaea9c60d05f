"""Unit tests of the worker's parts, in this process: no daemon is started.

Sockets and pipes are real (socketpair, loopback TCP, pipe2) and every blocking call has a timeout.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import tracemalloc
from collections.abc import Callable, Iterator

import pytest
from echod import stats
from echod.udp import RateLimiter
from echod.worker.accept import ACCEPT_STREAK, Acceptor, Listener
from echod.worker.core import Core
from echod.worker.lifecycle import FLUSH_GRACE, RETIRE_ACCEPT_GRACE, Lifecycle, Phase
from echod.worker.output import FULL, WOULD_BLOCK, Conn, MemoryOutput, Output, Watermarks
from echod.worker.peers import Peers
from echod.worker.splice import PipeOutput, PipePool


class NoEvents:
    def on_conn(self, fd: int, ev: int, conn: Conn) -> None:
        raise AssertionError("not dispatched in these tests")


def conn_with(size: int, paused: bool = False) -> Conn:
    conn = Conn(MemoryOutput(b"x" * size), NoEvents())
    conn.paused = paused
    return conn


# -- Watermarks ------------------------------------------------------------------------------------


def test_watermarks_pause_at_high() -> None:
    marks = Watermarks(high=100, low=10)
    assert not marks.should_pause(conn_with(99))
    assert marks.should_pause(conn_with(100))
    assert marks.should_pause(conn_with(5000))
    assert not marks.should_pause(conn_with(100, paused=True))  # already paused: no second pause


def test_watermarks_resume_at_low() -> None:
    marks = Watermarks(high=100, low=10)
    assert not marks.should_resume(conn_with(11, paused=True))
    assert marks.should_resume(conn_with(10, paused=True))
    assert marks.should_resume(conn_with(0, paused=True))
    assert not marks.should_resume(conn_with(0))  # not paused: nothing to resume


def test_watermarks_hysteresis_cycle() -> None:
    marks = Watermarks(high=8, low=2)
    out = MemoryOutput()
    conn = Conn(out, NoEvents())
    out.append(b"1234567")
    assert not marks.should_pause(conn)
    out.append(b"8")
    assert marks.should_pause(conn)
    conn.paused = True
    del out.buf[:5]  # 3 left: between low and high, stays paused
    assert not marks.should_resume(conn)
    assert not marks.should_pause(conn)
    del out.buf[:1]
    assert marks.should_resume(conn)


@pytest.mark.parametrize(("high", "low"), [(10, 10), (10, 11), (0, 0), (10, -1), (-5, -10)])
def test_watermarks_reject_bad_order(high: int, low: int) -> None:
    with pytest.raises(ValueError, match="low"):
        Watermarks(high=high, low=low)


# -- both outputs, one interface ------------------------------------------------------------------

PIPE_SIZE = 1 << 20  # holds every payload below: a pipe output never holds more than its pipe


def memory_output(data: bytes) -> Output:
    return MemoryOutput(data)


def pipe_output(data: bytes) -> Output:
    pool = PipePool(PIPE_SIZE)
    r, w = pool.get()
    written = 0
    while written < len(data):
        written += os.write(w, data[written:])
    return PipeOutput(r, w, len(data), pool)


OUTPUTS = [pytest.param(memory_output, id="memory"), pytest.param(pipe_output, id="pipe")]
MakeOutput = Callable[[bytes], Output]


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(ours, client): ours non-blocking like a worker's connection, with small buffers so that the
    kernel takes only part of a large write; the client blocking with a timeout."""
    ours, client = socket.socketpair()
    for sock in (ours, client):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    ours.setblocking(False)
    client.settimeout(5)
    try:
        yield ours, client
    finally:
        ours.close()
        client.close()


def drain(sock: socket.socket) -> bytes:
    """Everything the socket has ready now, without waiting."""
    data = bytearray()
    sock.setblocking(False)
    try:
        while True:
            try:
                chunk = sock.recv(1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
    finally:
        sock.settimeout(5)
    return bytes(data)


@pytest.mark.parametrize("make", OUTPUTS)
def test_flush_partial_then_would_block_then_rest(make: MakeOutput, pair: tuple[socket.socket, ...]) -> None:
    ours, client = pair
    payload = os.urandom(512 << 10)
    out = make(payload)
    first = out.flush(ours.fileno())
    assert 0 < first < len(payload), "small socket buffers cannot take 512 KiB at once"
    sent = first
    for _ in range(1000):  # without reading, the peer fills up and flush reports 0, keeping the rest
        n = out.flush(ours.fileno())
        if n == 0:
            break
        sent += n
    else:
        pytest.fail("flush never reported a full buffer")
    assert 0 < len(out) == len(payload) - sent
    received = bytearray()
    for _ in range(100_000):
        received += drain(client)
        if not len(out):
            break
        sent += out.flush(ours.fileno())
    else:
        pytest.fail("output never drained")
    while len(received) < len(payload):
        chunk = client.recv(1 << 20)
        assert chunk, "peer closed early"
        received += chunk
    assert sent == len(payload)
    assert bytes(received) == payload


@pytest.mark.parametrize("make", OUTPUTS)
def test_fill_then_flush_keeps_order(make: MakeOutput, pair: tuple[socket.socket, ...]) -> None:
    ours, client = pair
    first, second = os.urandom(3000), os.urandom(5000)
    out = make(first)
    client.sendall(second)
    select.select([ours], [], [], 5)
    moved = 0
    while moved < len(second):
        n = out.fill(ours.fileno(), 65536)
        assert n > 0, f"fill returned {n} with {len(second) - moved} bytes waiting"
        moved += n
    assert len(out) == len(first) + len(second)
    received = bytearray()
    for _ in range(100_000):
        out.flush(ours.fileno())
        received += drain(client)
        if len(received) == len(first) + len(second):
            break
    assert bytes(received) == first + second
    assert len(out) == 0


@pytest.mark.parametrize("make", OUTPUTS)
def test_fill_reports_eof_and_nothing_to_read(make: MakeOutput, pair: tuple[socket.socket, ...]) -> None:
    ours, client = pair
    out = make(b"")
    # Nothing sent: memory says there is nothing to read; a pipe cannot tell that apart from being
    # full (splice says EAGAIN for both), and the worker then waits for EPOLLOUT (worker/echo.py).
    assert out.fill(ours.fileno(), 4096) == (FULL if isinstance(out, PipeOutput) else WOULD_BLOCK)
    client.shutdown(socket.SHUT_WR)
    select.select([ours], [], [], 5)
    assert out.fill(ours.fileno(), 4096) == 0


@pytest.mark.parametrize("make", OUTPUTS)
def test_flush_to_closed_peer_raises_and_keeps_the_bytes(
    make: MakeOutput, pair: tuple[socket.socket, ...]
) -> None:
    ours, client = pair
    client.close()
    out = make(b"x" * 10)
    with pytest.raises(OSError) as info:
        out.flush(ours.fileno())
    assert not isinstance(info.value, BlockingIOError)
    assert len(out) == 10  # nothing sent, nothing forgotten (the worker counts it as dropped)


@pytest.mark.parametrize("make", OUTPUTS)
def test_flush_to_reset_tcp_peer_raises(make: MakeOutput) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(5)
        client = socket.create_connection(server.getsockname(), timeout=5)
        accepted, _ = server.accept()
        with client, accepted:
            accepted.setblocking(False)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
            client.close()
            select.select([accepted], [], [], 5)
            out = make(b"y" * 1000)
            with pytest.raises(OSError) as info:
                for _ in range(100):
                    out.flush(accepted.fileno())
            assert not isinstance(info.value, BlockingIOError)


@pytest.mark.parametrize("make", OUTPUTS)
def test_take_empties_the_output_in_order(make: MakeOutput) -> None:
    payload = os.urandom(100_000)
    out = make(payload)
    assert bytes(out.take()) == payload
    assert len(out) == 0
    out.release()


def test_pipe_output_goes_back_to_the_pool_only_when_empty() -> None:
    pool = PipePool(PIPE_SIZE)
    empty = pipe_output(b"")
    assert isinstance(empty, PipeOutput)
    r, w = empty.r, empty.w
    empty.release()
    assert pool.idle == [] and empty.r == -1  # its own pool, not this one
    full = PipeOutput(*pool.get(), 0, pool)
    r, w = full.r, full.w
    os.write(w, b"abc")
    full.pending = 3
    full.release()  # not empty: closed, never reused with stale bytes in it
    assert pool.idle == []
    with pytest.raises(OSError):
        os.fstat(r)
    drained = PipeOutput(*pool.get(), 0, pool)
    r, w = drained.r, drained.w
    drained.release()
    drained.release()  # twice is harmless
    assert pool.idle == [(r, w)]
    assert pool.get() == (r, w)


def test_memory_output_copies_its_input() -> None:
    source = bytearray(b"abcdef")
    out = MemoryOutput(memoryview(source)[1:4])
    source[:] = b"zzzzzz"
    assert bytes(out.buf) == b"bcd"


def test_many_small_appends_keep_one_bytearray() -> None:
    out = MemoryOutput()
    buf = out.buf
    count = 100_000
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for i in range(count):
            out.append(i.to_bytes(3, "big"))  # a fresh bytes object per chunk
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.buf is buf
    assert bytes(out.buf) == b"".join(i.to_bytes(3, "big") for i in range(count))
    # 300 kB of payload; an object (or even a list slot) per chunk would cost several MB.
    assert after - before < 1_000_000, f"{after - before} bytes for {3 * count} bytes of data"
    assert not hasattr(out, "__dict__") and not hasattr(Conn(out, NoEvents()), "__dict__")


# -- the lifecycle ----------------------------------------------------------------------------------


class Hooks:
    """Records what the lifecycle asked for, in order; `open` is the worker's connection count."""

    def __init__(self) -> None:
        self.open = 5
        self.calls: list[str] = []

    def open_connections(self) -> int:
        return self.open

    def stop_accepting(self) -> None:
        self.calls.append("stop_accepting")

    def begin_close(self) -> None:
        self.calls.append("begin_close")

    def close_all(self) -> None:
        self.calls.append("close_all")


def test_a_worker_keeps_accepting_until_asked() -> None:
    hooks = Hooks()
    life = Lifecycle(hooks, shutdown_timeout=30)
    for now in (0.0, 1.0, 1000.0):
        assert life.advance(now) is Phase.ACCEPTING
    assert life.accepting and hooks.calls == []


def test_retirement_accepts_a_grace_then_drains_then_exits_when_empty() -> None:
    hooks = Hooks()
    life = Lifecycle(hooks, shutdown_timeout=30)
    life.retire(100.0)
    assert not life.accepting  # the master must not count it as ready any more
    assert life.advance(100.0) is Phase.RETIRING
    assert life.advance(100.0 + RETIRE_ACCEPT_GRACE - 0.01) is Phase.RETIRING
    assert hooks.calls == []
    assert life.advance(100.0 + RETIRE_ACCEPT_GRACE) is Phase.DRAINING
    assert hooks.calls == ["stop_accepting"]
    assert life.advance(110.0) is Phase.DRAINING
    hooks.open = 0
    assert life.advance(111.0) is Phase.DONE
    assert hooks.calls == ["stop_accepting"]  # nothing left to close


def test_draining_past_shutdown_timeout_closes_then_gives_up_after_the_flush_grace() -> None:
    hooks = Hooks()
    life = Lifecycle(hooks, shutdown_timeout=30)
    life.stop(0.0)  # TERM: no accept grace
    assert life.advance(0.0) is Phase.DRAINING
    assert life.advance(29.9) is Phase.DRAINING
    assert life.advance(30.0) is Phase.CLOSING
    assert hooks.calls == ["stop_accepting", "begin_close"]
    assert life.advance(30.0 + FLUSH_GRACE - 0.01) is Phase.CLOSING
    assert life.advance(30.0 + FLUSH_GRACE) is Phase.DONE
    assert hooks.calls == ["stop_accepting", "begin_close", "close_all"]


def test_closing_ends_as_soon_as_every_connection_is_closed() -> None:
    hooks = Hooks()
    life = Lifecycle(hooks, shutdown_timeout=0)
    life.stop(0.0)
    assert life.advance(0.0) is Phase.CLOSING  # shutdown_timeout 0: straight on
    hooks.open = 0
    assert life.advance(0.5) is Phase.DONE
    assert "close_all" not in hooks.calls


def test_a_fast_stop_goes_straight_to_closing_from_any_phase() -> None:
    for asked_at in ("accepting", "retiring", "draining"):
        hooks = Hooks()
        life = Lifecycle(hooks, shutdown_timeout=30)
        if asked_at != "accepting":
            life.retire(0.0)
            life.advance(0.0 if asked_at == "retiring" else 5.0)
        life.stop_fast()
        assert life.advance(5.0) is Phase.CLOSING, asked_at
        assert hooks.calls == ["stop_accepting", "begin_close"], asked_at


def test_term_during_the_accept_grace_stops_accepting_at_once() -> None:
    hooks = Hooks()
    life = Lifecycle(hooks, shutdown_timeout=30)
    life.retire(0.0)
    life.advance(0.0)
    life.stop(0.2)
    assert life.advance(0.2) is Phase.DRAINING


def test_a_second_request_never_extends_a_deadline() -> None:
    hooks = Hooks()
    life = Lifecycle(hooks, shutdown_timeout=30)
    life.stop(0.0)
    life.retire(10.0)  # USR2 after TERM: ignored
    life.stop(20.0)  # a second TERM: the first deadline stands
    assert life.advance(0.0) is Phase.DRAINING
    assert life.advance(30.0) is Phase.CLOSING


def test_a_worker_with_no_connections_exits_at_once_on_term() -> None:
    hooks = Hooks()
    hooks.open = 0
    life = Lifecycle(hooks, shutdown_timeout=30)
    life.stop(0.0)
    assert life.advance(0.0) is Phase.DONE
    assert hooks.calls == ["stop_accepting"]


# -- accepting and the limits -------------------------------------------------------------------------


class Headers:
    def __init__(self) -> None:
        self.started: list[int] = []

    def start(self, fd: int, tls: object = None) -> None:
        self.started.append(fd)


@pytest.fixture
def accepting() -> Iterator[Callable[..., tuple[Acceptor, Listener, list[socket.socket]]]]:
    """Factory: (acceptor, its listener, clients) for a real loopback listener in this process."""
    made: list[socket.socket] = []
    cores: list[Core] = []

    def make(
        max_connections: int = 100, per_ip: int = 0, proxy: bool = False
    ) -> tuple[Acceptor, Listener, list[socket.socket]]:
        lsock = socket.create_server(("127.0.0.1", 0), backlog=128)
        lsock.setblocking(False)
        made.append(lsock)
        core = Core(select.epoll(), 65536, 0, Peers(per_ip))
        cores.append(core)
        limiter = RateLimiter(100, 1000, 10, core.counts)
        proxied = frozenset({lsock.fileno()}) if proxy else frozenset()
        acceptor = Acceptor(core, [lsock], proxied, max_connections, limiter, Headers())
        acceptor.start()
        listener = core.table[lsock.fileno()]
        assert isinstance(listener, Listener)
        return acceptor, listener, made

    yield make
    for core in cores:
        for fd, state in enumerate(core.table):
            if state is None:
                os.close(fd)
        core.ep.close()
    for sock in made:
        sock.close()


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.settimeout(5)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def accept_turns(acceptor: Acceptor, listener: Listener, turns: int) -> None:
    for _ in range(turns):
        acceptor.core.turn += 1
        acceptor.accept(listener)


def test_max_connections_rejects_the_rest(
    accepting: Callable[..., tuple[Acceptor, Listener, list[socket.socket]]],
) -> None:
    acceptor, listener, socks = accepting(max_connections=2)
    port = listener.sock.getsockname()[1]
    clients = [connect(port) for _ in range(3)]
    socks += clients
    accept_turns(acceptor, listener, 3)
    core = acceptor.core
    assert core.open == 2
    assert core.counts[stats.ACCEPTED] == 2
    assert core.counts[stats.REJECTED_LIMIT] == 1
    assert clients[2].recv(1) == b""  # closed at once by the server


def test_per_ip_limit_counts_each_address(
    accepting: Callable[..., tuple[Acceptor, Listener, list[socket.socket]]],
) -> None:
    acceptor, listener, socks = accepting(per_ip=1)
    port = listener.sock.getsockname()[1]
    socks += [connect(port, "127.0.0.1"), connect(port, "127.0.0.2"), connect(port, "127.0.0.1")]
    accept_turns(acceptor, listener, 3)
    core = acceptor.core
    assert core.open == 2
    assert core.counts[stats.REJECTED_PER_IP] == 1
    assert core.peers.count == {"127.0.0.1": 1, "127.0.0.2": 1}
    assert core.peers.last_rejected == "127.0.0.1"
    first = next(fd for fd, state in enumerate(core.table) if state is None)
    core.close(first, "client")  # a closed connection frees its address's place
    assert sum(core.peers.count.values()) == 1


def test_a_proxy_listener_leaves_the_limit_to_the_header(
    accepting: Callable[..., tuple[Acceptor, Listener, list[socket.socket]]],
) -> None:
    acceptor, listener, socks = accepting(per_ip=1, proxy=True)
    port = listener.sock.getsockname()[1]
    socks += [connect(port) for _ in range(3)]
    accept_turns(acceptor, listener, 3)
    assert acceptor.core.open == 3  # one address, but the header names the clients
    assert isinstance(acceptor.headers, Headers) and len(acceptor.headers.started) == 3


def test_one_per_turn_until_a_queue_lasts_then_batches(
    accepting: Callable[..., tuple[Acceptor, Listener, list[socket.socket]]],
) -> None:
    acceptor, listener, socks = accepting()
    port = listener.sock.getsockname()[1]
    socks += [connect(port) for _ in range(ACCEPT_STREAK + 20)]
    accept_turns(acceptor, listener, ACCEPT_STREAK)
    assert acceptor.core.open == ACCEPT_STREAK  # one per turn: no accept4 that finds nothing
    accept_turns(acceptor, listener, 1)
    assert acceptor.core.open == ACCEPT_STREAK + 20  # ready 8 turns in a row: the queue at once
    assert listener.streak == 0  # that batch emptied the queue


def test_retire_closes_our_listener_copy_for_good(
    accepting: Callable[..., tuple[Acceptor, Listener, list[socket.socket]]],
) -> None:
    acceptor, listener, _socks = accepting()
    fd = listener.sock.fileno()
    acceptor.retire()
    assert listener.sock.fileno() == -1
    assert acceptor.core.table[fd] is not listener
    acceptor.resume(1e12)  # no resume after retirement
    assert not acceptor.accepting
