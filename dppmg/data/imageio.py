"""Moving item images into a processed dataset and reading them back as arrays."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from dppmg.errors import DppmgError

if TYPE_CHECKING:  # torch only where tensors are made: `dppmg data prepare` reports bad input before it loads
    import torch

IMAGES_DIR = "images"


def image_name(item_idx: int, suffix: str = ".png") -> str:
    """The path of an item's image inside a processed dataset, relative to the dataset folder."""
    return f"{IMAGES_DIR}/{item_idx:07d}{suffix.lower()}"


def write_image_array(images: np.ndarray, root: Path, progress: bool = True) -> list[str]:
    """Save uint8 [N, H, W, 3] as PNGs under root/images/; returns the relative paths, row i → item i."""
    (root / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    names = []
    for i in tqdm(range(len(images)), desc="write images", unit="img", disable=not progress, leave=False):
        name = image_name(i)
        Image.fromarray(images[i]).save(root / name, format="PNG", compress_level=1)
        names.append(name)
    return names


def copy_image_files(paths: Sequence[str | None], root: Path, progress: bool = True) -> list[str | None]:
    """Copy source images (row i → item i) into root/images/, hard-linking when the filesystem allows.

    The processed dataset then stands on its own: deleting or moving the raw folder does not break it.
    """
    (root / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    names: list[str | None] = []
    for i, src in enumerate(tqdm(paths, desc="copy images", unit="img", disable=not progress, leave=False)):
        if src is None:
            names.append(None)
            continue
        name = image_name(i, Path(src).suffix or ".png")
        try:
            os.link(src, root / name)
        except OSError:
            shutil.copyfile(src, root / name)
        names.append(name)
    return names


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL image as RGB: 16-bit scaled to 8 bits, transparent parts on white.

    PIL's own `convert("RGB")` clips 16-bit values at 255 (a 16-bit photo turns white) and drops alpha
    (transparent product shots turn to whatever colour the hidden pixels hold, often black).
    """
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale; PIL reads some 16-bit PNGs as "I"
        im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8))
    if "A" in im.getbands() or "transparency" in im.info:
        im = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
    return im.convert("RGB")


def load_image_array(
    paths: Sequence[str | Path], size: int | tuple[int, int], progress: bool = True
) -> np.ndarray:
    """Read images as uint8 [N, H, W, 3] (RGB, resized with bicubic filtering; aspect not kept).

    `size` is the side of a square, or (height, width).
    """
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    out = np.empty((len(paths), height, width, 3), dtype=np.uint8)
    for i, p in enumerate(tqdm(paths, desc="read images", unit="img", disable=not progress, leave=False)):
        with Image.open(p) as im:
            im = to_rgb(im)
            if im.size != (width, height):  # PIL sizes are (width, height)
                im = im.resize((width, height), Image.Resampling.BICUBIC)
            out[i] = np.asarray(im)
    return out


def load_image(path: str | Path, max_side: int | None = None) -> np.ndarray:
    """One image as uint8 [H, W, 3] at its own aspect ratio, shrunk so that its longer side is at most `max_side`."""
    with Image.open(path) as im:
        im = to_rgb(im)
        if max_side is not None and max(im.size) > max_side:
            im.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
        return np.asarray(im)


def as_pixels01(images: np.ndarray | torch.Tensor, device: str | torch.device | None = None) -> torch.Tensor:
    """uint8 [N, H, W, 3] or float [N, 3, H, W] in [0, 1] → float [N, 3, H, W] in [0, 1] (on `device`).

    A uint8 batch moves to the device before it becomes float, so a large catalogue crosses as bytes.
    """
    import torch

    x = torch.as_tensor(images)
    if x.ndim != 4:
        raise DppmgError(f"images must be a batch [N, H, W, 3] uint8 or [N, 3, H, W] float, got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        if x.shape[-1] != 3:
            raise DppmgError(f"uint8 images must be [N, H, W, 3], got {tuple(x.shape)}")
        return x.to(device).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[1] != 3:
        raise DppmgError(f"float images must be [N, 3, H, W] in [0, 1], got {tuple(x.shape)}")
    return x.to(device, torch.float32)
