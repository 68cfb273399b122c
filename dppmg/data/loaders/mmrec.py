"""MMRec's preprocessed datasets (Baby, Sports, Clothing, ...): features only, with their own split.

    <name>.inter     tab-separated with a header: userID, itemID, (rating), timestamp, x_label
                     (x_label 0 / 1 / 2 = train / valid / test)
    text_feat.npy    float [I, d_text], row k = itemID k
    image_feat.npy   float [I, d_image]   (either feature file may be absent, not both)

Items have no text, keywords or images, only the feature rows; x_label becomes the `split` column,
which `data.split=given` keeps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from dppmg.config import DataConfig
from dppmg.data.loaders import list_dir, read_csv, require_columns, require_file, require_raw_dir, to_seconds
from dppmg.data.raw import RawDataset
from dppmg.errors import DppmgError

FEATURE_FILES = {"text": "text_feat.npy", "image": "image_feat.npy"}
SPLIT_LABELS = {0: "train", 1: "valid", 2: "test"}
EXPECTED = "<name>.inter (userID, itemID, timestamp, x_label) and text_feat.npy and/or image_feat.npy"


def load_mmrec(cfg: DataConfig) -> RawDataset:
    raw_dir = require_raw_dir(cfg, EXPECTED)
    inter_file = _inter_file(cfg, raw_dir)
    features = _read_features(raw_dir)
    n_items = next(iter(features.values())).shape[0]
    interactions, has_time = _read_inter(inter_file, n_items, features)
    items = pd.DataFrame(
        {
            "item_id": pd.Series(np.arange(n_items).astype(str), dtype="str"),
            "text": pd.Series([None] * n_items, dtype="object"),
            "keywords": pd.Series([None] * n_items, dtype="object"),
            "image": pd.Series([None] * n_items, dtype="object"),
        }
    )
    info = {
        "interactions_file": str(inter_file),
        "feature_files": {m: str(raw_dir / FEATURE_FILES[m]) for m in features},
        "timestamps": "timestamp column" if has_time else "row order (the file has no timestamp column)",
    }
    return RawDataset(source="mmrec", items=items, interactions=interactions, features=features, info=info)


def _inter_file(cfg: DataConfig, raw_dir: Path) -> Path:
    if cfg.mmrec_name is not None:
        return require_file(
            raw_dir / f"{cfg.mmrec_name}.inter", f"the interactions of data.mmrec_name={cfg.mmrec_name!r}"
        )
    found = sorted(raw_dir.glob("*.inter"))
    if len(found) != 1:
        raise DppmgError(
            f"{raw_dir}: expected exactly one *.inter file (or set data.mmrec_name), found "
            f"{[p.name for p in found] or 'none'} among {list_dir(raw_dir)}"
        )
    return found[0]


def _read_features(raw_dir: Path) -> dict[str, np.ndarray]:
    features = {}
    for modality, name in FEATURE_FILES.items():
        path = raw_dir / name
        if path.is_file():
            try:
                arr = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as e:  # not a .npy file, or cut short
                raise DppmgError(f"{path}: not a readable .npy array ({e}); expected float [items, dim]") from None
            if arr.ndim != 2:
                raise DppmgError(f"{path}: expected a 2-D array [items, dim], got shape {list(arr.shape)}")
            arr = arr.astype(np.float32, copy=False)
            bad = ~np.isfinite(arr).all(axis=1)
            if bad.any():
                raise DppmgError(
                    f"{path}: {int(bad.sum())} row(s) hold NaN or infinite values, e.g. row {int(np.flatnonzero(bad)[0])} "
                    "(the item with that itemID); expected finite features for every item"
                )
            features[modality] = arr
    if not features:
        raise DppmgError(f"{raw_dir}: no item features; expected {' and/or '.join(FEATURE_FILES.values())}")
    rows = {FEATURE_FILES[m]: a.shape[0] for m, a in features.items()}
    if len(set(rows.values())) > 1:
        raise DppmgError(f"{raw_dir}: feature files disagree on the number of items: {rows}")
    return features


def _read_inter(path: Path, n_items: int, features: dict[str, np.ndarray]) -> tuple[pd.DataFrame, bool]:
    """The interactions, and whether the file had timestamps."""
    frame = read_csv(path, f"tab-separated with a header line: {EXPECTED.split(' and ')[0]}", sep="\t")
    require_columns(frame, ("userID", "itemID", "x_label"), path, optional=("rating", "timestamp"))
    item = pd.to_numeric(frame["itemID"], errors="coerce")
    if item.isna().any() or (item < 0).any() or (item != item.round()).any():
        row = int(np.flatnonzero((item.isna() | (item < 0) | (item != item.round())).to_numpy())[0])
        raise DppmgError(
            f"{path}: data row {row + 1}: itemID {frame['itemID'].tolist()[row]!r} is not a row number >= 0"
        )
    item = item.astype(np.int64)
    if len(item) and item.max() >= n_items:
        names = ", ".join(FEATURE_FILES[m] for m in features)
        raise DppmgError(
            f"{path}: the largest itemID is {int(item.max())} but {names} has {n_items} rows "
            f"(itemID k must be row k, so at least {int(item.max()) + 1} rows are needed)"
        )
    label = pd.to_numeric(frame["x_label"], errors="coerce")
    bad = ~label.isin(list(SPLIT_LABELS))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DppmgError(
            f"{path}: data row {row + 1}: x_label {frame['x_label'].tolist()[row]!r} is not 0, 1 or 2"
        )
    # Without timestamps, the file's row order stands in for time (only leave_last_out needs it).
    timestamp = to_seconds(frame["timestamp"], path) if "timestamp" in frame else np.arange(len(frame), dtype=np.int64)
    out = pd.DataFrame(
        {
            "user_id": frame["userID"].astype("str"),
            "item_id": item.astype("str"),
            "timestamp": timestamp,
            "split": label.map(SPLIT_LABELS).astype("str"),
        }
    )
    if "rating" in frame:
        out["rating"] = frame["rating"].astype(np.float32)
    return out, "timestamp" in frame
