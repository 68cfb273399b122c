"""Code words: which words name a code (lift over the training interactions), and their pieces."""

from test_injection import make_tokenizer

from stage2_generation.code_words import code_words, item_words, level0_pieces
from stage2_generation.policy import Pair


def test_item_words_are_lower_case_runs_of_three_letters_or_more():
    assert item_words(["A Red-Wooden lamp, of oak", None, float("nan")]) == [
        {"red", "wooden", "lamp", "oak"},
        set(),
        set(),
    ]


def test_code_words_rank_the_words_that_set_a_codes_users_apart():
    # Users 0-1 hold code 0 at level 0 and like rustic items; users 2-3 hold code 1 and like modern ones. "lamp" is
    # everywhere, so it sets no code apart; level 1 splits the users the other way.
    codes = {0: [0, 0], 1: [0, 1], 2: [1, 0], 3: [1, 1]}
    words = [{"rustic", "lamp"}, {"modern", "lamp"}, {"rustic", "oak", "lamp"}, {"modern", "steel", "lamp"}]
    pairs = [Pair(u, "lamp", i) for u in (0, 1) for i in (0, 2, 0)] + [
        Pair(u, "lamp", i) for u in (2, 3) for i in (1, 3, 1)
    ]
    named = code_words(pairs, codes.__getitem__, words)
    assert named[0, 0][0] == "rustic" and named[0, 1][0] == "modern"
    assert "steel" not in named[0, 0] and "oak" not in named[0, 1]  # never seen with the code's users
    assert named[0, 0].index("lamp") > named[0, 0].index("rustic")
    # A word seen fewer than MIN_COUNT times with a code's users does not name it: oak is in one interaction (user
    # 0's item 2) of level-1 code 0's users, 0 and 2; with min_count 1 it does.
    assert "oak" not in named[1, 0] and "rustic" in named[1, 0]
    assert "oak" in code_words(pairs, codes.__getitem__, words, min_count=1)[1, 0]


def test_code_words_break_ties_by_the_word_not_by_set_order():
    words = item_words(["red blue"] * 3)
    pairs = [Pair(0, "", i) for i in range(3)]
    assert code_words(pairs, lambda u: [0], words)[0, 0] == ["blue", "red"]


def test_level0_pieces_are_the_top_words_as_a_prompt_would_hold_them():
    tokenizer = make_tokenizer()
    named = {(0, 2): ["red", "wooden", "lamp"], (0, 5): [], (1, 0): ["blue"]}
    pieces = level0_pieces(named, tokenizer, count=2)
    assert pieces == {2: tokenizer(" red wooden", add_special_tokens=False)["input_ids"]}
    assert len(pieces[2]) == 2
