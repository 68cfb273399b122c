"""DDPO's building blocks for the image policy: stochastic DDIM steps that record their log-probability.

DDPO (Black et al. 2023, "Training Diffusion Models with Reinforcement Learning"; reference code
kvablack/ddpo-pytorch) treats each denoising step as an action of a policy. With eta > 0 a DDIM step is a
Gaussian, so its log-probability is exact and a PPO-style clipped ratio can be taken per step:

    x0    = prediction of the clean sample from (x_t, model output)     (epsilon, v or sample prediction)
    eps   = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t)
    sigma = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    mean  = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps
    x_prev ~ N(mean, sigma^2 I)

a_t is the scheduler's cumulative alpha at t and a_prev the one at t - num_train_timesteps / steps (or the
scheduler's final alpha past the start). The log-probability is the Gaussian log-density averaged, not summed,
over the non-batch dimensions, as ddpo-pytorch does, so its scale does not depend on the image size.

Why our own code: diffusers' `DDIMScheduler.step` (0.42) returns no log-probability and trl removed its
`DDPOTrainer` in 0.24. `ddim_step_with_logprob` re-derives the step from the scheduler's public config and
`alphas_cumprod`, following `DDIMScheduler.step` line for line (prediction type, clipping, thresholding,
previous timestep); tests/test_ddpo.py pins it against `step` for the same noise. The noise is drawn with
diffusers' `randn_tensor`, as `step` and the pipeline draw it, so a seeded generator gives the same numbers.

The log-probability needs sigma > 0 at every step: eta > 0, and a scheduler built with
`set_alpha_to_one=False` (Stable Diffusion's setting), since with True the last step has a_prev = 1 and no noise.

Where the images live (pixels or VAE latents) is the caller's business: nothing here touches a VAE.

The PPO update (`recompute_log_probs`) scores every step of a minibatch of trajectories in one UNet call, with a
timestep per sample. With classifier-free guidance and a frozen UNet it also reuses the rollout's unconditional
outputs (`sample_with_logprob(..., keep_unconditional=True)`): they depend on x_t, t, the frozen UNet and the
empty prompt only, none of which the update changes, so only the conditional half is recomputed. The numbers are
those of one step at a time with both halves, to float rounding (tests/test_ddpo.py); on the default tiny UNet a
minibatch update of 8 trajectories × 10 steps takes 0.87 s instead of 2.0-2.5 s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from dppmg.errors import DppmgError

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)  # the Gaussian density's normalising constant, per dimension
Generator = (
    torch.Generator | list[torch.Generator] | None
)  # one generator, or one per sample (as diffusers takes)


@dataclass
class DDIMStepOutput:
    """One stochastic DDIM step.

    prev_sample: [B, C, H, W] x_{t-1}, drawn or given. log_prob: float32 [B], its log-density averaged over
    C*H*W. mean: [B, C, H, W] the step's mean. std: [B, 1, 1, 1] its standard deviation sigma.
    """

    prev_sample: Tensor
    log_prob: Tensor
    mean: Tensor
    std: Tensor


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: Tensor,
    timestep: int | Tensor,
    sample: Tensor,
    eta: float,
    prev_sample: Tensor | None = None,
    generator: Generator = None,
) -> DDIMStepOutput:
    """The DDIM step of `DDIMScheduler.step` (same eta and noise give the same x_prev), plus its log-probability.

    Args:
        scheduler: a DDIMScheduler after `set_timesteps`.
        model_output: [B, C, H, W] the UNet's output (after guidance), read per `scheduler.config.prediction_type`.
        timestep: the current timestep, one for the batch (int or 0-d tensor) or one per sample ([B] tensor).
        sample: [B, C, H, W] x_t.
        eta: the noise weight, in (0, 1] (1 is DDPM-like; 0, deterministic DDIM, has no log-probability).
        prev_sample: [B, C, H, W] a given x_{t-1} to score (the PPO update); None draws one from `generator`.
        generator: noise source when prev_sample is None: a generator or a list of B of them.
    """
    if scheduler.num_inference_steps is None:
        raise DppmgError("the DDIM scheduler has no timesteps: call scheduler.set_timesteps(steps) first")
    if not 0 < eta <= 1:
        # eta = 0 is deterministic DDIM, with no density; past 1, 1 - a_prev - sigma^2 turns negative.
        raise DppmgError(f"DDPO needs a stochastic DDIM step with 0 < eta <= 1, got eta={eta}")
    a_t, a_prev = _step_alphas(scheduler, timestep, sample)
    x0, eps = _predict_x0_and_eps(scheduler, model_output, sample, a_t)
    x0 = _clip_x0(scheduler, x0)

    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.sqrt()  # [B, 1, 1, 1]
    if not bool((std > 0).all()):
        raise DppmgError(
            f"the DDIM step at timestep {timestep} has no noise (sigma = 0), so no log-probability: build the "
            "DDIMScheduler with set_alpha_to_one=False (as Stable Diffusion does) so that the last step is stochastic"
        )
    # 1 - a_prev - sigma^2 >= 0 exactly for eta <= 1; the clamp only stops rounding from making a NaN.
    direction = (1 - a_prev - std**2).clamp_min(0).sqrt() * eps
    mean = a_prev.sqrt() * x0 + direction

    if prev_sample is None:
        noise = randn_tensor(
            model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
        )
        prev_sample = mean + std * noise
    # The taken action is data: the gradient of its log-probability flows through the mean only.
    log_prob = gaussian_log_prob(prev_sample.detach(), mean, std)
    return DDIMStepOutput(prev_sample=prev_sample, log_prob=log_prob, mean=mean, std=std)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """float32 [B]: log N(x; mean, std^2) per element, averaged over every dimension but the first.

    Computed in float32 even for half-precision inputs: the squared error over std^2 loses too much in float16.
    """
    x, mean, std = x.float(), mean.float(), std.float()
    per_element = -((x - mean) ** 2) / (2 * std**2) - std.log() - HALF_LOG_2PI
    return per_element.flatten(1).mean(dim=1)


def _step_alphas(scheduler: DDIMScheduler, timestep: int | Tensor, sample: Tensor) -> tuple[Tensor, Tensor]:
    """(a_t, a_prev), each [B, 1, ..., 1] in the sample's dtype, with the previous timestep as `step` defines it."""
    alphas = scheduler.alphas_cumprod
    t = torch.as_tensor(timestep, device=alphas.device).long()
    prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=alphas.dtype, device=alphas.device)
    a_t = alphas[t]
    a_prev = torch.where(prev >= 0, alphas[prev.clamp_min(0)], final)
    shape = (sample.shape[0],) + (1,) * (sample.ndim - 1)
    return (
        a_t.to(sample.device, sample.dtype).expand(sample.shape[0]).reshape(shape),
        a_prev.to(sample.device, sample.dtype).expand(sample.shape[0]).reshape(shape),
    )


