"""The synthetic world: tables, determinism, tastes reflected in histories, text, and images."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from dppmg.config import SyntheticConfig
from dppmg.data import synthetic
from dppmg.data.synthetic import (
    ATTRIBUTES,
    CATEGORIES,
    COLOURS_RGB,
    SYNONYMS,
    TEXT_ATTRIBUTES,
    VISUAL_ATTRIBUTES,
    generate_world,
    render_items,
)

TINY = SyntheticConfig(n_users=40, n_items=60)
PALETTE = np.array(list(COLOURS_RGB.values()), dtype=float)  # [8, 3]


@pytest.fixture(scope="module")
def tiny():
    return generate_world(TINY, seed=0)


def _mentions(text: str, phrase: str) -> bool:
    return re.search(rf"\b{re.escape(phrase)}\b", text, flags=re.IGNORECASE) is not None


def _match_share(world, attribute: str, pref_column: str) -> float:
    """Share of interactions whose item has the user's favourite value of `attribute`."""
    df = world.interactions.merge(world.items, on="item_id").merge(world.users, on="user_id")
    return float((df[f"attr_{attribute}"] == df[pref_column]).mean())


# --- tables ------------------------------------------------------------------------------------------------


def test_tables_have_the_contract_columns_and_types(tiny):
    items, users, inter = tiny.items, tiny.users, tiny.interactions
    assert tiny.source == "synthetic"
    assert list(items.columns[:4]) == ["item_id", "text", "keywords", "image"]
    assert {f"attr_{a}" for a in ATTRIBUTES} <= set(items.columns)
    assert len(items) == TINY.n_items and items["item_id"].is_unique
    assert items["item_id"].iat[0] == "item_000000" and items["item_id"].iat[-1] == "item_000059"
    assert items["image"].isna().all()
    assert (items["keywords"] == items["attr_category"]).all()
    for a, values in ATTRIBUTES.items():
        assert set(items[f"attr_{a}"]) <= set(values)
    assert list(users.columns) == [
        "user_id",
        "pref_image_colour",
        "pref_image_pattern",
        "pref_text_style",
        "pref_text_material",
        "pref_text_room",
    ]
    assert len(users) == TINY.n_users and users["user_id"].iat[2] == "user_00002"
    assert list(inter.columns) == ["user_id", "item_id", "timestamp"]
    assert inter["timestamp"].dtype == np.int64
    assert set(inter["user_id"]) == set(users["user_id"]) and set(inter["item_id"]) <= set(items["item_id"])
    assert tiny.images.shape == (TINY.n_items, 32, 32, 3) and tiny.images.dtype == np.uint8


def test_histories_respect_lengths_and_have_no_repeats():
    # Poisson(55) falls below 50 and above 60 for some of 40 users: both clips are reached.
    cfg = replace(TINY, interactions_per_user=55.0, min_interactions_per_user=50)
    inter = generate_world(cfg, seed=1).interactions
    lengths = inter.groupby("user_id").size()
    assert lengths.min() == 50 and lengths.max() == cfg.n_items
    assert not inter.duplicated(["user_id", "item_id"]).any()


def test_timestamps_increase_within_each_user(tiny):
    inter = tiny.interactions
    assert (inter["timestamp"] > TINY.start_timestamp).all()
    steps = inter.groupby("user_id")["timestamp"].diff().dropna()
    assert (steps > 0).all()


# --- determinism -------------------------------------------------------------------------------------------


def test_same_seed_gives_the_same_world(tiny):
    again = generate_world(TINY, seed=0)
    for name in ("items", "users", "interactions"):
        pd.testing.assert_frame_equal(getattr(tiny, name), getattr(again, name))
    np.testing.assert_array_equal(tiny.images, again.images)


def test_different_seeds_give_different_worlds(tiny):
    other = generate_world(TINY, seed=1)
    assert not tiny.interactions.equals(other.interactions)
    assert not tiny.items["text"].equals(other.items["text"])
    assert not tiny.users.equals(other.users)
    assert not np.array_equal(tiny.images, other.images)


def test_histories_do_not_depend_on_the_number_of_threads(monkeypatch):
    monkeypatch.setattr(synthetic, "_BLOCK_ELEMENTS", 10 * TINY.n_items)  # 4 blocks of 10 users
    one = generate_world(TINY, seed=3, workers=1).interactions
    three = generate_world(TINY, seed=3, workers=3).interactions
    pd.testing.assert_frame_equal(one, three)


