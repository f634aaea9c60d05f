"""bench/pool.py: per-round ratios to the baseline of the same round, pooled over runs (bench/README.md,
"Issue 19's goals, pooled")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

POOL = Path(__file__).resolve().parent.parent / "bench" / "pool.py"


def _row(server: str, scenario: str, rnd: int, busy: float, rate: float) -> str:
    metric = {"churn": "conns_per_s", "large": "mib_per_s"}.get(scenario, "msgs_per_s")
    return json.dumps({"server": server, "scenario": scenario, "round": rnd,
                       "server_core_busy_pct": busy, metric: rate})  # fmt: skip


def _pool(tmp_path: Path, *runs: list[str]) -> dict[tuple[str, str], str]:
    paths = []
    for i, rows in enumerate(runs):
        path = tmp_path / f"run{i}.jsonl"
        path.write_text("\n".join(rows) + "\n")
        paths.append(str(path))
    out = subprocess.run([sys.executable, str(POOL), *paths], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = {}
    for line in out.stdout.splitlines()[1:]:
        scenario, server, rest = line.split(None, 2)
        lines[(scenario, server)] = rest
    return lines


def test_each_round_is_taken_against_its_own_baseline_and_all_rounds_pool(tmp_path: Path) -> None:
    # Run 1: the baseline is twice as expensive in round 1 as in round 0; "a" costs 0.9x in both
    # rounds, which only a per-round ratio sees (a ratio of medians would say 0.9 too, a ratio of
    # round 0's "a" to round 1's baseline 0.45). Run 2: "a" at 0.8x, 1.0x and 1.2x.
    run1 = [
        _row("uvloop_proto", "small", 0, 100.0, 200_000),  # 5 us/msg
        _row("a", "small", 0, 90.0, 200_000),  # 4.5 us/msg: 0.9x
        _row("uvloop_proto", "small", 1, 100.0, 100_000),  # 10 us/msg
        _row("a", "small", 1, 90.0, 100_000),  # 9 us/msg: 0.9x
    ]
    run2 = [
        _row("uvloop_proto", "churn", 0, 100.0, 1_000),
        _row("a", "churn", 0, 80.0, 1_000),
        _row("uvloop_proto", "churn", 1, 100.0, 1_000),
        _row("a", "churn", 1, 100.0, 1_000),
        _row("uvloop_proto", "churn", 2, 100.0, 1_000),
        _row("a", "churn", 2, 120.0, 1_000),
        _row("uvloop_proto", "small", 0, 100.0, 100_000),
        _row("a", "small", 0, 110.0, 100_000),  # 1.1x
        _row("uvloop_proto", "small", 1, 50.0, 100_000),
        _row("a", "small", 1, 55.0, 100_000),  # 1.1x
        _row("uvloop_proto", "small", 2, 100.0, 100_000),
        _row("a", "small", 2, 100.0, 100_000),  # 1.0x
        _row("a", "rss", 0, 10.0, 1.0),  # rss has no cost: never pooled
    ]
    lines = _pool(tmp_path, run1, run2)
    assert set(lines) == {("small", "a"), ("churn", "a")}
    # small: 0.9, 0.9 (run 1) and 1.1, 1.1, 1.0 (run 2): pooled median 1.0, each run's own median.
    assert lines[("small", "a")].startswith("1.000 ")
    assert lines[("small", "a")].endswith("(5)  runs: 0.900 1.100")
    assert lines[("churn", "a")].startswith("1.000 ")
    assert lines[("churn", "a")].endswith("(3)  runs: 1.000")


def test_a_round_without_its_baseline_is_left_out(tmp_path: Path) -> None:
    run = [
        _row("uvloop_proto", "many", 0, 100.0, 100_000),
        _row("a", "many", 0, 70.0, 100_000),
        _row("a", "many", 1, 10.0, 100_000),  # the baseline's round 1 failed: nothing to compare with
    ]
    lines = _pool(tmp_path, run)
    assert lines[("many", "a")].startswith("0.700 ")
    assert lines[("many", "a")].endswith("(1)  runs: 0.700")
