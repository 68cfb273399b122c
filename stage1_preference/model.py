"""The modal-specific GNN: one LightGCN-style branch per modality, scored by the sum of the branches.

For a modality m with item features F_m [I, f] the branch's layer 0 is

    items:  e⁰_i = W_m · std(F_m)_i (+ q_{m,i}, a learned item id embedding, when `item_id_embedding`)
    users:  e⁰_u = p_{m,u}, a learned per-user preference embedding for that modality

and its output is the LightGCN layer mean  e = 1/(K+1) · Σ_k Âᵏ e⁰  over the normalised user–item graph Â
(He et al., "LightGCN", SIGIR 2020). With a frozen item–item kNN graph S_m built from F_m (LATTICE, Zhang et
al. MM 2021; FREEDOM, Zhou & Shen MM 2023) an item's output becomes (1 - w) · e_i + w · (S_m e⁰)_i.
An optional "id" branch is plain LightGCN over id embeddings (collaborative signal that gets no tokens).
The score of (u, i) is Σ_branches ⟨e_u, e_i⟩, so each branch's user vector is that user's preference for
the modality, the vector stage 1 quantizes into tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dppmg.errors import DppmgError
from stage1_preference.graph import csr_from_parts, csr_parts, propagate, sparse_matmul, transpose_csr

ID_BRANCH = "id"
# LightGCN's normal init: initial scores are near 0, so BPR starts at log 2 and Adam at 5e-3 is stable.
INIT_STD = 0.1
FEATURE_STD_FLOOR = 1e-6  # a constant feature column is left at zero instead of divided by zero
CSR_PARTS = ("crow", "col", "val")


@dataclass
class Embeddings:
    """Per-branch embeddings: users[b] [U, d], items[b] [I, d]."""

    users: dict[str, torch.Tensor]
    items: dict[str, torch.Tensor]


def standardise(features: torch.Tensor) -> torch.Tensor:
    """Columns to mean 0, std 1, so the projection's scale does not depend on the encoder's output scale."""
    f = features.detach().float()
    return (f - f.mean(0)) / f.std(0, unbiased=False).clamp_min(FEATURE_STD_FLOOR)


class ModalGNN(nn.Module):
    """Modal-specific LightGCN branches over one user–item graph.

    Args:
        num_users, num_items: U, I.
        item_features: modality → float [I, f_m]; one branch per modality, in this order. Frozen; kept on the
            module (moved by `.to`) but not saved in the state dict, since they come with the dataset.
        dim: d, the width of every branch.
        layers: K, propagation layers.
        item_id_embedding: add a learned id embedding to each modality's projected item features.
        id_branch: add the collaborative "id" branch (user and item id embeddings only).
        knn_graphs: modality → frozen item–item graph, sparse [I, I] (`graph.build_knn_graph`); optional.
        knn_weight: w, the item–item graph's share of an item's representation in those modalities.
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        item_features: dict[str, torch.Tensor],
        dim: int = 64,
        layers: int = 3,
        item_id_embedding: bool = True,
        id_branch: bool = False,
        knn_graphs: dict[str, torch.Tensor] | None = None,
        knn_weight: float = 0.5,
        user_embedding: bool = True,
    ):
        super().__init__()
        knn_graphs = knn_graphs or {}
        _check_arguments(num_items, item_features, dim, layers, id_branch, knn_graphs, knn_weight)
        self.num_users, self.num_items, self.dim, self.layers = num_users, num_items, dim, layers
        self.item_id_embedding, self.knn_weight = item_id_embedding, knn_weight
        self.modalities = list(item_features)
        self.branches = self.modalities + ([ID_BRANCH] if id_branch else [])
        self.knn_modalities = list(knn_graphs)

        for m, f in item_features.items():
            self.register_buffer(f"features_{m}", standardise(f), persistent=False)
        # Sparse buffers cannot be deep-copied, so each kNN graph (and its transpose, for the backward pass)
        # is kept as its three CSR index/value tensors and reassembled, without copying, in `_knn`.
        for m, g in knn_graphs.items():
            g = g.to_sparse_csr() if g.layout != torch.sparse_csr else g
            for name, graph in ((f"knn_{m}", g), (f"knn_t_{m}", transpose_csr(g))):
                for part, t in zip(CSR_PARTS, csr_parts(graph)):
                    self.register_buffer(f"{name}_{part}", t, persistent=False)

        # Without a free user embedding, a modality branch describes a user only through the features of the
        # items around them (user layer 0 is zero): its vector cannot absorb collaborative signal of other
        # modalities, which makes the branch, and its tokens, modal-specific. The id branch always has one.
        self.user_embedding = user_embedding
        free = self.branches if user_embedding else [b for b in self.branches if b == ID_BRANCH]
        self.user_emb = nn.ModuleDict({b: nn.Embedding(num_users, dim) for b in free})
        self.item_proj = nn.ModuleDict({m: nn.Linear(f.shape[1], dim) for m, f in item_features.items()})
        id_items = self.branches if item_id_embedding else [ID_BRANCH] if id_branch else []
        self.item_id = nn.ModuleDict({b: nn.Embedding(num_items, dim) for b in id_items})
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for emb in [*self.user_emb.values(), *self.item_id.values()]:
            nn.init.normal_(emb.weight, std=INIT_STD)
        for proj in self.item_proj.values():
            # Standardised inputs have unit variance per column: this gives outputs of std INIT_STD, like ids.
            nn.init.normal_(proj.weight, std=INIT_STD / proj.in_features**0.5)
            nn.init.zeros_(proj.bias)

    def __repr__(self) -> str:
        knn = f", knn={self.knn_modalities}, knn_weight={self.knn_weight}" if self.knn_modalities else ""
        return (
            f"{self.__class__.__name__}({self.num_users} users, {self.num_items} items, branches={self.branches}, "
            f"dim={self.dim}, layers={self.layers}, item_id_embedding={self.item_id_embedding}, "
            f"user_embedding={self.user_embedding}{knn})"
        )

    def _item_layer0(self, branch: str) -> torch.Tensor:
        """[I, d]: projected features (+ id embedding) for a modality; the id embedding for the id branch."""
        out = None
        if branch in self.item_proj:
            out = self.item_proj[branch](getattr(self, f"features_{branch}"))
        if branch in self.item_id:
            ids = self.item_id[branch].weight
            out = ids if out is None else out + ids
        return out

    def _user_layer0(self, branch: str) -> torch.Tensor:
        if branch in self.user_emb:
            return self.user_emb[branch].weight
        proj = self.item_proj[branch]
        return proj.weight.new_zeros(self.num_users, self.dim)

    def _knn(self, name: str) -> torch.Tensor:
        parts = tuple(getattr(self, f"{name}_{part}") for part in CSR_PARTS)
        return csr_from_parts(parts, (self.num_items, self.num_items))

    def layer0(self) -> Embeddings:
        """The layer-0 embeddings of every user and item per branch (what the L2 regulariser penalises)."""
        return Embeddings(
            users={b: self._user_layer0(b) for b in self.branches},
            items={b: self._item_layer0(b) for b in self.branches},
        )

    def forward(self, adj: torch.Tensor) -> Embeddings:
        """Propagate every branch over `adj`, the symmetric normalised graph from `graph.build_norm_adj`.

        adj: sparse [(U+I), (U+I)]; it must be symmetric, since the backward pass relies on it.
        """
        n = self.num_users + self.num_items
        if tuple(adj.shape) != (n, n):
            raise DppmgError(
                f"adjacency has shape {tuple(adj.shape)}, expected ({n}, {n}) for {self.num_users} users + "
                f"{self.num_items} items: was it built from another dataset?"
            )
        l0 = self.layer0()
        users, items = {}, {}
        for b in self.branches:
            # One product per branch: stacking the branches into one wider product was slower (graph.py).
            out = propagate(adj, torch.cat([l0.users[b], l0.items[b]]), self.layers)  # (U+I, d)
            users[b], items[b] = out[: self.num_users], out[self.num_users :]
            if b in self.knn_modalities:
                knn = sparse_matmul(self._knn(f"knn_{b}"), self._knn(f"knn_t_{b}"), l0.items[b])
                items[b] = (1 - self.knn_weight) * items[b] + self.knn_weight * knn
        return Embeddings(users=users, items=items)


