"""Property-based tests of `echod check-config` over generated TOML files and ECHOD_* environments.

Hypothesis generates configuration files (known keys with values of every TOML type, unknown keys,
nested tables, odd strings including control and non-BMP characters, huge, negative and non-finite
numbers, booleans, arrays, dates) and ECHOD_* variables (known and misspelt names in any case, with
plausible and random values), and runs `echod.cli.main(["check-config", "--config", path])` in this
process. Whatever the input:

- no exception escapes (no traceback, no SystemExit), and the exit code is 0 or 78;
- 78: nothing on stdout, and stderr names (at the start of a problem line) a key or variable that was
  in the input;
- 0: nothing on stderr; stdout is TOML whose keys are exactly the settings, which check-config reads
  back to the very same text; a known key given in the file with a value of its natural type (and not
  overridden by the environment) comes out unchanged.

Runs are deterministic (derandomize, no example database) so that CI sees the same examples every time.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import math
import os
import re
import tomllib
import traceback
from pathlib import Path
from typing import Any

import pytest
from conftest import fuzz_settings
from echod.cli import main as cli_main
from hypothesis import example, given, settings
from hypothesis import strategies as st

EX_CONFIG = 78
FUZZ = fuzz_settings(200)

# The settings (SPEC.md and the README's extensions) and the kind of value each takes.
TOP_LEVEL = {
    "listen": "addresses",
    "workers": "int",
    "backlog": "int",
    "max_connections": "int",
    "read_size": "int",
    "write_buffer_high": "int",
    "write_buffer_low": "int",
    "max_buffered_bytes": "int",
    "max_connections_per_ip": "int",
    "idle_timeout": "float",
    "shutdown_timeout": "float",
    "heartbeat_timeout": "float",
    "io_mode": "io_mode",
    "proxy_protocol_timeout": "float",
    "tls_handshake_timeout": "float",
    "udp_listen": "addresses",
    "udp_rate_packets": "float",
    "udp_rate_bytes": "float",
    "udp_max_sources": "int",
    "access_log": "str",
    "access_log_format": "format",
    "access_log_sample": "float",
}
TABLES = {"listeners"}  # tables whose keys are listen addresses, not fixed names
SECTIONS = {
    "metrics": {"listen": "address"},
    "log": {"level": "level", "format": "format", "file": "str"},
    "daemon": {"pidfile": "str", "user": "str", "group": "str"},
}
KIND = {**TOP_LEVEL, **{f"{s}.{k}": kind for s, keys in SECTIONS.items() for k, kind in keys.items()}}
ENV_NAMES = [f"ECHOD_{key.upper().replace('.', '__')}" for key in KIND] + [
    f"ECHOD_{section.upper()}" for section in (*SECTIONS, *TABLES)
]


# -- a small TOML writer (tomllib only reads) ------------------------------------------------------------

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_string(text: str) -> str:
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_string(key)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def to_toml(doc: dict[str, Any]) -> str:
    """Scalars and arrays first, then each table as a [section] (nested tables inline)."""
    lines = [f"{toml_key(k)} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for key, table in doc.items():
        if isinstance(table, dict):
            lines += ["", f"[{toml_key(key)}]"] + [
                f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items()
            ]
    return "\n".join(lines) + "\n"


def same(a: Any, b: Any) -> bool:
    """Equality with NaN equal to itself (for checking the writer against tomllib)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


# -- strategies ------------------------------------------------------------------------------------------

