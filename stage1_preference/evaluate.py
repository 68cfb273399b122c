"""Stage-1 evaluation: full-ranking Recall@K / NDCG@K, and preference recovery from the tokens.

Full ranking scores every item for every evaluated user (no sampled negatives), masks the items the user
already interacted with in the splits before the target one, and counts hits in the top K. The masking and
the metric definitions are the LightGCN / MMRec ones, so numbers compare with their published tables:

    recall@K = |top-K ∩ T| / |T|
    ndcg@K   = Σ_{r<K} [item at rank r ∈ T] / log2(r + 2)  /  Σ_{r<min(|T|, K)} 1 / log2(r + 2)

where T is the user's set of target items. Users with no target item are skipped.

torch_geometric.metrics has LinkPredRecall / LinkPredNDCG, but they take already-masked top-k lists and
leave the masking to the caller; the masking rule is the part that must be identical for our model and the
baselines, so it lives here, with the ranking, in one function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dppmg.data.format import SPLITS
from dppmg.errors import DppmgError
from stage1_preference.model import score_all

DEFAULT_KS = (10, 20, 50)
PREFERENCE_PREFIX = "pref_"
# The probe: a multinomial logistic regression, fitted to convergence with L-BFGS on standardised inputs.
PROBE_L2 = 1e-3  # on the mean cross-entropy scale: just enough to keep separable classes finite
PROBE_MAX_ITER = 200
STD_FLOOR = 1e-6  # a constant input dimension is left at zero instead of divided by zero

ScoreFn = Callable[[torch.Tensor], torch.Tensor]  # user indices [B] -> scores [B, I]


# ---------------------------------------------------------------------------------------------------------
# Full ranking


def masked_splits(target_split: str) -> tuple[str, ...]:
    """The splits whose items are removed from the ranking: those before `target_split` (valid: train)."""
    if target_split not in SPLITS:
        raise DppmgError(f"target_split must be one of {SPLITS}, got {target_split!r}")
    return SPLITS[: SPLITS.index(target_split)]


class _UserItems:
    """Each user's items as CSR over user ids (indptr [U+1], items [E]), for gathering a batch of rows."""

    def __init__(self, user_idx: np.ndarray, item_idx: np.ndarray, num_users: int):
        order = np.argsort(user_idx, kind="stable")
        self.items = torch.as_tensor(item_idx[order], dtype=torch.long)
        counts = np.bincount(user_idx, minlength=num_users)
        self.indptr = torch.as_tensor(np.concatenate([[0], np.cumsum(counts)]), dtype=torch.long)

    def rows(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row in the batch, item) pairs for every item of every user in `users` [B]."""
        start, stop = self.indptr[users], self.indptr[users + 1]
        counts = stop - start
        row = torch.repeat_interleave(torch.arange(len(users)), counts)
        # Position of each pair inside its user's slice: a global arange minus the slice's offset in it.
        offsets = torch.cumsum(counts, 0) - counts
        within = torch.arange(int(counts.sum())) - torch.repeat_interleave(offsets, counts)
        return row, self.items[torch.repeat_interleave(start, counts) + within]


def full_ranking_metrics(
    user_vecs: dict[str, torch.Tensor],
    item_vecs: dict[str, torch.Tensor],
    interactions: pd.DataFrame,
    target_split: str,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 1024,
    score_fn: ScoreFn | None = None,
    progress: bool = False,
    per_user: bool = False,
) -> dict[str, Any]:
    """Recall@K and NDCG@K over all items for the users that have items in `target_split`.

    Args:
        user_vecs / item_vecs: branch -> [U, d] / [I, d]; scored with `score_all` (sum over branches of
            u @ i.T). Ignored when `score_fn` is given.
        interactions: user_idx, item_idx, split (the processed format).
        target_split: "valid" masks the train items, "test" masks train and valid items.
        score_fn: user indices LongTensor [B] -> scores [B, I], for models that are not dot products. It
            must return a new tensor (e.g. `users_emb[b] @ items_emb.T`, not a view of stored scores):
            the masking writes -inf into it, which saves copying [B, I] floats per batch.
        per_user: also return "users" (the evaluated user ids, ascending) and "per_user" (metric -> [users]
            array of each user's value), for intervals and paired differences over users.
    Returns:
        {"recall@K": mean, "ndcg@K": mean for each K, "users_evaluated": number of users with targets}.
    """
    masked = masked_splits(target_split)
    if score_fn is None:

        def score_fn(users: torch.Tensor) -> torch.Tensor:
            return score_all({b: v[users.to(v.device)] for b, v in user_vecs.items()}, item_vecs)

    split = interactions["split"].to_numpy()
    user_idx = interactions["user_idx"].to_numpy()
    item_idx = interactions["item_idx"].to_numpy()
    num_users = int(user_idx.max()) + 1 if len(user_idx) else 0
    # A repeated (user, item) target counts once: the metrics are over sets of items.
    target_pairs = np.unique(np.stack([user_idx, item_idx], 1)[split == target_split], axis=0)
    if len(target_pairs) == 0:
        raise DppmgError(f"no interactions in split {target_split!r} to evaluate on")
    targets = _UserItems(target_pairs[:, 0], target_pairs[:, 1], num_users)
    is_masked = np.isin(split, masked)
    seen = _UserItems(user_idx[is_masked], item_idx[is_masked], num_users)
    eval_users = torch.as_tensor(np.unique(target_pairs[:, 0]), dtype=torch.long)

    ks = sorted(set(int(k) for k in ks))
    rows: dict[str, list[torch.Tensor]] = {f"{name}@{k}": [] for k in ks for name in ("recall", "ndcg")}
    batches = torch.split(eval_users, batch_size)
    for users in tqdm(batches, desc=f"ranking ({target_split})", disable=not progress, leave=False):
        scores = score_fn(users).detach().float().cpu()  # [B, I]; a fresh tensor, masked in place
        if torch.isnan(scores).any():  # topk ranks NaN first: the metrics would be silently wrong
            raise DppmgError("the model's scores contain NaN (training diverged? try a lower learning rate)")
        for key, value in _batch_metrics(scores, users, targets, seen, ks).items():
            rows[key].append(value)
    values = {key: torch.cat(v).numpy() for key, v in rows.items()}
    n = len(eval_users)
    out: dict[str, Any] = {**{key: float(v.sum()) / n for key, v in values.items()}, "users_evaluated": n}
    if per_user:
        out.update(users=eval_users.numpy(), per_user=values)
    return out


def _batch_metrics(
    scores: torch.Tensor, users: torch.Tensor, targets: _UserItems, seen: _UserItems, ks: list[int]
) -> dict[str, torch.Tensor]:
    """Each row's recall@K and ndcg@K, [B] float64; `scores` [B, I] is overwritten by the mask."""
    batch, num_items = scores.shape
    row, item = seen.rows(users)
    scores[row, item] = -torch.inf
    top_scores, top_items = scores.topk(min(max(ks), num_items), dim=1)  # [B, Kmax]

    # Hits from the target pairs directly (T pairs × Kmax comparisons), not from a dense [B, I] target mask.
    row, item = targets.rows(users)
    n_target = torch.bincount(row, minlength=batch)  # [B], >= 1 for every evaluated user
    found = (top_items[row] == item[:, None]).int()  # [T, Kmax]; targets are unique per user
    hits = torch.zeros_like(top_items, dtype=torch.int).index_add_(0, row, found).bool()
    # When fewer than K items are left unmasked, topk returns masked ones too: those can never be hits.
    hits &= torch.isfinite(top_scores)
    discount = 1.0 / torch.log2(torch.arange(hits.shape[1], dtype=torch.float64) + 2)  # [Kmax]
    ideal_cum = torch.cumsum(discount, 0)  # ideal DCG with r relevant items = ideal_cum[r - 1]
    out = {}
    for k in ks:
        hits_k = hits[:, :k].double()
        out[f"recall@{k}"] = hits_k.sum(1) / n_target
        dcg = (hits_k * discount[: hits_k.shape[1]]).sum(1)
        ideal = ideal_cum[(n_target.clamp(max=hits_k.shape[1]) - 1)]
        out[f"ndcg@{k}"] = dcg / ideal
    return out


# ---------------------------------------------------------------------------------------------------------
# Preference recovery


def preference_columns(users: pd.DataFrame) -> dict[str, list[str]]:
    """Ground-truth preference columns by modality: {"image": ["pref_image_colour", ...], "text": [...]}."""
    out: dict[str, list[str]] = {}
    for col in users.columns:
        parts = col.split("_", 2)
        if col.startswith(PREFERENCE_PREFIX) and len(parts) == 3:
            out.setdefault(parts[1], []).append(col)
    return out


def preference_recovery(
    token_vecs: dict[str, torch.Tensor],
    users: pd.DataFrame,
    heldout_fraction: float = 0.2,
    seed: int = 0,
) -> dict:
    """How well each modality's tokens identify each true preference, on held-out users.

    For every token modality m (token_vecs[m]: [U, d], the users' vectors decoded from their tokens) and
    every ground-truth column pref_<p>_<attr>, a multinomial logistic regression is fitted on the training
    users and scored on the held-out ones.

    Returns per modality m: "own" (mean accuracy over pref_<m>_*), "cross" (mean over the other modality's
    columns; None when there are none), "per_attribute" {column: accuracy}, "chance" {column: majority-class
    rate on the held-out users}, and "chance_own" / "chance_cross" (their means). {} without pref_ columns.
    """
    columns = preference_columns(users)
    if not columns:
        return {}
    if not 0 < heldout_fraction < 1:
        raise DppmgError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    users = users.sort_values("user_idx")
    n = len(users)
    for m, vecs in token_vecs.items():
        if vecs.shape[0] != n:
            raise DppmgError(f"token_vecs[{m!r}] has {vecs.shape[0]} rows, but the users table has {n} users")
    order = np.random.default_rng(seed).permutation(n)
    n_held = max(1, round(heldout_fraction * n))
    held, train = torch.as_tensor(order[:n_held]), torch.as_tensor(order[n_held:])
    if len(train) == 0:
        raise DppmgError(f"preference recovery needs at least 2 users, got {n}")

    labels = {col: _encode(users[col]) for cols in columns.values() for col in cols}
    result = {}
    for m, vecs in token_vecs.items():
        x = vecs.detach().float().cpu()
        per_attribute, chance = {}, {}
        for col, y in labels.items():
            per_attribute[col] = _probe_accuracy(x[train], y[train], x[held], y[held])
            chance[col] = float(torch.bincount(y[held]).max()) / len(held)
        own = columns.get(m, [])
        cross = [col for p, cols in columns.items() if p != m for col in cols]
        result[m] = {
            "own": _mean([per_attribute[c] for c in own]),
            "cross": _mean([per_attribute[c] for c in cross]),
            "per_attribute": per_attribute,
            "chance": chance,
            "chance_own": _mean([chance[c] for c in own]),
            "chance_cross": _mean([chance[c] for c in cross]),
        }
    return result


KEYWORD_SEPARATOR = ", "  # items.keywords joins several keywords (MovieLens: the genres) with it
MIN_KEYWORD_SHARE = 0.05  # keywords on fewer of the catalogue's interactions get no per-keyword probe


def user_keyword_shares(items: pd.DataFrame, train: pd.DataFrame, num_users: int) -> pd.DataFrame:
    """[U, K] share of each keyword among each user's training items (a movie with two genres counts for both).

    Users without a training item have a row of zeros.
    """
    keywords = items["keywords"].fillna("").astype(str).str.split(KEYWORD_SEPARATOR)
    pairs = pd.DataFrame({"item_idx": np.arange(len(items)), "keyword": keywords}).explode("keyword")
    pairs = pairs[pairs["keyword"].str.strip() != ""]
    joined = train[["user_idx", "item_idx"]].merge(pairs, on="item_idx")
    counts = joined.groupby(["user_idx", "keyword"]).size().unstack(fill_value=0)
    counts = counts.reindex(index=range(num_users), fill_value=0).sort_index(axis=1)
    return counts.div(counts.sum(1).replace(0, 1), axis=0)


def keyword_recovery(
    token_vecs: dict[str, torch.Tensor],
    items: pd.DataFrame,
    train: pd.DataFrame,
    num_users: int,
    heldout_fraction: float = 0.2,
    seed: int = 0,
) -> dict:
    """How well each modality's tokens identify what a user watches, on held-out users: the real-data check.

    Real data has no ground-truth tastes, but its items have keywords (MovieLens: the genres), and a user's
    training history says which the user watches most. Two probes per modality, fitted on the training users'
    vectors (token_vecs[m]: [U, d], decoded from the tokens) and scored on held-out users:

    - "top": the user's most frequent keyword (ties alphabetical), a multinomial logistic regression, against
      "top_chance", the majority class among the held-out users;
    - "above_median": per keyword with at least MIN_KEYWORD_SHARE of the interactions, whether the user's share
      of it is above the median user's; the mean accuracy over those keywords ("per_keyword") against the
      mean majority rate ("above_median_chance", about 0.5).
    {} when the items have no keywords.
    """
    if "keywords" not in items.columns or not items["keywords"].notna().any():
        return {}
    shares = user_keyword_shares(items, train, num_users)
    active = np.flatnonzero(shares.sum(1).to_numpy() > 0)
    if len(active) < 2 or shares.shape[1] < 2:
        return {}
    shares = shares.iloc[active]
    order = np.random.default_rng([seed, 3]).permutation(len(active))
    n_held = max(1, round(heldout_fraction * len(active)))
    held, fit = torch.as_tensor(order[:n_held]), torch.as_tensor(order[n_held:])
    top = _encode(shares.idxmax(axis=1))  # idxmax takes the first column of a tie; columns are sorted
    overall = shares.mean(0)
    common = [k for k in shares.columns if overall[k] >= MIN_KEYWORD_SHARE]
    above = {k: torch.tensor((shares[k] > shares[k].median()).to_numpy(), dtype=torch.long) for k in common}
    result = {}
    for m, vecs in token_vecs.items():
        x = vecs.detach().float().cpu()[torch.as_tensor(active)]
        per_keyword = {
            k: _probe_accuracy(x[fit], y[fit], x[held], y[held])
            for k, y in above.items()
            if y[fit].unique().numel() > 1
        }
        result[m] = {
            "top": _probe_accuracy(x[fit], top[fit], x[held], top[held]),
            "top_chance": float(torch.bincount(top[held]).max()) / len(held),
            "above_median": _mean(list(per_keyword.values())),
            "above_median_chance": _mean(
                [float(torch.bincount(above[k][held]).max()) / len(held) for k in per_keyword]
            ),
            "per_keyword": per_keyword,
            "users_heldout": len(held),
        }
    return result


def _encode(values: pd.Series) -> torch.Tensor:
    codes, _ = pd.factorize(values.astype("string").fillna("<missing>"), sort=True)
    return torch.as_tensor(codes, dtype=torch.long)


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _probe_accuracy(
    x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor
) -> float:
    """Held-out accuracy of a multinomial logistic regression (standardised inputs, small L2, L-BFGS)."""
    mean, std = x_train.mean(0), x_train.std(0, unbiased=False).clamp(min=STD_FLOOR)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    weight = torch.zeros(x_train.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=PROBE_MAX_ITER, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x_train @ weight + bias, y_train) + PROBE_L2 * weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (x_test @ weight + bias).argmax(1)
    return float((pred == y_test).float().mean())
