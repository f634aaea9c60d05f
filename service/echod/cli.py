"""Command line: `echod run | start | stop | reload | status | check-config`.

One flag per setting is generated from the settings model (`metrics.listen` -> `--metrics-listen`), so
a new key gets its flag for free and the names cannot drift from the keys (README.md, "Configuration").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pydantic.fields import FieldInfo

from . import build, daemon
from .config import ConfigError, Settings, quote_key
from .config_help import setting_fields, setting_help, setting_metavar
from .config_load import config_path, load_settings
from .startup import config_failure

EX_USAGE = 2


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
    parser.add_argument("--version", action="version", version=f"echod {build.describe()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in (
        ("run", "run in the foreground (what systemd uses)"),
        ("start", "daemonize; return once accepting connections"),
        ("check-config", "validate the configuration and print the effective settings"),
    ):
        sub = commands.add_parser(name, help=help_text)
        _add_setting_options(sub)
        if name == "check-config":  # the unit's ExecStartPre/ExecReload: nothing in the journal when valid
            sub.add_argument(
                "-q",
                "--quiet",
                action="store_true",
                help="print nothing when the configuration is valid (errors still go to stderr)",
            )
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
    if args.command in ("run", "start") and (stale := build.check()):  # echod/build.py: never run old code
        print(f"echod: {stale}", file=sys.stderr)
        return 1
    handler: Callable[[argparse.Namespace], int] = {
        "run": cmd_run,
        "start": cmd_start,
        "check-config": cmd_check_config,
        "stop": daemon.cmd_stop,
        "reload": daemon.cmd_reload,
        "status": daemon.cmd_status,
    }[args.command]
    return handler(args)


def cmd_run(args: argparse.Namespace) -> int:
    return daemon.run(load_from_args(args))


def cmd_start(args: argparse.Namespace) -> int:
    return daemon.start(load_from_args(args))


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        settings = load_from_args(args)()
    except ConfigError as exc:
        return config_failure(exc)
    if not args.quiet:
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
