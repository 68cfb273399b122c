"""Grounding: supervised training of the token-associated parameters on the training users' interactions.

For an interaction (user u, item i) the text loss is the LM loss of i's text given u's text tokens and i's
keywords ("<pt..> lamp:" → text), and the image loss is the diffusion loss of i's image given u's image tokens
and i's keywords ("<pi..> lamp" → image). The generators are frozen, so the only way to lower either loss is
for the tokens to carry what distinguishes u's items from other items with the same keywords: the user's
preferences. This is the supervised step of DPPMG before RL (and what `heldout.grounded` measures).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dppmg.config import GroundingConfig
from dppmg.data.format import ProcessedDataset
from dppmg.distributed import SINGLE, Dist, share, sum_across
from dppmg.errors import DppmgError
from dppmg.log import logger
from stage2_generation.generators import image_shape
from stage2_generation.policy import Pair, Policy
from stage2_generation.prompts import target_separator
from stage2_generation.training import (
    IGNORE_INDEX,
    SkipStreak,
    diffusion_loss,
    guarded_step,
    max_positions,
    text_batch,
)


def training_pairs(ds: ProcessedDataset, users: Sequence[int]) -> list[Pair]:
    """Every training interaction of `users` as a (user, item keywords, item) pair."""
    from stage2_generation.evaluate import item_keywords

    train = ds.split("train")
    train = train[train["user_idx"].isin(set(users))]
    items = train["item_idx"].tolist()
    keywords = {i: item_keywords(ds.items, i) for i in set(items)}  # once per item, not per interaction
    return [Pair(int(u), keywords[i], int(i)) for u, i in zip(train["user_idx"].tolist(), items)]


def typical_pairs(pairs: Sequence[Pair], item_emb: torch.Tensor, share: float) -> list[Pair]:
    """Each user's `share` most typical interactions: those whose item is most similar to the rest of the user's.

    An item's typicality is its cosine to the mean embedding of the user's other items (leave-one-out), the
    personalization reward of rewards.py applied to the real item. Grounding on these sharpens the tokens
    towards what the user reliably likes instead of the user's whole mix, the reward-ranked supervised step of
    RAFT (Dong et al., "RAFT: Reward rAnked FineTuning for Generative Foundation Model Alignment", 2023).
    Every user keeps at least one interaction; a user with one keeps it. Order: as in `pairs`.

    Args:
        pairs: training interactions (user, keywords, item); item must be set.
        item_emb: [I, D] item embeddings in the modality's personalization space (MiniLM texts, scorer images).
        share: in (0, 1]; 1 returns `pairs` as they are.
    """
    if not 0 < share <= 1:
        raise DppmgError(f"grounding: typical_share must be in (0, 1], got {share}")
    if share == 1:
        return list(pairs)
    # Every user at once (a loop over users costs seconds on 10k users): per-user sums give the leave-one-out means.
    users, inverse = torch.unique(torch.tensor([p.user for p in pairs]), return_inverse=True)
    rows = torch.nn.functional.normalize(item_emb.float(), dim=-1)[[p.item for p in pairs]]  # [N, D]
    sizes = torch.bincount(inverse, minlength=len(users))
    sums = torch.zeros(len(users), rows.shape[1]).index_add_(0, inverse, rows)
    others = (sums[inverse] - rows) / (sizes[inverse] - 1).clamp(min=1)[:, None]
    score = torch.nn.functional.cosine_similarity(rows, others, dim=-1)
    # Within each user, the most typical first (ties in pair order): sort by score, then stably by user.
    by_score = torch.argsort(score, descending=True, stable=True)
    order = by_score[torch.argsort(inverse[by_score], stable=True)]
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order)) - starts[inverse[order]]
    wanted = torch.round(share * sizes.double()).long().clamp(min=1)  # round half to even, as Python's round
    keep = rank < torch.where(sizes == 1, sizes, wanted)[inverse]
    return [pairs[k] for k in torch.nonzero(keep).flatten().tolist()]


def text_loss(
    policy: Policy, pairs: Sequence[Pair], texts: Sequence[str], max_target_tokens: int | None = None
) -> tuple[torch.Tensor, int]:
    """(mean LM loss, target tokens): the loss of each pair's item text (its first `max_target_tokens` tokens) given
    its personalized prompt, averaged over the batch's target tokens, and how many there are."""
    lm, tokenizer = policy.gen.lm, policy.gen.lm_tokenizer
    examples = list(zip(policy.text_prompts(pairs), texts))
    batch = text_batch(
        tokenizer,
        examples,
        max_positions(lm, tokenizer),
        target_separator(policy.prompts),
        max_target_tokens,
    )
    device = next(lm.parameters()).device
    out = lm(**{k: v.to(device) for k, v in batch.items()})
    # Each label predicts from the position before it, so the first position's label never counts.
    tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    if tokens == 0:
        raise DppmgError("grounding: no target tokens in the batch (empty item texts?)")
    return out.loss, tokens


