"""Prometheus exposition and /healthz, served by a small process of their own.

The master forks this process after creating the shared statistics table. It serves HTTP with
threads, which is safe only because it never forks; keeping it out of the master also means a slow
or hostile scraper can never stall signal handling or worker supervision.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from . import __version__, build, histograms, stats
from .stats import Stats

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
HTTP_TIMEOUT = 10.0  # seconds a scraper may take to send its request
HEALTH_STALE_S = 3.0


class StatsCollector(Collector):
    def __init__(self, table: Stats, heartbeat_timeout: float) -> None:
        self.table = table
        # Workers beat once a second; a beat older than this makes /healthz say 503 long before the
        # master's heartbeat_timeout replaces the worker.
        self.stale_ms = min(HEALTH_STALE_S, heartbeat_timeout) * 1000

    def collect(self) -> Iterator[Metric]:
        snap = self.table.snapshot()
        master, workers, total, gauge = snap.master, snap.workers, snap.total, snap.gauge

        yield _counter("echod_connections_accepted", "Connections accepted", total(stats.ACCEPTED))
        closed = CounterMetricFamily("echod_connections_closed", "Connections closed", labels=["reason"])
        for reason, field in stats.CLOSE_REASONS.items():
            closed.add_metric([reason], total(field))
        yield closed
        rejected = CounterMetricFamily(
            "echod_connections_rejected", "Connections accepted and closed at once", labels=["reason"]
        )
        for reason, field in stats.REJECT_REASONS.items():
            rejected.add_metric([reason], total(field))
        yield rejected
        yield _gauge("echod_connections_active", "Open client connections", gauge(stats.ACTIVE))
        yield _counter("echod_received_bytes", "Bytes read from clients", total(stats.RECEIVED_BYTES))
        yield _counter("echod_sent_bytes", "Bytes echoed back to clients", total(stats.SENT_BYTES))
        yield _counter(
            "echod_partial_writes", "Sends the kernel took only part of", total(stats.PARTIAL_WRITES)
        )
        yield _counter(
            "echod_backpressure_pauses",
            "Times reading from a connection stopped at write_buffer_high",
            total(stats.BACKPRESSURE_PAUSES),
        )
        yield _counter(
            "echod_dropped_bytes",
            "Bytes read but not echoed (client reset, idle timeout, shutdown_timeout expiry)",
            total(stats.DROPPED_BYTES),
        )
        yield _counter(
            "echod_connections_handed_over",
            "Established connections passed to a successor worker on reload, scaling or upgrade",
            total(stats.HANDED_OVER),
        )
        yield _gauge("echod_buffered_bytes", "Pending output, all connections", gauge(stats.BUFFERED))
        handshakes = CounterMetricFamily("echod_tls_handshakes", "TLS handshakes", labels=["result"])
        handshakes.add_metric(["success"], total(stats.TLS_HANDSHAKES_OK))
        handshakes.add_metric(["failure"], total(stats.TLS_HANDSHAKES_FAILED))
        yield handshakes
        yield _gauge("echod_tls_connections_active", "Open TLS connections", gauge(stats.TLS_ACTIVE))
        yield from self._udp(total)
        yield from self._insight(total)
        yield _gauge(
            "echod_workers",
            "Live workers of the current configuration",
            self._current(master, workers, fresh_only=False),
        )
        yield _gauge(
            "echod_workers_configured", "Workers the configuration asks for", master[stats.M_WORKERS_WANTED]
        )
        yield _counter(
            "echod_worker_restarts", "Workers replaced after dying", master[stats.M_WORKER_RESTARTS]
        )
        reloads = CounterMetricFamily("echod_config_reloads", "Configuration reloads", labels=["result"])
        reloads.add_metric(["success"], master[stats.M_RELOAD_SUCCESS])
        reloads.add_metric(["failure"], master[stats.M_RELOAD_FAILURE])
        yield reloads
        yield _gauge(
            "echod_config_last_reload_successful",
            "1 if the last reload succeeded",
            master[stats.M_LAST_RELOAD_OK],
        )
        yield _gauge("echod_config_generation", "Configuration generation served", master[stats.M_GENERATION])
        info = GaugeMetricFamily(
            "echod_build_info", "echod version; compiled: the data path runs mypyc-compiled (echod/build.py)",
            labels=["version", "compiled"],
        )  # fmt: skip
        info.add_metric([__version__, "true" if build.is_compiled() else "false"], 1)
        yield info
        yield self._rss(workers, snap.others)

    @staticmethod
    def _udp(total: Callable[[int], int]) -> Iterator[Metric]:
        yield _counter(
            "echod_udp_received_packets", "UDP datagrams received", total(stats.UDP_RECEIVED_PACKETS)
        )
        yield _counter(
            "echod_udp_received_bytes", "UDP payload bytes received", total(stats.UDP_RECEIVED_BYTES)
        )
        yield _counter("echod_udp_sent_packets", "UDP datagrams echoed", total(stats.UDP_SENT_PACKETS))
        yield _counter("echod_udp_sent_bytes", "UDP payload bytes echoed", total(stats.UDP_SENT_BYTES))
        dropped = CounterMetricFamily(
            "echod_udp_dropped_packets", "UDP datagrams not answered, by reason", labels=["reason"]
        )
        for reason, field in stats.UDP_DROP_REASONS.items():
            dropped.add_metric([reason], total(field))
        yield dropped

    @staticmethod
    def _insight(total: Callable[[int], int]) -> Iterator[Metric]:
        """Issue 18: what connections saw at close (histograms.py, worker/insight.py)."""
        block = [total(stats.INSIGHT + field) for field in range(histograms.FIELDS)]
        yield _counter(
            "echod_access_log_dropped_lines",
            "Access log lines dropped because the file could not take them at once",
            block[histograms.ACCESS_LOG_DROPPED],
        )
        yield _counter(
            "echod_tcp_retransmitted_segments",
            "TCP segments retransmitted on the connections closed (TCP_INFO at close)",
            block[histograms.TCP_RETRANSMITS],
        )
        for h in histograms.ALL:
            buckets, total_sum = histograms.cumulative(h, block)
            yield HistogramMetricFamily(h.name, h.help, buckets=buckets, sum_value=total_sum)

    def _current(self, master: list[int], workers: Iterable[list[int]], fresh_only: bool) -> int:
        now = stats.monotonic_ms()
        return sum(
            1
            for row in workers
            if row[stats.GENERATION] == master[stats.M_GENERATION]
            and row[stats.STATE] == stats.STATE_ACCEPTING
            and (not fresh_only or now - row[stats.HEARTBEAT_MS] < self.stale_ms)
        )

    @staticmethod
    def _rss(workers: list[list[int]], others: list[list[int]]) -> Metric:
        # pid tells apart a slot's serving and retiring workers (reload, upgrade).
        family = GaugeMetricFamily(
            "echod_worker_resident_memory_bytes",
            "Resident memory per worker",
            labels=["slot", "state", "pid"],
        )
        for row in workers + others:
            try:
                with open(f"/proc/{row[stats.PID]}/statm", "rb") as handle:
                    pages = int(handle.read().split()[1])
            except (OSError, ValueError, IndexError):
                continue
            retiring = row[stats.STATE] == stats.STATE_DRAINING or row in others
            state = "retiring" if retiring else "serving"
            family.add_metric([str(row[stats.SLOT]), state, str(row[stats.PID])], pages * PAGE_SIZE)
        return family

    def healthy(self) -> bool:
        snap = self.table.snapshot()
        wanted = snap.master[stats.M_WORKERS_WANTED]
        return wanted > 0 and self._current(snap.master, snap.workers, fresh_only=True) >= wanted


def _counter(name: str, documentation: str, value: float) -> Metric:
    return CounterMetricFamily(name, documentation, value=value)


def _gauge(name: str, documentation: str, value: float) -> Metric:
    return GaugeMetricFamily(name, documentation, value=value)


def make_app(collector: StatsCollector, master_pid: int) -> WSGIApplication:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(namespace="echod_master", pid=lambda: master_pid, registry=registry)
    metrics_app: WSGIApplication = make_wsgi_app(registry)  # prometheus_client says only `Callable`

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics_app(environ, start_response)
        if path == "/healthz":
            ok = collector.healthy()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"ok\n" if ok else b"unavailable\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    return app


class _QuietHandler(WSGIRequestHandler):
    timeout = HTTP_TIMEOUT

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def __init__(self, sock: socket.socket, master_pid: int) -> None:
        super().__init__(sock.getsockname()[:2], _QuietHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_name = "echod"
        self.server_port = sock.getsockname()[1]
        self.setup_environ()
        self.master_pid = master_pid

    def service_actions(self) -> None:
        if os.getppid() != self.master_pid:  # the master died: do not outlive it
            raise SystemExit(0)


def serve(sock: socket.socket, table: Stats, heartbeat_timeout: float, master_pid: int) -> int:
    """Entry point of the metrics process (already forked)."""
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    ignored = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU)
    for signum in ignored:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, *ignored})
    sock.setblocking(True)
    server = _Server(sock, master_pid)
    server.set_app(make_app(StatsCollector(table, heartbeat_timeout), master_pid))
    server.serve_forever(poll_interval=0.5)
    return 0
