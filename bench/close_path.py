#!/usr/bin/env python3
"""The close path's per-connection pieces, timed in-process on one real loopback TCP connection.

What a worker does for every connection it closes (worker/insight.py, tcpinfo.py, worker/access_log.py),
without the kernel noise of a load test: `observe` (histograms and one TCP_INFO read), `fetch` (the
TCP_INFO read alone: two system calls), `values` (its unpack), `add` (one JSON access-log line), `logged`
(observe + add + the client's text, every close while the log is on). Best of 5 runs of N calls each, in
ns per call. Run it with the Python of the build to measure:

    .venv/bin/python bench/close_path.py                # the interpreted build (editable install)
    .venv-compiled/bin/python bench/close_path.py       # the compiled one (make test builds it)
    taskset -c 1 .venv-compiled/bin/python bench/close_path.py --calls 500000

The access log writes to /dev/null, emptied every 1,000 lines as the loop's flush would.
"""

from __future__ import annotations

import argparse
import select
import socket
import time
from collections.abc import Callable

from echod import build, tcpinfo
from echod.worker import insight as insight_module
from echod.worker.access_log import AccessLog
from echod.worker.core import Core
from echod.worker.peers import Peers


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=200_000, help="calls per run (5 runs, best kept)")
    calls = parser.parse_args().calls

    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname()[:2])
    server, _ = listener.accept()
    client.sendall(b"x" * 100)
    server.recv(100)
    server.sendall(b"y" * 100)
    client.recv(100)  # some traffic, so that TCP_INFO has an RTT and byte counts
    fd = server.fileno()

    core = Core(select.epoll(), 65536, 0, Peers(0))
    core.grow(fd)
    core.born[fd] = time.monotonic()
    insight = insight_module.Insight(core, None, 1.0, 0)
    log = AccessLog("/dev/null", "json", "", [0] * 64, 0)
    log.open()
    raw = tcpinfo.fetch(fd)
    assert raw is not None
    values = tcpinfo.values(raw)

    def line(_fd: int) -> None:
        log.add("127.0.0.1:7", "127.0.0.1:5555", 1234, 100, 100, "client", values)
        if len(log.lines) > 1000:
            log.lines.clear()

    def logged(_fd: int) -> None:
        insight.logged(fd, "client")
        if len(log.lines) > 1000:
            log.lines.clear()

    def bench(name: str, call: Callable[[int], object]) -> None:
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(calls):
                call(fd)
            best = min(best, (time.perf_counter() - start) / calls)
        print(f"{name:8s} {best * 1e9:8.1f} ns")

    print(f"echod {build.describe()}")
    bench("observe", insight.observe)
    bench("fetch", tcpinfo.fetch)
    bench("values", lambda _fd: tcpinfo.values(raw))
    bench("add", line)
    core.keep_addresses()
    core.peer[fd], core.via[fd] = ("127.0.0.1", 5555), "127.0.0.1:7"
    insight.access = log
    bench("logged", logged)
    for sock in (client, server, listener):
        sock.close()


if __name__ == "__main__":
    main()
