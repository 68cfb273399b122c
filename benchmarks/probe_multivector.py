"""Multi-vector text tokens initialised from code words: can the text tokens reach the judge's hit_text target?

    .venv/bin/python benchmarks/probe_multivector.py [--config configs/default.yaml] [--seeds 3]
        [--steps 0,1000,3000] [--variants 0:3,0:5,0:7,0-1:3] [key=value ...]     (default world, after stage 2)

`benchmarks/probe_code_words.py` found that stage 1's text codes, spelt out as the words that set apart their users'
items, say more than the run's trained token rows (one row per code) do. This probe gives each text code of the
chosen levels as many rows as the BPE pieces of its top words (a multi-vector token, as textual inversion allows),
starts the rows at those pieces' embeddings, and grounds them with stage 2's own text grounding (`grounding.fit`
with `text_loss`, the typical interactions, the config's learning rate and batch). The words come from interactions
and item texts only (lift over the catalogue, `probe_code_words.code_words`), never from the judge. After 0, and
each count of `--steps` grounding steps, the warm-started LM writes texts for stage 2's held-out pairs and for 128
training interactions, and the attribute judge scores them (hit_text: style, material and room), averaged over
`--seeds` sampling seeds: the mean, its 95 % bootstrap interval over the pairs, and the paired difference to the
run's own tokens after RL on the same pairs and seeds, and, so that a gain does not come from losing the target,
how often the held-out texts name the target's category (target_hit_text). Synthetic world only (the judge needs the ground truth).
Nothing of the run is changed: the rows live in this process.

Code words are now the method (`stage2.text_code_words`; its rows are left out of text grounding by default): on
a run made with them, the reference row is that spelling after RL, and the variants compare other word counts,
levels and grounding lengths against it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from probe_code_words import judged_world  # noqa: E402  (a script's folder is on sys.path)

from dppmg.bootstrap import bootstrap_mean, paired_difference  # noqa: E402
from dppmg.config import load_config  # noqa: E402
from stage2_generation.code_words import code_words  # noqa: E402
from stage2_generation.evaluation.metrics import attribute_scores  # noqa: E402
from stage2_generation.generators import generate_texts  # noqa: E402
from stage2_generation.grounding import fit, text_loss, typical_pairs  # noqa: E402
from stage2_generation.injection import MASKED_LOGIT, load_injected  # noqa: E402
from stage2_generation.pipeline import TOKENS_FILE  # noqa: E402

# Which codes get rows and from how many words: "<levels>:<words>", levels as "0" or "0-1".
VARIANTS = "0:3,0:5,0:7,0-1:3"


def variants(spec: str) -> list[tuple[str, int, set[int]]]:
    """(name, words per code, levels) for each entry of a `--variants` string."""
    out = []
    for entry in spec.split(","):
        levels, words = entry.split(":")
        low, _, high = levels.partition("-")
        chosen = set(range(int(low), int(high or low) + 1))
        name = f"level{'s' if len(chosen) > 1 else ''} {levels.replace('-', '–')}, top {words} words"
        out.append((name, int(words), chosen))
    return out


class WordRows:
    """Free input rows for new token strings, starting at given embedding rows; a hook puts them in the LM, and their
    logits are masked so that generation never emits them."""

    def __init__(self, lm, tokenizer, strings: list[str], init: torch.Tensor):
        tokenizer.add_tokens(strings, special_tokens=True)
        self.first = tokenizer.convert_tokens_to_ids(strings[0])
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        self.rows = torch.nn.Parameter(init.clone())
        ids = torch.arange(self.first, self.first + len(strings))
        self.hook = lm.get_input_embeddings().register_forward_hook(self._embed)
        # The strings stay in the vocabulary after `remove`, with the table's random rows: their logits stay masked
        # for good, or a later variant's texts could sample them.
        lm.get_output_embeddings().register_forward_hook(
            lambda m, a, out: out.index_fill(-1, ids, MASKED_LOGIT)
        )

    def _embed(self, module, args, output):
        local = args[0] - self.first
        inside = (local >= 0) & (local < len(self.rows))
        if not bool(inside.any()):
            return output
        picked = self.rows[local.clamp(0, len(self.rows) - 1)].to(output.dtype)
        return torch.where(inside.unsqueeze(-1), picked, output)

    def remove(self) -> None:
        self.hook.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--variants", default=VARIANTS, help='codes and words, e.g. "0:3,0:5,0-1:3"')
    ap.add_argument(
        "--steps", default="0,1000,3000", help="grounding step counts to score at, comma-separated"
    )
    ap.add_argument("overrides", nargs="*", help="key=value config overrides (run_name=... for another run)")
    args = ap.parse_args()
    cfg = load_config(REPO / args.config, ["tracking.mode=disabled", *args.overrides])
    c, judge, pool, held, item_words = judged_world(cfg)
    ds, policy, ckpt = c.ds, c.policy, c.ckpt
    lm, tokenizer = policy.gen.lm, policy.gen.lm_tokenizer
    trained = [pool[i] for i in np.random.default_rng(cfg.seed).choice(len(pool), 128, replace=False)]
    texts = ds.items["text"]
    usable = typical_pairs(
        [p for p in pool if isinstance(texts.iat[p.item], str)],
        c.rewarder.item_text,
        cfg.stage2.grounding.typical_share,
    )
    g, gc = cfg.stage2.generation, cfg.stage2.grounding

    def codes_of(user: int) -> list[int]:
        return ckpt.codes["text"][ckpt.user_index(user)].tolist()

    def scores(pairs) -> dict[str, np.ndarray]:
        """hit_text and target_hit_text, float [pairs], each pair's mean over the seeds (`attribute_scores`)."""
        per_seed = []
        for seed in range(args.seeds):
            out = generate_texts(
                lm, tokenizer, [policy.text_prompts([p])[0] for p in pairs], max_new_tokens=g.max_new_tokens,
                temperature=g.temperature, seed=seed, batch_size=g.batch_size, progress=False,
            )  # fmt: skip
            per_seed.append(attribute_scores(judge, ds, pairs, out, None))
        return {m: np.mean([s[m] for s in per_seed], axis=0) for m in ("hit_text", "target_hit_text")}

    def line(name: str, extra: str, reference: np.ndarray | None = None) -> np.ndarray:
        """Score the text prompts `policy._tokens` makes now; print a row against `reference` (None: these
        scores themselves) and return the held-out hit_text per pair."""
        held_scores, train_scores = scores(held), scores(trained)
        h = held_scores["hit_text"]
        m = bootstrap_mean(h, seed=cfg.seed)
        d = paired_difference(h, h if reference is None else reference, seed=cfg.seed)
        star = "" if d.low > 0 or d.high < 0 else " (n.s.)"
        print(f"| {name} | {extra} | {m.mean:.3f} [{m.low:.3f}, {m.high:.3f}] | {d.mean:+.3f} [{d.low:+.3f}, "
              f"{d.high:+.3f}]{star} | {train_scores['hit_text'].mean():.3f} | "
              f"{held_scores['target_hit_text'].mean():.3f} |", flush=True)  # fmt: skip
        return h

    load_injected(cfg.run_dir / "stage2" / TOKENS_FILE, policy.injected)
    print(f"== run {cfg.run_name}: {len(held)} held-out pairs, 128 training interactions, {args.seeds} seeds; "
          f"grounding on {len(usable)} typical interactions, lr {gc.lr}, batch {gc.text_batch_size or gc.batch_size}\n")  # fmt: skip
    print("| text prompt | grounding steps (loss) | hit_text, held-out | − run's tokens | hit_text, training | "
          "target_hit_text, held-out |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    reference = line("the run's tokens after RL", "run's")
    named = code_words(pool, codes_of, item_words)
    original = policy._tokens
    for k, (name, words, levels) in enumerate(variants(args.variants)):
        pieces = {
            key: tokenizer(" " + " ".join(ws[:words]), add_special_tokens=False)["input_ids"]
            for key, ws in sorted(named.items())
            if key[0] in levels and ws
        }
        strings = {
            key: [f"<mv{k}_{key[0]}_{key[1]}_{j}>" for j in range(len(ids))] for key, ids in pieces.items()
        }
        embedding = lm.get_input_embeddings().weight.detach()
        rows = WordRows(
            lm, tokenizer, [s for key in pieces for s in strings[key]],
            torch.stack([embedding[i] for ids in pieces.values() for i in ids]),
        )  # fmt: skip

        def tokens(user: int, modality: str, personalized: bool = True, strings=strings) -> str:
            if modality != "text" or not personalized:
                return original(user, modality, personalized)
            return "".join(s for lv, code in enumerate(codes_of(user)) for s in strings.get((lv, code), []))

        policy._tokens = tokens
        label = f"{name}: {len(rows.rows)} rows for {len(pieces)} codes"
        done, loss = 0, "-"
        try:
            for steps in sorted({int(x) for x in args.steps.split(",")}):
                if steps > done:

                    def text_fn(picks, mine, _):
                        chosen = [usable[i] for i in picks[mine]]
                        return text_loss(
                            policy, chosen, [texts.iat[p.item] for p in chosen], gc.text_max_tokens or None
                        )

                    start = time.perf_counter()
                    stats = fit(
                        "text", text_fn, [rows.rows], len(usable), gc, steps - done,
                        gc.text_batch_size or gc.batch_size, cfg.seed + done, False,
                    )  # fmt: skip
                    loss = f"{stats['loss_first']:.3f} → {stats['loss_last']:.3f}, {time.perf_counter() - start:.0f} s"
                    done = steps
                line(label, f"{steps} ({loss})", reference)
        finally:
            policy._tokens = original
            rows.remove()


if __name__ == "__main__":
    main()
