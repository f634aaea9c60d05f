#!/usr/bin/env python3
"""Blocking IO, one thread per connection: the main thread blocks in accept(); each connection's thread
blocks in read() (the kernel parks it on that socket's wait queue until data arrives) and then in write().

No readiness API at all: waiting is per thread, so an idle connection costs a sleeping thread (its stack
and kernel task), not CPU. Python threads run Python code one at a time (the GIL), but they release it in
every blocking read and write.

    python bench/io_models/server_threads.py --port 7100
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import common


def extra_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--stack-kib", type=int, default=256, help="thread stack size (default 256 KiB)")


def serve(fd: int, size: int) -> None:
    try:
        while True:
            data = os.read(fd, size)  # blocks until the client sends something (or closes)
            if not data:
                break
            while data:  # a blocking write returns once the kernel took all of it (or on a signal)
                n = os.write(fd, data)
                data = data[n:]
    except OSError:
        pass
    finally:
        os.close(fd)


def main() -> None:
    args = common.options(__doc__, extra_options)
    threading.stack_size(args.stack_kib * 1024)
    lsock = common.listen(args, blocking=True, extra_stats=lambda: {"threads": threading.active_count() - 1})
    size = args.read_size
    while True:
        try:
            conn, _addr = lsock.accept()
        except OSError:  # ECONNABORTED (that client is gone), EMFILE: do not spin on it
            time.sleep(0.01)
            continue
        fd = conn.detach()
        try:
            threading.Thread(target=serve, args=(fd, size), daemon=True).start()
        except RuntimeError as exc:  # can't start new thread: out of tasks (pids limit) or memory
            common.refuse(fd, f"no thread for it: {exc}")


if __name__ == "__main__":
    main()
