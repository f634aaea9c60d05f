"""Logs: text and JSON lines, journald priority prefixes, one line per event that matters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import ECHOD, echo_roundtrip, free_port, wait_for

pytestmark = pytest.mark.integration  # every test runs the real echod


def test_json_log_lines_are_objects(echod):
    daemon = echod("--log-format", "json", workers=2)
    with daemon.connect() as sock:
        assert echo_roundtrip(sock, b"x") == b"x"
    daemon.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload complete" in daemon.log(), 10, "the reload to be logged")
    assert daemon.stop() == 0
    lines = [line for line in daemon.log().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert {"ts", "level", "logger", "pid", "msg"} <= set(entries[0])
    messages = [entry["msg"] for entry in entries]
    assert any(msg.startswith("echod ") and " starting: listen " in msg for msg in messages), messages
    assert any(msg.startswith("ready:") for msg in messages)
    assert any(msg.startswith("reload complete") for msg in messages)
    assert any(msg == "echod stopped" for msg in messages)
    # No line per connection or per echo.
    assert len(entries) < 20, messages


def test_journald_priority_prefixes(tmp_path: Path):
    """With $JOURNAL_STREAM naming our stderr, every line starts with a syslog priority."""
    log_path = tmp_path / "journal.log"
    port, empty = free_port(), tmp_path / "empty.toml"
    empty.touch()
    with log_path.open("wb") as stderr:
        st = os.fstat(stderr.fileno())
        env = {k: v for k, v in os.environ.items() if not k.startswith("ECHOD_")}
        env.update(ECHOD_CONFIG=str(empty), JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        proc = subprocess.Popen(
            [*ECHOD, "run", "--workers", "1", "--listen", f"127.0.0.1:{port}", "--metrics-listen", ""],
            stdout=stderr,
            stderr=stderr,
            env=env,
            start_new_session=True,
        )
        try:
            wait_for(lambda: "ready:" in log_path.read_text(), 15, "echod to become ready")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    lines = log_path.read_text().splitlines()
    assert lines and all(line[:3] in ("<6>", "<4>", "<3>", "<7>") for line in lines), lines
    assert any(line.startswith("<6>INFO") for line in lines), lines


def test_text_logs_have_no_prefix_without_journal(echod):
    daemon = echod(workers=1, env={"JOURNAL_STREAM": "1:1"})  # not our stderr: ignored
    assert not any(line.startswith("<") for line in daemon.log().splitlines())


@pytest.mark.parametrize(("flag", "key"), [("--log-file", "log.file"), ("--access-log", "access_log")])
def test_unwritable_log_file_is_a_config_error(tmp_path: Path, flag: str, key: str):
    result = subprocess.run(
        [
            *ECHOD,
            "run",
            flag,
            str(tmp_path / "missing-dir" / "echod.log"),
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--metrics-listen",
            "",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("ECHOD_")},
            "ECHOD_CONFIG": "/dev/null",
        },
    )
    assert result.returncode == 78, result.stderr
    assert f"{key}: cannot open" in result.stderr


def test_backlog_above_somaxconn_is_warned(echod):
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    daemon = echod("--backlog", str(somaxconn + 1), workers=1)
    assert f"backlog {somaxconn + 1} is capped at net.core.somaxconn={somaxconn}" in daemon.log()
