"""DDPO building blocks: the DDIM step's log-probability against DDIMScheduler.step, rollouts, the PPO loss."""

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor

from dppmg.errors import DppmgError
from stage2_generation.ddpo import (
    DDIMStepOutput,
    Trajectory,
    all_finite,
    ddim_step_with_logprob,
    gaussian_log_prob,
    guided_model_output,
    ppo_clip_loss,
    recompute_log_prob,
    recompute_log_probs,
    sample_with_logprob,
)

SHAPE = (3, 8, 8)  # (C, H, W) of one tiny pixel-space sample
BATCH = 3
STEPS = 5
SEQ, DIM = 4, 16  # prompt tokens, cross-attention width
GUIDANCE = 3.0
MATCH_TOL = 1e-5  # the bar for "matches the scheduler's own step"


def make_scheduler(**overrides) -> DDIMScheduler:
    # clip_sample defaults to True in DDIMScheduler; off unless a test asks, so that prediction types are compared raw.
    config = dict(num_train_timesteps=100, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    scheduler = DDIMScheduler(**(config | overrides))
    scheduler.set_timesteps(STEPS)
    return scheduler


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=DIM,
        norm_num_groups=4,
    )
    return model.eval()


def copy_of(unet: UNet2DConditionModel, trainable: bool) -> UNet2DConditionModel:
    copy = UNet2DConditionModel.from_config(unet.config).eval()
    copy.load_state_dict(unet.state_dict())
    return copy.requires_grad_(trainable)


def embeddings(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, SEQ, DIM, generator=g), torch.randn(BATCH, SEQ, DIM, generator=g)


def rollout(
    unet: UNet2DConditionModel, scheduler: DDIMScheduler, seed: int = 0, eta: float = 1.0
) -> Trajectory:
    prompt, negative = embeddings(seed)
    return sample_with_logprob(
        unet,
        scheduler,
        prompt,
        negative,
        steps=STEPS,
        guidance=GUIDANCE,
        eta=eta,
        shape=SHAPE,
        generator=torch.Generator().manual_seed(seed),
    )


# --- one step against DDIMScheduler.step ------------------------------------------------------------------


SCHEDULER_VARIANTS = {
    "epsilon": {"prediction_type": "epsilon"},
    "v_prediction": {"prediction_type": "v_prediction"},
    "sample": {"prediction_type": "sample"},
    "clip_sample": {"clip_sample": True},
    "thresholding": {
        "thresholding": True,
        "sample_max_value": 1.0,
    },  # how generators.py clips the tiny pipeline
    "thresholding_dynamic": {
        "thresholding": True,
        "sample_max_value": 3.0,
        "dynamic_thresholding_ratio": 0.9,
    },
}


@pytest.mark.parametrize("variant", list(SCHEDULER_VARIANTS))
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_step_matches_scheduler_step_for_the_same_noise(variant: str, eta: float):
    scheduler = make_scheduler(**SCHEDULER_VARIANTS[variant])
    g = torch.Generator().manual_seed(1)
    deviation = 0.0
    for i, t in enumerate(scheduler.timesteps):  # every step, including the last (a_prev = final alpha)
        # Scaled up so that x0 often leaves [-1, 1] and clipping/thresholding really act.
        model_output = 2 * torch.randn(BATCH, *SHAPE, generator=g)
        sample = 2 * torch.randn(BATCH, *SHAPE, generator=g)
        ours = ddim_step_with_logprob(
            scheduler, model_output, t, sample, eta, generator=torch.Generator().manual_seed(i)
        )
        # The same seed through the scheduler's generator, and the same noise passed as variance_noise.
        by_seed = scheduler.step(model_output, t, sample, eta=eta, generator=torch.Generator().manual_seed(i))
        noise = torch.randn(BATCH, *SHAPE, generator=torch.Generator().manual_seed(i))
        by_noise = scheduler.step(model_output, t, sample, eta=eta, variance_noise=noise)
        assert torch.equal(by_seed.prev_sample, by_noise.prev_sample)
        deviation = max(deviation, (ours.prev_sample - by_seed.prev_sample).abs().max().item())
        # Without noise the scheduler's step is our mean (eta enters only through sigma in the direction term).
        assert torch.allclose(ours.mean + ours.std * noise, by_noise.prev_sample, atol=MATCH_TOL)
    assert deviation < MATCH_TOL, f"max |x_prev - DDIMScheduler.step| = {deviation:.2e}"


