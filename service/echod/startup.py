"""Start-up wiring: load the configuration, bind everything, then build a ready `Master` from its parts.

Two steps, because `echod start` binds in the launching process (so that "address in use" is reported
there, daemon.py) but builds the master only in the daemon, once it knows its pidfile: `prepare` binds,
`build_master` constructs every part with all it needs. Nothing sets a part's attributes afterwards.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass

from . import inherit, logs, notify, upgrade
from .config import EX_CONFIG, MAX_WORKERS, ConfigError, Settings
from .listeners import BindError, ListenerSet, somaxconn, systemd_sockets
from .master import Master
from .process import Forker, MetricsProcess, SignalQueue, bind_metrics
from .reload import Reloader
from .stats import Stats
from .supervisor import Supervisor

EX_UNAVAILABLE = 69  # sysexits.h: cannot bind a listen address

log = logging.getLogger("echod")


def config_failure(exc: ConfigError) -> int:
    print("echod: invalid configuration:", file=sys.stderr)
    for line in str(exc).split("\n"):
        print(f"  {line}", file=sys.stderr)
    return EX_CONFIG


@dataclass
class Prepared:
    """Everything bound and loaded before the master exists (and, for `echod start`, before it forks)."""

    settings: Settings
    load: Callable[[], Settings]  # reads the configuration afresh: every reload calls it
    listeners: ListenerSet
    metrics_sock: socket.socket | None
    stats: Stats
    inherited: inherit.Inherited | None  # we are an in-place upgrade's new master
    predecessor: upgrade.Predecessor | None
    watchdog_every: float | None

    def filenos(self) -> list[int]:
        """The descriptors the master needs (daemonizing closes every other one)."""
        keep = [*self.listeners.filenos(), self.stats.fd]  # stats: an upgrade hands it on
        if self.metrics_sock is not None:
            keep.append(self.metrics_sock.fileno())
        return keep


def prepare(load: Callable[[], Settings]) -> Prepared | int:
    """Load, set up logging and bind everything; returns what the master is built from, or an exit code."""
    inherited = inherit.take(os.environ)  # before the configuration rejects an unknown ECHOD_* name

    try:
        settings = load()
    except ConfigError as exc:
        return config_failure(exc)
    try:
        logs.setup(settings.log.level, settings.log.format, settings.log.file)
    except OSError as exc:
        print(f"echod: invalid configuration:\n  log.file: cannot open {settings.log.file!r}: {exc.strerror}",
              file=sys.stderr)  # fmt: skip
        return EX_CONFIG
    try:
        logs.check_access_log(settings.access_log)
    except OSError as exc:
        why = f"access_log: cannot open {settings.access_log!r}: {exc.strerror}"
        print(f"echod: invalid configuration:\n  {why}", file=sys.stderr)
        return EX_CONFIG
    limit = somaxconn()
    if limit is not None and settings.backlog > limit:
        log.warning("backlog %d is capped at net.core.somaxconn=%d", settings.backlog, limit)
    listeners = ListenerSet(settings.backlog)
    metrics_sock = None
    try:
        if inherited is not None:
            metrics_sock = upgrade.adopt(inherited, listeners, settings)
        activated = systemd_sockets(os.environ)
        for sock in activated:
            address = listeners.adopt([sock], shared=True)
            log.info("using socket-activated listener %s (listen setting ignored)", address)
        if not listeners.shared:
            listeners.open(settings.all_addresses, settings.worker_count)
        if metrics_sock is None:
            metrics_sock = bind_metrics(settings.metrics.listen)
    except BindError as exc:
        listeners.close()
        print(f"echod: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    table = Stats(worker_rows=2 * MAX_WORKERS + 8)  # enough rows for two full generations (a reload)
    predecessor = upgrade.Predecessor.adopt(inherited, table) if inherited is not None else None
    return Prepared(
        settings, load, listeners, metrics_sock, table, inherited, predecessor, notify.watchdog_interval()
    )


def build_master(
    prepared: Prepared, pidfile_fd: int | None = None, on_ready: Callable[[], None] | None = None
) -> Master:
    """The master, ready to run. Call it in the process that runs it (after daemonizing): its pid is
    the one workers watch. `pidfile_fd`: the pidfile `echod start` locked (daemon.py)."""
    handed = prepared.inherited.pidfile if prepared.inherited is not None else None  # the old master's
    pidfile = upgrade.Pidfile(pidfile_fd if pidfile_fd is not None else handed, inherited=handed is not None)
    pid = os.getpid()
    signals = SignalQueue()
    metrics = MetricsProcess(prepared.metrics_sock, prepared.stats, pid)
    fork = Forker(signals, prepared.listeners, metrics).fork
    supervisor = Supervisor(prepared.settings, prepared.listeners, prepared.stats, fork, pid)
    return Master(
        signals=signals,
        fork=fork,
        supervisor=supervisor,
        reloader=Reloader(supervisor, prepared.load, metrics, fork),
        upgrader=upgrade.Upgrader(prepared.listeners, prepared.stats, pidfile, prepared.predecessor),
        metrics=metrics,
        watchdog_every=prepared.watchdog_every,
        on_ready=on_ready,
    )
