"""What can the image generator draw when it is told in words, and how much of it do the image tokens get?

    .venv/bin/python benchmarks/probe_image_words.py [--config configs/default.yaml] [--seeds 3] [--per-value 64]
        [key=value ...]                                                  (default world, after stage 2)

Held-out hit_image (the share of a user's true colour and pattern that the attribute judge sees in the generated
image) has a ceiling set by the generator, not by the tokens: a generator that cannot draw stripes cannot draw a
user's stripes. Two parts, both scored by the attribute judge (never by the reward):

    what it draws     for each colour and each pattern, `--per-value` prompts "<colour> <pattern word> <category>"
                      (the other two drawn at random), and the share in which the judge reads the asked value
    held-out pairs    stage 2's held-out (user, target) pairs drawn with these prompts before the keywords:
                      nothing (`none`), the user's true colour and pattern words (the ceiling of any prompt that
                      names them), either alone, the top code words of the user's level-0 image code (as
                      `stage2.image_code_words` starts its rows; interactions and item texts only), and the run's
                      own image tokens after RL; hit_image, its colour and pattern parts, and target_hit_image
                      (the target's category), each the mean over `--seeds` sampling seeds

Synthetic world only (the judge needs the ground truth). Nothing of the run is changed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from probe_code_words import judged_world  # noqa: E402  (a script's folder is on sys.path)

from dppmg.config import load_config  # noqa: E402
from dppmg.data.synthetic import CATEGORIES, SYNONYMS, VISUAL_ATTRIBUTES  # noqa: E402
from stage2_generation.attributes import ATTRIBUTE_PREFIX, TARGET_ATTRIBUTE, preference_hit_rates  # noqa: E402
from stage2_generation.code_words import code_words  # noqa: E402
from stage2_generation.generators import generate_images  # noqa: E402
from stage2_generation.injection import load_injected  # noqa: E402
from stage2_generation.pipeline import TOKENS_FILE  # noqa: E402
from stage2_generation.prompts import fill_prompt  # noqa: E402

CODE_WORDS = (3, 5)  # the level-0 code-word prompts: top 3 and top 5 words


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--per-value", type=int, default=64)
    ap.add_argument("overrides", nargs="*", help="key=value config overrides (run_name=... for another run)")
    args = ap.parse_args()
    cfg = load_config(REPO / args.config, ["tracking.mode=disabled", *args.overrides])
    c, judge, pool, pairs, words = judged_world(cfg)
    g = cfg.stage2.generation
    pipe = c.policy.gen.pipe

    def draw(prompts: list[str], seed: int) -> np.ndarray:
        return generate_images(
            pipe, prompts, steps=g.image_steps, guidance=g.guidance, seed=seed, batch_size=g.batch_size,
            progress=False,
        )  # fmt: skip

    print(
        f"== run {cfg.run_name}: what the image generator draws when told ({args.per_value} images a value)\n"
    )
    print("| attribute | asked | judge reads the asked value |")
    print("| --- | --- | --- |")
    rng = np.random.default_rng(0)
    colours, patterns = VISUAL_ATTRIBUTES["colour"], VISUAL_ATTRIBUTES["pattern"]
    for attribute, values in VISUAL_ATTRIBUTES.items():
        for value in values:
            n = args.per_value
            colour = [value] * n if attribute == "colour" else list(rng.choice(colours, n))
            pattern = [value] * n if attribute == "pattern" else list(rng.choice(patterns, n))
            prompts = [
                f"{a} {SYNONYMS['pattern'][b][0]} {rng.choice(CATEGORIES)}" for a, b in zip(colour, pattern)
            ]
            seen = np.asarray(judge.predict_images(draw(prompts, 0))[attribute], dtype=object)
            word = value if attribute == "colour" else SYNONYMS["pattern"][value][0]
            print(f"| {attribute} | {word} | {np.mean(seen == value):.2f} |", flush=True)

    users = c.ds.users.set_index("user_idx").loc[[p.user for p in pairs]]
    category = c.ds.items[f"{ATTRIBUTE_PREFIX}{TARGET_ATTRIBUTE}"].astype(str).to_numpy()
    truth = np.asarray([category[p.item] for p in pairs], dtype=object)
    codes = c.ckpt.codes["image"]
    named = code_words(pool, lambda user: codes[c.ckpt.user_index(user)].tolist(), words)
    colour = users["pref_image_colour"].astype(str).tolist()
    pattern = [SYNONYMS["pattern"][v][0] for v in users["pref_image_pattern"].astype(str)]
    template = cfg.stage2.warmstart.image_prompt

    def hinted(hints: list[str]) -> list[str]:
        return [fill_prompt(template, p.keywords, h + " " if h else "") for p, h in zip(pairs, hints)]

    variants = {
        "none": hinted([""] * len(pairs)),
        "the true colour and pattern": hinted([f"{a} {b}" for a, b in zip(colour, pattern)]),
        "the true colour": hinted(colour),
        "the true pattern": hinted(pattern),
    }
    for k in CODE_WORDS:
        level0 = [named.get((0, int(codes[c.ckpt.user_index(p.user), 0])), [])[:k] for p in pairs]
        variants[f"level-0 code words, top {k}"] = hinted([" ".join(w) for w in level0])
    load_injected(cfg.run_dir / "stage2" / TOKENS_FILE, c.policy.injected)
    variants["the run's image tokens after RL"] = c.policy.image_prompts(pairs, True)

    print(f"\n== {len(pairs)} held-out pairs, {args.seeds} seeds\n")
    print("| prompt | hit_image | colour | pattern | target_hit_image | example |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, prompts in variants.items():
        rows = []
        for seed in range(args.seeds):
            images = draw(prompts, seed)
            hits = preference_hit_rates(judge, users, images=images)
            target = np.mean(
                np.asarray(judge.predict_images(images)[TARGET_ATTRIBUTE], dtype=object) == truth
            )
            rows.append((hits["hit_image"], hits["hit_image_colour"], hits["hit_image_pattern"], target))
        m = np.mean(rows, axis=0)
        print(f"| {name} | {m[0]:.3f} | {m[1]:.3f} | {m[2]:.3f} | {m[3]:.3f} | `{prompts[0]}` |", flush=True)


if __name__ == "__main__":
    main()
