#!/usr/bin/env python3
"""IO multiplexing with poll(2): one loop, non-blocking sockets, one read per ready connection per turn.

No descriptor-number cap: the interest set is an array of struct pollfd, as long as the caller likes (up
to RLIMIT_NOFILE). But every call still copies the whole array into the kernel, which checks every entry
(and, when it has to sleep, hooks a wait-queue entry onto every socket and unhooks them all on wake-up), so
a call costs O(watched descriptors) however few are ready. CPython keeps the array between calls and
rebuilds it only after register/modify/unregister.

    python bench/io_models/server_poll.py --port 7102
"""

from __future__ import annotations

import os
import select

import common
from common import CALLS, EVENTS

POLLIN, POLLOUT = select.POLLIN, select.POLLOUT


def main() -> None:
    args = common.options(__doc__)
    lsock = common.listen(args)
    lfd, size, counts = lsock.fileno(), args.read_size, common.counts
    poller = select.poll()
    poller.register(lfd, POLLIN)
    pending: dict[int, bytes] = {}

    def close(fd: int) -> None:
        poller.unregister(fd)
        pending.pop(fd, None)
        os.close(fd)

    while True:
        events = poller.poll()
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
                    poller.register(cfd, POLLIN)
                continue
            if fd in pending:  # waiting for POLLOUT (or POLLERR/POLLHUP, which the write reports)
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
                    poller.modify(fd, POLLIN)
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
                poller.modify(fd, POLLOUT)


if __name__ == "__main__":
    main()
