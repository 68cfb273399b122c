"""How much of a finished stage 2's image-judge interval is the noise of drawing one image per pair?

    .venv/bin/python benchmarks/images_per_pair.py RUN_DIR/stage2 [--samples K] [key=value ...]

It loads the run as `make eval` does (its config, `stage2/config.yaml`, then the overrides, e.g. `data.root=...`
when the data lives elsewhere), draws K images for each held-out pair under `none`, the grounded tokens and the
tuned tokens, drawn as `stage2.generation.images_per_pair` draws them (`pipeline.more_images`; the first image is the
run's own), and scores each with the run's image judge. For k = 1, 2, 4, ..., K it prints
the paired differences rl − none, grounded − none and rl − grounded of every judge metric with each pair's scores
averaged over its first k images, and the interval's width: what `images_per_pair = k` would report on this run.
Only images are drawn (one text per pair does not change the image metrics), about 2-3 images a second on 2 cores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

CONTRASTS = (("rl", "none"), ("grounded", "none"), ("rl", "grounded"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage2", type=Path, help="a finished run's stage-2 folder (runs/<run>/stage2)")
    ap.add_argument("--samples", type=int, default=4, help="images per pair to draw (K)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args()

    import numpy as np

    from dppmg.bootstrap import paired_difference
    from dppmg.config import load_config
    from dppmg.errors import DppmgError
    from stage2_generation.evaluation.run import _open
    from stage2_generation.generators import generate_images
    from stage2_generation.injection import load_injected
    from stage2_generation.pipeline import (
        GROUNDED_TOKENS_FILE,
        TOKENS_FILE,
        mean_over_samples,
        more_images,
    )

    config = args.stage2 / "config.yaml"
    if not config.is_file():
        raise DppmgError(f"{config} not found: is {args.stage2} a stage-2 folder?")
    cfg = load_config(config, ["tracking.mode=disabled", "eval.max_pairs=0", *args.overrides])
    ev = _open(cfg, progress=False)
    if ev.judges.image is None:
        raise DppmgError(f"{args.stage2} has no image judge (stage2.generation.image_judge is null)")
    policy, g, pairs = ev.components.policy, cfg.stage2.generation, ev.pairs
    g.images_per_pair = args.samples
    n = len(pairs)
    print(f"== {n} held-out pairs of {args.stage2}, {args.samples} images each\n", flush=True)
    tokens = {"none": None, "grounded": args.stage2 / GROUNDED_TOKENS_FILE, "rl": args.stage2 / TOKENS_FILE}
    scores: dict[str, dict[str, np.ndarray]] = {}  # condition -> metric -> [K, pairs]
    for condition, file in tokens.items():
        if file is not None:
            load_injected(file, policy.injected)
        personalized = file is not None
        # The first image as stage 2's held-out generation draws it (pair k from noise (seed, k)), the others as
        # images_per_pair does.
        first = generate_images(
            policy.gen.pipe, policy.image_prompts(pairs, personalized), steps=g.image_steps, guidance=g.guidance,
            seed=cfg.seed, batch_size=g.batch_size, progress=False,
        )  # fmt: skip
        more, _ = more_images(policy, pairs, cfg, personalized, progress=False)
        runs = [ev.judges.image(pairs, images) for images in (first, *more)]
        print(f"  {condition}: {args.samples} images per pair scored", flush=True)
        scores[condition] = {m: np.stack([np.asarray(r[m], dtype=np.float64) for r in runs]) for m in runs[0]}
    ks = sorted({k for k in (1, 2, 4, 8, 16) if k <= args.samples} | {args.samples})
    print("\n| metric | contrast | " + " | ".join(f"{k} image(s): mean [95 %] (width)" for k in ks) + " |")
    print("| --- | --- |" + " --- |" * len(ks))
    for metric in scores["none"]:
        for a, b in CONTRASTS:
            cells = []
            for k in ks:
                mean_a, mean_b = (mean_over_samples(list(scores[c][metric][:k])) for c in (a, b))
                d = paired_difference(mean_a, mean_b, seed=cfg.seed)
                star = "" if d.low > 0 or d.high < 0 else " n.s."
                cells.append(f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]{star} ({d.high - d.low:.4f})")
            print(f"| {metric} | {a} − {b} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