def _predict_x0_and_eps(
    scheduler: DDIMScheduler, model_output: Tensor, sample: Tensor, a_t: Tensor
) -> tuple[Tensor, Tensor]:
    """The predicted clean sample and noise, [B, C, H, W] each, for the scheduler's prediction type."""
    kind = scheduler.config.prediction_type
    b_t = 1 - a_t
    if kind == "epsilon":
        return (sample - b_t.sqrt() * model_output) / a_t.sqrt(), model_output
    if kind == "sample":
        return model_output, (sample - a_t.sqrt() * model_output) / b_t.sqrt()
    if kind == "v_prediction":
        return (
            a_t.sqrt() * sample - b_t.sqrt() * model_output,
            a_t.sqrt() * model_output + b_t.sqrt() * sample,
        )
    raise DppmgError(f"scheduler prediction_type must be epsilon, sample or v_prediction, got {kind!r}")


def _clip_x0(scheduler: DDIMScheduler, x0: Tensor) -> Tensor:
    """Clip or threshold the predicted x0 exactly as `DDIMScheduler.step` does (thresholding wins over clipping)."""
    config = scheduler.config
    if config.thresholding:
        # Dynamic thresholding (Imagen): per sample, s = the ratio-quantile of |x0| clamped to
        # [1, sample_max_value]; x0 is clamped to [-s, s] and divided by s.
        flat = x0.flatten(1)
        s = torch.quantile(flat.abs().float(), config.dynamic_thresholding_ratio, dim=1)
        s = s.clamp(min=1, max=config.sample_max_value).to(x0.dtype).unsqueeze(1)  # [B, 1]
        return (flat.clamp(-s, s) / s).reshape(x0.shape)
    if config.clip_sample:
        return x0.clamp(-config.clip_sample_range, config.clip_sample_range)
    return x0


