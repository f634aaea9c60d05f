#!/usr/bin/env python3
"""`make bench-io`: the Linux IO models, measured. See docs/io-models.md for what the numbers mean.

Five minimal echo servers (bench/io_models/server_*.py: thread per connection with blocking IO, select,
poll, level-triggered epoll, edge-triggered epoll) and echod itself (one worker) are each started fresh,
pinned to one CPU. For each, the driver measures, with bench/loadgen.py pinned to the other CPU(s):

  single  1 active connection (64 B, 1 in flight), nothing idle: latency with few connections (claim 3)
  grid    --active connections (64 B, 1 in flight) while N idle connections are also held open, for N in
          --idle (0, 100, 1000, 5000). select is run only where its descriptors stay below FD_SETSIZE.
          Idle connections are opened by `loadgen.py --hold` processes, added level by level, from source
          addresses 127.0.0.2-9; each is echoed once, so the server has accepted and registered it.
  quiet   after the last level: 1 s with every connection idle; server CPU and waiting calls (none).
  fdcap   select only: after its last level, 100 more idle connections; those whose descriptor would be
          1024 or more are refused (claim 1).

Cost is the server's CPU (utime+stime of its process tree, /proc/PID/stat) over the measured window,
per echoed message; p50/p99 are the client's per-message round trips. The loop servers also count their
waiting calls and the descriptors those returned (SIGUSR1 -> STATS line), giving µs per call. Two more
edge-triggered variants (--short-read-stops, --max-reads 1) run the grid at N=0 only (claim 4), and at
the end a starvation demo floods one connection of each epoll server while timing another's echoes.

Rounds rotate the server order. Output: bench/results/io-models-<stamp>.jsonl (every row) and .png (the
chart: cost and latency vs N per model), plus tables and a per-claim summary on stdout.

    .venv/bin/python bench/io_models/run.py                 # the full run (about 5.5 minutes)
    .venv/bin/python bench/io_models/run.py --quick         # smoke test (about 1.5 minutes)
    .venv/bin/python bench/io_models/run.py --models poll,epoll_lt --idle 0,5000 --rounds 1
    .venv/bin/python bench/io_models/run.py --report bench/results/io-models-STAMP.jsonl --chart x.png
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import json
import os
import platform
import queue
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
REPO = os.path.dirname(BENCH)
HOST = "127.0.0.1"
FD_SETSIZE = 1024  # glibc's fd_set: select() watches descriptors 0..1023 only
SELECT_RESERVE = 12  # descriptors the select server holds besides connections (stdio, listener, ...)
CLEAN_OTHERS_PCT = 10  # a run is clean if other processes took at most this much of the server's core
HOLD_S = 300  # upper bound on how long a hold process keeps its connections if this driver died
MODELS = ["threads", "select", "poll", "epoll_lt", "epoll_et", "echod"]
VARIANTS = {
    "epoll_et_short": ("epoll_et", ["--short-read-stops"]),
    "epoll_et_rr": ("epoll_et", ["--max-reads", "1"]),
}
WITH_STATS = {"select", "poll", "epoll_lt", "epoll_et", "epoll_et_short", "epoll_et_rr"}
COLORS = {
    "threads": "tab:brown",
    "select": "tab:red",
    "poll": "tab:orange",
    "epoll_lt": "tab:blue",
    "epoll_et": "tab:cyan",
    "echod": "tab:green",
}
LABELS = {
    "threads": "threads (blocking IO, thread per connection)",
    "select": "select",
    "poll": "poll",
    "epoll_lt": "epoll, level-triggered",
    "epoll_et": "epoll, edge-triggered (read until EAGAIN)",
    "echod": "echod (1 worker)",
    "epoll_et_short": "epoll ET, a short read ends the turn",
    "epoll_et_rr": "epoll ET, 1 read per turn + ready list",
}
# (label, server, its extra options, read size) for the starvation demo; 512 B is echod's smallest read_size
STARVATION = [
    ("epoll_lt", "epoll_lt", [], 128),
    ("epoll_et", "epoll_et", [], 128),
    ("epoll_et_rr", "epoll_et", ["--max-reads", "1"], 128),
    ("epoll_et@512", "epoll_et", [], 512),
    ("echod@512", "echod", [], 512),
]


def _load_bench_run() -> Any:
    """bench/run.py as a module: the same process, pinning and /proc helpers as `make bench`."""
    spec = importlib.util.spec_from_file_location("echod_bench_run", os.path.join(BENCH, "run.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


B = _load_bench_run()
LOADGEN = B.LOADGEN


class RunError(Exception):
    pass


# -- claim 1 without a server: where the 1024 comes from -----------------------------------------------------
def _unused_fd(at_least: int) -> int:
    """The first descriptor number >= at_least that is not open (dup2 onto an open one would close it)."""
    for fd in range(at_least, at_least + 4096):
        try:
            os.fstat(fd)
        except OSError:
            return fd
    raise OSError("no unused descriptor number found")


def python_select_limit() -> str:
    """What CPython's select.select() says about a descriptor >= 1024 (it checks before any system call)."""
    a, b = socket.socketpair()
    try:
        fd = os.dup2(a.fileno(), _unused_fd(FD_SETSIZE))
        try:
            select.select([fd], [], [], 0)
            return "accepted"
        except ValueError as exc:
            return f"ValueError: {exc}"
        finally:
            os.close(fd)
    finally:
        a.close()
        b.close()


