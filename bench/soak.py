#!/usr/bin/env python3
"""echod soak test: mixed load against a spawned daemon while it is reloaded, scaled, upgraded and has its
workers killed, for `--minutes` (10 by default). Not part of CI: `make soak`, or

    .venv/bin/python bench/soak.py                     # 10 minutes
    .venv/bin/python bench/soak.py --minutes 1         # a quick check
    .venv/bin/python bench/soak.py --minutes 60 --workers 4 --long 64

Load (all on 127.0.0.1, every echoed byte compared with what was sent):
  long-lived   --long connections doing ping-pong with random payloads (mostly small, now and then 64 KiB)
  short        --short threads, each looping: connect, send 1 B..16 KiB, read the echo, half-close, EOF
  slow readers --slow connections that send continuously but read only 32 KiB twice a second (backpressure)
  floods       --floods duplex connections streaming at --flood-mib MiB/s each, re-opened every 30 s with a
               half-close that must return everything still in flight

Chaos (one event at a time; after each, echod must settle: the expected workers, reloads finished):
  SIGHUP reload every --reload-every s (the file alternates idle_timeout 300/299), SIGKILL of one random
  worker every --kill-every s, SIGTTIN then SIGTTOU at 30 % of the run, one SIGUSR2 in-place upgrade at 55 %.

Before a kill the victim is SIGSTOPped and its connections are read from /proc (its socket inodes matched
against /proc/net/tcp), so a failure on a connection that the killed worker owned is counted separately as
expected; every other failure (reset, refused, stall, wrong bytes, early EOF) is unexpected.

A progress line every 10 s: connections, verified bytes, failures, RSS of the whole daemon (master, workers,
metrics process) and echod_buffered_bytes. At the end: a tally, echod's own counters checked against what was
done (restarts == kills, successful reloads == reloads sent, the final stop exits cleanly, no traceback in the
log), and the RSS drift between the first and the last minute (a third of the run when shorter).
Exit status 0 only when nothing unexpected happened.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
KIB, MIB = 1024, 1024 * 1024
STALL = 20.0  # seconds: an echo (or connect) that takes longer is a failure
SETTLE = 60.0  # seconds echod has to settle after a chaos event
PRIME = 1_000_003  # stream pattern period
CHUNK = 64 * KIB  # longest slice of the pattern sent or compared at once
PATTERN = random.Random(862).randbytes(PRIME) * 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


# -- bookkeeping ------------------------------------------------------------------------------------------


@dataclass
class Kill:
    at: float
    pid: int
    ports: set[int]


@dataclass
class Failure:
    at: float
    who: str
    kind: str
    detail: str
    killed: bool  # on a connection owned by a worker we killed: expected

    def __str__(self) -> str:
        return f"[{self.at:7.1f}s] {self.who}: {self.kind}: {self.detail}"


@dataclass
class Tally:
    started: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    opened: int = 0  # connections opened
    clean: int = 0  # connections that ended with the full echo and EOF
    bytes: int = 0  # echoed bytes verified
    echoes: int = 0  # long-lived round trips
    failures: list[Failure] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.started

    def add(self, opened: int = 0, clean: int = 0, nbytes: int = 0, echoes: int = 0) -> None:
        with self.lock:
            self.opened += opened
            self.clean += clean
            self.bytes += nbytes
            self.echoes += echoes

    def fail(self, who: str, kind: str, detail: str, port: int, since: float) -> None:
        """Record a failure of a connection from local `port` opened at `since` (seconds into the run)."""
        at = self.now()
        with self.lock:
            killed = any(k.at >= since and port in k.ports for k in self.kills)
            self.failures.append(Failure(at, who, kind, detail, killed))

    def counts(self) -> tuple[int, int]:
        with self.lock:
            killed = sum(1 for f in self.failures if f.killed)
            return len(self.failures) - killed, killed


def classify(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return "reset"
    if isinstance(exc, TimeoutError):
        return "stall"
    if isinstance(exc, EOFError):
        return "eof"
    if isinstance(exc, ValueError):
        return "mismatch"
    return "error"


def connect(timeout: float = STALL, small: bool = False) -> socket.socket:
    """A client socket; `small`: small kernel buffers and MSS, so that echod itself holds the backlog
    (on loopback its socket buffers autotune to megabytes from the 64 KiB MSS otherwise)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if small:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * KIB)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * KIB)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1460)
    sock.settimeout(timeout)
    try:
        sock.connect((HOST, Load.port))
    except OSError:
        sock.close()
        raise
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, size: int, deadline: float) -> bytes:
    data = bytearray()
    while len(data) < size:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{len(data)} of {size} bytes after {STALL:g} s")
        sock.settimeout(left)
        chunk = sock.recv(min(MIB, size - len(data)))
        if not chunk:
            raise EOFError(f"EOF after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def expect_eof(sock: socket.socket, deadline: float) -> None:
    sock.settimeout(max(0.001, deadline - time.monotonic()))
    tail = sock.recv(1)
    if tail:
        raise ValueError(f"bytes after the echo: {tail!r}")


class Stream:
    """Offsets into PATTERN for one connection's byte stream: what to send next, what must come back."""

    def __init__(self, rng: random.Random) -> None:
        self.start = rng.randrange(PRIME)
        self.sent = 0
        self.received = 0

    def next_chunk(self, size: int) -> memoryview:
        begin = (self.start + self.sent) % PRIME
        return memoryview(PATTERN)[begin : begin + min(size, CHUNK)]

    def check(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            begin = (self.start + self.received) % PRIME
            part = view[:CHUNK]
            if part != PATTERN[begin : begin + len(part)]:
                raise ValueError(f"echo differs within bytes {self.received}..{self.received + len(part)}")
            self.received += len(part)
            view = view[len(part) :]
        if self.received > self.sent:
            raise ValueError(f"{self.received} bytes echoed, only {self.sent} sent")


# -- load ---------------------------------------------------------------------------------------------------


class Load(threading.Thread):
    """Base of the load threads: run `session` again and again until halted, recording failures."""

    port = 0
    halt = threading.Event()

    def __init__(self, tally: Tally, name: str, seed: int, pause: float = 0.0) -> None:
        super().__init__(daemon=True, name=name)
        self.tally = tally
        self.rng = random.Random(seed)
        self.pause = pause
        self.sock: socket.socket | None = None
        self.local_port = 0
        self.since = 0.0

    def open(self, small: bool = False) -> socket.socket:
        self.since = self.tally.now()
        self.sock = connect(small=small)
        self.local_port = self.sock.getsockname()[1]
        self.tally.add(opened=1)
        return self.sock

    def session(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.session()
            except (OSError, EOFError, ValueError) as exc:
                # The daemon still runs when the load is halted: a failure then counts as well.
                self.tally.fail(self.name, classify(exc), repr(exc), self.local_port, self.since)
                self.halt.wait(0.1)
            finally:
                if self.sock is not None:
                    self.sock.close()
                    self.sock = None
            self.halt.wait(self.pause)


class LongLived(Load):
    def session(self) -> None:
        sock = self.open()
        while not self.halt.is_set():
            size = self.rng.randint(1, 2048) if self.rng.random() < 0.95 else self.rng.randint(2049, 64 * KIB)
            payload = self.rng.randbytes(size)
            deadline = time.monotonic() + STALL
            sock.settimeout(STALL)
            sock.sendall(payload)
            if recv_exactly(sock, size, deadline) != payload:
                raise ValueError(f"a {size}-byte echo differs")
            self.tally.add(nbytes=size, echoes=1)
            self.halt.wait(0.01)
        deadline = time.monotonic() + STALL
        sock.shutdown(socket.SHUT_WR)
        expect_eof(sock, deadline)
        self.tally.add(clean=1)


class Short(Load):
    def session(self) -> None:
        size = self.rng.randint(1, 16 * KIB)
        payload = self.rng.randbytes(size)
        deadline = time.monotonic() + STALL
        sock = self.open()
        sock.sendall(payload)
        if recv_exactly(sock, size, deadline) != payload:
            raise ValueError(f"a {size}-byte echo differs")
        sock.shutdown(socket.SHUT_WR)
        expect_eof(sock, deadline)
        self.tally.add(clean=1, nbytes=size)


class SlowReader(Load):
    """Sends as fast as echod takes it, reads 32 KiB twice a second: echod must pause and resume it."""

    def session(self) -> None:
        sock = self.open(small=True)
        sock.setblocking(False)
        stream = Stream(self.rng)
        last_read = time.monotonic()
        lifetime = time.monotonic() + self.rng.uniform(60, 120)
        while not self.halt.is_set() and time.monotonic() < lifetime:
            with contextlib.suppress(BlockingIOError):
                for _ in range(16):  # as much as the kernel takes, up to 1 MiB per turn
                    stream.sent += sock.send(stream.next_chunk(CHUNK))
            got = 0
            while got < 32 * KIB:
                try:
                    data = sock.recv(32 * KIB - got)
                except BlockingIOError:
                    break
                if not data:
                    raise EOFError(f"EOF after {stream.received} of {stream.sent} bytes")
                stream.check(data)
                got += len(data)
            now = time.monotonic()
            if got:
                last_read = now
                self.tally.add(nbytes=got)
            elif stream.received < stream.sent and now - last_read > STALL:
                raise TimeoutError(
                    f"nothing echoed for {STALL:g} s with {stream.sent - stream.received} owed"
                )
            self.halt.wait(0.5)
        self.finish(sock, stream)

    def finish(self, sock: socket.socket, stream: Stream) -> None:
        """Half-close, then everything still owed must come back, then EOF."""
        sock.setblocking(True)
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + STALL
        while stream.received < stream.sent:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            data = sock.recv(MIB)
            if not data:
                raise EOFError(f"EOF after {stream.received} of {stream.sent} bytes")
            stream.check(data)
            self.tally.add(nbytes=len(data))
            deadline = time.monotonic() + STALL
        expect_eof(sock, time.monotonic() + STALL)
        self.tally.add(clean=1)


class Flood(SlowReader):
    """Duplex stream at a fixed rate, re-opened every 30 s with a half-close."""

    rate = 8 * MIB  # bytes per second, set from --flood-mib

    def session(self) -> None:
        sock = self.open()
        sock.setblocking(False)
        stream = Stream(self.rng)
        began = last_read = time.monotonic()
        while not self.halt.is_set() and time.monotonic() - began < 30:
            now = time.monotonic()
            allowed = int((now - began) * self.rate)
            if stream.sent < allowed and stream.sent - stream.received < 4 * MIB:
                with contextlib.suppress(BlockingIOError):
                    stream.sent += sock.send(stream.next_chunk(min(CHUNK, allowed - stream.sent)))
            try:
                data = sock.recv(MIB)
            except BlockingIOError:
                data = None
            if data == b"":
                raise EOFError(f"EOF after {stream.received} of {stream.sent} bytes")
            if data:
                stream.check(data)
                last_read = now
                self.tally.add(nbytes=len(data))
            elif stream.received < stream.sent and now - last_read > STALL:
                raise TimeoutError(
                    f"nothing echoed for {STALL:g} s with {stream.sent - stream.received} owed"
                )
            else:
                self.halt.wait(0.002)
        self.finish(sock, stream)


# -- the daemon -------------------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KIB
    except OSError:
        pass
    return 0


class Daemon:
    def __init__(self, tmp: Path, workers: int, shutdown_timeout: float) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.config = tmp / "echod.toml"
        self.idle = 300
        self.config.write_text(f"idle_timeout = {self.idle}\n")
        self.log_path = tmp / "echod.log"
        self.log_file = self.log_path.open("wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ECHOD_", "NOTIFY_SOCKET"))}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "echod", "run", "--config", str(self.config), "--workers", str(workers),
             "--listen", f"{HOST}:{self.port}", "--metrics-listen", f"{HOST}:{self.metrics_port}",
             "--shutdown-timeout", str(shutdown_timeout)],
            stdin=subprocess.DEVNULL, stdout=self.log_file, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip
        self.master = self.proc.pid
        self.workers_wanted = workers

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def workers(self) -> list[int]:
        return sorted(p for p in children(self.master) if comm(p).startswith("echod-worker") and alive(p))

    def tree(self) -> list[int]:
        pids, todo = [], [self.master]
        while todo:
            pid = todo.pop()
            if alive(pid):
                pids.append(pid)
                todo += children(pid)
        return pids

    def rss_total(self) -> int:
        return sum(rss(pid) for pid in self.tree())

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://{HOST}:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    def signal(self, signum: int) -> None:
        os.kill(self.master, signum)

    def reloading(self) -> bool:
        log = self.log()
        return log.rfind("reloading configuration") > max(
            log.rfind("reload complete"), log.rfind("reload failed")
        )

    def settled(self) -> bool:
        if not alive(self.master) or self.reloading() or len(self.workers()) != self.workers_wanted:
            return False
        try:
            m = self.metrics()
        except OSError:
            return False
        return m.get("echod_workers") == self.workers_wanted

    def wait(self, predicate: Callable[[], object], what: str, timeout: float = SETTLE) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
            time.sleep(0.1)

    def ready(self) -> None:
        self.wait(
            lambda: self.proc.poll() is None and "ready:" in self.log() and self.settled(), "echod ready"
        )

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in self.tree():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.log_file.close()


