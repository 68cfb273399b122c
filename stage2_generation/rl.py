"""RL on the token-associated parameters: a GRPO-style text round and a DDPO-style image round.

Both rounds share one shape. Draw P (training user, target) pairs; sample G generations of the round's
modality per pair with the current policy; pair every sample with one generation of the other modality for the
same pair (so the consistency reward couples the two policies); score with `Rewarder` (the weighted registered
rewards); normalise the rewards within each pair's group (`group_advantages`: GRPO's group-relative advantage,
DDPO's per-prompt statistics; `stage2.rl.advantage` says whether the weighted total is normalised, or each
component before weighting, see `_advantages`); then take clipped-ratio PPO steps on minibatches.

Text (GRPO, Shao et al. 2024, as in trl's GRPOTrainer with beta = 0): the ratio is per completion token,
exp(log π_new − log π_old), the clipped surrogate is averaged over each completion's tokens and then over
completions. We run our own loop rather than trl's `GRPOTrainer` because the reward needs the image policy's
generation for the same (user, target) pair at every round, the trainable parameters live in an embedding hook
rather than in the model's own weights, and the image round needs the same sampling, advantage and guard code;
`GRPOTrainer` would own the data loading, the generation and the optimizer and leave none of that shared.

Image (DDPO, Black et al. 2023): a rollout is a stochastic DDIM chain (eta > 0) whose every step is a Gaussian
policy with a known log-probability (`ddpo.py`); the ratio is per denoising step and the gradient reaches the
image tokens through the text encoder's prompt states.

Many processes (`dist`): every process draws the same P pairs and takes its strided share of them (whole
groups, so the group advantages are exact); sample i of the round is seeded by (seed, i) whichever process draws
it. The PPO minibatches index the round's samples in one order on every process; each computes the loss of its
own samples in a minibatch, weighted by their share of it, and the gradients are summed (`guarded_step`), so every
process takes the same steps. The skip and the KL stop are agreed across processes, and a round's log is the
whole round's.

Guards against collapse: the ratio is clipped (`clip_range`), advantages are clipped (`adv_clip_max`), a
round stops its updates once the approximate KL to the rollout policy exceeds `max_approx_kl`, and a step whose
loss or gradient is not finite is skipped and counted (`skipped` in the round's log) instead of applied.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dppmg.config import ADVANTAGE_KINDS, GenerationConfig, RLConfig
from dppmg.distributed import SINGLE, Dist, all_agree, gather_rows, share, sum_across
from dppmg.errors import DppmgError
from dppmg.log import logger
from stage2_generation.ddpo import all_finite, ppo_clip_loss, recompute_log_probs, sample_with_logprob
from stage2_generation.evaluate import Rewarder
from stage2_generation.generators import (
    TEXT_STREAM,
    encode_prompts,
    generate_images,
    generate_texts,
    sample_seed,
)
from stage2_generation.policy import (
    Pair,
    Policy,
    completion_log_probs,
    sample_shape,
    sample_texts,
    samples_to_uint8,
)
from stage2_generation.rewards import RewardResult, finite_mask, group_advantages
from stage2_generation.training import SkipStreak, guarded_step


@dataclass
class RoundLog:
    """What one round did: the rollouts' mean reward and components, and the PPO updates' statistics."""

    modality: str
    reward: float
    components: dict[str, float]
    updates: int
    skipped: int
    stopped_early: bool
    approx_kl: float
    clipfrac: float
    seconds: float

    def as_dict(self) -> dict[str, float | int | bool | str | dict[str, float]]:
        return dict(self.__dict__)


def round_seed(seed: int, iteration: int, modality: str) -> int:
    return int(
        np.random.SeedSequence([seed, iteration, 1 if modality == "text" else 2]).generate_state(1)[0] >> 1
    )


def draw_pairs(pool: Sequence[Pair], count: int, seed: int) -> list[Pair]:
    """`count` pairs from the training pool, distinct users where possible."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pool))
    chosen, users = [], set()
    for i in order:
        if pool[i].user not in users:
            chosen.append(pool[i])
            users.add(pool[i].user)
        if len(chosen) == count:
            break
    return chosen


