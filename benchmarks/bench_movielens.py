"""Real data and real pretrained parts: MovieLens ml-latest-small with its posters (configs/movielens-posters.yaml).

    .venv/bin/python benchmarks/bench_movielens.py [--part stage1|pipeline|all] [key=value ...]

Needs ../shared/data/ml-latest-small and its posters, and `make models` (SmolLM2, EfficientNet-Lite0).

Part `stage1`, in one process on the same split with the same metric code:
  ours text / image / both   the stage-1 model as `make stage1` trains it, with stage1.modalities set
  PyG LightGCN               torch_geometric's LightGCN trained to convergence: every one of 200 epochs, the
                             test metrics of the best validation epoch, over a small grid of learning rate and
                             L2 weight (the best valid Recall@20 of the grid is reported)
and prints Recall@20 (continuous and token-decoded users) with its ratio to LightGCN, and the genre-recovery probe
of the tokens (stage1/metrics.json `keyword_recovery`).

Part `pipeline`: `dppmg stage1` then `dppmg stage2` on movielens-posters, each in its own process with its own
peak resident memory (`os.wait4`), from an empty run folder and generator cache (the processed dataset and the
dequantized SmolLM2 are shared with `make`), against the 45-minute and 8 GB budgets; then the held-out table of
stage2/metrics.json with the 95 % intervals of the paired differences against `none`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "movielens-posters.yaml"
ML_SMALL = REPO.parent / "shared" / "data" / "ml-latest-small"
DPPMG = [sys.executable, "-m", "dppmg"]
BUDGET_SECONDS = 45 * 60
BUDGET_GB = 8.0
LIGHTGCN_EPOCHS = 200
LIGHTGCN_GRID = {"lr": [1e-3, 5e-3], "reg_weight": [1e-4, 1e-3]}
TARGET_RATIO = 1.15
TARGET_QUANTIZED = 0.95


def run(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak resident GB) of one command in its own process; raises when it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(args)}")
    return seconds, usage.ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux


def stage1_part(overrides: list[str]) -> None:
    from dppmg.config import load_config
    from dppmg.data.format import load_dataset
    from dppmg.data.prepare import prepare
    from stage1_preference.baselines import train_lightgcn
    from stage1_preference.train import run_stage1

    tmp = Path(tempfile.mkdtemp(prefix="bench-movielens-s1-"))
    base = [f"runs_dir={tmp / 'runs'}", *overrides]
    cfg = load_config(CONFIG, base)
    ds = load_dataset(prepare(cfg, progress=False))
    s1 = cfg.stage1
    print(f"== stage 1 on {ds.root}: {ds.num_users:,} users, {ds.num_items:,} items, "
          f"{len(ds.split('train')):,} train interactions; outputs in {tmp}", flush=True)  # fmt: skip

    ours = {}
    for name, modalities in (("text", "[text]"), ("image", "[image]"), ("both", "[text,image]")):
        run_cfg = load_config(CONFIG, [*base, f"run_name={name}", f"stage1.modalities={modalities}"])
        start = time.perf_counter()
        metrics = json.loads((run_stage1(run_cfg, progress=False) / "metrics.json").read_text())
        metrics["seconds"] = time.perf_counter() - start
        ours[name] = metrics
        print(f"  ours ({name}): recall@20 {metrics['recall@20']:.4f}, tokens {metrics['recall@20_quantized']:.4f} "
              f"({metrics['seconds']:.0f} s, best epoch {metrics['best_epoch']})", flush=True)  # fmt: skip

    grid = []
    for lr, reg in itertools.product(LIGHTGCN_GRID["lr"], LIGHTGCN_GRID["reg_weight"]):
        r = train_lightgcn(
            ds, dim=s1.dim, layers=s1.layers, epochs=LIGHTGCN_EPOCHS, batch_size=s1.batch_size, lr=lr,
            reg_weight=reg, seed=cfg.seed, ks=[20], patience=LIGHTGCN_EPOCHS, sparse_adjacency=True,
        )  # fmt: skip
        r.update(lr=lr, reg_weight=reg)
        grid.append(r)
        print(f"  PyG LightGCN lr {lr:g} reg {reg:g}: valid {r['best_valid_recall@20']:.4f} at epoch "
              f"{r['best_epoch']}/{LIGHTGCN_EPOCHS}, test recall@20 {r['recall@20']:.4f}", flush=True)  # fmt: skip
    best = max(grid, key=lambda r: r["best_valid_recall@20"])
    ref = best["recall@20"]

    print(f"\nPyG LightGCN (best of the grid: lr {best['lr']:g}, reg {best['reg_weight']:g}, best epoch "
          f"{best['best_epoch']} of {LIGHTGCN_EPOCHS}): test recall@20 {ref:.4f}\n")  # fmt: skip
    print("| model | recall@20 | vs LightGCN | tokens recall@20 | tokens vs LightGCN | tokens / continuous |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, m in ours.items():
        r, q = m["recall@20"], m["recall@20_quantized"]
        print(f"| ours ({name}) | {r:.4f} | {r / ref:.2f}x | {q:.4f} | {q / ref:.2f}x | {q / r:.2f} |")
    print(f"| PyG LightGCN | {ref:.4f} | 1.00x | | | |")
    both = ours["both"]
    print(f"\ntargets: both >= {TARGET_RATIO}x LightGCN: {both['recall@20'] / ref:.2f}x "
          f"({'met' if both['recall@20'] / ref >= TARGET_RATIO else 'not met'}); tokens >= {TARGET_QUANTIZED}x "
          f"continuous: {both['recall@20_quantized'] / both['recall@20']:.2f}x "
          f"({'met' if both['recall@20_quantized'] / both['recall@20'] >= TARGET_QUANTIZED else 'not met'})")  # fmt: skip

    print("\ngenre recovery (held-out users, probe from the token-decoded vectors):")
    print("| run | tokens | top genre | chance | above-median genres | chance |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, m in ours.items():
        for modality, g in m.get("keyword_recovery", {}).items():
            print(f"| {name} | {modality} | {g['top']:.3f} | {g['top_chance']:.3f} | {g['above_median']:.3f} | "
                  f"{g['above_median_chance']:.3f} |")  # fmt: skip


def pipeline_part(overrides: list[str]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-movielens-"))
    common = [
        str(CONFIG),
        f"runs_dir={tmp / 'runs'}",
        f"features.cache_dir={tmp / 'cache'}",
        "-q",
        *overrides,
    ]
    # The dequantized SmolLM2 is shared with `make models` (the cache above starts empty otherwise).
    models = REPO / "data" / "cache" / "models"
    if models.is_dir():
        (tmp / "cache").mkdir(parents=True)
        (tmp / "cache" / "models").symlink_to(models)
    print(f"outputs in {tmp}", flush=True)
    times = {}
    for stage in ("stage1", "stage2"):
        times[stage] = run([*DPPMG, stage, *common])
        print(f"{stage}: {times[stage][0]:.0f} s, peak {times[stage][1]:.2f} GB", flush=True)
    total = sum(t for t, _ in times.values())
    peak = max(gb for _, gb in times.values())
    print(f"\nmake stage1 && make stage2: {total:.0f} s of {BUDGET_SECONDS} ({total / BUDGET_SECONDS:.2f}), "
          f"peak {peak:.2f} GB of {BUDGET_GB} ({'met' if total <= BUDGET_SECONDS and peak <= BUDGET_GB else 'not met'})")  # fmt: skip
    m = json.loads((tmp / "runs" / "movielens-posters" / "stage2" / "metrics.json").read_text())
    t = m["timing"]
    print(f"warm-start {t['warmstart_seconds']:.0f} s, grounding {t['grounding_seconds']:.0f} s, RL iteration "
          f"{t['rl_iteration_seconds']:.1f} s; generation {t['images_per_second']:.2f} images/s and "
          f"{t['tokens_per_second']:.1f} LLM tokens/s")  # fmt: skip
    metrics = list(m["heldout_ci"]["none"])
    print(f"\nheld-out, {m['heldout_pairs']} pairs: mean [95 % interval]")
    print("| metric | " + " | ".join(m["heldout_ci"]) + " | rl − none | grounded − none | rl − grounded |")
    print("| --- " * (len(m["heldout_ci"]) + 4) + "|")
    for metric in metrics:
        cells = [_cell(m["heldout_ci"][c][metric]) for c in m["heldout_ci"]]
        diffs = [
            _cell(m["heldout_differences"][k][metric], sign=True)
            for k in ("rl_minus_none", "grounded_minus_none", "rl_minus_grounded")
        ]
        print(f"| {metric} | " + " | ".join(cells + diffs) + " |")
    print("\ntargets:")
    for key, g in m["gains"].items():
        ci = f" [{g['ci'][0]:+.4f}, {g['ci'][1]:+.4f}]" if "ci" in g else ""
        print(f"  {key}: {g['value']:+.4f}{ci} (target {g['target']}): {'met' if g['met'] else 'not met'}")


def _cell(i: dict, sign: bool = False) -> str:
    fmt = "{:+.4f}" if sign else "{:.4f}"
    star = "" if not sign or i["significant"] else " (n.s.)"
    return f"{fmt.format(i['mean'])} [{fmt.format(i['low'])}, {fmt.format(i['high'])}]{star}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("stage1", "pipeline", "all"), default="all")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    ns = ap.parse_args()
    if not ML_SMALL.is_dir() or not (ML_SMALL / "posters").is_dir():
        raise SystemExit(f"needs {ML_SMALL} with its posters/ folder (../shared/data beside the repo)")
    if ns.part in ("stage1", "all"):
        stage1_part(ns.overrides)
    if ns.part in ("pipeline", "all"):
        pipeline_part(ns.overrides)


if __name__ == "__main__":
    main()
