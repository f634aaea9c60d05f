"""Reload (SIGHUP) and scaling (TTIN/TTOU): new generations, the listener sets they serve, steering.

A reload binds whatever the new configuration adds before anything is retired, starts a whole new
generation, and retires the old one only once every new worker accepts (README: "Reloads, scaling and
upgrades without a single lost connection"). A configuration that fails to load or bind changes nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from . import logs, notify, stats
from .config import MAX_WORKERS, ConfigError, Settings
from .listeners import Address, BindError
from .process import READY_TIMEOUT, Fork, MetricsProcess
from .supervisor import Supervisor

log = logging.getLogger("echod.master")  # the master's lines, wherever they are written


class Reloader:
    def __init__(
        self, supervisor: Supervisor, load: Callable[[], Settings], metrics: MetricsProcess, fork: Fork
    ) -> None:
        self.supervisor = supervisor
        self.listeners = supervisor.listeners
        self.stats = supervisor.stats
        self.load = load
        self.metrics = metrics
        self.fork = fork
        self.started: float | None = None  # while the newest generation is not accepting yet

    @property
    def in_progress(self) -> bool:
        return self.started is not None

    def reload(self) -> None:
        sup = self.supervisor
        log.info("reloading configuration")
        notify.reloading("reloading")
        if self.started is not None:  # a newer configuration supersedes one still starting
            self._count_success(superseded=True)
        held = set(self.listeners.addresses)
        try:
            new = self.load()
            logs.check_file(new.log.file)
            logs.check_access_log(new.access_log)
            self._check_proxy_unchanged(new, held)
            addresses = new.all_addresses
            if self.listeners.shared:  # socket-activated: systemd owns the addresses
                addresses = self.listeners.addresses
            self.listeners.open(addresses, max(new.worker_count, sup.wanted), active=new.worker_count)
            metrics_sock = self.metrics.rebind(sup.settings.metrics.listen, new.metrics.listen)
        except Exception as exc:  # whatever went wrong, the running configuration keeps serving
            for address in set(self.listeners.addresses) - held:  # bound for a reload that failed
                self.listeners.close_address(address)
            if not isinstance(exc, (ConfigError, BindError, OSError)):
                log.exception("unexpected error while reloading (please report it)")
            self._failed(str(exc))
            return
        logs.setup(new.log.level, new.log.format, new.log.file)
        sup.begin_generation(new, frozenset((sup.dropping | held) - set(addresses)))
        self.started = time.monotonic()
        if metrics_sock is not self.metrics.sock:
            self.metrics.replace(metrics_sock, self.fork, new.heartbeat_timeout)
        sup.spawn_all()
        sup.publish()

    def _check_proxy_unchanged(self, new: Settings, held: set[Address]) -> None:
        """Old and new workers share a kept address's queue for a while: they must read it alike."""
        kept = held & set(new.addresses)
        old = self.supervisor.settings
        for what, before, after in (
            ("proxy_protocol", old.proxy_addresses(), new.proxy_addresses()),
            ("TLS on or off", set(old.tls_addresses()), set(new.tls_addresses())),
        ):
            changed = sorted(str(a) for a in (before ^ after) & kept)
            if changed:
                raise ConfigError(
                    f"listeners: {what} cannot change on a reload for {', '.join(changed)}, which stays"
                    " open (old and new workers share its queue); restart echod, or use another address"
                )

    def _count_success(self, superseded: bool = False) -> None:
        self.stats.master[stats.M_RELOAD_SUCCESS] += 1
        self.stats.master[stats.M_LAST_RELOAD_OK] = 1
        sup = self.supervisor
        if superseded:
            log.info("reload to generation %d superseded by a newer one", sup.generation)
        else:
            log.info("reload complete: generation %d, %d workers", sup.generation, sup.wanted)

    def _failed(self, why: str) -> None:
        log.error("reload failed, keeping the running configuration:\n%s", why)
        self.stats.master[stats.M_RELOAD_FAILURE] += 1
        self.stats.master[stats.M_LAST_RELOAD_OK] = 0
        notify.notify("READY=1", f"STATUS=reload failed; {self.supervisor.status_line()}")

    def finish(self, now: float) -> None:
        """Retire the old generation once every new worker accepts (or the new one gave up)."""
        sup = self.supervisor
        assert self.started is not None
        if not sup.generation_ready():
            if now - self.started < READY_TIMEOUT:
                return
            log.error("new workers not ready after %.0f s; retiring the old ones anyway", READY_TIMEOUT)
        self.listeners.steer(sup.wanted)
        sup.retire_old_generations()
        for address in sup.dropped():
            self.listeners.close_address(address)
        self.started = None
        self._count_success()
        notify.notify("READY=1", f"STATUS={sup.status_line()}")

    def scale(self, wanted: int) -> None:
        """TTIN/TTOU: one worker more or fewer, within the current generation."""
        sup = self.supervisor
        if not 1 <= wanted <= MAX_WORKERS:
            log.warning("worker count stays at %d (limits 1..%d)", sup.wanted, MAX_WORKERS)
            return
        log.info("workers: %d -> %d", sup.wanted, wanted)
        if wanted > sup.wanted:
            try:
                self.listeners.resize(wanted)
            except BindError as exc:
                log.error("cannot add a worker: %s", exc)
                return
        self.listeners.steer(wanted)  # before retiring anyone: nothing new may reach their sockets
        sup.resize(wanted)
        sup.publish()
