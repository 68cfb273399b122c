"""Do a run's preference tokens say as much as the words their codes stand for? The tokens' gate check.

    .venv/bin/python benchmarks/probe_code_words.py [--seeds 2] [key=value ...]   (default world, after stage 2)

Stage 1's codes know the user (stage1/metrics.json: preference_recovery), and the warm-started generators follow
words placed before the target keywords (benchmarks/probe_text_hints.py). This asks whether the trained token rows
carry a code's meaning as well as plain words do. Each code (level l, index k) of a modality is named by the words
that set apart the items its users interacted with: the words of the training users' item texts ranked by lift,
P(word | items of users holding code (l, k)) / P(word | all items), seen at least 3 times. That uses nothing but
interactions and item texts, as real data allows. Then, for stage 2's held-out (user, target) pairs, each
modality's generator writes (or draws) with these prompts before the keywords:

    none              nothing (the non-personalized baseline)
    code words, top1  the top word of each of the user's codes (one word per level)
    code words, top2  the top two words of each code
    level 0, top3     the top three words of the user's level-0 code
    grounded / rl     the run's own tokens, after grounding and after RL

The attribute judge scores each (hit_text: style, material, room; hit_image: colour, pattern), averaged over the
seeds. Words beating tokens means the rows lose what the codes know. Synthetic world only (the judge needs the
ground-truth tastes).
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dppmg.config import load_config  # noqa: E402
from dppmg.errors import DppmgError  # noqa: E402
from stage2_generation.attributes import fit_judge, preference_hit_rates  # noqa: E402
from stage2_generation.code_words import code_words, item_words  # noqa: E402
from stage2_generation.evaluate import heldout_pairs, split_users  # noqa: E402
from stage2_generation.generators import generate_images, generate_texts  # noqa: E402
from stage2_generation.grounding import training_pairs  # noqa: E402
from stage2_generation.injection import load_injected  # noqa: E402
from stage2_generation.pipeline import GROUNDED_TOKENS_FILE, TOKENS_FILE, load_components  # noqa: E402
from stage2_generation.prompts import fill_prompt  # noqa: E402

# The word prompts: how many words of each code, and of which levels (None: all).
WORD_PROMPTS = {"code words, top1": (1, None), "code words, top2": (2, None), "level 0, top3": (3, {0})}
TOKEN_PROMPTS = {"grounded tokens": GROUNDED_TOKENS_FILE, "rl tokens": TOKENS_FILE}


def judged_world(cfg):
    """What the word probes share: stage 2's components, the attribute judge, the training interactions, the held-out
    pairs, and each item's words (lower-case, longer than 2 letters)."""
    c = load_components(cfg, progress=False)
    judge = fit_judge(c.ds, seed=cfg.seed)
    if judge is None:
        raise DppmgError(
            f"{c.ds.root}: no ground-truth tastes to judge by; this probe needs the synthetic world"
        )
    train_users, held_users = split_users(c.ds, cfg.stage2.generation.heldout_users, cfg.seed)
    words = item_words(c.ds.items["text"].tolist())
    return c, judge, training_pairs(c.ds, train_users), heldout_pairs(c.ds, held_users), words


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="key=value config overrides (run_name=... for another run)")
    args = ap.parse_args()
    cfg = load_config(REPO / args.config, ["tracking.mode=disabled", *args.overrides])
    c, judge, pool, pairs, words = judged_world(cfg)
    ds = c.ds
    users = ds.users.set_index("user_idx").loc[[p.user for p in pairs]]
    g, ws, stage2 = cfg.stage2.generation, cfg.stage2.warmstart, cfg.run_dir / "stage2"

    def score(modality: str, prompts: list[str]) -> float:
        hits = []
        for seed in range(args.seeds):
            if modality == "text":
                texts = generate_texts(
                    c.policy.gen.lm, c.policy.gen.lm_tokenizer, prompts, max_new_tokens=g.max_new_tokens,
                    temperature=g.temperature, seed=seed, batch_size=g.batch_size, progress=False,
                )  # fmt: skip
                hits.append(preference_hit_rates(judge, users, texts=texts)["hit_text"])
            else:
                images = generate_images(
                    c.policy.gen.pipe, prompts, steps=g.image_steps, guidance=g.guidance, seed=seed,
                    batch_size=g.batch_size, progress=False,
                )  # fmt: skip
                hits.append(preference_hit_rates(judge, users, images=images)["hit_image"])
        return float(np.mean(hits))

    print(
        f"== run {cfg.run_name}: {len(pairs)} held-out pairs, {args.seeds} seeds; attribute judge hit rates\n"
    )
    print("| prompt before the keywords | hit_text | hit_image | example (text, image) |")
    print("| --- | --- | --- | --- |")
    rows: dict[str, dict[str, tuple[float, str]]] = collections.defaultdict(dict)
    for modality in ("text", "image"):

        def codes_of(user: int, modality=modality) -> list[int]:
            return c.ckpt.codes[modality][c.ckpt.user_index(user)].tolist()

        named = code_words(pool, codes_of, words)
        template = ws.text_prompt if modality == "text" else ws.image_prompt

        def top(user: int, k: int, levels, codes_of=codes_of, named=named) -> list[str]:
            return [
                w
                for lv, code in enumerate(codes_of(user))
                if levels is None or lv in levels
                for w in named.get((lv, code), [])[:k]
            ]

        variants = {"none": [fill_prompt(template, p.keywords) for p in pairs]}
        for name, (k, levels) in WORD_PROMPTS.items():
            hints = [" ".join(dict.fromkeys(top(p.user, k, levels))) + " " for p in pairs]
            variants[name] = [fill_prompt(template, p.keywords, h) for p, h in zip(pairs, hints)]
        prompts_of = c.policy.text_prompts if modality == "text" else c.policy.image_prompts
        for name, file in TOKEN_PROMPTS.items():
            load_injected(stage2 / file, c.policy.injected)
            rows[name][modality] = (score(modality, prompts_of(pairs, True)), prompts_of(pairs[:1], True)[0])
        for name, prompts in variants.items():
            rows[name][modality] = (score(modality, prompts), prompts[0])
    for name in ("none", *WORD_PROMPTS, *TOKEN_PROMPTS):
        t, i = rows[name]["text"], rows[name]["image"]
        print(f"| {name} | {t[0]:.3f} | {i[0]:.3f} | `{t[1]}`, `{i[1]}` |", flush=True)


if __name__ == "__main__":
    main()
