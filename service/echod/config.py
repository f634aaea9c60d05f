"""Configuration: defaults < TOML file < ECHOD_* environment < command-line flags.

One code path loads the configuration for `run`, `start`, `check-config` and every reload, so a
reload can never accept what a start would refuse.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from .listeners import Address, parse_address

DEFAULT_CONFIG_PATH = Path("/etc/echod/echod.toml")
EX_CONFIG = 78  # sysexits.h EX_CONFIG: invalid configuration (README, "Command line")
MAX_WORKERS = 256
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")

# The TOML file chosen for the load in progress; read by settings_customise_sources, which pydantic
# calls as a classmethod and so cannot take it as an argument.
_toml_path: ContextVar[Path | None] = ContextVar("_toml_path", default=None)


class ConfigError(Exception):
    """Invalid configuration; str() names the key, the value and the reason, one problem per line."""


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


# Every setting's description says what it does and in which unit, never its default: setting_help()
# appends that from the field itself. `echod run --help` shows these texts, and config/echod.toml's
# comment above each key contains its text (tests/test_config.py holds both to it).


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
    metrics: MetricsSettings = MetricsSettings()
    log: LogSettings = LogSettings()
    daemon: DaemonSettings = DaemonSettings()

    @field_validator(
        "workers", "backlog", "max_connections", "read_size", "write_buffer_high", "write_buffer_low",
        "max_buffered_bytes", "max_connections_per_ip", "idle_timeout", "shutdown_timeout",
        "heartbeat_timeout", "proxy_protocol_timeout", "udp_rate_packets", "udp_rate_bytes",
        "udp_max_sources", mode="before",
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

    @property
    def worker_count(self) -> int:
        return self.workers or (os.cpu_count() or 1)

    def effective(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def config_path(explicit: str | None, environ: Mapping[str, str]) -> Path | None:
    """The file to read: --config, else $ECHOD_CONFIG, else /etc/echod/echod.toml if present."""
    if explicit:
        return Path(explicit)
    if environ.get("ECHOD_CONFIG"):
        return Path(environ["ECHOD_CONFIG"])
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def load_settings(overrides: Mapping[str, Any] | None = None, path: Path | None = None) -> Settings:
    """Build and validate the settings, or raise ConfigError naming every bad key."""
    file_values = _read_file(path) if path is not None else {}
    _check_environment(os.environ)
    token = _toml_path.set(path)
    try:
        return Settings(**dict(overrides or {}))
    except ValidationError as exc:
        raise ConfigError("\n".join(_describe(exc, path, file_values))) from None
    except SettingsError as exc:
        raise ConfigError(f"environment: {exc.__cause__ or exc}") from None
    finally:
        _toml_path.reset(token)


def _read_file(path: Path) -> dict[str, Any]:
    # pydantic-settings silently ignores a missing TOML file and lets TOMLDecodeError escape.
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # tomllib decodes the bytes itself; TOML files must be UTF-8
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 (byte {exc.start}: {exc.reason})") from None


def setting_fields() -> Iterator[tuple[str, FieldInfo]]:
    """Every setting as (dotted key, field), the sections' keys flattened: `metrics.listen`."""
    for name, field in Settings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            for sub, subfield in annotation.model_fields.items():
                yield f"{name}.{sub}", subfield
        else:
            yield name, field


def setting_metavar(field: FieldInfo) -> str:
    """The name `--help` gives a setting's value: its Metavar, else its Literal choices (`text|json`)."""
    for item in field.metadata:
        if isinstance(item, Metavar):
            return item.name
    if get_origin(field.annotation) is Literal:
        return "|".join(str(choice) for choice in get_args(field.annotation))
    raise TypeError(f"setting of type {field.annotation} without a Metavar")


def setting_default(field: FieldInfo) -> str:
    """A setting's default as a flag would take it: `300`, `127.0.0.1:7007`, `""`, `none` (an empty list)."""
    value = field.get_default(call_default_factory=True)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | dict):
        if not value:
            return "none"
        return ", ".join(map(str, value)) if isinstance(value, list) else json.dumps(value)
    if value == "":
        return '""'
    return str(value)


def setting_help(field: FieldInfo) -> str:
    """A setting's description and default, as `echod run --help` shows them."""
    return f"{field.description} (default {setting_default(field)})"


def _check_environment(environ: Mapping[str, str]) -> None:
    """A misspelt ECHOD_* variable is an error, as a misspelt key in the file is."""
    known = {"ECHOD_CONFIG"} | {"ECHOD_" + key.upper().replace(".", "__") for key, _ in setting_fields()}
    unknown = sorted(key for key in environ if key.upper().startswith("ECHOD_") and key.upper() not in known)
    if unknown:
        raise ConfigError("\n".join(f"{key}: unknown environment variable" for key in unknown))


def _in_file(values: Mapping[str, object], loc: tuple[int | str, ...]) -> bool:
    node: object = values
    for part in loc:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def quote_key(part: str) -> str:
    # Bare keys as written in TOML; anything else quoted, so that "" or a key with a newline shows.
    return part if _BARE_KEY.fullmatch(part) else json.dumps(part, ensure_ascii=False)


def _describe(exc: ValidationError, path: Path | None, file_values: Mapping[str, object]) -> Iterator[str]:
    for error in exc.errors(include_url=False):
        key = ".".join(quote_key(str(part)) for part in error["loc"]) or "(settings)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            where = f" in {path}" if path and _in_file(file_values, error["loc"]) else ""
            yield f"{key}: unknown key{where}"
        elif error["loc"]:
            yield f"{key}: invalid value {error['input']!r}: {message}"
        else:
            yield message
