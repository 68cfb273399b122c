"""Modal specificity: removing from one modality's features what the other predicts, and only that."""

import torch

from stage1_preference.features import cross_fitted_prediction, residualize


def _shared_world(n: int, noise_dims: int, seed: int = 0):
    """text = A·image + private noise, with `noise_dims` extra image dimensions that predict nothing."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, 4, generator=g, dtype=torch.float64)
    image = torch.cat([shared, torch.randn(n, noise_dims, generator=g, dtype=torch.float64)], dim=1)
    private = torch.randn(n, 6, generator=g, dtype=torch.float64)
    text = torch.cat([shared @ torch.randn(4, 6, generator=g, dtype=torch.float64), private], dim=1)
    return text, image, private


def test_a_fixed_small_ridge_leaves_text_uncorrelated_with_the_image():
    text, image, _ = _shared_world(300, noise_dims=4)
    out = residualize(text, image, ridge=1e-8)
    centred = image - image.mean(0)
    before = (centred.T @ (text - text.mean(0))).abs().max()
    assert (centred.T @ out).abs().max() < 1e-6 * before
    assert torch.allclose(out.mean(0), torch.zeros(12, dtype=torch.float64), atol=1e-9)


def test_the_predictable_part_is_removed_and_the_private_part_kept():
    text, image, private = _shared_world(400, noise_dims=20)
    out = residualize(text, image)
    fit = cross_fitted_prediction(text - text.mean(0), image - image.mean(0))
    assert fit is not None and fit.r2 > 0.3  # a quarter of the text is the shared part
    # What is left is the private part: the first six columns lose the shared signal, the last six stay.
    shared_left = out[:, :6].square().sum() / (text[:, :6] - text[:, :6].mean(0)).square().sum()
    kept = torch.nn.functional.cosine_similarity(
        out[:, 6:].flatten(), (private - private.mean(0)).flatten(), dim=0
    )
    assert shared_left < 0.1 and kept > 0.95


def test_wide_unrelated_features_remove_nothing_but_the_mean():
    """Many image dimensions for few items, none related to the text: a loose ridge would 'explain' most of the
    text in-sample (the failure on MovieLens posters); cross-validation finds nothing predictable."""
    g = torch.Generator().manual_seed(3)
    text = torch.randn(120, 16, generator=g, dtype=torch.float64) + 5.0
    image = torch.randn(120, 100, generator=g, dtype=torch.float64)
    loose = residualize(text, image, ridge=1e-2)
    assert loose.square().sum() < 0.6 * (text - text.mean(0)).square().sum()  # the in-sample overfit
    out = residualize(text, image)
    assert torch.allclose(out, text - text.mean(0))
    fit = cross_fitted_prediction(text - text.mean(0), image - image.mean(0))
    assert fit is not None and fit.r2 <= 0


def test_too_few_items_to_cross_validate_remove_only_the_mean():
    text, image, _ = _shared_world(6, noise_dims=0)
    assert cross_fitted_prediction(text, image) is None
    assert torch.allclose(residualize(text, image), text - text.mean(0))