# Any text TOML can hold: everything but lone surrogates (control characters are written escaped).
weird_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=24)
odd_strings = st.sampled_from(
    ["", " ", "0", "-1", "1e3", "true", "null", "[]", "{}", "\x7f", "\u2028", "\ufeff", "\U0001f600",
     "é", "127.0.0.1", ":", "[::1]", "*", "localhost:", "../../etc/passwd", "a\nb", "\\", '"']
)  # fmt: skip
huge_ints = st.sampled_from([2**31, 2**32 + 1, 2**63 - 1, -(2**63), 2**64, 10**30, -(10**30)])
scalars = st.one_of(
    st.integers(),
    huge_ints,
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    weird_text,
    odd_strings,
    st.datetimes(),
    st.dates(),
    st.times(),
)
port = st.integers(min_value=0, max_value=70000)
address = st.one_of(
    st.builds("127.0.0.{}:{}".format, st.integers(0, 300), port),
    st.builds("[::1]:{}".format, port),
    st.builds("{}:{}".format, st.sampled_from(["*", "localhost", "0.0.0.0", "::1", "example.com", ""]), port),
    odd_strings,
    weird_text,
)


def plausible(kind: str) -> st.SearchStrategy[Any]:
    """Values of about the right type and range for a setting (valid or just off)."""
    if kind == "int":
        return st.one_of(
            st.integers(-2, 70000),
            st.sampled_from([0, 1, 512, 1023, 65535, 65536, 1 << 30, (1 << 30) + 1, 1 << 40, 10**6 + 1]),
        )
    if kind == "float":
        return st.one_of(
            st.integers(-2, 100000), st.floats(-1, 1e9, allow_nan=False), st.sampled_from([0.5, 86400.0])
        )
    if kind == "addresses":
        return st.lists(address, max_size=3)
    if kind == "address":
        return st.one_of(st.just(""), address)
    if kind == "level":
        return st.sampled_from(["debug", "info", "warning", "error", "INFO", "trace", ""])
    if kind == "format":
        return st.sampled_from(["text", "json", "JSON", "xml", ""])
    if kind == "io_mode":
        return st.sampled_from(["copy", "splice", "SPLICE", "zero-copy", ""])
    return st.one_of(weird_text, odd_strings, st.just("/tmp/echod.log"))


values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(weird_text, inner, max_size=3),
    ),
    max_leaves=8,
)


def setting_value(kind: str) -> st.SearchStrategy[Any]:
    return st.one_of(plausible(kind), plausible(kind), values)


def section(name: str) -> st.SearchStrategy[Any]:
    known = SECTIONS[name]
    table = st.fixed_dictionaries(
        {}, optional={key: setting_value(kind) for key, kind in known.items()}
    )  # fmt: skip
    unknown = st.dictionaries(weird_text.filter(lambda k: k not in known), values, max_size=2)
    with_unknown = st.builds(lambda a, b: {**b, **a}, table, unknown)
    return st.one_of(table, table, with_unknown, values)  # mostly a table, now and then anything


listener_options = st.one_of(
    st.fixed_dictionaries({}, optional={"proxy_protocol": st.one_of(st.booleans(), st.booleans(), values)}),
    st.dictionaries(weird_text, values, max_size=2),
)
listeners_table = st.one_of(
    st.dictionaries(
        st.sampled_from(["127.0.0.1:7007", "127.0.0.1:7008", "[::1]:7007"]), listener_options, max_size=2
    ),
    st.dictionaries(address, listener_options, max_size=2),
    values,
)

documents = st.builds(
    lambda known, unknown: {**unknown, **known},
    st.fixed_dictionaries(
        {},
        optional={
            **{key: setting_value(kind) for key, kind in TOP_LEVEL.items()},
            **{name: section(name) for name in SECTIONS},
            "listeners": listeners_table,
        },
    ),
    st.one_of(
        st.just({}),
        st.just({}),
        st.dictionaries(
            weird_text.filter(lambda k: k not in KIND and k not in SECTIONS and k not in TABLES),
            values,
            max_size=3,
        ),
    ),
)


def env_name(name: str) -> st.SearchStrategy[str]:
    """A variable name as given, or in lower or mixed case (echod reads the environment case-blind)."""
    return st.sampled_from([name, name.lower(), name[:6] + name[6:].lower(), name.capitalize()])


