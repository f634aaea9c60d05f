"""Configuration and command line: the real `python -m echod check-config`, plus `load_settings` itself.

README.md, "Configuration" and "Command line": sources are flags > ECHOD_* environment > TOML file >
defaults; the file is --config, else $ECHOD_CONFIG, else /etc/echod/echod.toml; every invalid configuration
exits 78 with a message naming the key and the bad value; unknown commands and flags exit 2.

The tests that run `python -m echod` as a process are marked integration; the rest call echod in process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from echod import __version__, config, config_help, config_load
from echod.cli import main as cli_main
from echod.config import ConfigError
from echod.config_load import load_settings
from pydantic.fields import FieldInfo

ECHOD = [sys.executable, "-m", "echod"]
REPO = Path(__file__).resolve().parent.parent
EX_CONFIG = 78
EX_USAGE = 2

# The defaults as the configuration table of README.md states them (extensions included).
SPEC_DEFAULTS: dict[str, Any] = {
    "listen": ["127.0.0.1:7007"],
    "workers": 0,
    "backlog": 1024,
    "max_connections": 10000,
    "read_size": 65536,
    "write_buffer_high": 262144,
    "write_buffer_low": 65536,
    "max_buffered_bytes": 64 * 1024 * 1024,
    "max_connections_per_ip": 0,
    "idle_timeout": 300,
    "shutdown_timeout": 30,
    "heartbeat_timeout": 10,
    "io_mode": "auto",
    "listeners": {},
    "proxy_protocol_timeout": 5,
    "tls_handshake_timeout": 10,
    "udp_listen": [],
    "udp_rate_packets": 100,
    "udp_rate_bytes": 262144,
    "udp_max_sources": 16384,
    "access_log": "",
    "access_log_format": "json",
    "access_log_sample": 1,
    "metrics": {"listen": "127.0.0.1:9640"},
    "log": {"level": "info", "format": "text", "file": ""},
    "daemon": {"pidfile": "/run/echod/echod.pid", "user": "", "group": ""},
}


def clean_environ() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("ECHOD_")}


class Cli:
    """Runs `python -m echod` with no inherited ECHOD_* variable and ECHOD_CONFIG on a file in tmp_path."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.config = tmp_path / "echod.toml"
        self.config.write_text("")

    def write(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.write_text(text, encoding="utf-8")
        return path

    def run(
        self,
        *args: str,
        toml: str | None = None,
        env: dict[str, str] | None = None,
        set_config_env: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        if toml is not None:
            self.config.write_text(toml, encoding="utf-8")
        full_env = clean_environ()
        if set_config_env:
            full_env["ECHOD_CONFIG"] = str(self.config)
        full_env.update(env or {})
        return subprocess.run(
            [*ECHOD, *args],
            env=full_env,
            cwd=self.tmp,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            timeout=30,
        )

    def effective(self, *args: str, **kwargs: Any) -> dict[str, Any]:
        """check-config's output, parsed as TOML; fails unless it exits 0."""
        result = self.run("check-config", *args, **kwargs)
        assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr}"
        assert result.stderr == ""
        return tomllib.loads(result.stdout)

    def invalid(self, *args: str, **kwargs: Any) -> str:
        """check-config's stderr; fails unless it exits 78 without printing settings."""
        result = self.run("check-config", *args, **kwargs)
        assert result.returncode == EX_CONFIG, (
            f"expected exit 78, got {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
        assert result.stdout == "", "an invalid configuration must not print settings"
        assert "invalid configuration" in result.stderr
        return result.stderr


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


class InProcess:
    """The same check-config, called as echod.cli.main() in this process (for the long value matrices).

    Environment as for Cli: no ECHOD_* variable from outside, ECHOD_CONFIG on a file in tmp_path.
    """

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
        self.tmp = tmp_path
        self.config = tmp_path / "echod.toml"
        self.config.write_text("")
        self.monkeypatch = monkeypatch
        self.capsys = capsys
        for key in list(os.environ):
            if key.startswith("ECHOD_"):
                monkeypatch.delenv(key)
        monkeypatch.setenv("ECHOD_CONFIG", str(self.config))

    def check_config(self, *args: str, toml: str | None = None, env: dict[str, str] | None = None):
        if toml is not None:
            self.config.write_text(toml, encoding="utf-8")
        with pytest.MonkeyPatch.context() as patch:
            for key, value in (env or {}).items():
                patch.setenv(key, value)
            self.capsys.readouterr()
            code = cli_main(["check-config", *args])
            out, err = self.capsys.readouterr()
        return code, out, err

    def effective(self, *args: str, **kwargs: Any) -> dict[str, Any]:
        code, out, err = self.check_config(*args, **kwargs)
        assert code == 0, err
        return tomllib.loads(out)

    def invalid(self, *args: str, **kwargs: Any) -> str:
        code, out, err = self.check_config(*args, **kwargs)
        assert code == EX_CONFIG, f"expected exit 78, got {code}\nstdout:\n{out}\nstderr:\n{err}"
        assert out == ""
        assert "invalid configuration" in err
        return err


@pytest.fixture
def inproc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> InProcess:
    return InProcess(tmp_path, monkeypatch, capsys)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """For in-process load_settings calls: no ECHOD_* variable from the outside."""
    for key in list(os.environ):
        if key.startswith("ECHOD_"):
            monkeypatch.delenv(key)


def names_key(stderr: str, key: str) -> bool:
    """Some line of the message starts with the key (so 'listen' is not satisfied by 'metrics.listen')."""
    return any(line.strip().startswith(key) for line in stderr.splitlines())


# -- defaults and the shipped file ----------------------------------------------------------------


@pytest.mark.integration
def test_defaults_match_spec(cli: Cli) -> None:
    values = cli.effective()
    assert values == SPEC_DEFAULTS
    assert isinstance(values["workers"], int)  # typed TOML, not strings
    assert isinstance(values["metrics"], dict)


@pytest.mark.integration
def test_shipped_config_file_equals_defaults(cli: Cli) -> None:
    shipped = REPO / "config" / "echod.toml"
    with_file = cli.run("check-config", "--config", str(shipped))
    with_empty = cli.run("check-config", "--config", str(cli.config))
    assert with_file.returncode == 0, with_file.stderr
    assert with_empty.returncode == 0, with_empty.stderr
    assert with_file.stdout == with_empty.stdout
    assert tomllib.loads(with_file.stdout) == SPEC_DEFAULTS


@pytest.mark.integration
def test_shipped_config_file_documents_every_key(cli: Cli) -> None:
    with (REPO / "config" / "echod.toml").open("rb") as handle:
        shipped = tomllib.load(handle)
    effective = cli.effective()
    assert shipped.keys() == effective.keys()
    for section in ("metrics", "log", "daemon"):
        assert shipped[section].keys() == effective[section].keys(), section


@pytest.mark.integration
def test_check_config_output_is_a_valid_config_file(cli: Cli) -> None:
    first = cli.run(
        "check-config", "--workers", "3", "--listen", "127.0.0.1:7101", "--listen", "[::1]:7102",
        "--log-file", '/tmp/a "quoted" \\ name.log', "--idle-timeout", "2.5",
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    saved = cli.write("saved.toml", first.stdout)
    second = cli.run("check-config", "--config", str(saved))
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    values = tomllib.loads(first.stdout)
    assert values["log"]["file"] == '/tmp/a "quoted" \\ name.log'
    assert values["idle_timeout"] == 2.5


@pytest.mark.integration
def test_check_config_output_is_toml_for_non_bmp_text(cli: Cli) -> None:
    # A path with a character outside the Basic Multilingual Plane must still come out as TOML.
    path = "/var/log/echod-\U0001f600.log"
    result = cli.run("check-config", "--log-file", path)
    assert result.returncode == 0, result.stderr
    assert tomllib.loads(result.stdout)["log"]["file"] == path


# -- precedence: flags > environment > file > defaults ---------------------------------------------

FILE = """
workers = 7
listen = ["127.0.0.1:7201"]
idle_timeout = 42

[metrics]
listen = "127.0.0.1:7202"

[log]
level = "debug"
"""


@pytest.mark.integration
def test_file_overrides_defaults(cli: Cli) -> None:
    values = cli.effective(toml=FILE)
    assert values["workers"] == 7
    assert values["listen"] == ["127.0.0.1:7201"]
    assert values["idle_timeout"] == 42
    assert values["metrics"]["listen"] == "127.0.0.1:7202"
    assert values["log"] == {"level": "debug", "format": "text", "file": ""}
    assert values["backlog"] == 1024  # untouched keys keep their defaults


@pytest.mark.integration
def test_env_overrides_file(cli: Cli) -> None:
    values = cli.effective(toml=FILE, env={"ECHOD_WORKERS": "5", "ECHOD_IDLE_TIMEOUT": "9"})
    assert values["workers"] == 5
    assert values["idle_timeout"] == 9
    assert values["listen"] == ["127.0.0.1:7201"]


@pytest.mark.integration
def test_flag_overrides_env_and_file(cli: Cli) -> None:
    values = cli.effective("--workers", "3", toml=FILE, env={"ECHOD_WORKERS": "5"})
    assert values["workers"] == 3


@pytest.mark.integration
def test_nested_env_overrides_file(cli: Cli) -> None:
    values = cli.effective(toml=FILE, env={"ECHOD_METRICS__LISTEN": "127.0.0.1:7203"})
    assert values["metrics"]["listen"] == "127.0.0.1:7203"


@pytest.mark.integration
def test_nested_flag_overrides_nested_env(cli: Cli) -> None:
    env = {"ECHOD_METRICS__LISTEN": "127.0.0.1:7203"}
    values = cli.effective("--metrics-listen", "127.0.0.1:7204", toml=FILE, env=env)
    assert values["metrics"]["listen"] == "127.0.0.1:7204"


@pytest.mark.integration
def test_empty_metrics_listen_disables_metrics(cli: Cli) -> None:
    assert cli.effective("--metrics-listen", "", toml=FILE)["metrics"]["listen"] == ""


def test_empty_metrics_listen_from_env(inproc: InProcess) -> None:
    assert inproc.effective(toml=FILE, env={"ECHOD_METRICS__LISTEN": ""})["metrics"]["listen"] == ""


@pytest.mark.integration
def test_nested_sources_merge_key_by_key(cli: Cli) -> None:
    # file sets log.level, the environment log.format, a flag log.file: all three survive.
    values = cli.effective("--log-file", "/tmp/echod-test.log", toml=FILE, env={"ECHOD_LOG__FORMAT": "json"})
    assert values["log"] == {"level": "debug", "format": "json", "file": "/tmp/echod-test.log"}


def test_several_flags_of_one_section(inproc: InProcess) -> None:
    values = inproc.effective(
        "--log-level", "warning", "--log-format", "json", "--daemon-user", "nobody",
        "--daemon-pidfile", "/tmp/echod-test.pid", toml=FILE,
    )  # fmt: skip
    assert values["log"] == {"level": "warning", "format": "json", "file": ""}
    assert values["daemon"] == {"pidfile": "/tmp/echod-test.pid", "user": "nobody", "group": ""}


@pytest.mark.integration
def test_env_listen_as_json(cli: Cli) -> None:
    env = {"ECHOD_LISTEN": '["127.0.0.1:7301", "[::1]:7302"]'}
    assert cli.effective(toml=FILE, env=env)["listen"] == ["127.0.0.1:7301", "[::1]:7302"]


@pytest.mark.integration
def test_env_listen_as_comma_list(cli: Cli) -> None:
    env = {"ECHOD_LISTEN": "127.0.0.1:7301, 127.0.0.1:7302"}
    assert cli.effective(toml=FILE, env=env)["listen"] == ["127.0.0.1:7301", "127.0.0.1:7302"]


@pytest.mark.integration
def test_listen_flags_override_env_and_file(cli: Cli) -> None:
    env = {"ECHOD_LISTEN": "127.0.0.1:7301"}
    values = cli.effective("--listen", "127.0.0.1:7401", "--listen", "[::1]:7402", toml=FILE, env=env)
    assert values["listen"] == ["127.0.0.1:7401", "[::1]:7402"]


# -- which file --------------------------------------------------------------------------------------


@pytest.mark.integration
def test_config_flag_beats_env_config(cli: Cli) -> None:
    flagged = cli.write("flagged.toml", "workers = 3\n")
    cli.config.write_text("workers = 5\n")
    assert cli.effective("--config", str(flagged))["workers"] == 3


@pytest.mark.integration
def test_env_config_is_used_without_flag(cli: Cli) -> None:
    assert cli.effective(toml="workers = 5\n")["workers"] == 5


@pytest.mark.integration
def test_config_flag_beats_missing_env_config(cli: Cli) -> None:
    flagged = cli.write("flagged.toml", "workers = 3\n")
    missing = cli.tmp / "missing.toml"
    values = cli.effective("--config", str(flagged), env={"ECHOD_CONFIG": str(missing)})
    assert values["workers"] == 3


def test_config_path_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = tmp_path / "etc-echod.toml"
    monkeypatch.setattr(config_load, "DEFAULT_CONFIG_PATH", system)
    assert config_load.config_path("/a.toml", {"ECHOD_CONFIG": "/b.toml"}) == Path("/a.toml")
    assert config_load.config_path(None, {"ECHOD_CONFIG": "/b.toml"}) == Path("/b.toml")
    assert config_load.config_path(None, {}) is None  # no system file: defaults alone
    assert config_load.config_path(None, {"ECHOD_CONFIG": ""}) is None
    system.write_text("")
    assert config_load.config_path(None, {}) == system
    assert config_load.config_path(None, {"ECHOD_CONFIG": "/b.toml"}) == Path("/b.toml")


# -- every invalid configuration exits 78 and says what is wrong ---------------------------------------
# The cases the operator contract names run the real `python -m echod check-config`; the longer matrices
# of further values call the same cli.main() in process, to keep the file fast.


@pytest.mark.integration
def test_named_config_file_missing(cli: Cli) -> None:
    missing = cli.tmp / "nope" / "echod.toml"
    stderr = cli.invalid("--config", str(missing))
    assert str(missing) in stderr
    assert "does not exist" in stderr


@pytest.mark.integration
def test_env_config_file_missing(cli: Cli) -> None:
    missing = cli.tmp / "missing.toml"
    stderr = cli.invalid(env={"ECHOD_CONFIG": str(missing)})
    assert str(missing) in stderr
    assert "does not exist" in stderr


@pytest.mark.integration
def test_broken_toml(cli: Cli) -> None:
    stderr = cli.invalid(toml="workers = [\n")
    assert str(cli.config) in stderr
    assert "TOML" in stderr


@pytest.mark.integration
def test_unknown_top_level_key(cli: Cli) -> None:
    stderr = cli.invalid(toml="workers = 2\nbogus_key = 1\n")
    assert names_key(stderr, "bogus_key")
    assert "unknown" in stderr


@pytest.mark.integration
def test_unknown_nested_key(cli: Cli) -> None:
    stderr = cli.invalid(toml="[metrics]\nfoo = 1\n")
    assert names_key(stderr, "metrics.foo")
    assert "unknown" in stderr


@pytest.mark.integration
def test_broken_env_workers(cli: Cli) -> None:
    stderr = cli.invalid(toml="workers = 4\n", env={"ECHOD_WORKERS": "many"})
    assert names_key(stderr, "workers")
    assert "many" in stderr


@pytest.mark.integration
def test_watermarks_out_of_order(cli: Cli) -> None:
    stderr = cli.invalid(toml="write_buffer_low = 100\nwrite_buffer_high = 100\n")
    assert "write_buffer_low" in stderr
    assert "write_buffer_high" in stderr
    assert "100" in stderr


CONTRACT_ERRORS = [
    # (TOML text, key the message must name, bad value the message must show)
    ('workers = "four"\n', "workers", "four"),
    ("listen = 5\n", "listen", "5"),
    ("workers = -1\n", "workers", "-1"),
    ("backlog = 0\n", "backlog", "0"),
    ("read_size = 10\n", "read_size", "10"),
    ('listen = ["nope"]\n', "listen", "nope"),
    ('listen = ["1.2.3.4"]\n', "listen", "1.2.3.4"),
    ('listen = ["[::1]"]\n', "listen", "[::1]"),
    ('listen = ["::1:80"]\n', "listen", "::1:80"),
    ('listen = ["host:99999"]\n', "listen", "host:99999"),
    ('listen = ["127.0.0.1:7007", "127.0.0.1:7007"]\n', "listen", "127.0.0.1:7007"),
    ('[log]\nlevel = "loud"\n', "log.level", "loud"),
    ('[log]\nformat = "xml"\n', "log.format", "xml"),
    ('[metrics]\nlisten = "nope"\n', "metrics.listen", "nope"),
]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("toml", "key", "value"), CONTRACT_ERRORS, ids=[f"{k}={v}" for _, k, v in CONTRACT_ERRORS]
)
def test_invalid_value_exits_78(cli: Cli, toml: str, key: str, value: str) -> None:
    stderr = cli.invalid(toml=toml)
    assert names_key(stderr, key), stderr
    assert value in stderr


@pytest.mark.integration
def test_boolean_is_not_an_integer(cli: Cli) -> None:
    # TOML has real booleans: `workers = true` is a type error, not one worker.
    stderr = cli.invalid(toml="workers = true\n")
    assert names_key(stderr, "workers"), stderr
    assert "True" in stderr or "true" in stderr


@pytest.mark.integration
@pytest.mark.parametrize("variable", ["ECHOD_METRICS__FOO", "ECHOD_BOGUS", "ECHOD_WORKER"])
def test_unknown_env_variable_is_named(cli: Cli, variable: str) -> None:
    stderr = cli.invalid(env={variable: "1"})
    assert f"{variable}: unknown environment variable" in stderr, stderr


@pytest.mark.integration
def test_unknown_nested_env_key_is_not_blamed_on_the_file(cli: Cli) -> None:
    stderr = cli.invalid(env={"ECHOD_METRICS__FOO": "1"})
    assert "ECHOD_METRICS__FOO" in stderr
    # The key came from the environment; the (empty) file must not be named as holding it.
    assert str(cli.config) not in stderr


MORE_FILE_ERRORS = [
    ("workers = 2.5\n", "workers", "2.5"),
    ("workers = 100000\n", "workers", "100000"),
    ("listen = []\n", "listen", "[]"),
    ("metrics = 5\n", "metrics", "5"),
    ("[log]\nlevel = 3\n", "log.level", "3"),
    ('idle_timeout = "soon"\n', "idle_timeout", "soon"),
    ("idle_timeout = -1\n", "idle_timeout", "-1"),
    ("idle_timeout = nan\n", "idle_timeout", "nan"),
    ("shutdown_timeout = -5\n", "shutdown_timeout", "-5"),
    ("max_connections = 0\n", "max_connections", "0"),
    ("max_buffered_bytes = 1000\n", "max_buffered_bytes", "1000"),
    ("max_connections_per_ip = -1\n", "max_connections_per_ip", "-1"),
    ("write_buffer_high = 0\n", "write_buffer_high", "0"),
    ('listen = ["example.com:80"]\n', "listen", "example.com"),
    ('listen = ["127.0.0.1:"]\n', "listen", "127.0.0.1:"),
    ('listen = ["256.1.1.1:80"]\n', "listen", "256.1.1.1"),
    ('listen = ["127.0.0.1:7007", "localhost:7007"]\n', "listen", "localhost:7007"),
    ('listen = ["*:7007", "0.0.0.0:7007"]\n', "listen", "0.0.0.0:7007"),
    ('[metrics]\nlisten = "127.0.0.1:70000"\n', "metrics.listen", "70000"),
    ('[metrics]\nlisten = "::1:9640"\n', "metrics.listen", "::1:9640"),
    ('[log]\nlevel = "INFO "\n', "log.level", "INFO "),
    ("[daemon]\npidfile = 5\n", "daemon.pidfile", "5"),
]


@pytest.mark.parametrize(
    ("toml", "key", "value"), MORE_FILE_ERRORS, ids=[f"{k}={v}" for _, k, v in MORE_FILE_ERRORS]
)
def test_more_invalid_values_in_file(inproc: InProcess, toml: str, key: str, value: str) -> None:
    stderr = inproc.invalid(toml=toml)
    assert names_key(stderr, key), stderr
    assert value in stderr


FLAG_ERRORS = [
    (["--workers", "-1"], "workers", "-1"),
    (["--workers", "abc"], "workers", "abc"),
    (["--backlog", "0"], "backlog", "0"),
    (["--read-size", "10"], "read_size", "10"),
    (["--idle-timeout", "never"], "idle_timeout", "never"),
    (["--listen", "nope"], "listen", "nope"),
    (["--listen", "1.2.3.4"], "listen", "1.2.3.4"),
    (["--listen", "[::1]"], "listen", "[::1]"),
    (["--listen", "::1:80"], "listen", "::1:80"),
    (["--listen", "host:99999"], "listen", "host:99999"),
    (["--listen", "127.0.0.1:7007", "--listen", "127.0.0.1:7007"], "listen", "127.0.0.1:7007"),
    (["--log-level", "loud"], "log.level", "loud"),
    (["--log-format", "xml"], "log.format", "xml"),
    (["--metrics-listen", "nope"], "metrics.listen", "nope"),
]


@pytest.mark.parametrize(("args", "key", "value"), FLAG_ERRORS, ids=[" ".join(a) for a, _, _ in FLAG_ERRORS])
def test_invalid_value_in_flag(inproc: InProcess, args: list[str], key: str, value: str) -> None:
    stderr = inproc.invalid(*args)
    assert names_key(stderr, key), stderr
    assert value in stderr


ENV_ERRORS = [
    ({"ECHOD_WORKERS": "abc"}, "workers", "abc"),
    ({"ECHOD_WORKERS": "-1"}, "workers", "-1"),
    ({"ECHOD_WORKERS": "2.5"}, "workers", "2.5"),
    ({"ECHOD_LISTEN": '["127.0.0.1:7007"'}, "listen", '["127.0.0.1:7007"'),
    ({"ECHOD_LISTEN": "nope"}, "listen", "nope"),
    ({"ECHOD_LISTEN": '["127.0.0.1:1", "127.0.0.1:1"]'}, "listen", "127.0.0.1:1"),
    ({"ECHOD_METRICS__LISTEN": "nope"}, "metrics.listen", "nope"),
    ({"ECHOD_LOG__LEVEL": "loud"}, "log.level", "loud"),
]


@pytest.mark.parametrize(
    ("env", "key", "value"), ENV_ERRORS, ids=[f"{next(iter(e))}={v}" for e, _, v in ENV_ERRORS]
)
def test_invalid_value_in_env(inproc: InProcess, env: dict[str, str], key: str, value: str) -> None:
    stderr = inproc.invalid(env=env)
    assert names_key(stderr, key), stderr
    assert value in stderr


def test_config_file_is_a_directory(inproc: InProcess) -> None:
    stderr = inproc.invalid("--config", str(inproc.tmp))
    assert str(inproc.tmp) in stderr


def test_watermark_low_above_default_high(inproc: InProcess) -> None:
    stderr = inproc.invalid("--write-buffer-low", "300000")
    assert "write_buffer_low" in stderr
    assert "300000" in stderr
    assert "262144" in stderr


def test_every_bad_key_is_reported(inproc: InProcess) -> None:
    stderr = inproc.invalid(toml='workers = -1\nbackoff = 3\n[log]\nformat = "xml"\n')
    assert names_key(stderr, "workers")
    assert names_key(stderr, "backoff")
    assert names_key(stderr, "log.format")


# -- command line usage --------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize(
    "args",
    [["frobnicate"], [], ["check-config", "--frobnicate"], ["status", "--workers", "3"]],
    ids=["unknown-command", "no-command", "unknown-flag", "status-setting-flag"],
)
def test_usage_errors_exit_2(cli: Cli, args: list[str]) -> None:
    result = cli.run(*args)
    assert result.returncode == EX_USAGE, result.stderr
    assert "usage:" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    "args",
    [["check-config", "--workers"], ["run", "--no-such-flag", "1"], ["stop", "--timeout", "soon"],
     ["reload", "--listen", "127.0.0.1:1"], ["check-config", "extra"]],
    ids=["flag-without-value", "run-unknown-flag", "stop-bad-timeout", "reload-setting-flag",
         "stray-argument"],
)  # fmt: skip
def test_more_usage_errors_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli_main(args)
    assert info.value.code == EX_USAGE
    assert "usage:" in capsys.readouterr().err


