"""Amazon Reviews 2023 (McAuley lab): a category's reviews JSONL and its `meta_` JSONL, gzipped or not.

Reviews give interactions (user_id, parent_asin, rating, timestamp in milliseconds); meta gives items
keyed by parent_asin. Item text is title + features + description; keywords are the most specific
category. Images are never downloaded: they come from `data.images_dir` as `<parent_asin>.<ext>`.
Only the needed fields are kept while reading, so multi-GB review files fit in memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from dppmg.config import DataConfig
from dppmg.data.loaders import (
    list_dir,
    match_images,
    normalise_space,
    read_jsonl_fields,
    require_file,
    require_raw_dir,
    resolve_images_dir,
    to_numbers,
    truncate_words,
)
from dppmg.data.raw import RawDataset
from dppmg.errors import DppmgError

REVIEW_FIELDS = {
    "user_id": pa.string(),
    "parent_asin": pa.string(),
    "rating": pa.float64(),
    "timestamp": pa.int64(),
}
_TEXT_LIST = pa.list_(pa.string())
META_FIELDS = {
    "parent_asin": pa.string(),
    "title": pa.string(),
    "features": _TEXT_LIST,
    "description": _TEXT_LIST,
    "categories": _TEXT_LIST,
    "main_category": pa.string(),
}
META_PREFIX = "meta_"
MAX_TEXT_CHARS = 2000  # product descriptions run to pages; encoders read a few hundred tokens at most
TITLE_KEYWORD_WORDS = 5  # keywords from the title when an item has no category
EXPECTED = "an Amazon Reviews 2023 reviews file (<Category>.jsonl[.gz]) and its meta_<Category>.jsonl[.gz]"


def load_amazon2023(cfg: DataConfig) -> RawDataset:
    raw_dir = require_raw_dir(cfg, EXPECTED)
    reviews_file, meta_file = _find_files(cfg, raw_dir)
    items = _read_meta(meta_file)
    items["image"] = match_images(items["item_id"], resolve_images_dir(cfg))
    interactions = _read_reviews(reviews_file)
    info = {"interactions_file": str(reviews_file), "items_file": str(meta_file)}
    return RawDataset(source="amazon2023", items=items, interactions=interactions, info=info)


def _find_files(cfg: DataConfig, raw_dir: Path) -> tuple[Path, Path]:
    """(reviews, meta): from data.interactions_file / data.items_file, else detected in raw_dir."""
    found = sorted(p for p in raw_dir.iterdir() if p.name.endswith((".jsonl", ".jsonl.gz")))
    metas = [p for p in found if p.name.startswith(META_PREFIX)]
    others = [p for p in found if not p.name.startswith(META_PREFIX)]

    def pick(setting: str, configured: str | None, candidates: list[Path], what: str) -> Path:
        if configured is not None:
            return require_file(cfg.raw_path(configured), f"{what} (data.{setting})")  # type: ignore[arg-type]
        if len(candidates) != 1:
            raise DppmgError(
                f"{raw_dir}: cannot tell which file is the {what}: found {[p.name for p in candidates] or 'none'} "
                f"among {list_dir(raw_dir)}. Expected {EXPECTED}, or set data.{setting}"
            )
        return candidates[0]

    meta = pick("items_file", cfg.items_file, metas, "meta JSONL (name starting with 'meta_')")
    reviews = pick(
        "interactions_file", cfg.interactions_file, [p for p in others if p != meta], "reviews JSONL"
    )
    return reviews, meta


def _read_reviews(path: Path) -> pd.DataFrame:
    frame = read_jsonl_fields(path, REVIEW_FIELDS)
    for col in ("user_id", "parent_asin", "timestamp"):
        missing = frame[col].isna().to_numpy()
        if missing.any():
            first = int(np.flatnonzero(missing)[0]) + 1
            raise DppmgError(
                f"{path}: review number {first} has no {col!r}; every review needs {list(REVIEW_FIELDS)}"
            )
    # Fields of another type ("rating": "five") come through the untyped reader as they are written.
    rating = to_numbers(frame["rating"], path, "rating", row="review number")
    timestamp = to_numbers(frame["timestamp"], path, "timestamp (milliseconds)", row="review number")
    return pd.DataFrame(
        {
            "user_id": frame["user_id"].astype("str"),
            "item_id": frame["parent_asin"].astype("str"),
            "rating": rating.astype("float32"),
            "timestamp": timestamp.astype("int64") // 1000,  # the 2023 release counts milliseconds
        }
    )


def _read_meta(path: Path) -> pd.DataFrame:
    frame = read_jsonl_fields(path, META_FIELDS)
    missing = ~frame["parent_asin"].map(lambda v: isinstance(v, str) and bool(v)).to_numpy(dtype=bool)
    if missing.any():
        raise DppmgError(f"{path}: item number {int(np.flatnonzero(missing)[0]) + 1} has no 'parent_asin'")
    # One Python pass per item (not per review): the text fields are lists of varying shape.
    rows = zip(
        frame["title"], frame["features"], frame["description"], frame["categories"], frame["main_category"]
    )
    texts, keywords = [], []
    for title, features, description, categories, main_category in rows:
        texts.append(item_text(title, features, description))
        keywords.append(item_keywords(categories, main_category, title))
    return pd.DataFrame({"item_id": frame["parent_asin"].astype("str"), "text": texts, "keywords": keywords})


def item_text(title: object, features: object, description: object) -> str:
    """Title, then feature bullets, then description paragraphs: one whitespace-normalised string."""
    parts = [_as_text(title)] + _as_list(features) + _as_list(description)
    return truncate_words(normalise_space(" ".join(p for p in parts if p)), MAX_TEXT_CHARS)


def item_keywords(categories: object, main_category: object, title: object) -> str:
    """The most specific category, else the main category, else the title's first words."""
    cats = _as_list(categories)
    if cats:
        return normalise_space(cats[-1])
    main = _as_text(main_category)
    if main:
        return main
    return " ".join(_as_text(title).split()[:TITLE_KEYWORD_WORDS])


def _as_text(value: object) -> str:
    return normalise_space(value) if isinstance(value, str) else ""


def _as_list(value: object) -> list[str]:
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if isinstance(value, (list, tuple, np.ndarray)):
        return [v.strip() for v in value if isinstance(v, str) and v.strip()]
    return []
