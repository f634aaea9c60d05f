#!/usr/bin/env python3
"""Closed-loop TCP echo load generator in pure Python (select.epoll, several processes).

Modes (one JSON line on stdout at the end; progress markers on stderr):

  load (default)  -c CONNS connections, each keeping -p messages of -s bytes in flight: a new message is
                  sent as soon as an earlier one has been echoed in full. No traffic starts until every
                  connection is up; then --warmup seconds, then the measured window of -d seconds.
                  stderr: "MEASURE start" / "MEASURE end" at the window's edges (run.py samples the
                  server's CPU there).
  --churn         -c CONNS concurrent slots, each looping connect, send -s bytes, read the echo, close.
                  Reports conns/s; latency is per connection (connect() to the last echoed byte).
  --hold N        open N connections, echo -s bytes once on each, print "HOLDING n" on stderr, keep them
                  open for -d seconds, then close them (for a server RSS measurement).

Every connection's stream is a slice of one shared pseudo-random pattern (prime length, random start per
connection) and every echoed byte is compared against it: any difference shows in mismatched_bytes.
Accounting is in stream offsets, so echoes may come back split or merged any way. Latency is taken with one
clock read per epoll batch, so it includes the client's own batch processing time. Percentiles come from
the first 2 M samples of the window per process (about 10 s at 200 k msgs/s).

  python bench/loadgen.py -c 100 -s 64 -p 1 -d 4 -w 1 --procs 2 127.0.0.1 7007
  python bench/loadgen.py --churn -c 50 --src 8 -d 4 127.0.0.1 7007
  python bench/loadgen.py --hold 10000 --src 8 -d 3 127.0.0.1 7007
"""

from __future__ import annotations

import argparse
import errno
import json
import multiprocessing
import os
import random
import resource
import select
import signal
import socket
import sys
import time
import traceback
from array import array
from collections import deque
from itertools import repeat
from typing import Any

PRIME = 1_000_003  # pattern period: a prime, so no message size lines up with it
MAX_CHUNK = 1 << 18  # longest slice of the pattern taken at once (one recv, one batch of sends)
RECV_SIZE = 65536
LAT_CAP = 2_000_000  # latency samples kept per process
IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h: let connect() pick the port, per source address
CONNECT_INFLIGHT = 256  # non-blocking connects in progress at once, per process
EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
EPOLL_READ = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP
WOULD_BLOCK = (errno.EAGAIN, errno.EINPROGRESS, errno.ENOTCONN, errno.EALREADY)

PATTERN = b""  # set in main() before the workers fork


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def source_addresses(count: int) -> list[str]:
    """127.0.0.2 .. 127.0.0.(count+1): each gets its own ephemeral port range towards one server port."""
    if not 0 <= count <= 250:
        raise ValueError("--src must be 0..250")
    return [f"127.0.0.{2 + i}" for i in range(count)]


def count_mismatches(got: bytes, want: bytes) -> int:
    return sum(a != b for a, b in zip(got, want, strict=False)) + abs(len(got) - len(want))


