"""Metrics, /healthz and the monitoring files in deploy/, checked against the real daemon and real tools.

Every test drives `echod run` over loopback sockets, and promtool / prometheus from Debian's
`prometheus` package (`make system-deps`); a missing tool fails the test, it is never skipped. Waits are
liveness deadlines (`wait_for`, socket and HTTP timeouts) so that a hang fails fast. Workers publish
their counters once a second, so every check of a counter waits for it instead of sampling once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import echod as echod_package
import pytest
from conftest import Daemon, echo_roundtrip, free_port, wait_for
from echod import build as echod_build
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.timeout(120)
# Every test but the pure-logic ones is marked integration: it spawns echod or runs promtool.

REPO = Path(__file__).resolve().parent.parent
PROM_DIR = REPO / "deploy" / "prometheus"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
RULES = PROM_DIR / "echod-rules.yml"
RULES_TEST = PROM_DIR / "echod-rules.test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "echod-dashboard.json"

LIVENESS = 10.0  # seconds: generous deadline for anything echod should do "at once"
PROMETHEUS_DEADLINE = 40.0  # its first scrape lands 5-6 s after start, even with scrape_interval 1s
TOOL_TIMEOUT = 60.0

# SPEC.md "Health and metrics": name -> (type, {label: the exact set of values, or None for any}).
SPEC_METRICS: dict[str, tuple[str, dict[str, set[str] | None]]] = {
    "echod_connections_accepted_total": ("counter", {}),
    # proxy_protocol and rejected are extensions (PROXY protocol listeners, README); tls is SPEC's 2026-12-03.
    "echod_connections_closed_total": (
        "counter",
        {"reason": {"client", "timeout", "error", "shutdown", "proxy_protocol", "rejected", "tls"}},
    ),
    "echod_connections_active": ("gauge", {}),
    "echod_connections_rejected_total": ("counter", {"reason": {"limit", "emfile", "per_ip"}}),
    "echod_received_bytes_total": ("counter", {}),
    "echod_sent_bytes_total": ("counter", {}),
    "echod_partial_writes_total": ("counter", {}),
    "echod_backpressure_pauses_total": ("counter", {}),
    "echod_buffered_bytes": ("gauge", {}),
    "echod_workers": ("gauge", {}),
    "echod_worker_restarts_total": ("counter", {}),
    "echod_config_reloads_total": ("counter", {"result": {"success", "failure"}}),
    "echod_config_last_reload_successful": ("gauge", {}),
    "echod_build_info": ("gauge", {"version": None, "compiled": None}),
}
# Extensions (README) that the alerting rules and the dashboard rely on.
EXTENSION_METRICS: dict[str, tuple[str, dict[str, set[str] | None]]] = {
    "echod_workers_configured": ("gauge", {}),
    "echod_worker_resident_memory_bytes": ("gauge", {"slot": None, "state": None, "pid": None}),
    # UDP echo (udp_listen): exposed, zero, even while UDP is off.
    "echod_udp_received_packets_total": ("counter", {}),
    "echod_udp_received_bytes_total": ("counter", {}),
    "echod_udp_sent_packets_total": ("counter", {}),
    "echod_udp_sent_bytes_total": ("counter", {}),
    "echod_udp_dropped_packets_total": (
        "counter",
        {"reason": {"source_port", "rate_limit", "too_many_sources", "send_failed"}},
    ),
    # TLS listeners (issue 17)
    "echod_tls_handshakes_total": ("counter", {"result": {"success", "failure"}}),
    "echod_tls_connections_active": ("gauge", {}),
}

REQUIRED_ALERTS = {
    "EchodDown",
    "EchodWorkerRestarts",
    "EchodReloadFailed",
    "EchodConnectionsNearLimit",
    "EchodBackpressureSurge",
    "EchodNotHealthy",
}
# What the dashboard must show (the brief's panel list, by the metric each panel is built from).
DASHBOARD_METRICS = {
    "echod_connections_active",
    "echod_connections_accepted_total",
    "echod_connections_closed_total",
    "echod_received_bytes_total",
    "echod_sent_bytes_total",
    "echod_buffered_bytes",
    "echod_worker_restarts_total",
    "echod_config_reloads_total",
    "echod_workers",
    "echod_workers_configured",
    "echod_worker_resident_memory_bytes",
}
# Grafana's own variables, replaced by values Prometheus accepts when its expressions are run for real.
GRAFANA_VARIABLES = {"$__rate_interval": "10s", "$__range": "1m", "$instance": ".*"}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}
PROMQL_KEYWORDS |= {"and", "or", "unless", "atan2", "inf", "nan"}

ACCEPTED = "echod_connections_accepted_total"
RECEIVED = "echod_received_bytes_total"
SENT = "echod_sent_bytes_total"
RESTARTS = "echod_worker_restarts_total"
ACTIVE = "echod_connections_active"


def closed(reason: str) -> str:
    return f'echod_connections_closed_total{{reason="{reason}"}}'


# -- helpers ------------------------------------------------------------------------------------
def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/bin:/usr/local/bin")
    if path is None:
        pytest.fail(f"{name} is not installed: run `make system-deps` (Debian package `prometheus`)")
    return path


def run_tool(args: list[str], cwd: Path = REPO, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False
    )


def scrape(daemon: Daemon) -> str:
    status, text = daemon.http("/metrics")
    assert status == 200, f"/metrics answered {status}: {text}"
    return text


def type_lines(text: str) -> dict[str, str]:
    """`# TYPE name kind` lines of an exposition: name -> kind."""
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            assert name not in types, f"two TYPE lines for {name}"
            types[name] = kind
    return types


def sample_labels(text: str) -> dict[str, list[dict[str, str]]]:
    """Sample name -> the label sets of its samples."""
    samples: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(dict(sample.labels))
    return samples


def keyed(text: str) -> dict[str, float]:
    """Samples keyed like conftest's Daemon.metrics(): 'name{label="value"}'."""
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def brief(samples: dict[str, float]) -> str:
    return ", ".join(
        f"{k}={v:g}"
        for k, v in samples.items()
        if k.startswith("echod_") and "memory" not in k and "_fds" not in k
    )


