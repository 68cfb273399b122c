"""The processed dataset format, the contract every later stage reads.

    data/processed/<name>/
        items.parquet          item_idx, item_id, text, keywords, image (+ attr_* on the synthetic world)
        interactions.parquet   user_idx, item_idx, timestamp, split
        users.parquet          user_idx, user_id (+ pref_* ground truth on the synthetic world)
        meta.json              source, counts, modalities, split rule, seed, content hash, encoders
        features/<modality>.npy  float32 [I, d]
        images/                item images (paths in items.image are relative to the dataset folder)
        scorer/                the CLIP-style scorer (when the dataset has images and text)
        config.yaml            the resolved config that built it
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dppmg.errors import DppmgError
from dppmg.io import atomic_path, read_json, write_json

SPLITS = ("train", "valid", "test")
MODALITIES = ("text", "image")
ITEM_COLUMNS = ("item_idx", "item_id", "text", "keywords", "image")
INTERACTION_COLUMNS = ("user_idx", "item_idx", "timestamp", "split")
USER_COLUMNS = ("user_idx", "user_id")
FORMAT_VERSION = 1


@dataclass
class ProcessedDataset:
    """A processed dataset in memory. `features[m]` is float32 [num_items, d_m]."""

    root: Path
    items: pd.DataFrame
    interactions: pd.DataFrame
    users: pd.DataFrame
    meta: dict[str, Any]
    features: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_users(self) -> int:
        return len(self.users)

    @property
    def num_items(self) -> int:
        return len(self.items)

    @property
    def modalities(self) -> list[str]:
        return list(self.meta.get("modalities", []))

    def split(self, name: str) -> pd.DataFrame:
        return self.interactions[self.interactions["split"] == name]

    def image_path(self, item_idx: int) -> Path | None:
        rel = self.items["image"].iat[item_idx]
        return None if rel is None or pd.isna(rel) else self.root / rel


def content_hash(items: pd.DataFrame, interactions: pd.DataFrame, users: pd.DataFrame) -> str:
    """sha256 over the contract columns; identical data gives the identical hash on any machine."""
    h = hashlib.sha256()
    for frame, cols in ((items, ITEM_COLUMNS), (interactions, INTERACTION_COLUMNS), (users, USER_COLUMNS)):
        for col in cols:
            values = frame[col]
            h.update(col.encode())
            if values.dtype.kind in "iu":
                h.update(np.ascontiguousarray(values.to_numpy(), dtype="<i8").tobytes())
            else:
                # pandas' vectorised hash (fixed key, so stable across runs); categoricals hash like
                # their values, nulls like each other.
                h.update(pd.util.hash_pandas_object(values, index=False).to_numpy().tobytes())
    return h.hexdigest()[:16]


def validate_tables(items: pd.DataFrame, interactions: pd.DataFrame, users: pd.DataFrame, where: str = "") -> None:
    """Check the invariants every reader relies on; raise DppmgError naming what is wrong."""
    where = f"{where}: " if where else ""
    for name, frame, cols in (
        ("items", items, ITEM_COLUMNS),
        ("interactions", interactions, INTERACTION_COLUMNS),
        ("users", users, USER_COLUMNS),
    ):
        missing = [c for c in cols if c not in frame.columns]
        if missing:
            raise DppmgError(f"{where}{name} table lacks column(s) {missing}; expected {list(cols)}")
    n_items, n_users = len(items), len(users)
    if not np.array_equal(items["item_idx"].to_numpy(), np.arange(n_items)):
        raise DppmgError(f"{where}items.item_idx must be 0..{n_items - 1} in order")
    if not np.array_equal(users["user_idx"].to_numpy(), np.arange(n_users)):
        raise DppmgError(f"{where}users.user_idx must be 0..{n_users - 1} in order")
    for col, n in (("item_idx", n_items), ("user_idx", n_users)):
        v = interactions[col].to_numpy()
        if len(v) and (v.min() < 0 or v.max() >= n):
            raise DppmgError(f"{where}interactions.{col} out of range [0, {n})")
    bad = ~interactions["split"].isin(SPLITS)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DppmgError(f"{where}interactions row {row}: split {interactions['split'].iat[row]!r} is not one of {SPLITS}")


def write_tables(folder: Path, items: pd.DataFrame, interactions: pd.DataFrame, users: pd.DataFrame) -> None:
    validate_tables(items, interactions, users, where=str(folder))
    for name, frame in (("items", items), ("interactions", interactions), ("users", users)):
        with atomic_path(folder / f"{name}.parquet") as tmp:
            frame.to_parquet(tmp, index=False)


def write_features(folder: Path, modality: str, features: np.ndarray) -> None:
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}")
    (folder / "features").mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "features" / f"{modality}.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(features, dtype=np.float32))


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    write_json(folder / "meta.json", {"format_version": FORMAT_VERSION, **meta})


def load_dataset(folder: str | Path, features: bool = True) -> ProcessedDataset:
    """Read a processed dataset folder and check it against the contract."""
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise DppmgError(f"{folder} is not a processed dataset (no meta.json); run `dppmg data prepare` first")
    meta = read_json(meta_path)
    try:
        items = pd.read_parquet(folder / "items.parquet")
        interactions = pd.read_parquet(folder / "interactions.parquet")
        users = pd.read_parquet(folder / "users.parquet")
    except FileNotFoundError as e:
        raise DppmgError(f"{folder}: incomplete processed dataset: {e.filename} is missing") from None
    validate_tables(items, interactions, users, where=str(folder))
    feats: dict[str, np.ndarray] = {}
    if features:
        for m in meta.get("modalities", []):
            path = folder / "features" / f"{m}.npy"
            if not path.is_file():
                raise DppmgError(f"{folder}: meta.json lists modality {m!r} but {path} is missing")
            arr = np.load(path, mmap_mode="r")
            if arr.ndim != 2 or arr.shape[0] != len(items):
                raise DppmgError(f"{path}: expected shape [{len(items)}, d], got {list(arr.shape)}")
            feats[m] = arr
    return ProcessedDataset(folder, items, interactions, users, meta, feats)
