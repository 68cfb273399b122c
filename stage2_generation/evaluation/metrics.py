"""The held-out metrics: one explicit list, computed the same way for every method, whatever the RL weights are.

Per (user, target) pair, `Judges.score` returns every metric that applies to the dataset:

    personalization_text, personalization_image, consistency, fidelity
        the scorer and MiniLM readings of DESIGN.md ("Metrics"), by the registered reward functions themselves
        (rewards.py), called one by one: a metric does not depend on `stage2.rl.weights`, and a reward ablation
        that drops a term still reports it
    hit_text, hit_image, target_hit_text, target_hit_image, judge_consistency
        the attribute judge (synthetic world only; attributes.py): the share of the user's true preferred
        attributes the judge sees, the target's category, and whether the text and the image of the same pair
        show the same attribute values (category by both classifiers; colour and pattern as the image
        classifier reads them against the value words the text mentions)
    judge_history_last5, judge_history_all, judge_target, ssim_*
        the pretrained image judge (real data, `stage2.generation.image_judge`; judges.py)

Diversity is a property of a set, not of a pair: `diversity` reads it across users given the same target.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dppmg.data.format import ProcessedDataset
from stage2_generation.attributes import (
    ATTRIBUTE_PREFIX,
    IMAGE_PREFERENCE_PREFIX,
    TARGET_ATTRIBUTE,
    TEXT_PREFERENCE_PREFIX,
    AttributeJudge,
    words,
)
from stage2_generation.evaluate import Rewarder
from stage2_generation.judges import ImageJudge
from stage2_generation.policy import Pair
from stage2_generation.rewards import METRIC_NAMES, REWARDS, TOTAL_KEY, combine

SCORER_METRICS = METRIC_NAMES  # personalization_text, personalization_image, consistency, fidelity
ATTRIBUTE_METRICS = ("hit_text", "hit_image", "target_hit_text", "target_hit_image", "judge_consistency")
DIVERSITY_METRICS = ("diversity_text", "diversity_image")
# What "personalization" means in a headline: the mean of the two modalities' scorer readings.
PERSONALIZATION = "personalization"


@dataclass
class Judges:
    """Everything a generation is scored with: the reward's encoders and the judges the reward never sees."""

    rewarder: Rewarder
    attribute: AttributeJudge | None = None
    image: ImageJudge | None = None

    @property
    def ds(self) -> ProcessedDataset:
        return self.rewarder.ds

    def names(self) -> list[str]:
        """The metrics `score` returns, in the order tables show them."""
        out = [*SCORER_METRICS, PERSONALIZATION]
        if self.attribute is not None:
            out += ATTRIBUTE_METRICS
        if self.image is not None:
            from stage2_generation.judges import IMAGE_JUDGE_METRICS

            out += IMAGE_JUDGE_METRICS
        return out

    def score(
        self,
        pairs: Sequence[Pair],
        texts: Sequence[str],
        images: np.ndarray,
        reward_weights: Mapping[str, float] | None = None,
    ) -> dict[str, np.ndarray]:
        """metric -> float64 [N], one value per pair (NaN where a metric does not apply to the pair).

        With `reward_weights`, also the RL reward under them (`reward`): stage 2 reports what it optimised.
        """
        inputs = self.rewarder.inputs(pairs, texts, images)
        out = {name: REWARDS[name](inputs).double().cpu().numpy() for name in SCORER_METRICS}
        if reward_weights is not None:
            out[TOTAL_KEY] = combine(inputs, reward_weights).total.double().cpu().numpy()
        out[PERSONALIZATION] = (out["personalization_text"] + out["personalization_image"]) / 2
        if self.attribute is not None:
            out.update(attribute_scores(self.attribute, self.ds, pairs, texts, images))
        if self.image is not None:
            out.update({k: np.asarray(v, dtype=np.float64) for k, v in self.image(pairs, images).items()})
        return out


