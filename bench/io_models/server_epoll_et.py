#!/usr/bin/env python3
"""IO multiplexing with edge-triggered epoll(7) (EPOLLET): one loop, non-blocking sockets.

Each connection is registered once, for EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, and never modified:
an edge-triggered entry is reported when the socket's state changes (new data, send space after the send
buffer was full), and not again until it changes once more. Whatever input is left unread after a report
gets no new report, so the loop must remember it.

--max-reads 0 (the default) is the canonical way, epoll(7)'s "wait for an event only after read or write
return EAGAIN": read until EAGAIN. It costs one extra read per report (the one that finds nothing), and a
connection whose client sends faster than the server reads never reaches EAGAIN, so that one connection
keeps the loop and every other connection (and the listening socket) waits: the starvation that epoll(7)
lists among its pitfalls.

--max-reads N is the cure epoll(7) suggests: at most N reads per connection per turn; connections that
did not reach EAGAIN stay on a user-space ready list, served round-robin, and epoll_wait is called with a
zero timeout while that list is not empty.

--short-read-stops also ends a connection's turn when a read returns fewer bytes than asked for: on a
stream socket that means the receive queue was empty at that moment, and new data will raise a new edge
(epoll(7), Q&A 9), so the EAGAIN read can be skipped. Not when the report carried EPOLLRDHUP, though: a
FIN that arrived with the data raises no new edge, and only the next read (returning 0) would see it.

    python bench/io_models/server_epoll_et.py --port 7104 [--max-reads 1] [--short-read-stops]
"""

from __future__ import annotations

import argparse
import os
import select

import common
from common import CALLS, EAGAIN, EVENTS

EPOLLIN, EPOLLOUT, EPOLLRDHUP, EPOLLET = select.EPOLLIN, select.EPOLLOUT, select.EPOLLRDHUP, select.EPOLLET
EPOLLHUP = select.EPOLLHUP
CONN_EVENTS = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET


def extra_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--max-reads", type=int, default=0, help="reads per connection per turn; 0 = until EAGAIN (default)"
    )
    ap.add_argument("--short-read-stops", action="store_true", help="a short read also ends the turn")


def main() -> None:
    args = common.options(__doc__, extra_options)
    lsock = common.listen(args)
    lfd, size, counts = lsock.fileno(), args.read_size, common.counts
    budget = args.max_reads if args.max_reads > 0 else -1  # -1: never runs out
    short_stops = args.short_read_stops
    ep = select.epoll()
    ep.register(lfd, EPOLLIN)  # the listening socket stays level-triggered, as in the other models
    pending: dict[int, bytes] = {}
    ready: dict[int, int] = {}  # fd -> events, for connections that may still have input (round robin)

    def close(fd: int) -> None:
        pending.pop(fd, None)
        ready.pop(fd, None)
        os.close(fd)

    def serve(fd: int, ev: int) -> bool:
        """Read and echo up to the budget; True if the connection may still have input left."""
        left = budget
        short_ends = short_stops and not ev & (EPOLLRDHUP | EPOLLHUP)
        while left:
            left -= 1
            try:
                data = os.read(fd, size)
            except BlockingIOError:
                counts[EAGAIN] += 1
                return False
            except OSError:
                data = b""
            if not data:
                close(fd)
                return False
            try:
                n = os.write(fd, data)
            except BlockingIOError:
                n = 0
            except OSError:
                close(fd)
                return False
            if n < len(data):  # EPOLLOUT's edge brings us back; read nothing until then
                pending[fd] = data[n:]
                return False
            if short_ends and len(data) < size:
                return False
        return True

    while True:
        events = ep.poll(0 if ready else -1, 1024)
        counts[CALLS] += 1
        counts[EVENTS] += len(events)
        for fd, ev in events:
            if fd == lfd:
                for _ in range(common.ACCEPT_BATCH):
                    try:
                        conn, _addr = lsock.accept()
                    except OSError:
                        break
                    cfd = conn.detach()
                    os.set_blocking(cfd, False)
                    ep.register(cfd, CONN_EVENTS)
                continue
            if fd in pending:
                data = pending[fd]
                try:
                    n = os.write(fd, data)
                except BlockingIOError:
                    continue
                except OSError:
                    close(fd)
                    continue
                if n < len(data):
                    pending[fd] = data[n:]
                    continue
                del pending[fd]  # all out: the input that waited meanwhile is read now
            ready[fd] = ready.get(fd, 0) | ev
        for fd, ev in list(ready.items()):
            del ready[fd]
            if serve(fd, ev):
                ready[fd] = ev  # to the back of the list: the others get their turn first


if __name__ == "__main__":
    main()