def kernel_select_beyond_fd_setsize(fd_number: int = 1500) -> dict[str, Any]:
    """Call the select system call (through libc, not CPython) with a bitmap bigger than fd_set.

    The kernel takes any nfds up to the process's descriptor table: it is glibc's fixed-size fd_set type
    (and the FD_SET macros) that stops at 1024, not the kernel."""
    a, b = socket.socketpair()
    fd_number = _unused_fd(fd_number)
    words = fd_number // 64 + 1
    bitmap_t = ctypes.c_ulong * words

    class Timeval(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]

    libc = ctypes.CDLL(None, use_errno=True)
    libc.select.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    try:
        fd = os.dup2(a.fileno(), fd_number)
        try:
            b.send(b"x")
            bits = bitmap_t()
            bits[fd // 64] |= 1 << (fd % 64)
            tv = Timeval(1, 0)
            n = libc.select(fd + 1, ctypes.byref(bits), None, None, ctypes.byref(tv))
            err = ctypes.get_errno()
            ready = bool(bits[fd // 64] >> (fd % 64) & 1)
        finally:
            os.close(fd)
    finally:
        a.close()
        b.close()
    return {"fd": fd_number, "returned": n, "errno": err if n < 0 else 0, "reported_ready": ready}


# -- processes -----------------------------------------------------------------------------------------------
def _pump(stream: Any, q: queue.Queue[str | None]) -> None:
    with contextlib.suppress(ValueError, OSError):
        for line in stream:
            q.put(line.strip())
    q.put(None)


def _next_line(q: queue.Queue[str | None], prefix: str, deadline: float) -> str | None:
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = q.get(timeout=left)
        except queue.Empty:
            return None
        if line is None:
            return None
        if line.startswith(prefix):
            return line
    return None


def server_argv(name: str, port: int, extra: list[str]) -> tuple[list[str], dict[str, str]]:
    if name == "echod":  # exactly bench/run.py's echod_nometrics: built-in defaults plus these flags
        argv, env, _extra_port = B.server_command("echod_nometrics", port, argparse.Namespace(metrics="off"))
        return argv + extra, env
    script = os.path.join(HERE, f"server_{name}.py")
    return [sys.executable, script, "--host", HOST, "--port", str(port), *extra], dict(os.environ)


class Server:
    def __init__(self, name: str, args: argparse.Namespace, extra: list[str] | None = None) -> None:
        self.name = name
        base, opts = VARIANTS.get(name, (name, []))
        self.port = B.free_port()
        argv, env = server_argv(base, self.port, opts + (extra or []))
        self.stats_on = name in WITH_STATS
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.proc = B.spawn(
            argv, args.server_cpus, stdout=subprocess.PIPE, stderr=self.log, env=env, cwd=REPO, text=True
        )
        threading.Thread(target=_pump, args=(self.proc.stdout, self.lines), daemon=True).start()
        why = B.wait_ready(self.proc, self.port, 0)
        if why:
            self.close()
            raise RunError(f"{name}: {why}: {self.log_tail()}")
        time.sleep(0.3)  # start-up work (imports, echod's worker fork) done before anything is sampled

    def log_tail(self) -> str:
        return B.log_tail(self.log, 600).strip()

    def stats(self) -> dict[str, Any] | None:
        if not self.stats_on:
            return None
        while not self.lines.empty():
            self.lines.get_nowait()
        os.kill(self.proc.pid, signal.SIGUSR1)
        line = _next_line(self.lines, "STATS ", time.monotonic() + 3.0)
        return json.loads(line[6:]) if line else None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        B.stop(self.proc)
        self.log.close()


class Holder:
    """`loadgen.py --hold`: opens `count` connections, echoes once on each, and keeps them open."""

    def __init__(self, port: int, count: int, args: argparse.Namespace, seed: int) -> None:
        argv = [sys.executable, LOADGEN, "--hold", str(count), "--src", "8", "-s", "64", "-d", str(HOLD_S)]
        argv += ["--procs", "1", "--connect-timeout", "60", "--seed", str(seed), HOST, str(port)]
        self.proc = B.spawn(argv, args.client_cpus, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump, args=(self.proc.stderr, lines), daemon=True).start()
        line = _next_line(lines, "HOLDING ", time.monotonic() + 100)
        self.held = int(line.split()[1]) if line else 0
        if line is None:
            self.close()
            raise RunError(f"hold {count}: no HOLDING line from loadgen")

    def close(self) -> None:
        B.stop(self.proc, grace=2.0)


def load(server: Server, active: int, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """One closed-loop run of --active connections; server CPU and counters over the measured window."""
    argv = [sys.executable, LOADGEN, "-c", str(active), "-s", "64", "-p", "1", "--procs", "1"]
    argv += ["-d", str(args.duration), "-w", str(args.warmup), "--seed", str(seed), HOST, str(server.port)]
    lg = B.spawn(argv, args.client_cpus, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    row: dict[str, Any] = {"active": active}
    try:
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump, args=(lg.stderr, lines), daemon=True).start()
        deadline = time.monotonic() + 60 + args.warmup + args.duration
        marks: dict[str, tuple[Any, ...]] = {}
        while len(marks) < 2 and (line := _next_line(lines, "MEASURE ", deadline)):
            marks[line.split()[1]] = (
                time.monotonic(),
                B.tree_cpu_s(server.proc.pid),
                B.core_ticks(args.server_cpus),
                B.core_ticks(args.client_cpus),
                server.stats(),
            )
        try:
            lg.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise RunError("load generator did not finish in time") from None
        out = lg.stdout.read() if lg.stdout else ""  # one JSON line: it fits the pipe, no deadlock
        try:
            result = json.loads(out.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            result = {"error": "no output"}
        if "error" in result:
            raise RunError(f"load generator: {result['error']}")
        if not server.alive():
            raise RunError(f"server exited during the run: {server.log_tail()}")
        if set(marks) != {"start", "end"}:
            raise RunError("load generator gave no measurement window")
        (w0, c0, s0, k0, st0), (w1, c1, s1, k1, st1) = marks["start"], marks["end"]
        window = max(w1 - w0, 1e-6)
        rate = result.get("msgs_per_s") or 0.0
        msgs = rate * window
        row.update(
            msgs_per_s=rate,
            window_s=round(window, 3),
            server_cpu_pct=round(100 * (c1 - c0) / window, 1),
            server_core_pct=round(B.busy_pct(s0, s1), 1),
            loadavg=loadavg(),
            client_core_pct=round(B.busy_pct(k0, k1), 1),
            p50_us=result["lat_us"]["p50"],
            p99_us=result["lat_us"]["p99"],
            errors=result.get("errors", 0) + result.get("connect_failures", 0),
            mismatched_bytes=result.get("mismatched_bytes", 0),
        )
        if not msgs:
            raise RunError("no message echoed in the measured window")
        row["cost_us"] = (c1 - c0) * 1e6 / msgs
        if st0 and st1:
            calls = st1["calls"] - st0["calls"]
            row["calls_per_msg"] = calls / msgs
            row["events_per_call"] = (st1["events"] - st0["events"]) / max(calls, 1)
            row["us_per_call"] = (c1 - c0) * 1e6 / max(calls, 1)
            row["eagain_per_msg"] = (st1["eagain"] - st0["eagain"]) / msgs
        return row
    finally:
        B.stop(lg)


# -- one server's share of a round ---------------------------------------------------------------------------
def run_server(name: str, rnd: int, args: argparse.Namespace, emit: Any) -> None:
    levels = [0] if name in VARIANTS else args.idle
    base = {"type": "run", "round": rnd, "model": name}
    try:
        server = Server(name, args)
    except RunError as exc:
        emit({**base, "scenario": "grid", "idle": 0, "error": str(exc)})
        return
    holders: list[Holder] = []
    seed = 1000 * rnd
    try:
        rss0 = B.tree_rss_kib(server.proc.pid)
        if name not in VARIANTS and args.single:
            seed += 1
            emit(_attempt({**base, "scenario": "single", "idle": 0}, server, 1, args, seed))
        held = 0
        for n in levels:
            row = {**base, "scenario": "grid", "idle": n}
            if name == "select" and n + args.active + SELECT_RESERVE > FD_SETSIZE:
                emit({**row, "skipped": f"select cannot watch {n + args.active} connections (FD_SETSIZE)"})
                continue
            if n > held:
                seed += 1
                holder = Holder(server.port, n - held, args, seed)
                holders.append(holder)
                held += holder.held
            time.sleep(0.3)
            row.update(idle_held=held, rss_kib=B.tree_rss_kib(server.proc.pid), rss0_kib=rss0)
            if held < n:
                emit({**row, "error": f"only {held} of {n} idle connections held: {server.log_tail()}"})
                break
            seed += 1
            emit(_attempt(row, server, args.active, args, seed))
        if held:
            emit({**base, "scenario": "quiet", "idle": held, **quiet(server)})
        if name == "select":
            before = server.stats() or {}
            seed += 1
            holder = Holder(server.port, 100, args, seed)
            holders.append(holder)
            after = server.stats() or {}
            emit(
                {
                    **base,
                    "scenario": "fdcap",
                    "idle_before": held,
                    "requested": 100,
                    "held": holder.held,
                    "refused": after.get("refused", 0) - before.get("refused", 0),
                    "server_log": server.log_tail(),
                }
            )
    except RunError as exc:
        emit({**base, "scenario": "grid", "idle": -1, "error": str(exc)})
    finally:
        for holder in holders:
            holder.close()
        server.close()


def quiet(server: Server, seconds: float = 1.0) -> dict[str, Any]:
    """Server CPU and waiting calls over `seconds` with every connection idle: nobody polls anything."""
    st0, c0, t0 = server.stats(), B.tree_cpu_s(server.proc.pid), time.monotonic()
    time.sleep(seconds)
    c1, t1, st1 = B.tree_cpu_s(server.proc.pid), time.monotonic(), server.stats()
    row: dict[str, Any] = {"cpu_pct": round(100 * (c1 - c0) / (t1 - t0), 1), "seconds": round(t1 - t0, 2)}
    if st0 and st1:
        row["calls"] = st1["calls"] - st0["calls"]
    return row


def _attempt(row: dict[str, Any], server: Server, active: int, args: argparse.Namespace, seed: int) -> dict:
    try:
        return {**row, **load(server, active, args, seed)}
    except RunError as exc:
        return {**row, "error": str(exc)}


def starvation_demo(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for label, name, extra, read_size in STARVATION:
        if name not in args.models:
            continue
        row: dict[str, Any] = {"type": "starvation", "label": label, "read_size": read_size}
        try:
            server = Server(name, args, [*extra, "--read-size", str(read_size)])
        except RunError as exc:
            rows.append({**row, "error": str(exc)})
            continue
        try:
            argv = [sys.executable, os.path.join(HERE, "starvation.py"), "--host", HOST]
            argv += ["--port", str(server.port), "--flood-s", str(args.flood_s), "--ping-after", "0.2"]
            client = B.spawn(argv, args.client_cpus, stdout=subprocess.PIPE, text=True)
            try:
                out, _ = client.communicate(timeout=args.flood_s + 60)
                row.update(json.loads(out.strip().splitlines()[-1]))
            except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as exc:
                row["error"] = f"starvation client: {type(exc).__name__}"
            finally:
                B.stop(client)
        finally:
            server.close()
        rows.append(row)
        print(f"  starvation {label:<13} {fmt_starvation(row)}", flush=True)
    return rows


def fmt_starvation(row: dict[str, Any]) -> str:
    if row.get("error"):
        return f"ERROR: {row['error']}"
    return (
        f"read_size={row['read_size']}  first ping during the flood {row['first_ping_ms']} ms, "
        f"max {row['max_ping_ms']} ms, median {row['median_ping_ms']} ms, {row['pings_during_flood']} pings "
        f"answered during the {row['flood_s']} s flood ({row['flood_mib']} MiB, "
        f"echoed all: {row['echoed_all']})"
    )


# -- summary -------------------------------------------------------------------------------------------------
def med(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def others_pct(row: dict[str, Any]) -> float:
    """Busy % of the server's core that the server itself did not use: softirq plus other processes."""
    return row["server_core_pct"] - row["server_cpu_pct"]


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """{(model, scenario, idle): medians over rounds}.

    CPU figures (cost, calls) are medians over every round. Latency and msgs/s are medians over the clean
    rounds (no other process took more than CLEAN_OTHERS_PCT of the server's core) when there is one:
    on a shared machine another process's time slice shows up in p99 whatever the model does."""
    out: dict[tuple[str, str, int], dict[str, Any]] = {}
    runs = [r for r in rows if r.get("type") == "run" and r.get("scenario") in ("single", "grid")]
    keys = list(dict.fromkeys((r["model"], r["scenario"], r["idle"]) for r in runs))
    for key in keys:
        mine = [r for r in runs if (r["model"], r["scenario"], r["idle"]) == key]
        ok = [r for r in mine if "error" not in r and "skipped" not in r]
        st: dict[str, Any] = {"runs": len(ok), "failed": [r["error"] for r in mine if "error" in r]}
        st["skipped"] = next((r["skipped"] for r in mine if "skipped" in r), None)
        if ok:
            costs = [r["cost_us"] for r in ok]
            st.update(cost_us=med(costs), cost_min=min(costs), cost_max=max(costs))
            for k in (
                "calls_per_msg", "events_per_call", "us_per_call", "eagain_per_msg", "idle_held", "rss_kib",
                "rss0_kib",
            ):  # fmt: skip
                st[k] = med([r.get(k) for r in ok])
            clean = [r for r in ok if others_pct(r) <= CLEAN_OTHERS_PCT]
            for k in ("msgs_per_s", "p50_us", "p99_us", "server_core_pct", "client_core_pct"):
                st[k] = med([r.get(k) for r in clean or ok])
            st["clean"] = len(clean)
            st["others_pct"] = med([others_pct(r) for r in ok])
            st["errors"] = sum(r.get("errors", 0) for r in ok)
            st["mismatched"] = sum(r.get("mismatched_bytes", 0) for r in ok)
        out[key] = st
    return out


def claims(rows: list[dict[str, Any]], summary: dict[Any, Any], meta: dict[str, Any]) -> dict[str, Any]:
    models = list(dict.fromkeys(k[0] for k in summary))
    grid = {
        m: {k[2]: st for k, st in summary.items() if k[0] == m and k[1] == "grid" and st.get("runs")}
        for m in models
    }
    c: dict[str, Any] = {}
    fdcap = [r for r in rows if r.get("scenario") == "fdcap"]
    c["claim1"] = {
        "python_select_fd1024": meta.get("python_select_fd1024"),
        "kernel_select_fd1500": meta.get("kernel_select_fd1500"),
        "select_fdcap": [
            {k: r.get(k) for k in ("idle_before", "requested", "held", "refused")} for r in fdcap
        ],
        "max_idle_held": {
            m: max((st["idle_held"] for st in g.values()), default=None)
            for m, g in grid.items()
            if m not in VARIANTS
        },
    }
    c2 = {}
    for m, g in grid.items():
        if not g:
            continue
        n0, nmax = min(g), max(g)
        entry: dict[str, Any] = {
            "cost_us": {n: round(st["cost_us"], 2) for n, st in sorted(g.items())},
            "cost_ratio_max_vs_0": round(g[nmax]["cost_us"] / g[n0]["cost_us"], 2)
            if g[n0]["cost_us"]
            else None,
        }
        calls = [(n, st["us_per_call"]) for n, st in sorted(g.items()) if st.get("us_per_call") is not None]
        if calls:
            entry["us_per_call"] = {n: round(v, 2) for n, v in calls}
            entry["events_per_call"] = {n: round(g[n]["events_per_call"], 2) for n, _ in calls}
            # The extra CPU that N idle descriptors add to each call: (cost/msg at N - at 0) / calls per
            # msg at N, per idle descriptor. select and poll: linear; epoll: about 0.
            entry["ns_per_idle_fd_per_call"] = {
                n: round((st["cost_us"] - g[n0]["cost_us"]) * 1000 / st["calls_per_msg"] / n, 1)
                for n, st in sorted(g.items())
                if n > 0 and st.get("calls_per_msg")
            }
        c2[m] = entry
    c2["quiet"] = {
        r["model"]: {k: r.get(k) for k in ("idle", "cpu_pct", "calls")}
        for r in rows
        if r.get("scenario") == "quiet" and r.get("round") == 0
    }
    c["claim2"] = c2
    c3: dict[str, Any] = {}
    for m in models:
        single = summary.get((m, "single", 0), {})
        g0 = grid.get(m, {}).get(0, {})
        entry = {}
        if single.get("runs"):
            entry["single"] = {k: round(single[k], 2) for k in ("cost_us", "p50_us", "p99_us", "msgs_per_s")}
        if g0:
            entry["active_idle0"] = {
                k: round(g0[k], 2) for k in ("cost_us", "p50_us", "p99_us", "msgs_per_s")
            }
        g = grid.get(m, {})
        if g and max(g) > 0 and g[max(g)].get("rss_kib") is not None:
            top = g[max(g)]
            entry["rss_bytes_per_idle_conn"] = round((top["rss_kib"] - top["rss0_kib"]) * 1024 / max(g), 0)
        if entry:
            c3[m] = entry
    c["claim3"] = c3
    c4: dict[str, Any] = {}
    for m in ("epoll_lt", "epoll_et", "epoll_et_short", "epoll_et_rr"):
        st = grid.get(m, {}).get(0)
        if st:
            c4[m] = {
                k: round(st[k], 3)
                for k in ("cost_us", "p50_us", "p99_us", "calls_per_msg", "eagain_per_msg")
                if st.get(k) is not None
            }
    c4["starvation"] = {
        r["label"]: {k: r.get(k) for k in ("read_size", "first_ping_ms", "max_ping_ms", "median_ping_ms",
                                          "pings_during_flood", "flood_mib", "echoed_all", "error")}
        for r in rows
        if r.get("type") == "starvation"
    }  # fmt: skip
    c["claim4"] = c4
    return c


def h(v: float | None, digits: int = 1) -> str:
    if v is None:
        return "-"
    if abs(v) >= 10000:
        return f"{v / 1000:.0f}k"
    return f"{v:.{digits}f}"


def format_tables(summary: dict[Any, Any]) -> str:
    out = [
        f"{'model':<15} {'scen':<6} {'idle':>5} {'msgs/s':>7} {'us/msg':>7} {'min':>6} {'max':>6} "
        f"{'p50us':>6} {'p99us':>6} {'srvcore':>7} {'clicore':>7} {'calls/msg':>9} {'ev/call':>7} "
        f"{'us/call':>7} {'eagain/msg':>10} {'rssMiB':>6} {'others%':>7} {'clean':>5} {'err':>4} {'mism':>4}"
    ]
    for (model, scen, idle), st in summary.items():
        head = f"{model:<15} {scen:<6} {idle:>5}"
        if st.get("skipped"):
            out.append(f"{head}  skipped: {st['skipped']}")
            continue
        if not st.get("runs"):
            out.append(f"{head}  FAILED: {'; '.join(st['failed'])[:300]}")
            continue
        rss = st.get("rss_kib")
        out.append(
            f"{head} {h(st['msgs_per_s']):>7} {h(st['cost_us'], 2):>7} {h(st['cost_min'], 2):>6} "
            f"{h(st['cost_max'], 2):>6} {h(st['p50_us'], 0):>6} {h(st['p99_us'], 0):>6} "
            f"{h(st['server_core_pct'], 0):>7} {h(st['client_core_pct'], 0):>7} "
            f"{h(st['calls_per_msg'], 2):>9} "
            f"{h(st['events_per_call'], 2):>7} {h(st['us_per_call'], 1):>7} {h(st['eagain_per_msg'], 2):>10} "
            f"{h(rss / 1024 if rss else None, 1):>6} {h(st['others_pct'], 0):>7} "
            f"{st['clean']:>3}/{st['runs']:<1} {st['errors']:>4} {st['mismatched']:>4}"
            + (f"  ({len(st['failed'])} failed: {st['failed'][0][:120]})" if st["failed"] else "")
        )
    out.append(
        "\nmedians over rounds (min/max: cost). us/msg = server CPU µs (utime+stime, process tree) per "
        "echoed message; p50/p99 = client round trip; srvcore/clicore = busy % of the pinned cores incl. "
        "softirq; calls/msg, ev/call, us/call = select/poll/epoll_wait calls, descriptors they reported, "
        "CPU µs per call; eagain/msg = reads that found nothing; rssMiB = server tree RSS with the idle "
        "connections held; others% = server core busy minus the server's own CPU: softirq (a few %) plus "
        "other processes on that core. Above 10 % another process shared the server's core: latency and "
        "msgs/s of that run are not the model's own (its CPU per message mostly still is). clean = rounds "
        "at or below 10 %: msgs/s, p50, p99, srvcore and clicore are medians over those (over all rounds "
        "when none is clean); us/msg and the per-call figures over all rounds."
    )
    return "\n".join(out)


def chart(summary: dict[Any, Any], path: str, note: str, active: int, footnote: str = "") -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart"
    models = [m for m in MODELS if any(k[0] == m and k[1] == "grid" for k in summary)]
    if not models:
        return "nothing to plot"
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 5.6))
    for m in models:
        pts = sorted(
            (k[2], st) for k, st in summary.items() if k[0] == m and k[1] == "grid" and st.get("runs")
        )
        if not pts:
            continue
        xs = [n for n, _ in pts]
        color = COLORS[m]
        style = {"color": color, "marker": "o", "linewidth": 2.4 if m == "echod" else 1.6}
        ax1.plot(xs, [st["cost_us"] for _, st in pts], label=LABELS[m], **style)
        ax1.vlines(
            xs, [st["cost_min"] for _, st in pts], [st["cost_max"] for _, st in pts], color=color, alpha=0.5
        )
        calls = [(n, st["us_per_call"]) for n, st in pts if st.get("us_per_call") is not None]
        if calls:
            ax2.plot([n for n, _ in calls], [v for _, v in calls], label=m, **style)
        ax3.plot(xs, [st["p50_us"] for _, st in pts], label=f"{m} p50", **style)
        ax3.plot(
            xs, [st["p99_us"] for _, st in pts], color=color, marker="^", linestyle=":", linewidth=1.2,
            label=f"{m} p99",
        )  # fmt: skip
        skipped = [k[2] for k, st in summary.items() if k[0] == m and k[1] == "grid" and st.get("skipped")]
        if skipped:
            last_n, last = pts[-1]
            ax1.annotate(
                f"{m}: no point at N={', '.join(f'{n:,}' for n in skipped)}\n(FD_SETSIZE = 1024)",
                (last_n, last["cost_us"]), xytext=(10, 6), textcoords="offset points", fontsize=7,
                color=color,
            )  # fmt: skip
    for ax in (ax1, ax2, ax3):
        ax.set_xlabel("idle connections held open (N)")
        ax.grid(alpha=0.3, which="both")
    ax1.set_ylabel("server CPU µs per echoed message (lower is better)")
    ax1.set_title(f"cost per message: {active} active connections + N idle", fontsize=9)
    ax1.set_ylim(bottom=0)
    ax1.legend(fontsize=7, loc="upper left")
    ax2.set_ylabel("server CPU µs per select / poll / epoll_wait call")
    ax2.set_ylim(bottom=0)
    ax2.set_title("cost per waiting call (each call also serves the ready connections)", fontsize=9)
    ax2.legend(fontsize=7, loc="upper left")
    ax3.set_ylabel("round trip at the client, µs (log)")
    ax3.set_yscale("log")
    ax3.set_title(f"latency of the {active} active connections: p50 (solid), p99 (dotted)", fontsize=9)
    ax3.legend(fontsize=6, ncol=2, loc="upper left")
    fig.suptitle(f"Linux IO models, measured (bench/io_models/run.py; docs/io-models.md)\n{note}", fontsize=8)
    fig.text(
        0.01,
        0.01,
        "cost: median over rounds, bars min-max; latency: median over the rounds no other process shared the "
        f"server's core in (all rounds where none){footnote}",
        fontsize=7,
        color="dimgray",
    )
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def format_claims(c: dict[str, Any]) -> str:
    return "\n".join(f"{k}: {json.dumps(v)}" for k, v in c.items())


# -- main ----------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS + list(VARIANTS)), help="comma list (default: all)")
    ap.add_argument("--idle", default="0,100,1000,5000", help="idle connection levels (default: %(default)s)")
    ap.add_argument("--active", type=int, default=10, help="active connections in the grid (default 10)")
    ap.add_argument("--rounds", type=int, help="rounds (default 2; --quick: 1)")
    ap.add_argument("--duration", type=float, help="measured seconds per run (default 2.5; --quick: 1)")
    ap.add_argument(
        "--warmup", type=float, help="seconds of load before measuring (default 0.75; --quick: 0.3)"
    )
    ap.add_argument("--no-single", dest="single", action="store_false", help="skip the 1-connection runs")
    ap.add_argument("--flood-s", type=float, help="starvation demo flood length (default 1; --quick: 0.6)")
    ap.add_argument(
        "--no-starvation", dest="starvation", action="store_false", help="skip the starvation demo"
    )
    ap.add_argument("--server-cpu", help="CPU list for the servers (default: the last allowed CPU)")
    ap.add_argument("--client-cpu", help="CPU list for the clients (default: every other allowed CPU)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 round of short runs")
    ap.add_argument(
        "--out", default=B.RESULTS, help="folder for the .jsonl and .png (default: bench/results)"
    )
    ap.add_argument("--chart", help="also write the chart here (for example docs/io-models.png)")
    ap.add_argument("--report", metavar="JSONL", help="run nothing: summarize a .jsonl and draw its chart")
    args = ap.parse_args(argv)
    q = args.quick
    args.rounds = args.rounds or (1 if q else 3)
    args.duration = args.duration or (1.0 if q else 2.0)
    args.warmup = args.warmup if args.warmup is not None else (0.3 if q else 0.5)
    args.flood_s = args.flood_s or (0.6 if q else 1.0)
    args.models = [m for m in args.models.split(",") if m]
    for m in args.models:
        if m not in MODELS and m not in VARIANTS:
            ap.error(f"unknown model {m!r}; known: {', '.join(MODELS + list(VARIANTS))}")
    args.idle = sorted({int(n) for n in args.idle.split(",") if n})
    if args.rounds < 1 or args.duration <= 0 or args.warmup < 0 or args.active < 1 or min(args.idle) < 0:
        ap.error("--rounds >= 1, --duration > 0, --warmup >= 0, --active >= 1, --idle >= 0")
    allowed = sorted(os.sched_getaffinity(0))
    args.server_cpus = (
        B.parse_cpus(args.server_cpu) if args.server_cpu else allowed[-1:] if len(allowed) > 1 else []
    )
    if args.client_cpu:
        args.client_cpus = B.parse_cpus(args.client_cpu)
    else:
        args.client_cpus = [c for c in allowed if c not in args.server_cpus] if args.server_cpus else []
    return args


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def finish(rows: list[dict[str, Any]], meta: dict[str, Any], png: str, extra_chart: str | None) -> None:
    summary = summarize(rows)
    print("\n" + format_tables(summary))
    starv = [r for r in rows if r.get("type") == "starvation"]
    if starv:
        print("\nstarvation demo (one connection floods, another pings every 10 ms):")
        for r in starv:
            print(f"  {r['label']:<13} {fmt_starvation(r)}")
    quiet_rows = [r for r in rows if r.get("scenario") == "quiet"]
    if quiet_rows:
        print("\nno traffic, every connection idle (1 s): server CPU %, waiting calls (per round)")
        for model in dict.fromkeys(r["model"] for r in quiet_rows):
            mine = [r for r in quiet_rows if r["model"] == model]
            print(
                f"  {model:<15} {mine[0]['idle']:>5} idle: "
                + ", ".join(f"{r['cpu_pct']} % / {r.get('calls', '-')} calls" for r in mine)
            )
    for r in rows:
        if r.get("scenario") == "fdcap":
            print(
                f"select beyond FD_SETSIZE, round {r['round'] + 1}: with {r['idle_before']} idle connections "
                f"held, {r['requested']} more were opened: {r['held']} held, {r['refused']} refused"
            )
    busy = [r for r in rows if r.get("type") == "run" and r.get("server_core_pct") is not None]
    shared = [r for r in busy if others_pct(r) > CLEAN_OTHERS_PCT]
    if shared:
        print(
            f"\n# warning: in {len(shared)} of {len(busy)} runs another process used more than "
            f"{CLEAN_OTHERS_PCT} % of the server's core: their latency and msgs/s are not the model's own "
            "(see others% and clean)"
        )
    c = claims(rows, summary, meta)
    print("\n# claims\n" + format_claims(c))
    footnote = f"; {len(shared)} of {len(busy)} runs shared it" if shared else ""
    for path in filter(None, [png, extra_chart]):
        problem = chart(summary, path, meta.get("note", ""), meta.get("active", 10), footnote)
        print(f"chart: {problem or path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        with open(args.report) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        meta = next((r for r in rows if r.get("type") == "meta"), {})
        finish(rows, meta, os.path.splitext(args.report)[0] + ".png", args.chart)
        return 0
    signal.signal(signal.SIGTERM, B._on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    nofile = B.raise_nofile()
    need = max(args.idle) + args.active + 200
    if nofile < need:
        print(f"RLIMIT_NOFILE is {nofile}; --idle {max(args.idle)} needs about {need}", file=sys.stderr)
        return 2
    load0 = loadavg()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    os.makedirs(args.out, exist_ok=True)
    jsonl = os.path.join(args.out, f"io-models-{stamp}.jsonl")
    png = os.path.join(args.out, f"io-models-{stamp}.png")
    note = (
        f"{time.strftime('%Y-%m-%d %H:%M')}, {args.rounds} round(s) x {args.duration:g} s "
        f"(+{args.warmup:g} s warmup), 64 B messages, 1 in flight per connection; "
        f"server on CPU {args.server_cpus or 'any'}, "
        f"client on CPU {args.client_cpus or 'any'}; {os.cpu_count()} x {B.cpu_model()}, "
        f"Linux {platform.release()}, Python {platform.python_version()}; load average {load0:.2f} at start"
    )
    meta: dict[str, Any] = {
        "type": "meta",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv[1:],
        "models": args.models,
        "idle": args.idle,
        "active": args.active,
        "rounds": args.rounds,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "server_cpus": args.server_cpus,
        "client_cpus": args.client_cpus,
        "nofile": nofile,
        "loadavg_1m_at_start": load0,
        "cpu": B.cpu_model(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "note": note,
        "python_select_fd1024": python_select_limit(),
        "kernel_select_fd1500": kernel_select_beyond_fd_setsize(),
    }
    print(
        f"# bench-io {meta['started']} models={','.join(args.models)} idle={args.idle} active={args.active}"
    )
    print(f"# {note}")
    print(f"# claim 1 probes: CPython select.select() on fd 1024: {meta['python_select_fd1024']}")
    print(f"#   libc select() with a bitmap sized for fd 1500: {meta['kernel_select_fd1500']}", flush=True)
    if load0 > 0.5:
        print(f"# note: load average {load0:.2f} at start: other work on this machine adds noise", flush=True)
    if not args.server_cpus:
        print("# warning: fewer than 2 CPUs: server and client are not pinned apart", flush=True)
    rows: list[dict[str, Any]] = []
    t0 = time.monotonic()
    interrupted = False
    with open(jsonl, "w") as jf, B.driver_pinned(args.client_cpus):
        jf.write(json.dumps(meta) + "\n")

        def emit(row: dict[str, Any]) -> None:
            rows.append(row)
            jf.write(json.dumps(row) + "\n")
            jf.flush()
            print(progress(row, time.monotonic() - t0, args.rounds), flush=True)

        try:
            for rnd in range(args.rounds):
                k = rnd % len(args.models)
                for name in args.models[k:] + args.models[:k]:
                    run_server(name, rnd, args, emit)
            if args.starvation:
                for row in starvation_demo(args):
                    rows.append(row)
                    jf.write(json.dumps(row) + "\n")
        except KeyboardInterrupt:
            interrupted = True
            print(
                "\ninterrupted: stopping what is running; the tables cover the runs finished so far",
                flush=True,
            )
        finally:
            B.stop_all()
        meta["loadavg_1m_at_end"] = loadavg()
        meta["total_s"] = round(time.monotonic() - t0, 1)
        jf.write(json.dumps({**meta, "type": "meta_end"}) + "\n")
    finish(rows, meta, png, args.chart)
    print(
        f"\n# total {meta['total_s']:.0f} s; load average {load0:.2f} at start, "
        f"{meta['loadavg_1m_at_end']:.2f} at end; raw rows: {jsonl}"
    )
    failed = sum(1 for r in rows if r.get("error"))
    return 130 if interrupted else (1 if failed else 0)


def progress(row: dict[str, Any], elapsed: float, rounds: int) -> str:
    head = f"  [{elapsed:5.0f}s] r{row['round'] + 1}/{rounds} {row['model']:<15} {row['scenario']:<6}"
    if row["scenario"] == "quiet":
        return (
            f"{head} {row['idle']} idle connections, no traffic for {row['seconds']} s: server CPU "
            f"{row['cpu_pct']} %, {row.get('calls', '-')} waiting calls"
        )
    if row["scenario"] == "fdcap":
        return (
            f"{head} +{row['requested']} beyond {row['idle_before']} idle: "
            f"held {row['held']}, refused {row['refused']}"
        )
    head += f" idle={row.get('idle', '-'):<5}"
    if "skipped" in row:
        return f"{head} skipped: {row['skipped']}"
    if "error" in row:
        return f"{head} ERROR: {row['error'][:400]}"
    extra = (
        f" {row['us_per_call']:.1f} us/call {row['events_per_call']:.2f} ev/call"
        if "us_per_call" in row
        else ""
    )
    return (
        f"{head} {row['msgs_per_s']:>8.0f} msgs/s  {row['cost_us']:6.2f} us/msg  p50 {row['p50_us']:.0f} "
        f"p99 {row['p99_us']:.0f} us  cores srv/cli "
        f"{row['server_core_pct']:.0f}/{row['client_core_pct']:.0f}%{extra}  "
        f"err={row['errors']} mism={row['mismatched_bytes']}"
    )


if __name__ == "__main__":
    sys.exit(main())
