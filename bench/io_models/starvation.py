#!/usr/bin/env python3
"""Starvation demo: one client floods an echo server while another measures its own echo round trips.

1. The victim connects and echoes one 16-byte ping (so it is accepted and served before anything else).
2. The flooder connects and, from one thread, sends 256 KiB chunks as fast as the kernel takes them for
   --flood-s seconds, then half-closes; another thread reads the echoes back (so the server's writes never
   block and the server never has to stop reading on its own).
3. From --ping-after seconds on, the victim pings again and again, each time waiting for the echo (up to
   --timeout), until the flood has ended and --tail seconds more have passed.

Against a server that reads one connection until EAGAIN (edge-triggered epoll done the canonical way), the
flooder's receive queue never runs dry while the flood lasts, so the first ping during the flood comes
back only after it: its round trip is about flood-s - ping-after. A level-triggered loop with one read per
connection per turn, or an edge-triggered loop with a per-turn read budget and a ready list, answers
within a turn. The server should use a small --read-size (4096) so the flooder out-runs it for certain.

Prints one JSON line: first_ping_ms (the first ping sent during the flood), max_ping_ms, median_ping_ms,
pings, flood_mib, echoed_all.

    python bench/io_models/starvation.py --port 7104 --flood-s 1.0
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import threading
import time
from typing import Any

PING = b"ping-0123456789\n"
CHUNK = 256 * 1024


def ping(sock: socket.socket) -> float:
    """Seconds until the whole ping came back."""
    t = time.monotonic()
    sock.sendall(PING)
    got = b""
    while len(got) < len(PING):
        data = sock.recv(len(PING) - len(got))
        if not data:
            raise ConnectionError("the server closed the victim connection")
        got += data
    if got != PING:
        raise ValueError(f"victim got {got!r}")
    return time.monotonic() - t


def run(
    host: str, port: int, flood_s: float = 1.0, ping_after: float = 0.2, interval: float = 0.01,
    tail: float = 0.2, timeout: float = 15.0,
) -> dict[str, Any]:  # fmt: skip
    victim = socket.create_connection((host, port), timeout=timeout)
    flood = socket.create_connection((host, port), timeout=timeout)
    try:
        for sock in (victim, flood):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ping(victim)
        sent = [0]
        echoed = [0]
        failure: list[str] = []
        chunk = os.urandom(CHUNK)

        def sender() -> None:
            end = time.monotonic() + flood_s
            try:
                while time.monotonic() < end:
                    flood.sendall(chunk)
                    sent[0] += CHUNK
                flood.shutdown(socket.SHUT_WR)
            except OSError as exc:
                failure.append(f"flood send: {exc}")

        def reader() -> None:
            try:
                while True:
                    data = flood.recv(1 << 20)
                    if not data:
                        return
                    echoed[0] += len(data)
            except OSError as exc:
                failure.append(f"flood receive: {exc}")

        threads = [threading.Thread(target=f, daemon=True) for f in (sender, reader)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(ping_after)
        pings: list[tuple[float, float]] = []  # (sent at, s after the flood started; round trip, s)
        deadline = t0 + flood_s + tail
        while time.monotonic() < deadline:
            at = time.monotonic() - t0
            pings.append((at, ping(victim)))
            time.sleep(interval)
        for t in threads:
            t.join(timeout=timeout)
        if any(t.is_alive() for t in threads):
            failure.append("the flood did not finish in time")
    finally:
        victim.close()
        flood.close()
    during = [rtt for at, rtt in pings if at < flood_s]
    rtts = [rtt for _at, rtt in pings]
    return {
        "flood_s": flood_s,
        "ping_after_s": ping_after,
        "first_ping_ms": round(during[0] * 1e3, 2) if during else None,
        "max_ping_ms": round(max(rtts) * 1e3, 2) if rtts else None,
        "median_ping_ms": round(statistics.median(rtts) * 1e3, 3) if rtts else None,
        "pings": len(pings),
        "pings_during_flood": len(during),
        "flood_mib": round(sent[0] / 2**20, 1),
        "echoed_all": not failure and echoed[0] == sent[0],
        "error": "; ".join(failure) or None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--flood-s", type=float, default=1.0)
    ap.add_argument("--ping-after", type=float, default=0.2)
    ap.add_argument("--cpu", type=int, help="pin this client to one CPU")
    args = ap.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, [args.cpu])
    try:
        out = run(args.host, args.port, args.flood_s, args.ping_after)
    except (OSError, ValueError) as exc:
        out = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