def test_per_sample_timesteps_equal_the_shared_ones():
    scheduler = make_scheduler(prediction_type="v_prediction")
    g = torch.Generator().manual_seed(2)
    model_output, sample = torch.randn(BATCH, *SHAPE, generator=g), torch.randn(BATCH, *SHAPE, generator=g)
    prev = torch.randn(BATCH, *SHAPE, generator=g)
    ts = scheduler.timesteps[[0, 2, 4]]  # [B], a different timestep per sample (the last has a_prev = final)
    mixed = ddim_step_with_logprob(scheduler, model_output, ts, sample, 1.0, prev_sample=prev)
    for b, t in enumerate(ts.tolist()):
        alone = ddim_step_with_logprob(scheduler, model_output, t, sample, 1.0, prev_sample=prev)
        assert torch.allclose(mixed.mean[b], alone.mean[b], atol=1e-6)
        assert torch.allclose(mixed.log_prob[b], alone.log_prob[b], atol=1e-5)


def test_log_prob_is_the_normal_density_averaged_over_dimensions():
    scheduler = make_scheduler()
    g = torch.Generator().manual_seed(3)
    model_output, sample = torch.randn(BATCH, *SHAPE, generator=g), torch.randn(BATCH, *SHAPE, generator=g)
    t = scheduler.timesteps[1]
    step = ddim_step_with_logprob(scheduler, model_output, t, sample, 0.7, generator=g)
    assert isinstance(step, DDIMStepOutput)
    assert step.log_prob.shape == (BATCH,) and step.std.shape == (BATCH, 1, 1, 1)
    expected = torch.distributions.Normal(step.mean, step.std).log_prob(step.prev_sample).flatten(1).mean(1)
    assert torch.allclose(step.log_prob, expected, atol=1e-5)

    # Scoring a given x_prev gives the same number as drawing it; the mean itself is the most likely x_prev.
    again = ddim_step_with_logprob(scheduler, model_output, t, sample, 0.7, prev_sample=step.prev_sample)
    assert torch.allclose(again.log_prob, step.log_prob)
    at_mean = ddim_step_with_logprob(scheduler, model_output, t, sample, 0.7, prev_sample=step.mean).log_prob
    assert (at_mean > step.log_prob).all()
    for _ in range(5):
        nearby = step.mean + 0.01 * torch.randn(BATCH, *SHAPE, generator=g)
        assert (gaussian_log_prob(nearby, step.mean, step.std) < at_mean).all()


def test_a_step_without_noise_is_refused():
    g = torch.Generator().manual_seed(4)
    model_output, sample = torch.randn(BATCH, *SHAPE, generator=g), torch.randn(BATCH, *SHAPE, generator=g)
    scheduler = make_scheduler()
    for eta in (0.0, 1.5):
        with pytest.raises(DppmgError, match="0 < eta <= 1"):
            ddim_step_with_logprob(scheduler, model_output, scheduler.timesteps[0], sample, eta)
    # set_alpha_to_one=True makes a_prev = 1 at the last step: sigma = 0 there whatever eta is.
    scheduler = make_scheduler(set_alpha_to_one=True)
    with pytest.raises(DppmgError, match="set_alpha_to_one=False"):
        ddim_step_with_logprob(scheduler, model_output, scheduler.timesteps[-1], sample, 1.0)


# --- rollouts with a tiny UNet ----------------------------------------------------------------------------


def test_rollout_is_the_schedulers_own_sampling_loop(unet: UNet2DConditionModel):
    scheduler = make_scheduler()
    traj = rollout(unet, scheduler, seed=5)
    assert traj.latents.shape == (BATCH, STEPS + 1, *SHAPE)
    assert traj.log_probs.shape == (BATCH, STEPS) and traj.timesteps.shape == (STEPS,)
    assert torch.equal(traj.timesteps, scheduler.timesteps) and all_finite(traj.log_probs)

    # The same loop with DDIMScheduler.step and the same generator draws the same images.
    prompt, negative = embeddings(5)
    g = torch.Generator().manual_seed(5)
    x = randn_tensor((BATCH, *SHAPE), generator=g) * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            output = guided_model_output(unet, scheduler, x, t, prompt, negative, GUIDANCE)
            x = scheduler.step(output, t, x, eta=1.0, generator=g).prev_sample
    assert (traj.final - x).abs().max().item() < MATCH_TOL


