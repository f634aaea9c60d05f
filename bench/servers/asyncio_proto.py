"""Baseline echo server: an asyncio Protocol on the standard-library event loop.

`data_received -> transport.write`, nothing else: the floor any asyncio-based echo server sits on.
uvloop_proto.py runs this same Protocol on uvloop's loop.

    python bench/servers/asyncio_proto.py --host 127.0.0.1 --port 7100 [--backlog 4096]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
from collections.abc import Callable


class EchoProtocol(asyncio.Protocol):
    __slots__ = ("transport",)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # asyncio sets TCP_NODELAY on TCP transports itself

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


def raise_nofile() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: 10,000 held connections need more than 1024 fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def parse_args(description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--backlog", type=int, default=4096, help="listen backlog (asyncio's default is 100)")
    return ap.parse_args()


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    server = await loop.create_server(EchoProtocol, args.host, args.port, backlog=args.backlog)
    try:
        await stop
    finally:
        server.close()


def main(
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None, description: str = __doc__ or ""
) -> None:
    args = parse_args(description.splitlines()[0])
    raise_nofile()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(args))


if __name__ == "__main__":
    main()