def image_loss(
    policy: Policy,
    pairs: Sequence[Pair],
    pixels: torch.Tensor,
    generator: torch.Generator,
    rows: Sequence[int] | None = None,
) -> torch.Tensor:
    """The diffusion loss of each pair's item image [B, 3, H, W] in [-1, 1] given its personalized prompt.

    `rows`: the loss of those rows of the batch `pixels` only, `pairs` being theirs (`states_diffusion_loss`).
    """
    return diffusion_loss(policy.gen.pipe, policy.image_prompts(pairs), pixels, generator, rows)


# A grounding loss: (the loss of this process's rows of a batch, how many units it averages over: rows or tokens).
LossFn = Callable[[np.ndarray, np.ndarray, torch.Generator], tuple[torch.Tensor, float]]


def fit(
    name: str,
    loss_fn: LossFn,
    params: list[torch.nn.Parameter],
    num_examples: int,
    cfg: GroundingConfig,
    steps: int,
    batch_size: int,
    seed: int,
    progress: bool,
    dist: Dist = SINGLE,
) -> dict[str, float]:
    """Run `steps` AdamW steps of `loss_fn(batch indices, this process's positions in them, generator)` on
    `params`, `batch_size` examples each; returns loss statistics.

    Every process draws the same batch; with many, each computes the loss of its strided share of the batch
    (`Dist.shard`), weighted by its share of the batch's units, and `guarded_step` sums the gradients, so the step
    is the whole batch's on every process. A non-finite loss or gradient skips its step (counted in "skipped")
    instead of corrupting the parameters.
    """
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)  # weight decay would shrink the rows
    rng = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    skipped = 0
    streak = SkipStreak(f"grounding {name}")
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=f"grounding {name}", disable=not progress)
    for _ in bar:
        picks = torch.randint(num_examples, (min(batch_size, num_examples),), generator=rng).numpy()
        mine = np.asarray(dist.shard(len(picks)))
        loss, units = loss_fn(picks, mine, rng)
        [total] = sum_across(dist, [units])
        loss = share(dist, loss, units, total)
        [value] = sum_across(dist, [float(loss.detach())])
        applied = guarded_step(loss, params, optimizer, cfg.max_grad_norm, dist)
        streak.update(applied)
        if not applied:
            skipped += 1
            continue
        losses.append(value)
        bar.set_postfix(loss=f"{value:.4f}")
    if skipped:
        logger.warning(
            "grounding %s: skipped %d of %d steps with a non-finite loss or gradient", name, skipped, steps
        )
    window = max(1, min(20, len(losses) // 5))
    return {
        "steps": steps,
        "skipped": skipped,
        "loss_first": float(np.mean(losses[:window])) if losses else float("nan"),
        "loss_last": float(np.mean(losses[-window:])) if losses else float("nan"),
        "seconds": time.perf_counter() - start,
    }


def _trained(policy: Policy, modality: str, word_rows: bool) -> list[torch.nn.Parameter]:
    """The parameters grounding trains for `modality`: its token parameters, without the code-word rows unless
    `word_rows` (grounding.text_word_rows, grounding.image_word_rows); says so when it leaves them out."""
    block = policy.text.module if modality == "text" else policy.image.module
    if block.word_spans and not word_rows:
        logger.info(
            "grounding %s: the %d code-word rows stay at their words (grounding.%s_word_rows=false); it trains "
            "the rows of the %d level-0 codes without words", modality, block.num_words, modality,
            block.codebook_size - len(block.word_spans),
        )  # fmt: skip
    return policy.parameters(modality, word_rows)


def ground(
    policy: Policy,
    ds: ProcessedDataset,
    pairs: Sequence[Pair],
    cfg: GroundingConfig,
    seed: int,
    progress: bool = True,
    images: np.ndarray | None = None,
    item_text_emb: torch.Tensor | None = None,
    item_image_emb: torch.Tensor | None = None,
    dist: Dist = SINGLE,
) -> dict[str, dict[str, float]]:
    """Ground the text tokens and then the image tokens on `pairs` (training interactions).

    On many processes (`dist`), each computes its share of every batch and the steps are the whole batch's (`fit`).

    Args:
        images: uint8 [I, H, W, 3] item images at the pipeline's size (read from the dataset when None).
        item_text_emb, item_image_emb: [I, D] item embeddings in each modality's personalization space (the
            Rewarder's); with `cfg.typical_share` < 1 each modality grounds on `typical_pairs` only.
    Returns:
        {"text": stats, "image": stats} for the parts that ran (see `fit`), each with the interactions used.
    """
    if not pairs:
        raise DppmgError("grounding: no training interactions to ground the tokens on")
    report: dict[str, dict[str, float]] = {}
    texts = ds.items["text"]
    if policy.text is not None and cfg.text_steps > 0:
        has_text = np.array([isinstance(t, str) and bool(t.strip()) for t in texts.tolist()])  # per item
        usable = [p for p in pairs if has_text[p.item]]
        usable = _typical(usable, item_text_emb, cfg.typical_share, "text")
        params = _trained(policy, "text", cfg.text_word_rows)
        if usable:

            def text_fn(
                picks: np.ndarray, mine: np.ndarray, _: torch.Generator
            ) -> tuple[torch.Tensor, float]:
                chosen = [usable[i] for i in picks[mine]]
                return text_loss(
                    policy, chosen, [texts.iat[p.item] for p in chosen], cfg.text_max_tokens or None
                )

            report["text"] = fit(
                "text", text_fn, params, len(usable), cfg, cfg.text_steps,
                cfg.text_batch_size or cfg.batch_size, seed, progress, dist,
            )  # fmt: skip
            report["text"]["interactions"] = len(usable)
            logger.info("grounding text: loss %.3f → %.3f in %.0f s", *_line(report["text"]))
    has_image = ds.items["image"].notna().to_numpy()
    if policy.image is not None and cfg.image_steps > 0 and has_image.any():
        usable = _typical([p for p in pairs if has_image[p.item]], item_image_emb, cfg.typical_share, "image")
        if images is None:
            from stage2_generation.warmstart import image_warmstart_examples

            _, images = image_warmstart_examples(ds, "{keywords}", image_shape(policy.gen.pipe), progress)
            # image_warmstart_examples keeps the items with images, in item order
            full = np.zeros((ds.num_items, *images.shape[1:]), dtype=np.uint8)
            full[np.flatnonzero(has_image)] = images
            images = full
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # [I, 3, H, W]

        def image_fn(picks: np.ndarray, mine: np.ndarray, rng: torch.Generator) -> tuple[torch.Tensor, float]:
            batch = [usable[i] for i in picks]
            rows = None if not dist.active else mine.tolist()  # one process: the whole batch, as before
            chosen = batch if rows is None else [batch[r] for r in rows]
            return image_loss(policy, chosen, pixels[[p.item for p in batch]], rng, rows), len(chosen)

        report["image"] = fit(
            "image",
            image_fn,
            _trained(policy, "image", cfg.image_word_rows),
            len(usable),
            cfg,
            cfg.image_steps,
            cfg.batch_size,
            seed + 1,
            progress,
            dist,
        )
        report["image"]["interactions"] = len(usable)
        logger.info("grounding image: loss %.4f → %.4f in %.0f s", *_line(report["image"]))
    return report


def _line(stats: dict[str, float]) -> tuple[float, float, float]:
    return stats["loss_first"], stats["loss_last"], stats["seconds"]


def _typical(pairs: list[Pair], item_emb: torch.Tensor | None, share: float, modality: str) -> list[Pair]:
    if share == 1 or not pairs:
        return pairs
    if item_emb is None:
        raise DppmgError(
            f"grounding: typical_share={share} needs the items' {modality} embeddings (item_{modality}_emb)"
        )
    kept = typical_pairs(pairs, item_emb, share)
    logger.info(
        "grounding %s on %d of %d interactions (typical_share %.2f)", modality, len(kept), len(pairs), share
    )
    return kept