def test_recomputed_log_probs_reproduce_the_rollout(unet: UNet2DConditionModel):
    scheduler = make_scheduler()
    traj = rollout(unet, scheduler, seed=6)
    scheduler.set_timesteps(STEPS + 2)  # recompute_log_prob must put the rollout's timesteps back
    for j in range(STEPS):
        new = recompute_log_prob(unet, scheduler, traj, j, GUIDANCE, eta=1.0)
        assert torch.allclose(new, traj.log_probs[:, j], atol=1e-5)
        _, info = ppo_clip_loss(
            new, traj.log_probs[:, j], torch.randn(BATCH), clip_range=1e-4, adv_clip_max=5.0
        )
        assert info["approx_kl"] < 1e-9 and abs(info["ratio_mean"] - 1) < 1e-5 and info["clipfrac"] == 0.0
        assert info["finite"]
    # A minibatch of the samples scores the same as the whole batch.
    part = traj.select(torch.tensor([2, 0]))
    sub = recompute_log_prob(unet, scheduler, part, 3, GUIDANCE, eta=1.0)
    assert torch.allclose(sub, traj.log_probs[[2, 0], 3], atol=1e-4)


@pytest.mark.parametrize("keep", [False, True])
def test_all_steps_at_once_equal_one_step_at_a_time(unet: UNet2DConditionModel, keep: bool):
    """recompute_log_probs (one UNet call over B*T samples; with `keep`, only the conditional half) gives the
    per-step log-probabilities, and the same gradient to the prompt embeddings, as recompute_log_prob step by step."""
    scheduler = make_scheduler()
    prompt, negative = embeddings(8)
    unet = copy_of(unet, trainable=False)  # as stage 2's UNet is
    traj = sample_with_logprob(
        unet, scheduler, prompt, negative, steps=STEPS, guidance=GUIDANCE, eta=1.0, shape=SHAPE,
        generator=torch.Generator().manual_seed(8), keep_unconditional=keep,
    )  # fmt: skip
    assert (traj.unconditional is not None) == keep
    if keep:
        assert traj.unconditional.shape == (BATCH, STEPS, *SHAPE)
    weights = torch.randn(BATCH, STEPS, generator=torch.Generator().manual_seed(9))

    one = prompt.clone().requires_grad_()
    per_step = torch.stack(
        [
            recompute_log_prob(unet, scheduler, traj, j, GUIDANCE, 1.0, prompt_embeds=one)
            for j in range(STEPS)
        ],
        1,
    )
    (per_step * weights).sum().backward()
    at_once = prompt.clone().requires_grad_()
    batched = recompute_log_probs(unet, scheduler, traj, GUIDANCE, 1.0, prompt_embeds=at_once)
    (batched * weights).sum().backward()

    assert batched.shape == (BATCH, STEPS)
    assert torch.allclose(batched, per_step, atol=1e-5)
    assert torch.allclose(batched, traj.log_probs, atol=1e-5)  # the first PPO ratio is 1
    assert one.grad.abs().sum() > 0
    assert torch.allclose(at_once.grad, one.grad, rtol=1e-3, atol=1e-6)
    # A minibatch keeps its own unconditional outputs.
    part = traj.select(torch.tensor([2, 0]))
    sub = recompute_log_probs(unet, scheduler, part, GUIDANCE, 1.0)
    assert torch.allclose(sub, traj.log_probs[[2, 0]], atol=1e-5)


def test_kept_unconditional_outputs_are_refused_for_a_unet_that_trains(unet: UNet2DConditionModel):
    prompt, negative = embeddings(10)
    traj = sample_with_logprob(
        unet, make_scheduler(), prompt, negative, steps=STEPS, guidance=GUIDANCE, eta=1.0, shape=SHAPE,
        keep_unconditional=True,
    )  # fmt: skip
    trained = copy_of(unet, trainable=True)
    with pytest.raises(DppmgError, match="keep_unconditional=False"):
        recompute_log_probs(trained, make_scheduler(), traj, GUIDANCE, 1.0)
    # Without kept outputs both halves run and the trainable UNet is scored as it is.
    fresh = sample_with_logprob(
        unet, make_scheduler(), prompt, negative, steps=STEPS, guidance=GUIDANCE, eta=1.0, shape=SHAPE,
        generator=torch.Generator().manual_seed(11),
    )  # fmt: skip
    assert torch.allclose(
        recompute_log_probs(trained, make_scheduler(), fresh, GUIDANCE, 1.0), fresh.log_probs, atol=1e-5
    )


def test_guidance_one_is_the_conditional_output_alone(unet: UNet2DConditionModel):
    prompt, negative = embeddings(0)
    scheduler = make_scheduler()
    scheduler.set_timesteps(STEPS)
    x = torch.randn(BATCH, *SHAPE, generator=torch.Generator().manual_seed(4))
    t = scheduler.timesteps[2]
    skipped = guided_model_output(unet, scheduler, x, t, prompt, negative, 1.0)
    conditional = guided_model_output(unet, scheduler, x, t, prompt, None, 1.0)
    assert torch.equal(skipped, conditional)
    guided = guided_model_output(unet, scheduler, x, t, prompt, negative, 1.0 + 1e-3)  # the full formula
    assert torch.allclose(guided, conditional, atol=1e-3) and not torch.equal(guided, conditional)