def _check_arguments(
    num_items: int,
    item_features: dict[str, torch.Tensor],
    dim: int,
    layers: int,
    id_branch: bool,
    knn_graphs: dict[str, torch.Tensor],
    knn_weight: float,
) -> None:
    if not item_features and not id_branch:
        raise DppmgError(
            "ModalGNN needs at least one branch: item features of some modality, or id_branch=True"
        )
    if dim <= 0 or layers < 0:
        raise DppmgError(f"ModalGNN needs dim > 0 and layers >= 0, got dim={dim}, layers={layers}")
    for m, f in item_features.items():
        if m == ID_BRANCH or not m.isidentifier():
            raise DppmgError(
                f"modality name {m!r} is not usable: it must be an identifier other than {ID_BRANCH!r}"
            )
        if f.dim() != 2 or f.shape[0] != num_items:
            raise DppmgError(
                f"features of modality {m!r} have shape {tuple(f.shape)}, expected [{num_items}, dim]"
            )
    for m, g in knn_graphs.items():
        if m not in item_features:
            raise DppmgError(f"a kNN graph was given for modality {m!r}, which has no item features")
        if tuple(g.shape) != (num_items, num_items):
            raise DppmgError(
                f"kNN graph of {m!r} has shape {tuple(g.shape)}, expected ({num_items}, {num_items})"
            )
    if not 0.0 <= knn_weight <= 1.0:
        raise DppmgError(f"knn_weight must lie in [0, 1], got {knn_weight}")


