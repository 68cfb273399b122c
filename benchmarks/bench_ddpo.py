"""The DDPO image update: every step of a minibatch in one UNet call, against one step at a time.

    .venv/bin/python benchmarks/bench_ddpo.py [--config configs/default.yaml] [--repeats 5] [key=value ...]

Builds the config's untrained tiny image pipeline (the cost of a UNet call does not depend on its weights), draws
one RL round's rollout (rl.pairs_per_round x rl.group_size trajectories of rl.image_steps stochastic DDIM steps at
the generation guidance), and times a PPO minibatch update (rl.minibatch_size trajectories, forward and backward
to the prompt states) two ways, alternating, in this process:

  reference   the loop stage 2 ran before: for each step, `recompute_log_prob` (both guidance halves), then one
              backward of the mean clipped loss
  batched     `recompute_log_probs`: all steps in one call, reusing the rollout's unconditional half

It prints the median seconds of each, their ratio, and how far the two disagree (log-probabilities, gradients).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dppmg.config import load_config
from stage2_generation.ddpo import ppo_clip_loss, recompute_log_prob, recompute_log_probs, sample_with_logprob
from stage2_generation.generators import build_tiny_image_pipeline
from stage2_generation.policy import sample_shape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("overrides", nargs="*")
    ns = ap.parse_args()
    cfg = load_config(ns.config, ns.overrides)
    rl, g, gen = cfg.stage2.rl, cfg.stage2.generation, cfg.stage2.generators
    torch.manual_seed(0)
    pipe = build_tiny_image_pipeline(["a small red lamp", "a wooden chair by the window"], gen)
    pipe.unet.requires_grad_(False)
    width = pipe.text_encoder.config.hidden_size
    n = rl.pairs_per_round * rl.group_size
    prompts = torch.randn(n, gen.text_encoder_max_length, width)
    negative = torch.randn(1, gen.text_encoder_max_length, width).expand_as(prompts)
    traj = sample_with_logprob(
        pipe.unet, pipe.scheduler, prompts, negative, steps=rl.image_steps, guidance=g.guidance, eta=rl.eta,
        shape=sample_shape(pipe), generator=torch.Generator().manual_seed(0), keep_unconditional=True,
    )  # fmt: skip
    part = traj.select(torch.arange(rl.minibatch_size))
    advantages = torch.randn(rl.minibatch_size, generator=torch.Generator().manual_seed(1))

    def reference() -> tuple[torch.Tensor, torch.Tensor]:
        states = part.prompt_embeds.clone().requires_grad_()
        news, losses = [], []
        for j in range(part.num_steps):
            new = recompute_log_prob(
                pipe.unet, pipe.scheduler, part, j, g.guidance, rl.eta, prompt_embeds=states
            )
            losses.append(
                ppo_clip_loss(new, part.log_probs[:, j], advantages, rl.clip_range, rl.adv_clip_max)[0]
            )
            news.append(new.detach())
        torch.stack(losses).mean().backward()
        return torch.stack(news, 1), states.grad

    def batched() -> tuple[torch.Tensor, torch.Tensor]:
        states = part.prompt_embeds.clone().requires_grad_()
        new = recompute_log_probs(pipe.unet, pipe.scheduler, part, g.guidance, rl.eta, prompt_embeds=states)
        adv = advantages.unsqueeze(1).expand_as(new)
        ppo_clip_loss(new.flatten(), part.log_probs.flatten(), adv.flatten(), rl.clip_range, rl.adv_clip_max)[
            0
        ].backward()
        return new.detach(), states.grad

    times: dict[str, list[float]] = {"reference": [], "batched": []}
    outputs = {}
    for k in range(ns.repeats + 1):  # the first pass of each warms up and is not counted
        for name, fn in (("reference", reference), ("batched", batched)):
            start = time.perf_counter()
            outputs[name] = fn()
            if k:
                times[name].append(time.perf_counter() - start)
    (ref_lp, ref_grad), (new_lp, new_grad) = outputs["reference"], outputs["batched"]
    med = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"DDPO minibatch update: {rl.minibatch_size} trajectories x {rl.image_steps} steps, guidance {g.guidance}, "
        f"image {tuple(sample_shape(pipe))}, {torch.get_num_threads()} threads, median of {ns.repeats}"
    )
    print(f"  reference (a step at a time, both halves)   {med['reference']:.3f} s")
    print(f"  batched (all steps, kept unconditional)     {med['batched']:.3f} s")
    print(f"  speed-up                                    {med['reference'] / med['batched']:.2f}x")
    rel = ((new_grad - ref_grad).norm() / ref_grad.norm()).item()
    print(
        f"  max |log-prob difference| {(new_lp - ref_lp).abs().max().item():.2e}; gradient relative difference {rel:.2e}"
    )


if __name__ == "__main__":
    main()