# ---------------------------------------------------------------------------------------------------------
# Rollouts


@dataclass
class Trajectory:
    """A batch of DDIM sampling runs with the log-probability of every step.

    latents: [B, T+1, C, H, W] x_T ... x_0 (the last one is the generated image or latent).
    log_probs: float32 [B, T], log p(x_{j+1} | x_j) of step j. timesteps: long [T], the timestep of step j.
    prompt_embeds: [B, S, D] the text encoder's states the UNet attended to.
    negative_embeds: [B, S, D] the unconditional states for classifier-free guidance, or None without it.
    unconditional: [B, T, C, H, W] the UNet's unconditional output at step j, kept for a frozen UNet (see
        `recompute_log_probs`), or None.
    """

    latents: Tensor
    log_probs: Tensor
    timesteps: Tensor
    prompt_embeds: Tensor
    negative_embeds: Tensor | None = None
    unconditional: Tensor | None = None

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    @property
    def final(self) -> Tensor:
        """[B, C, H, W] the sampled x_0."""
        return self.latents[:, -1]

    def select(self, index: Tensor | slice) -> Trajectory:
        """The trajectories of some samples (a PPO minibatch), all steps kept."""
        negative = None if self.negative_embeds is None else self.negative_embeds[index]
        unconditional = None if self.unconditional is None else self.unconditional[index]
        return replace(
            self,
            latents=self.latents[index],
            log_probs=self.log_probs[index],
            prompt_embeds=self.prompt_embeds[index],
            negative_embeds=negative,
            unconditional=unconditional,
        )


def guided_model_output(
    unet: UNet2DConditionModel,
    scheduler: DDIMScheduler,
    sample: Tensor,
    timestep: Tensor,
    prompt_embeds: Tensor,
    negative_embeds: Tensor | None,
    guidance: float,
) -> Tensor:
    """[B, C, H, W] the UNet's output at x_t, with classifier-free guidance as StableDiffusionPipeline does it.

    With negative_embeds the batch runs once as [unconditional; conditional] and the output is
    uncond + guidance * (cond - uncond); without, the conditional output alone (guidance must then be 1). At
    guidance 1 that sum is the conditional output, so the unconditional half is skipped (as the pipeline does).
    """
    return _guided(unet, scheduler, sample, timestep, prompt_embeds, negative_embeds, guidance)[0]


