"""Stage-1 benchmark: our modal-specific GNN vs torch_geometric's LightGCN, side by side, then scaling.

    python benchmarks/bench_stage1.py                     # default world (+ ml-latest-small when ../shared is there)
    python benchmarks/bench_stage1.py --scaling 100000,1000000,5000000  # about 40 min; 5M: see BENCHMARKS.md

Part 1 runs, in one process and on the same split, with the same dim, layers, batch, epochs and lr:
  ours (full)    the stage-1 model as `make stage1` trains it (modal branches + residual VQ), test Recall@20
  ours (id-only) the same propagation code with one id branch and no quantizer: the like-for-like speed match
  PyG LightGCN   torch_geometric.nn.models.LightGCN with its own BPR loss
and prints epoch-time and Recall@20 ratios. Part 2 times epochs of the full model on synthetic worlds of growing
size (random item features of the real dimensions, since encoding 100k texts is not what is being measured), each
in a fresh process so that its peak memory is its own.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from dppmg.config import Config, load_config
from dppmg.data.format import ProcessedDataset, load_dataset
from dppmg.data.prepare import prepare
from dppmg.seeding import seed_everything
from stage1_preference.baselines import train_id_only_gnn, train_lightgcn
from stage1_preference.evaluate import full_ranking_metrics
from stage1_preference.train import Stage1Trainer

REPO = Path(__file__).resolve().parents[1]
ML_SMALL = REPO.parent / "shared" / "data" / "ml-latest-small"


def run_ours(ds: ProcessedDataset, cfg: Config, epochs: int) -> dict:
    """The full stage-1 model; test metrics at the epoch with the best valid Recall@20 (after VQ warm-up)."""
    seed_everything(cfg.seed)
    s1 = replace(cfg.stage1, epochs=epochs)
    tr = Stage1Trainer(ds, s1, cfg.seed)
    best, times = (-1.0, None), []
    while tr.state.epoch < epochs:
        t0 = time.perf_counter()
        tr.train_epoch(progress=False)
        times.append(time.perf_counter() - t0)
        tr.state.epoch += 1
        if tr.state.vq_initialised:
            r = tr.validate()["valid/recall@20"]
            if r > best[0]:
                emb, _, decoded = tr.embeddings()
                test = full_ranking_metrics(emb.users, emb.items, ds.interactions, "test", [20])
                test_q = full_ranking_metrics(
                    {**emb.users, **decoded}, emb.items, ds.interactions, "test", [20]
                )
                best = (r, (test["recall@20"], test_q["recall@20"]))
    return {
        "epoch_seconds": float(np.mean(times)),
        "recall@20": best[1][0],
        "recall@20_quantized": best[1][1],
    }


def compare(name: str, ds: ProcessedDataset, cfg: Config, epochs: int) -> None:
    s1 = cfg.stage1
    print(f"\n== {name}: {ds.num_users:,} users, {ds.num_items:,} items, {len(ds.split('train')):,} train interactions; "
          f"dim {s1.dim}, layers {s1.layers}, batch {s1.batch_size}, epochs {epochs}, lr {s1.lr}")  # fmt: skip
    ours = run_ours(ds, cfg, epochs)
    # Same harness (sampler, timing, early-stopping choice) for both: only the propagation code differs.
    same = dict(dim=s1.dim, layers=s1.layers, epochs=epochs, batch_size=s1.batch_size, lr=s1.lr,
                reg_weight=s1.reg_weight, seed=cfg.seed, ks=[20], patience=epochs)  # fmt: skip
    id_only = train_id_only_gnn(ds, **same)
    pyg = train_lightgcn(ds, **same)
    print(f"{'model':<26} {'epoch s':>9} {'recall@20':>10} {'vs PyG time':>12} {'vs PyG recall':>14}")
    rows = [
        ("ours (full, continuous)", ours["epoch_seconds"], ours["recall@20"]),
        ("ours (full, tokens)", ours["epoch_seconds"], ours["recall@20_quantized"]),
        ("ours (id-only)", id_only["epoch_seconds"], id_only["recall@20"]),
        ("PyG LightGCN", pyg["epoch_seconds"], pyg["recall@20"]),
    ]
    for label, sec, rec in rows:
        speed = pyg["epoch_seconds"] / sec  # >1: ours is faster
        print(
            f"{label:<26} {sec:>9.3f} {rec:>10.4f} {speed:>11.2f}x {rec / max(pyg['recall@20'], 1e-12):>13.2f}x"
        )


def _scaling_one(interactions: int, epochs: int, seed: int) -> dict:
    """One size in this (fresh) process: each phase timed on its own, and the process's peak memory."""
    from dppmg.data.processing import process
    from dppmg.data.synthetic import generate_world

    cfg = load_config(REPO / "configs" / "default.yaml")
    per_user = 20.0
    # 8-pixel images: stage 1 reads random features here, so rendering 100k full-size images would only time the
    # renderer (which is what kept the 5M world from finishing within 30 minutes once).
    syn = replace(cfg.data.synthetic, n_users=round(interactions / per_user), n_items=max(600, interactions // 50),
                  interactions_per_user=per_user, image_size=8)  # fmt: skip
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    t = process(generate_world(syn, seed), cfg.data, seed, progress=False)
    seconds["world"] = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    feats = {"text": rng.standard_normal((len(t.items), 384)).astype(np.float32),
             "image": rng.standard_normal((len(t.items), 64)).astype(np.float32)}  # fmt: skip
    meta = {"modalities": ["text", "image"], "content_hash": "bench", "name": "bench"}
    ds = ProcessedDataset(Path("."), t.items, t.interactions, t.users, meta, feats)
    t0 = time.perf_counter()
    tr = Stage1Trainer(ds, replace(cfg.stage1, vq_warmup_epochs=0), seed)  # graphs, model, quantizer
    seconds["build"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tr._init_quantizer()  # the k-means the first epoch would start with, timed apart from the epochs
    seconds["kmeans"] = time.perf_counter() - t0
    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        tr.train_epoch(progress=False)
        times.append(time.perf_counter() - t0)
        tr.state.epoch += 1
    t0 = time.perf_counter()
    tr.validate()
    seconds["eval"] = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"interactions": len(t.interactions), "users": len(t.users), "items": len(t.items), "batch": tr.batch_size,
            "epoch_seconds": float(np.min(times)), "seconds": seconds, "peak_mb": peak}  # fmt: skip


def growth_exponent(n0: float, t0: float, n1: float, t1: float) -> float:
    """b in t ∝ n^b between two sizes: 1 is linear."""
    return float(np.log(t1 / t0) / np.log(n1 / n0))


def scaling(sizes: list[int], epochs: int, seed: int, limit: float | None = None) -> list[dict]:
    """Each size in a fresh process (its peak memory is its own); `limit` seconds per size, then it is reported as
    not finished. Epoch: the fastest of `epochs` (the others see the same work, so the fastest is the least
    disturbed by the rest of the machine)."""
    print(
        f"\n== scaling: full model (text+image branches, VQ on), best of {epochs} epoch(s), fresh process per size"
    )
    print(f"{'interactions':>12} {'users':>8} {'items':>7} {'batch':>7} {'world s':>8} {'build s':>8} {'kmeans s':>9} "
          f"{'epoch s':>8} {'s per 1M':>9} {'eval s':>8} {'peak RSS MB':>12}")  # fmt: skip
    ctx = multiprocessing.get_context("spawn")
    done = []
    for n in sizes:
        pool = ProcessPoolExecutor(max_workers=1, mp_context=ctx)
        try:
            r = pool.submit(_scaling_one, n, epochs, seed).result(timeout=limit)
        except TimeoutError:
            print(f"{n:>12,} not finished within {limit:.0f} s")
            for proc in list(pool._processes.values()):
                proc.kill()
            pool.shutdown(wait=False, cancel_futures=True)
            break
        except Exception as e:  # e.g. killed for memory: say so and go on
            print(f"{n:>12,} failed: {type(e).__name__}: {e}")
            pool.shutdown()
            continue
        pool.shutdown()
        s = r["seconds"]
        per_m = r["epoch_seconds"] / (r["interactions"] / 1e6)
        print(f"{r['interactions']:>12,} {r['users']:>8,} {r['items']:>7,} {r['batch']:>7,} {s['world']:>8.1f} "
              f"{s['build']:>8.1f} {s['kmeans']:>9.1f} {r['epoch_seconds']:>8.2f} {per_m:>9.2f} {s['eval']:>8.1f} "
              f"{r['peak_mb']:>12.0f}", flush=True)  # fmt: skip
        done.append(r)
    for a, b in zip(done, done[1:]):
        e = growth_exponent(a["interactions"], a["epoch_seconds"], b["interactions"], b["epoch_seconds"])
        m = growth_exponent(a["interactions"], a["peak_mb"], b["interactions"], b["peak_mb"])
        print(
            f"{a['interactions']:,} -> {b['interactions']:,}: epoch-time exponent {e:.3f} (target <= 1.05: "
            f"{'met' if e <= 1.05 else 'missed'}), peak-memory exponent {m:.3f}"
        )
    return done


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--scaling", default="100000,1000000", help="interaction counts; empty to skip")
    ap.add_argument("--scaling-epochs", type=int, default=2)
    ap.add_argument("--scaling-limit", type=float, default=3600, help="seconds per size")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    cfg = load_config(REPO / "configs" / "default.yaml")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    compare("default synthetic world", load_dataset(prepare(cfg, progress=False)), cfg, args.epochs)
    if ML_SMALL.is_dir():
        ml = load_config(
            REPO / "configs" / "movielens.yaml",
            [f"data.raw_dir={ML_SMALL}", "data.name=bench-movielens", "data.overwrite=true"],
        )
        compare("MovieLens ml-latest-small", load_dataset(prepare(ml, progress=False)), ml, args.epochs)
    else:
        print(f"\n(skipping MovieLens: {ML_SMALL} is absent)")
    sizes = [int(s) for s in args.scaling.split(",") if s.strip()]
    if sizes:
        scaling(sizes, args.scaling_epochs, args.seed, args.scaling_limit)


if __name__ == "__main__":
    main()