class CounterWatch:
    """Scrapes /metrics and fails as soon as any counter is lower than it has been, or disappears."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.high: dict[str, float] = {}
        self.scrapes = 0

    def sample(self) -> dict[str, float]:
        text = scrape(self.daemon)
        counters = {name for name, kind in type_lines(text).items() if kind == "counter"}
        samples = keyed(text)
        seen = set()
        for key, value in samples.items():
            if key.split("{", 1)[0] not in counters:
                continue
            seen.add(key)
            before = self.high.get(key)
            assert before is None or value >= before, f"counter {key} went backwards: {before:g} -> {value:g}"
            self.high[key] = value
        assert set(self.high) <= seen, f"counters vanished from /metrics: {sorted(set(self.high) - seen)}"
        self.scrapes += 1
        return samples

    def wait(self, check: Callable[[dict[str, float]], bool], what: str, timeout: float = LIVENESS) -> dict:
        last: dict[str, float] = {}

        def poll() -> bool:
            nonlocal last
            last = self.sample()
            return check(last)

        try:
            wait_for(poll, timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nlast scrape: {brief(last)}\n{self.daemon.log()}") from None
        return last


def echo_and_close(daemon: Daemon, connections: int, size: int) -> int:
    """`connections` sequential connections that each echo `size` bytes, then close with a FIN."""
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    for _ in range(connections):
        with daemon.connect(timeout=LIVENESS) as sock:
            assert echo_roundtrip(sock, payload) == payload
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(1) == b"", "echod did not close after the client's FIN"
    return connections * size


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords, labels and durations removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors and subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", text):
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if match.group().lower() not in PROMQL_KEYWORDS:
            names.add(match.group())
    return names


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard.get("panels", []):
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows keep their panels inside
    return [panel for panel in panels if panel.get("type") != "row"]


def dashboard_expressions(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression in the dashboard: panel targets and query variables (label_values)."""
    exprs = [target["expr"] for panel in dashboard_panels(dashboard) for target in panel.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or ""
        match = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query)
        exprs.append(match.group(1) if match else query)
    return exprs


