"""Scoring generations: the embeddings the rewards read, for RL rollouts and for the held-out metrics alike.

`Rewarder` holds what a (user, target) pair is scored against — the user's history (training interactions) as
MiniLM text features and scorer image features, and the target's keywords and image — and turns generated
texts and images into `RewardInputs` (rewards.py). One object serves the RL reward and `stage2/metrics.json`,
so the numbers the policy is trained on and the numbers reported are computed by the same code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from dppmg.data.format import ProcessedDataset
from dppmg.data.imageio import load_image_array
from dppmg.errors import DppmgError
from dppmg.scorer import Scorer
from stage2_generation.policy import Pair
from stage2_generation.rewards import RewardInputs, RewardResult, check_weights, combine, pad_history

MAX_HISTORY = 50  # the most recent training items a user is compared with


class Rewarder:
    """Scores generated texts and images for (user, target) pairs with the registered rewards.

    Args:
        ds: the processed dataset (its `features["text"]` are MiniLM item embeddings).
        scorer: the dataset's CLIP-style scorer (image tower for images, text tower for texts vs images).
        text_encoder: anything with `encode(texts, progress=) -> float32 [N, d]` in the item features' space.
        weights: reward name -> weight (the config's `stage2.rl.weights`).
    """

    def __init__(self, ds: ProcessedDataset, scorer: Scorer, text_encoder, weights: Mapping[str, float]):
        check_weights(weights)  # before the item images are embedded
        self.ds, self.scorer, self.text_encoder = ds, scorer, text_encoder
        self.weights = dict(weights)
        if "text" not in ds.features:
            raise DppmgError(f"{ds.root}: stage 2 needs the items' text features (features/text.npy)")
        self.item_text = torch.from_numpy(np.array(ds.features["text"], dtype=np.float32))
        self.has_image = ds.items["image"].notna().to_numpy()
        self.item_image = self._item_image_embeddings()
        self.history = user_histories(ds)

    def _item_image_embeddings(self) -> Tensor | None:
        """The scorer's embedding of every item image (the stored features when the scorer made them)."""
        if not self.has_image.any():
            return None
        info = self.ds.meta.get("features", {}).get("image", {})
        if info.get("encoder") == "scorer" and "image" in self.ds.features:
            return torch.from_numpy(np.array(self.ds.features["image"], dtype=np.float32))
        rows = np.flatnonzero(self.has_image)
        side = self.scorer.image_size
        images = load_image_array([self.ds.image_path(int(i)) for i in rows], side, progress=False)
        out = torch.zeros(self.ds.num_items, self.scorer.dim)
        out[rows] = self.scorer.encode_images(images).cpu()
        return out

    def user_history(self, user: int) -> np.ndarray:
        return self.history.get(int(user), np.zeros(0, dtype=np.int64))

    @lru_cache(maxsize=4096)  # noqa: B019 - one Rewarder per run; keywords repeat across rounds
    def _keywords(self, keywords: str) -> tuple[Tensor, Tensor]:
        text = torch.from_numpy(self.text_encoder.encode([keywords], progress=False))[0]
        scorer = self.scorer.encode_text([keywords]).cpu()[0]
        return text, scorer

    def inputs(
        self, pairs: Sequence[Pair], texts: Sequence[str] | None, images: np.ndarray | None
    ) -> RewardInputs:
        """The embeddings of N generations (texts and/or uint8 [N, H, W, 3] images) for their pairs."""
        n = len(pairs)
        for what, values in (("texts", texts), ("images", images)):
            if values is not None and len(values) != n:
                raise DppmgError(f"Rewarder: {len(values)} {what} for {n} pairs")
        histories = [self.user_history(p.user) for p in pairs]
        keyword = [self._keywords(p.keywords) for p in pairs]
        fields: dict[str, Tensor | None] = {}
        hist_text, mask = pad_history([self.item_text[h] for h in histories])
        fields.update(history_text_emb=hist_text, history_mask=mask)
        fields["target_text_emb"] = torch.stack([k[0] for k in keyword])
        fields["target_scorer_text_emb"] = torch.stack([k[1] for k in keyword])
        if self.item_image is not None:
            fields["history_image_emb"] = pad_history([self.item_image[h] for h in histories])[0]
            has_image = torch.stack([torch.as_tensor(self.has_image[h]) for h in _pad_rows(histories)])
            fields["history_image_mask"] = mask & has_image  # items without an image are not image history
            targets = [p.item for p in pairs]
            fields["target_image_emb"] = torch.stack(
                [self.item_image[0 if t is None else t] for t in targets]
            )  # rows without a target image carry any value; the mask below excludes them
            fields["target_image_mask"] = torch.tensor(
                [t is not None and bool(self.has_image[t]) for t in targets]
            )
        if texts is not None:
            fields["gen_text_emb"] = torch.from_numpy(self.text_encoder.encode(list(texts), progress=False))
            fields["gen_text_scorer_emb"] = self.scorer.encode_text(list(texts)).cpu()
        if images is not None:
            fields["gen_image_emb"] = self.scorer.encode_images(images).cpu()
        return RewardInputs(**fields)

    def __call__(
        self, pairs: Sequence[Pair], texts: Sequence[str] | None, images: np.ndarray | None
    ) -> RewardResult:
        return combine(self.inputs(pairs, texts, images), self.weights)


def user_histories(ds: ProcessedDataset, limit: int = MAX_HISTORY) -> dict[int, np.ndarray]:
    """user -> the item indices of the user's last `limit` training interactions, oldest first."""
    train = ds.split("train").sort_values(["user_idx", "timestamp"], kind="stable")
    return {int(u): g["item_idx"].to_numpy()[-limit:].copy() for u, g in train.groupby("user_idx")}


def _pad_rows(histories: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Histories padded with item 0 to one length (the mask marks the padding)."""
    width = max((len(h) for h in histories), default=0)
    return [np.concatenate([h, np.zeros(width - len(h), dtype=np.int64)]) for h in histories]


def heldout_pairs(ds: ProcessedDataset, users: Sequence[int]) -> list[Pair]:
    """One pair per held-out user: the user's test item (its keywords are the target), else the last valid one."""
    chosen: list[Pair] = []
    for split in ("test", "valid"):
        rows = ds.split(split)
        rows = rows[rows["user_idx"].isin(users)]
        last = rows.sort_values("timestamp", kind="stable").groupby("user_idx").tail(1)
        for u, i in zip(last["user_idx"].tolist(), last["item_idx"].tolist()):
            if all(p.user != u for p in chosen):
                chosen.append(Pair(int(u), item_keywords(ds.items, int(i)), int(i)))
    order = {u: k for k, u in enumerate(users)}
    return sorted(chosen, key=lambda p: order[p.user])


def item_keywords(items: pd.DataFrame, item: int) -> str:
    """An item's keywords, the target of a pair; without keywords, the first 4 words of its text (or its index)."""
    value = items["keywords"].iat[item]
    if value is None or pd.isna(value) or not str(value).strip():
        text = items["text"].iat[item]
        return " ".join(str(text).split()[:4]) if isinstance(text, str) else f"item {item}"
    return str(value)


def split_users(ds: ProcessedDataset, heldout: int, seed: int) -> tuple[list[int], list[int]]:
    """(training users, held-out users): held-out users are drawn from those with a test (or valid) item."""
    with_target = sorted(set(ds.split("test")["user_idx"]) | set(ds.split("valid")["user_idx"]))
    with_history = set(ds.split("train")["user_idx"])
    candidates = [u for u in with_target if u in with_history]
    if len(candidates) < 2:
        raise DppmgError(
            f"{ds.root}: stage 2 needs at least 2 users with training and test interactions, found {len(candidates)}"
        )
    rng = np.random.default_rng([seed, 2])
    take = min(heldout, len(candidates) // 2)
    held = sorted(int(u) for u in rng.choice(candidates, size=take, replace=False))
    held_set = set(held)
    train = sorted(int(u) for u in with_history if u not in held_set)
    return train, held
