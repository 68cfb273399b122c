"""Training helpers shared by the warm-start, grounding, RL and PMG's soft embeddings.

Text: `text_batch` turns (prompt, target) pairs into LM inputs whose labels count the target only, within the
`max_positions` the LM can read. Image: `diffusion_loss` is the denoising loss of images given prompts. Steps:
`make_optimizer` (AdamW, warm-up, cosine decay), `guarded_step` (backward, clip, step, with the NaN/inf guard every
stage-2 optimizer step goes through), `scheduled_step` (a guarded step and a schedule step) and `loss_summary`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from diffusers.optimization import get_cosine_schedule_with_warmup
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dppmg.distributed import SINGLE, Dist, all_agree, sum_gradients
from dppmg.errors import DppmgError
from dppmg.log import logger
from stage2_generation.generators import encode_prompts

IGNORE_INDEX = -100  # label value that torch's cross-entropy (and so every HF causal LM) skips
# loss_first / loss_last average this share of the steps: one diffusion step's loss is noisy.
LOSS_WINDOW = 0.1
MAX_SKIPPED_IN_A_ROW = (
    10  # optimizer steps skipped in a row (non-finite loss or gradient) before stage 2 gives up
)


# ---------------------------------------------------------------------------------------------------------
# Losses


def text_batch(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[tuple[str, str]],
    max_length: int,
    separator: str = " ",
    max_target_tokens: int | None = None,
) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, labels [B, T], right-padded; labels are -100 on the prompt and the padding.

    Prompt and target are tokenized separately, so the prompt's tokens are exactly those `generate_texts` feeds
    the model. The target is `separator` + text + EOS (a chat prompt ends where the answer starts, so it takes
    separator ""); a target longer than `max_target_tokens`, or too long for `max_length`, is cut (and then has
    no EOS).
    """
    rows = []
    for prompt, target in examples:
        prompt_ids = tokenizer(prompt)["input_ids"]
        target_ids = tokenizer(separator + target, add_special_tokens=False)["input_ids"]
        target_ids = (target_ids + [tokenizer.eos_token_id])[:max_target_tokens]
        room = max_length - len(prompt_ids)
        if room < 1:
            raise DppmgError(
                f"warm-start prompt {prompt!r} is {len(prompt_ids)} tokens, no room for a target within the "
                f"text generator's {max_length} positions"
            )
        rows.append((prompt_ids, target_ids[:room]))
    length = max(len(p) + len(t) for p, t in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, (prompt_ids, target_ids) in enumerate(rows):
        ids = prompt_ids + target_ids
        input_ids[b, : len(ids)] = torch.tensor(ids)
        mask[b, : len(ids)] = 1
        labels[b, len(prompt_ids) : len(ids)] = torch.tensor(target_ids)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def max_positions(lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """How many tokens the LM can read: the fewer of its position embeddings and the tokenizer's limit."""
    positions = getattr(lm.config, "max_position_embeddings", None) or getattr(lm.config, "n_positions", None)
    limit = (
        tokenizer.model_max_length if tokenizer.model_max_length < 1e9 else None
    )  # HF's "no limit" is ~1e30
    candidates = [int(x) for x in (positions, limit) if x]
    if not candidates:
        raise DppmgError(f"cannot tell how many positions the text generator {type(lm).__name__} has")
    return min(candidates)


def diffusion_loss(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    pixels: torch.Tensor,
    generator: torch.Generator,
    rows: Sequence[int] | None = None,
) -> torch.Tensor:
    """The denoising loss of `pixels` [B, 3, H, W] in [-1, 1] given `prompts`, at uniformly drawn timesteps.

    Prompts are encoded the way `StableDiffusionPipeline.encode_prompt` does (padded to the tokenizer's maximum
    length, no attention mask unless the encoder asks for one), so training and sampling see the same states.
    `rows` (many processes): the loss of those rows of the batch only, `prompts` being theirs (see
    `states_diffusion_loss`).
    """
    return states_diffusion_loss(pipe, encode_prompts(pipe, prompts), pixels, generator, rows)


def states_diffusion_loss(
    pipe: StableDiffusionPipeline,
    states: torch.Tensor,
    pixels: torch.Tensor,
    generator: torch.Generator,
    rows: Sequence[int] | None = None,
) -> torch.Tensor:
    """`diffusion_loss` given the conditioning states [B, L, D] themselves (PMG appends soft rows to them).

    With `rows`, `states` are those rows' ([len(rows), L, D]) while the noise and timesteps are still drawn for
    the whole batch `pixels`: a process computing its rows of a batch draws what one process would, and its
    generator stays in step with the other processes'.
    """
    device = pipe.unet.device
    x0 = pixels.to(device)
    if pipe.vae is not None:  # real Stable Diffusion: diffuse the VAE's scaled latents, not the pixels
        with torch.no_grad():
            x0 = pipe.vae.encode(x0).latent_dist.sample(generator) * pipe.vae.config.scaling_factor
    scheduler = pipe.scheduler
    noise = torch.randn(x0.shape, generator=generator).to(device)
    t = torch.randint(scheduler.config.num_train_timesteps, (len(x0),), generator=generator).to(device)
    if rows is not None:
        picked = torch.as_tensor(list(rows), dtype=torch.long, device=device)
        x0, noise, t = x0[picked], noise[picked], t[picked]
    noisy = scheduler.add_noise(x0, noise, t)
    prediction = pipe.unet(noisy, t, encoder_hidden_states=states).sample
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(x0, noise, t)
    elif kind == "sample":
        target = x0
    else:
        raise DppmgError(
            f"the diffusion loss supports prediction_type epsilon, v_prediction or sample, not {kind!r}"
        )
    return torch.nn.functional.mse_loss(prediction.float(), target.float())


# ---------------------------------------------------------------------------------------------------------
# Steps


def make_optimizer(
    params: list[torch.nn.Parameter], lr: float, steps: int, warmup: float
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW, with a linear warm-up over the `warmup` share of `steps` and then a cosine decay to 0.

    A few minutes of training is far from convergence, so the decay matters: the last steps at a small learning
    rate settle the weights instead of leaving them wherever the last large step threw them.
    """
    optimizer = torch.optim.AdamW(params, lr=lr)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, round(warmup * steps), max(steps, 1))


def guarded_step(
    loss: torch.Tensor | None,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    max_grad_norm: float,
    dist: Dist = SINGLE,
) -> bool:
    """Backward, clip and step: the NaN/inf guard every stage-2 optimizer step goes through.

    A non-finite loss or gradient norm applies nothing (the gradients are cleared) and returns False, so one bad
    batch cannot poison the weights; the caller counts and logs the skip.

    Many processes (`dist`): `loss` is this process's share of the batch's loss (`dppmg.distributed.share`; None
    when its share is empty). The step is skipped everywhere when any process's loss is not finite, and the
    gradients are summed across processes before the clip, so every process clips and steps alike and the
    parameters stay equal.
    """
    optimizer.zero_grad(set_to_none=True)
    if not all_agree(dist, loss is None or bool(torch.isfinite(loss.detach()).all())):
        return False
    if loss is not None:
        loss.backward()
    sum_gradients(dist, params)
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return False
    optimizer.step()
    return True


def scheduled_step(
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    loss: torch.Tensor,
    params: list[torch.nn.Parameter],
    max_grad_norm: float,
    name: str,
) -> float:
    """One step through `guarded_step`, then one of `schedule`; returns the loss (NaN when the step was skipped).

    The schedule advances either way, so a skipped step does not shift the rest of the run. `name` ("warm-start")
    starts the warning a skipped step logs.
    """
    value = float(loss.detach())
    if not guarded_step(loss, params, optimizer, max_grad_norm):
        logger.warning("%s: skipped a step with a non-finite loss or gradient (loss %s)", name, value)
        value = float("nan")
    schedule.step()
    return value


def loss_summary(losses: list[float], seconds: float) -> dict[str, float]:
    """loss_first and loss_last (means over the first and last `LOSS_WINDOW` of the finite losses), seconds, steps."""
    finite = [x for x in losses if np.isfinite(x)]
    window = max(1, round(len(finite) * LOSS_WINDOW))
    nan = float("nan")
    return {
        "loss_first": float(np.mean(finite[:window])) if finite else nan,
        "loss_last": float(np.mean(finite[-window:])) if finite else nan,
        "seconds": seconds,
        "steps": len(losses),
    }


class SkipStreak:
    """Counts optimizer steps skipped in a row; `MAX_SKIPPED_IN_A_ROW` of them stop the run with a DppmgError.

    One skipped step is a bad batch; ten in a row mean the parameters or the losses are not coming back, and going
    on would only burn time. Stage 2's checkpoint is written after every phase and RL iteration, so stopping here
    keeps the last good one, and a rerun (after lowering the learning rate, say) resumes from it.
    """

    def __init__(self, where: str, limit: int = MAX_SKIPPED_IN_A_ROW):
        self.where, self.limit, self.count = where, limit, 0

    def update(self, applied: bool) -> None:
        self.count = 0 if applied else self.count + 1
        if self.count >= self.limit:
            raise DppmgError(
                f"{self.where}: {self.count} optimizer steps in a row had a non-finite loss or gradient, so stage 2 "
                "stopped. Its last checkpoint (stage2/checkpoint.pt, written after the last finished phase or RL "
                "iteration) is kept and a rerun resumes from it; a lower learning rate (stage2.grounding.lr, "
                "stage2.rl.lr_text, stage2.rl.lr_image) is the usual fix"
            )