def _advantages(
    result: RewardResult, groups: Tensor, kind: str, weights: dict[str, float]
) -> tuple[Tensor, Tensor]:
    """(advantages [N], usable [N]): group-normalised rewards; rows with a non-finite reward get 0 and are left out
    of their group's statistics, so they train nothing.

    kind "total" normalises the weighted total (GRPO, DDPO). "per_component" normalises every component within
    its group first and returns their weighted sum divided by sqrt(sum of squared weights) (unit spread when the
    components are independent): a component whose values spread more across a group (consistency, in practice)
    then no longer outvotes the others at equal weight, and components that disagree push less. The sum is not
    normalised again, which would blow rounding noise up to unit advantages when they cancel.
    """
    usable = finite_mask(result)
    nan = torch.full_like(result.total, float("nan"))
    if kind == "total":
        adv = group_advantages(torch.where(usable, result.total, nan), groups)
    elif kind == "per_component":
        active = {name: w for name, w in weights.items() if w != 0}
        parts = [
            w * group_advantages(torch.where(usable, result.components[n], nan), groups)
            for n, w in active.items()
        ]
        adv = torch.stack(parts).sum(0) / sum(w * w for w in active.values()) ** 0.5
    else:
        raise DppmgError(f"RL: advantage must be one of {', '.join(ADVANTAGE_KINDS)}, got {kind!r}")
    return torch.where(usable, adv, torch.zeros_like(adv)), usable


def _summary(result: RewardResult) -> tuple[float, dict[str, float]]:
    keep = finite_mask(result)
    comps = {k: float(v[keep].mean()) if keep.any() else float("nan") for k, v in result.components.items()}
    return (float(result.total[keep].mean()) if keep.any() else float("nan")), comps


def _minibatches(n: int, size: int, generator: torch.Generator) -> list[Tensor]:
    order = torch.randperm(n, generator=generator)
    return [order[i : i + size] for i in range(0, n, size)]


def _share(dist: Dist, num_pairs: int, group_size: int) -> tuple[list[int], list[int]]:
    """(this process's pairs, its samples): pair positions in the round, and their G samples' positions in the
    round's P * G samples (pair k's are k*G .. k*G + G - 1); everything on one process."""
    mine = dist.shard(num_pairs)
    return mine, [k * group_size + j for k in mine for j in range(group_size)]


def _gather_result(dist: Dist, rows: list[int], result: RewardResult, n: int) -> RewardResult:
    """The whole round's rewards, in the round's order, from every process's rows (`result` on one process)."""
    if not dist.active:
        return result
    names = list(result.components)
    local = torch.stack(
        [result.total, *(result.components[k] for k in names)], dim=1
    ).cpu()  # [N_local, 1 + K]
    whole = torch.stack(gather_rows(dist, rows, list(local), n))
    return RewardResult(whole[:, 0], {k: whole[:, 1 + j] for j, k in enumerate(names)})


# ---------------------------------------------------------------------------------------------------------
# Text round


def text_round(
    policy: Policy,
    rewarder: Rewarder,
    pairs: Sequence[Pair],
    cfg: RLConfig,
    gen_cfg: GenerationConfig,
    optimizer: torch.optim.Optimizer,
    seed: int,
    dist: Dist = SINGLE,
) -> RoundLog:
    """One GRPO round: G sampled texts per pair, each paired with the image policy's image for the pair."""
    start = time.perf_counter()
    lm, tokenizer = policy.gen.lm, policy.gen.lm_tokenizer
    g = cfg.group_size
    mine, rows = _share(dist, len(pairs), g)
    expanded = [pairs[k] for k in mine for _ in range(g)]
    groups = torch.arange(len(mine)).repeat_interleave(g)
    seeds = [sample_seed(seed, r, TEXT_STREAM) for r in rows]
    samples = sample_texts(
        lm, tokenizer, policy.text_prompts(expanded), gen_cfg.max_new_tokens, cfg.text_temperature, seeds
    )
    # The image partner: one deterministic image per pair from the current image policy.
    images = generate_images(
        policy.gen.pipe, policy.image_prompts([pairs[k] for k in mine]), steps=cfg.image_steps,
        guidance=gen_cfg.guidance, seed=seed, batch_size=gen_cfg.batch_size, indices=mine,
    )  # fmt: skip
    result = rewarder(expanded, samples.texts, np.repeat(images, g, axis=0))
    adv, _ = _advantages(result, groups, cfg.advantage, rewarder.weights)
    with torch.no_grad():
        old = completion_log_probs(lm, samples, cfg.text_temperature)
    params = policy.parameters("text")
    stats = _ppo(
        cfg.text_epochs, len(pairs) * g, cfg, seed,
        lambda idx: _text_loss(lm, samples.select(idx), old[idx], adv[idx], cfg),
        params, optimizer, rows, dist,
    )  # fmt: skip
    reward, comps = _summary(_gather_result(dist, rows, result, len(pairs) * g))
    return RoundLog("text", reward, comps, **stats, seconds=time.perf_counter() - start)


