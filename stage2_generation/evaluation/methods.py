"""The methods `dppmg eval` compares, behind one interface: generate a text and an image for (user, target) pairs.

    none                  the warm-started generators prompted with the target keywords only
    pmg                   PMG (pmg.py): LLM keywords and soft preference embeddings, best of N candidates by z
    dppmg_sft             DPPMG's tokens after grounding (stage2/tokens_grounded.safetensors)
    dppmg                 DPPMG's tokens after grounding and RL (stage2/tokens.safetensors)
    text_tokens_only      dppmg's tokens in the text prompt only (the image prompt is none's)
    image_tokens_only     dppmg's tokens in the image prompt only (the text prompt is none's)
    dppmg_no_consistency  RL again from the grounded tokens, with the consistency term removed from the reward
    dppmg_continuous      no VQ: each user's continuous preference vector injected as one soft token, grounded
                          and RL-trained like the codes (`continuous_checkpoint`)
    oracle                synthetic world only: catalogue items that have the user's true tastes
    dppmg_best_of_n       dppmg's tokens with PMG's selection: N images per pair, the one with the highest
                          z = a log d_p + (1 - a) log d_t kept (PMG's N and a), at PMG's image cost; opt-in

Every method generates with the same generation settings (`stage2.generation`), and image i of a call starts
from the noise of (seed, i) (text i samples with its own generator of (seed, i) too), so two methods called with
one seed see the same noise for the same pair. That makes the two one-prompt ablations compositions
(`ComposedMethod`): text_tokens_only's texts are dppmg's and its images none's, because its prompts are theirs;
eval composes them instead of generating them again.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from dppmg.config import Config, GenerationConfig
from dppmg.data.format import ProcessedDataset
from dppmg.data.imageio import load_image_array
from dppmg.errors import DppmgError
from dppmg.tokens import TokenCheckpoint, token_string
from stage2_generation.attributes import (
    ATTRIBUTE_PREFIX,
    IMAGE_PREFERENCE_PREFIX,
    TARGET_ATTRIBUTE,
    TEXT_PREFERENCE_PREFIX,
    AttributeJudge,
)
from stage2_generation.generators import generate_images, generate_texts
from stage2_generation.injection import load_injected
from stage2_generation.policy import Pair, Policy

# Which prompts carry DPPMG's tokens, per token method: (text, image).
TOKEN_METHODS = {
    "none": (False, False),
    "dppmg_sft": (True, True),
    "dppmg": (True, True),
    "text_tokens_only": (True, False),
    "image_tokens_only": (False, True),
    "dppmg_no_consistency": (True, True),
    "dppmg_continuous": (True, True),
}
LABELS = {
    "none": "non-personalized",
    "pmg": "PMG",
    "dppmg_sft": "DPPMG, grounded (no RL)",
    "dppmg": "DPPMG",
    "text_tokens_only": "text tokens only",
    "image_tokens_only": "image tokens only",
    "dppmg_no_consistency": "DPPMG, RL without consistency",
    "dppmg_continuous": "DPPMG, continuous (no VQ)",
    "oracle": "oracle (catalogue)",
    "dppmg_best_of_n": "DPPMG, best of N (PMG's selection)",
}


@dataclass
class Generation:
    """One method's generations for a list of pairs, row i for pair i."""

    texts: list[str]
    images: np.ndarray  # uint8 [N, H, W, 3]
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)  # method-specific extras (PMG's keywords, candidates)


class Method(Protocol):
    name: str

    def generate(self, pairs: Sequence[Pair], seed: int, progress: bool = True) -> Generation: ...


def generate_with_tokens(
    policy: Policy,
    pairs: Sequence[Pair],
    g: GenerationConfig,
    seed: int,
    text_tokens: bool,
    image_tokens: bool,
    progress: bool = True,
    indices: Sequence[int] | None = None,
) -> tuple[list[str], np.ndarray, float, float, int]:
    """(texts, images, text seconds, image seconds, generated tokens) with the policy's current token rows.

    Pair k's text and image are seeded by (seed, indices[k]) (default k), so a shard of a list of pairs, given its
    positions in the whole list, gets what the whole list would.
    """
    texts, text_seconds, tokens = token_texts(policy, pairs, g, seed, text_tokens, progress, indices)
    start = time.perf_counter()
    images = generate_images(
        policy.gen.pipe, policy.image_prompts(pairs, image_tokens), steps=g.image_steps, guidance=g.guidance,
        seed=seed, batch_size=g.batch_size, progress=progress, indices=indices, precision=g.precision,
    )  # fmt: skip
    return texts, images, text_seconds, time.perf_counter() - start, tokens


