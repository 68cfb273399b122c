"""Sweep benchmark: an offline sweep of stage-1 trials on the default world, against issue #13's 15-minute target.

    python benchmarks/bench_sweep.py                     # 8 trials of configs/sweeps/stage1.yaml, configs/default.yaml
    python benchmarks/bench_sweep.py --count 2 --config configs/debug.yaml   # a quick check

Prepares the dataset first (untimed: it happens once per world), then runs `dppmg sweep` in a fresh sweep name
and prints each trial's seconds (from the sweep's state.json), the total, and the target.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from dppmg.io import read_json

REPO = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 15 * 60


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default="configs/sweeps/stage1.yaml")
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--count", type=int, default=8)
    ap.add_argument(
        "--name", default=f"bench-{int(time.time())}", help="sweep name (a new one starts afresh)"
    )
    ns = ap.parse_args()
    py = [sys.executable, "-m", "dppmg"]
    subprocess.run([*py, "data", "prepare", ns.config, "-q"], check=True, cwd=REPO)
    spec = REPO / "runs" / "sweeps" / f"{ns.name}.yaml"
    spec.parent.mkdir(parents=True, exist_ok=True)
    text = (REPO / ns.spec).read_text(encoding="utf-8")
    spec.write_text(f"{text}\nname: {ns.name}\n".replace("name: stage1\n", "", 1), encoding="utf-8")
    start = time.perf_counter()
    cmd = [*py, "sweep", str(spec), "--count", str(ns.count), ns.config, "tracking.mode=disabled"]
    subprocess.run(cmd, check=True, cwd=REPO)
    total = time.perf_counter() - start
    trials = read_json(REPO / "runs" / "sweeps" / ns.name / "state.json")["trials"]
    for t in trials:
        print(f"trial {t['id']:>2} {t['state']:<9} {t['seconds']:>7.1f} s  metric {t['metric']}")
    per = total / max(len(trials), 1)
    verdict = "met" if total <= TARGET_SECONDS else "missed"
    print(
        f"{len(trials)} trials in {total:.0f} s ({per:.0f} s per trial); target {TARGET_SECONDS} s: {verdict}"
    )


if __name__ == "__main__":
    main()
