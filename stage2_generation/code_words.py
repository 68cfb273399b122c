"""Code words: the words that set apart the items of the users holding a code, and the text tokens spelt with them.

A code (level l, index k) of a modality is named by the words of its users' item texts ranked by lift,

    lift(w) = P(w | items of the training users holding (l, k)) / P(w | all training interactions),

among words seen at least MIN_COUNT times with the code. Nothing but interactions and item texts goes in, so it
works on real data as on the synthetic world, and never looks at a judge.

Stage 2 uses them to start the tokens (`stage2.text_code_words`, `stage2.image_code_words`): each level-0 code
becomes several token rows, one per piece of its top words in the generator's tokenizer, started at those pieces'
embeddings, the multi-vector tokens of textual inversion (Gal et al., 2022, as diffusers' `load_textual_inversion`
loads them). RL then trains the rows.
A single row per code, started from a projection of the codebook, carried less of the code than its words do:
`make eval`'s held-out hit_text 0.280 against 0.495 for five code words' pieces (benchmarks/probe_code_words.py,
benchmarks/probe_multivector.py; BENCHMARKS.md, "Text tokens spelt with code words: the method").
"""

from __future__ import annotations

import collections
import itertools
import re
from collections.abc import Callable, Sequence

from transformers import PreTrainedTokenizerBase

MIN_COUNT = 3  # a word names a code only if it occurs at least this often among the code's users' items
WORD_PATTERN = re.compile(r"[a-z]+")
MIN_LETTERS = 3  # shorter words ("a", "of", "in") name nothing


def item_words(texts: Sequence[object]) -> list[set[str]]:
    """Each item's words: lower-case runs of letters of at least MIN_LETTERS (a missing text has none)."""
    return [
        {w for w in WORD_PATTERN.findall(t.lower()) if len(w) >= MIN_LETTERS} if isinstance(t, str) else set()
        for t in texts
    ]


def code_words(
    pairs: Sequence,
    codes_of: Callable[[int], list[int]],
    words: Sequence[set[str]],
    min_count: int = MIN_COUNT,
) -> dict[tuple[int, int], list[str]]:
    """(level, code) -> its words, the most distinctive first, from interactions with `.user` and `.item`.

    `codes_of(user)` is the user's code at each level; `words[item]` the item's words. Lift is smoothed
    ((c + 0.5) / (n + 1) over (overall + 1) / (total + 1)); ties go to the word that sorts first, so the result does
    not depend on set order.
    """
    overall: collections.Counter[str] = collections.Counter()
    per_code: dict[tuple[int, int], collections.Counter[str]] = collections.defaultdict(collections.Counter)
    items_per_code: collections.Counter[tuple[int, int]] = collections.Counter()
    for p in pairs:
        item = words[p.item]
        overall.update(item)
        for level, code in enumerate(codes_of(p.user)):
            per_code[level, code].update(item)
            items_per_code[level, code] += 1
    total = len(pairs)
    named = {}
    for key, counts in per_code.items():
        n = items_per_code[key]
        lift = {
            w: (c + 0.5) / (n + 1) / ((overall[w] + 1) / (total + 1))
            for w, c in counts.items()
            if c >= min_count
        }
        named[key] = sorted(lift, key=lambda w: (-lift[w], w))
    return named


def level0_pieces(
    named: dict[tuple[int, int], list[str]], tokenizer: PreTrainedTokenizerBase, count: int
) -> dict[int, list[int]]:
    """Level-0 code -> the tokenizer's ids of " w1 w2 ... w_count" (its top words, as a prompt would hold them).

    A word the tokenizer can only spell with its unknown token (a word-level vocabulary without it, as the tiny
    image pipeline's text encoder has) is passed over for the next one. Codes without words are left out: they
    keep their single token.
    """
    unk = tokenizer.unk_token_id

    def known(word: str) -> bool:
        return unk is None or unk not in tokenizer(" " + word, add_special_tokens=False)["input_ids"]

    pieces = {}
    for (level, code), ranked in sorted(named.items()):
        chosen = list(itertools.islice(filter(known, ranked), count)) if level == 0 else []
        if chosen:
            pieces[code] = list(tokenizer(" " + " ".join(chosen), add_special_tokens=False)["input_ids"])
    return pieces
