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

`--ranks 32,64,128` also scores with the chosen half-life through the best rank-k approximations of the item–item
cosine matrix (its k eigenvectors of largest |eigenvalue|): how much of the kNN's ranking a model whose scores are
dot products of k-dimensional vectors could keep.
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
    ap.add_argument("--ranks", default="", help="comma-separated ranks k of the similarity to score with too")
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
    results, histories = {}, {}

    def recall(scores: torch.Tensor) -> dict[str, float]:
        """Validation and test Recall@20 of fixed scores [U, I]."""
        return {
            split: full_ranking_metrics(
                {}, {}, ds.interactions, split, [20], score_fn=lambda batch: scores[batch].clone()
            )["recall@20"]
            for split in ("valid", "test")
        }

    for h in HALFLIVES:
        w = np.ones(len(users)) if math.isinf(h) else recency_weights(users, train["timestamp"].to_numpy(), h)
        weighted = torch.zeros(ds.num_users, ds.num_items)
        weighted.index_put_(
            (torch.from_numpy(users), torch.from_numpy(items)), torch.from_numpy(w).float(), accumulate=True
        )
        histories[h] = weighted
        results[h] = recall(weighted @ sim)  # [U, I]
        print(
            f"| {'all (no recency)' if math.isinf(h) else f'{h:g}'} | {results[h]['valid']:.4f} | {results[h]['test']:.4f} |"
        )
    best = max(results, key=lambda h: results[h]["valid"])
    print(f"\nchosen by validation: half-life {best:g}, test recall@20 {results[best]['test']:.4f}")
    if ns.ranks:
        values, vectors = torch.linalg.eigh(sim)
        print(
            f"\n| rank of the similarity (half-life {best:g}) | valid recall@20 | test recall@20 |\n| --- | --- | --- |"
        )
        for k in (int(x) for x in ns.ranks.split(",")):
            top = values.abs().argsort(descending=True)[:k]
            r = recall(histories[best] @ (vectors[:, top] * values[top]) @ vectors[:, top].T)
            print(f"| {k} | {r['valid']:.4f} | {r['test']:.4f} |")
        print(f"| all {ds.num_items} | {results[best]['valid']:.4f} | {results[best]['test']:.4f} |")


if __name__ == "__main__":
    main()
