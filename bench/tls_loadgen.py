#!/usr/bin/env python3
"""Closed-loop TLS echo load generator (asyncio on uvloop, several processes), for run.py's tls_* scenarios.

Same command line, stderr markers and JSON result as loadgen.py, in fewer modes and without its
latency percentiles:

  load (default)  -c CONNS TLS connections, each keeping -p messages of -s bytes in flight.
  --churn         -c CONNS slots, each looping: new TLS connection (full handshake), one echo, close.
  --hold N        N TLS connections, one echo each, "HOLDING n" on stderr, held for -d seconds.

The client verifies nothing (the server certificate is run.py's throwaway one) and resumes no
session: every churn connection is a full handshake, as a fleet of fresh clients would make.

  python bench/tls_loadgen.py -c 100 -s 64 -p 1 -d 4 -w 1 --procs 1 127.0.0.1 7443
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import ssl
import sys
import time
from typing import Any

try:
    import uvloop
except ImportError:  # plain asyncio still measures the server
    uvloop = None  # type: ignore[assignment]

REPORT_S = 0.1  # how often a process publishes its counts


def client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _load(args: argparse.Namespace, conns: int, shared: dict[str, Any], stop: Any) -> None:
    ctx = client_context()
    counts = {"msgs": 0, "bytes": 0, "conns": 0, "errors": 0, "mismatched": 0}
    payload = os.urandom(args.size)

    async def pipe_loop() -> None:
        reader, writer = await asyncio.open_connection(args.host, args.port, ssl=ctx)
        try:
            for _ in range(args.pipeline):
                writer.write(payload)
            while not stop.is_set():
                got = await reader.readexactly(args.size)
                if got != payload:
                    counts["mismatched"] += args.size
                counts["msgs"] += 1
                counts["bytes"] += args.size
                writer.write(payload)
        finally:
            writer.close()

    async def churn_loop() -> None:
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(args.host, args.port, ssl=ctx)
                writer.write(payload)
                if await reader.readexactly(args.size) != payload:
                    counts["mismatched"] += args.size
                writer.close()
                counts["conns"] += 1
            except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
                counts["errors"] += 1

    async def hold() -> None:
        held = []
        for _ in range(conns):
            try:
                reader, writer = await asyncio.open_connection(args.host, args.port, ssl=ctx)
                writer.write(payload)
                await reader.readexactly(args.size)
                held.append(writer)
            except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
                counts["errors"] += 1
        counts["conns"] = len(held)
        shared["held"].value = len(held)
        while not stop.is_set():
            await asyncio.sleep(0.05)
        for writer in held:
            writer.close()

    async def publish() -> None:
        while not stop.is_set():
            for key, value in counts.items():
                shared[key].value = value
            await asyncio.sleep(REPORT_S)

    body = hold() if args.hold else None
    loops = [churn_loop() if args.churn else pipe_loop() for _ in range(conns)] if body is None else [body]
    tasks = [asyncio.ensure_future(t) for t in loops]
    publisher = asyncio.ensure_future(publish())
    while not stop.is_set():
        await asyncio.sleep(0.05)
    await asyncio.gather(*tasks, return_exceptions=True)
    await publisher
    for key, value in counts.items():
        shared[key].value = value


def _child(args: argparse.Namespace, conns: int, shared: dict[str, Any], stop: Any) -> None:
    if uvloop is not None:
        uvloop.install()
    asyncio.run(_load(args, conns, shared, stop))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("-c", "--conns", type=int, default=100)
    ap.add_argument("-s", "--size", type=int, default=64)
    ap.add_argument("-p", "--pipeline", type=int, default=1)
    ap.add_argument("-d", "--duration", type=float, default=4.0)
    ap.add_argument("-w", "--warmup", type=float, default=1.0)
    ap.add_argument("--procs", type=int, default=1)
    ap.add_argument("--churn", action="store_true")
    ap.add_argument("--hold", type=int, default=0)
    ap.add_argument("--src", type=int, default=1, help="accepted for loadgen.py compatibility; unused")
    ap.add_argument("--seed", type=int, default=1, help="accepted for loadgen.py compatibility; unused")
    args = ap.parse_args()
    procs = max(1, args.procs)
    total = args.hold or args.conns
    stop = multiprocessing.Event()
    keys = ("msgs", "bytes", "conns", "errors", "mismatched", "held")
    shares = [{k: multiprocessing.RawValue("q", 0) for k in keys} for _ in range(procs)]
    workers = [
        multiprocessing.Process(
            target=_child, args=(args, total // procs + (i < total % procs), shares[i], stop)
        )
        for i in range(procs)
    ]
    for w in workers:
        w.start()

    def total_of(key: str) -> int:
        return sum(int(s[key].value) for s in shares)

    cpu0 = time.process_time()
    if args.hold:
        deadline = time.monotonic() + 120
        while total_of("held") + total_of("errors") < args.hold and time.monotonic() < deadline:
            time.sleep(0.05)
        print(f"HOLDING {total_of('held')}", file=sys.stderr, flush=True)
        time.sleep(args.duration)
        window = 0.0
        before = after = dict.fromkeys(keys, 0)
    else:
        time.sleep(args.warmup)
        before = {k: total_of(k) for k in keys}
        print("MEASURE start", file=sys.stderr, flush=True)
        start = time.monotonic()
        time.sleep(args.duration)
        after = {k: total_of(k) for k in keys}
        print("MEASURE end", file=sys.stderr, flush=True)
        window = time.monotonic() - start
    stop.set()
    for w in workers:
        w.join(30)
        if w.is_alive():
            w.kill()
    out: dict[str, Any] = {"errors": total_of("errors"), "mismatched_bytes": total_of("mismatched")}
    if args.hold:
        out["held"] = total_of("conns")
    elif window > 0:
        diff = {k: after[k] - before[k] for k in keys}
        out.update(
            msgs_per_s=round(diff["msgs"] / window, 1),
            mib_per_s=round(diff["bytes"] / window / 2**20, 2),
            conns_per_s=round(diff["conns"] / window, 1),
        )
    out["client_cpu_pct"] = (
        round(100 * (time.process_time() - cpu0) / max(window, 1e-6), 1) if window else None
    )
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