def rule_expressions() -> list[str]:
    return re.findall(r"^\s+expr:\s*(.+?)\s*$", RULES.read_text(), flags=re.MULTILINE)


def alert_names() -> list[str]:
    return re.findall(r"^\s+- alert:\s*(\w+)\s*$", RULES.read_text(), flags=re.MULTILINE)


def prom_query(port: int, expr: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]["result"]


def prom_get(port: int, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]


# -- /metrics format ----------------------------------------------------------------------------
@pytest.mark.integration
def test_promtool_check_metrics_fresh_and_after_traffic(echod):
    promtool = tool("promtool")
    daemon = echod(workers=2)

    def lint(text: str, when: str) -> None:
        result = run_tool([promtool, "check", "metrics"], stdin=text)
        complaints = (result.stdout + result.stderr).strip()
        assert result.returncode == 0 and not complaints, (
            f"promtool check metrics ({when}) rc={result.returncode}:\n{complaints}\n--- exposition:\n{text}"
        )

    lint(scrape(daemon), "fresh")
    total = echo_and_close(daemon, 3, 20_000)
    with daemon.connect() as sock:  # an abortive close: counted under reason="error"
        assert echo_roundtrip(sock, b"bye") == b"bye"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    watch = CounterWatch(daemon)
    watch.wait(lambda m: m[RECEIVED] == total + 3 and m[ACCEPTED] == 4, "the traffic to show in /metrics")
    lint(scrape(daemon), "after traffic")


@pytest.mark.integration
def test_spec_metrics_have_their_type_and_labels(echod):
    daemon = echod(workers=2)
    clients = [daemon.connect() for _ in range(2)]
    try:
        ports = {str(sock.getsockname()[1]) for sock in clients}
        for sock in clients:
            assert echo_roundtrip(sock, b"label check") == b"label check"
        CounterWatch(daemon).wait(lambda m: m[ACTIVE] == 2, "two active connections")
        text = scrape(daemon)
    finally:
        for sock in clients:
            sock.close()
    types, samples = type_lines(text), sample_labels(text)

    problems = []
    for name, (kind, labels) in {**SPEC_METRICS, **EXTENSION_METRICS}.items():
        if types.get(name) != kind:
            problems.append(f"{name}: '# TYPE {name} {kind}' expected, got {types.get(name)!r}")
            continue
        if name not in samples:
            problems.append(f"{name}: no sample")
            continue
        for label_set in samples[name]:
            if set(label_set) != set(labels):
                problems.append(f"{name}: labels {sorted(label_set)}, expected {sorted(labels)}")
        for label, values in labels.items():
            seen = {label_set.get(label) for label_set in samples[name]}
            if values is not None and seen != values:
                problems.append(f"{name}: {label} values {sorted(map(str, seen))}, expected {sorted(values)}")
    assert not problems, "\n".join(problems) + f"\n--- exposition:\n{text}"

    # The daemon runs the build the tests import (conftest.ECHOD): compiled or not, it says which.
    compiled = "true" if echod_build.is_compiled() else "false"
    assert samples["echod_build_info"] == [{"version": echod_package.__version__, "compiled": compiled}]
    values = keyed(text)
    assert values[f'echod_build_info{{compiled="{compiled}",version="{echod_package.__version__}"}}'] == 1
    assert values["echod_workers"] == 2 and values["echod_workers_configured"] == 2
    rss = [labels for labels in samples["echod_worker_resident_memory_bytes"]]
    assert sorted(labels["slot"] for labels in rss) == ["0", "1"], rss
    assert all(labels["state"] == "serving" for labels in rss), rss
    # SPEC: label values never include client addresses.
    for name, label_sets in samples.items():
        for label_set in label_sets:
            for value in label_set.values():
                assert "127.0.0.1" not in value and value not in ports, f"{name} has a client label {value}"


