import numpy as np
import pytest
import torch

from dppmg.seeding import seed_everything


@pytest.fixture
def restore_determinism():
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _gather_grad(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The gradient of a table through a many-times-repeated gather (stage 1's user and item lookups): each row of
    the gradient is a sum of different numbers, whose float result depends on the order they are added in."""
    table = torch.randn(1000, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    (table[rows] * weights).sum().backward()
    return table.grad


def test_seeding_repeats_numbers_and_gradients(restore_determinism):
    seed_everything(3)
    first = np.random.rand(), torch.rand(3)
    seed_everything(3)
    assert np.random.rand() == first[0] and torch.equal(torch.rand(3), first[1])
    assert torch.are_deterministic_algorithms_enabled()
    g = torch.Generator().manual_seed(2)
    rows, weights = torch.randint(0, 1000, (16384,), generator=g), torch.randn(16384, 64, generator=g)
    # Without the flag, two threads gave a different sum on every repetition here.
    grads = [_gather_grad(rows, weights) for _ in range(8)]
    assert all(torch.equal(g, grads[0]) for g in grads[1:])


def test_seeding_can_leave_kernels_alone(restore_determinism):
    torch.use_deterministic_algorithms(False)
    seed_everything(0, deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled()
