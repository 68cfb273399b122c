"""Does the warm-started LM write the words placed before the keywords? The text side's gate check.

    .venv/bin/python benchmarks/probe_text_hints.py [--variants 2,3,1000 6,3,3000] [key=value ...]

The user's text tokens sit before the target keywords in the LM's prompt ("<pt..> lamp:"). Tokens injected into a
frozen LM can only steer it if the LM has learned to carry what stands there into what it writes; the warm-start's
hint copies teach that (`stage2.warmstart.text_hint_copies`). So, for each variant (hint copies, hint words, text
steps), this warm-starts the LM on the default world's items (as `dppmg stage2` would, without the cache), then
writes a text for each of stage 2's held-out (user, target) pairs twice: with the target keywords alone, and with
the user's true preferred style, material and room words before them (the oracle hint, the most a perfect token
could say). The attribute judge reads each text's style, material and room; hit_text is the share that match the
user's preferences, as `make eval` reports it (chance about 0.18). Needs the processed default world (`make data`);
each variant takes well under a minute of training on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dppmg.config import load_config  # noqa: E402
from dppmg.data.format import load_dataset  # noqa: E402
from dppmg.data.prepare import prepare  # noqa: E402
from dppmg.scorer import Scorer  # noqa: E402
from stage2_generation.attributes import TEXT_PREFERENCE_PREFIX, fit_judge, preference_hit_rates  # noqa: E402
from stage2_generation.evaluate import heldout_pairs, split_users  # noqa: E402
from stage2_generation.generators import build_generators, generate_texts  # noqa: E402
from stage2_generation.prompts import fill_prompt, target_separator  # noqa: E402
from stage2_generation.warmstart import (  # noqa: E402
    text_warmstart_examples,
    tokenizer_corpus,
    train_text_warmstart,
)

ATTRIBUTES = ("style", "material", "room")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument(
        "--variants", nargs="+", default=["2,3,1000", "6,3,3000"], help="hint copies,hint words,text steps"
    )
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args()
    cfg = load_config(REPO / args.config, ["tracking.mode=disabled", *args.overrides])
    ds = load_dataset(prepare(cfg, progress=False))
    judge = fit_judge(ds, seed=cfg.seed)
    _, held = split_users(ds, cfg.stage2.generation.heldout_users, cfg.seed)
    pairs = heldout_pairs(ds, held)
    users = ds.users.set_index("user_idx").loc[[p.user for p in pairs]]
    truth = {a: users[f"{TEXT_PREFERENCE_PREFIX}{a}"].astype(str).to_numpy() for a in ATTRIBUTES}
    oracle = [" ".join(truth[a][k] for a in ATTRIBUTES) + " " for k in range(len(pairs))]
    scorer = Scorer.load(ds.root / "scorer", cfg.stage2.generators.device)
    ws, g = cfg.stage2.warmstart, cfg.stage2.generation

    print(f"== {len(pairs)} held-out pairs; hit_text with the keywords alone and with the oracle hint\n")
    print(
        "| hint copies | hint words | text steps | seconds | last loss | hit_text, keywords | hit_text, oracle hint |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for spec in args.variants:
        copies, words, steps = (int(x) for x in spec.split(","))
        gen = build_generators(
            cfg.stage2.generators, tokenizer_corpus(ds.items), seed=cfg.seed, scorer=scorer
        )
        examples = text_warmstart_examples(ds.items, ws.text_prompt, copies, words, cfg.seed)
        start = time.perf_counter()
        stats = train_text_warmstart(
            gen.lm, gen.lm_tokenizer, examples, steps, ws.batch_size, ws.lr_text, cfg.seed, False,
            max_grad_norm=ws.max_grad_norm, warmup=ws.warmup, separator=target_separator(ws),
        )  # fmt: skip
        seconds = time.perf_counter() - start
        cells = []
        for hint in ([""] * len(pairs), oracle):
            prompts = [fill_prompt(ws.text_prompt, p.keywords, h) for p, h in zip(pairs, hint)]
            texts = generate_texts(
                gen.lm, gen.lm_tokenizer, prompts, max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                seed=cfg.seed, progress=False,
            )  # fmt: skip
            h = preference_hit_rates(judge, users, texts=texts)
            per_attribute = ", ".join(f"{a} {h[f'hit_text_{a}']:.2f}" for a in ATTRIBUTES)
            cells.append(f"{h['hit_text']:.3f} ({per_attribute})")
        row = [copies, words, steps, f"{seconds:.0f}", f"{stats['loss_last']:.3f}", *cells]
        print("| " + " | ".join(str(c) for c in row) + " |", flush=True)
        print(f"   e.g. {prompts[0]!r} -> {texts[0]!r}", file=sys.stderr)


if __name__ == "__main__":
    main()
