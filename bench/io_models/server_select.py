#!/usr/bin/env python3
"""IO multiplexing with select(2): one loop, non-blocking sockets, one read per ready connection per turn.

Every call hands the kernel the whole interest set again (three bitmaps up to the highest descriptor) and
the kernel checks every descriptor in it, ready or not; the result overwrites the sets, so the caller
rebuilds them each turn (CPython does that from the lists). select() can only watch descriptors numbered
below FD_SETSIZE (1024, glibc's fd_set size; CPython raises ValueError beyond it). A connection accepted
on a higher descriptor is therefore closed at once, with a message on stderr: that is the model's cap.

    python bench/io_models/server_select.py --port 7101
"""

from __future__ import annotations

import os
import select

import common
from common import CALLS, EVENTS, FD_SETSIZE


def main() -> None:
    args = common.options(__doc__)
    lsock = common.listen(args)
    lfd, size, counts = lsock.fileno(), args.read_size, common.counts
    reading: set[int] = {lfd}  # watched for input: the listener and every connection without pending output
    writing: set[int] = set()  # watched for output: connections with pending output (not read meanwhile)
    pending: dict[int, bytes] = {}
    rlist: list[int] = [lfd]
    wlist: list[int] = []
    changed = False

    def close(fd: int) -> None:
        reading.discard(fd)
        writing.discard(fd)
        pending.pop(fd, None)
        os.close(fd)

    while True:
        if changed:
            rlist, wlist, changed = list(reading), list(writing), False
        readable, writable, _ = select.select(rlist, wlist, ())
        counts[CALLS] += 1
        counts[EVENTS] += len(readable) + len(writable)
        for fd in writable:
            if fd not in writing:
                continue
            data = pending[fd]
            try:
                n = os.write(fd, data)
            except BlockingIOError:
                continue
            except OSError:
                close(fd)
                changed = True
                continue
            if n < len(data):
                pending[fd] = data[n:]
            else:
                del pending[fd]
                writing.discard(fd)
                reading.add(fd)
                changed = True
        for fd in readable:
            if fd == lfd:
                for _ in range(common.ACCEPT_BATCH):
                    try:
                        conn, _addr = lsock.accept()
                    except OSError:  # BlockingIOError: none left; EMFILE, ECONNABORTED: try next turn
                        break
                    cfd = conn.detach()
                    if cfd >= FD_SETSIZE:
                        common.refuse(
                            cfd, f"descriptor {cfd} >= FD_SETSIZE ({FD_SETSIZE}): select() cannot watch it"
                        )
                        continue
                    os.set_blocking(cfd, False)
                    reading.add(cfd)
                    changed = True
                continue
            if fd not in reading:
                continue
            try:
                data = os.read(fd, size)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                close(fd)
                changed = True
                continue
            try:
                n = os.write(fd, data)
            except BlockingIOError:
                n = 0
            except OSError:
                close(fd)
                changed = True
                continue
            if n < len(data):  # the rest goes out when the socket is writable; read nothing meanwhile
                pending[fd] = data[n:]
                reading.discard(fd)
                writing.add(fd)
                changed = True


if __name__ == "__main__":
    main()
