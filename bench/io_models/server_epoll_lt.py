#!/usr/bin/env python3
"""IO multiplexing with level-triggered epoll(7): one loop, non-blocking sockets, one read per ready
connection per turn (echod's worker loop, stripped to the model).

The interest set lives in the kernel (epoll_ctl, once per connection); each socket's wake-up callback puts
its entry on the epoll instance's ready list, and epoll_wait only hands back that list. A call therefore
costs O(ready descriptors), not O(watched). Level-triggered: an entry that is still readable after being
reported goes back on the ready list and is reported again, so reading only once per turn loses nothing,
and a busy connection cannot starve the others.

    python bench/io_models/server_epoll_lt.py --port 7103
"""

from __future__ import annotations

import os
import select

import common
from common import CALLS, EVENTS

EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT


def main() -> None:
    args = common.options(__doc__)
    lsock = common.listen(args)
    lfd, size, counts = lsock.fileno(), args.read_size, common.counts
    ep = select.epoll()
    ep.register(lfd, EPOLLIN)
    pending: dict[int, bytes] = {}

    def close(fd: int) -> None:
        pending.pop(fd, None)
        os.close(fd)  # the last reference to the socket: the kernel drops it from the epoll set too

    while True:
        events = ep.poll(-1, 1024)
        counts[CALLS] += 1
        counts[EVENTS] += len(events)
        for fd, _ev in events:
            if fd == lfd:
                for _ in range(common.ACCEPT_BATCH):
                    try:
                        conn, _addr = lsock.accept()
                    except OSError:
                        break
                    cfd = conn.detach()
                    os.set_blocking(cfd, False)
                    ep.register(cfd, EPOLLIN)
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
                else:
                    del pending[fd]
                    ep.modify(fd, EPOLLIN)
                continue
            try:
                data = os.read(fd, size)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                close(fd)
                continue
            try:
                n = os.write(fd, data)
            except BlockingIOError:
                n = 0
            except OSError:
                close(fd)
                continue
            if n < len(data):
                pending[fd] = data[n:]
                ep.modify(fd, EPOLLOUT)


if __name__ == "__main__":
    main()