def new_socket(srcs: list[str], index: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if srcs:
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((srcs[index % len(srcs)], 0))
    except OSError:
        sock.close()
        raise
    return sock


def open_connections(
    count: int, addr: tuple[str, int], srcs: list[str], first: int, deadline: float
) -> tuple[list[socket.socket], int]:
    """Non-blocking connects, CONNECT_INFLIGHT at a time; returns (connected sockets, failures)."""
    ep = select.epoll()
    pending: dict[int, socket.socket] = {}
    done: list[socket.socket] = []
    failures = 0
    started = 0
    try:
        while started < count or pending:
            now = time.monotonic()
            if now >= deadline:
                break
            while started < count and len(pending) < CONNECT_INFLIGHT:
                started += 1
                try:
                    sock = new_socket(srcs, first + started - 1)
                except OSError:
                    failures += 1
                    continue
                err = sock.connect_ex(addr)
                if err in (0, errno.EINPROGRESS):
                    pending[sock.fileno()] = sock
                    ep.register(sock.fileno(), EPOLLOUT)
                else:
                    failures += 1
                    sock.close()
            for fd, _ev in ep.poll(min(0.1, deadline - now)):
                sock = pending.pop(fd)
                ep.unregister(fd)
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    failures += 1
                    sock.close()
                else:
                    done.append(sock)
    finally:
        ep.close()
    for sock in pending.values():  # deadline passed
        sock.close()
    return done, failures + len(pending) + (count - started)


class Conn:
    __slots__ = ("base", "done", "out", "recv", "roff", "send", "sent_t", "sock", "soff")

    def __init__(self, sock: socket.socket, base: int) -> None:
        self.sock = sock
        self.recv = sock.recv
        self.send = sock.send
        self.base = base  # where this connection's stream starts in PATTERN
        self.soff = 0  # stream bytes queued for sending so far
        self.roff = 0  # stream bytes echoed back so far
        self.done = 0  # messages echoed in full
        self.sent_t: deque[float] = deque()  # send time of every message in flight, oldest first
        self.out = b""  # queued bytes the kernel did not take yet


def worker_load(idx: int, args: argparse.Namespace, count: int, first: int, pipe: Any) -> None:
    pat = PATTERN
    period = PRIME
    size, depth = args.size, args.pipeline
    rng = random.Random(args.seed * 7919 + idx)
    srcs = source_addresses(args.src)
    t_setup = time.monotonic()
    socks, connect_failures = open_connections(
        count, (args.host, args.port), srcs, first, t_setup + args.connect_timeout
    )
    ep = select.epoll()
    conns: dict[int, Conn] = {}
    for sock in socks:
        conns[sock.fileno()] = Conn(sock, rng.randrange(period))
        ep.register(sock.fileno(), EPOLL_READ)
    pipe.send(("ready", len(conns), connect_failures, time.monotonic() - t_setup))
    if not pipe.poll(args.connect_timeout + 60):
        raise TimeoutError("no go from the parent")
    _go, t0, mstart, mend = pipe.recv()
    time.sleep(max(0.0, t0 - time.monotonic()))

    errors = mismatched = msgs = nbytes = 0
    lat = array("d")
    lat_append = lat.append
    measuring = False
    cpu0 = cpu1 = time.process_time()

    def drop(fd: int) -> None:
        conn = conns.pop(fd)
        ep.unregister(fd)
        conn.sock.close()

    def flush(conn: Conn) -> bool:
        """Send conn.out as far as the kernel takes it; False if the connection failed."""
        try:
            sent = conn.send(conn.out)
        except BlockingIOError:
            sent = 0
        except OSError:
            return False
        conn.out = conn.out[sent:]
        return True

    now = time.monotonic()
    burst = depth * size
    for fd, conn in list(conns.items()):
        j = conn.base
        conn.out = pat[j : j + burst]
        conn.soff = burst
        conn.sent_t.extend(repeat(now, depth))
        if not flush(conn):
            errors += 1
            drop(fd)
        elif conn.out:
            ep.modify(fd, EPOLL_READ | EPOLLOUT)

    poll = ep.poll
    monotonic = time.monotonic
    while True:
        timeout = (mend if measuring else mstart) - now
        events = poll(min(max(timeout, 0.0), 0.05))
        now = monotonic()
        if now >= mend:
            break
        if not measuring and now >= mstart:
            measuring = True
            cpu0 = time.process_time()
        lat_on = measuring and len(lat) < LAT_CAP
        for fd, ev in events:
            conn = conns.get(fd)
            if conn is None:
                continue
            if ev & EPOLLOUT and conn.out:
                if not flush(conn):
                    errors += 1
                    drop(fd)
                    continue
                if not conn.out:
                    ep.modify(fd, EPOLL_READ)
            if not ev & EPOLL_READ:
                continue
            try:
                data = conn.recv(RECV_SIZE)
            except BlockingIOError:
                continue
            except OSError:
                errors += 1
                drop(fd)
                continue
            if not data:  # the server closed on us
                errors += 1
                drop(fd)
                continue
            n = len(data)
            i = (conn.base + conn.roff) % period
            if data != pat[i : i + n]:
                mismatched += count_mismatches(data, pat[i : i + n])
            roff = conn.roff + n
            conn.roff = roff
            if measuring:
                nbytes += n
            k = roff // size - conn.done
            if not k:
                continue
            conn.done += k
            sent_t = conn.sent_t
            if k == 1:
                t = sent_t.popleft()
                if lat_on:
                    lat_append(now - t)
                sent_t.append(now)
            else:
                for _ in range(k):
                    t = sent_t.popleft()
                    if lat_on:
                        lat_append(now - t)
                sent_t.extend(repeat(now, k))
            if measuring:
                msgs += k
            m = k * size
            j = (conn.base + conn.soff) % period
            conn.soff += m
            if conn.out:  # still waiting for EPOLLOUT: append, it goes out in order
                conn.out += pat[j : j + m]
                continue
            payload = pat[j : j + m]
            try:
                sent = conn.send(payload)
            except BlockingIOError:
                sent = 0
            except OSError:
                errors += 1
                drop(fd)
                continue
            if sent < m:
                conn.out = payload[sent:]
                ep.modify(fd, EPOLL_READ | EPOLLOUT)
    if measuring:
        cpu1 = time.process_time()
    open_at_end = len(conns)
    for conn in conns.values():
        conn.sock.close()
    ep.close()
    pipe.send(
        (
            "result",
            {
                "msgs": msgs,
                "bytes": nbytes,
                "errors": errors,
                "mismatched_bytes": mismatched,
                "cpu_s": cpu1 - cpu0,
                "conns_open": open_at_end,
                "lat": lat,
            },
        )
    )


def worker_churn(idx: int, args: argparse.Namespace, count: int, first: int, pipe: Any) -> None:
    pat = PATTERN
    size = args.size
    rng = random.Random(args.seed * 7919 + idx)
    srcs = source_addresses(args.src)
    addr = (args.host, args.port)
    pipe.send(("ready", count, 0, 0.0))
    if not pipe.poll(60):
        raise TimeoutError("no go from the parent")
    _go, t0, mstart, mend = pipe.recv()
    time.sleep(max(0.0, t0 - time.monotonic()))

    ep = select.epoll()
    # fd -> [sock, t_connect, expected echo, bytes got]
    slots: dict[int, list[Any]] = {}
    errors = mismatched = conns_done = connect_failures = 0
    lat = array("d")
    measuring = False
    cpu0 = cpu1 = time.process_time()
    seq = first
    retry = 0  # slots whose last connect attempt failed at once: retried on the next turn
    monotonic = time.monotonic

    def start(now: float) -> bool:
        nonlocal seq, connect_failures
        seq += 1
        try:
            sock = new_socket(srcs, seq)
        except OSError:
            connect_failures += 1
            return False
        err = sock.connect_ex(addr)
        if err not in (0, errno.EINPROGRESS):
            connect_failures += 1
            sock.close()
            return False
        j = rng.randrange(PRIME)
        payload = pat[j : j + size]
        fd = sock.fileno()
        slot = [sock, now, payload, 0]
        try:  # on loopback the handshake is usually done already: skip one epoll round trip
            sent = sock.send(payload)
        except OSError as exc:
            if exc.errno not in WOULD_BLOCK:
                connect_failures += 1
                sock.close()
                return False
            sent = -1
        if sent == size:
            slots[fd] = slot
            ep.register(fd, EPOLL_READ)
        else:  # not connected yet (or a short send, which 64 B never is): wait for EPOLLOUT
            slot[3] = -1
            slots[fd] = slot
            ep.register(fd, EPOLLOUT | select.EPOLLERR)
        return True

    now = monotonic()
    for _ in range(count):
        if not start(now):
            retry += 1
    while True:
        timeout = (mend if measuring else mstart) - now
        events = ep.poll(0.001 if retry else min(max(timeout, 0.0), 0.05))
        now = monotonic()
        if now >= mend:
            break
        if not measuring and now >= mstart:
            measuring = True
            cpu0 = time.process_time()
        for fd, _ev in events:
            slot = slots.get(fd)
            if slot is None:
                continue
            sock = slot[0]
            if slot[3] < 0:  # waiting for the connect to finish
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                sent = -1
                if not err:
                    try:
                        sent = sock.send(slot[2])
                    except OSError:
                        sent = -1
                if sent != size:
                    connect_failures += 1
                    del slots[fd]
                    sock.close()
                    retry += 1
                    continue
                slot[3] = 0
                ep.modify(fd, EPOLL_READ)
                continue
            try:
                data = sock.recv(RECV_SIZE)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                errors += 1
                del slots[fd]
                sock.close()
                retry += 1
                continue
            got = slot[3]
            want = slot[2][got : got + len(data)]
            if data != want:
                mismatched += count_mismatches(data, want)
            got += len(data)
            if got < size:
                slot[3] = got
                continue
            del slots[fd]
            sock.close()  # also removes it from the epoll set
            if measuring:
                conns_done += 1
                if len(lat) < LAT_CAP:
                    lat.append(now - slot[1])
            if not start(now):
                retry += 1
        for _ in range(retry):
            retry -= 1
            if not start(now):
                retry += 1
                break
    if measuring:
        cpu1 = time.process_time()
    for slot in slots.values():
        slot[0].close()
    ep.close()
    pipe.send(
        (
            "result",
            {
                "conns": conns_done,
                "errors": errors,
                "connect_failures": connect_failures,
                "mismatched_bytes": mismatched,
                "cpu_s": cpu1 - cpu0,
                "lat": lat,
            },
        )
    )


def worker_hold(idx: int, args: argparse.Namespace, count: int, first: int, pipe: Any) -> None:
    pat = PATTERN
    size = args.size
    rng = random.Random(args.seed * 7919 + idx)
    srcs = source_addresses(args.src)
    t_setup = time.monotonic()
    deadline = t_setup + args.connect_timeout
    socks, connect_failures = open_connections(count, (args.host, args.port), srcs, first, deadline)
    ep = select.epoll()
    waiting: dict[int, list[Any]] = {}  # fd -> [sock, expected, got]
    errors = mismatched = 0
    held: list[socket.socket] = []
    for sock in socks:
        j = rng.randrange(PRIME)
        payload = pat[j : j + size]
        try:
            sent = sock.send(payload)
        except OSError:
            sent = -1
        if sent != size:
            errors += 1
            sock.close()
            continue
        waiting[sock.fileno()] = [sock, payload, 0]
        ep.register(sock.fileno(), EPOLL_READ)
    while waiting:
        now = time.monotonic()
        if now >= deadline:
            break
        for fd, _ev in ep.poll(min(0.1, deadline - now)):
            entry = waiting[fd]
            sock = entry[0]
            try:
                data = sock.recv(RECV_SIZE)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                errors += 1
                ep.unregister(fd)
                del waiting[fd]
                sock.close()
                continue
            want = entry[1][entry[2] : entry[2] + len(data)]
            if data != want:
                mismatched += count_mismatches(data, want)
            entry[2] += len(data)
            if entry[2] >= size:
                ep.unregister(fd)
                del waiting[fd]
                held.append(sock)
    for entry in waiting.values():  # no echo before the deadline
        errors += 1
        entry[0].close()
    ep.close()
    pipe.send(("ready", len(held), connect_failures, time.monotonic() - t_setup))
    pipe.poll(args.duration + args.connect_timeout + 60)  # "release" (or the parent went away)
    for sock in held:
        sock.close()
    pipe.send(("result", {"held": len(held), "errors": errors, "mismatched_bytes": mismatched, "cpu_s": 0.0}))


def worker_main(mode: str, idx: int, args: argparse.Namespace, count: int, first: int, pipe: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    try:
        {"load": worker_load, "churn": worker_churn, "hold": worker_hold}[mode](idx, args, count, first, pipe)
    except BaseException:
        try:
            pipe.send(("error", traceback.format_exc()))
        finally:
            os._exit(1)


def percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"p50": 0.0, "p99": 0.0, "p999": 0.0, "max": 0.0, "mean": 0.0}
    samples.sort()
    n = len(samples)

    def q(frac: float) -> float:
        return round(samples[min(n - 1, int(frac * n))] * 1e6, 1)

    return {
        "p50": q(0.50),
        "p99": q(0.99),
        "p999": q(0.999),
        "max": round(samples[-1] * 1e6, 1),
        "mean": round(sum(samples) / n * 1e6, 1),
    }


def receive(pipe: Any, deadline: float) -> tuple[Any, ...]:
    if not pipe.poll(max(0.0, deadline - time.monotonic())):
        raise TimeoutError("a load process did not answer in time")
    msg = pipe.recv()
    if msg[0] == "error":
        raise RuntimeError("load process failed:\n" + msg[1])
    return msg


def sleep_until(t: float) -> None:
    while (left := t - time.monotonic()) > 0:
        time.sleep(min(left, 0.5))


def run(args: argparse.Namespace) -> dict[str, Any]:
    mode = "churn" if args.churn else "hold" if args.hold else "load"
    total = args.hold if mode == "hold" else args.conns
    nprocs = max(1, min(args.procs, total))
    ctx = multiprocessing.get_context("fork")
    workers: list[tuple[Any, Any]] = []
    out: dict[str, Any] = {"mode": mode, "procs": nprocs, "size": args.size}
    finished = False
    try:
        first = 0
        for idx in range(nprocs):
            count = total // nprocs + (1 if idx < total % nprocs else 0)
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main, args=(mode, idx, args, count, first, child_end), daemon=True
            )
            proc.start()
            child_end.close()
            workers.append((proc, parent_end))
            first += count
        t_setup = time.monotonic()
        deadline = t_setup + args.connect_timeout + 30
        ready = [receive(pipe, deadline) for _proc, pipe in workers]
        out["setup_s"] = round(time.monotonic() - t_setup, 3)
        out["connect_failures"] = sum(r[2] for r in ready)
        if mode == "hold":
            held = sum(r[1] for r in ready)
            print(f"HOLDING {held}", file=sys.stderr, flush=True)
            sleep_until(time.monotonic() + args.duration)
            for _proc, pipe in workers:
                pipe.send(("release",))
            results = [receive(pipe, time.monotonic() + 30)[1] for _proc, pipe in workers]
            finished = True
            out.update(
                held=held,
                errors=sum(r["errors"] for r in results),
                mismatched_bytes=sum(r["mismatched_bytes"] for r in results),
                hold_s=args.duration,
            )
            return out
        out["conns"] = sum(r[1] for r in ready)
        t0 = time.monotonic() + 0.05
        mstart = t0 + args.warmup
        mend = mstart + args.duration
        for _proc, pipe in workers:
            pipe.send(("go", t0, mstart, mend))
        sleep_until(mstart)
        print("MEASURE start", file=sys.stderr, flush=True)
        sleep_until(mend)
        print("MEASURE end", file=sys.stderr, flush=True)
        results = [receive(pipe, mend + 30)[1] for _proc, pipe in workers]
        finished = True
    finally:
        for proc, pipe in workers:
            if finished:  # they exit on their own once they have sent their result
                proc.join(timeout=2)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=2)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=2)
            pipe.close()
    secs = args.duration
    samples: list[float] = []
    for r in results:
        samples.extend(r["lat"])
    cpu = sum(r["cpu_s"] for r in results)
    out.update(
        duration_s=secs,
        warmup_s=args.warmup,
        errors=sum(r["errors"] for r in results),
        mismatched_bytes=sum(r["mismatched_bytes"] for r in results),
        client_cpu_s=round(cpu, 3),
        client_cpu_pct=round(100.0 * cpu / secs, 1),
        lat_samples=len(samples),
        lat_us=percentiles(samples),
    )
    if mode == "churn":
        done = sum(r["conns"] for r in results)
        out.update(conns_done=done, conns_per_s=round(done / secs, 1))
        out["connect_failures"] += sum(r["connect_failures"] for r in results)
    else:
        msgs = sum(r["msgs"] for r in results)
        nbytes = sum(r["bytes"] for r in results)
        out.update(
            pipeline=args.pipeline,
            msgs=msgs,
            msgs_per_s=round(msgs / secs, 1),
            bytes=nbytes,
            mib_per_s=round(nbytes / secs / 2**20, 2),
            conns_open_at_end=sum(r["conns_open"] for r in results),
        )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("host", help="server address (IPv4)")
    ap.add_argument("port", type=int)
    ap.add_argument("-c", "--conns", type=int, default=100, help="connections (churn: concurrent slots)")
    ap.add_argument("-s", "--size", type=int, default=64, help="message size in bytes")
    ap.add_argument("-p", "--pipeline", type=int, default=1, help="messages in flight per connection")
    ap.add_argument("-d", "--duration", type=float, default=4.0, help="measured seconds (hold: hold time)")
    ap.add_argument("-w", "--warmup", type=float, default=1.0, help="seconds of traffic before measuring")
    ap.add_argument("--procs", type=int, default=2, help="client processes (connections split among them)")
    ap.add_argument(
        "--src", type=int, default=0, help="spread connections over N source addresses 127.0.0.2.."
    )
    ap.add_argument("--churn", action="store_true", help="connect/send/receive/close loop; conns/s")
    ap.add_argument("--hold", type=int, default=0, metavar="N", help="hold N connections open for -d seconds")
    ap.add_argument("--connect-timeout", type=float, default=30.0, help="limit on setting up all connections")
    ap.add_argument("--seed", type=int, default=1, help="pattern and per-connection offsets")
    args = ap.parse_args(argv)
    if args.size < 1 or args.pipeline < 1 or args.conns < 1 or args.procs < 1 or args.hold < 0:
        ap.error("sizes and counts must be positive")
    if args.size * args.pipeline > MAX_CHUNK:
        ap.error(f"-s x -p must be at most {MAX_CHUNK} bytes")
    if args.duration <= 0 or args.warmup < 0:
        ap.error("--duration must be > 0 and --warmup >= 0")
    try:
        source_addresses(args.src)
    except ValueError as exc:
        ap.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    global PATTERN
    args = parse_args(argv)
    raise_nofile()
    period = random.Random(args.seed).randbytes(PRIME)
    PATTERN = period + period[:MAX_CHUNK]  # periodic: any slice [i, i+n) with i < PRIME is in-stream
    try:
        out = run(args)
        rc = 0
    except (Exception, KeyboardInterrupt) as exc:
        out = {"error": f"{type(exc).__name__}: {exc}"}
        rc = 130 if isinstance(exc, KeyboardInterrupt) else 1
    print(json.dumps(out), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
