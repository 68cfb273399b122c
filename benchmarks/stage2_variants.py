"""Stage-2 variants from one grounded state: RL and generation settings compared on the held-out pairs.

    .venv/bin/python benchmarks/stage2_variants.py NAME [--config configs/default.yaml] [--seeds 0,1,2] [key=value ...]

Needs stage 1's tokens for the run (`dppmg stage1 ... run_name=...`). Grounds once per grounding config (the grounded
token parameters are cached in `<run>/variants/`), evaluates `none` and `grounded` once per generation config and
reward weights, then runs `stage2.rl.iterations` RL iterations with the given settings and evaluates again. Every
evaluation generates for the held-out pairs with each of `--seeds` and averages, so a difference of ~0.01 between
variants is above the sampling noise of one 64-pair evaluation. Prints one JSON line per variant and appends it to
`<run>/variants/results.jsonl`, with the gains of `stage2/metrics.json` computed the same way.

This is how the RL learning rates, the typical share and the guidance scale of the defaults were chosen
(BENCHMARKS.md, "Stage 2"). It does not write a stage-2 run; `dppmg stage2` with the chosen keys does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time

import torch
from diffusers.utils import logging as diffusers_logging
from targets import issue_targets
from transformers.utils import logging as transformers_logging

from dppmg.config import load_config, to_dict
from dppmg.io import atomic_path
from dppmg.seeding import seed_everything
from stage2_generation.evaluate import heldout_pairs, split_users
from stage2_generation.grounding import ground, training_pairs
from stage2_generation.pipeline import generate_pairs, load_components
from stage2_generation.rewards import summarise
from stage2_generation.rl import make_optimizers, rl_iteration


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _seeds(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 0,1,2, got {text!r}"
        ) from None


def main() -> None:
    # Quiet as `dppmg` is: no transformers/diffusers notices or loading bars.
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", help="a label for this variant in results.jsonl")
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument(
        "--seeds",
        type=_seeds,
        default=[0, 1, 2],
        help="generation seeds to average over, comma-separated (0,1,2)",
    )
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    ns = ap.parse_intermixed_args()  # options may come before, between or after the overrides
    cfg = load_config(ns.config, ns.overrides)
    seed_everything(cfg.seed)
    c = load_components(cfg, progress=False)
    policy, rewarder, ds, s2 = c.policy, c.rewarder, c.ds, cfg.stage2
    train, held = split_users(ds, s2.generation.heldout_users, cfg.seed)
    pairs, pool = heldout_pairs(ds, held), training_pairs(ds, train)

    def evaluate(personalized: bool) -> dict[str, float]:
        results = []
        for seed in ns.seeds:
            texts, images, *_ = generate_pairs(policy, pairs, cfg, personalized, progress=False, seed=seed)
            results.append(rewarder(pairs, texts, images))
        return summarise(results)

    folder = cfg.run_dir / "variants"
    folder.mkdir(parents=True, exist_ok=True)
    tokens = c.ckpt.digest()
    grounded_file = folder / f"grounded-{_key(to_dict(s2.grounding), tokens, cfg.seed, len(held))}.pt"
    if grounded_file.is_file():
        for inj in policy.injected:
            inj.module.load_state_dict(torch.load(grounded_file)[inj.modality])
    else:
        ground(
            policy, ds, pool, s2.grounding, cfg.seed, False,
            item_text_emb=rewarder.item_text, item_image_emb=rewarder.item_image,
        )  # fmt: skip
        with atomic_path(grounded_file) as tmp:
            torch.save({inj.modality: inj.module.state_dict() for inj in policy.injected}, tmp)
    evals_file = (
        folder
        / f"evals-{_key(grounded_file.name, to_dict(s2.generation), dict(s2.rl.weights), ns.seeds)}.json"
    )
    if evals_file.is_file():
        before = json.loads(evals_file.read_text())
    else:
        before = {"none": evaluate(False), "grounded": evaluate(True)}
        with atomic_path(evals_file) as tmp:
            tmp.write_text(json.dumps(before))

    rl = s2.rl
    optimizers = make_optimizers(policy, rl)
    start = time.perf_counter()
    for it in range(rl.iterations):
        for m, log in rl_iteration(
            policy, rewarder, pool, rl, s2.generation, optimizers, cfg.seed, it
        ).items():
            print(
                f"iteration {it + 1} {m}: reward {log.reward:.3f}, {log.updates} updates, KL {log.approx_kl:.3f}"
            )
    seconds = time.perf_counter() - start
    after = evaluate(True) if rl.iterations else before["grounded"]
    gains = issue_targets({**before, "rl": after})
    row = {
        "name": ns.name,
        "overrides": ns.overrides,
        "seeds": ns.seeds,
        "rl_seconds": round(seconds, 1),
        **{cond: {k: round(v, 4) for k, v in m.items()} for cond, m in {**before, "rl": after}.items()},
        "gains": {k: {"value": round(v["value"], 4), "met": v["met"]} for k, v in gains.items()},
    }
    line = json.dumps(row)
    print(line)
    with (folder / "results.jsonl").open("a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    main()