# -- counters -----------------------------------------------------------------------------------
@pytest.mark.integration
def test_byte_and_connection_counters_equal_the_traffic(echod):
    daemon = echod(workers=2)
    watch = CounterWatch(daemon)
    fresh = watch.sample()
    assert fresh[ACCEPTED] == 0 and fresh[RECEIVED] == 0 and fresh[SENT] == 0, brief(fresh)

    size = 100_000
    payloads = [bytes([65 + i]) * size for i in range(3)]
    socks = [daemon.connect(timeout=LIVENESS) for _ in payloads]
    try:
        for sock, payload in zip(socks, payloads, strict=True):
            assert echo_roundtrip(sock, payload) == payload
        watch.wait(
            lambda m: m[ACTIVE] == 3 and m[RECEIVED] == 3 * size and m[SENT] == 3 * size,
            "3 active connections and all their bytes counted",
        )
        for sock in socks:
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(1) == b"", "echod did not close after the client's FIN"
    finally:
        for sock in socks:
            sock.close()

    final = watch.wait(
        lambda m: m[closed("client")] == 3 and m[ACTIVE] == 0, "3 connections closed by client"
    )
    expected = {
        ACCEPTED: 3,
        RECEIVED: 3 * size,
        SENT: 3 * size,
        closed("client"): 3,
        closed("timeout"): 0,
        closed("error"): 0,
        closed("shutdown"): 0,
        'echod_connections_rejected_total{reason="limit"}': 0,
        'echod_connections_rejected_total{reason="emfile"}': 0,
        ACTIVE: 0,
        "echod_buffered_bytes": 0,
        "echod_dropped_bytes_total": 0,
        RESTARTS: 0,
    }
    assert {key: final.get(key) for key in expected} == expected, brief(final)


@pytest.mark.integration
def test_counters_stay_monotonic_across_worker_kill_and_reload(echod):
    daemon = echod(workers=2)
    watch = CounterWatch(daemon)
    watch.sample()

    # Traffic, then wait until /metrics shows it: a SIGKILLed worker loses only what it had not published.
    total = echo_and_close(daemon, 4, 30_000)
    connections = 4

    def counted(m: dict[str, float]) -> bool:
        return (
            m[RECEIVED] == total
            and m[SENT] == total
            and m[ACCEPTED] == connections
            and m[closed("client")] == connections
        )

    watch.wait(counted, f"{total} bytes on {connections} connections counted")

    victim = daemon.workers()[0]
    os.kill(victim, signal.SIGKILL)
    watch.wait(
        lambda m: m[RESTARTS] == 1 and m["echod_workers"] == 2 and victim not in daemon.workers(),
        "the killed worker to be counted and replaced",
    )
    after_kill = watch.sample()
    assert counted(after_kill), f"traffic from before the kill was lost: {brief(after_kill)}"
    assert len(daemon.workers()) == 2

    total += echo_and_close(daemon, 2, 30_000)
    connections += 2
    watch.wait(counted, "traffic after the restart counted on top")

    # A connection held open across the reload keeps being echoed (by its retiring worker or whoever
    # it was handed to), and what it carried must still be counted once the old workers are gone.
    held = daemon.connect(timeout=LIVENESS)
    try:
        assert echo_roundtrip(held, b"before reload") == b"before reload"
        total += len(b"before reload")
        connections += 1
        old_workers = daemon.workers()
        daemon.send_signal(signal.SIGHUP)
        watch.wait(
            lambda m: (
                m['echod_config_reloads_total{result="success"}'] == 1
                and m["echod_config_generation"] == 2
                and m["echod_workers"] == 2
            ),
            "the reload to complete",
        )
        assert echo_roundtrip(held, b"after reload") == b"after reload"
        total += len(b"after reload")
        held.shutdown(socket.SHUT_WR)
        assert held.recv(1) == b"", "echod did not close the held connection after its FIN"
    finally:
        held.close()
    wait_for(lambda: not set(old_workers) & set(daemon.workers()), LIVENESS, "the old workers to exit")
    after_reload = watch.wait(counted, "every byte, including the retired workers', still counted")
    assert after_reload[RESTARTS] == 1, brief(after_reload)  # retiring is not dying

    total += echo_and_close(daemon, 2, 30_000)
    connections += 2
    watch.wait(counted, "traffic after the reload counted on top")
    assert watch.scrapes >= 6


