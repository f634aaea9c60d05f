"""TLS connections on the worker's own epoll loop: handshake and echo, non-blocking, without threads.

Each connection is an `ssl.SSLObject` over two `ssl.MemoryBIO`s, fed by `os.read` and drained by
`os.write` on the bare descriptor, rather than a non-blocking `ssl.SSLSocket`, because:
- on a PROXY listener the header comes first in clear text, and whatever followed it in the same read
  is the start of the ClientHello: an SSLObject is handed those bytes, an SSLSocket cannot un-read them;
- every byte of ciphertext waiting to go out is in our own buffer (`TlsConn.out`), so the watermarks
  and max_buffered_bytes bound it like plain pending output, and `Core.buffered` shows it. An
  SSLSocket keeps unsent records inside OpenSSL, out of sight, and a partial SSL_write must be retried
  with the same buffer;
- it costs no more: a same-process ping-pong of 20,000 64-byte echoes took 8.5 us of server time per
  echo with a non-blocking SSLSocket, 10.6 us with an SSLObject whose read loop ended on
  SSLWantReadError, and 8.1-8.3 us once the loop stops when neither the BIO nor OpenSSL holds more
  (no exception per echo); 16 KiB echoes took 17-23 us either way (noise on a shared 2-core machine).

A TLS connection is always a `TlsConn` in the table, never None: the plain fast path (worker/loop.py)
never sees it, and neither do splice (a TLS stream is copied) nor handover, which passes only None and
`Conn` states (worker/handoff.py): TLS session state cannot move to another process, so a retiring
worker serves its TLS connections until they close or shutdown_timeout passes.
"""

from __future__ import annotations

import logging
import os
import ssl
import time

from .. import stats
from .core import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP, READING, Core, Owing
from .output import Watermarks

log = logging.getLogger("echod.worker")

HEADER = 5  # a TLS record header: type, version (2), length (2)


class TlsConn(Owing):
    """One TLS connection: its TLS state, its pending ciphertext, and where its input stands."""

    __slots__ = (
        "closing", "deadline", "eof", "head", "inbio", "mask", "need", "obj", "out", "outbio", "paused",
        "ready", "tls",
    )  # fmt: skip

    def __init__(self, tls: Tls, context: ssl.SSLContext, deadline: float) -> None:
        self.tls = tls
        self.inbio, self.outbio = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.inbio, self.outbio, server_side=True)
        self.deadline = deadline  # the handshake is overdue then
        self.ready = False  # handshake done
        self.out = bytearray()  # ciphertext the kernel has not taken yet
        self.paused = False  # not reading: `out` reached write_buffer_high (or the worker's budget)
        self.eof = False  # the client is done (close_notify or FIN): flush, close_notify, close
        self.closing = False  # a stop is closing it
        self.mask = READING  # the events registered for it
        # Record framing of the input, to tell a FIN at a record boundary (a half-close) from a
        # truncated record: bytes owed by the record in progress, and a partial header.
        self.need = 0
        self.head = b""

    def __len__(self) -> int:
        return len(self.out)

    def on_event(self, fd: int, ev: int) -> None:
        self.tls.on_event(fd, ev, self)

    def release(self) -> None:
        self.tls.active -= 1


