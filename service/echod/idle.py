"""Idle-connection timer: a wheel of one-second buckets with lazy rescheduling.

The hot loop only stamps `last[fd] = tick` (one list store) when a connection moves bytes. Each
connection sits in exactly one bucket, keyed by the second its deadline would fall if it stayed idle
from the moment it was scheduled. When a bucket comes due, each of its connections is either expired or
moved to the bucket of its real deadline, so a busy connection is looked at about once per timeout
period, and the work per second is proportional to the connections that come due, never to all of them.

Memory: 8 bytes of `due` per descriptor and 4 bytes a bucket entry, in arrays, so no Python object
per connection. A dict of deadlines and a set per bucket held 158 B per idle connection (tracemalloc,
10,000 connections; now 14), most of what echod kept per connection (bench/README.md, rss). Removing
is one store (due[fd] = 0): the entry is skipped when its bucket comes due, and a bucket that has grown
4x since its last compaction drops its stale entries, so memory stays proportional to the open
connections, however fast they come and go.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

_SLACK = 256  # entries a bucket may hold beyond 4x its live ones before it is compacted


class _Bucket:
    __slots__ = ("fds", "limit")

    def __init__(self) -> None:
        self.fds = array("i")  # may hold stale entries: an fd counts here only while due[fd] is ours
        self.limit = _SLACK  # compact when fds grows past this

    def compact(self, second: int, due: array[int]) -> None:
        """Drop stale and repeated entries; the next compaction waits until the bucket grows 4x, so
        each costs less than the appends since the last one."""
        keep = dict.fromkeys(fd for fd in self.fds if due[fd] == second)  # in order, once each
        self.fds = array("i", keep)
        self.limit = 4 * len(self.fds) + _SLACK


class IdleWheel:
    def __init__(self, timeout: int, last: list[int], tick: int) -> None:
        self.timeout = timeout
        self.last = last  # shared with the worker: last[fd] = tick of the last traffic
        self.buckets: dict[int, _Bucket] = {}
        self.due = array("q")  # fd -> the second of its bucket; 0 = not in the wheel
        self.swept = tick  # every bucket up to this tick has been processed

    def add(self, fd: int, tick: int) -> None:
        due = self.due
        if fd >= len(due):
            due.frombytes(bytes(8 * max(fd + 1 - len(due), len(due))))
        self._schedule(fd, tick + self.timeout)

    def _schedule(self, fd: int, deadline: int) -> None:
        self.due[fd] = deadline  # any earlier entry of fd is stale from now on
        bucket = self.buckets.get(deadline)
        if bucket is None:
            bucket = self.buckets[deadline] = _Bucket()
        fds = bucket.fds
        fds.append(fd)
        if len(fds) > bucket.limit:
            bucket.compact(deadline, self.due)

    def remove(self, fd: int) -> None:
        """Forget fd: one store (its bucket entry is skipped or compacted away later)."""
        if fd < len(self.due):
            self.due[fd] = 0

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
                    yield fd
                else:
                    self._schedule(fd, deadline)
        self.swept = max(self.swept, tick)

    def __len__(self) -> int:
        """Connections in the wheel (a scan: for tests and reports, never per event)."""
        return sum(1 for second in self.due if second)
