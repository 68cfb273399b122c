"""Stage-1 evaluation: full-ranking metrics by hand, the masking rule, preference recovery, the baselines."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dppmg.data.format import ProcessedDataset
from dppmg.errors import DppmgError
from stage1_preference import baselines
from stage1_preference.baselines import PygLightGCN, train_popularity
from stage1_preference.evaluate import (
    full_ranking_metrics,
    keyword_recovery,
    masked_splits,
    preference_recovery,
    user_keyword_shares,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: a second intra-op thread only adds waits, which on a busy 2-core machine
    made PyG's scatter 100x slower (each parallel region waits for a descheduled thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------
# Full ranking on a 3-user × 6-item world with fixed scores, worked out by hand.
#   user 0: train {0}, valid {2}, test {1, 4}
#   user 1: train {5}, valid {3}            (no test item: skipped when the target is test)
#   user 2: train {1},            test {0}   (no valid item: skipped when the target is valid)
SCORES = torch.tensor(
    [
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
        [0.1, 0.9, 0.2, 0.3, 0.4, 0.5],
    ]
)
ROWS = [(0, 0, "train"), (0, 2, "valid"), (0, 1, "test"), (0, 4, "test"), (1, 5, "train"), (1, 3, "valid")]
ROWS += [(2, 1, "train"), (2, 0, "test")]


def _interactions(rows: list[tuple[int, int, str]]) -> pd.DataFrame:
    u, i, s = zip(*rows)
    return pd.DataFrame({"user_idx": u, "item_idx": i, "timestamp": np.arange(len(rows)), "split": s})


def _fixed_scores(scores: torch.Tensor):
    return lambda users: scores[users]


def _dcg(ranks: list[int]) -> float:
    return sum(1 / math.log2(r + 2) for r in ranks)


def test_test_split_masks_train_and_valid_by_hand():
    m = full_ranking_metrics(
        {}, {}, _interactions(ROWS), "test", ks=[1, 3, 5], score_fn=_fixed_scores(SCORES)
    )
    # user 0 ranks 1, 3, 4, 5 once 0 (train) and 2 (valid) are masked: hits at ranks 0 and 2 of 2 targets.
    # user 2 ranks 5, 4, 3, 2, 0 once 1 (train) is masked: its one target at rank 4.
    assert m["users_evaluated"] == 2
    assert m["recall@1"] == pytest.approx((1 / 2 + 0) / 2)
    assert m["ndcg@1"] == pytest.approx((1 + 0) / 2)
    assert m["recall@3"] == pytest.approx((1 + 0) / 2)
    assert m["ndcg@3"] == pytest.approx(_dcg([0, 2]) / _dcg([0, 1]) / 2)
    assert m["recall@5"] == pytest.approx((1 + 1) / 2)
    assert m["ndcg@5"] == pytest.approx((_dcg([0, 2]) / _dcg([0, 1]) + _dcg([4]) / _dcg([0])) / 2)


def test_per_user_values_are_each_users_own():
    m = full_ranking_metrics(
        {}, {}, _interactions(ROWS), "test", ks=[1, 5], score_fn=_fixed_scores(SCORES), per_user=True
    )
    # the same two users as above, in ascending id order: user 0 half its targets at rank 1, user 2 none
    assert m["users"].tolist() == [0, 2]
    assert m["per_user"]["recall@1"].tolist() == [0.5, 0.0]
    assert m["per_user"]["recall@5"].tolist() == [1.0, 1.0]
    for key, values in m["per_user"].items():
        assert m[key] == pytest.approx(values.mean())


def test_valid_split_masks_train_only():
    m = full_ranking_metrics({}, {}, _interactions(ROWS), "valid", ks=[1, 3], score_fn=_fixed_scores(SCORES))
    # user 0: train item 0 masked, test item 1 is NOT masked and ranks first, the target 2 second.
    # user 1: train item 5 masked; ranking 4, 3, ...: the target 3 second.
    assert m["users_evaluated"] == 2
    assert m["recall@1"] == 0.0
    assert m["recall@3"] == pytest.approx(1.0)
    assert m["ndcg@3"] == pytest.approx(1 / math.log2(3))


def test_masking_rule():
    assert masked_splits("valid") == ("train",)
    assert masked_splits("test") == ("train", "valid")
    with pytest.raises(DppmgError, match="target_split"):
        masked_splits("holdout")


def test_masked_item_is_never_a_hit_even_when_too_few_items_remain():
    # Item 0 is both a train and a test item of the user; with 2 items top-5 must include it, but masked.
    rows = [(0, 0, "train"), (0, 0, "test")]
    m = full_ranking_metrics(
        {}, {}, _interactions(rows), "test", ks=[5], score_fn=_fixed_scores(torch.ones(1, 2))
    )
    assert m["recall@5"] == 0.0 and m["ndcg@5"] == 0.0


def test_no_target_interactions_is_an_error():
    rows = [(0, 0, "train"), (0, 1, "valid")]
    with pytest.raises(DppmgError, match="'test'"):
        full_ranking_metrics({}, {}, _interactions(rows), "test", score_fn=_fixed_scores(torch.ones(1, 3)))


def test_nan_scores_are_an_error():
    scores = torch.tensor([[0.1, float("nan"), 0.3]])
    with pytest.raises(DppmgError, match="NaN"):
        full_ranking_metrics({}, {}, _interactions([(0, 0, "test")]), "test", score_fn=_fixed_scores(scores))


def _reference_metrics(scores: np.ndarray, inter: pd.DataFrame, target: str, k: int) -> tuple[float, float]:
    """A plain per-user loop, the definition written out."""
    recalls, ndcgs = [], []
    for u, group in inter.groupby("user_idx"):
        targets = set(group.loc[group["split"] == target, "item_idx"])
        if not targets:
            continue
        seen = set(group.loc[group["split"].isin(masked_splits(target)), "item_idx"])
        ranking = [i for i in np.argsort(-scores[u], kind="stable") if i not in seen][:k]
        hits = [r for r, i in enumerate(ranking) if i in targets]
        recalls.append(len(hits) / len(targets))
        ndcgs.append(_dcg(hits) / _dcg(list(range(min(len(targets), k)))))
    return float(np.mean(recalls)), float(np.mean(ndcgs))


def test_batched_metrics_match_a_per_user_loop():
    rng = np.random.default_rng(0)
    n_users, n_items = 23, 40
    pairs = {(int(u), int(i)) for u, i in zip(rng.integers(0, n_users, 300), rng.integers(0, n_items, 300))}
    rows = [(u, i, str(rng.choice(["train", "train", "valid", "test"]))) for u, i in sorted(pairs)]
    inter = _interactions(rows)
    scores = torch.randn(n_users, n_items)  # continuous: no ties, so the ranking is unique
    for target in ("valid", "test"):
        m = full_ranking_metrics(
            {}, {}, inter, target, ks=[5, 10], batch_size=4, score_fn=_fixed_scores(scores)
        )
        for k in (5, 10):
            recall, ndcg = _reference_metrics(scores.numpy(), inter, target, k)
            assert m[f"recall@{k}"] == pytest.approx(recall)
            assert m[f"ndcg@{k}"] == pytest.approx(ndcg)


def test_default_scoring_sums_branches():
    users = {"text": torch.tensor([[1.0, 0.0]]), "image": torch.tensor([[0.0, 1.0]])}
    # text alone prefers item 0, image alone item 1; summed, item 2 wins (0.6 + 0.6 > 1.0 + 0).
    items = {
        "text": torch.tensor([[1.0, 0], [0, 0], [0.6, 0]]),
        "image": torch.tensor([[0, 0], [0, 1.0], [0, 0.6]]),
    }
    rows = [(0, 2, "test")]
    m = full_ranking_metrics(users, items, _interactions(rows), "test", ks=[1])
    assert m["recall@1"] == 1.0
    m = full_ranking_metrics(
        {"text": users["text"]}, {"text": items["text"]}, _interactions(rows), "test", ks=[1]
    )
    assert m["recall@1"] == 0.0


# ---------------------------------------------------------------------------------------------------------
# Preference recovery

N_PROBE_USERS = 600
PREFERENCES = {
    "pref_image_colour": ["red", "green", "blue", "black"],
    "pref_image_pattern": ["solid", "dots", "stripes"],
    "pref_text_style": ["modern", "rustic", "vintage"],
    "pref_text_room": ["kitchen", "bedroom", "bathroom", "office"],
}


def _probe_users(rng: np.random.Generator) -> pd.DataFrame:
    cols = {c: rng.choice(values, N_PROBE_USERS) for c, values in PREFERENCES.items()}
    return pd.DataFrame(
        {"user_idx": np.arange(N_PROBE_USERS), "user_id": [f"u{i}" for i in range(N_PROBE_USERS)], **cols}
    )


def _noisy_one_hot(users: pd.DataFrame, columns: list[str], rng: np.random.Generator) -> torch.Tensor:
    blocks = [pd.get_dummies(users[c]).to_numpy(float) for c in columns]
    x = np.concatenate(blocks + [rng.normal(size=(len(users), 4))], 1)  # + a few pure-noise dimensions
    return torch.tensor(x + 0.2 * rng.normal(size=x.shape), dtype=torch.float32)


def test_preference_recovery_own_high_cross_at_chance():
    rng = np.random.default_rng(0)
    users = _probe_users(rng)
    vecs = {
        "image": _noisy_one_hot(users, ["pref_image_colour", "pref_image_pattern"], rng),
        "text": _noisy_one_hot(users, ["pref_text_style", "pref_text_room"], rng),
    }
    out = preference_recovery(vecs, users, heldout_fraction=0.25, seed=0)
    assert set(out) == {"image", "text"}
    for m in ("image", "text"):
        r = out[m]
        assert r["own"] > 0.95
        assert set(r["per_attribute"]) == set(PREFERENCES) == set(r["chance"])
        # the other modality's tokens know nothing about this preference: near the majority-class rate
        assert r["cross"] < r["chance_cross"] + 0.12
        assert 0.25 <= r["chance_own"] < 0.5  # 3-4 balanced classes on 150 held-out users


def test_preference_recovery_random_vectors_at_chance():
    rng = np.random.default_rng(1)
    users = _probe_users(rng)
    out = preference_recovery({"text": torch.randn(N_PROBE_USERS, 16)}, users, heldout_fraction=0.25)
    for col, acc in out["text"]["per_attribute"].items():
        assert acc < out["text"]["chance"][col] + 0.12, col


def test_preference_recovery_without_ground_truth_is_empty():
    users = pd.DataFrame({"user_idx": [0, 1], "user_id": ["a", "b"]})
    assert preference_recovery({"text": torch.zeros(2, 3)}, users) == {}


def test_preference_recovery_checks_row_count():
    users = _probe_users(np.random.default_rng(0))
    with pytest.raises(DppmgError, match="token_vecs"):
        preference_recovery({"text": torch.zeros(3, 2)}, users)


# ---------------------------------------------------------------------------------------------------------
# Baselines on a planted-structure toy world: users in 6 groups, each interacting only with its group's 10
# items. Ranking by group membership is easy, so a trained model must beat random scores clearly.

N_GROUPS, GROUP_USERS, GROUP_ITEMS, PER_USER = 6, 15, 10, 7


def _planted_dataset(tmp_path: Path) -> ProcessedDataset:
    rng = np.random.default_rng(0)
    rows = []
    for u in range(N_GROUPS * GROUP_USERS):
        group_items = np.arange(GROUP_ITEMS) + (u % N_GROUPS) * GROUP_ITEMS
        chosen = rng.choice(group_items, PER_USER, replace=False)
        rows += [(u, int(i), "train") for i in chosen[:-2]]
        rows += [(u, int(chosen[-2]), "valid"), (u, int(chosen[-1]), "test")]
    n_users, n_items = N_GROUPS * GROUP_USERS, N_GROUPS * GROUP_ITEMS
    items = pd.DataFrame({"item_idx": np.arange(n_items), "item_id": [f"i{i}" for i in range(n_items)]})
    users = pd.DataFrame({"user_idx": np.arange(n_users), "user_id": [f"u{u}" for u in range(n_users)]})
    return ProcessedDataset(tmp_path, items, _interactions(rows), users, {"modalities": []})


def _random_recall(ds: ProcessedDataset) -> float:
    scores = torch.randn(ds.num_users, ds.num_items, generator=torch.Generator().manual_seed(0))
    metrics = full_ranking_metrics({}, {}, ds.interactions, "test", ks=[10], score_fn=_fixed_scores(scores))
    return metrics["recall@10"]


@pytest.mark.parametrize("name", ["mf_bpr", "lightgcn", "id_only_gnn"])
def test_trained_baselines_beat_random(tmp_path, name):
    ds = _planted_dataset(tmp_path)
    train = {
        "mf_bpr": baselines.train_mf_bpr,
        "lightgcn": baselines.train_lightgcn,
        "id_only_gnn": baselines.train_id_only_gnn,
    }[name]
    out = train(ds, dim=16, epochs=15, batch_size=64, lr=0.02, seed=0, ks=[10, 20], patience=15)
    assert {"recall@10", "ndcg@10", "recall@20", "ndcg@20", "users_evaluated", "epoch_seconds"} <= set(out)
    assert {"best_epoch", "epochs_run", "best_valid_recall@20"} <= set(out)
    assert out["users_evaluated"] == ds.num_users
    # Random scores put the test item in the top 10 of the 54 unmasked items about 10/54 of the time;
    # knowing the group leaves 4 candidates, so the top 10 always holds it.
    assert _random_recall(ds) < 0.3
    assert out["recall@10"] > 0.8


def test_lightgcn_with_the_softmax_loss_learns_the_planted_groups(tmp_path):
    ds = _planted_dataset(tmp_path)
    out = baselines.train_lightgcn(
        ds, dim=16, epochs=15, batch_size=64, lr=0.02, seed=0, ks=[10], patience=15, loss="softmax"
    )
    assert out["recall@10"] > 0.8 > _random_recall(ds)
    with pytest.raises(DppmgError, match="bpr or softmax"):
        PygLightGCN(3, 4, np.array([0]), np.array([0]), dim=8, layers=1, loss="hinge")


def test_pyg_lightgcn_csr_adjacency_gives_the_same_embeddings():
    users, items = np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 0, 2, 3])
    models = []
    for sparse in (False, True):
        torch.manual_seed(0)
        models.append(PygLightGCN(3, 4, users, items, dim=8, layers=2, sparse_adjacency=sparse))
    (u0, i0), (u1, i1) = models[0].embeddings(), models[1].embeddings()
    assert u0.shape == (3, 8) and i0.shape == (4, 8)
    assert torch.allclose(u0, u1, atol=1e-6) and torch.allclose(i0, i1, atol=1e-6)
    assert "edge_index" not in models[1].state_dict()  # the graph is rebuilt, not checkpointed


def test_pyg_lightgcn_edge_weights_reach_both_adjacency_forms():
    users, items = np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 0, 2, 3])
    weights = np.array([1.0, 0.25, 1.0, 0.5, 0.1, 1.0])
    out = []
    for sparse, w in ((False, weights), (True, weights), (True, None)):
        torch.manual_seed(0)
        out.append(PygLightGCN(3, 4, users, items, dim=8, layers=2, sparse_adjacency=sparse, edge_weight=w))
    (u0, _), (u1, _), (u2, _) = (m.embeddings() for m in out)
    assert torch.allclose(u0, u1, atol=1e-6)  # the weights are used the same way in both forms
    assert not torch.allclose(u1, u2, atol=1e-3)  # and they change the propagation


def test_popularity_scores_by_train_counts(tmp_path):
    # items 0 and 1 are popular in train; user 2's test item is 1, user 3's is the unpopular 3.
    rows = [(0, 0, "train"), (1, 0, "train"), (2, 0, "train"), (1, 1, "train"), (3, 1, "train")]
    rows += [(2, 1, "test"), (3, 3, "test")]
    items = pd.DataFrame({"item_idx": np.arange(4), "item_id": list("abcd")})
    users = pd.DataFrame({"user_idx": np.arange(4), "user_id": list("wxyz")})
    ds = ProcessedDataset(tmp_path, items, _interactions(rows), users, {"modalities": []})
    out = train_popularity(ds, ks=[1])
    # user 2: item 0 masked, item 1 (count 2) first: hit. user 3: item 1 masked, item 0 first: miss.
    assert out["recall@1"] == pytest.approx(0.5)
    assert out["users_evaluated"] == 2


# ---------------------------------------------------------------------------------------------------------
# Keyword (genre) recovery: the real-data check of the tokens

GENRES = ["action", "comedy", "drama", "horror"]


def _genre_world(n_users: int = 200, seed: int = 0):
    """Items with one or two genres; each user watches mostly one favourite genre. Returns items, train, favourite."""
    rng = np.random.default_rng(seed)
    n_items = 80
    first = rng.integers(0, len(GENRES), n_items)
    second = np.where(rng.random(n_items) < 0.3, (first + 1) % len(GENRES), first)
    keywords = [", ".join(sorted({GENRES[a], GENRES[b]})) for a, b in zip(first, second)]
    items = pd.DataFrame({"item_idx": np.arange(n_items), "keywords": keywords})
    favourite = rng.integers(0, len(GENRES), n_users)
    rows = []
    for u in range(n_users):
        mine = np.flatnonzero(first == favourite[u])
        others = np.flatnonzero(first != favourite[u])
        picks = np.concatenate([rng.choice(mine, 8), rng.choice(others, 3)])
        rows += [(u, int(i)) for i in picks]
    train = pd.DataFrame(rows, columns=["user_idx", "item_idx"])
    return items, train, favourite


def test_user_keyword_shares_count_every_genre_of_an_item():
    items = pd.DataFrame({"keywords": ["action, comedy", "comedy", None]})
    train = pd.DataFrame({"user_idx": [0, 0, 1, 1], "item_idx": [0, 1, 1, 2]})
    shares = user_keyword_shares(items, train, num_users=3)
    assert list(shares.columns) == ["action", "comedy"]
    assert shares.loc[0].tolist() == pytest.approx([1 / 3, 2 / 3])
    assert shares.loc[1].tolist() == pytest.approx([0.0, 1.0])  # item 2 has no keywords
    assert shares.loc[2].tolist() == [0.0, 0.0]  # no history


def test_keyword_recovery_reads_the_favourite_genre_from_informative_vectors():
    items, train, favourite = _genre_world()
    rng = np.random.default_rng(1)
    informative = torch.tensor(
        np.eye(len(GENRES))[favourite] + 0.3 * rng.standard_normal((len(favourite), 4))
    )
    noise = torch.tensor(rng.standard_normal((len(favourite), 8)))
    out = keyword_recovery({"text": informative, "image": noise}, items, train, len(favourite), seed=0)
    text, image = out["text"], out["image"]
    assert text["top"] > 0.9 and text["top"] > text["top_chance"] + 0.4
    assert image["top"] < image["top_chance"] + 0.2  # random vectors: about chance
    assert text["above_median"] > image["above_median"] + 0.2
    assert 0.4 <= text["above_median_chance"] <= 0.8
    assert set(text["per_keyword"]) <= set(GENRES) and text["users_heldout"] == 40


def test_keyword_recovery_without_keywords_is_empty():
    items = pd.DataFrame({"keywords": [None, None]})
    train = pd.DataFrame({"user_idx": [0, 1], "item_idx": [0, 1]})
    assert keyword_recovery({"text": torch.zeros(2, 3)}, items, train, 2) == {}
