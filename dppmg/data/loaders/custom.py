"""The generic format: an items table and an interactions table, each CSV or JSONL (by extension).

    items        item_id, text, keywords, (image)     image: a path relative to data.images_dir if set,
                                                       else to data.raw_dir, or absolute
    interactions user_id, item_id, timestamp, (rating) timestamp: integer seconds or an ISO-8601 date

Defaults are items.csv / items.jsonl and interactions.csv / interactions.jsonl in data.raw_dir;
data.items_file and data.interactions_file override them. Extra item columns are kept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from dppmg.config import DataConfig
from dppmg.data.loaders import (
    did_you_mean,
    ids_to_str,
    list_dir,
    read_csv,
    read_jsonl,
    require_columns,
    require_file,
    require_raw_dir,
    resolve_images_dir,
    to_numbers,
    to_seconds,
)
from dppmg.data.raw import RawDataset
from dppmg.errors import DppmgError
from dppmg.log import logger

ITEM_COLUMNS = ("item_id", "text", "keywords")
ITEM_OPTIONAL = ("image",)
INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
INTERACTION_OPTIONAL = ("rating",)
CSV_SUFFIXES = (".csv", ".csv.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
EXPECTED = (
    "items.csv or items.jsonl (item_id, text, keywords, image) and interactions.csv or interactions.jsonl"
)


def load_custom(cfg: DataConfig) -> RawDataset:
    raw_dir = require_raw_dir(cfg, EXPECTED)
    items_file = _table_file(cfg, raw_dir, "items", cfg.items_file, "items_file")
    inter_file = _table_file(cfg, raw_dir, "interactions", cfg.interactions_file, "interactions_file")
    items = _read_items(items_file, resolve_images_dir(cfg) or raw_dir)
    interactions = _read_interactions(inter_file)
    info = {"items_file": str(items_file), "interactions_file": str(inter_file)}
    return RawDataset(source="custom", items=items, interactions=interactions, info=info)


def _table_file(cfg: DataConfig, raw_dir: Path, stem: str, configured: str | None, key: str) -> Path:
    if configured is not None:
        return require_file(cfg.raw_path(configured), f"the {stem} table (data.{key}), CSV or JSONL")  # type: ignore[arg-type]
    for suffix in (".csv", ".jsonl"):
        if (raw_dir / f"{stem}{suffix}").is_file():
            return raw_dir / f"{stem}{suffix}"
    raise DppmgError(
        f"{raw_dir}: no {stem}.csv or {stem}.jsonl (or set data.{key}); expected {EXPECTED}. Found: {list_dir(raw_dir)}"
    )


def _read_table(path: Path, columns: tuple[str, ...], str_columns: tuple[str, ...]) -> pd.DataFrame:
    name = path.name.lower()
    if name.endswith(CSV_SUFFIXES):
        # Ids and texts as written ("007" stays "007", a title "1984" stays text); only empty cells are missing
        # values, not pandas' "NA", "null", "None" and the like, which are ids and texts too.
        expected = f"comma-separated UTF-8 with a header line naming the columns {', '.join(columns)}"
        return read_csv(
            path, expected, dtype={c: "str" for c in str_columns}, keep_default_na=False, na_values=[""]
        )
    if name.endswith(JSONL_SUFFIXES):
        return read_jsonl(path)
    raise DppmgError(
        f"{path}: unknown table format; expected a name ending in .csv or .jsonl (optionally .gz)"
    )


def _read_items(path: Path, image_root: Path) -> pd.DataFrame:
    frame = _read_table(path, ITEM_COLUMNS + ITEM_OPTIONAL, ("item_id", "text", "keywords", "image"))
    require_columns(frame, ITEM_COLUMNS, path, optional=ITEM_OPTIONAL)
    _require_values(frame, ("item_id",), path)
    items = frame.copy()
    items["item_id"] = ids_to_str(frame["item_id"])
    for col in ("text", "keywords"):
        # Whitespace-only is no text: the encoders would see the same empty string for every such item.
        values = frame[col].astype("object")
        blank = values.map(lambda v: not isinstance(v, str) or not v.strip()).to_numpy(dtype=bool)
        if blank.any():
            logger.warning(
                "%s: %d of %d items have an empty or whitespace-only %s (e.g. data row %d); they are kept "
                "with no %s",
                path, int(blank.sum()), len(frame), col, int(np.flatnonzero(blank)[0]) + 1, col,
            )  # fmt: skip
        items[col] = values.where(~blank, None)
    items["image"] = _image_paths(frame["image"], image_root) if "image" in frame else None
    extra = [c for c in items.columns if c not in (*ITEM_COLUMNS, "image")]
    return items[[*ITEM_COLUMNS, "image", *extra]]


def _image_paths(values: pd.Series, root: Path) -> pd.Series:
    """Absolute paths stay, relative ones are joined to `root`; empty cells become None."""
    out = []
    for v in values.tolist():
        if not isinstance(v, str) or not v.strip():
            out.append(None)
            continue
        p = Path(v.strip())
        out.append(str(p if p.is_absolute() else root / p))
    return pd.Series(out, index=values.index, dtype="object")


def _read_interactions(path: Path) -> pd.DataFrame:
    frame = _read_table(path, INTERACTION_COLUMNS + INTERACTION_OPTIONAL, ("user_id", "item_id"))
    require_columns(frame, INTERACTION_COLUMNS, path, optional=INTERACTION_OPTIONAL)
    _require_values(frame, INTERACTION_COLUMNS, path)
    ignored = [c for c in frame.columns if c not in INTERACTION_COLUMNS + INTERACTION_OPTIONAL]
    if ignored:  # a misspelt optional column ("ratings") would otherwise vanish without a word
        logger.warning(
            "%s: ignoring column(s) %s%s; interactions use %s",
            path, ignored, did_you_mean(ignored, INTERACTION_COLUMNS + INTERACTION_OPTIONAL),
            list(INTERACTION_COLUMNS + INTERACTION_OPTIONAL),
        )  # fmt: skip
    out = pd.DataFrame(
        {
            "user_id": ids_to_str(frame["user_id"]),
            "item_id": ids_to_str(frame["item_id"]),
            "timestamp": to_seconds(frame["timestamp"], path),
        }
    )
    if "rating" in frame:
        out["rating"] = to_numbers(frame["rating"], path, "rating").astype(np.float32)
    return out


def _require_values(frame: pd.DataFrame, columns: tuple[str, ...], path: Path) -> None:
    for col in columns:
        missing = frame[col].isna().to_numpy()
        if missing.any():
            raise DppmgError(f"{path}: data row {int(np.flatnonzero(missing)[0]) + 1}: {col} is empty")
