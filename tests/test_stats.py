"""dppmg.data.stats on a hand-built processed dataset whose numbers can be worked out on paper.

The fixture: 12 items, 5 users with histories of 2, 4, 6, 8 and 10 items; user u has items 0..len-1,
the last one in test, the one before in valid, the rest in train. So item i is held by every user
whose history is longer than i: popularity [5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0].
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dppmg.data.format import content_hash, load_dataset, write_features, write_meta, write_tables
from dppmg.data.stats import (
    PLACEHOLDER,
    _font,
    _thumbnail,
    _wrap,
    dataset_stats,
    format_stats,
    grid_layout,
    sample_grid,
    write_stats,
)

HISTORY = [2, 4, 6, 8, 10]
N_ITEMS = 12
N_WITH_IMAGE = 8
T0 = 1_600_000_000  # 2020-09-13 UTC
DAY = 86_400


def _colour(i: int) -> tuple[int, int, int]:
    return (20 * i + 10, 230 - 15 * i, 60 + 10 * i)


def _build(folder: Path, with_images: bool = True) -> Path:
    (folder / "images").mkdir(parents=True)
    images = []
    for i in range(N_ITEMS):
        if with_images and i < N_WITH_IMAGE:
            Image.new("RGB", (8, 8), _colour(i)).save(folder / "images" / f"{i}.png")
            images.append(f"images/{i}.png")
        else:
            images.append(None)
    text = [
        f"Item {i} is a thing with a sentence long enough to wrap over several lines." for i in range(N_ITEMS)
    ]
    text[10], text[11] = "   ", None  # blank and missing text
    keywords = [f"kw{i % 5}" for i in range(N_ITEMS)]
    keywords[11] = "KW0"  # same keyword as kw0, other case
    items = pd.DataFrame(
        {"item_idx": range(N_ITEMS), "item_id": [f"i{i}" for i in range(N_ITEMS)], "text": text}
        | {"keywords": keywords, "image": images}
    )
    rows = []
    for u, length in enumerate(HISTORY):
        for k in range(length):
            split = "test" if k == length - 1 else "valid" if k == length - 2 else "train"
            rows.append({"user_idx": u, "item_idx": k, "timestamp": T0 + k * DAY + u, "split": split})
    interactions = pd.DataFrame(rows)
    users = pd.DataFrame(
        {
            "user_idx": range(5),
            "user_id": [f"u{u}" for u in range(5)],
            "pref_colour": ["red", "red", "blue", "green", "red"],
            "pref_weight": [0.1, 0.2, 0.3, 0.4, 0.5],
        }
    )
    write_tables(folder, items, interactions, users)
    rng = np.random.default_rng(0)
    write_features(folder, "text", rng.standard_normal((N_ITEMS, 8)))
    modalities = ["text"]
    if with_images:
        write_features(folder, "image", rng.standard_normal((N_ITEMS, 4)))
        modalities.append("image")
    meta = {
        "source": "handmade",
        "content_hash": content_hash(items, interactions, users),
        "modalities": modalities,
        "split": "leave_last_out",
        "seed": 0,
        "scorer": {"recall@1": 0.25, "recall@5": 0.75},
    }
    write_meta(folder, meta)
    return folder


@pytest.fixture
def ds(tmp_path):
    return load_dataset(_build(tmp_path / "ds"))


def test_counts_and_density_are_exact(ds):
    c = dataset_stats(ds)["counts"]
    assert (c["users"], c["items"], c["interactions"]) == (5, 12, 30)
    assert c["per_split"] == {"train": 20, "valid": 5, "test": 5}
    # user 0 has only two interactions: one valid, one test, none in train.
    assert c["users_per_split"] == {"train": 4, "valid": 5, "test": 5}
    assert c["density"] == pytest.approx(30 / 60)
    assert c["duplicate_pairs"] == 0


def test_history_quantiles_match_hand_computation(ds):
    h = dataset_stats(ds)["history_length"]
    # Sorted [2, 4, 6, 8, 10]; p90 sits at position 3.6 -> 8 + 0.6 * 2.
    assert {k: h[k] for k in ("min", "p25", "median", "mean", "p75", "p90", "max")} == {
        "min": 2,
        "p25": 4,
        "median": 6,
        "mean": 6,
        "p75": 8,
        "p90": pytest.approx(9.2),
        "max": 10,
    }
    assert h["users_without_interactions"] == 0


def test_item_popularity_shape(ds):
    p = dataset_stats(ds)["item_popularity"]
    # Sorted popularity [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5].
    assert (p["min"], p["p25"], p["median"], p["mean"], p["max"]) == (0, 1, 2.5, 2.5, 5)
    assert p["head_items"] == 1  # 1% of 12 items, rounded up to one item
    assert p["head_share"] == pytest.approx(5 / 30)
    assert p["items_under_5"] == 10
    assert p["items_under_5_share"] == pytest.approx(10 / 12)
    assert p["items_without_interactions"] == 2


def test_time_content_modalities_preferences_meta(ds):
    s = dataset_stats(ds)
    assert s["time"] == {"first": "2020-09-13", "last": "2020-09-22", "span_days": 9.0}
    assert s["content"]["share_with"] == {
        "text": pytest.approx(10 / 12),
        "keywords": 1.0,
        "image": pytest.approx(8 / 12),
    }
    assert s["content"]["distinct_keywords"] == 5
    assert s["content"]["top_keywords"]["kw0"] == 4  # items 0, 5, 10 and 11 ("KW0")
    assert {m: d["dim"] for m, d in s["modalities"].items()} == {"text": 8, "image": 4}
    assert s["preferences"]["pref_colour"]["counts"] == {"red": 3, "blue": 1, "green": 1}
    assert s["preferences"]["pref_weight"]["median"] == pytest.approx(0.3)
    assert s["meta"]["source"] == "handmade" and s["meta"]["split"] == "leave_last_out"
    assert s["scorer"] == {"recall@1": 0.25, "recall@5": 0.75}


def test_stats_are_plain_json(ds):
    stats = dataset_stats(ds)
    assert json.loads(json.dumps(stats, allow_nan=False)) == stats


def test_features_not_loaded_gives_no_dims(tmp_path):
    ds = load_dataset(_build(tmp_path / "ds"), features=False)
    stats = dataset_stats(ds)
    assert {m: d["dim"] for m, d in stats["modalities"].items()} == {"text": None, "image": None}
    assert "features not loaded" in format_stats(stats)


def test_format_stats_mentions_key_numbers(ds):
    stats = dataset_stats(ds)
    report = format_stats(stats)
    for fragment in ("handmade", stats["meta"]["content_hash"], "leave_last_out", "50 %", "9.2", "recall@5"):
        assert fragment in report, fragment
    assert "train 20" in report and "valid 5" in report and "test 5" in report
    assert "2020-09-13" in report and "red 3" in report

    stats["counts"]["interactions"] = 1_234_567
    assert "1,234,567" in format_stats(stats)

    # The distributions table is right-aligned: header and rows end at the same column.
    lines = report.splitlines()
    header = next(i for i, line in enumerate(lines) if "median" in line)
    assert len({len(lines[header + k]) for k in range(4)}) == 1


def test_sample_grid_draws_each_item_in_its_cell(ds, tmp_path):
    out = sample_grid(ds, tmp_path / "grid.png", n=N_ITEMS, seed=0, thumb=48)
    layout = grid_layout(N_ITEMS, 48)
    assert (layout.cols, layout.rows) == (4, 3)
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == (layout.width, layout.height)
        assert im.width >= 4 * 48 and im.height >= 3 * 48
        # All items sampled -> cell k holds item k (sorted); items 8.. have no image.
        for k in range(N_ITEMS):
            x, y = layout.origin(k)
            expected = _colour(k) if k < N_WITH_IMAGE else PLACEHOLDER
            assert im.getpixel((x + 4, y + 4)) == expected, k
    assert not list(tmp_path.glob("*.tmp"))


def test_sample_grid_size_for_default_sixteen(ds, tmp_path):
    # Asking for more items than exist draws every item once.
    out = sample_grid(ds, tmp_path / "grid.png", n=16)
    layout = grid_layout(N_ITEMS, 96)
    with Image.open(out) as im:
        assert im.size == (layout.width, layout.height)
    assert (grid_layout(16, 96).cols, grid_layout(16, 96).rows) == (4, 4)


def test_grid_and_stats_without_any_image(tmp_path):
    ds = load_dataset(_build(tmp_path / "ds", with_images=False))
    stats = write_stats(ds, tmp_path / "out", n_samples=6, seed=1)
    assert stats["content"]["share_with"]["image"] == 0.0
    assert list(stats["modalities"]) == ["text"]
    layout = grid_layout(6, 96)
    with Image.open(tmp_path / "out" / "sample_items.png") as im:
        assert im.size == (layout.width, layout.height)
        for k in range(6):
            x, y = layout.origin(k)
            assert im.getpixel((x + 2, y + 2)) == PLACEHOLDER
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == stats


def test_thumbnail_fits_large_transparent_image(tmp_path):
    # A wide RGBA photo shrinks into the square, letterboxed, with transparency on white.
    im = Image.new("RGBA", (300, 150), (200, 0, 0, 255))
    im.paste((0, 0, 0, 0), (0, 0, 30, 150))  # transparent left strip
    im.save(tmp_path / "wide.png")
    thumb = _thumbnail(tmp_path / "wide.png", 96, _font())
    assert thumb.size == (96, 96) and thumb.mode == "RGB"
    assert thumb.getpixel((48, 48)) == (200, 0, 0)
    assert thumb.getpixel((48, 2)) == (255, 255, 255)  # letterbox
    assert thumb.getpixel((2, 48)) == (255, 255, 255)  # transparent strip
    assert _thumbnail(tmp_path / "missing.png", 96, _font()).getpixel((2, 2)) == PLACEHOLDER


def test_wrap_fits_width_and_marks_truncation():
    font = _font()
    text = "a sentence of ordinary words " * 6 + "x" * 80
    lines = _wrap(text, font, 100, 3)
    assert len(lines) == 3 and lines[-1].endswith("…")
    assert all(font.getlength(line) <= 100 for line in lines)
    assert _wrap("short", font, 100, 3) == ["short"]
    long_word = _wrap("y" * 60, font, 100, 4)  # one word wider than a line is split, not overflowed
    assert len(long_word) > 1 and all(font.getlength(line) <= 100 for line in long_word)
    assert "".join(long_word) == "y" * 60
