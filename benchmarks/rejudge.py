"""Score a finished stage 2's saved posters again, with every variant of the image judge.

    .venv/bin/python benchmarks/rejudge.py RUN_DIR/stage2 [key=value ...]

Stage 2 writes each held-out generation to `generations/<condition>/<user>.png` and its scores to
`generations/generations.jsonl`. This script reads them back, with the run's own config (`stage2/config.yaml`,
then the overrides, e.g. `data.root=...` when the data lives elsewhere), and scores the same images through the
four variants of `ImageJudge` that `judge_headroom.py` compares (real posters at full size or at the generation
shape; raw or catalogue-centred cosines). It prints each judge metric's `rl − none`, `grounded − none` and
`rl − grounded`, paired over the pairs with 95 % bootstrap intervals, so that a change of judge can be seen on the
same generations instead of on a new run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = [("full", False), ("full", True), ("shape", False), ("shape", True)]
METRICS = ("judge_history_last5", "judge_history_all", "judge_target")
CONTRASTS = (("rl", "none"), ("grounded", "none"), ("rl", "grounded"))


def main(stage2: Path, overrides: list[str]) -> None:
    from dppmg.bootstrap import paired_difference
    from dppmg.config import load_config
    from dppmg.data.format import load_dataset
    from dppmg.data.imageio import load_image_array
    from dppmg.errors import DppmgError
    from stage2_generation.judges import ImageJudge
    from stage2_generation.policy import Pair

    rows_path = stage2 / "generations" / "generations.jsonl"
    if not rows_path.is_file():
        raise DppmgError(f"{rows_path} not found: is {stage2} a finished stage 2?")
    cfg = load_config(stage2 / "config.yaml", overrides)
    ds = load_dataset(Path(cfg.data.root) / "processed" / cfg.data.name, features=True)
    item_of = {str(i): int(k) for i, k in zip(ds.items["item_id"], ds.items["item_idx"])}
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    by_condition: dict[str, dict[int, dict]] = {}
    for r in rows:
        by_condition.setdefault(r["condition"], {})[int(r["user_idx"])] = r
    users = sorted(set.intersection(*(set(v) for v in by_condition.values())))
    g = cfg.stage2.generators
    shape = (g.image_height or g.image_size, g.image_size)
    # Each row's images: one, or K with stage2.generation.images_per_pair = K (scores are means over them).
    first = next(iter(by_condition.values()))
    samples = len(names(first[users[0]]))
    images = {
        c: [
            load_image_array([stage2 / "generations" / names(v[u])[s] for u in users], shape, progress=False)
            for s in range(samples)
        ]
        for c, v in by_condition.items()
    }
    pairs = [Pair(user=u, keywords="", item=item_of[str(first[u]["target_item_id"])]) for u in users]
    print(f"== {len(users)} pairs of {stage2}, {samples} image(s) each, generated at {shape[0]}x{shape[1]}\n")
    print("| judge | metric | " + " | ".join(f"{a} − {b}" for a, b in CONTRASTS) + " |")
    print("| --- | --- |" + " --- |" * len(CONTRASTS))
    for reference, centered in VARIANTS:
        judge = ImageJudge.build(
            ds, cfg.stage2.generation.image_judge or "efficientnet-lite0", shape, cfg.features.cache_dir,
            progress=False, reference=reference, centered=centered,
        )  # fmt: skip
        scores = {
            c: mean_scores([judge(pairs, x) for x in images[c]]) for c in images
        }  # over a pair's images
        for metric in METRICS:
            cells = []
            for a, b in CONTRASTS:
                d = paired_difference(scores[a][metric], scores[b][metric])
                star = "" if d.low > 0 or d.high < 0 else " (n.s.)"
                cells.append(f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]{star}")
            name = f"{reference}, {'centred' if centered else 'raw'}"
            print(f"| {name} | {metric} | " + " | ".join(cells) + " |", flush=True)


def names(row: dict) -> list[str]:
    """A generations.jsonl row's image files (rows written before images_per_pair list only `image`)."""
    return row.get("images") or [row["image"]]


def mean_scores(runs: list[dict]) -> dict:
    """Per pair, each metric's mean over a pair's images, as stage 2 averages them."""
    from stage2_generation.pipeline import mean_over_samples

    return {m: mean_over_samples([r[m] for r in runs]) for m in runs[0]}


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), sys.argv[2:])
