"""Baseline TLS echo server: asyncio_proto.py's Protocol behind asyncio's SSL transport, on uvloop.

The same certificate, key and OpenSSL defaults (ciphers, session tickets) as echod's TLS listener in
run.py's tls_* scenarios: an SSLContext(PROTOCOL_TLS_SERVER) with load_cert_chain, nothing else.

python bench/servers/uvloop_tls.py --host 127.0.0.1 --port 7102 --cert CERT --key KEY [--backlog 4096]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import ssl
import sys

import uvloop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from asyncio_proto import EchoProtocol, raise_nofile


async def serve(args: argparse.Namespace) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    server = await loop.create_server(EchoProtocol, args.host, args.port, backlog=args.backlog, ssl=ctx)
    try:
        await stop
    finally:
        server.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--backlog", type=int, default=4096)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    args = ap.parse_args()
    raise_nofile()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args))


if __name__ == "__main__":
    main()
