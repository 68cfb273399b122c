"""Item features before they enter the GNN: making one modality's features specific to it.

Item text often describes what the image shows ("a red striped rug"). A user's text-branch vector is a mean
over many items, so even occasional mentions add up, and the text tokens end up encoding visual taste too.
`residualize` removes from one modality's features the part that is linearly predictable from another's
(ridge regression across items), leaving what only that modality says. This is the modality-specific /
shared split used in multimodal recommenders (e.g. the specific components in MICRO, Zhang et al. 2022),
done here once, in closed form, on frozen features.
"""

from __future__ import annotations

import torch


def residualize(target: torch.Tensor, against: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
    """target [I, d1] minus its ridge prediction from `against` [I, d2]; the result is uncorrelated with `against`.

    Both are centred first, so the mean of `target` is removed too (a constant offset carries no preference).
    """
    t = target.double() - target.double().mean(0, keepdim=True)
    a = against.double() - against.double().mean(0, keepdim=True)
    gram = a.T @ a  # (d2, d2)
    gram += ridge * gram.diagonal().mean() * torch.eye(a.shape[1], dtype=gram.dtype, device=gram.device)
    w = torch.linalg.solve(gram, a.T @ t)  # (d2, d1)
    return (t - a @ w).to(target.dtype)
