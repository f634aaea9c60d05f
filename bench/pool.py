#!/usr/bin/env python3
"""Pool the per-round cost ratios of several runs of the shared C harness (`compare.py --json`).

One 5-round run of compare.py on this 2-vCPU VM moves a server's `cost x` by more than the distance to
issue 19's goals: the same build read 0.947-1.039 (small) and 0.952-1.051 (churn) in four runs of one
day (bench/README.md, "Issue 19's goals, pooled"). Every round's ratio is taken against the baseline
of that same round, exactly as compare.py does, and the ratios of all runs are pooled: the median of
20 rounds and its interquartile range say more than any one run's median of 5. Runs pool only where a
server name means the same build in each of them; that is for the caller to know.

    .venv/bin/python bench/pool.py RUN1.jsonl RUN2.jsonl ...   # compare.py --json files
    .venv/bin/python bench/pool.py --baseline uvloop_proto --servers compiled,interp RUN.jsonl ...
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

# The rate each scenario's cost is per (compare.py's metric); rss has no cost.
METRIC = {
    "small": "msgs_per_s",
    "pipelined": "msgs_per_s",
    "large": "mib_per_s",
    "many": "msgs_per_s",
    "churn": "conns_per_s",
}


def cost_us(row: dict[str, object]) -> float | None:
    """compare.py's cost: busy microseconds of the server's pinned core per unit of work."""
    rate, busy = row.get(METRIC[str(row["scenario"])]), row.get("server_core_busy_pct")
    if not isinstance(rate, int | float) or not isinstance(busy, int | float) or not rate:
        return None
    return busy / 100.0 * 1e6 / rate


def ratios(path: Path, baseline: str) -> dict[tuple[str, str], list[float]]:
    """(scenario, server) -> this run's per-round cost ratios to the baseline of the same round."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("scenario") in METRIC]
    base = {(r["scenario"], r["round"]): cost_us(r) for r in rows if r["server"] == baseline}
    out: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        b, c = base.get((r["scenario"], r["round"])), cost_us(r)
        if r["server"] != baseline and b and c:
            out.setdefault((r["scenario"], r["server"]), []).append(c / b)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="compare.py --json files")
    ap.add_argument("--baseline", default="uvloop_proto")
    ap.add_argument("--servers", help="comma list (default: every server but the baseline)")
    args = ap.parse_args()
    wanted = set(args.servers.split(",")) if args.servers else None
    per_run = [ratios(path, args.baseline) for path in args.runs]
    keys = sorted({k for run in per_run for k in run}, key=lambda k: (list(METRIC).index(k[0]), k[1]))
    print(f"cost x {args.baseline}: median of all rounds pooled [quartiles] (rounds); each run's median")
    for scenario, server in keys:
        if wanted is not None and server not in wanted:
            continue
        runs = [run[(scenario, server)] for run in per_run if (scenario, server) in run]
        pooled = sorted(x for run in runs for x in run)
        q1, _, q3 = statistics.quantiles(pooled, n=4) if len(pooled) > 1 else (pooled[0],) * 3
        each = " ".join(f"{statistics.median(run):.3f}" for run in runs)
        print(
            f"{scenario:10} {server:16} {statistics.median(pooled):.3f} [{q1:.3f}..{q3:.3f}] "
            f"({len(pooled)})  runs: {each}"
        )


if __name__ == "__main__":
    main()
