"""The benchmark probes' own logic (benchmarks/probe_code_words.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from stage2_generation.policy import Pair

REPO = Path(__file__).resolve().parents[1]


def _probe():
    spec = importlib.util.spec_from_file_location(
        "probe_code_words", REPO / "benchmarks" / "probe_code_words.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("probe_code_words", module)
    spec.loader.exec_module(module)
    return module


def test_code_words_rank_the_words_that_set_a_codes_users_apart():
    probe = _probe()
    # Users 0-1 hold code 0 at level 0 and like rustic items; users 2-3 hold code 1 and like modern ones. "lamp" is
    # everywhere, so it sets no code apart; level 1 splits the users the other way.
    codes = {0: [0, 0], 1: [0, 1], 2: [1, 0], 3: [1, 1]}
    item_words = [
        {"rustic", "lamp"},
        {"modern", "lamp"},
        {"rustic", "oak", "lamp"},
        {"modern", "steel", "lamp"},
    ]
    pairs = [Pair(u, "lamp", i) for u in (0, 1) for i in (0, 2, 0)] + [
        Pair(u, "lamp", i) for u in (2, 3) for i in (1, 3, 1)
    ]
    named = probe.code_words(pairs, codes.__getitem__, item_words)
    assert named[0, 0][0] == "rustic" and named[0, 1][0] == "modern"
    assert "steel" not in named[0, 0] and "oak" not in named[0, 1]  # never seen with the code's users
    assert named[0, 0].index("lamp") > named[0, 0].index("rustic")
    # A word seen fewer than MIN_COUNT times with a code's users does not name it: oak is in one interaction (user
    # 0's item 2) of level-1 code 0's users, 0 and 2.
    assert "oak" not in named[1, 0] and "rustic" in named[1, 0]