# --- tastes ------------------------------------------------------------------------------------------------


def test_histories_reflect_image_and_text_tastes():
    world = generate_world(SyntheticConfig(), seed=0)
    assert _match_share(world, "colour", "pref_image_colour") > 2.5 / 8
    assert _match_share(world, "style", "pref_text_style") > 2.0 / 6


@pytest.mark.parametrize(
    ("weights", "at_chance", "still_preferred"),
    [
        ({"image_weight": 0.0}, ("colour", "pref_image_colour", 8), ("style", "pref_text_style", 6)),
        ({"text_weight": 0.0}, ("style", "pref_text_style", 6), ("colour", "pref_image_colour", 8)),
    ],
)
def test_a_zero_weight_removes_only_that_modality(weights, at_chance, still_preferred):
    world = generate_world(replace(SyntheticConfig(), **weights), seed=0)
    attribute, column, n_values = at_chance
    assert abs(_match_share(world, attribute, column) - 1 / n_values) < 0.03
    attribute, column, n_values = still_preferred
    assert _match_share(world, attribute, column) > 2.0 / n_values


def test_gumbel_top_one_samples_the_softmax():
    # Top-1 of utility + T·Gumbel is a draw from softmax(utility / T); top-k extends it without replacement.
    utility, temperature, draws = np.array([0.0, 0.5, 1.0, 2.0], np.float32), 0.5, 40_000
    rng = np.random.default_rng(0)
    keys = np.tile(utility, (draws, 1))
    synthetic._add_gumbel(keys, temperature, rng)
    _, cols = synthetic._top_k_per_row(keys, np.ones(draws, dtype=np.int64), rng)
    frequency = np.bincount(cols, minlength=len(utility)) / draws
    softmax = np.exp(utility / temperature) / np.exp(utility / temperature).sum()
    np.testing.assert_allclose(frequency, softmax, atol=0.01)


@pytest.mark.parametrize("n_cols", [30, 5000])
def test_top_k_per_row_is_exact(n_cols):
    rng = np.random.default_rng(1)
    key = rng.standard_normal((50, n_cols)).astype(np.float32)
    k = rng.integers(1, min(n_cols, 60) + 1, 50)
    k[0] = n_cols  # a row that takes everything
    rows, cols = synthetic._top_k_per_row(key, k, np.random.default_rng(2))
    expected = [np.argsort(-key[r], kind="stable")[: k[r]] for r in range(50)]
    np.testing.assert_array_equal(rows, np.repeat(np.arange(50), k))
    np.testing.assert_array_equal(cols, np.concatenate(expected))


def test_top_k_per_row_recovers_when_the_sampled_threshold_is_too_high():
    # Make the columns the threshold is estimated from (drawn from the same seed) the best of row 0:
    # only a few columns then pass the guessed threshold, fewer than k, and the exact fallback must act.
    n_cols, k = 5000, 40
    sampled = np.random.default_rng(5).choice(n_cols, synthetic._THRESHOLD_SAMPLE, replace=False)
    key = np.random.default_rng(6).standard_normal((2, n_cols)).astype(np.float32)
    key[0, sampled] += 10.0
    rows, cols = synthetic._top_k_per_row(key, np.array([k, k]), np.random.default_rng(5))
    expected = [np.argsort(-key[r], kind="stable")[:k] for r in range(2)]
    np.testing.assert_array_equal(cols, np.concatenate(expected))


# --- text --------------------------------------------------------------------------------------------------


def test_text_names_the_category_and_every_text_attribute_unambiguously(tiny):
    for _, item in tiny.items.iterrows():
        assert _mentions(item["text"], item["attr_category"]), item["text"]
        for attribute in TEXT_ATTRIBUTES:
            for value, phrases in SYNONYMS[attribute].items():
                named = any(_mentions(item["text"], p) for p in phrases)
                assert named == (value == item[f"attr_{attribute}"]), (attribute, value, item["text"])


@pytest.mark.parametrize("prob", [0.0, 1.0])
def test_visual_attributes_are_named_with_the_configured_probability(prob):
    items = generate_world(replace(TINY, visual_mention_prob=prob), seed=0).items
    for _, item in items.iterrows():
        for attribute in VISUAL_ATTRIBUTES:
            phrases = SYNONYMS[attribute][item[f"attr_{attribute}"]]
            assert any(_mentions(item["text"], p) for p in phrases) == (prob == 1.0), item["text"]