# -- /healthz -----------------------------------------------------------------------------------
@pytest.mark.integration
def test_healthz_follows_the_workers_heartbeat(echod):
    daemon = echod("--heartbeat-timeout", "60", workers=2)  # the master must not replace the stopped one
    status, body = daemon.http("/healthz")
    assert status == 200, body
    for path in ("/", "/health", "/healthz/x", "/metrics/x", "/favicon.ico", "/HEALTHZ"):
        assert daemon.http(path)[0] == 404, path

    workers = daemon.workers()
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGSTOP)
    try:
        wait_for(lambda: daemon.http("/healthz")[0] == 503, LIVENESS, "/healthz 503 with a stopped worker")
        assert daemon.http("/metrics")[0] == 200
    finally:
        os.kill(workers[0], signal.SIGCONT)
    wait_for(lambda: daemon.http("/healthz")[0] == 200, LIVENESS, "/healthz 200 after SIGCONT")
    assert daemon.workers() == workers, "the master replaced a worker that was only stopped"
    assert daemon.metrics()[RESTARTS] == 0


# -- slow HTTP clients --------------------------------------------------------------------------
@pytest.mark.integration
def test_slow_http_client_does_not_block_metrics_or_echo(echod):
    daemon = echod(workers=2)
    assert daemon.metrics_port is not None
    stalled: list[socket.socket] = []
    try:
        for partial in (
            b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n",
            b"GE",
            b"",
            b"GET /healthz HTTP/1.1\r\n",
        ):
            sock = socket.create_connection(("127.0.0.1", daemon.metrics_port), timeout=LIVENESS)
            sock.sendall(partial)
            stalled.append(sock)
        for _ in range(3):
            status, text = daemon.http("/metrics")  # 5 s timeout: a blocked server fails this
            assert status == 200 and f"# TYPE {ACCEPTED} counter" in text
            assert daemon.http("/healthz")[0] == 200
            with daemon.connect(timeout=LIVENESS) as sock:
                assert echo_roundtrip(sock, b"still echoing") == b"still echoing"
        # The stalled requests are really pending: nothing was answered to them.
        for sock in stalled:
            sock.settimeout(0.3)
            with pytest.raises(TimeoutError):
                sock.recv(1)
    finally:
        for sock in stalled:
            sock.close()


# -- a real Prometheus server -------------------------------------------------------------------
class Load(threading.Thread):
    """Echo traffic in a loop until halted."""

    def __init__(self, daemon: Daemon) -> None:
        super().__init__(daemon=True)
        self.target = daemon
        self.halt = threading.Event()
        self.errors: list[str] = []
        self.rounds = 0

    def run(self) -> None:
        payload = b"p" * 4096
        while not self.halt.is_set():
            try:
                with self.target.connect(timeout=LIVENESS) as sock:
                    for _ in range(8):
                        if echo_roundtrip(sock, payload) != payload:
                            self.errors.append("echo mismatch")
                self.rounds += 1
            except OSError as exc:
                self.errors.append(repr(exc))
            self.halt.wait(0.05)


class Prometheus:
    """A Prometheus server started in the foreground on a free loopback port."""

    def __init__(self, binary: str, tmp: Path, config: str) -> None:
        self.config_file = tmp / "prometheus.yml"
        self.config_file.write_text(config)
        self.log_path = tmp / "prometheus.log"
        self.port = free_port()
        self.log_file = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={self.config_file}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def query(self, expr: str) -> list[dict[str, Any]] | None:
        """The result vector, or None while the server is not answering yet."""
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return prom_query(self.port, expr)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def wait(self, predicate: Callable[[], object], what: str) -> object:
        try:
            return wait_for(predicate, PROMETHEUS_DEADLINE, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- prometheus log:\n{self.log()[-3000:]}") from None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log_file.close()


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[str], Prometheus]]:
    """Factory: start Prometheus with the given config text. Stopped at teardown, whatever happened."""
    binary = tool("prometheus")
    started: list[Prometheus] = []

    def start(config: str) -> Prometheus:
        started.append(Prometheus(binary, tmp_path, config))
        return started[-1]

    yield start
    for server in started:
        server.stop()


