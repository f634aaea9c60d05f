"""Command line: `echod run | start | stop | reload | status | check-config`.

One flag per setting is generated from the settings model (`metrics.listen` -> `--metrics-listen`), so
a new key gets its flag for free and the names cannot drift from SPEC.md's rule.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pydantic.fields import FieldInfo

from . import __version__, logs
from .config import (
    EX_CONFIG,
    ConfigError,
    Settings,
    config_path,
    load_settings,
    quote_key,
    setting_fields,
    setting_help,
    setting_metavar,
)
from .listeners import BindError

EX_RUNTIME = 1
EX_USAGE = 2
EX_UNAVAILABLE = 69  # sysexits.h: cannot bind a listen address


def _setting_flags() -> list[tuple[str, str, FieldInfo]]:
    """(flag, dotted key, field info) for every setting: `metrics.listen` -> `--metrics-listen`."""
    return [("--" + key.replace(".", "-").replace("_", "-"), key, field) for key, field in setting_fields()]


def _add_setting_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="PATH", help="TOML file (default: $ECHOD_CONFIG, /etc/echod/echod.toml)"
    )
    group = parser.add_argument_group("settings (override the file and the environment)")
    for flag, key, field in _setting_flags():
        text = setting_help(field).replace("%", "%%")  # argparse %-formats help
        if key in ("listen", "udp_listen"):
            group.add_argument(
                flag, dest=key, action="append", metavar=setting_metavar(field), help="repeatable; " + text
            )
        else:
            group.add_argument(flag, dest=key, metavar=setting_metavar(field), help=text)


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    result: dict[str, object] = {}
    sections: dict[str, dict[str, object]] = {}
    for _flag, key, _field in _setting_flags():
        value: object = getattr(args, key, None)
        if value is None:
            continue
        section, _, sub = key.partition(".")
        if sub:
            result[section] = sections.setdefault(section, {})
            sections[section][sub] = value
        else:
            result[key] = value
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="echod", description="TCP echo service (RFC 862)")
    parser.add_argument("--version", action="version", version=f"echod {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in (
        ("run", "run in the foreground (what systemd uses)"),
        ("start", "daemonize; return once accepting connections"),
        ("check-config", "validate the configuration and print the effective settings"),
    ):
        _add_setting_options(commands.add_parser(name, help=help_text))
    for name, help_text in (
        ("stop", "stop the daemon named by the pidfile and wait for it"),
        ("reload", "send SIGHUP to the daemon"),
        ("status", "LSB status: 0 running, 1 dead with a stale pidfile, 3 not running"),
    ):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--pidfile", metavar="PATH")
        sub.add_argument("--config", metavar="PATH")
        if name == "stop":
            sub.add_argument("--timeout", type=float, default=60.0, metavar="S")
    return parser


def load_from_args(args: argparse.Namespace) -> Callable[[], Settings]:
    """A loader that reads the configuration afresh each call (start and every reload)."""
    overrides = _overrides(args)
    explicit = args.config

    def load() -> Settings:
        return load_settings(overrides, config_path(explicit, os.environ))

    return load


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {
        "run": cmd_run,
        "check-config": cmd_check_config,
    }.get(args.command)
    if handler is None:
        from . import daemon

        handler = getattr(daemon, "cmd_" + args.command.replace("-", "_"))
    return handler(args)


def config_failure(exc: ConfigError) -> int:
    print("echod: invalid configuration:", file=sys.stderr)
    for line in str(exc).split("\n"):
        print(f"  {line}", file=sys.stderr)
    return EX_CONFIG


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        settings = load_from_args(args)()
    except ConfigError as exc:
        return config_failure(exc)
    print(render_toml(settings.effective()), end="")
    return 0


def render_toml(values: dict[str, Any], prefix: str = "") -> str:
    # JSON scalars and arrays of them are valid TOML values, which is all the settings use.
    # ensure_ascii=False: TOML has no surrogate-pair escapes for characters outside the BMP.
    def dump(value: Any) -> str:
        # TOML must have DEL escaped too, which JSON leaves alone.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")

    lines = [
        f"{quote_key(key)} = {dump(value)}" for key, value in values.items() if not isinstance(value, dict)
    ]
    for key, value in values.items():
        if isinstance(value, dict):
            table = prefix + quote_key(key)
            lines += ["", f"[{table}]", *render_toml(value, table + ".").rstrip("\n").split("\n")]
    text = "\n".join(lines) + "\n"
    return text if prefix else text.lstrip("\n")


def prepare(args: argparse.Namespace) -> tuple[Any, int]:
    """Load, set up logging and bind everything; returns (ready-to-run master, 0) or (None, exit code)."""
    from . import upgrade
    from .listeners import ListenerSet, somaxconn, systemd_sockets
    from .master import Master, bind_metrics

    inherited = upgrade.take(os.environ)  # before the configuration rejects an unknown ECHOD_* name

    load = load_from_args(args)
    try:
        settings = load()
    except ConfigError as exc:
        return None, config_failure(exc)
    try:
        logs.setup(settings.log.level, settings.log.format, settings.log.file)
    except OSError as exc:
        print(f"echod: invalid configuration:\n  log.file: cannot open {settings.log.file!r}: {exc.strerror}",
              file=sys.stderr)  # fmt: skip
        return None, EX_CONFIG
    log = logs.logging.getLogger("echod")
    limit = somaxconn()
    if limit is not None and settings.backlog > limit:
        log.warning("backlog %d is capped at net.core.somaxconn=%d", settings.backlog, limit)
    listeners = ListenerSet(settings.backlog)
    metrics_sock = None
    try:
        if inherited is not None:
            metrics_sock = _adopt_inherited(inherited, listeners, settings)
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
        return None, EX_UNAVAILABLE
    master = Master(settings, load, listeners, metrics_sock)
    if inherited is not None:
        master.predecessor_ready_fd = inherited.ready
        master.pidfile_fd = inherited.pidfile
        master.pidfile_inherited = inherited.pidfile is not None
        master.predecessor_pid = os.getppid()
        if not master.stats.adopt_predecessor(inherited.stats):
            log.warning("upgrade: the old master's statistics have another layout; counters restart")
    return master, 0


def _adopt_inherited(inherited: Any, listeners: Any, settings: Settings) -> Any:
    """Take over the sockets of the master we are upgrading; returns the metrics socket to keep."""
    import socket

    from .listeners import Address, parse_address

    wanted = set(settings.all_addresses)
    for fds, shared in inherited.groups:
        socks = [socket.socket(fileno=fd) for fd in fds]
        address = listeners.adopt(socks, shared)
        if not shared and address not in wanted:  # dropped from the configuration meanwhile
            listeners.close_address(address)
    if inherited.metrics is None:
        return None
    sock = socket.socket(fileno=inherited.metrics)
    host, port = sock.getsockname()[:2]
    if settings.metrics.listen and parse_address(settings.metrics.listen) == Address(host, port, sock.family):
        return sock
    sock.close()
    return None


def cmd_run(args: argparse.Namespace) -> int:
    master, code = prepare(args)
    if master is None:
        return code
    from .daemon import drop_privileges

    try:
        drop_privileges(master.settings.daemon.user, master.settings.daemon.group)
    except (OSError, KeyError) as exc:
        print(f"echod: cannot drop privileges: {exc}", file=sys.stderr)
        return EX_RUNTIME
    try:
        return master.run()
    except Exception:
        logs.logging.getLogger("echod").exception("master failed")
        return EX_RUNTIME
