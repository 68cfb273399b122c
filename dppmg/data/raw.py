"""What every loader returns: the source's own ids and fields, before filtering, indexing and splitting."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd


@dataclass
class RawDataset:
    """A source as read, in one shape for all sources.

    items:        item_id (str), text (str or None), keywords (str or None),
                  image (path of the source image file as str, or None), plus any extra columns to keep
                  (the synthetic world's attr_* ground truth).
    interactions: user_id (str), item_id (str), timestamp (int64, seconds), and optionally
                  rating (float) and split (train / valid / test, for sources with their own split).
    users:        None, or user_id (str) plus extra columns to keep (the synthetic world's pref_*).
    features:     modality -> float32 [len(items), d], for sources that ship features (MMRec).
    images:       None, or uint8 [len(items), H, W, 3] rendered in memory (the synthetic world).
    info:         facts about the source for meta.json (layout detected, files read, ...).
    """

    source: str
    items: pd.DataFrame
    interactions: pd.DataFrame
    users: pd.DataFrame | None = None
    features: dict[str, np.ndarray] = field(default_factory=dict)
    images: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)
