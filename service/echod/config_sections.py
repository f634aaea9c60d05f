"""The configuration's sections ([metrics], [log], [daemon], [listeners."HOST:PORT"]) and the unit names
`--help` shows for values. Every description says what a setting does and in which unit, never its
default: config_help.setting_help() appends that from the field itself. `echod run --help` shows
these texts, and config/echod.toml's comment above each key contains its text (tests/test_config.py
holds both to it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .listeners import parse_address


@dataclass(frozen=True)
class Metavar:
    """What `--help` calls a setting's value, naming its unit: `Annotated[float, Metavar("SECONDS")]`.

    A setting whose type is a Literal needs none: its flag shows the choices (`copy|splice|auto`).
    """

    name: str


Seconds = Metavar("SECONDS")
Bytes = Metavar("BYTES")
Count = Metavar("N")
HostPort = Metavar("HOST:PORT")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MetricsSettings(_Section):
    listen: Annotated[str, HostPort] = Field(
        default="127.0.0.1:9640",
        description='address of the Prometheus /metrics and /healthz endpoint; "" disables both',
    )

    @field_validator("listen")
    @classmethod
    def _address(cls, value: str) -> str:
        if value:
            parse_address(value)
        return value


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="least severe messages logged"
    )
    format: Literal["text", "json"] = Field(
        default="text", description="text lines, or json: one object per line"
    )
    file: Annotated[str, Metavar("PATH")] = Field(
        default="",
        description="file to append the log to, reopened on SIGUSR1 (logrotate); "
        "empty = stderr, the journal under systemd",
    )


class DaemonSettings(_Section):
    pidfile: Annotated[str, Metavar("PATH")] = Field(
        default="/run/echod/echod.pid",
        description="pid file that start writes and stop, reload and status read",
    )
    user: Annotated[str, Metavar("USER")] = Field(
        default="", description="account to switch to after binding; empty = stay as started"
    )
    group: Annotated[str, Metavar("GROUP")] = Field(
        default="", description="group to switch to after binding; empty = stay as started"
    )


class ListenerOptions(_Section):
    proxy_protocol: bool = Field(
        default=False,
        strict=True,  # true or false, not "yes" or 1
        description="connections start with a PROXY protocol v1 or v2 header (HAProxy send-proxy or "
        "send-proxy-v2)",
    )