def _guided(
    unet: UNet2DConditionModel,
    scheduler: DDIMScheduler,
    sample: Tensor,
    timestep: Tensor,
    prompt_embeds: Tensor,
    negative_embeds: Tensor | None,
    guidance: float,
    unconditional: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """(guided output, the unconditional output or None when guidance is off): `guided_model_output`'s work.

    `unconditional`, the same frozen UNet's unconditional output at this (sample, timestep), is used instead of
    running the unconditional half again (`recompute_log_probs`).
    """
    if negative_embeds is None and guidance != 1.0:
        raise DppmgError(
            f"classifier-free guidance {guidance} needs negative (unconditional) prompt embeddings"
        )
    if negative_embeds is None or guidance == 1.0 or unconditional is not None:
        model_input = scheduler.scale_model_input(sample, timestep)
        cond = unet(model_input, timestep, encoder_hidden_states=prompt_embeds).sample
        if negative_embeds is None or guidance == 1.0:
            return cond, None
        return unconditional + guidance * (cond - unconditional), unconditional
    if torch.is_tensor(timestep) and timestep.ndim == 1 and timestep.numel() > 1:
        timestep = torch.cat([timestep, timestep])  # a timestep per sample, for both halves
    model_input = scheduler.scale_model_input(torch.cat([sample, sample]), timestep)
    states = torch.cat([negative_embeds, prompt_embeds])  # [2B, S, D]
    uncond, cond = unet(model_input, timestep, encoder_hidden_states=states).sample.chunk(2)
    return uncond + guidance * (cond - uncond), uncond


@torch.no_grad()
def sample_with_logprob(
    unet: UNet2DConditionModel,
    scheduler: DDIMScheduler,
    prompt_embeds: Tensor,
    negative_embeds: Tensor | None,
    *,
    steps: int,
    guidance: float,
    eta: float,
    shape: tuple[int, int, int],
    generator: Generator = None,
    keep_unconditional: bool = False,
) -> Trajectory:
    """Run stochastic DDIM from pure noise and record every step (a DDPO rollout, no gradients).

    Args:
        unet, scheduler: the image policy; the scheduler is set to `steps` timesteps here, as the pipeline does.
        prompt_embeds: [B, S, D] conditional text states; negative_embeds: [B, S, D] unconditional ones or None.
        steps, guidance, eta: DDIM steps, classifier-free guidance scale, noise weight in (0, 1].
        shape: (C, H, W) of one sample (pixels, or latents when the caller has a VAE).
        generator: the source of the initial noise and of every step's noise; a list of B generators makes each
            sample independent of the batch it is drawn in.
        keep_unconditional: record the unconditional outputs (with guidance), so that `recompute_log_probs`
            computes only the conditional half; valid while the UNet is frozen.
    """
    scheduler.set_timesteps(steps, device=prompt_embeds.device)
    batch = prompt_embeds.shape[0]
    x = randn_tensor(
        (batch, *shape), generator=generator, device=prompt_embeds.device, dtype=prompt_embeds.dtype
    )
    x = x * scheduler.init_noise_sigma
    latents, log_probs, unconditional = [x], [], []
    for t in scheduler.timesteps:
        output, uncond = _guided(unet, scheduler, x, t, prompt_embeds, negative_embeds, guidance)
        step = ddim_step_with_logprob(scheduler, output, t, x, eta, generator=generator)
        x = step.prev_sample
        latents.append(x)
        log_probs.append(step.log_prob)
        unconditional.append(uncond)
    kept = keep_unconditional and unconditional[0] is not None
    return Trajectory(
        latents=torch.stack(latents, dim=1),  # [B, T+1, C, H, W]
        log_probs=torch.stack(log_probs, dim=1),  # [B, T]
        timesteps=scheduler.timesteps.clone(),
        # Detached: a rollout is data, and keeping the text encoder's graph alive would only hold memory.
        prompt_embeds=prompt_embeds.detach(),
        negative_embeds=None if negative_embeds is None else negative_embeds.detach(),
        unconditional=torch.stack(unconditional, dim=1) if kept else None,  # [B, T, C, H, W]
    )


def recompute_log_prob(
    unet: UNet2DConditionModel,
    scheduler: DDIMScheduler,
    traj: Trajectory,
    step_index: int,
    guidance: float,
    eta: float,
    prompt_embeds: Tensor | None = None,
) -> Tensor:
    """float32 [B]: log p(x_{j+1} | x_j) of the stored step j under the current policy, with gradients.

    Gradients flow through the UNet and through `prompt_embeds`: pass the embeddings recomputed by the text
    encoder with the current (trainable) token parameters; None reuses the trajectory's stored ones.
    guidance and eta must be the rollout's for the ratio to start at 1.
    """
    if not 0 <= step_index < traj.num_steps:
        raise IndexError(f"step_index {step_index} is outside the trajectory's {traj.num_steps} steps")
    _match_timesteps(scheduler, traj)
    embeds = traj.prompt_embeds if prompt_embeds is None else prompt_embeds
    t = traj.timesteps[step_index]
    x_t, x_prev = traj.latents[:, step_index], traj.latents[:, step_index + 1]
    output = guided_model_output(unet, scheduler, x_t, t, embeds, traj.negative_embeds, guidance)
    return ddim_step_with_logprob(scheduler, output, t, x_t, eta, prev_sample=x_prev).log_prob


def recompute_log_probs(
    unet: UNet2DConditionModel,
    scheduler: DDIMScheduler,
    traj: Trajectory,
    guidance: float,
    eta: float,
    prompt_embeds: Tensor | None = None,
) -> Tensor:
    """float32 [B, T]: every stored step's log-probability under the current policy, with gradients, in one UNet
    call over B*T samples (a timestep per sample); `recompute_log_prob` for each j, to float rounding.

    When the trajectory kept its unconditional outputs, only the conditional half runs and the kept half is
    reused, which requires a frozen UNet (refused otherwise): the unconditional output is a function of x_t, t
    and the empty prompt, so the update cannot change it. The memory held for the backward pass is that of B*T
    conditional samples (one step at a time with both halves, kept for one backward, held 2*B*T).
    """
    _match_timesteps(scheduler, traj)
    b, steps = traj.log_probs.shape
    embeds = traj.prompt_embeds if prompt_embeds is None else prompt_embeds
    flat = (b * steps, *traj.latents.shape[2:])
    x_t = traj.latents[:, :-1].reshape(flat)  # row b*T + j is sample b at step j
    x_prev = traj.latents[:, 1:].reshape(flat)
    t = traj.timesteps.repeat(b)
    states = embeds.repeat_interleave(steps, dim=0)
    kept = None
    if traj.unconditional is not None:
        if any(p.requires_grad for p in unet.parameters()):
            raise DppmgError(
                "the trajectory's kept unconditional outputs are stale for a UNet that trains: sample it with "
                "keep_unconditional=False"
            )
        kept = traj.unconditional.reshape(flat)
    negative = traj.negative_embeds
    negative = None if negative is None else negative.repeat_interleave(steps, dim=0)
    output, _ = _guided(unet, scheduler, x_t, t, states, negative, guidance, unconditional=kept)
    log_prob = ddim_step_with_logprob(scheduler, output, t, x_t, eta, prev_sample=x_prev).log_prob
    return log_prob.reshape(b, steps)


def _match_timesteps(scheduler: DDIMScheduler, traj: Trajectory) -> None:
    """Set the scheduler to the trajectory's step count, and refuse a scheduler whose timesteps differ."""
    if scheduler.num_inference_steps != traj.num_steps:
        scheduler.set_timesteps(traj.num_steps, device=traj.latents.device)
    if not torch.equal(scheduler.timesteps.cpu(), traj.timesteps.cpu()):
        raise DppmgError(
            "the scheduler's timesteps differ from the trajectory's: score a trajectory with the scheduler "
            "configuration that sampled it"
        )


# ---------------------------------------------------------------------------------------------------------
# The PPO objective


def ppo_clip_loss(
    new_log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float, adv_clip_max: float
) -> tuple[Tensor, dict[str, float | bool]]:
    """DDPO's clipped surrogate for one step of a batch of trajectories; returns (loss, info).

    ratio = exp(new - old); loss = mean(max(-A ratio, -A clip(ratio, 1 - clip_range, 1 + clip_range))) with A
    clipped to [-adv_clip_max, adv_clip_max] (so no single outlier reward dominates a step).
    All inputs are [B]; only new_log_prob needs gradients. info: approx_kl = mean((new - old)^2) / 2, clipfrac =
    share of ratios outside the clip range, ratio_mean, and finite = whether every input and the loss are finite
    (a NaN/inf advantage or log-probability makes it False; the caller should skip that step, see all_finite).
    """
    if not new_log_prob.shape == old_log_prob.shape == advantages.shape:
        raise ValueError(
            f"log-probabilities and advantages must have one shape [B], got {tuple(new_log_prob.shape)}, "
            f"{tuple(old_log_prob.shape)} and {tuple(advantages.shape)}"
        )
    adv = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(new_log_prob - old_log_prob)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        info: dict[str, float | bool] = {
            "approx_kl": (0.5 * (new_log_prob - old_log_prob) ** 2).mean().item(),
            "clipfrac": ((ratio - 1).abs() > clip_range).float().mean().item(),
            "ratio_mean": ratio.mean().item(),
            "finite": all_finite(loss, new_log_prob, old_log_prob, advantages),
        }
    return loss, info


def all_finite(*tensors: Tensor) -> bool:
    """True when every element of every tensor is finite: the guard before an optimizer step (skip it if False)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)