def _text_loss(
    lm, samples, old: Tensor, adv: Tensor, cfg: RLConfig
) -> tuple[Tensor, dict[str, float | bool]]:
    """GRPO's clipped surrogate: per-token ratios, averaged over each completion's tokens, then over completions."""
    new = completion_log_probs(lm, samples, cfg.text_temperature)
    mask = samples.completion_mask.float()
    a = adv.clamp(-cfg.adv_clip_max, cfg.adv_clip_max)[:, None]
    ratio = torch.exp(new - old)
    per_token = torch.maximum(-a * ratio, -a * ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range))
    lengths = mask.sum(1).clamp(min=1)
    loss = ((per_token * mask).sum(1) / lengths).mean()
    with torch.no_grad():
        diff = (new - old) * mask
        info = {
            "approx_kl": float((0.5 * diff**2).sum() / mask.sum().clamp(min=1)),
            "clipfrac": float(
                (((ratio - 1).abs() > cfg.clip_range).float() * mask).sum() / mask.sum().clamp(min=1)
            ),
            "finite": all_finite(loss, new),
            "weight": float(mask.sum()),  # approx_kl and clipfrac are means over the completions' tokens
        }
    return loss, info


# ---------------------------------------------------------------------------------------------------------
# Image round


def image_round(
    policy: Policy,
    rewarder: Rewarder,
    pairs: Sequence[Pair],
    cfg: RLConfig,
    gen_cfg: GenerationConfig,
    optimizer: torch.optim.Optimizer,
    seed: int,
    dist: Dist = SINGLE,
) -> RoundLog:
    """One DDPO round: G stochastic DDIM chains per pair, each paired with the text policy's text for the pair."""
    start = time.perf_counter()
    pipe = policy.gen.pipe
    g = cfg.group_size
    mine, rows = _share(dist, len(pairs), g)
    expanded = [pairs[k] for k in mine for _ in range(g)]
    groups = torch.arange(len(mine)).repeat_interleave(g)
    texts = generate_texts(
        policy.gen.lm, policy.gen.lm_tokenizer, policy.text_prompts([pairs[k] for k in mine]),
        max_new_tokens=gen_cfg.max_new_tokens, temperature=gen_cfg.temperature, seed=seed,
        batch_size=gen_cfg.batch_size, indices=mine,
    )  # fmt: skip
    prompts = policy.image_prompts(expanded)
    with torch.no_grad():
        embeds = encode_prompts(pipe, prompts)
        negative = encode_prompts(pipe, [""]).expand_as(embeds)
    generators = [torch.Generator().manual_seed(seed + r) for r in rows]
    traj = sample_with_logprob(
        pipe.unet, pipe.scheduler, embeds, negative, steps=cfg.image_steps, guidance=gen_cfg.guidance,
        eta=cfg.eta, shape=sample_shape(pipe), generator=generators, keep_unconditional=True,
    )  # fmt: skip
    images = samples_to_uint8(pipe, traj.final)
    result = rewarder(expanded, [t for t in texts for _ in range(g)], images)
    adv, _ = _advantages(result, groups, cfg.advantage, rewarder.weights)

    def loss_fn(idx: Tensor) -> tuple[Tensor, dict[str, float | bool]]:
        part = traj.select(idx)
        states = encode_prompts(pipe, [prompts[i] for i in idx.tolist()])  # with gradients to the token rows
        # Every step of the minibatch at once (the UNet is frozen, so the rollout's unconditional half is
        # reused): the clipped loss, KL and clip fraction averaged over steps and trajectories alike.
        new = recompute_log_probs(
            pipe.unet, pipe.scheduler, part, gen_cfg.guidance, cfg.eta, prompt_embeds=states
        )
        advantages = adv[idx].unsqueeze(1).expand_as(new)
        loss, info = ppo_clip_loss(
            new.flatten(), part.log_probs.flatten(), advantages.flatten(), cfg.clip_range, cfg.adv_clip_max
        )
        # approx_kl and clipfrac are means over the minibatch's trajectories, each weighing its steps alike.
        return loss, {**info, "weight": float(len(idx))}

    stats = _ppo(
        cfg.image_epochs,
        len(pairs) * g,
        cfg,
        seed,
        loss_fn,
        policy.parameters("image"),
        optimizer,
        rows,
        dist,
    )
    reward, comps = _summary(_gather_result(dist, rows, result, len(pairs) * g))
    return RoundLog("image", reward, comps, **stats, seconds=time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------------
# One iteration


def make_optimizers(policy: Policy, cfg: RLConfig) -> dict[str, torch.optim.Optimizer]:
    """One AdamW per modality that has trainable token parameters (no weight decay: it would shrink the rows)."""
    return {
        m: torch.optim.AdamW(policy.parameters(m), lr=lr, weight_decay=0.0)
        for m, lr in (("text", cfg.lr_text), ("image", cfg.lr_image))
        if policy.parameters(m)
    }


def rl_iteration(
    policy: Policy,
    rewarder: Rewarder,
    pool: Sequence[Pair],
    cfg: RLConfig,
    gen_cfg: GenerationConfig,
    optimizers: dict[str, torch.optim.Optimizer],
    seed: int,
    iteration: int,
    dist: Dist = SINGLE,
) -> dict[str, RoundLog]:
    """A text round, then an image round (for the modalities in `optimizers`), each on freshly drawn pairs
    (every process draws the same pairs and works on its share of them)."""
    rounds = {"text": text_round, "image": image_round}
    logs = {}
    for modality in ("text", "image"):
        if modality in optimizers:
            s = round_seed(seed, iteration, modality)
            logs[modality] = rounds[modality](
                policy,
                rewarder,
                draw_pairs(pool, cfg.pairs_per_round, s),
                cfg,
                gen_cfg,
                optimizers[modality],
                s,
                dist,
            )
    return logs


# ---------------------------------------------------------------------------------------------------------
# The shared PPO loop


def _ppo(
    epochs: int,
    n: int,
    cfg: RLConfig,
    seed: int,
    loss_fn,
    params,
    optimizer,
    rows: Sequence[int] | None = None,
    dist: Dist = SINGLE,
) -> dict[str, float | int | bool]:
    """`epochs` passes of minibatch updates with the KL stop and the NaN/inf guard.

    The minibatches draw from the round's n samples; `loss_fn` takes positions in this process's samples, which
    are the round's `rows` (all n on one process). With many processes every one walks the same minibatches,
    computes the loss of its own samples in each (none: it still joins the step) and takes the agreed step.
    """
    rng = torch.Generator().manual_seed(seed)
    position = {r: k for k, r in enumerate(range(n) if rows is None else rows)}
    updates = skipped = 0
    streak = SkipStreak("RL")
    kls, clips = [], []
    stopped = False
    for _ in range(epochs):
        for idx in _minibatches(n, cfg.minibatch_size, rng):
            local = torch.tensor([position[i] for i in idx.tolist() if i in position], dtype=torch.long)
            loss, info = loss_fn(local) if len(local) else (None, None)
            if loss is not None:
                loss = share(dist, loss, len(local), len(idx))
            finite = all_agree(dist, info is None or bool(info["finite"]))
            applied = finite and guarded_step(loss, params, optimizer, cfg.max_grad_norm, dist)
            streak.update(applied)
            if not applied:
                skipped += 1
                logger.warning("RL: skipped an update with a non-finite loss or gradient")
                continue
            updates += 1
            approx_kl, clipfrac = _minibatch_stats(dist, info)
            kls.append(approx_kl)
            clips.append(clipfrac)
            if approx_kl > cfg.max_approx_kl:
                stopped = True
                break
        if stopped:
            break
    return {
        "updates": updates,
        "skipped": skipped,
        "stopped_early": stopped,
        "approx_kl": float(np.mean(kls)) if kls else 0.0,
        "clipfrac": float(np.mean(clips)) if clips else 0.0,
    }


def _minibatch_stats(dist: Dist, info: dict[str, float | bool] | None) -> tuple[float, float]:
    """(approx_kl, clipfrac) of the whole minibatch: on many processes, the processes' values weighted by what each
    averaged over (info["weight"]), so that every process sees the same numbers and takes the same KL stop."""
    if info is not None and not dist.active:  # one process holds every sample of every minibatch
        return float(info["approx_kl"]), float(info["clipfrac"])
    w = float(info["weight"]) if info is not None else 0.0
    kl, clip = (float(info["approx_kl"]), float(info["clipfrac"])) if info is not None else (0.0, 0.0)
    kl_sum, clip_sum, total = sum_across(dist, [kl * w, clip * w, w])
    return kl_sum / total, clip_sum / total
