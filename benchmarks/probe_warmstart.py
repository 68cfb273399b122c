"""Does the warm-started image generator follow descriptive words? The check that gates stage 2's image tokens.

    .venv/bin/python benchmarks/probe_warmstart.py [--variants scorer,new] [--steps 750] [key=value ...]

Tokens injected into a frozen generator can only steer what the generator already responds to. So, for each
variant of the tiny image pipeline, this warm-starts it on the default world's items (as `dppmg stage2` would,
without the cache) and prompts it with "<colour> <pattern> <category>" for every colour, pattern and category
in turn. The attribute judge (`stage2_generation/attributes.py`, trained on the catalogue's pixels) then says how
often each image shows the colour, pattern and category asked for; chance is 1/8, 1/4 and 1/6.

Variants (GeneratorConfig switches):
  scorer  the text encoder is a frozen copy of the dataset's scorer text tower (the default)
  new     a new text encoder trained with the UNet
Both use the default UNet (with the pooled prompt added to the time embedding). Needs `make stage1` (or at least
`make data`) for the processed world and its scorer; each variant takes about 5-6 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dppmg.config import load_config  # noqa: E402
from dppmg.data.format import load_dataset  # noqa: E402
from dppmg.data.prepare import prepare  # noqa: E402
from dppmg.data.synthetic import SYNONYMS  # noqa: E402
from dppmg.scorer import Scorer  # noqa: E402
from stage2_generation.attributes import AttributeJudge  # noqa: E402
from stage2_generation.generators import build_generators, generate_images  # noqa: E402
from stage2_generation.warmstart import tokenizer_corpus, warm_start_images  # noqa: E402

VARIANTS = {"scorer": {"text_encoder_from_scorer": True}, "new": {"text_encoder_from_scorer": False}}


def probe_prompts(categories: list[str]) -> tuple[list[str], list[tuple[str, str, str]]]:
    """One prompt per (colour, pattern) cell, cycling through the categories: (prompts, (category, colour, pattern))."""
    prompts, truth = [], []
    for k, (colour, pattern) in enumerate(
        (c, p) for p in SYNONYMS["pattern"] for c in SYNONYMS["colour"] for _ in range(3)
    ):
        category = categories[k % len(categories)]
        prompts.append(f"{SYNONYMS['colour'][colour][0]} {SYNONYMS['pattern'][pattern][0]} {category}")
        truth.append((category, colour, pattern))
    return prompts, truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    parser.add_argument("--variants", default="scorer,new")
    parser.add_argument(
        "--steps", type=int, default=None, help="image warm-start steps (default: the config's)"
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    ds = load_dataset(prepare(cfg, progress=False))
    if "attr_colour" not in ds.items.columns:
        raise SystemExit(f"{ds.root}: no ground-truth attributes; this probe needs the synthetic world")
    scorer = Scorer.load(ds.root / "scorer")
    judge = AttributeJudge.fit(ds, seed=cfg.seed)
    ws = cfg.stage2.warmstart
    steps = ws.image_steps if args.steps is None else args.steps
    prompts, truth = probe_prompts(sorted(ds.items["attr_category"].unique()))
    rows = []
    for name in args.variants.split(","):
        gen_cfg = dataclasses.replace(cfg.stage2.generators, **VARIANTS[name])
        torch.manual_seed(cfg.seed)
        gen = build_generators(gen_cfg, tokenizer_corpus(ds.items), seed=cfg.seed, scorer=scorer)
        start = time.perf_counter()
        stats = warm_start_images(gen, ds, gen_cfg, dataclasses.replace(ws, image_steps=steps), cfg.seed)
        seconds = time.perf_counter() - start
        g = cfg.stage2.generation
        made = generate_images(gen.pipe, prompts, steps=g.image_steps, guidance=g.guidance, seed=cfg.seed)
        judged = judge.predict_images(made)
        acc = {
            attr: float(np.mean([judged[attr][i] == t[j] for i, t in enumerate(truth)]))
            for j, attr in enumerate(("category", "colour", "pattern"))
        }
        rows.append((name, stats["loss_last"], seconds, acc))
    print(
        f"\n{len(prompts)} prompts '<colour> <pattern> <category>'; judge accuracy (chance 0.17 / 0.125 / 0.25)"
    )
    print(f"{'variant':8} {'loss':>7} {'seconds':>8} {'category':>9} {'colour':>7} {'pattern':>8}")
    for name, loss, seconds, acc in rows:
        print(
            f"{name:8} {loss:7.4f} {seconds:8.0f} {acc['category']:9.3f} {acc['colour']:7.3f} {acc['pattern']:8.3f}"
        )


if __name__ == "__main__":
    main()
