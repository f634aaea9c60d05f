"""glibc's malloc without fastbins (mallopt M_MXFAST = 0) in a worker process.

Each echo's `os.read(fd, read_size)` mallocs read_size + 33 bytes (64 KiB by default: beyond
pymalloc, so glibc's) and shrinks it to the data read. Those small chunks are freed one per message,
past tcache's 7 per size into a fastbin, and glibc consolidates the fastbins on every malloc of 1 KiB
or more: on the next read's. That pass (malloc_consolidate) was the compiled worker's costliest
user-space function, 0.07 us of 0.63 us user time per 64-byte message (perf, small scenario; uprobes
counted one call per os.read, none with fastbins off). Without fastbins a freed chunk goes to the
ordinary bins at once. Python's own small objects come from pymalloc, not from here.
"""

from __future__ import annotations

import ctypes

_M_MXFAST = 1  # <malloc.h>


def no_fastbins() -> None:
    """Turn glibc's fastbins off in this process; not glibc (no mallopt): nothing to do."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MXFAST, 0)
    except (OSError, AttributeError):
        pass
