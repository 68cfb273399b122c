"""The image judge: encoder similarity and SSIM to the history (last 5 and all) and to the target, per pair."""

from pathlib import Path

import numpy as np
import pytest

from dppmg.image_encoder import EfficientNetEncoder
from stage2_generation.judges import IMAGE_JUDGE_METRICS, ImageJudge
from stage2_generation.policy import Pair

SHAPE = (24, 16)  # (H, W): a 2:3 poster, small


@pytest.fixture(scope="module")
def encoder():
    # The untrained stand-in at a small input: the judge's arithmetic is what is tested.
    return EfficientNetEncoder(weights=None, input_side=64)


def catalogue(n: int, seed: int = 0) -> np.ndarray:
    """n distinct images: smooth random colour fields, uint8 [n, H, W, 3]."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(n, 3, 2, 3), dtype=np.uint8)
    return np.repeat(np.repeat(coarse, SHAPE[0] // 3, axis=1), SHAPE[1] // 2, axis=2)


def judge_for(encoder, pixels, histories, has_image=None):
    has_image = np.ones(len(pixels), dtype=bool) if has_image is None else has_image
    return ImageJudge(encoder, encoder.encode(pixels), pixels, has_image, histories)


def test_a_copy_of_the_history_scores_one_and_last5_ignores_older_items(encoder):
    pixels = catalogue(10)
    # User 0: items 0..3 long ago, then item 9 five times over (the last five); user 1: only item 4.
    histories = {0: np.array([0, 1, 2, 3, 9, 9, 9, 9, 9]), 1: np.array([4])}
    judge = judge_for(encoder, pixels, histories)
    pairs = [Pair(0, "x", 9), Pair(1, "x", 5)]
    out = judge(pairs, pixels[[9, 4]])  # user 0 gets item 9 back; user 1 gets item 4 back
    assert set(out) == set(IMAGE_JUDGE_METRICS)
    assert out["judge_history_last5"][0] == pytest.approx(1.0, abs=1e-4)
    assert out["ssim_history_last5"][0] == pytest.approx(1.0, abs=1e-4)
    assert out["judge_history_all"][0] < out["judge_history_last5"][0]
    assert out["ssim_history_all"][0] < 0.99
    assert out["judge_target"][0] == pytest.approx(1.0, abs=1e-4)  # its target is item 9 too
    assert out["ssim_history_all"][1] == pytest.approx(1.0, abs=1e-4)
    assert out["ssim_target"][1] < 0.99  # user 1's target is item 5, not what was generated


def test_a_different_image_scores_lower_than_a_copy(encoder):
    pixels = catalogue(6, seed=1)
    judge = judge_for(encoder, pixels, {0: np.array([0, 1])})
    out = judge([Pair(0, "x", 0), Pair(0, "x", 0)], pixels[[0, 5]])  # item 0 itself, then item 5
    for metric in ("judge_target", "ssim_target", "ssim_history_all"):
        assert out[metric][0] > out[metric][1], metric


def test_missing_history_or_target_images_give_nan_not_zero(encoder):
    pixels = catalogue(4, seed=2)
    has_image = np.array([True, False, True, False])
    judge = judge_for(encoder, pixels, {0: np.array([1, 3]), 1: np.array([0, 1])}, has_image)
    out = judge([Pair(0, "x", 1), Pair(1, "x", 2), Pair(2, "x", None)], pixels[[0, 0, 0]])
    # User 0's history has no image and its target none: every metric is NaN.
    assert all(np.isnan(out[m][0]) for m in IMAGE_JUDGE_METRICS)
    # User 1: item 1 has no image, so the history is item 0 alone, which is what was generated.
    assert out["ssim_history_all"][1] == pytest.approx(1.0, abs=1e-4)
    assert np.isfinite(out["judge_target"][1])
    # An unknown user (no history) and no target item.
    assert np.isnan(out["judge_history_all"][2]) and np.isnan(out["ssim_target"][2])


def test_the_number_of_images_must_match_the_pairs(encoder):
    pixels = catalogue(3)
    judge = judge_for(encoder, pixels, {0: np.array([0])})
    with pytest.raises(ValueError, match="2 images for 1 pairs"):
        judge([Pair(0, "x", 0)], pixels[:2])


def test_centering_subtracts_the_catalogue_mean_from_real_and_generated_features(encoder):
    pixels = catalogue(8, seed=3)
    features = encoder.encode(pixels)
    centered = ImageJudge(
        encoder, features, pixels, np.ones(8, dtype=bool), {0: np.array([1, 2])}, centered=True
    )
    mean = features.mean(0)
    want = (features - mean) / np.linalg.norm(features - mean, axis=1, keepdims=True)
    np.testing.assert_allclose(centered.item_features.numpy(), want, atol=1e-5)
    out = centered([Pair(0, "x", 1)], pixels[[1]])
    # A copy of the target still scores 1, and the history mean is the centred cosine, not the raw one.
    assert out["judge_target"][0] == pytest.approx(1.0, abs=1e-4)
    assert out["judge_history_all"][0] == pytest.approx(float((want[[1, 2]] @ want[1]).mean()), abs=1e-4)
    raw = judge_for(encoder, pixels, {0: np.array([1, 2])})([Pair(0, "x", 1)], pixels[[1]])
    assert out["judge_history_all"][0] < raw["judge_history_all"][0]  # raw cosines share the catalogue's mean


def test_the_judge_can_encode_real_images_at_the_generation_shape(tmp_path, monkeypatch):
    """reference="shape": the real images are encoded from the same pixels the judge holds at the generation
    shape (as a generated image is), instead of at full size; an unknown reference is refused by name."""
    from dppmg.config import load_config
    from dppmg.data.format import load_dataset
    from dppmg.data.prepare import prepare
    from dppmg.errors import DppmgError
    from stage2_generation import judges as judges_mod

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(
        repo / "configs" / "debug.yaml",
        [f"data.root={tmp_path / 'data'}", f"features.cache_dir={tmp_path / 'c'}"],
    )
    ds = load_dataset(prepare(cfg, progress=False))
    stand_in = EfficientNetEncoder(weights=None, input_side=32)
    monkeypatch.setattr(judges_mod, "build_image_encoder", lambda name, device="cpu": stand_in)
    full = ImageJudge.build(ds, "efficientnet-lite0", SHAPE, tmp_path / "c", progress=False)
    small = ImageJudge.build(
        ds, "efficientnet-lite0", SHAPE, tmp_path / "c", progress=False, reference="shape"
    )
    rows = np.flatnonzero(small.has_image)
    np.testing.assert_allclose(
        small.item_features[rows].numpy(), stand_in.encode(small.item_pixels[rows]), atol=1e-5
    )
    assert not np.allclose(full.item_features[rows].numpy(), small.item_features[rows].numpy(), atol=1e-3)
    # A real image at the generation shape is now an exact copy for the judge: its target score is 1.
    item = int(rows[0])
    out = small([Pair(0, "x", item)], small.item_pixels[[item]])
    assert out["judge_target"][0] == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(DppmgError, match="reference must be one of"):
        ImageJudge.build(ds, "efficientnet-lite0", SHAPE, tmp_path / "c", progress=False, reference="half")
