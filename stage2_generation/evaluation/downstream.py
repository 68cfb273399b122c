"""PMG's downstream use: generated content as auxiliary features for recommendation.

PMG (Shen et al., WWW 2024) reports that the images it generates for a user help a recommender when they are
added as features. Here each method generates once for every held-out user *from the user alone* (an empty
target, so no pair's target item can leak into the ranking), and the stage-1 model's full ranking is re-scored:

    s(u, i) = z_u(stage1(u, i)) + w · z_u(cos(generated image_u, image_i))            features "image"
    s(u, i) = z_u(stage1(u, i)) + w · (z_u(cos(image_u, image_i)) + z_u(cos(text_u, text_i))) / 2   "text+image"

z_u standardizes over the user's items; the image cosine is in the scorer's space, the text one in the item text
encoder's (MiniLM). w is chosen among `eval.downstream_weights` by Recall@20 on the validation items, then
Recall@20 on the test items is reported with w and with w = 0 (stage 1 alone) for the same users, with a
bootstrap interval of the per-user difference. Masking is stage 1's (train and valid items are not ranked).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dppmg.bootstrap import bootstrap_mean, paired_difference
from stage1_preference.evaluate import full_ranking_metrics
from stage1_preference.model import score_all
from stage1_preference.train import load_embeddings
from stage2_generation.evaluation.methods import Generation
from stage2_generation.policy import Pair

K = 20


def downstream_pairs(pairs: Sequence[Pair]) -> list[Pair]:
    """One pair per held-out user, with no target: what a method generates from the user's preferences alone."""
    return [Pair(u, "", None) for u in sorted({p.user for p in pairs})]


def _standardize(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True).clamp_min(1e-8)


def feature_scores(rewarder: Any, generation: Generation) -> dict[str, torch.Tensor]:
    """Per feature set, [users, items] standardized similarities of each user's generation to every item."""
    if rewarder.item_image is None:  # a catalogue without images: no image feature to add
        return {}
    images = F.normalize(rewarder.scorer.encode_images(generation.images).float().cpu(), dim=-1)
    image = images @ F.normalize(rewarder.item_image.float(), dim=-1).T
    # Items without an image get the user's mean similarity: neutral after z_u.
    missing = torch.from_numpy(~rewarder.has_image)
    image[:, missing] = image[:, ~missing].mean(1, keepdim=True).expand(-1, int(missing.sum()))
    texts = torch.from_numpy(rewarder.text_encoder.encode(list(generation.texts), progress=False)).float()
    text = F.normalize(texts, dim=-1) @ F.normalize(rewarder.item_text.float(), dim=-1).T
    image = _standardize(image)
    return {"image": image, "text+image": (_standardize(text) + image) / 2}


def downstream_recall(ev: Any, generations: dict[str, Generation], progress: bool = True) -> dict[str, Any]:
    """results.json's "downstream": per method and feature set, the chosen weight, the validation curve, and
    test Recall@20 with and without the generated features, with the paired difference over users."""
    cfg, c = ev.cfg, ev.components
    users = [p.user for p in downstream_pairs(ev.pairs)]
    row_of = torch.full((c.ds.num_users,), -1, dtype=torch.long)
    row_of[users] = torch.arange(len(users))
    emb = load_embeddings(cfg, c.ds)
    base = _standardize(score_all({b: v[users] for b, v in emb.users.items()}, emb.items).float())
    inter = c.ds.interactions[c.ds.interactions["user_idx"].isin(users)]
    n_boot, seed = cfg.eval.bootstrap_samples, cfg.seed

    def recall(extra: torch.Tensor | None, weight: float, split: str) -> dict[str, Any]:
        def score_fn(batch: torch.Tensor) -> torch.Tensor:
            rows = row_of[batch]  # indexing copies: the ranking may mask the result in place
            return base[rows] + weight * extra[rows] if extra is not None and weight else base[rows]

        return full_ranking_metrics({}, {}, inter, split, [K], score_fn=score_fn, per_user=True)

    without = recall(None, 0.0, "test")
    out: dict[str, Any] = {
        "users": len(users),
        "k": K,
        "weights": list(cfg.eval.downstream_weights),
        "stage1_only": bootstrap_mean(without["per_user"][f"recall@{K}"], n_boot=n_boot, seed=seed).as_dict(),
        "methods": {},
    }
    has_valid = (inter["split"] == "valid").any()
    for name, g in generations.items():
        rows = {}
        for feature, extra in feature_scores(c.rewarder, g).items():
            curve = {
                w: recall(extra, w, "valid")[f"recall@{K}"] if has_valid else float("nan")
                for w in cfg.eval.downstream_weights
            }
            # The best validation recall; ties (and no validation items) go to the smallest weight.
            best = max(curve, key=lambda w: (np.nan_to_num(curve[w], nan=-1.0), -w))
            test = recall(extra, best, "test")
            a, b = test["per_user"][f"recall@{K}"], without["per_user"][f"recall@{K}"]
            rows[feature] = {
                "weight": best,
                "valid_curve": [{"weight": w, f"recall@{K}": v} for w, v in curve.items()],
                "with": bootstrap_mean(a, n_boot=n_boot, seed=seed).as_dict(),
                "difference": paired_difference(a, b, n_boot=n_boot, seed=seed).as_dict(),
            }
        out["methods"][name] = rows
    return out
