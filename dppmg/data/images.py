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
    """ok: bool [N], True where the file exists and decodes; counts and a few examples of the rest.

    converted: mode -> count of the usable images that are not RGB (read as RGB by `dppmg.data.imageio.to_rgb`);
    sizes: the number of distinct (width, height) among the usable images (all are resized when read).
    """

    ok: np.ndarray
    missing: int = 0
    unreadable: int = 0
    examples: list[str] = field(default_factory=list)
    converted: dict[str, int] = field(default_factory=dict)
    sizes: int = 0

    @property
    def n_bad(self) -> int:
        return self.missing + self.unreadable


def image_problem(path: str | Path | None) -> str | None:
    """Why the image at `path` cannot be used ("no image", "file not found", "unreadable: ..."), or None."""
    return _inspect(path)[0]


def _inspect(path: str | Path | None) -> tuple[str | None, str, tuple[int, int]]:
    """(problem or None, PIL mode, (width, height)) of the image at `path`."""
    if path is None or (isinstance(path, float) and np.isnan(path)) or str(path) == "":
        return "no image", "", (0, 0)
    p = Path(path)
    if not p.is_file():
        return "file not found", "", (0, 0)
    try:
        with Image.open(p) as im:
            mode, size = im.mode, im.size  # before the draft, which may shrink and convert a JPEG
            im.draft("RGB", CHECK_SIZE)
            im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"unreadable: {type(e).__name__}: {e}", "", (0, 0)
    return None, mode, size


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
    sizes: set[tuple[int, int]] = set()
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        checks = pool.map(_inspect, paths)
        bar = tqdm(checks, total=len(paths), desc="checking images", unit=" images", disable=not progress)
        for k, (problem, mode, size) in enumerate(bar):
            if problem is None:
                sizes.add(size)
                if mode != "RGB":
                    result.converted[mode] = result.converted.get(mode, 0) + 1
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
    result.sizes = len(sizes)
    return result