ENV_ODD = ["debug", "json", "", "{}", '{"listen": ""}', '{"listen": 5}', '{"level": "debug"}', "[", "{",
           "null", "1.5", "nan", "inf", "-0", "true"]  # fmt: skip
env_value = st.one_of(
    st.integers(-5, 100000).map(str),
    address,
    st.lists(address, max_size=3).map(lambda items: "[" + ", ".join(f'"{a}"' for a in items) + "]"),
    st.lists(address, max_size=3).map(",".join),
    st.sampled_from(ENV_ODD),
    weird_text,
).filter(lambda v: "\x00" not in v)

env_names = st.one_of(
    st.sampled_from(ENV_NAMES).flatmap(env_name),
    st.sampled_from(["ECHOD_WORKER", "ECHOD_METRICS__PORT", "ECHOD_LOG__", "ECHOD_", "ECHOD_LISTEN__0"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="="), max_size=12).map(
        "ECHOD_".__add__
    ),
)
environments = st.dictionaries(env_names, env_value, max_size=3)


# -- running check-config in this process -------------------------------------------------------------------


def check_config(path: Path, env: dict[str, str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        for key in list(os.environ):
            if key.upper().startswith("ECHOD_"):
                patch.delenv(key)
        for key, value in env.items():
            patch.setenv(key, value)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = cli_main(["check-config", "--config", str(path)])
        except BaseException:
            pytest.fail(
                f"check-config raised instead of exiting 0 or 78:\n{traceback.format_exc()}\n"
                f"file:\n{path.read_text(encoding='utf-8')}\nenvironment: {env!r}"
            )
    return code, out.getvalue(), err.getvalue()


def key_paths(doc: Any, prefix: tuple[str, ...] = ()) -> set[str]:
    """Every dotted key path in a document (tables and leaves): raw, and with odd keys quoted as TOML or
    Python would quote them (a message may show `"": unknown key` for an empty key)."""
    paths: set[str] = set()
    if isinstance(doc, dict):
        for key, value in doc.items():
            parts = (*prefix, key)
            paths.add(".".join(parts))
            paths.add(".".join(toml_key(part) for part in parts))
            paths.add(".".join(part if toml_key(part) == part else repr(part) for part in parts))
            paths |= key_paths(value, parts)
    return paths


def names_one_of(stderr: str, candidates: set[str]) -> bool:
    """Some problem line starts with a candidate key (`key:` or `key.sub...:`; keys may span lines), or
    names a setting of the input as a word (checks across settings: "write_buffer_low (..) must be ...")."""
    body = stderr.split("\n", 1)[1] if "\n" in stderr else ""
    if any(re.search(r"(?:^|\n)[ \t]*" + re.escape(c) + r"[:.]", body) for c in candidates if c):
        return True
    settings_named = candidates & KIND.keys()
    return any(re.search(r"\b" + re.escape(c) + r"\b", body) for c in settings_named)


def env_keys(env: dict[str, str]) -> set[str]:
    names = set(env) | {name.upper() for name in env}
    names |= {name[6:].lower().replace("__", ".") for name in env if name.upper().startswith("ECHOD_")}
    return names


def natural(kind: str, value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if kind == "int":
        return isinstance(value, int)
    if kind == "float":
        return isinstance(value, (int, float))
    if kind == "addresses":
        return isinstance(value, list) and all(isinstance(item, str) for item in value)
    return isinstance(value, str)


def lookup(doc: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = doc
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def check_properties(workdir: Path, doc: dict[str, Any], env: dict[str, str]) -> int:
    text = to_toml(doc)
    assert same(tomllib.loads(text), doc), f"the test's TOML writer is wrong:\n{text}"
    path = workdir / "fuzz.toml"
    path.write_text(text, encoding="utf-8")
    code, out, err = check_config(path, env)
    shown = f"file:\n{text}\nenvironment: {env!r}\nstdout:\n{out}\nstderr:\n{err}"
    assert code in (0, EX_CONFIG), f"exit {code}\n{shown}"
    if code == EX_CONFIG:
        assert out == "", f"an invalid configuration printed settings\n{shown}"
        assert err.startswith("echod: invalid configuration:"), shown
        assert names_one_of(err, key_paths(doc) | env_keys(env)), (
            f"the message names no key or variable of the input\n{shown}"
        )
        return code

    assert err == "", shown
    try:
        effective = tomllib.loads(out)
    except tomllib.TOMLDecodeError as exc:
        pytest.fail(f"check-config printed settings that are not TOML ({exc})\n{shown}")
    assert effective.keys() == {*TOP_LEVEL, *SECTIONS, *TABLES}, shown
    for name, keys in SECTIONS.items():
        assert effective[name].keys() == keys.keys(), shown
    # The printed settings are a configuration file that reads back to the same settings.
    again = workdir / "effective.toml"
    again.write_text(out, encoding="utf-8")
    code2, out2, err2 = check_config(again, {})
    assert (code2, out2, err2) == (0, out, ""), f"the printed settings do not read back\n{shown}\n{err2}"
    # File values of their natural type come out as given, unless the environment overrides them.
    overridden = env_keys(env)
    for dotted, kind in KIND.items():
        present, value = lookup(doc, dotted)
        if (
            not present
            or not natural(kind, value)
            or dotted in overridden
            or dotted.split(".")[0] in overridden
        ):
            continue
        _, got = lookup(effective, dotted)
        assert got == value, f"{dotted}: file says {value!r}, check-config prints {got!r}\n{shown}"
    return code


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("config-fuzz")


# Explicit examples: cases that longer random runs found, kept so that every run tries them.
@FUZZ
@given(doc=documents)
@example(doc={"": 1})  # an empty (quoted) key
@example(doc={"\r": [], "log": {"fi\nle": 1}})  # keys with line breaks
@example(doc={"log": {"file": "/var/log/a\x7fb.log"}})  # DEL must be escaped in TOML output
@example(doc={"daemon": {"user": "\x00\x1f\u2028\U0001f600"}})
@example(doc={"write_buffer_high": 1})  # a check across two settings
@example(doc={"workers": 2**64, "idle_timeout": float("nan"), "backlog": True})
def test_fuzzed_files(workdir: Path, doc: dict[str, Any]) -> None:
    check_properties(workdir, doc, {})


@FUZZ
@given(env=environments)
@example(env={"ECHOD_METRICS": "[::1]:0"})  # a section variable that is not JSON
@example(env={"ECHOD_LOG": "debug"})
@example(env={"ECHOD_DAEMON": '{"user": 5}'})
@example(env={"ECHOD_LOG__FILE": "\x7f"})
@example(env={"echod_workers": "2", "ECHOD_LISTEN": "127.0.0.1:1,127.0.0.1:1"})
def test_fuzzed_environment(workdir: Path, env: dict[str, str]) -> None:
    check_properties(workdir, {}, env)


@FUZZ
@given(doc=documents, env=environments)
def test_fuzzed_file_and_environment(workdir: Path, doc: dict[str, Any], env: dict[str, str]) -> None:
    check_properties(workdir, doc, env)


def test_fuzz_generates_both_outcomes(workdir: Path) -> None:
    """The generators are not degenerate: they reach valid and invalid configurations alike."""
    seen: set[int] = set()

    @settings(max_examples=60, deadline=None, derandomize=True, database=None)
    @given(doc=documents, env=environments)
    def probe(doc: dict[str, Any], env: dict[str, str]) -> None:
        path = workdir / "probe.toml"
        path.write_text(to_toml(doc), encoding="utf-8")
        seen.add(check_config(path, env)[0])

    probe()
    assert seen == {0, EX_CONFIG}, seen
