"""A sequential reference for stage 1 on leave-last-out data: item-kNN over each user's most recent items.

    .venv/bin/python benchmarks/recent_item_knn.py [--config configs/movielens-posters.yaml] [key=value ...]

Leave-last-out tests the next item a user watched, so recency carries signal that LightGCN (and stage 1 with
binary edges) cannot see. This script measures how much, with no training: an item's score for a user is

    Σ_r 2^(-r / h) · cos(item, i_r)

over the user's train items i_r, r steps from the end of the history (r = 0 the most recent), with the cosine
of the two items' train interaction columns (classic item-based CF, Sarwar et al., WWW 2001). It scans the
half-life h (and "all", h = ∞, the order-free item-kNN), picks h by validation Recall@20, and reports test
Recall@20 through the same metric code as stage 1 (`full_ranking_metrics`: train items masked, and valid items
for test). Stage 1's `stage1.recency_halflife=3` in BENCHMARKS.md came from a first draft of this scan (half-lives
3, 10, 30 only, 3 best on validation); the full scan picks 2. The configs leave the option off.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
HALFLIVES = (1.0, 2.0, 3.0, 5.0, 10.0, 30.0, math.inf)


def main() -> None:
    from dppmg.config import load_config
    from dppmg.data.format import load_dataset
    from dppmg.data.prepare import prepare
    from stage1_preference.evaluate import full_ranking_metrics
    from stage1_preference.graph import recency_weights

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "movielens-posters.yaml"))
    ap.add_argument("overrides", nargs="*")
    ns = ap.parse_args()
    ds = load_dataset(prepare(load_config(ns.config, ns.overrides), progress=False))
    train = ds.split("train")
    users, items = (
        train["user_idx"].to_numpy(np.int64, copy=True),
        train["item_idx"].to_numpy(np.int64, copy=True),
    )
    binary = torch.zeros(ds.num_users, ds.num_items)
    binary[users, items] = 1.0
    norm = binary.sum(0).sqrt().clamp_min(1e-12)
    sim = (binary.T @ binary) / norm[:, None] / norm[None, :]
    sim.fill_diagonal_(0.0)
    print(
        f"== {ds.root}: {ds.num_users:,} users, {ds.num_items:,} items, {len(train):,} train interactions\n"
    )
    print("| half-life | valid recall@20 | test recall@20 |")
    print("| --- | --- | --- |")
    results = {}
    for h in HALFLIVES:
        w = np.ones(len(users)) if math.isinf(h) else recency_weights(users, train["timestamp"].to_numpy(), h)
        weighted = torch.zeros(ds.num_users, ds.num_items)
        weighted.index_put_(
            (torch.from_numpy(users), torch.from_numpy(items)), torch.from_numpy(w).float(), accumulate=True
        )
        scores = weighted @ sim  # [U, I]

        def score_fn(batch: torch.Tensor, scores: torch.Tensor = scores) -> torch.Tensor:
            return scores[batch].clone()

        results[h] = {
            split: full_ranking_metrics({}, {}, ds.interactions, split, [20], score_fn=score_fn)["recall@20"]
            for split in ("valid", "test")
        }
        print(
            f"| {'all (no recency)' if math.isinf(h) else f'{h:g}'} | {results[h]['valid']:.4f} | {results[h]['test']:.4f} |"
        )
    best = max(results, key=lambda h: results[h]["valid"])
    print(f"\nchosen by validation: half-life {best:g}, test recall@20 {results[best]['test']:.4f}")


if __name__ == "__main__":
    main()