@pytest.mark.integration
def test_version(cli: Cli) -> None:
    with (REPO / "pyproject.toml").open("rb") as handle:
        version = tomllib.load(handle)["project"]["version"]
    result = cli.run("--version")
    assert result.returncode == 0
    # The version, then which build runs (service/echod/build.py): compiled or interpreted.
    build = r"\((interpreted|compiled: \d+ of \d+ data-path modules)\)"
    assert re.fullmatch(rf"echod {re.escape(version)} {build}", result.stdout.strip()), result.stdout
    assert __version__ == version


def test_help_lists_setting_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli_main(["check-config", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--config", "--workers", "--listen", "--idle-timeout", "--metrics-listen",
                 "--write-buffer-low", "--log-level", "--daemon-pidfile", "--heartbeat-timeout"):  # fmt: skip
        assert flag in out, flag


# -- one text per setting: its Field description, shown by --help and held by config/echod.toml -------

UNITS = {"FRACTION", "SECONDS", "BYTES", "N", "HOST:PORT", "PATH", "USER", "GROUP", "JSON"}


def squeezed(text: str) -> str:
    """Without whitespace and case, so that argparse's and the file's line breaks do not matter."""
    return "".join(text.split()).casefold()


def flag_of(key: str) -> str:
    return "--" + key.replace(".", "-").replace("_", "-")


def every_setting() -> list[tuple[str, FieldInfo]]:
    """Every setting with a flag, and the per-listener options (`listeners.*.proxy_protocol`)."""
    options = [(f"listeners.*.{name}", field) for name, field in config.ListenerOptions.model_fields.items()]
    return [*config_help.setting_fields(), *options]


def spec_default(key: str) -> Any:
    if key.startswith("listeners.*."):
        return config.ListenerOptions.model_fields[key.rpartition(".")[2]].default
    section, _, sub = key.partition(".")
    return SPEC_DEFAULTS[section][sub] if sub else SPEC_DEFAULTS[key]


def shown(value: Any) -> str:
    """A default as the help text should name it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | dict) and not value:
        return "none"
    if isinstance(value, list):
        return ", ".join(value)
    return '""' if value == "" else str(value)


def test_every_setting_has_a_description_naming_unit_and_default() -> None:
    for key, field in every_setting():
        assert field.description, f"{key} has no description"
        assert "default" not in field.description, f"{key}: setting_help() adds the default, from the field"
        help_text = config_help.setting_help(field)
        assert help_text == f"{field.description} (default {shown(spec_default(key))})", key
    for key, field in config_help.setting_fields():
        metavar = config_help.setting_metavar(field)
        assert metavar in UNITS or "|" in metavar, f"{key}: metavar {metavar!r}"
        if key.endswith("_timeout"):
            assert metavar == "SECONDS", key
        if key.endswith(("_size", "_bytes")) or "buffer" in key:
            assert metavar == "BYTES", key


@pytest.mark.parametrize("command", ["run", "start", "check-config"])
def test_help_explains_every_setting_flag(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli_main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "VALUE" not in text, "a flag whose metavar does not name its unit"
    out = squeezed(text)
    for key, field in config_help.setting_fields():
        repeatable = "repeatable; " if key in ("listen", "udp_listen") else ""
        metavar, text = config_help.setting_metavar(field), config_help.setting_help(field)
        line = f"{flag_of(key)} {metavar} {repeatable}{text}"
        assert squeezed(line) in out, line


def shipped_comments() -> dict[str, str]:
    """The comment lines right above each key and table of config/echod.toml, by dotted key."""
    comments: dict[str, str] = {}
    block: list[str] = []
    section = key = ""
    for line in (REPO / "config" / "echod.toml").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("#"):
            block.append(line.removeprefix("#"))
            continue
        if table := re.fullmatch(r"\[(\w+)\]", line):
            section = key = table[1]
        elif assignment := re.match(r"(\w+)\s*=", line):
            key = f"{section}.{assignment[1]}" if section else assignment[1]
        else:
            key = ""
        if key:
            comments[key] = " ".join(block)
        block = []
    return comments


def test_shipped_config_file_comments_hold_the_descriptions() -> None:
    comments = shipped_comments()
    for key, field in every_setting():
        where = "listeners" if key.startswith("listeners.") else key
        assert where in comments, f"config/echod.toml has no {where}"
        assert squeezed(field.description or "") in squeezed(comments[where]), (
            f"config/echod.toml: the comment above {where} lacks {key}'s description {field.description!r}"
        )


# -- load_settings in process ------------------------------------------------------------------------


@pytest.mark.usefixtures("clean_env")
def test_load_settings_defaults() -> None:
    settings = load_settings()
    assert settings.effective() == SPEC_DEFAULTS
    assert [str(a) for a in settings.addresses] == ["127.0.0.1:7007"]
    assert settings.worker_count == (os.cpu_count() or 1)


@pytest.mark.usefixtures("clean_env")
def test_load_settings_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "echod.toml"
    path.write_text('workers = 7\nbacklog = 77\nread_size = 7777\n[log]\nlevel = "debug"\n')
    monkeypatch.setenv("ECHOD_WORKERS", "5")
    monkeypatch.setenv("ECHOD_BACKLOG", "55")
    monkeypatch.setenv("ECHOD_LOG__FORMAT", "json")
    settings = load_settings({"workers": "3", "log": {"file": "/tmp/x.log"}}, path)
    assert settings.workers == 3  # flag
    assert settings.backlog == 55  # environment
    assert settings.read_size == 7777  # file
    assert settings.max_connections == 10000  # default
    assert (settings.log.level, settings.log.format, settings.log.file) == ("debug", "json", "/tmp/x.log")


@pytest.mark.usefixtures("clean_env")
def test_load_settings_file_does_not_leak_into_next_load(tmp_path: Path) -> None:
    path = tmp_path / "echod.toml"
    path.write_text("workers = 7\n")
    assert load_settings(None, path).workers == 7
    assert load_settings().workers == 0
    broken = tmp_path / "broken.toml"
    broken.write_text("workers = -1\n")
    with pytest.raises(ConfigError):
        load_settings(None, broken)
    assert load_settings().workers == 0


@pytest.mark.usefixtures("clean_env")
def test_load_settings_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_settings(None, missing)
    assert str(missing) in str(info.value)


@pytest.mark.usefixtures("clean_env")
def test_load_settings_broken_toml(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[log\nlevel = 1\n")
    with pytest.raises(ConfigError, match="invalid TOML") as info:
        load_settings(None, path)
    assert str(path) in str(info.value)


@pytest.mark.usefixtures("clean_env")
def test_load_settings_one_line_per_problem(tmp_path: Path) -> None:
    path = tmp_path / "echod.toml"
    path.write_text('workers = -1\nbacklog = 0\nbogus = 1\n[log]\nlevel = "loud"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(None, path)
    lines = str(info.value).splitlines()
    assert len(lines) == 4, lines
    assert sorted(line.split(":")[0] for line in lines) == ["backlog", "bogus", "log.level", "workers"]
    assert any("-1" in line for line in lines if line.startswith("workers"))


@pytest.mark.usefixtures("clean_env")
def test_load_settings_broken_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECHOD_WORKERS", "lots")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "workers" in str(info.value)
    assert "lots" in str(info.value)


@pytest.mark.usefixtures("clean_env")
def test_load_settings_watermarks() -> None:
    with pytest.raises(ConfigError, match="write_buffer_low"):
        load_settings({"write_buffer_low": 10, "write_buffer_high": 5})
    settings = load_settings({"write_buffer_low": 0, "write_buffer_high": 1})
    assert (settings.write_buffer_low, settings.write_buffer_high) == (0, 1)


@pytest.mark.usefixtures("clean_env")
def test_load_settings_bounds_accepted() -> None:
    settings = load_settings({"workers": 256, "backlog": 1, "read_size": 512, "idle_timeout": 0})
    assert (settings.workers, settings.backlog, settings.read_size, settings.idle_timeout) == (256, 1, 512, 0)
    assert settings.worker_count == 256
    with pytest.raises(ConfigError, match="workers"):
        load_settings({"workers": 257})
    with pytest.raises(ConfigError, match="read_size"):
        load_settings({"read_size": 511})
