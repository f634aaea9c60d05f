"""Idle-connection timer: a wheel of one-second buckets with lazy rescheduling.

The hot loop only stamps `last[fd] = tick` (one list store) when a connection moves bytes. Each
connection sits in exactly one bucket, keyed by the second its deadline would fall if it stayed idle
from the moment it was scheduled. When a bucket comes due, each of its connections is either expired or
moved to the bucket of its real deadline, so a busy connection is looked at about once per timeout
period, and the work per second is proportional to the connections that come due, never to all of them.
"""

from __future__ import annotations

from collections.abc import Iterator


class IdleWheel:
    def __init__(self, timeout: int, last: list[int], tick: int) -> None:
        self.timeout = timeout
        self.last = last  # shared with the worker: last[fd] = tick of the last traffic
        self.buckets: dict[int, set[int]] = {}
        self.due: dict[int, int] = {}
        self.swept = tick  # every bucket up to this tick has been processed

    def add(self, fd: int, tick: int) -> None:
        self._schedule(fd, tick + self.timeout)

    def _schedule(self, fd: int, deadline: int) -> None:
        self.due[fd] = deadline
        bucket = self.buckets.get(deadline)
        if bucket is None:
            bucket = self.buckets[deadline] = set()
        bucket.add(fd)

    def remove(self, fd: int) -> None:
        deadline = self.due.pop(fd, None)
        if deadline is not None:
            bucket = self.buckets.get(deadline)
            if bucket is not None:
                bucket.discard(fd)

    def expired(self, tick: int) -> Iterator[int]:
        """Yield (and forget) every fd idle for `timeout` seconds as of `tick`."""
        for second in range(self.swept + 1, tick + 1):
            bucket = self.buckets.pop(second, None)
            if not bucket:
                continue
            for fd in bucket:
                deadline = self.last[fd] + self.timeout
                if deadline <= tick:
                    del self.due[fd]
                    yield fd
                else:
                    self._schedule(fd, deadline)
        self.swept = max(self.swept, tick)

    def __len__(self) -> int:
        return len(self.due)
