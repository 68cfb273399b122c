"""How far the image judge can move: real posters in place of generated ones, scored as generations are.

    .venv/bin/python benchmarks/judge_headroom.py [key=value ...]   (configs/movielens-posters.yaml; needs it prepared)

The issue's image target asks that personalized posters score above `none` on the EfficientNet judge
(`stage2_generation/judges.py`: mean cosine to the user's history posters). This script asks what any image
generator could gain there. For every user with a test item it puts in the generated image's place, at the
generation shape (stage2.generators.image_height × image_size) and through the same `ImageJudge`:

    random      a random catalogue poster (nothing known about the user; seeded)
    popular     a poster among the 50 most watched in train (a non-personalized generator that learned the catalogue)
    target      the test item's own poster (what fidelity rewards)
    liked       the user's validation item's poster: a movie the user watched next that is not in the history the
                judge compares with, i.e. a perfectly personalized poster

and prints each judge metric's mean and the paired differences (95 % bootstrap intervals over users) against
`random`. The gap `liked − random` is the headroom of a generator that knows the user's taste perfectly.

It does so for four variants of the judge (`ImageJudge.build`): the real posters encoded at full size or at the
generation shape (`reference`), and the cosine raw or in the catalogue-centred feature space (`centered`), and ends
with the headroom of each. That table is how the config's judge was chosen (BENCHMARKS.md).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "movielens-posters.yaml"
POPULAR = 50
# The judge's variants (`ImageJudge.build`): real images encoded at full size or at the generation shape, and the
# cosine taken raw or after centring on the catalogue's mean feature.
VARIANTS = [("full", False), ("full", True), ("shape", False), ("shape", True)]
JUDGE_ONLY = ("judge_history_last5", "judge_history_all", "judge_target")


def main(overrides: list[str]) -> None:
    from dppmg.bootstrap import bootstrap_mean, paired_difference
    from dppmg.config import load_config
    from dppmg.data.format import load_dataset
    from dppmg.data.prepare import prepare
    from stage2_generation.judges import IMAGE_JUDGE_METRICS, ImageJudge
    from stage2_generation.policy import Pair

    cfg = load_config(CONFIG, overrides)
    ds = load_dataset(prepare(cfg, progress=False))
    g = cfg.stage2.generators
    shape = (g.image_height or g.image_size, g.image_size)
    name = cfg.stage2.generation.image_judge
    inter = ds.interactions
    test = inter[inter["split"] == "test"].set_index("user_idx")["item_idx"]
    valid = inter[inter["split"] == "valid"].set_index("user_idx")["item_idx"]
    has_image = ds.items["image"].notna().to_numpy()
    users = [int(u) for u in test.index if u in valid.index]
    users = [u for u in users if has_image[test[u]] and has_image[valid[u]]]
    rng = np.random.default_rng(cfg.seed)
    with_image = np.flatnonzero(has_image)
    counts = np.bincount(ds.split("train")["item_idx"].to_numpy(), minlength=ds.num_items)
    popular = [i for i in np.argsort(-counts, kind="stable") if has_image[i]][:POPULAR]
    sources = {
        "random": rng.choice(with_image, size=len(users)),
        "popular": rng.choice(popular, size=len(users)),
        "target": np.array([test[u] for u in users]),
        "liked": np.array([valid[u] for u in users]),
    }
    pairs = [Pair(user=u, keywords="", item=int(test[u])) for u in users]
    summary = []
    for reference, centered in VARIANTS:
        start = time.perf_counter()
        judge = ImageJudge.build(
            ds, name, shape, REPO / "data" / "cache", progress=False, reference=reference, centered=centered
        )
        scores = {s: judge(pairs, judge.item_pixels[items]) for s, items in sources.items()}
        variant = f"reference={reference}, centered={centered}"
        print(
            f"== {variant}: {len(users)} users at {shape[0]}x{shape[1]} ({time.perf_counter() - start:.0f} s)\n"
        )
        print("| metric | " + " | ".join(sources) + " | "
              + " | ".join(f"{s} - random" for s in sources if s != "random") + " |")  # fmt: skip
        print("| --- " * (2 * len(sources)) + "|")
        metrics = IMAGE_JUDGE_METRICS if reference == "full" and not centered else JUDGE_ONLY
        for metric in metrics:
            means = [f"{bootstrap_mean(scores[s][metric]).mean:.4f}" for s in sources]
            diffs = []
            for s in sources:
                if s == "random":
                    continue
                d = paired_difference(scores[s][metric], scores["random"][metric])
                diffs.append(f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]")
                if s == "liked" and metric in JUDGE_ONLY[:2]:
                    summary.append((variant, metric, d, bootstrap_mean(scores["random"][metric]).mean))
            print(f"| {metric} | " + " | ".join(means) + " | " + " | ".join(diffs) + " |")
        print()
    print("== headroom (liked - random) per judge variant; z = mean / (interval half-width / 1.96)\n")
    print("| variant | metric | liked - random | z |")
    print("| --- | --- | --- | --- |")
    for variant, metric, d, _ in summary:
        z = d.mean / max((d.high - d.low) / (2 * 1.96), 1e-12)
        print(f"| {variant} | {metric} | {d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}] | {z:+.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