# ---------------------------------------------------------------------------------------------------------
# Scores and the BPR objective


def score(users: dict[str, torch.Tensor], items: dict[str, torch.Tensor]) -> torch.Tensor:
    """Paired rows: Σ over the users' branches of ⟨users[b][n], items[b][n]⟩; [B, d] each → [B]."""
    return sum((u * items[b]).sum(-1) for b, u in users.items())


def score_all(users: dict[str, torch.Tensor], items: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every user against every item: Σ over the users' branches of users[b] [B, d] @ items[b]ᵀ [d, I] → [B, I]."""
    return sum(u @ items[b].T for b, u in users.items())


def bpr_loss(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Bayesian personalised ranking: mean of -log σ(pos - neg) = softplus(neg - pos); [B], [B] → scalar."""
    return F.softplus(neg - pos).mean()


def l2_penalty(layer0: Embeddings, u: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """L2 on the batch's layer-0 rows over all branches, LightGCN's convention: sum of squares / 2B."""
    total = sum(
        layer0.users[b][u].pow(2).sum()
        + layer0.items[b][pos].pow(2).sum()
        + layer0.items[b][neg].pow(2).sum()
        for b in layer0.users
    )
    return total / (2 * len(u))


def pair_keys(user_idx: np.ndarray, item_idx: np.ndarray, num_items: int) -> np.ndarray:
    """(user, item) pairs as sorted unique int64 keys user · I + item, for fast membership tests."""
    keys = np.sort(np.asarray(user_idx, np.int64) * num_items + np.asarray(item_idx, np.int64))
    # Not np.unique: on numpy 2.4 it took ~14× longer than sort + mask for 1M keys (measured).
    return keys[np.concatenate([[True], keys[1:] != keys[:-1]])] if len(keys) else keys


def sample_bpr(
    user_idx: np.ndarray,
    item_idx: np.ndarray,
    num_items: int,
    rng: np.random.Generator,
    train_sets: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One uniform negative per positive (user_idx[e], item_idx[e]): an item the user has no train pair with.

    Vectorised rejection sampling: draw every negative at once, redraw only those that hit a train pair.

    Args:
        user_idx, item_idx: int [E], the positives.
        num_items: I.
        rng: the generator (its state is the sampler's, so a resumed run continues the same stream).
        train_sets: the user's train pairs as `pair_keys(...)` of the whole train split; computed from the
            positives when None. Pass it when the positives are only part of the train split (a shard).

    Returns:
        (users, positives, negatives), LongTensors [E].
    """
    users, pos = np.asarray(user_idx, np.int64), np.asarray(item_idx, np.int64)
    if len(pos) and (pos.min() < 0 or pos.max() >= num_items):
        raise DppmgError(f"item_idx must lie in [0, {num_items}), got values in [{pos.min()}, {pos.max()}]")
    keys = pair_keys(users, pos, num_items) if train_sets is None else train_sets
    per_user = np.bincount(keys // num_items)
    saturated = np.flatnonzero(per_user >= num_items)
    if len(saturated) and np.isin(saturated, users).any():
        raise DppmgError(
            f"user_idx {int(saturated[0])} interacted with all {num_items} items in train: no negative to sample"
        )
    neg = rng.integers(0, num_items, size=len(users))
    todo = np.arange(len(users))
    while todo.size:
        todo = todo[_contains(keys, users[todo] * num_items + neg[todo])]
        neg[todo] = rng.integers(0, num_items, size=todo.size)
    # Copies: the caller's arrays stay theirs.
    return torch.from_numpy(users.copy()), torch.from_numpy(pos.copy()), torch.from_numpy(neg)


def _contains(sorted_keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Boolean [Q]: whether each query is in `sorted_keys` (binary search, no hashing)."""
    if not len(sorted_keys):
        return np.zeros(len(queries), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_keys, queries), len(sorted_keys) - 1)
    return sorted_keys[at] == queries