def token_texts(
    policy: Policy,
    pairs: Sequence[Pair],
    g: GenerationConfig,
    seed: int,
    text_tokens: bool,
    progress: bool = True,
    indices: Sequence[int] | None = None,
) -> tuple[list[str], float, int]:
    """(texts, seconds, generated tokens): `generate_with_tokens`'s text half."""
    gen = policy.gen
    start = time.perf_counter()
    texts = generate_texts(
        gen.lm, gen.lm_tokenizer, policy.text_prompts(pairs, text_tokens), max_new_tokens=g.max_new_tokens,
        temperature=g.temperature, seed=seed, batch_size=g.batch_size, progress=progress, indices=indices,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    # Generated tokens, counted by re-tokenizing (the EOS that ended a text counts as one).
    tokens = sum(len(gen.lm_tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)
    return texts, seconds, tokens


@dataclass
class TokenMethod:
    """A policy with a saved set of token parameters (None: whatever the policy holds), and which prompts use them."""

    name: str
    policy: Policy
    generation: GenerationConfig
    tokens_file: Path | None
    text_tokens: bool
    image_tokens: bool

    def generate(self, pairs: Sequence[Pair], seed: int, progress: bool = True) -> Generation:
        if self.tokens_file is not None:
            load_injected(self.tokens_file, self.policy.injected)
        texts, images, ts, is_, tokens = generate_with_tokens(
            self.policy, pairs, self.generation, seed, self.text_tokens, self.image_tokens, progress
        )
        info = {"text_seconds": ts, "image_seconds": is_, "tokens": tokens}
        return Generation(texts, images, ts + is_, info)


@dataclass
class BestOfNMethod:
    """`tokens`' texts, and for its images PMG's selection (`pmg.generate_candidates`, `score_candidates`): N images
    per pair from the noise of (seed, pair, n), PMG's own candidates' noise, the one with the highest z kept. The
    comparison with PMG at equal image cost; info keeps every candidate's scores and the choice. `tokens` is dppmg
    itself, so eval takes its texts from dppmg's cache (`with_texts`) instead of sampling them again."""

    name: str
    tokens: TokenMethod
    rewarder: Any  # evaluate.Rewarder: the scorer's image personalization and fidelity of the candidates
    candidates: int
    alpha: float

    def generate(self, pairs: Sequence[Pair], seed: int, progress: bool = True) -> Generation:
        t = self.tokens
        if t.tokens_file is not None:
            load_injected(t.tokens_file, t.policy.injected)
        texts, seconds, tokens = token_texts(t.policy, pairs, t.generation, seed, t.text_tokens, progress)
        only_texts = Generation(
            texts, np.zeros((0,), np.uint8), seconds, {"text_seconds": seconds, "tokens": tokens}
        )
        return self.with_texts(only_texts, pairs, seed, progress)

    def with_texts(
        self, texts: Generation, pairs: Sequence[Pair], seed: int, progress: bool = True
    ) -> Generation:
        """`tokens`' generation for the same pairs and seed, with this method's images in place of its own."""
        from stage2_generation.generators import encode_prompts
        from stage2_generation.pmg import generate_candidates, score_candidates

        t = self.tokens
        if t.tokens_file is not None:
            load_injected(t.tokens_file, t.policy.injected)
        start = time.perf_counter()
        pipe, g = t.policy.gen.pipe, t.generation
        with torch.no_grad():
            states = encode_prompts(pipe, t.policy.image_prompts(pairs, t.image_tokens))
            negative = encode_prompts(pipe, [""])
        candidates = generate_candidates(
            pipe, states, negative, self.candidates, g.image_steps, g.guidance, seed, g.batch_size, progress,
            g.precision,
        )  # fmt: skip
        scores = score_candidates(self.rewarder, pairs, candidates)
        chosen = scores.select(self.alpha).numpy()
        image_seconds = time.perf_counter() - start
        text_seconds = texts.info.get("text_seconds", 0.0)
        info = {
            "text_seconds": text_seconds,
            "image_seconds": image_seconds,
            "tokens": texts.info.get("tokens"),
            "texts_from": t.name,
            "chosen": chosen,
            "candidate_personalization": scores.personalization.tolist(),
            "candidate_fidelity": scores.fidelity.tolist(),
        }
        images = candidates[np.arange(len(pairs)), chosen]
        return Generation(list(texts.texts), images, text_seconds + image_seconds, info)


# The ablations whose prompts are two other methods' prompts: (the method their texts come from, their images').
COMPOSED = {"text_tokens_only": ("dppmg", "none"), "image_tokens_only": ("none", "dppmg")}


@dataclass
class ComposedMethod:
    """The texts of one method with the images of another, for an ablation whose text prompts are the first's and
    whose image prompts are the second's. With the same pairs and seed both are deterministic functions of the
    prompts (the noise of image i and the sampling of text i are seeded by (seed, i)), so composing equals
    generating, at no cost; tests/test_eval.py checks it against `TokenMethod`."""

    name: str
    texts_from: Method
    images_from: Method

    def generate(self, pairs: Sequence[Pair], seed: int, progress: bool = True) -> Generation:
        return self.compose(
            self.texts_from.generate(pairs, seed, progress), self.images_from.generate(pairs, seed, progress)
        )

    def compose(self, texts: Generation, images: Generation) -> Generation:
        ts, is_ = texts.info.get("text_seconds", 0.0), images.info.get("image_seconds", 0.0)
        info = {
            "text_seconds": ts,
            "image_seconds": is_,
            "tokens": texts.info.get("tokens"),
            "composed_of": [self.texts_from.name, self.images_from.name],
        }
        return Generation(list(texts.texts), images.images, ts + is_, info)


@dataclass
class OracleMethod:
    """The catalogue's best-matching items as "generations" (a calibration of the metrics, not a bound)."""

    ds: ProcessedDataset
    judge: AttributeJudge
    shape: tuple[int, int]
    name: str = "oracle"

    def generate(self, pairs: Sequence[Pair], seed: int, progress: bool = True) -> Generation:
        start = time.perf_counter()
        text_items, image_items = oracle_items(self.ds, self.judge, pairs, seed)
        texts = [str(self.ds.items["text"].iat[i]) for i in text_items]
        images = load_image_array([self.ds.image_path(i) for i in image_items], self.shape, progress=False)
        return Generation(texts, images, time.perf_counter() - start, {"items": [text_items, image_items]})


def oracle_items(
    ds: ProcessedDataset, judge: AttributeJudge, pairs: Sequence[Pair], seed: int
) -> tuple[list[int], list[int]]:
    """For each pair, a catalogue item of the target's category with the user's true text tastes (the most
    matching attributes), and one with the user's image tastes: (text items, image items)."""
    items, users = ds.items, ds.users.set_index("user_idx")
    category = f"{ATTRIBUTE_PREFIX}{TARGET_ATTRIBUTE}"
    if category not in items.columns or any(p.item is None for p in pairs):
        raise DppmgError("the oracle needs the synthetic world's attr_category and targets with an item")
    tastes = {
        TEXT_PREFERENCE_PREFIX: [a for a in judge.text_attributes if a != TARGET_ATTRIBUTE],
        IMAGE_PREFERENCE_PREFIX: [a for a in judge.image_attributes if a != TARGET_ATTRIBUTE],
    }
    has = {
        IMAGE_PREFERENCE_PREFIX: items["image"].notna().to_numpy(),
        TEXT_PREFERENCE_PREFIX: items["text"].notna().to_numpy(),
    }
    rng = np.random.default_rng(seed)
    chosen: dict[str, list[int]] = {prefix: [] for prefix in tastes}
    for p in pairs:
        same = items[category].to_numpy() == items[category].iat[p.item]
        for prefix, attrs in tastes.items():
            match = sum(
                (items[f"{ATTRIBUTE_PREFIX}{a}"] == users.at[p.user, f"{prefix}{a}"]).to_numpy()
                for a in attrs
            )
            ok = same & has[prefix]
            if not ok.any():
                raise DppmgError(
                    f"the oracle has no item of the category of pair (user {p.user}, {p.keywords!r})"
                )
            best = np.flatnonzero(ok & (match == match[ok].max()))
            chosen[prefix].append(int(rng.choice(best)))
    return chosen[TEXT_PREFERENCE_PREFIX], chosen[IMAGE_PREFERENCE_PREFIX]


# ---------------------------------------------------------------------------------------------------------
# Training the variants


def continuous_checkpoint(ckpt: TokenCheckpoint) -> TokenCheckpoint:
    """The checkpoint without its quantizer: one level whose codebook is the users' continuous vectors.

    User u's code is u, so injection gives every user one token whose row starts as the projection of the user's
    own preference vector, and grounding and RL train the same token-associated parameters as for the codes.
    """
    manifest = {**ckpt.manifest, "modalities": {}}
    codebooks, codes = {}, {}
    for m in ckpt.modalities:
        entry = dict(ckpt.manifest["modalities"][m])
        vectors = ckpt.user_vectors[m].float()
        prefix = f"{entry['prefix']}c"  # <ptc_0_u>: not to be mistaken for a code token
        users = int(vectors.shape[0])
        entry.update(
            levels=1,
            codebook_size=users,
            prefix=prefix,
            token_strings=[token_string(prefix, 0, u) for u in range(users)],
        )
        manifest["modalities"][m] = entry
        codebooks[m] = vectors.unsqueeze(0)  # [1, U, d]
        codes[m] = torch.arange(vectors.shape[0]).unsqueeze(1)  # [U, 1]
    return replace(ckpt, manifest=manifest, codebooks=codebooks, codes=codes)


def variant_weights(
    cfg: Config, drop: Sequence[str] = (), set_: dict[str, float] | None = None
) -> dict[str, float]:
    """The RL weights of a variant: stage 2's, minus the dropped terms, with some set."""
    weights = {k: v for k, v in cfg.stage2.rl.weights.items() if k not in drop}
    weights.update(set_ or {})
    if not any(weights.values()):
        raise DppmgError(f"the variant's reward has no term left: {weights}")
    return weights