def test_guidance_without_negative_embeddings_is_refused(unet: UNet2DConditionModel):
    prompt, _ = embeddings(0)
    with pytest.raises(DppmgError, match="negative"):
        sample_with_logprob(
            unet, make_scheduler(), prompt, None, steps=STEPS, guidance=GUIDANCE, eta=1.0, shape=SHAPE
        )


# SGD step sizes that move the chosen log-probability by ~1e-3, far above float32 rounding: the untrained UNet
# barely attends to its prompt, so the gradient reaching the embeddings is ~200 times smaller than the UNet's.
LEARNING_RATES = {"unet": 1e-3, "prompt_embeds": 30.0}


@pytest.mark.parametrize("trained", list(LEARNING_RATES))
def test_a_positive_advantage_step_raises_that_samples_log_prob(unet: UNet2DConditionModel, trained: str):
    scheduler = make_scheduler()
    traj = rollout(unet, scheduler, seed=7)
    policy = copy_of(unet, trainable=trained == "unet")
    # The project trains the prompt's token rows, so gradients must also reach the prompt embeddings.
    embeds = torch.nn.Parameter(traj.prompt_embeds.clone(), requires_grad=trained == "prompt_embeds")
    params = list(policy.parameters()) if trained == "unet" else [embeds]
    optimizer = torch.optim.SGD(params, lr=LEARNING_RATES[trained])
    step, chosen = 2, 1
    advantages = torch.zeros(BATCH)
    advantages[chosen] = 1.0

    before = recompute_log_prob(policy, scheduler, traj, step, GUIDANCE, 1.0, prompt_embeds=embeds)
    loss, info = ppo_clip_loss(before, traj.log_probs[:, step], advantages, clip_range=0.2, adv_clip_max=5.0)
    assert info["finite"]
    optimizer.zero_grad()
    loss.backward()
    assert sum(p.grad.abs().sum().item() for p in params if p.grad is not None) > 0
    optimizer.step()
    with torch.no_grad():
        after = recompute_log_prob(policy, scheduler, traj, step, GUIDANCE, 1.0, prompt_embeds=embeds)
    assert after[chosen] - before[chosen].detach() > 1e-4


# --- the PPO loss ---------------------------------------------------------------------------------------------


def test_ppo_clip_loss_clips_the_ratio_and_the_advantages():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.0, 1.5, 0.5, 1.1])).requires_grad_()  # ratios 1, 1.5, 0.5, 1.1
    advantages = torch.tensor([1.0, 1.0, -1.0, 100.0])
    loss, info = ppo_clip_loss(new, old, advantages, clip_range=0.2, adv_clip_max=5.0)
    # Per sample: -1*1, -1*min(1.5, 1.2), -(-1)*max(0.5, 0.8), -5*1.1 (advantage 100 clipped to 5).
    assert loss.item() == pytest.approx((-1.0 - 1.2 + 0.8 - 5.5) / 4, abs=1e-6)
    assert info["clipfrac"] == 0.5 and info["ratio_mean"] == pytest.approx(1.025)
    assert info["approx_kl"] == pytest.approx(
        (0.5 * torch.log(torch.tensor([1.0, 1.5, 0.5, 1.1])) ** 2).mean().item()
    )
    loss.backward()
    # Samples whose ratio left the clip range in the advantage's direction get no gradient.
    assert new.grad[1] == 0 and new.grad[2] == 0 and new.grad[0] < 0 and new.grad[3] < 0


def test_a_nan_or_inf_advantage_is_reported_not_hidden():
    new = torch.zeros(3, requires_grad=True)
    for bad in (float("nan"), float("inf")):
        advantages = torch.tensor([1.0, bad, -1.0])
        loss, info = ppo_clip_loss(new, torch.zeros(3), advantages, clip_range=0.2, adv_clip_max=5.0)
        assert info["finite"] is False
        assert not all_finite(advantages)
    assert not all_finite(torch.tensor([float("nan")]).sum())  # a NaN loss is caught too
    assert all_finite(torch.zeros(2), torch.ones(3, 4))


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="one shape"):
        ppo_clip_loss(torch.zeros(3), torch.zeros(3), torch.zeros(2), clip_range=0.2, adv_clip_max=5.0)