class Tls:
    """The TLS connections of one worker."""

    def __init__(self, core: Core, marks: Watermarks, handshake_timeout: float) -> None:
        self.core = core
        self.high, self.low = marks.high, marks.low
        self.timeout = handshake_timeout
        self.handshaking: dict[int, TlsConn] = {}  # entries may outlive their connection (see expire)
        self.active = 0  # open TLS connections
        self.failures: dict[str, int] = {}  # reason -> count since the last report

    def start(self, fd: int, context: ssl.SSLContext, data: bytes = b"") -> None:
        """An adopted connection speaks TLS; `data` is what came after a PROXY header."""
        conn = TlsConn(self, context, time.monotonic() + self.timeout)
        self.core.table[fd] = conn
        self.handshaking[fd] = conn
        self.active += 1
        if data:
            self._frame(conn, data)
            conn.inbio.write(data)
            self._pump(fd, conn)

    # -- events ---------------------------------------------------------------------------------
    def on_event(self, fd: int, ev: int, conn: TlsConn) -> None:
        core = self.core
        if ev & EPOLLERR:
            if conn.ready:
                core.fail(fd)
            else:
                self.fail(fd, conn, "connection reset during handshake")
            return
        if ev & (EPOLLOUT | EPOLLHUP) and conn.out:
            self._flush(fd, conn)
            if core.table[fd] is not conn:
                return
        if ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP) and not (conn.paused or conn.eof):
            self._read(fd, conn)

    def _read(self, fd: int, conn: TlsConn) -> None:
        core = self.core
        try:
            data = os.read(fd, core.read_size)
        except BlockingIOError:
            return
        except OSError as exc:
            if conn.ready:
                core.close(fd, "error", exc)
            else:
                self.fail(fd, conn, f"{exc.strerror or exc} during handshake")
            return
        if data:
            core.last[fd] = core.tick
            self._frame(conn, data)
            conn.inbio.write(data)
        elif conn.need or conn.head:
            self.fail(fd, conn, "truncated record")
            return
        else:
            conn.inbio.write_eof()
        self._pump(fd, conn)

    @staticmethod
    def _frame(conn: TlsConn, data: bytes) -> None:
        """Follow the record boundaries through `data` (most reads of a long stream end mid-record)."""
        end = len(data)
        if conn.need >= end and not conn.head:
            conn.need -= end
            return
        if conn.head:
            data, pos, conn.head = conn.head + data, 0, b""
            end = len(data)
        else:
            pos = conn.need
        while pos + HEADER <= end:
            pos += HEADER + (data[pos + 3] << 8 | data[pos + 4])
        if pos >= end:
            conn.need = pos - end
        else:
            conn.need, conn.head = 0, data[pos:]

    def _pump(self, fd: int, conn: TlsConn) -> None:
        """Advance the handshake, then decrypt whatever is whole and encrypt it straight back."""
        core, obj, inbio = self.core, conn.obj, conn.inbio
        if not conn.ready:
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                if inbio.eof:
                    self.fail(fd, conn, "closed during handshake")
                else:
                    self._send(fd, conn)  # our handshake messages
                return
            except ssl.SSLError as exc:
                self.fail(fd, conn, _reason(exc))
                return
            conn.ready = True
            self.handshaking.pop(fd, None)
            core.counts[stats.TLS_HANDSHAKES_OK] += 1
        size, echoed = core.read_size, 0
        try:
            while True:
                chunk = obj.read(size)
                if not chunk:  # close_notify, or a FIN at a record boundary (OP_IGNORE_UNEXPECTED_EOF)
                    conn.eof = True
                    break
                echoed += len(chunk)
                obj.write(chunk)  # into the memory BIO: always whole
                if not (inbio.pending or obj.pending() or inbio.eof):
                    break  # nothing more is whole: ending here spares an SSLWantReadError per echo
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as exc:  # a bad record: nothing after it can be trusted
            self.fail(fd, conn, _reason(exc))
            return
        core.counts[stats.RECEIVED_BYTES] += echoed
        core.counts[stats.SENT_BYTES] += echoed  # encrypted; unsent ciphertext counts as dropped
        if conn.eof:
            _close_notify(conn)
        self._send(fd, conn)

    # -- output ---------------------------------------------------------------------------------
    def _send(self, fd: int, conn: TlsConn) -> None:
        """Send what TLS produced; keep what the kernel does not take; close a finished connection."""
        core = self.core
        if conn.outbio.pending:
            data = conn.outbio.read()
            if conn.out:  # already waiting for EPOLLOUT: keep the order
                n = 0
            else:
                try:
                    n = os.write(fd, data)
                except BlockingIOError:
                    n = 0
                except OSError as exc:
                    core.close(fd, "error", exc)
                    return
            if n != len(data):
                if not conn.out:
                    core.counts[stats.PARTIAL_WRITES] += 1
                conn.out += memoryview(data)[n:]
                core.buffered += len(data) - n
                if not conn.paused and (len(conn.out) >= self.high or core.over_budget()):
                    conn.paused = True
                    core.counts[stats.BACKPRESSURE_PAUSES] += 1
        if conn.eof and not conn.out:
            core.close(fd, "shutdown" if conn.closing else "client")
            return
        self._arm(fd, conn)

    def _flush(self, fd: int, conn: TlsConn) -> None:
        core = self.core
        try:
            n = os.write(fd, conn.out)
        except BlockingIOError:
            return
        except OSError as exc:
            core.close(fd, "error", exc)
            return
        del conn.out[:n]
        core.buffered -= n
        if n:
            core.last[fd] = core.tick
        if not conn.out and conn.eof:
            core.close(fd, "shutdown" if conn.closing else "client")
            return
        # Drained, it reads again whatever the worker's budget says, as a plain connection does
        # (worker/echo.py): paused with nothing pending, nothing would ever arm it again.
        if conn.paused and (not conn.out or (len(conn.out) <= self.low and not core.over_budget())):
            conn.paused = False
        self._arm(fd, conn)

    def _arm(self, fd: int, conn: TlsConn) -> None:
        """Register what the connection waits for now, with one epoll_ctl only when that changes."""
        mask = (0 if conn.paused or conn.eof else READING) | (EPOLLOUT if conn.out else 0)
        if mask != conn.mask:
            conn.mask = mask
            self.core.ep.modify(fd, mask)

    # -- failures, timeouts, a stop ---------------------------------------------------------------
    def fail(self, fd: int, conn: TlsConn, reason: str) -> None:
        """Close a connection whose TLS failed, sending the alert OpenSSL wrote (best effort)."""
        if not conn.ready:
            self.core.counts[stats.TLS_HANDSHAKES_FAILED] += 1
            self.handshaking.pop(fd, None)
        self.failures[reason] = self.failures.get(reason, 0) + 1
        if conn.outbio.pending and not conn.out:
            try:
                os.write(fd, conn.outbio.read())
            except OSError:
                pass
        self.core.close(fd, "tls")

    def expire(self, now: float) -> None:
        """Close the connections whose handshake is overdue: a client that stalls costs no CPU before."""
        table = self.core.table
        for fd, conn in list(self.handshaking.items()):
            if table[fd] is not conn:  # closed meanwhile (idle timeout, a stop)
                del self.handshaking[fd]
            elif now >= conn.deadline:
                self.fail(fd, conn, "handshake timed out")

    def report(self) -> None:
        """One log line a second at most, whatever the number of failures."""
        if self.failures:
            reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.failures.items()))
            log.warning("%d TLS connections failed: %s", sum(self.failures.values()), reasons)
            self.failures.clear()

    def begin_close(self) -> None:
        """A stop: flush what was echoed, send close_notify, close; a handshake in progress just ends."""
        core = self.core
        for fd, state in enumerate(core.table):
            if isinstance(state, TlsConn):
                if not state.ready:
                    core.close(fd, "shutdown")
                    continue
                state.closing = state.eof = True
                _close_notify(state)
                self._send(fd, state)

    def close_all(self) -> None:
        core = self.core
        for fd, state in enumerate(core.table):
            if isinstance(state, TlsConn):
                core.close(fd, "shutdown")


def _close_notify(conn: TlsConn) -> None:
    try:
        conn.obj.unwrap()  # writes our close_notify to the outgoing BIO
    except ssl.SSLError:
        pass  # SSLWantReadError: the client's close_notify has not come (a FIN instead); ours is out


def _reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or type(exc).__name__).lower().replace("_", " ")
