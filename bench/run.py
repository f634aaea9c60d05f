#!/usr/bin/env python3
"""echod benchmark driver: interleaved A/B rounds of echod against baseline asyncio echo servers.

For every scenario and every round, each server is started fresh on a free loopback port, pinned to one CPU,
and loaded by bench/loadgen.py pinned to the other CPU(s). The server order rotates every round, so slow
drift of a shared machine hits every server alike. Throughput comes from the load generator; the server's
cost comes from /proc: CPU seconds (utime+stime) of the server's whole process tree over the measured
window, divided by the work done in it (µs per message; per MiB for `large`; per connection for `churn`).
Cost stays meaningful when the Python client, not the server, is the bottleneck.

    .venv/bin/python bench/run.py                              # all scenarios, 5 rounds (~15 min)
    .venv/bin/python bench/run.py --quick --scenarios small,rss
    .venv/bin/python bench/run.py --metrics both --scenarios small,many --rounds 7
    .venv/bin/python bench/run.py --report bench/results/bench-20261127-1400.jsonl --baseline asyncio_proto
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import queue
import resource
import shlex
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any, TextIO

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
RESULTS = os.path.join(BENCH, "results")
LOADGEN = os.path.join(BENCH, "loadgen.py")
TLS_LOADGEN = os.path.join(BENCH, "tls_loadgen.py")  # the tls_* scenarios (asyncio + uvloop client)
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
RSS_SETTLE_S = 1.0  # the rss scenario samples this long after every connection is up and echoed once

# Runs in the child before the benchmarked program: pin it, raise its fd soft limit, exec it.
PIN = (
    "import os, resource, sys\n"
    "cpus = sys.argv[1]\n"
    "if cpus: os.sched_setaffinity(0, [int(c) for c in cpus.split(',')])\n"
    "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
    "try: resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))\n"
    "except (ValueError, OSError): pass\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)

# name -> loadgen arguments, metric, unit of the metric, unit of work the cost is per, description
SCENARIOS: dict[str, dict[str, Any]] = {
    "small": {
        "args": ["-c", "100", "-s", "64", "-p", "1"],
        "metric": "msgs_per_s",
        "unit": "msgs/s",
        "per": "msg",
        "desc": "100 conns, 64 B, 1 in flight",
    },
    "pipelined": {
        "args": ["-c", "100", "-s", "64", "-p", "16"],
        "metric": "msgs_per_s",
        "unit": "msgs/s",
        "per": "msg",
        "desc": "100 conns, 64 B, 16 in flight",
    },
    "large": {
        "args": ["-c", "50", "-s", "16384", "-p", "4"],
        "metric": "mib_per_s",
        "unit": "MiB/s",
        "per": "MiB",
        "desc": "50 conns, 16 KiB, 4 in flight; MiB/s of echoed payload",
    },
    "many": {
        "args": ["-c", "5000", "-s", "64", "-p", "1", "--src", "8"],
        "metric": "msgs_per_s",
        "unit": "msgs/s",
        "per": "msg",
        "desc": "5000 conns, 64 B, 1 in flight",
    },
    "rss": {
        "args": ["--hold", "10000", "-s", "64", "--src", "8"],
        "metric": "rss_bytes_per_conn",
        "unit": "B/conn",
        "per": "conn",
        "desc": "hold 10,000 conns; server tree RSS growth per held connection (lower is better)",
    },
    "churn": {
        "args": ["--churn", "-c", "50", "-s", "64", "--src", "8"],
        "metric": "conns_per_s",
        "unit": "conns/s",
        "per": "conn",
        "desc": "50 slots of connect, 64 B echo, close",
    },
    # TLS (issue 17): echod with a TLS listener against uvloop_tls, same certificate (EC P-256, made by
    # this driver with openssl) and OpenSSL defaults. Plain-only servers skip these;
    # uvloop_tls skips the rest.
    "tls_small": {
        "args": ["-c", "100", "-s", "64", "-p", "1"],
        "metric": "msgs_per_s",
        "unit": "msgs/s",
        "per": "msg",
        "desc": "TLS: 100 conns, 64 B, 1 in flight",
        "tls": True,
    },
    "tls_large": {
        "args": ["-c", "50", "-s", "16384", "-p", "4"],
        "metric": "mib_per_s",
        "unit": "MiB/s",
        "per": "MiB",
        "desc": "TLS: 50 conns, 16 KiB, 4 in flight; MiB/s of echoed payload",
        "tls": True,
    },
    "tls_churn": {
        "args": ["--churn", "-c", "50", "-s", "64"],
        "metric": "conns_per_s",
        "unit": "conns/s",
        "per": "conn",
        "desc": "TLS: 50 slots of new connection (full handshake), 64 B echo, close",
        "tls": True,
    },
    "tls_rss": {
        "args": ["--hold", "2000", "-s", "64"],
        "metric": "rss_bytes_per_conn",
        "unit": "B/conn",
        "per": "conn",
        "desc": "TLS: hold 2,000 idle conns; server tree RSS growth per held connection (lower is better)",
        "tls": True,
    },
}
RSS = ("rss", "tls_rss")  # scenarios measuring memory per held connection, not CPU per unit of work
# echod: the interpreted build (this interpreter's); echod_compiled: the same flags, run by
# --compiled-python, a Python whose echod is the mypyc-compiled build (README "Building").
DEFAULT_SERVERS = ["echod_compiled", "echod", "asyncio_proto", "uvloop_proto", "uvloop_tls"]
ECHOD_SERVERS = ("echod", "echod_compiled", "echod_nometrics", "echod_copy", "echod_splice")
TLS_SERVERS = {"echod", "echod_compiled", "echod_nometrics", "uvloop_tls"}  # those that serve tls_* scenarios

_running: list[subprocess.Popen[Any]] = []  # every process group this driver started and has not stopped


# -- /proc sampling ------------------------------------------------------------------------------------------
def _children_files_work() -> bool:
    return os.path.exists(f"/proc/self/task/{os.getpid()}/children")


CHILDREN_FILES = _children_files_work()


def descendants(pid: int) -> list[int]:
    """pid and all its descendants: /proc/PID/task/*/children, or a /proc scan where the kernel lacks it."""
    if CHILDREN_FILES:
        out, todo = [], [pid]
        while todo:
            p = todo.pop()
            out.append(p)
            try:
                tasks = os.listdir(f"/proc/{p}/task")
            except OSError:
                continue
            for tid in tasks:
                try:
                    with open(f"/proc/{p}/task/{tid}/children") as f:
                        todo.extend(int(c) for c in f.read().split())
                except OSError:
                    pass
        return out
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def tree_cpu_s(pid: int) -> float:
    """utime+stime, in seconds, of pid and its live descendants."""
    total = 0
    for p in descendants(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            pass
    return total / CLK_TCK


def tree_rss_kib(pid: int) -> int:
    total = 0
    for p in descendants(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except (OSError, ValueError):
            pass
    return total


def core_ticks(cpus: list[int]) -> tuple[int, int]:
    """(busy, total) jiffies of the given CPUs from /proc/stat; busy includes irq and softirq, where most
    loopback TCP work runs and which /proc/PID/stat does not charge to any process."""
    want = {f"cpu{c}" for c in cpus}
    busy = total = 0
    with open("/proc/stat") as f:
        for line in f:
            parts = line.split()
            if parts and parts[0] in want:
                user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in parts[1:9])
                busy += user + nice + system + irq + softirq
                total += user + nice + system + idle + iowait + irq + softirq + steal
    return busy, total


def busy_pct(before: tuple[int, int], after: tuple[int, int]) -> float:
    return 100.0 * (after[0] - before[0]) / max(after[1] - before[1], 1)


# -- processes -----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def raise_nofile() -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def spawn(argv: list[str], cpus: list[int], **kw: Any) -> subprocess.Popen[Any]:
    """Start argv pinned to cpus, in its own process group (so it and its children can be stopped)."""
    pinned = [sys.executable, "-c", PIN, ",".join(map(str, cpus)), *argv]
    proc = subprocess.Popen(pinned, start_new_session=True, **kw)
    _running.append(proc)
    return proc


def stop(proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """SIGTERM to the process group this driver created for proc, SIGKILL after `grace` seconds."""
    if proc not in _running:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    # members of the group that outlived the leader (forked workers) or a leader that ignored SIGTERM
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    _running.remove(proc)


def stop_all() -> None:
    for proc in list(_running):
        stop(proc, grace=2.0)


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds into the finally blocks that stop our processes


# -- servers -------------------------------------------------------------------------------------------------
def server_command(
    name: str, port: int, args: argparse.Namespace, tls: bool = False
) -> tuple[list[str], dict[str, str], int]:
    """(argv, environment, extra port to wait for or 0) of server `name` listening on port (TLS if `tls`)."""
    env = dict(os.environ)
    py = sys.executable
    if name in ECHOD_SERVERS:
        if name == "echod_compiled":
            py = args.compiled_python
        for key in [k for k in env if k.startswith("ECHOD_")]:
            del env[key]  # defaults + the flags below only, whatever the caller's environment says
        if name != "echod_compiled" and importlib.util.find_spec("echod") is None:
            env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [os.path.join(REPO, "service"), env.get("PYTHONPATH")])
            )
        metrics = name != "echod_nometrics" and args.metrics != "off"
        mport = free_port() if metrics else 0
        argv = [
            py, "-m", "echod", "run",
            "--config", os.devnull,  # ignore /etc/echod/echod.toml: built-in defaults
            "--listen", f"{HOST}:{port}",
            "--workers", "1",
            "--backlog", "4096",  # as the baselines
            "--max-connections", "20000",  # the rss scenario holds 10,000 (default limit: 10,000)
            "--metrics-listen", f"{HOST}:{mport}" if metrics else "",
            "--io-mode", {"echod_copy": "copy", "echod_splice": "splice"}.get(name, "auto"),
        ]  # fmt: skip
        if tls:
            keys = {"tls_cert": args.tls_files[0], "tls_key": args.tls_files[1]}
            argv += ["--listeners", json.dumps({f"{HOST}:{port}": keys})]
        return argv, env, mport
    if name == "uvloop_tls":
        script = os.path.join(BENCH, "servers", name + ".py")
        cert, key = args.tls_files
        argv = [py, script, "--host", HOST, "--port", str(port), "--cert", cert, "--key", key]
        return argv, env, 0
    if name in ("asyncio_proto", "uvloop_proto"):
        script = os.path.join(BENCH, "servers", name + ".py")
        return [py, script, "--host", HOST, "--port", str(port), "--backlog", "4096"], env, 0
    template = args.custom[name]
    fields = {"port": port, "host": HOST, "py": py, "bench": BENCH, "repo": REPO}
    return shlex.split(template.format(**fields)), env, 0


def make_tls_files() -> tuple[str, str]:
    """A throwaway self-signed EC P-256 certificate and key for the tls_* scenarios (never committed)."""
    folder = tempfile.mkdtemp(prefix="echod-bench-tls-")
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def wait_ready(
    proc: subprocess.Popen[Any], port: int, extra_port: int, timeout: float = 20.0, tls: bool = False
) -> str | None:
    """None once the server echoes (over TLS if `tls`; and extra_port accepts), else why not."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    deadline = time.monotonic() + timeout
    probe = b"echod-bench-probe\n"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"server exited with status {proc.returncode} before accepting"
        try:
            with contextlib.ExitStack() as stack:
                s = stack.enter_context(socket.create_connection((HOST, port), timeout=1.0))
                if tls:
                    s = stack.enter_context(ctx.wrap_socket(s))
                s.sendall(probe)
                got = b""
                while len(got) < len(probe):
                    chunk = s.recv(1024)
                    if not chunk:
                        break
                    got += chunk
                if got == probe:
                    break
        except OSError:
            pass
        time.sleep(0.05)
    else:
        return f"server did not echo within {timeout:.0f} s"
    while extra_port and time.monotonic() < deadline:
        try:
            socket.create_connection((HOST, extra_port), timeout=1.0).close()
            return None
        except OSError:
            time.sleep(0.05)
    return f"port {extra_port} did not accept within {timeout:.0f} s" if extra_port else None


def log_tail(log: Any, limit: int = 1500) -> str:
    with contextlib.suppress(OSError, ValueError):
        log.flush()
        log.seek(0, os.SEEK_END)
        size = log.tell()
        log.seek(max(0, size - limit))
        return log.read().decode("utf-8", "replace")
    return ""


def _pump(stream: TextIO, q: queue.Queue[str | None], keep: list[str]) -> None:
    for line in stream:
        keep.append(line)
        q.put(line.strip())
    q.put(None)


# -- one run -------------------------------------------------------------------------------------------------
def run_one(name: str, scen: str, rnd: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryFile() as log:  # the server's stdout and stderr
        return _run_one(name, scen, rnd, args, log)


def _run_one(name: str, scen: str, rnd: int, args: argparse.Namespace, log: Any) -> dict[str, Any]:
    spec = SCENARIOS[scen]
    port = free_port()
    tls = bool(spec.get("tls"))
    argv, env, extra_port = server_command(name, port, args, tls)
    row: dict[str, Any] = {
        "type": "run",
        "server": name,
        "scenario": scen,
        "round": rnd,
        "port": port,
        "server_cmd": shlex.join(argv),
        "server_cpus": args.server_cpus,
        "client_cpus": args.client_cpus,
    }
    server = lg = None
    try:
        server = spawn(argv, args.server_cpus, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        why = wait_ready(server, port, extra_port, tls=tls)
        if why:
            row["error"] = why
            row["server_log_tail"] = log_tail(log)
            return row
        time.sleep(0.5)  # let start-up work (imports, the metrics process) finish before sampling
        loadgen = TLS_LOADGEN if tls else LOADGEN
        client = [sys.executable, loadgen, *spec["args"], "--procs", str(args.client_procs)]
        client += ["--seed", str(rnd + 1)]
        if scen in RSS:
            client += ["-d", str(args.hold_s)]
        else:
            client += ["-d", str(args.duration), "-w", str(args.warmup)]
        client += [HOST, str(port)]
        row["client_cmd"] = shlex.join(client)
        rss0 = tree_rss_kib(server.pid)
        lines: queue.Queue[str | None] = queue.Queue()
        stderr_text: list[str] = []
        lg = spawn(client, args.client_cpus, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=_pump, args=(lg.stderr, lines, stderr_text), daemon=True).start()
        deadline = time.monotonic() + 30 + 30 + args.warmup + args.duration + args.hold_s + 30
        marks: dict[str, tuple[float, float, tuple[int, int], tuple[int, int]]] = {}
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            if line in ("MEASURE start", "MEASURE end"):
                marks[line.split()[1]] = (
                    time.monotonic(),
                    tree_cpu_s(server.pid),
                    core_ticks(args.server_cpus),
                    core_ticks(args.client_cpus),
                )
            elif line.startswith("HOLDING"):
                time.sleep(RSS_SETTLE_S)
                row["rss_before_kib"] = rss0
                row["rss_after_kib"] = tree_rss_kib(server.pid)
        try:
            lg.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            row["error"] = "load generator did not finish in time"
            return row
        out = lg.stdout.read().strip().splitlines() if lg.stdout else []
        try:
            result = json.loads(out[-1]) if out else {}
        except json.JSONDecodeError:
            result = {}
        row["client"] = result
        if "error" in result or not result:
            row["error"] = "load generator: " + (
                result.get("error") or "".join(stderr_text)[-800:] or "no output"
            )
            return row
        if server.poll() is not None:
            row["error"] = f"server exited during the run (status {server.returncode})"
            row["server_log_tail"] = log_tail(log)
            return row
        row["errors"] = result.get("errors", 0) + result.get("connect_failures", 0)
        row["mismatched_bytes"] = result.get("mismatched_bytes", 0)
        if scen in RSS:
            held = result.get("held", 0)
            if "rss_after_kib" not in row or not held:
                row["error"] = "no connection held"
                return row
            row["held"] = held
            row["rss_bytes_per_conn"] = (row["rss_after_kib"] - rss0) * 1024.0 / held
            return row
        if "start" not in marks or "end" not in marks:
            row["error"] = "load generator gave no measurement window"
            return row
        (w0, c0, s0, k0), (w1, c1, s1, k1) = marks["start"], marks["end"]
        window = max(w1 - w0, 1e-6)
        rate = result.get(spec["metric"]) or 0.0
        row["window_s"] = round(window, 3)
        row[spec["metric"]] = rate
        row["server_cpu_s"] = round(c1 - c0, 3)
        row["server_cpu_pct"] = round(100.0 * (c1 - c0) / window, 1)
        row["server_core_pct"] = round(busy_pct(s0, s1), 1)
        row["client_core_pct"] = round(busy_pct(k0, k1), 1)
        row["client_cpu_pct"] = result.get("client_cpu_pct")
        if rate > 0:
            row["cost_us"] = (c1 - c0) / window * 1e6 / rate
            row["core_cost_us"] = row["server_core_pct"] / 100.0 * 1e6 / rate
        else:
            row["error"] = "no work done in the measured window"
        return row
    finally:
        for proc in (lg, server):
            if proc is not None:
                stop(proc)


# -- report --------------------------------------------------------------------------------------------------
def med(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def human(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.{digits - 1}f}M"
    if a >= 1e4:
        return f"{v / 1e3:.{max(digits - 2, 0)}f}k"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def ratio_str(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def summarize(rows: list[dict[str, Any]], servers: list[str], scenarios: list[str], baseline: str) -> dict:
    """{scenario: {server: stats}}, ratios computed per round against the baseline's run of that round."""
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for scen in scenarios:
        metric = SCENARIOS[scen]["metric"]
        costkey = metric if scen in RSS else "cost_us"
        ok = [r for r in rows if r.get("type") == "run" and r["scenario"] == scen and "error" not in r]
        base = {r["round"]: r for r in ok if r["server"] == baseline}
        summary[scen] = {}
        for s in servers:
            mine = [r for r in ok if r["server"] == s]
            failed = [
                r for r in rows if r.get("type") == "run" and r["scenario"] == scen and r["server"] == s
            ]
            failed = [r for r in failed if "error" in r]
            st: dict[str, Any] = {"runs": len(mine), "failed": len(failed)}
            if failed:
                st["first_error"] = failed[0]["error"]
            if mine:
                vals = [r[metric] for r in mine]
                costs = [r.get(costkey) for r in mine if r.get(costkey) is not None]
                thr_ratios, cost_ratios = [], []
                for r in mine:
                    b = base.get(r["round"])
                    if not b:
                        continue
                    if b.get(metric):
                        thr_ratios.append(r[metric] / b[metric])
                    if b.get(costkey) and r.get(costkey) is not None:
                        cost_ratios.append(r[costkey] / b[costkey])
                st.update(
                    med=med(vals),
                    min=min(vals),
                    max=max(vals),
                    x_base=med(thr_ratios),
                    cost_med=med(costs),
                    cost_min=min(costs) if costs else None,
                    cost_max=max(costs) if costs else None,
                    cost_x_base=med(cost_ratios),
                    errors=sum(r.get("errors", 0) for r in mine),
                    mismatched=sum(r.get("mismatched_bytes", 0) for r in mine),
                    held=med([r.get("held") for r in mine]),
                    setup_s=med([r.get("client", {}).get("setup_s") for r in mine]),
                    p50=med([r.get("client", {}).get("lat_us", {}).get("p50") for r in mine]),
                    p99=med([r.get("client", {}).get("lat_us", {}).get("p99") for r in mine]),
                    srv_cpu=med([r.get("server_cpu_pct") for r in mine]),
                    srv_core=med([r.get("server_core_pct") for r in mine]),
                    cli_cpu=med([r.get("client_cpu_pct") for r in mine]),
                    cli_core=med([r.get("client_core_pct") for r in mine]),
                    core_cost=med([r.get("core_cost_us") for r in mine]),
                )
            summary[scen][s] = st
    return summary


def format_tables(summary: dict, baseline: str) -> str:
    out = []
    for scen, per_server in summary.items():
        spec = SCENARIOS[scen]
        out.append(f"\n## {scen}: {spec['desc']}")
        w = max([6, *(len(s) for s in per_server)])
        if scen in RSS:
            out.append(
                f"{'server':<{w}} {'B/conn':>8} {'min':>8} {'max':>8} {'x base':>7} "
                f"{'held':>6} {'setup_s':>7} {'err':>5} {'mism':>5}"
            )
        else:
            unit = spec["unit"]
            cu = f"us/{spec['per']}"
            out.append(
                f"{'server':<{w}} {unit:>8} {'min':>8} {'max':>8} {'x base':>7} | "
                f"{cu:>8} {'min':>8} {'max':>8} {'x base':>7} | "
                f"{'p50 us':>7} {'p99 us':>7} {'srv%':>5} {'srvcore':>7} {'cli%':>5} {'clicore':>7} "
                f"{'err':>5} {'mism':>5}"
            )
        for s, st in per_server.items():
            if not st.get("runs") and not st.get("failed"):
                out.append(f"{s:<{w}} (not run)")
                continue
            if not st.get("runs"):
                out.append(
                    f"{s:<{w}} FAILED ({st.get('failed', 0)} runs): {st.get('first_error', 'no runs')}"
                )
                continue
            fail = f"  ({st['failed']} failed: {st['first_error']})" if st["failed"] else ""
            if scen in RSS:
                out.append(
                    f"{s:<{w}} {human(st['med']):>8} {human(st['min']):>8} {human(st['max']):>8} "
                    f"{ratio_str(st['x_base']):>7} {st['held'] or 0:>6.0f} {st['setup_s'] or 0:>7.2f} "
                    f"{st['errors']:>5} {st['mismatched']:>5}{fail}"
                )
                continue
            out.append(
                f"{s:<{w}} {human(st['med']):>8} {human(st['min']):>8} {human(st['max']):>8} "
                f"{ratio_str(st['x_base']):>7} | "
                f"{human(st['cost_med']):>8} {human(st['cost_min']):>8} {human(st['cost_max']):>8} "
                f"{ratio_str(st['cost_x_base']):>7} | "
                f"{human(st['p50']):>7} {human(st['p99']):>7} "
                f"{st['srv_cpu'] or 0:>5.0f} {st['srv_core'] or 0:>7.0f} "
                f"{st['cli_cpu'] or 0:>5.0f} {st['cli_core'] or 0:>7.0f} "
                f"{st['errors']:>5} {st['mismatched']:>5}{fail}"
            )
    out.append(
        "\nmedian/min/max over rounds; 'x base' = median over rounds of the ratio to "
        f"{baseline} in the same round\n(throughput: higher is better; us/unit and rss: lower is better). "
        "us/unit = server CPU µs (utime+stime of its process tree) per unit of work.\n"
        "srv%/cli% = process CPU; srvcore/clicore = busy % of the pinned cores incl. softirq: "
        "a server core well below 100 % means the client was the bottleneck."
    )
    return "\n".join(out)


def chart(summary: dict, baseline: str, path: str, title_note: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        return "matplotlib is not installed: no chart"
    scens = [s for s in summary if any(st.get("cost_x_base") for st in summary[s].values())]
    if not scens:
        return "no cost ratios to plot"
    servers = list(dict.fromkeys(s for scen in scens for s in summary[scen]))
    fig, ax = plt.subplots(figsize=(min(14.0, max(7.0, 1.2 + len(scens) * (0.5 + 0.45 * len(servers)))), 5.2))
    width = 0.8 / len(servers)
    ratios_seen = []
    for i, server in enumerate(servers):
        xs, ys, labels = [], [], []
        for j, scen in enumerate(scens):
            st = summary[scen].get(server, {})
            r = st.get("cost_x_base")
            if r is None:
                continue
            xs.append(j + (i - (len(servers) - 1) / 2) * width)
            ys.append(r)
            ratios_seen.append(r)
            unit = "B" if scen in RSS else "µs"
            labels.append(f"{human(st['cost_med'])} {unit}")
        bars = ax.bar(xs, ys, width * 0.92, label=server + (" (baseline)" if server == baseline else ""))
        for bar, text in zip(bars, labels, strict=True):
            ax.annotate(
                text,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=7,
                rotation=90 if len(servers) > 3 else 0,
            )
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    if max(ratios_seen) / max(min(ratios_seen), 1e-9) > 20:  # linear unless that would flatten the small bars
        ax.set_yscale("log")
        ax.set_ylim(min(ratios_seen) / 1.5, max(ratios_seen) * 2.5)
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    else:
        ax.set_ylim(0, max(ratios_seen) * 1.2)
    ax.set_xticks(range(len(scens)))
    ax.set_xticklabels(
        [f"{s}\n({'bytes RSS' if s in RSS else 'CPU µs'} per {SCENARIOS[s]['per']})" for s in scens],
        fontsize=8,
    )
    ax.set_ylabel(f"server cost relative to {baseline} (lower is better)")
    wrapped = "\n".join(textwrap.wrap(title_note, 120))
    ax.set_title(
        f"echod benchmark: server cost per unit of work, normalised to {baseline}\n{wrapped}", fontsize=8
    )
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.text(
        0.01,
        0.01,
        "bar = median over rounds of (server / baseline) in the same round; label = median absolute cost",
        fontsize=7,
        color="dimgray",
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# -- main ----------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def parse_cpus(text: str) -> list[int]:
    out: list[int] = []
    for part in filter(None, text.split(",")):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma list (default: %(default)s)")
    ap.add_argument("--servers", default=",".join(DEFAULT_SERVERS), help="comma list (default: %(default)s)")
    ap.add_argument(
        "--baseline", default="uvloop_proto", help="ratios are to this server (default: %(default)s)"
    )
    ap.add_argument("--rounds", type=int, help="interleaved rounds per scenario (default 5; --quick: 1)")
    ap.add_argument("--duration", type=float, help="measured seconds per run (default 4; --quick: 1.5)")
    ap.add_argument("--warmup", type=float, help="seconds of load before measuring (default 1; --quick: 0.5)")
    ap.add_argument("--hold-s", type=float, help="rss: seconds the connections are held (default 2.5)")
    ap.add_argument("--client-procs", type=int, help="load generator processes (default: one per client CPU)")
    ap.add_argument("--server-cpu", help="CPU list for the server (default: the last allowed CPU)")
    ap.add_argument("--client-cpu", help="CPU list for the client (default: every other allowed CPU)")
    ap.add_argument(
        "--metrics",
        choices=["on", "off", "both"],
        default="on",
        help="echod's Prometheus endpoint; 'both' also runs echod_nometrics (default: on)",
    )
    ap.add_argument(
        "--io-mode",
        choices=["auto", "all"],
        default="auto",
        help="'all' also runs echod_copy and echod_splice: echod with io_mode copy, splice (default: auto)",
    )
    ap.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="NAME=CMD",
        help="extra server: a command with {port} (also {host} {py} {bench} {repo}); name it in --servers",
    )
    ap.add_argument(
        "--compiled-python",
        metavar="PY",
        help="a python whose echod is the compiled build, for echod_compiled (make bench: .venv-compiled)",
    )
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 round, short runs")
    ap.add_argument("--out", default=RESULTS, help="folder for the .png and .jsonl (default: bench/results)")
    ap.add_argument("--report", metavar="JSONL", help="run nothing: print the tables and chart of a .jsonl")
    args = ap.parse_args(argv)
    q = args.quick
    args.rounds = args.rounds or (1 if q else 5)
    args.duration = args.duration or (1.5 if q else 4.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if q else 1.0)
    args.hold_s = max(args.hold_s or 2.5, RSS_SETTLE_S + 0.5)
    if args.rounds < 1 or args.duration <= 0 or args.warmup < 0:
        ap.error("--rounds >= 1, --duration > 0, --warmup >= 0")
    args.custom = {}
    for spec in args.server:
        name, _, cmd = spec.partition("=")
        if not name or "{port}" not in cmd:
            ap.error(f"--server {spec!r}: expected NAME=CMD with {{port}} in CMD")
        args.custom[name] = cmd
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    for s in args.scenarios:
        if s not in SCENARIOS:
            ap.error(f"unknown scenario {s!r}; known: {', '.join(SCENARIOS)}")
    args.servers = list(dict.fromkeys(s for s in args.servers.split(",") if s))
    if args.metrics == "both" and "echod" in args.servers and "echod_nometrics" not in args.servers:
        args.servers.insert(args.servers.index("echod") + 1, "echod_nometrics")
    if args.io_mode == "all" and "echod" in args.servers:
        for extra in ("echod_splice", "echod_copy"):
            if extra not in args.servers:
                args.servers.insert(args.servers.index("echod") + 1, extra)
    known = {*ECHOD_SERVERS, "asyncio_proto", "uvloop_proto", "uvloop_tls"}
    known |= set(args.custom)
    for s in args.servers:
        if s not in known:
            ap.error(f"unknown server {s!r}; known: {', '.join(sorted(known))}")
    allowed = sorted(os.sched_getaffinity(0))
    if args.server_cpu:
        args.server_cpus = parse_cpus(args.server_cpu)
    else:
        args.server_cpus = allowed[-1:] if len(allowed) >= 2 else []
    if args.client_cpu:
        args.client_cpus = parse_cpus(args.client_cpu)
    else:
        args.client_cpus = [c for c in allowed if c not in args.server_cpus] if args.server_cpus else []
    args.client_procs = args.client_procs or max(1, len(args.client_cpus))
    return args


@contextlib.contextmanager
def driver_pinned(cpus: list[int]) -> Iterator[None]:
    """Keep this driver (and its /proc sampling) off the server's CPU."""
    before = os.sched_getaffinity(0)
    if cpus:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, before)


def report(args: argparse.Namespace) -> int:
    with open(args.report) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    runs = [r for r in rows if r.get("type") == "run"]
    servers = list(dict.fromkeys(r["server"] for r in runs))
    scenarios = [s for s in SCENARIOS if any(r["scenario"] == s for r in runs)]
    summary = summarize(runs, servers, scenarios, args.baseline)
    print(format_tables(summary, args.baseline))
    png = os.path.splitext(args.report)[0] + f"-vs-{args.baseline}.png"
    meta = next((r for r in rows if r.get("type") == "meta"), {})
    problem = chart(summary, args.baseline, png, meta.get("note", ""))
    print(f"\nchart: {problem or png}")
    return 0


def compiled_problem(py: str | None) -> str | None:
    """Why `py` cannot run echod_compiled (no such python, or its echod is interpreted), or None."""
    if not py:
        return "no --compiled-python given (make bench passes .venv-compiled/bin/python)"
    probe = "import echod.build as b; print(b.describe()); raise SystemExit(0 if b.is_compiled() else 3)"
    try:
        done = subprocess.run([py, "-c", probe], capture_output=True, text=True, timeout=60)
    except OSError as exc:
        return f"{py}: {exc}"
    if done.returncode != 0:
        return f"{py}: echod is not the compiled build ({(done.stdout + done.stderr).strip()[-200:]})"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        return report(args)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where our parent ignored SIGINT
    nofile = raise_nofile()
    servers = list(args.servers)
    for uv in ("uvloop_proto", "uvloop_tls"):
        if uv in servers and importlib.util.find_spec("uvloop") is None:
            print(f"warning: uvloop is not importable: skipping {uv} (pip install uvloop)", file=sys.stderr)
            servers.remove(uv)
    if "echod_compiled" in servers and (problem := compiled_problem(args.compiled_python)):
        print(f"warning: skipping echod_compiled: {problem}", file=sys.stderr)
        servers.remove("echod_compiled")
    args.tls_files = make_tls_files() if any(SCENARIOS[s].get("tls") for s in args.scenarios) else None
    if not servers:
        print("no server to run", file=sys.stderr)
        return 2
    baseline = args.baseline
    if baseline not in servers:
        fallback = "asyncio_proto" if "asyncio_proto" in servers else servers[0]
        print(f"warning: baseline {baseline} is not being run: using {fallback}", file=sys.stderr)
        baseline = fallback
    if not args.server_cpus:
        print("warning: fewer than 2 CPUs: server and client are not pinned apart", file=sys.stderr)
    if "rss" in args.scenarios and nofile < 10_100:
        print(f"warning: RLIMIT_NOFILE is {nofile}; the rss scenario needs about 10,100", file=sys.stderr)
    with open("/proc/loadavg") as f:
        loadavg = f.read().split()[0]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    os.makedirs(args.out, exist_ok=True)
    jsonl = os.path.join(args.out, f"bench-{stamp}.jsonl")
    png = os.path.join(args.out, f"bench-{stamp}.png")
    note = (
        f"{time.strftime('%Y-%m-%d %H:%M')}, {args.rounds} round(s) x {args.duration:g} s "
        f"(+{args.warmup:g} s warmup), server on CPU {args.server_cpus or 'any'}, "
        f"client ({args.client_procs} proc) on CPU {args.client_cpus or 'any'}, "
        f"{os.cpu_count()} CPUs: {cpu_model()}"
    )
    meta = {
        "type": "meta",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv[1:],
        "servers": servers,
        "baseline": baseline,
        "scenarios": args.scenarios,
        "rounds": args.rounds,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "hold_s": args.hold_s,
        "metrics": args.metrics,
        "server_cpus": args.server_cpus,
        "client_cpus": args.client_cpus,
        "client_procs": args.client_procs,
        "nofile": nofile,
        "loadavg_1m_at_start": float(loadavg),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "note": note,
    }
    print(
        f"# echod bench {meta['started']}  servers={','.join(servers)} baseline={baseline} "
        f"scenarios={','.join(args.scenarios)} rounds={args.rounds} duration={args.duration:g}s "
        f"warmup={args.warmup:g}s server_cpu={args.server_cpus} client_cpu={args.client_cpus} "
        f"client_procs={args.client_procs} nofile={nofile} loadavg={loadavg}",
        flush=True,
    )
    if float(loadavg) > 0.5:
        print(f"# note: load average {loadavg} at start: other work on this machine adds noise", flush=True)
    rows: list[dict[str, Any]] = []
    t0 = time.monotonic()
    interrupted = False
    with open(jsonl, "w") as jf, driver_pinned(args.client_cpus):
        jf.write(json.dumps(meta) + "\n")
        try:
            for scen in args.scenarios:
                spec = SCENARIOS[scen]
                for rnd in range(args.rounds):
                    k = rnd % len(servers)
                    for name in servers[k:] + servers[:k]:
                        if name not in TLS_SERVERS if spec.get("tls") else name == "uvloop_tls":
                            continue  # a plain-only server in a tls_* scenario, or the reverse
                        row = run_one(name, scen, rnd, args)
                        rows.append(row)
                        jf.write(json.dumps(row) + "\n")
                        jf.flush()
                        print(progress(row, spec, time.monotonic() - t0, args.rounds), flush=True)
        except KeyboardInterrupt:
            interrupted = True
            print(
                "\ninterrupted: stopping what is running; the table covers the runs finished so far",
                flush=True,
            )
        finally:
            stop_all()
    summary = summarize(rows, servers, args.scenarios, baseline)
    print(format_tables(summary, baseline))
    problem = chart(summary, baseline, png, note) if rows else "no runs"
    print(f"\n# total {time.monotonic() - t0:.0f} s; raw rows: {jsonl}; chart: {problem or png}")
    failed = sum(1 for r in rows if "error" in r)
    return 130 if interrupted else (1 if failed else 0)


def progress(row: dict[str, Any], spec: dict[str, Any], elapsed: float, rounds: int) -> str:
    head = f"  [{elapsed:5.0f}s] {row['scenario']:<9} r{row['round'] + 1}/{rounds} {row['server']:<16}"
    if "error" in row:
        return f"{head} ERROR: {row['error']}"
    if row["scenario"] in RSS:
        return (
            f"{head} {row['rss_bytes_per_conn']:,.0f} B/conn  held={row['held']}  "
            f"rss {row['rss_before_kib'] / 1024:.1f} -> {row['rss_after_kib'] / 1024:.1f} MiB  "
            f"setup={row['client'].get('setup_s', 0):.2f}s  "
            f"err={row['errors']} mism={row['mismatched_bytes']}"
        )
    return (
        f"{head} {spec['unit']}={human(row[spec['metric']])}  "
        f"cost={human(row.get('cost_us'))} us/{spec['per']}  "
        f"srv={row['server_cpu_pct']:.0f}% cli={row['client_cpu_pct'] or 0:.0f}%  "
        f"cores srv/cli={row['server_core_pct']:.0f}/{row['client_core_pct']:.0f}%  "
        f"err={row['errors']} mism={row['mismatched_bytes']}"
    )


if __name__ == "__main__":
    sys.exit(main())