def client_ports(worker: int, server_port: int) -> set[int]:
    """Client-side ports of the connections a (stopped) worker holds: its socket inodes in /proc/net/tcp."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{worker}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{worker}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        local, remote, inode = parts[1], parts[2], parts[9]
        if inode in inodes and int(local.split(":")[1], 16) == server_port:
            ports.add(int(remote.split(":")[1], 16))
    return ports


# -- chaos --------------------------------------------------------------------------------------------------


class Chaos:
    def __init__(self, daemon: Daemon, tally: Tally, args: argparse.Namespace, rng: random.Random) -> None:
        self.daemon = daemon
        self.tally = tally
        self.args = args
        self.rng = rng
        self.done: dict[str, int] = {"reload": 0, "kill": 0, "ttin/ttou": 0, "upgrade": 0}
        self.problems: list[str] = []
        self.exited_masters: list[int] = []

    def say(self, text: str) -> None:
        print(f"[{self.tally.now():6.1f}s] {text}", flush=True)

    def reload(self) -> None:
        d = self.daemon
        d.idle = 299 if d.idle == 300 else 300
        d.config.write_text(f"idle_timeout = {d.idle}\n")
        before = d.log().count("reload complete")
        d.workers_wanted = self.args.workers  # the --workers flag wins over TTIN/TTOU at a reload
        d.signal(signal.SIGHUP)
        d.wait(lambda: d.log().count("reload complete") > before and d.settled(), "the reload to complete")
        self.done["reload"] += 1
        self.say(f"reload #{self.done['reload']} complete (idle_timeout {d.idle})")

    def kill(self) -> None:
        d = self.daemon
        victim = self.rng.choice(d.workers())
        os.kill(victim, signal.SIGSTOP)  # frozen: it can take no new connection while we look
        ports = client_ports(victim, d.port)
        with self.tally.lock:
            self.tally.kills.append(Kill(self.tally.now(), victim, ports))
        os.kill(victim, signal.SIGKILL)
        d.wait(lambda: victim not in d.workers() and d.settled(), "a replacement worker")
        self.done["kill"] += 1
        self.say(f"SIGKILLed worker {victim} holding {len(ports)} connections; replaced")

    def scale(self) -> None:
        d = self.daemon
        d.workers_wanted += 1
        d.signal(signal.SIGTTIN)
        d.wait(d.settled, "one more worker")
        self.say(f"TTIN: {d.workers_wanted} workers")
        time.sleep(5)
        d.workers_wanted -= 1
        d.signal(signal.SIGTTOU)
        d.wait(d.settled, "one worker fewer")
        self.done["ttin/ttou"] += 1
        self.say(f"TTOU: {d.workers_wanted} workers")

    def upgrade(self) -> None:
        d = self.daemon
        old = d.master
        marker = "upgrade: started new master "
        d.signal(signal.SIGUSR2)
        d.wait(lambda: marker in d.log(), "the new master to start")
        log = d.log()
        new = int(log[log.index(marker) + len(marker) :].split()[0])
        d.wait(lambda: not alive(old), "the old master to exit")
        self.exited_masters.append(old)
        d.master = new
        d.workers_wanted = self.args.workers
        d.wait(d.settled, "the new master's workers")
        self.done["upgrade"] += 1
        code = d.proc.wait(5) if old == d.proc.pid else None
        self.say(f"USR2: master {old} -> {new}" + (f" (old master exit {code})" if code is not None else ""))
        if code not in (0, None):
            self.problems.append(f"the old master {old} exited with {code} after the upgrade")

    def run(self, name: str) -> None:
        try:
            getattr(self, name)()
        except Exception as exc:
            self.problems.append(f"{name}: {exc}")
            self.say(f"{name} FAILED: {exc}")


# -- main ------------------------------------------------------------------------------------------------


def schedule(duration: float, args: argparse.Namespace) -> list[tuple[float, str]]:
    events = [(t, "reload") for t in range_every(args.reload_every, duration)]
    events += [(t, "kill") for t in range_every(args.kill_every, duration)]
    events += [(0.30 * duration, "scale"), (0.55 * duration, "upgrade")]
    return sorted(events)


def range_every(step: float, duration: float) -> list[float]:
    return [step * k for k in range(1, int(duration // step) + 1) if step * k < duration - 5]


def mib(n: float) -> str:
    return f"{n / MIB:.2f} MiB"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="length of the run (default 10)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--long", type=int, default=16, help="long-lived ping-pong connections")
    ap.add_argument("--short", type=int, default=2, help="threads opening short connections")
    ap.add_argument("--slow", type=int, default=3, help="slow readers")
    ap.add_argument("--floods", type=int, default=2, help="duplex floods")
    ap.add_argument("--flood-mib", type=float, default=8.0, help="MiB/s per flood")
    ap.add_argument("--reload-every", type=float, default=20.0, help="seconds between SIGHUPs")
    ap.add_argument("--kill-every", type=float, default=45.0, help="seconds between worker SIGKILLs")
    ap.add_argument("--shutdown-timeout", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory with echod's log")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)
    duration = args.minutes * 60
    tmp = Path(tempfile.mkdtemp(prefix="echod-soak-"))
    tally = Tally()
    daemon = Daemon(tmp, args.workers, args.shutdown_timeout)
    chaos = Chaos(daemon, tally, args, rng)
    threads: list[Load] = []
    rss_samples: list[tuple[float, int]] = []
    final_problems: list[str] = []
    print(
        f"soak: {args.minutes:g} min, {args.workers} workers, seed {seed}, echod log {daemon.log_path}",
        flush=True,
    )
    try:
        daemon.ready()
        Load.port = daemon.port
        Flood.rate = int(args.flood_mib * MIB)
        kinds = [(LongLived, args.long, 0.0), (Short, args.short, 0.005), (SlowReader, args.slow, 0.0),
                 (Flood, args.floods, 0.0)]  # fmt: skip
        for cls, count, pause in kinds:
            for i in range(count):
                threads.append(cls(tally, f"{cls.__name__.lower()}-{i}", rng.randrange(1 << 32), pause))
        tally.started = time.monotonic()
        for thread in threads:
            thread.start()
        events = schedule(duration, args)
        next_progress, last_opened = 10.0, 0
        while (now := tally.now()) < duration:
            if events and now >= events[0][0]:
                chaos.run(events.pop(0)[1])
                continue
            if now >= next_progress:
                next_progress = (now // 10 + 1) * 10
                total = daemon.rss_total()
                rss_samples.append((now, total))
                try:
                    m = daemon.metrics()
                    buffered, active = m.get("echod_buffered_bytes", 0), m.get("echod_connections_active", 0)
                except OSError as exc:
                    buffered = active = float("nan")
                    chaos.problems.append(f"/metrics failed at {now:.0f} s: {exc!r}")
                unexpected, killed = tally.counts()
                print(
                    f"[{now:6.1f}s] connections {tally.opened} (+{tally.opened - last_opened}, {active:.0f} "
                    f"active) | echoed {mib(tally.bytes)} | failures {unexpected} unexpected, {killed} on "
                    f"killed workers | daemon RSS {mib(total)} | buffered {mib(buffered)} | "
                    f"workers {len(daemon.workers())}",
                    flush=True,
                )
                last_opened = tally.opened
            time.sleep(0.2)

        Load.halt.set()
        for thread in threads:
            thread.join(STALL + 10)
        hung = [t.name for t in threads if t.is_alive()]
        if hung:
            final_problems.append(f"load threads hung: {hung}")
        counters = daemon.metrics()
        restarts = counters.get("echod_worker_restarts_total", 0)
        reloads_ok = counters.get('echod_config_reloads_total{result="success"}', 0)
        if restarts != chaos.done["kill"]:
            final_problems.append(
                f"echod_worker_restarts_total {restarts:.0f}, workers killed {chaos.done['kill']}"
            )
        if reloads_ok != chaos.done["reload"]:
            final_problems.append(f"successful reloads {reloads_ok:.0f}, reloads sent {chaos.done['reload']}")
        daemon.signal(signal.SIGTERM)
        master = daemon.master
        with contextlib.suppress(RuntimeError):
            daemon.wait(lambda: not alive(master), "echod to stop", timeout=args.shutdown_timeout + 20)
        if alive(master):
            final_problems.append(
                f"master {master} still running {args.shutdown_timeout + 20:g} s after SIGTERM"
            )
        elif master == daemon.proc.pid and daemon.proc.wait(5) != 0:
            final_problems.append(f"echod exited with {daemon.proc.returncode}")
        log = daemon.log()
        if f"echod.master[{master}]: echod stopped" not in log:
            final_problems.append(f"master {master} did not log a clean stop")
        if "Traceback" in log:
            final_problems.append("echod's log has a traceback")
    except KeyboardInterrupt:
        final_problems.append("interrupted")
    except Exception as exc:
        final_problems.append(f"soak harness: {exc!r}")
    finally:
        Load.halt.set()
        daemon.kill()

    unexpected, killed = tally.counts()
    problems = chaos.problems + final_problems
    window = min(60.0, duration / 3)
    first = [r for t, r in rss_samples if t <= window]
    last = [r for t, r in rss_samples if t >= rss_samples[-1][0] - window] if rss_samples else []
    print("\n=== soak tally ===")
    print(f"duration        {tally.now():.0f} s, seed {seed}, {args.workers} workers")
    print("chaos           " + ", ".join(f"{k} x{v}" for k, v in chaos.done.items()))
    print(f"connections     {tally.opened} opened, {tally.clean} ended cleanly (full echo, then EOF)")
    print(f"echoed          {mib(tally.bytes)} verified ({tally.echoes} long-lived round trips)")
    print(f"failures        {unexpected} unexpected, {killed} on connections owned by a killed worker")
    if first and last:
        a, b = statistics.mean(first), statistics.mean(last)
        print(
            f"RSS drift       {mib(a)} (first {window:.0f} s) -> {mib(b)} (last {window:.0f} s): "
            f"{100 * (b - a) / a:+.1f} %"
        )
    for failure in [f for f in tally.failures if not f.killed][:20]:
        print(f"  unexpected {failure}")
    for problem in problems:
        print(f"  problem: {problem}")
    print(
        f"echod log       {daemon.log_path}" + ("" if args.keep or unexpected or problems else " (removed)")
    )
    ok = unexpected == 0 and not problems
    print("RESULT          " + ("OK" if ok else "FAILED"))
    if ok and not args.keep:
        for path in tmp.iterdir():
            path.unlink()
        tmp.rmdir()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
