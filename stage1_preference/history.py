"""The history user encoder: a user's vector is the recency-weighted mean of their latest items' vectors.

With `stage1.user_encoder: history` a user's vector in a branch is not a free embedding propagated over the
graph but a function of what they watched last:

    u_b = Σ_{r<L} 2^(-r/h) · e_b[i_r]  /  Σ_{r<L} 2^(-r/h)

over the user's L latest train items i_0 (the most recent), i_1, … and the branch's item vectors e_b (the GNN's
output). Training is next-item prediction at every position of every history: the vector pooled from the L items
before position t must rank the item at t. No (user, item) pair the model is asked to rank is inside the vector
that ranks it, unlike BPR over a graph that holds the pair, and leave-last-out tests exactly this: the next item
after the history. The pooling is the continuous-bag-of-items user tower of Covington et al. ("Deep Neural
Networks for YouTube Recommendations", RecSys 2016) with a recency decay instead of a learned attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dppmg.data.processing import position_in_group
from dppmg.errors import DppmgError
from stage1_preference.graph import chronological_order

PAD = -1  # an empty context slot (a position with fewer than L items before it)


@dataclass
class Histories:
    """Training examples and every user's scoring context.

    example_users, targets: int64 [N], one example per train interaction that has at least one before it.
    contexts: int64 [N, L], column r the item r + 1 positions before the target (PAD where there is none).
    user_contexts: int64 [U, L], column r the user's r-th latest train item (PAD where there is none).
    """

    example_users: np.ndarray
    targets: np.ndarray
    contexts: np.ndarray
    user_contexts: np.ndarray


def build_histories(
    user_idx: np.ndarray, item_idx: np.ndarray, timestamp: np.ndarray, num_users: int, length: int
) -> Histories:
    """Next-item examples and scoring contexts of length L = `length` from the train interactions."""
    if length < 1:
        raise DppmgError(f"the history length must be >= 1, got {length}")
    order = chronological_order(user_idx, timestamp)
    users = np.asarray(user_idx, np.int64)[order]
    items = np.asarray(item_idx, np.int64)[order]
    pos, size = position_in_group(users)
    n = len(users)
    contexts = np.full((n, length), PAD, dtype=np.int64)
    for r in range(length):  # column r: the item r + 1 rows earlier, if it is the same user's
        has = pos > r
        contexts[has, r] = items[np.flatnonzero(has) - 1 - r]
    is_example = pos > 0
    user_contexts = np.full((num_users, length), PAD, dtype=np.int64)
    last = np.flatnonzero(pos == size - 1)  # each user's latest row
    user_contexts[users[last], 0] = items[last]
    user_contexts[users[last], 1:] = contexts[last, : length - 1]
    return Histories(users[is_example], items[is_example], contexts[is_example], user_contexts)


def recency_kernel(length: int, halflife: float) -> torch.Tensor:
    """float [L]: 2^(-r / h) for r = 0 … L-1."""
    if halflife <= 0:
        raise DppmgError(f"the history half-life must be positive, got {halflife}")
    return torch.pow(0.5, torch.arange(length, dtype=torch.float32) / halflife)


def pool_history(items: torch.Tensor, contexts: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """[N, d]: the kernel-weighted mean of items[contexts] over the non-PAD slots of each row (0 for none).

    items: [I, d]; contexts: int64 [N, L] (PAD = -1); kernel: [L] weights of the slots.
    """
    present = contexts != PAD
    weights = present.to(items.dtype) * kernel.to(items)
    weights = weights / weights.sum(1, keepdim=True).clamp_min(torch.finfo(items.dtype).tiny)
    gathered = items[contexts.clamp_min(0)]  # [N, L, d]; PAD rows gather item 0 with weight 0
    return torch.einsum("nl,nld->nd", weights, gathered)
