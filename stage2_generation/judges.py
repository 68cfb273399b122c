"""Judges of generated images that the reward never sees: a pretrained image encoder, and SSIM.

The rewards compare images in the dataset's scorer space (rewards.py), so a gain in them may be the policy
learning the scorer. A judge is a second opinion the RL step could not optimise: the protocol PMG and Pigeon use
for personalization (similarity of the generated image to the user's history images: the last 5, and all of
them) and for fidelity (similarity to the target item's image), measured

- in the feature space of a pretrained image encoder (EfficientNet-Lite0, ImageNet; dppmg/image_encoder.py),
  where real images are encoded as the catalogue stores them (full-size posters) and generated ones are
  resized to the encoder's input the same way; absolute values are lower for small, blurry generations, but
  every condition is generated at the same size, so differences between conditions are what they say.
  The cosines are taken after subtracting the catalogue's mean feature (`centered`, the default in config):
  pooled CNN features share a large common direction, and raw cosines could not tell, at 32 x 48, a user's own
  next poster from a random one, while centred ones do (benchmarks/judge_headroom.py measures both);
- by SSIM (Wang et al., 2004; no weights), with each real image resized to the generated one's shape.

Per pair, `ImageJudge.__call__` returns every metric of IMAGE_JUDGE_METRICS (NaN where a pair has no history
image, or its target no image).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from dppmg.config import JUDGE_REFERENCES
from dppmg.data.format import ProcessedDataset
from dppmg.data.imageio import load_image_array
from dppmg.errors import DppmgError
from dppmg.image_encoder import EfficientNetEncoder, build_image_encoder, encode_image_files
from dppmg.io import atomic_path
from dppmg.log import logger
from stage2_generation.policy import Pair

LAST = 5  # "the user's 5 latest history images" (Pigeon's history-side protocol)
IMAGE_JUDGE_METRICS = (
    "judge_history_last5",  # mean encoder cosine to the last 5 history images
    "judge_history_all",  # ... to every training history image
    "judge_target",  # encoder cosine to the target item's image (fidelity)
    "ssim_history_last5",
    "ssim_history_all",
    "ssim_target",
)


def full_histories(ds: ProcessedDataset) -> dict[int, np.ndarray]:
    """user -> every training item, oldest first (the reward's histories stop at the last 50)."""
    train = ds.split("train").sort_values(["user_idx", "timestamp"], kind="stable")
    return {int(u): g["item_idx"].to_numpy().copy() for u, g in train.groupby("user_idx")}


class ImageJudge:
    """Scores generated images against the users' history images and the target images.

    Args:
        encoder: the pretrained image encoder (`encode(uint8 images) -> [N, D]`).
        item_features: float32 [I, D], normalised encoder features of every item image (any row where
            `has_image` is False).
        item_pixels: uint8 [I, H, W, 3], every item image at the generation shape (for SSIM).
        has_image: bool [I].
        histories: user -> training item indices, oldest first.
        centered: compare in the catalogue-centred feature space: the mean feature of the item images is
            subtracted from every real and generated feature before the cosine (and the rows renormalised).
    """

    def __init__(
        self,
        encoder: EfficientNetEncoder,
        item_features: np.ndarray,
        item_pixels: np.ndarray,
        has_image: np.ndarray,
        histories: dict[int, np.ndarray],
        centered: bool = False,
    ):
        self.encoder = encoder
        self.has_image = np.array(has_image, dtype=bool)  # a copy: never read-only
        features = torch.from_numpy(np.array(item_features, dtype=np.float32))  # a copy: never read-only
        self.center = features[torch.from_numpy(self.has_image)].mean(0) if centered else None
        self.item_features = self._recenter(features)
        self.item_pixels = item_pixels
        self.histories = histories

    def _recenter(self, features: torch.Tensor) -> torch.Tensor:
        if self.center is None:
            return features
        return torch.nn.functional.normalize(features - self.center, dim=-1)

    @classmethod
    def build(
        cls,
        ds: ProcessedDataset,
        name: str,
        shape: tuple[int, int],
        cache_dir: str | Path,
        device: str = "cpu",
        progress: bool = True,
        reference: str = "full",
        centered: bool = False,
    ) -> ImageJudge:
        """The judge `name` for `ds`, with item pixels at `shape` = (H, W) and item features from

        reference="full":  the full-size item images (the dataset's own features when the same encoder made
                           them, else computed once and cached under `cache_dir`);
        reference="shape": the item images at `shape`, encoded as a generated image is (so real and generated
                           images are seen at the same resolution).
        """
        if reference not in JUDGE_REFERENCES:
            raise DppmgError(f"image judge reference must be one of {JUDGE_REFERENCES}, got {reference!r}")
        encoder = build_image_encoder(name, device)
        has_image = ds.items["image"].notna().to_numpy()
        rows = np.flatnonzero(has_image)
        paths = [ds.image_path(int(i)) for i in rows]
        pixels = np.zeros((ds.num_items, *shape, 3), dtype=np.uint8)
        pixels[rows] = load_image_array(paths, shape, progress=progress)
        features = np.zeros((ds.num_items, encoder.dim), dtype=np.float32)
        stored = ds.meta.get("features", {}).get("image", {}).get("encoder")
        if reference == "shape":
            features[rows] = encoder.encode(pixels[rows], progress=progress)
        elif stored == encoder.name and "image" in ds.features:
            features[rows] = np.asarray(ds.features["image"], dtype=np.float32)[rows]
        else:
            cached = Path(cache_dir) / f"judge_{encoder.name}_{ds.meta['content_hash']}.npy"
            if cached.is_file():
                features = np.load(cached)
            else:
                logger.info(
                    "image judge: encoding %d item images with %s (cached in %s)", len(rows), name, cached
                )
                features[rows] = encode_image_files(encoder, paths, progress)
                with atomic_path(cached) as tmp, open(tmp, "wb") as f:
                    np.save(f, features)
        return cls(encoder, features, pixels, has_image, full_histories(ds), centered=centered)

    def __call__(self, pairs: Sequence[Pair], images: np.ndarray) -> dict[str, np.ndarray]:
        """Every metric of IMAGE_JUDGE_METRICS for each pair's generated image: float64 [N] each."""
        if len(images) != len(pairs):
            raise ValueError(f"ImageJudge: {len(images)} images for {len(pairs)} pairs")
        gen = self._recenter(torch.from_numpy(self.encoder.encode(images)))  # [N, D]
        gen_pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
        out = {m: np.full(len(pairs), np.nan) for m in IMAGE_JUDGE_METRICS}
        for k, p in enumerate(pairs):
            history = self.histories.get(p.user, np.zeros(0, dtype=np.int64))
            history = history[self.has_image[history]]
            groups = {"history_last5": history[-LAST:], "history_all": history}
            if p.item is not None and self.has_image[p.item]:
                groups["target"] = np.array([p.item])
            for group, rows in groups.items():
                if len(rows) == 0:
                    continue
                out[f"judge_{group}"][k] = float((self.item_features[rows] @ gen[k]).mean())
                real = torch.from_numpy(self.item_pixels[rows]).permute(0, 3, 1, 2).float() / 255
                fake = gen_pixels[k : k + 1].expand_as(real)
                ssim = structural_similarity_index_measure(fake, real, data_range=1.0, reduction="none")
                out[f"ssim_{group}"][k] = float(ssim.mean())
        return out
