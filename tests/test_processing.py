"""The filtering, indexing and splitting pipeline on hand-made RawDatasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dppmg.config import DataConfig
from dppmg.data.format import validate_tables
from dppmg.data.images import check_images
from dppmg.data.processing import ProcessedTables, process
from dppmg.data.raw import RawDataset
from dppmg.errors import DppmgError


def _raw(
    interactions: list[tuple], item_ids: list[str] | None = None, images: list | None = None, **info: str
) -> RawDataset:
    """interactions: (user_id, item_id, timestamp[, rating]) tuples."""
    cols = ["user_id", "item_id", "timestamp", "rating"][: len(interactions[0])]
    inter = pd.DataFrame(interactions, columns=cols)
    inter["timestamp"] = inter["timestamp"].astype(np.int64)
    if item_ids is None:
        item_ids = sorted(set(inter["item_id"]))
    items = pd.DataFrame(
        {
            "item_id": item_ids,
            "text": [f"text {i}" for i in item_ids],
            "keywords": [f"kw {i}" for i in item_ids],
            "image": images if images is not None else [None] * len(item_ids),
            "colour": [f"c{k}" for k in range(len(item_ids))],  # an extra column to carry through
        }
    )
    return RawDataset(source="test", items=items, interactions=inter, info=dict(info))


def _run(raw: RawDataset, seed: int = 0, **kw) -> ProcessedTables:
    out = process(raw, DataConfig(**kw), seed=seed, progress=False)
    validate_tables(out.items, out.interactions, out.users)
    inter = out.interactions
    # Sorted by user, then time.
    order = np.lexsort((inter["timestamp"].to_numpy(), inter["user_idx"].to_numpy()))
    assert np.array_equal(order, np.arange(len(inter)))
    return out


def _random_raw(n_users: int, n_items: int, n: int, seed: int = 0) -> RawDataset:
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n)
    # Skewed item popularity so that k-core has something to cut.
    items = np.minimum(rng.zipf(1.5, n) - 1, n_items - 1)
    times = rng.integers(0, 1000, n)
    rows = [(f"u{u}", f"i{i}", int(t), float(rng.integers(1, 6))) for u, i, t in zip(users, items, times)]
    return _raw(rows, item_ids=[f"i{k}" for k in range(n_items)])


# ----------------------------------------------------------------------------------------------
# Unknown items, duplicates, threshold, dedupe


def test_unknown_items_error_names_file_rows_ids_and_count() -> None:
    raw = _raw(
        [("a", "x", 1), ("a", "ghost", 2), ("b", "x", 3), ("b", "phantom", 4)],
        item_ids=["x"],
        interactions_file="events.csv",
        items_file="items.csv",
    )
    with pytest.raises(
        DppmgError, match=r"events.csv: 2 interaction\(s\).*items.csv.*row\(s\) 2, 4.*'ghost', 'phantom'"
    ):
        _run(raw)
    out = _run(raw, unknown_items="drop")
    assert len(out.interactions) == 2
    assert out.report["unknown_items"]["dropped_interactions"] == 2


def test_duplicate_item_ids_are_an_error() -> None:
    raw = _raw([("a", "x", 1)], item_ids=["x", "y", "x"])
    with pytest.raises(DppmgError, match=r"1 item id\(s\) occur more than once, e.g. \['x'\]"):
        _run(raw)


def test_rating_threshold() -> None:
    raw = _raw([("a", "x", 1, 5.0), ("a", "y", 2, 3.0), ("b", "x", 3, 4.0), ("b", "y", 4, np.nan)])
    out = _run(raw, rating_threshold=4.0)
    assert out.interactions["rating"].tolist() == [5.0, 4.0]
    assert out.report["rating_threshold"]["dropped_interactions"] == 2
    assert out.items["item_id"].tolist() == ["x"]  # y lost all its interactions
    no_rating = _raw([("a", "x", 1)], interactions_file="r.csv")
    with pytest.raises(
        DppmgError, match=r"rating_threshold=4.0 needs ratings, but r.csv has no rating column"
    ):
        _run(no_rating, rating_threshold=4.0)


@pytest.mark.parametrize(("policy", "x_times"), [("first", [1]), ("last", [5]), ("none", [1, 3, 5])])
def test_dedupe(policy: str, x_times: list[int]) -> None:
    # (a, x) three times, out of time order in the file; (a, y) once.
    raw = _raw([("a", "x", 5), ("a", "x", 1), ("a", "y", 3), ("a", "x", 3)])
    out = _run(raw, dedupe=policy)
    inter = out.interactions
    assert inter.loc[inter["item_idx"] == 0, "timestamp"].tolist() == x_times
    assert inter.loc[inter["item_idx"] == 1, "timestamp"].tolist() == [3]
    assert out.report["dedupe"]["dropped_interactions"] == 3 - len(x_times)


# ----------------------------------------------------------------------------------------------
# k-core and indexing


def _naive_kcore(pairs: set[tuple[str, str]], min_user: int, min_item: int) -> set[tuple[str, str]]:
    """The obvious loop: a reference for the vectorised version."""
    while True:
        users = pd.Series([u for u, _ in pairs]).value_counts()
        items = pd.Series([i for _, i in pairs]).value_counts()
        kept = {(u, i) for u, i in pairs if users[u] >= min_user and items[i] >= min_item}
        if kept == pairs:
            return kept
        pairs = kept


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kcore_reaches_the_fixed_point(seed: int) -> None:
    raw = _random_raw(n_users=60, n_items=40, n=600, seed=seed)
    out = _run(raw, min_user_interactions=5, min_item_interactions=4)
    inter = out.interactions
    user_n = np.bincount(inter["user_idx"], minlength=len(out.users))
    item_n = np.bincount(inter["item_idx"], minlength=len(out.items))
    assert user_n.min() >= 5 and item_n.min() >= 4
    assert out.report["kcore"]["dropped_interactions"] > 0  # the fixture did need cutting
    # Same pairs as the naive loop (dedupe=last leaves one interaction per pair).
    got = set(zip(out.users["user_id"][inter["user_idx"]], out.items["item_id"][inter["item_idx"]]))
    deduped = set(zip(raw.interactions["user_id"], raw.interactions["item_id"]))
    assert got == _naive_kcore(deduped, 5, 4)


def test_indexing_keeps_source_order_and_extra_columns() -> None:
    raw = _raw([("zed", "i2", 1), ("amy", "i0", 2), ("zed", "i0", 3)], item_ids=["i0", "i1", "i2"])
    out = _run(raw)
    assert out.items["item_id"].tolist() == ["i0", "i2"]  # i1 has no interactions; raw order kept
    assert out.items["colour"].tolist() == ["c0", "c2"]
    assert out.item_rows.tolist() == [0, 2]
    assert out.users["user_id"].tolist() == ["zed", "amy"]  # order of first appearance
    assert out.report["unused_items_dropped"] == 1
    # With a users table: its order, and its extra columns.
    raw.users = pd.DataFrame({"user_id": ["amy", "bob", "zed"], "pref_colour": ["red", "blue", "green"]})
    out = _run(raw)
    assert out.users.columns.tolist() == ["user_idx", "user_id", "pref_colour"]
    assert out.users["user_id"].tolist() == ["amy", "zed"]
    assert out.users["pref_colour"].tolist() == ["red", "green"]


# ----------------------------------------------------------------------------------------------
# Splits


def test_leave_last_out() -> None:
    raw = _raw(
        [
            ("a", "x", 10), ("a", "y", 30), ("a", "z", 20), ("a", "w", 30),  # tie at 30: file order decides
            ("b", "x", 5), ("b", "y", 1),
            ("c", "z", 7),
        ]
    )  # fmt: skip
    out = _run(raw)
    inter = out.interactions.merge(out.users, on="user_idx").merge(
        out.items[["item_idx", "item_id"]], on="item_idx"
    )
    by_user = {u: g.sort_values("timestamp", kind="stable") for u, g in inter.groupby("user_id")}
    assert by_user["a"]["split"].tolist() == ["train", "train", "valid", "test"]
    assert by_user["a"]["item_id"].tolist() == ["x", "z", "y", "w"]  # w is later in the file than y
    assert by_user["b"]["split"].tolist() == ["train", "test"]
    assert by_user["c"]["split"].tolist() == ["train"]


def test_leave_last_out_puts_each_users_latest_in_test() -> None:
    out = _run(_random_raw(50, 30, 500, seed=3), dedupe="none")
    inter = out.interactions
    for _, g in inter.groupby("user_idx"):
        if len(g) >= 2:
            test = g[g["split"] == "test"]
            assert len(test) == 1 and test["timestamp"].iat[0] == g["timestamp"].max()
            assert (g["split"] == "valid").sum() == (1 if len(g) >= 3 else 0)


def test_random_split_ratios_and_determinism() -> None:
    raw = _random_raw(200, 50, 8000, seed=4)
    kw = dict(split="random", split_ratios=[0.7, 0.2, 0.1], dedupe="none")
    a, b, c = _run(raw, seed=1, **kw), _run(raw, seed=1, **kw), _run(raw, seed=2, **kw)
    assert a.interactions["split"].tolist() == b.interactions["split"].tolist()
    assert a.interactions["split"].tolist() != c.interactions["split"].tolist()
    shares = a.interactions["split"].value_counts(normalize=True)
    assert (
        abs(shares["train"] - 0.7) < 0.02
        and abs(shares["valid"] - 0.2) < 0.02
        and abs(shares["test"] - 0.1) < 0.02
    )
    # Every user keeps a training interaction, even with a tiny train ratio and short histories.
    tiny = _run(_random_raw(100, 20, 150, seed=5), split="random", split_ratios=[0.05, 0.05, 0.9])
    assert set(tiny.interactions.loc[tiny.interactions["split"] == "train", "user_idx"]) == set(
        tiny.users["user_idx"]
    )


def test_given_split() -> None:
    raw = _raw([("a", "x", 1), ("a", "y", 2), ("b", "x", 3), ("b", "y", 4)])
    raw.interactions["split"] = ["train", "2", 0, "valid"]
    out = _run(raw, split="given")
    assert out.interactions["split"].tolist() == ["train", "test", "train", "valid"]
    raw.interactions["split"] = ["train", "holdout", "train", "test"]
    with pytest.raises(DppmgError, match=r"row 2: split 'holdout' is not one of"):
        _run(raw, split="given")
    raw.interactions = raw.interactions.drop(columns="split")
    with pytest.raises(DppmgError, match=r"data.split=given needs the source's own split"):
        _run(raw, split="given")


# ----------------------------------------------------------------------------------------------
# Images


@pytest.fixture
def image_files(tmp_path: Path) -> dict[str, str]:
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8), (200, 30, 30)).save(good)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:40])
    return {
        "good": str(good),
        "corrupt": str(corrupt),
        "truncated": str(truncated),
        "missing": str(tmp_path / "no.png"),
    }


def test_check_images(image_files: dict[str, str]) -> None:
    paths = [
        image_files["good"],
        image_files["corrupt"],
        None,
        image_files["missing"],
        image_files["truncated"],
    ]
    result = check_images(paths, "skip", progress=False)
    assert result.ok.tolist() == [True, False, False, False, False]
    assert (result.missing, result.unreadable) == (2, 2)


def test_image_policy_skip_and_error(image_files: dict[str, str]) -> None:
    rows = [("a", "p", 1), ("a", "q", 2), ("b", "p", 3), ("b", "r", 4), ("b", "s", 5)]
    images = [image_files["good"], image_files["corrupt"], None, image_files["missing"]]
    raw = _raw(rows, item_ids=["p", "q", "r", "s"], images=images)
    out = _run(raw, image_policy="skip")
    assert out.items["item_id"].tolist() == ["p"]
    assert out.items["image"].tolist() == [image_files["good"]]
    assert len(out.interactions) == 2
    report = out.report["images"]
    assert (report["checked"], report["missing"], report["unreadable"], report["dropped_items"]) == (
        4,
        2,
        1,
        3,
    )
    assert report["dropped_interactions"] == 3
    with pytest.raises(DppmgError, match=r"item q: image '.*corrupt.jpg': unreadable"):
        _run(raw, image_policy="error")


def test_images_of_unused_items_are_not_checked(image_files: dict[str, str]) -> None:
    raw = _raw([("a", "p", 1)], item_ids=["p", "q"], images=[image_files["good"], image_files["corrupt"]])
    out = _run(raw, image_policy="error")
    assert out.report["images"]["checked"] == 1


# ----------------------------------------------------------------------------------------------
# Empty results


def test_empty_after_filter_names_the_step_and_setting() -> None:
    raw = _raw([("a", "x", 1, 2.0), ("b", "y", 2, 3.0)])
    with pytest.raises(
        DppmgError, match=r"after the rating threshold: no rating is >= data.rating_threshold=4.5"
    ):
        _run(raw, rating_threshold=4.5)
    with pytest.raises(
        DppmgError, match=r"after k-core filtering.*data.min_user_interactions=3.*min_item_interactions=1"
    ):
        _run(raw, min_user_interactions=3, min_item_interactions=1)
    raw = _raw([("a", "x", 1)], item_ids=["y"])
    with pytest.raises(DppmgError, match=r"after dropping unknown items"):
        _run(raw, unknown_items="drop")
