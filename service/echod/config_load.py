"""Loading the configuration: the file, the environment and the flags, and errors that name the key.

One code path loads the configuration for `run`, `start`, `check-config` and every reload, so a
reload can never accept what a start would refuse.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsError

from .config import DEFAULT_CONFIG_PATH, ConfigError, Settings, quote_key, reading
from .config_help import setting_fields


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
    try:
        with reading(path):
            return Settings(**dict(overrides or {}))
    except ValidationError as exc:
        raise ConfigError("\n".join(_describe(exc, path, file_values))) from None
    except SettingsError as exc:
        raise ConfigError(f"environment: {exc.__cause__ or exc}") from None


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


def _check_environment(environ: Mapping[str, str]) -> None:
    """A misspelt ECHOD_* variable is an error, as a misspelt key in the file is."""
    # ECHOD_COMPILE is setup.py's (build time): left exported in a shell, it must not stop the daemon.
    known = {"ECHOD_CONFIG", "ECHOD_COMPILE"} | {
        "ECHOD_" + key.upper().replace(".", "__") for key, _ in setting_fields()
    }
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