def attribute_scores(
    judge: AttributeJudge,
    ds: ProcessedDataset,
    pairs: Sequence[Pair],
    texts: Sequence[str],
    images: np.ndarray | None,
) -> dict[str, np.ndarray]:
    """Per pair: preference hits in each modality, target hits, and the text-image agreement of the judge.
    Without images (None), the text's metrics only: hit_text and target_hit_text."""
    users = ds.users.set_index("user_idx").loc[[p.user for p in pairs]]
    seen_image = None if images is None else judge.predict_images(images)
    seen_text = judge.predict_texts(list(texts))
    out: dict[str, np.ndarray] = {}
    for modality, seen, prefix in (
        ("image", seen_image, IMAGE_PREFERENCE_PREFIX),
        ("text", seen_text, TEXT_PREFERENCE_PREFIX),
    ):
        if seen is None:
            continue
        attrs = [a for a in seen if a != TARGET_ATTRIBUTE and f"{prefix}{a}" in users.columns]
        hits = [
            np.asarray(seen[a], dtype=object) == users[f"{prefix}{a}"].astype(str).to_numpy() for a in attrs
        ]
        out[f"hit_{modality}"] = np.mean(hits, axis=0) if hits else np.full(len(pairs), np.nan)
    category = ds.items[f"{ATTRIBUTE_PREFIX}{TARGET_ATTRIBUTE}"].astype(str).to_numpy()
    truth = np.asarray([category[p.item] if p.item is not None else None for p in pairs], dtype=object)
    if seen_image is not None:
        out["target_hit_image"] = (np.asarray(seen_image[TARGET_ATTRIBUTE], dtype=object) == truth).astype(
            float
        )
    out["target_hit_text"] = (np.asarray(seen_text[TARGET_ATTRIBUTE], dtype=object) == truth).astype(float)
    if seen_image is not None:
        out["judge_consistency"] = judge_consistency(judge, seen_image, seen_text, texts)
    return out


def judge_consistency(
    judge: AttributeJudge,
    seen_image: dict[str, list[str]],
    seen_text: dict[str, list[str]],
    texts: Sequence[str],
) -> np.ndarray:
    """Per pair, the share of the image's judged attributes that the pair's text states with the same value.

    For an attribute the text classifier reads too (the category), its reading is the text's value. For one only
    the image classifier reads (colour, pattern), the text's value is the attribute's value word that the text
    mentions (the first, when it mentions several); a text that mentions none states nothing about it and the
    attribute is left out of that pair's share. A pair where no attribute is stated gets NaN.
    """
    n = len(texts)
    agree = np.zeros(n)
    stated = np.zeros(n)
    tokens = [set(words(t or "")) for t in texts]
    for a, values in seen_image.items():
        if a in seen_text:
            said = list(seen_text[a])
        else:
            vocab = [v for v in judge.vocab[a] if isinstance(v, str)]
            said = [next((v for v in vocab if v.lower() in toks), None) for toks in tokens]
        for i in range(n):
            if said[i] is not None:
                stated[i] += 1
                agree[i] += said[i] == values[i]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(stated > 0, agree / np.maximum(stated, 1), np.nan)


def diversity(
    rewarder: Rewarder, groups: Sequence[Sequence[int]], texts: Sequence[str], images: np.ndarray
) -> dict[str, np.ndarray]:
    """Per group of generations for one target and different users: 1 - mean pairwise cosine, per modality.

    Texts in MiniLM space and images in the scorer's image space (the spaces of the personalization metrics).
    A method that ignores the user gives ~0 for a deterministic generator; sampling noise alone gives some.
    """
    text_emb = torch.from_numpy(rewarder.text_encoder.encode(list(texts), progress=False))
    image_emb = rewarder.scorer.encode_images(images).cpu()
    out = {}
    for name, emb in (("diversity_text", text_emb), ("diversity_image", image_emb)):
        values = []
        for g in groups:
            x = F.normalize(emb[list(g)].double(), dim=-1)
            sim = x @ x.T
            k = len(g)
            values.append(1 - float((sim.sum() - sim.diagonal().sum()) / (k * (k - 1))))
        out[name] = np.asarray(values)
    return out
