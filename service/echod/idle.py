"""Idle-connection timer: a wheel of one-second buckets with lazy rescheduling.

The hot loop only stamps `last[fd] = tick` (one list store) when a connection moves bytes. Each
connection sits in exactly one bucket, keyed by the second its deadline would fall if it stayed idle
from the moment it was scheduled. When a bucket comes due, each of its connections is either expired or
moved to the bucket of its real deadline, so a busy connection is looked at about once per timeout
period, and the work per second is proportional to the connections that come due, never to all of them.

Memory: 8 bytes of `due` per descriptor and 4 bytes a bucket entry, in arrays, so no Python object
per connection. A dict of deadlines and a set per bucket held 158 B per idle connection (tracemalloc,
10,000 connections), most of what echod kept per connection (bench/README.md, rss). A removed
connection is only marked (due[fd] = 0); its entry is skipped when the bucket comes due, and a bucket
is compacted when its stale entries outnumber its live ones, so memory stays proportional to the
open connections, however fast they come and go.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

_SLACK = 32  # stale entries a bucket may hold beyond its live ones before it is compacted


class _Bucket:
    __slots__ = ("fds", "live")

    def __init__(self) -> None:
        self.fds = array("i")  # may hold stale entries: an fd counts here only while due[fd] is ours
        self.live = 0


class IdleWheel:
    def __init__(self, timeout: int, last: list[int], tick: int) -> None:
        self.timeout = timeout
        self.last = last  # shared with the worker: last[fd] = tick of the last traffic
        self.buckets: dict[int, _Bucket] = {}
        self.due = array("q")  # fd -> the second of its bucket; 0 = not in the wheel
        self.count = 0
        self.swept = tick  # every bucket up to this tick has been processed

    def add(self, fd: int, tick: int) -> None:
        due = self.due
        if fd >= len(due):
            due.frombytes(bytes(8 * max(fd + 1 - len(due), len(due))))
        if due[fd]:
            self.remove(fd)
        self.count += 1
        self._schedule(fd, tick + self.timeout)

    def _schedule(self, fd: int, deadline: int) -> None:
        self.due[fd] = deadline
        bucket = self.buckets.get(deadline)
        if bucket is None:
            bucket = self.buckets[deadline] = _Bucket()
        bucket.fds.append(fd)
        bucket.live += 1

    def remove(self, fd: int) -> None:
        due = self.due
        if fd >= len(due):
            return
        deadline = due[fd]
        if not deadline:
            return
        due[fd] = 0
        self.count -= 1
        bucket = self.buckets.get(deadline)
        if bucket is None:
            return
        bucket.live -= 1
        if len(bucket.fds) > 2 * bucket.live + _SLACK:
            keep = dict.fromkeys(f for f in bucket.fds if due[f] == deadline)  # in order, once each
            bucket.fds = array("i", keep)

    def expired(self, tick: int) -> Iterator[int]:
        """Yield (and forget) every fd idle for `timeout` seconds as of `tick`."""
        due, last = self.due, self.last
        for second in range(self.swept + 1, tick + 1):
            bucket = self.buckets.pop(second, None)
            if bucket is None:
                continue
            for fd in bucket.fds:
                if due[fd] != second:  # removed, or already moved on from this bucket
                    continue
                deadline = last[fd] + self.timeout
                if deadline <= tick:
                    due[fd] = 0
                    self.count -= 1
                    yield fd
                else:
                    self._schedule(fd, deadline)
        self.swept = max(self.swept, tick)

    def __len__(self) -> int:
        return self.count
