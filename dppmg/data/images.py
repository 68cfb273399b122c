"""Checking that item image files exist and decode, before anything is built on them."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from dppmg.errors import DppmgError

# JPEGs are decoded at a reduced scale (PIL's draft mode): every byte is still read and checked,
# at a fraction of the cost of a full-size decode.
CHECK_SIZE = (64, 64)
MAX_REPORTED = 5  # problems listed by example in the report


@dataclass
class ImageCheck:
    """ok: bool [N], True where the file exists and decodes; counts and a few examples of the rest."""

    ok: np.ndarray
    missing: int = 0
    unreadable: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def n_bad(self) -> int:
        return self.missing + self.unreadable


def image_problem(path: str | Path | None) -> str | None:
    """Why the image at `path` cannot be used ("no image", "file not found", "unreadable: ..."), or None."""
    if path is None or (isinstance(path, float) and np.isnan(path)) or str(path) == "":
        return "no image"
    p = Path(path)
    if not p.is_file():
        return "file not found"
    try:
        with Image.open(p) as im:
            im.draft("RGB", CHECK_SIZE)
            im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"unreadable: {type(e).__name__}: {e}"
    return None


def check_images(
    paths: Sequence[str | Path | None],
    policy: str,
    item_ids: Sequence[str] | None = None,
    progress: bool = True,
    workers: int = 4,
) -> ImageCheck:
    """Check every path; policy "error" raises on the first problem, "skip" only counts them.

    paths:    one per item; None (or NaN) means the item has no image, which counts as missing.
    item_ids: named in messages (defaults to the position).
    Decoding releases the GIL, so a few threads overlap file reads with decoding.
    """
    if policy not in ("error", "skip"):
        raise ValueError(f"policy must be 'error' or 'skip', got {policy!r}")
    names = [str(i) for i in item_ids] if item_ids is not None else [f"#{k}" for k in range(len(paths))]
    ok = np.ones(len(paths), dtype=bool)
    result = ImageCheck(ok=ok)
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        problems = pool.map(image_problem, paths)
        bar = tqdm(problems, total=len(paths), desc="checking images", unit=" images", disable=not progress)
        for k, problem in enumerate(bar):
            if problem is None:
                continue
            if policy == "error":
                raise DppmgError(
                    f"item {names[k]}: image {paths[k]!r}: {problem}. "
                    "Fix or remove the file, or set data.image_policy=skip to drop such items"
                )
            ok[k] = False
            if problem in ("no image", "file not found"):
                result.missing += 1
            else:
                result.unreadable += 1
            if len(result.examples) < MAX_REPORTED:
                result.examples.append(f"{names[k]}: {paths[k]} ({problem})")
    finally:
        # On an error, do not wait for the checks still queued behind it.
        pool.shutdown(wait=True, cancel_futures=True)
    return result
