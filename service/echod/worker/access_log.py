"""The access log: one line per closed connection, written so that it can never block the loop.

Lines gather in `lines` and go out once per loop turn (worker/loop.py) in as few `write`s as fit:
complete lines only, on a descriptor opened with O_APPEND, so lines from several workers never
interleave; through a pipe or FIFO a write is at most PIPE_BUF bytes, which the kernel writes whole or
not at all. The descriptor is non-blocking: when the file cannot keep up (a FIFO nobody reads, a full
disk) the turn's lines are dropped and counted (echod_access_log_dropped_lines_total), and the echo goes
on. A write cut short mid-line keeps that line's tail to go first next time, so no line is torn.

"-" means the service log's stream: its file (log.file), else stderr, opened anew through
/proc/self/fd/2 so that O_NONBLOCK stays ours (a pipe the master also writes to must keep blocking for
it); a socket (the journal's stream) cannot be opened that way and is sent to with MSG_DONTWAIT.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import stat
import time
from collections.abc import Callable
from typing import Final

from .. import histograms, tcpinfo
from ..tcpinfo import CWND, MIN_RTT, PMTU, RATE, RETRANSMITS, RTT, RTTVAR

log = logging.getLogger("echod.worker")

FLAGS = os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC
MODE = 0o640
FILE_CHUNK = 1 << 20  # bytes per write to a regular file: whole turns' worth in one
PIPE_BUF = select.PIPE_BUF  # the most a pipe takes atomically


class AccessLog:
    def __init__(self, path: str, fmt: str, service_log: str, counts: list[int], worker: int) -> None:
        self.worker = worker  # our slot
        self.path = service_log if path == "-" else path
        self.stderr = path == "-" and not service_log
        self.json = fmt == "json"
        self.format = _json if self.json else _text
        self.counts = counts  # the insight block: ACCESS_LOG_DROPPED
        self.lines: list[str] = []  # this turn's, bound by the loop: never rebound
        self.fd = -1
        self.sock: socket.socket | None = None  # "-" on a socket: sent to with MSG_DONTWAIT
        self.chunk = FILE_CHUNK
        self.carry = b""  # the tail of a line a short write cut
        self.failing = False  # an open failure was logged; the next success is too
        self.second = -1
        self.stamp = ""

    # -- the file ---------------------------------------------------------------------------------
    def open(self) -> None:
        try:
            if self.stderr:
                self._open_stderr()
            else:
                self.fd = os.open(self.path, FLAGS | os.O_CREAT, MODE)
        except OSError as exc:  # ENXIO: a FIFO nobody has open for reading yet
            if not self.failing:
                log.warning("cannot open access log %r (%s): dropping its lines until it opens",
                            self.path or "stderr", exc.strerror)  # fmt: skip
            self.failing = True
            return
        if self.failing:
            log.info("access log %r open again", self.path or "stderr")
            self.failing = False
        self.carry = b""
        self.chunk = FILE_CHUNK if stat.S_ISREG(os.fstat(self._fileno()).st_mode) else PIPE_BUF

    def _open_stderr(self) -> None:
        try:
            self.fd = os.open("/proc/self/fd/2", FLAGS)
        except OSError:  # a socket: share the descriptor, never its blocking mode
            self.sock = socket.socket(fileno=os.dup(2))

    def _fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else self.fd

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def reopen(self) -> None:
        """SIGUSR1 (logrotate): write on to a fresh file of the same name."""
        self.flush()
        self.close()
        self.open()

    def retry(self) -> None:
        """Once a second: a FIFO nobody read may have a reader now."""
        if self.fd < 0 and self.sock is None:
            self.open()

    # -- lines ------------------------------------------------------------------------------------
    def add(
        self,
        listener: str,
        client: str,  # HOST:PORT, or a bare address (a PROXY client handed over without its port)
        duration_us: int,
        bytes_in: int,
        bytes_out: int,
        reason: str,
        tcp: tuple[int, ...] | None,  # tcpinfo.values()
    ) -> None:
        now = _time()
        second = int(now)
        if second != self.second:  # one strftime a second
            self.second = second
            self.stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        ms = int((now - second) * 1000)
        if self.json and tcp is not None and tcp[MIN_RTT] >= 0 and tcp[RATE] >= 0:  # Linux >= 4.9
            self.lines.append(
                _json_line(
                    self.stamp,
                    ms,
                    self.worker,
                    listener,
                    client,
                    duration_us,
                    bytes_in,
                    bytes_out,
                    reason,
                    tcp,
                )
            )
            return
        head = (self.stamp, ms, self.worker, listener, client, duration_us / 1e6, bytes_in, bytes_out, reason)
        self.lines.append(self.format(head, tcp))

    def flush(self) -> None:
        lines = self.lines
        if not lines:
            return
        write = self._writer()
        count = len(lines)
        if write is None or (self.carry and not self._write_carry(write)):
            self._drop(count)
            return
        data = "".join(lines).encode()
        lines.clear()
        at, size = 0, len(data)
        while at < size:
            end = at + self.chunk
            if end < size:  # whole lines only
                end = data.rfind(b"\n", at, end) + 1 or data.find(b"\n", at) + 1
            try:
                n = write(data[at:end])
            except BlockingIOError:
                n = 0
            except OSError as exc:  # ENOSPC, EIO; EPIPE: the reader went away, reopen later
                if not self.failing:
                    log.warning("access log %r: %s: dropping lines", self.path or "stderr", exc.strerror)
                    self.failing = True
                if exc.errno != errno.ENOSPC:  # a full disk may clear; anything else: open it again
                    self.close()
                n = 0
            if n < end - at:
                cut = at + n
                tail = cut if n == 0 or data[cut - 1] == 10 else data.find(b"\n", cut) + 1
                self.carry = data[cut:tail]
                self._drop(data.count(b"\n", tail))
                return
            at = end

    def _writer(self) -> Callable[[bytes], int] | None:
        if self.sock is not None:
            send = self.sock.send
            return lambda data: send(data, socket.MSG_DONTWAIT)
        if self.fd < 0:
            return None
        fd = self.fd
        return lambda data: os.write(fd, data)

    def _write_carry(self, write: Callable[[bytes], int]) -> bool:
        try:
            n = write(self.carry)
        except OSError:
            return False
        self.carry = self.carry[n:]
        return not self.carry

    def _drop(self, count: int) -> None:
        self.lines.clear()
        self.counts[histograms.ACCESS_LOG_DROPPED] += count


_time: Final = time.time  # compiled, a C static: no lookup in the time module per line

# ts (to the second), its milliseconds, worker .. reason: the order of the fields.
Head = tuple[str, int, int, str, str, float, int, int, str]

# The other lines (text, a kernel without every TCP field, no TCP_INFO): one %-format per line, not
# f-strings or json.dumps (1.4 us against 1.7 and 3x that, interpreted). Every value is a number or an
# address/reason text that needs no escaping.
_JSON: Final = (
    '{"ts":"%s.%03dZ","worker":%d,"listener":"%s","client":"%s","duration_s":%.6f,"bytes_in":%d,'
    '"bytes_out":%d,"reason":"%s"'
)
_TEXT: Final = "%s.%03dZ worker=%d listener=%s client=%s duration_s=%.6f bytes_in=%d bytes_out=%d reason=%s"


def _json_line(
    stamp: str,
    ms: int,
    worker: int,
    listener: str,
    client: str,
    duration_us: int,
    bytes_in: int,
    bytes_out: int,
    reason: str,
    tcp: tuple[int, ...],  # every field there
) -> str:
    """The JSON line of nearly every connection: the text _json writes for the same values, which
    tests/test_units.py holds it to.

    Pieces joined, not one %-format: compiled, str() of an int is a direct C call and this costs
    0.64 us against 1.32 for a %-format of the line's 16 conversions (interpreted it is 1.63 against
    1.38; the compiled build is the one deploy/install.sh installs). Zero-padding by slicing a sum."""
    return "".join((
        '{"ts":"', stamp, ".", str(1000 + ms)[1:], 'Z","worker":', str(worker), ',"listener":"', listener,
        '","client":"', client, '","duration_s":', str(duration_us // 1_000_000), ".",
        str(1_000_000 + duration_us % 1_000_000)[1:], ',"bytes_in":', str(bytes_in), ',"bytes_out":',
        str(bytes_out), ',"reason":"', reason, '","rtt_us":', str(tcp[RTT]), ',"rttvar_us":',
        str(tcp[RTTVAR]), ',"min_rtt_us":', str(tcp[MIN_RTT]), ',"retransmits":', str(tcp[RETRANSMITS]),
        ',"snd_cwnd":', str(tcp[CWND]), ',"pmtu":', str(tcp[PMTU]), ',"delivery_rate_bps":',
        str(tcp[RATE] * 8), "}\n",
    ))  # fmt: skip


def _json(h: Head, tcp: tuple[int, ...] | None) -> str:
    if tcp is None:
        return _JSON % h + "}\n"
    return _JSON % h + "".join(f',"{key}":{value}' for key, value in tcpinfo.log_fields(tcp).items()) + "}\n"


def _text(h: Head, tcp: tuple[int, ...] | None) -> str:
    fields = "" if tcp is None else "".join(f" {k}={v}" for k, v in tcpinfo.log_fields(tcp).items())
    return _TEXT % h + fields + "\n"


def host_port(address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