def test_visual_mentions_are_partial_by_default():
    items = generate_world(replace(TINY, n_items=400), seed=0).items
    named = [
        any(_mentions(t, p) for p in SYNONYMS["colour"][c])
        for t, c in zip(items["text"], items["attr_colour"])
    ]
    assert abs(np.mean(named) - TINY.visual_mention_prob) < 0.1


def test_texts_vary_for_identical_attributes(tiny):
    # Templates and synonyms make the text more than a function of the attributes.
    assert tiny.items["text"].nunique() == len(tiny.items)
    assert len({t.split()[0] for t in tiny.items["text"]}) >= 5


# --- images ------------------------------------------------------------------------------------------------


def _every_combination(repeats: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    grid = np.indices((len(CATEGORIES), len(COLOURS_RGB), len(VISUAL_ATTRIBUTES["pattern"]))).reshape(3, -1)
    return tuple(np.tile(g, repeats) for g in grid)  # type: ignore[return-value]


def _interior(mask: np.ndarray) -> np.ndarray:
    """Pixels whose four neighbours are also in the mask (drops the anti-aliased rim)."""
    inner = mask.copy()
    inner[:, 1:-1, 1:-1] &= mask[:, :-2, 1:-1] & mask[:, 2:, 1:-1] & mask[:, 1:-1, :-2] & mask[:, 1:-1, 2:]
    inner[:, [0, -1], :] = False
    inner[:, :, [0, -1]] = False
    return inner


def test_silhouette_is_painted_in_the_named_colour():
    category, colour, pattern = _every_combination(repeats=2)
    drawn = render_items(category, colour, pattern, 32, np.random.default_rng(0))
    paint = _interior(drawn.silhouette) & ~drawn.accent
    for i in range(len(category)):
        mean = drawn.images[i][paint[i]].mean(axis=0)
        assert np.abs(mean - PALETTE[colour[i]]).max() < 30, (i, mean, colour[i])
        assert np.linalg.norm(PALETTE - mean, axis=1).argmin() == colour[i]


def test_solid_items_look_like_their_colour_without_knowing_the_mask():
    world = generate_world(replace(TINY, n_items=300), seed=0)
    solid = np.flatnonzero(world.items["attr_pattern"].to_numpy() == "solid")
    assert len(solid) > 30
    for i in solid:
        image = world.images[i].astype(float)
        background = np.median(np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]), axis=0)
        foreground = image[np.linalg.norm(image - background, axis=-1) > 80]
        nearest = np.linalg.norm(PALETTE - foreground.mean(axis=0), axis=1).argmin()
        assert list(COLOURS_RGB)[nearest] == world.items["attr_colour"].iat[i]


def test_patterns_paint_part_of_the_silhouette():
    category, colour, pattern = _every_combination(repeats=2)
    drawn = render_items(category, colour, pattern, 32, np.random.default_rng(0))
    share = drawn.accent.sum(axis=(1, 2)) / drawn.silhouette.sum(axis=(1, 2))
    solid = pattern == VISUAL_ATTRIBUTES["pattern"].index("solid")
    assert (share[solid] == 0).all()
    assert (share[~solid] > 0.1).all() and (share[~solid] < 0.7).all()  # the colour stays visible


def test_same_attributes_are_not_pixel_identical():
    drawn = render_items(np.zeros(2, int), np.zeros(2, int), np.zeros(2, int), 32, np.random.default_rng(0))
    assert not np.array_equal(drawn.images[0], drawn.images[1])


@pytest.mark.parametrize("size", [16, 64])
def test_other_image_sizes_draw_the_same_scene(size):
    world = generate_world(replace(TINY, image_size=size), seed=0)
    assert world.images.shape == (TINY.n_items, size, size, 3) and world.images.dtype == np.uint8
    # Geometry is in image units, so the silhouette covers the same share of the picture at any size.
    category, colour, pattern = _every_combination(repeats=1)
    small = render_items(category, colour, pattern, size, np.random.default_rng(0)).silhouette.mean(
        axis=(1, 2)
    )
    base = render_items(category, colour, pattern, 32, np.random.default_rng(0)).silhouette.mean(axis=(1, 2))
    assert np.abs(small - base).mean() < 0.03
