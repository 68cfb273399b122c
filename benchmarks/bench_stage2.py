"""Stage 2 on the default world: wall time and peak memory of `dppmg stage2`, cold and with cached generators.

    .venv/bin/python benchmarks/bench_stage2.py [--config configs/default.yaml] [key=value ...]

Runs stage 1 once for a benchmark run name (skipped when already done), then `dppmg stage2` twice, each in its own
process so that its peak resident memory is its own (`os.wait4`):
  cold    with an empty generator cache, so the warm-start is included (budget: 15 minutes)
  cached  a second run name on the same cache (budget: 8 minutes)
and prints each against its budget, with the cached run's generation throughput and RL iteration time from its
metrics.json. Outputs go to a temporary folder (the processed dataset is shared with `make data`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from targets import stage2_targets  # a script has its own folder on sys.path

REPO = Path(__file__).resolve().parents[1]
DPPMG = [sys.executable, "-m", "dppmg"]
BUDGET_SECONDS = {"cold": 15 * 60, "cached": 8 * 60}
BUDGET_GB = 6.0


def run(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak resident GB) of one command in its own process; raises when it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(args)}")
    return seconds, usage.ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides for both runs")
    ns = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-stage2-"))
    common = [
        ns.config,
        f"runs_dir={tmp / 'runs'}",
        f"features.cache_dir={tmp / 'cache'}",
        "-q",
        *ns.overrides,
    ]
    print(f"outputs in {tmp}", flush=True)
    for name in ("cold", "cached"):
        run([*DPPMG, "stage1", *common, f"run_name={name}"])
    results = {}
    for name in ("cold", "cached"):
        seconds, gb = run([*DPPMG, "stage2", *common, f"run_name={name}"])
        results[name] = (seconds, gb)
        print(f"{name}: {seconds:.0f} s, peak {gb:.2f} GB", flush=True)
    metrics = json.loads((tmp / "runs" / "cached" / "stage2" / "metrics.json").read_text())

    print("\n| run | seconds | budget | ratio to budget | peak GB | budget GB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (seconds, gb) in results.items():
        budget = BUDGET_SECONDS[name]
        print(f"| {name} | {seconds:.0f} | {budget} | {seconds / budget:.2f} | {gb:.2f} | {BUDGET_GB} |")
    t = metrics["timing"]
    print(
        f"\nwarm-start {t['warmstart_seconds']:.0f} s (cached run: loading only), grounding {t['grounding_seconds']:.0f} s, "
        f"RL iteration {t['rl_iteration_seconds']:.1f} s, generation {t['images_per_second']:.2f} images/s and "
        f"{t['tokens_per_second']:.0f} tokens/s"
    )
    print("heldout (cached run):")
    for cond, values in metrics["heldout"].items():
        print(f"  {cond:9s}", "  ".join(f"{k}={v:.4f}" for k, v in values.items()))
    for key, g in stage2_targets(metrics).items():
        print(f"  {key}: {g['value']:+.4f} (target {g['target']}): {'met' if g['met'] else 'not met'}")
    if metrics.get("heldout_oracle") is not None:
        oracle = metrics["heldout_oracle"]
        print("  oracle   ", "  ".join(f"{k}={v:.4f}" for k, v in oracle.items()))
        print(
            f"  oracle_personalization_gain_over_none: {metrics['oracle_personalization_gain_over_none']:+.4f}"
        )


if __name__ == "__main__":
    main()
