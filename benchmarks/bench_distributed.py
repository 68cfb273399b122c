"""Stage 1 on one process and on several (torchrun, gloo on CPU), same config and seed, side by side.

The issue's target: two processes give the same Recall@20 as one within 0.01. Speed is reported as measured: on
this 2-core machine each process gets one core, and every process propagates the whole graph (only the batch's
loss rows are split), so more processes help only where the loss and the quantizer, not the propagation, dominate.

    python benchmarks/bench_distributed.py                          # configs/default.yaml, 1 vs 2 processes
    python benchmarks/bench_distributed.py --config configs/movielens.yaml --processes 1,2

Each run is a fresh `dppmg stage1` with stage1.overwrite=true under runs/bench-ddp-<n>/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = 0.01  # |Recall@20 (n processes) - Recall@20 (1 process)|


def run(config: str, processes: int, extra: list[str]) -> dict[str, float]:
    name = f"bench-ddp-{processes}"
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
    ]
    command = [*(launcher if processes > 1 else [sys.executable]), "-m", "dppmg", "stage1", config]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    subprocess.run([*command, f"run_name={name}", "stage1.overwrite=true", "-q", *extra], check=True, env=env)
    seconds = time.perf_counter() - start
    m = json.loads((REPO / "runs" / name / "stage1" / "metrics.json").read_text())
    return {
        "seconds": seconds,
        "epoch_seconds": m["epoch_seconds"],
        **{k: m[k] for k in ("recall@20", "recall@20_quantized", "epochs_run")},
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--processes", default="1,2")
    ap.add_argument("overrides", nargs="*", help="key=value for both runs")
    args = ap.parse_args(argv)
    counts = [int(p) for p in args.processes.split(",")]
    # Data preparation once, outside the timed runs.
    subprocess.run(
        [sys.executable, "-m", "dppmg", "data", "prepare", args.config, "-q", *args.overrides], check=True
    )
    results = {n: run(args.config, n, args.overrides) for n in counts}
    base = results[counts[0]]
    print(f"\n== stage 1 on {args.config}, {os.cpu_count()} cores")
    print(
        f"{'processes':>9} {'recall@20':>10} {'quantized':>10} {'epochs':>7} {'epoch s':>8} {'wall s':>7} {'epoch speed-up':>15} {'|Δ recall|':>11}"
    )
    for n, r in results.items():
        delta = abs(r["recall@20"] - base["recall@20"])
        print(f"{n:>9} {r['recall@20']:>10.4f} {r['recall@20_quantized']:>10.4f} {r['epochs_run']:>7} "
              f"{r['epoch_seconds']:>8.3f} {r['seconds']:>7.1f} {base['epoch_seconds'] / r['epoch_seconds']:>14.2f}x "
              f"{delta:>11.4f}{'' if delta <= TARGET else '  (target missed)'}")  # fmt: skip


if __name__ == "__main__":
    main()
