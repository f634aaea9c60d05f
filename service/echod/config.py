"""The configuration model: every setting, its type, limits and description, and their validation.

Sources, in rising precedence: defaults < TOML file < ECHOD_* environment < command-line flags.
Loading and error reports are config_load.py's; the `--help` texts built from the descriptions are
config_help.py's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .config_sections import (
    Bytes,
    Count,
    DaemonSettings,
    HostPort,
    ListenerOptions,
    LogSettings,
    Metavar,
    MetricsSettings,
    Seconds,
)
from .listeners import Address, parse_address

__all__ = [  # the sections are part of the model: `config.ListenerOptions` and the like
    "DaemonSettings",
    "ListenerOptions",
    "LogSettings",
    "Metavar",
    "MetricsSettings",
    "Settings",
]

DEFAULT_CONFIG_PATH = Path("/etc/echod/echod.toml")
EX_CONFIG = 78  # sysexits.h EX_CONFIG: invalid configuration (README, "Command line")
MAX_WORKERS = 256
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")

# The TOML file chosen for the load in progress; read by settings_customise_sources, which pydantic
# calls as a classmethod and so cannot take it as an argument.
_toml_path: ContextVar[Path | None] = ContextVar("_toml_path", default=None)


class ConfigError(Exception):
    """Invalid configuration; str() names the key, the value and the reason, one problem per line."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ECHOD_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    listen: Annotated[list[str], NoDecode, HostPort] = Field(
        default_factory=lambda: ["127.0.0.1:7007"],
        min_length=1,
        description="addresses to serve, each HOST:PORT or [V6ADDR]:PORT; "
        "HOST is an IP address, * (all IPv4) or localhost",
    )
    workers: Annotated[int, Count] = Field(
        default=0,
        ge=0,
        le=MAX_WORKERS,
        description=f"worker processes, at most {MAX_WORKERS}; 0 = one per CPU",
    )
    backlog: Annotated[int, Count] = Field(
        default=1024,
        ge=1,
        le=65535,
        description="listen backlog of each socket, capped by net.core.somaxconn",
    )
    max_connections: Annotated[int, Count] = Field(
        default=10000,
        ge=1,
        le=1_000_000,
        description="open connections per worker; one more is accepted and closed at once",
    )
    read_size: Annotated[int, Bytes] = Field(
        default=65536, ge=512, le=16 * 1024 * 1024, description="bytes asked for per recv"
    )
    write_buffer_high: Annotated[int, Bytes] = Field(
        default=262144,
        ge=1,
        le=1 << 30,
        description="pending output bytes per connection at which echod stops reading from it",
    )
    write_buffer_low: Annotated[int, Bytes] = Field(
        default=65536,
        ge=0,
        le=1 << 30,
        description="pending output bytes per connection at which echod reads from it again; "
        "below write_buffer_high",
    )
    max_buffered_bytes: Annotated[int, Bytes] = Field(
        default=64 * 1024 * 1024,
        ge=0,
        le=1 << 40,
        description="budget for the pending output bytes of all connections of one worker; beyond it, "
        "a connection that adds output stops reading; 0 = none beyond the watermarks",
    )
    max_connections_per_ip: Annotated[int, Count] = Field(
        default=0,
        ge=0,
        le=1_000_000,
        description="open connections per client address and worker; one more is accepted and closed "
        "at once; 0 = no limit",
    )
    idle_timeout: Annotated[float, Seconds] = Field(
        default=300,
        ge=0,
        le=86400 * 365,
        description="close a connection after this many seconds without traffic; 0 = never",
    )
    shutdown_timeout: Annotated[float, Seconds] = Field(
        default=30,
        ge=0,
        le=86400,
        description="seconds that stop (SIGTERM) and reload wait for open connections to finish",
    )
    heartbeat_timeout: Annotated[float, Seconds] = Field(
        default=10,
        ge=1,
        le=3600,
        description="seconds a worker may go without a heartbeat from its event loop before the master "
        "kills and replaces it",
    )
    io_mode: Literal["copy", "splice", "auto"] = Field(
        default="auto",
        description="how echo moves bytes: copy (through Python), splice (splice(2) through a pipe) or "
        "auto: per connection, splice for large reads and copy for small ones",
    )
    listeners: Annotated[dict[str, ListenerOptions], NoDecode, Metavar("JSON")] = Field(
        default_factory=dict,
        description="options per listen address, in a flag or the environment as JSON: "
        '{"HOST:PORT": {"proxy_protocol": true}}; each address must be one of listen',
    )
    proxy_protocol_timeout: Annotated[float, Seconds] = Field(
        default=5,
        gt=0,
        le=3600,
        description="seconds a PROXY protocol listener waits for a connection's header before closing it",
    )
    tls_handshake_timeout: Annotated[float, Seconds] = Field(
        default=10,
        gt=0,
        le=3600,
        description="seconds a TLS listener's connection may take to complete its handshake",
    )
    udp_listen: Annotated[list[str], NoDecode, HostPort] = Field(
        default_factory=list, description="UDP echo addresses, same syntax as listen; none = no UDP echo"
    )
    udp_rate_packets: Annotated[float, Count] = Field(
        default=100, ge=1, le=1e9, description="UDP datagrams answered per second and source address"
    )
    udp_rate_bytes: Annotated[float, Bytes] = Field(
        default=262144,
        gt=0,
        le=1e12,
        description="UDP bytes answered per second and source address; a larger datagram is never answered",
    )
    udp_max_sources: Annotated[int, Count] = Field(
        default=16384,
        ge=1,
        le=1_000_000,
        description="source addresses rate-limited at once per worker; datagrams from further sources "
        "are dropped",
    )
    # Issue 18: the access log (worker/access_log.py).
    access_log: Annotated[str, Metavar("PATH")] = Field(
        default="",
        description='file to append one line per closed TCP connection to, reopened on SIGUSR1; "-" = '
        'the service log\'s stream; "" = no access log',
    )
    access_log_format: Literal["json", "text"] = Field(
        default="json", description="json: one object per line, or text: key=value pairs"
    )
    access_log_sample: Annotated[float, Metavar("FRACTION")] = Field(
        default=1, ge=0, le=1, description="fraction of connections logged, 0 to 1; 1 = every one"
    )
    metrics: MetricsSettings = MetricsSettings()
    log: LogSettings = LogSettings()
    daemon: DaemonSettings = DaemonSettings()

    @field_validator(
        "workers", "backlog", "max_connections", "read_size", "write_buffer_high", "write_buffer_low",
        "max_buffered_bytes", "max_connections_per_ip", "idle_timeout", "shutdown_timeout",
        "heartbeat_timeout", "proxy_protocol_timeout", "udp_rate_packets", "udp_rate_bytes",
        "udp_max_sources", "tls_handshake_timeout", "access_log_sample", mode="before",
    )  # fmt: skip
    @classmethod
    def _not_bool(cls, value: object) -> object:
        # Lax mode would read TOML `workers = true` as 1.
        if isinstance(value, bool):
            raise ValueError("expected a number, not a boolean")
        return value

    @field_validator("listen", "udp_listen", mode="before")
    @classmethod
    def _split_listen(cls, value: object) -> object:
        # From the environment the list arrives as text: accept JSON or "a,b".
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("listeners", mode="before")
    @classmethod
    def _decode_listeners(cls, value: object) -> object:
        # From a flag or the environment the table arrives as JSON text.
        return json.loads(value) if isinstance(value, str) else value

    @field_validator("listen", "udp_listen")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        seen: set[Address] = set()
        for text in value:
            address = parse_address(text)
            if address in seen:
                raise ValueError(f"{text!r} is listed twice")
            seen.add(address)
        return value

    @model_validator(mode="after")
    def _listener_keys(self) -> Settings:
        listening = set(self.addresses)
        seen: dict[Address, str] = {}
        for key in self.listeners:
            try:
                address = parse_address(key)
            except ValueError as exc:
                raise ValueError(f"listeners.{quote_key(key)}: {exc}") from None
            if address not in listening:
                raise ValueError(f"listeners.{quote_key(key)}: not one of the listen addresses")
            if address in seen:
                raise ValueError(
                    f"listeners.{quote_key(key)}: the same address as {quote_key(seen[address])}"
                )
            seen[address] = key
        return self

    @model_validator(mode="after")
    def _watermarks(self) -> Settings:
        if self.write_buffer_low >= self.write_buffer_high:
            raise ValueError(
                f"write_buffer_low ({self.write_buffer_low}) must be below "
                f"write_buffer_high ({self.write_buffer_high})"
            )
        if 0 < self.max_buffered_bytes < self.write_buffer_high:
            raise ValueError(
                f"max_buffered_bytes ({self.max_buffered_bytes}) must be 0 or at least "
                f"write_buffer_high ({self.write_buffer_high})"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _toml_path.get()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    # -- derived values -------------------------------------------------------------------------
    @property
    def addresses(self) -> list[Address]:
        return [parse_address(text) for text in self.listen]

    @property
    def udp_addresses(self) -> list[Address]:
        return [dataclasses.replace(parse_address(text), udp=True) for text in self.udp_listen]

    @property
    def all_addresses(self) -> list[Address]:
        """TCP listeners and UDP echo sockets: everything the master binds."""
        return self.addresses + self.udp_addresses

    def proxy_addresses(self) -> set[Address]:
        """Listen addresses whose connections begin with a PROXY protocol header."""
        return {parse_address(key) for key, options in self.listeners.items() if options.proxy_protocol}

    def tls_addresses(self) -> dict[Address, ssl.SSLContext]:
        """Listen addresses that speak TLS, and the context each was loaded with (tls_config.py)."""
        return {
            parse_address(key): options.tls_context
            for key, options in self.listeners.items()
            if options.tls_context is not None
        }

    @property
    def worker_count(self) -> int:
        return self.workers or (os.cpu_count() or 1)

    def effective(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def quote_key(part: str) -> str:
    # Bare keys as written in TOML; anything else quoted, so that "" or a key with a newline shows.
    return part if _BARE_KEY.fullmatch(part) else json.dumps(part, ensure_ascii=False)


@contextmanager
def reading(path: Path | None) -> Iterator[None]:
    """Within this block, Settings() reads `path` as its TOML file (config_load.load_settings)."""
    token = _toml_path.set(path)
    try:
        yield
    finally:
        _toml_path.reset(token)
