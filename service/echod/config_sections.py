"""The configuration's sections ([metrics], [log], [daemon], [listeners."HOST:PORT"]) and the unit names
`--help` shows for values. Every description says what a setting does and in which unit, never its
default: config_help.setting_help() appends that from the field itself. `echod run --help` shows
these texts, and config/echod.toml's comment above each key contains its text (tests/test_config.py
holds both to it)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from .listeners import parse_address
from .tls_config import build_context


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

    # -- TLS (issue 17): validated by building the context, kept for the workers (tls_config.py) --------
    tls_cert: Annotated[str, Metavar("PATH")] = Field(
        default="", description="PEM certificate chain; with tls_key, this address speaks TLS"
    )
    tls_key: Annotated[str, Metavar("PATH")] = Field(
        default="", description="PEM private key of tls_cert, unencrypted"
    )
    tls_client_ca: Annotated[str, Metavar("PATH")] = Field(
        default="",
        description="PEM CA bundle: clients must present a certificate signed by it (mutual TLS); "
        "empty = no client certificate asked for",
    )
    tls_min_version: Literal["1.2", "1.3"] = Field(default="1.2", description="oldest TLS version accepted")
    _context: ssl.SSLContext | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _tls(self) -> ListenerOptions:
        if not (self.tls_cert or self.tls_key or self.tls_client_ca):
            return self
        if not (self.tls_cert and self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        self._context = build_context(self.tls_cert, self.tls_key, self.tls_client_ca, self.tls_min_version)
        return self

    @property
    def tls_context(self) -> ssl.SSLContext | None:
        """The server context built from the files as they were when this configuration was loaded."""
        return self._context