@pytest.mark.integration
def test_real_prometheus_scrapes_echod(echod, prometheus):
    daemon = echod(workers=2)
    server = prometheus(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  evaluation_interval: 1s\n"
        f"rule_files:\n  - {RULES}\n"
        "scrape_configs:\n"
        "  - job_name: echod\n"
        "    metrics_path: /metrics\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{daemon.metrics_port}']\n"
    )
    load = Load(daemon)
    load.start()
    try:
        server.wait(lambda: server.value('up{job="echod"}') == 1, 'up{job="echod"} == 1')
        result = server.query('up{job="echod"}')
        assert result and result[0]["metric"]["instance"] == f"127.0.0.1:{daemon.metrics_port}", result
        server.wait(
            lambda: (server.value('rate(echod_received_bytes_total{job="echod"}[5s])') or 0) > 0,
            "a positive rate of received bytes",
        )
        # The deploy rules load and evaluate cleanly against the live series.
        server.wait(
            lambda: (server.value('instance:echod_received_bytes:rate1m{job="echod"}') or 0) > 0,
            "the recording rule to record a positive rate",
        )

        def rules_evaluated() -> list[dict[str, Any]] | None:
            groups = prom_get(server.port, "/api/v1/rules")["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            done = rules and all(not rule.get("lastEvaluation", "0001").startswith("0001") for rule in rules)
            return rules if done else None

        rules = server.wait(rules_evaluated, "every rule evaluated")
        assert isinstance(rules, list)
        unhealthy = [(rule["name"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"]
        assert not unhealthy, unhealthy
        alerts = {rule["name"]: rule for rule in rules if rule["type"] == "alerting"}
        assert set(alerts) >= REQUIRED_ALERTS, sorted(alerts)
        for name, rule in alerts.items():
            assert rule["labels"].get("severity") in {"critical", "warning", "info"}, (name, rule["labels"])
            assert {"summary", "description"} <= set(rule["annotations"]), (name, rule["annotations"])
            assert rule["state"] == "inactive", f"{name} is {rule['state']} against a healthy daemon"

        # Every dashboard expression runs and finds data.
        for expr in dashboard_expressions(json.loads(DASHBOARD.read_text())):
            for variable, replacement in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, replacement)
            server.wait(lambda expr=expr: server.query(expr), f"dashboard query {expr} to return data")
    finally:
        load.halt.set()
        load.join(LIVENESS)
    assert not load.errors, load.errors[:5]
    assert load.rounds > 0


# -- deploy/ files --------------------------------------------------------------------------------
@pytest.mark.integration
def test_prometheus_config_is_valid_and_scrapes_echod():
    result = run_tool([tool("promtool"), "check", "config", str(PROM_CONFIG.relative_to(REPO))])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "1 rule files found" in result.stdout, result.stdout
    text = PROM_CONFIG.read_text()
    assert re.search(r"^\s*-\s*job_name:\s*echod\s*$", text, re.MULTILINE), text
    assert re.search(r"^\s*metrics_path:\s*/metrics\s*$", text, re.MULTILINE), text
    assert re.search(r"^\s*-\s*['\"]?127\.0\.0\.1:9640['\"]?\s*$", text, re.MULTILINE), text
    assert re.search(r"^\s*-\s*echod-rules\.yml\s*$", text, re.MULTILINE), text


@pytest.mark.integration
def test_rules_are_valid_and_complete():
    result = run_tool([tool("promtool"), "check", "rules", str(RULES.relative_to(REPO))])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout
    alerts = alert_names()
    assert set(alerts) >= REQUIRED_ALERTS, alerts
    blocks = re.split(r"^\s+- (?=alert:|record:)", RULES.read_text(), flags=re.MULTILINE)[1:]
    for block in blocks:
        if block.startswith("alert:"):
            for needed in ("severity:", "summary:", "description:", "expr:"):
                assert needed in block, f"{block.splitlines()[0]} lacks {needed}"


@pytest.mark.integration
def test_rule_unit_tests_pass_and_cover_every_alert(tmp_path):
    promtool = tool("promtool")
    result = run_tool([promtool, "test", "rules", RULES_TEST.name], cwd=PROM_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout

    text = RULES_TEST.read_text()
    fires = set(re.findall(r"alertname:\s*(\w+)\s*\n\s*exp_alerts:\s*\n\s*- exp_labels:", text))
    quiet = set(re.findall(r"alertname:\s*(\w+)\s*\n\s*exp_alerts:\s*\[\]", text))
    alerts = set(alert_names())
    assert alerts <= fires, f"alerts never expected to fire: {sorted(alerts - fires)}"
    assert alerts <= quiet, f"alerts never expected to stay quiet: {sorted(alerts - quiet)}"

    # The unit tests bite: an alert whose expression never matches must make them fail.
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    for name in sorted(alerts):
        broken, count = re.subn(
            rf"(- alert: {name}\n\s+expr: ).*", r"\1vector(0) > 1", RULES.read_text(), flags=re.MULTILINE
        )
        assert count == 1, f"cannot find the one-line expr of {name}"
        (tmp_path / RULES.name).write_text(broken)
        mutated = run_tool([promtool, "test", "rules", RULES_TEST.name], cwd=tmp_path)
        assert mutated.returncode != 0, f"promtool test rules passes with {name} broken"
        assert f"alertname: {name}" in mutated.stdout + mutated.stderr, mutated.stdout + mutated.stderr


@pytest.mark.integration
def test_dashboard_and_rules_use_only_exported_metrics(echod):
    dashboard = json.loads(DASHBOARD.read_text())
    daemon = echod(workers=2)
    exported = set(sample_labels(scrape(daemon)))

    variables = dashboard["templating"]["list"]
    datasources = [v["name"] for v in variables if v["type"] == "datasource" and v["query"] == "prometheus"]
    assert datasources, "no Prometheus datasource variable"
    uid = f"${{{datasources[0]}}}"
    panels = dashboard_panels(dashboard)
    assert panels
    for panel in panels:
        assert panel.get("title"), panel
        assert panel.get("datasource", {}).get("uid") == uid, f"{panel['title']}: datasource not {uid}"
        assert panel.get("targets"), f"{panel['title']}: no query"
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"{panel['title']}: empty expression"
            assert target.get("datasource", {}).get("uid", uid) == uid, panel["title"]
    ids = [panel["id"] for panel in panels]
    assert len(set(ids)) == len(ids), f"panel ids repeat: {ids}"

    used: set[str] = set()
    for expr in dashboard_expressions(dashboard):
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= exported, f"{expr!r} uses metrics echod does not export: {sorted(names - exported)}"
        used |= names
    assert used >= DASHBOARD_METRICS, f"the dashboard lacks {sorted(DASHBOARD_METRICS - used)}"
    legends = {t["expr"]: t.get("legendFormat", "") for p in panels for t in p["targets"]}
    assert any("echod_connections_closed_total" in e and "{{reason}}" in lg for e, lg in legends.items())
    assert any("echod_config_reloads_total" in e and "{{result}}" in lg for e, lg in legends.items())

    recorded = set(re.findall(r"^\s+- record:\s*(\S+)\s*$", RULES.read_text(), flags=re.MULTILINE))
    for expr in rule_expressions():
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        unknown = names - exported - recorded - {"up"}
        assert not unknown, f"rule {expr!r} uses metrics echod does not export: {sorted(unknown)}"


def test_metric_name_extraction_finds_typos():
    # The check above is only as good as this parser: it must see every selected name, and only those.
    assert metric_names(
        'sum by (instance, reason) (rate(echod_x_total{job="echod", a=~"$i"}[$__rate_interval]))'
    ) == {"echod_x_total"}
    assert metric_names("echod_a > 0.8 * 10000 * echod_b") == {"echod_a", "echod_b"}
    assert metric_names('up{job="echod"} == 0 and on (instance) echod_c offset 5m') == {"up", "echod_c"}
