"""Baselines in the same harness as our model: same split, same BPR sampler, same metric code and masking.

- popularity: every user gets the items ranked by their number of training interactions;
- MF-BPR: a dot product of user and item id embeddings, trained with BPR;
- torch_geometric's LightGCN, trained with its own `recommendation_loss` (BPR + L2) on the
  `edge_index` of the training interactions.

MF and LightGCN keep the epoch with the best validation Recall@20 (simple early stopping) and report
the test metrics of that epoch. "epoch_seconds" is the mean time of one training epoch (sampling and
updates, not the validation), measured the same way as for our model.

We rank with `full_ranking_metrics`, not with `LightGCN.recommend`: `recommend` ranks over every node
(users too, unless `dst_index` is given) and does not remove the items a user has already seen.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn.models import LightGCN
from torch_geometric.utils import to_torch_csr_tensor
from tqdm.auto import tqdm

from dppmg.config import Stage1Config
from dppmg.data.format import ProcessedDataset
from dppmg.errors import DppmgError
from stage1_preference.evaluate import DEFAULT_KS, full_ranking_metrics
from stage1_preference.graph import build_norm_adj, recency_weights
from stage1_preference.model import ID_BRANCH, ModalGNN, bpr_loss, l2_penalty, sample_bpr

EARLY_STOP_METRIC = "recall@20"
EVAL_BATCH_SIZE = 1024
BASELINE_NAMES = ("popularity", "mf_bpr", "lightgcn")  # run by default; "lightgcn_csr" on request


def train_popularity(
    ds: ProcessedDataset, ks: Sequence[int] = DEFAULT_KS, batch_size: int = EVAL_BATCH_SIZE
) -> dict[str, Any]:
    """Rank items by their training interaction count; no training, so epoch_seconds is the counting time."""
    t0 = time.perf_counter()
    counts = np.bincount(ds.split("train")["item_idx"].to_numpy(), minlength=ds.num_items)
    counts = torch.as_tensor(counts, dtype=torch.float32)  # [I]
    seconds = time.perf_counter() - t0

    def score_fn(users: torch.Tensor) -> torch.Tensor:
        return counts.repeat(len(users), 1)  # [B, I], a new tensor: the ranking masks it in place

    test = full_ranking_metrics({}, {}, ds.interactions, "test", ks, batch_size, score_fn=score_fn)
    return {**test, "epoch_seconds": seconds}


class MatrixFactorization(nn.Module):
    """MF-BPR: score(u, i) = <p_u, q_i> with free id embeddings p [U, d], q [I, d]."""

    def __init__(self, num_users: int, num_items: int, dim: int):
        super().__init__()
        self.users = nn.Embedding(num_users, dim)
        self.items = nn.Embedding(num_items, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.users.weight)
        nn.init.xavier_uniform_(self.items.weight)

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """User [U, d] and item [I, d] vectors for ranking."""
        return self.users.weight, self.items.weight

    def loss(self, u: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, reg_weight: float) -> torch.Tensor:
        """BPR + L2 on the batch's embeddings, in the LightGCN convention (sum of squares / 2B), as our model."""
        pu, qp, qn = self.users(u), self.items(pos), self.items(neg)
        bpr = bpr_loss((pu * qp).sum(-1), (pu * qn).sum(-1))
        reg = (pu.square().sum() + qp.square().sum() + qn.square().sum()) / (2 * len(u))
        return bpr + reg_weight * reg

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.users.num_embeddings}, {self.items.num_embeddings}, dim={self.users.embedding_dim})"


class PygLightGCN(nn.Module):
    """torch_geometric's LightGCN on the user–item graph: nodes 0..U-1 are users, U..U+I-1 items.

    `sparse_adjacency=False` passes `edge_index` [2, 2E], as PyG's own example does (per-edge gather and
    scatter); True passes the same graph as a torch CSR tensor, which LGConv multiplies with spmm: the
    embeddings are identical, the epoch several times faster on CPU.
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        train_users: np.ndarray,
        train_items: np.ndarray,
        dim: int,
        layers: int,
        sparse_adjacency: bool = False,
        edge_weight: np.ndarray | None = None,
        loss: str = "bpr",
    ):
        super().__init__()
        if loss not in ("bpr", "softmax"):
            raise DppmgError(f"LightGCN's loss must be bpr or softmax, got {loss!r}")
        self.num_users, self.num_items, self.loss_kind = num_users, num_items, loss
        self.model = LightGCN(num_users + num_items, dim, layers)
        u = torch.tensor(train_users, dtype=torch.long)  # copies: arrays read from parquet are read-only
        i = torch.tensor(train_items, dtype=torch.long) + num_users
        # LGConv normalises by degree over the graph as given, so it needs both directions.
        edge_index = torch.stack([torch.cat([u, i]), torch.cat([i, u])])
        # Optional per-interaction weights (`graph.recency_weights`); LGConv's gcn_norm uses them as A's values.
        weight = None if edge_weight is None else torch.tensor(edge_weight, dtype=torch.float32).repeat(2)
        if sparse_adjacency:
            n = num_users + num_items
            with warnings.catch_warnings():
                # torch's notes that CSR is "beta" and unchecked: PyG builds a valid CSR, and we chose it.
                warnings.filterwarnings("ignore", message="Sparse (CSR tensor support|invariant checks)")
                edge_index = to_torch_csr_tensor(edge_index, weight, size=(n, n))
            weight = None  # now the CSR's values
        self.register_buffer("edge_index", edge_index, persistent=False)  # the graph, not a parameter
        self.register_buffer("edge_weight", weight, persistent=False)

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.get_embedding(self.edge_index, self.edge_weight)  # [U + I, d], full propagation
        return out[: self.num_users], out[self.num_users :]

    def loss(self, u: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, reg_weight: float) -> torch.Tensor:
        """PyG's recommendation_loss: mean BPR + reg_weight · ||layer-0 rows of the batch||² / B; or, with
        loss="softmax", cross-entropy of the positive over every item with the same L2 on (user, positive)."""
        users, items = self.embeddings()
        if self.loss_kind == "softmax":
            node_id = torch.cat([u, pos + self.num_users])
            reg = self.model.embedding.weight[node_id].norm(p=2).pow(2) / len(u)
            return F.cross_entropy(users[u] @ items.T, pos) + reg_weight * reg
        pos_rank = (users[u] * items[pos]).sum(-1)
        neg_rank = (users[u] * items[neg]).sum(-1)
        node_id = torch.cat([u, pos + self.num_users, neg + self.num_users])
        return self.model.recommendation_loss(pos_rank, neg_rank, node_id=node_id, lambda_reg=reg_weight)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model!r})"


class IdOnlyGNN(nn.Module):
    """Our propagation (`ModalGNN` with one id branch, no features, no quantizer) as a ranker.

    It computes what LightGCN computes, through our code, so that next to `PygLightGCN` in `fit_ranker` it is the
    like-for-like speed comparison: same sampler, same epochs, same loss convention as stage 1.
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        train_users: np.ndarray,
        train_items: np.ndarray,
        dim: int,
        layers: int,
    ):
        super().__init__()
        self.gnn = ModalGNN(num_users, num_items, {}, dim=dim, layers=layers, id_branch=True)
        u, i = torch.tensor(train_users, dtype=torch.long), torch.tensor(train_items, dtype=torch.long)
        self.adj = build_norm_adj(num_users, num_items, u, i)

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.gnn(self.adj)
        return emb.users[ID_BRANCH], emb.items[ID_BRANCH]

    def loss(self, u: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, reg_weight: float) -> torch.Tensor:
        users, items = self.embeddings()
        bpr = bpr_loss((users[u] * items[pos]).sum(-1), (users[u] * items[neg]).sum(-1))
        return bpr + reg_weight * l2_penalty(self.gnn.layer0(), u, pos, neg)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.gnn!r})"


def train_id_only_gnn(
    ds: ProcessedDataset,
    dim: int = 64,
    layers: int = 3,
    epochs: int = 60,
    batch_size: int = 4096,
    lr: float = 5e-3,
    reg_weight: float = 1e-4,
    seed: int = 0,
    ks: Sequence[int] = DEFAULT_KS,
    patience: int = 10,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Train `IdOnlyGNN` and return its test metrics at the best validation epoch."""
    train = ds.split("train")
    users, items = train["user_idx"].to_numpy(), train["item_idx"].to_numpy()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = IdOnlyGNN(ds.num_users, ds.num_items, users, items, dim, layers)
    return fit_ranker(model, ds, epochs, batch_size, lr, reg_weight, seed, ks, patience, device, progress)


Ranker = (
    MatrixFactorization | PygLightGCN | IdOnlyGNN
)  # each has embeddings() -> (users, items) and loss(u, pos, neg, reg)


def train_mf_bpr(
    ds: ProcessedDataset,
    dim: int = 64,
    epochs: int = 60,
    batch_size: int = 4096,
    lr: float = 5e-3,
    reg_weight: float = 1e-4,
    seed: int = 0,
    ks: Sequence[int] = DEFAULT_KS,
    patience: int = 10,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Train MF-BPR and return its test metrics at the best validation epoch."""
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the global RNG
        torch.manual_seed(seed)
        model = MatrixFactorization(ds.num_users, ds.num_items, dim)
    return fit_ranker(model, ds, epochs, batch_size, lr, reg_weight, seed, ks, patience, device, progress)


def train_lightgcn(
    ds: ProcessedDataset,
    dim: int = 64,
    layers: int = 3,
    epochs: int = 60,
    batch_size: int = 4096,
    lr: float = 5e-3,
    reg_weight: float = 1e-4,
    seed: int = 0,
    ks: Sequence[int] = DEFAULT_KS,
    patience: int = 10,
    device: str | torch.device = "cpu",
    progress: bool = False,
    sparse_adjacency: bool = False,
    recency_halflife: float = 0.0,
    loss: str = "bpr",
) -> dict[str, Any]:
    """Train torch_geometric's LightGCN and return its test metrics at the best validation epoch.

    loss="softmax" trains it with stage 1's `stage1.loss=softmax` instead of its authors' BPR, so that a
    comparison can give the baseline the same objective.

    recency_halflife > 0 weights its edges as stage 1's `stage1.recency_halflife` does (not LightGCN's own
    design: the benchmarks use it to show how much of a gain recency alone explains).
    """
    train = ds.split("train")
    users, items = train["user_idx"].to_numpy(), train["item_idx"].to_numpy()
    weight = None
    if recency_halflife > 0:
        weight = recency_weights(users, train["timestamp"].to_numpy(), recency_halflife)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PygLightGCN(
            ds.num_users, ds.num_items, users, items, dim, layers, sparse_adjacency, weight, loss=loss
        )
    return fit_ranker(model, ds, epochs, batch_size, lr, reg_weight, seed, ks, patience, device, progress)


def run_baselines(
    ds: ProcessedDataset,
    cfg: Stage1Config,
    seed: int,
    names: Sequence[str] = BASELINE_NAMES,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Every named baseline with the stage-1 budget (dim, layers, epochs, batch, lr, reg, patience)."""
    # Imported here: dppmg.scorer pulls in transformers (about 1 s), which the baselines do not otherwise need.
    from dppmg.device import resolve_device

    common = dict(
        dim=cfg.dim, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, reg_weight=cfg.reg_weight,
        seed=seed, ks=cfg.ks, patience=cfg.patience, device=resolve_device(cfg.device), progress=progress,
    )  # fmt: skip
    runners = {
        "popularity": lambda: train_popularity(ds, cfg.ks),
        "mf_bpr": lambda: train_mf_bpr(ds, **common),
        "lightgcn": lambda: train_lightgcn(ds, layers=cfg.layers, **common),
        "lightgcn_csr": lambda: train_lightgcn(ds, layers=cfg.layers, sparse_adjacency=True, **common),
    }
    unknown = sorted(set(names) - set(runners))
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose from {sorted(runners)}")
    return {name: runners[name]() for name in names}


def fit_ranker(
    model: Ranker,
    ds: ProcessedDataset,
    epochs: int,
    batch_size: int,
    lr: float,
    reg_weight: float,
    seed: int,
    ks: Sequence[int],
    patience: int,
    device: str | torch.device,
    progress: bool,
) -> dict[str, Any]:
    """BPR epochs with Adam; keep the state with the best validation Recall@20; test it."""
    if epochs < 1:
        raise DppmgError(f"a baseline needs epochs >= 1, got {epochs}")
    ks = sorted(set(ks) | {20})  # early stopping needs Recall@20 even when it is not reported
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    train = ds.split("train")
    train_users, train_items = train["user_idx"].to_numpy(), train["item_idx"].to_numpy()
    best_state, best_recall, best_epoch, bad_epochs, seconds = None, -1.0, 0, 0, []
    bar = tqdm(range(1, epochs + 1), desc=repr(model), unit="epoch", disable=not progress)
    for epoch in bar:
        t0 = time.perf_counter()
        u, pos, neg = sample_bpr(train_users, train_items, ds.num_items, rng)
        _train_epoch(model, optimizer, u, pos, neg, batch_size, reg_weight, rng, device)
        seconds.append(time.perf_counter() - t0)
        recall = _evaluate(model, ds, "valid", ks)[EARLY_STOP_METRIC]
        bar.set_postfix(valid_r20=f"{recall:.4f}")
        if recall > best_recall:
            best_recall, best_epoch, bad_epochs = recall, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad_epochs += 1
            if bad_epochs >= patience:
                break
    model.load_state_dict(best_state)
    test = _evaluate(model, ds, "test", ks)
    return {
        **test,
        f"best_valid_{EARLY_STOP_METRIC}": best_recall,
        "best_epoch": best_epoch,
        "epochs_run": len(seconds),
        "epoch_seconds": float(np.mean(seconds)),
    }


def _train_epoch(
    model: Ranker,
    optimizer: torch.optim.Optimizer,
    u: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    batch_size: int,
    reg_weight: float,
    rng: np.random.Generator,
    device: str | torch.device,
) -> None:
    """One pass over the (user, positive, negative) triples [E] in shuffled batches."""
    model.train()
    order = torch.from_numpy(rng.permutation(len(u)))
    u, pos, neg = u[order].to(device), pos[order].to(device), neg[order].to(device)
    for start in range(0, len(u), batch_size):
        sl = slice(start, start + batch_size)
        loss = model.loss(u[sl], pos[sl], neg[sl], reg_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@torch.no_grad()
def _evaluate(model: Ranker, ds: ProcessedDataset, split: str, ks: Sequence[int]) -> dict[str, float]:
    model.eval()
    users, items = model.embeddings()  # [U, d], [I, d]

    def score_fn(batch: torch.Tensor) -> torch.Tensor:
        return users[batch.to(users.device)] @ items.T  # [B, I]

    return full_ranking_metrics({}, {}, ds.interactions, split, ks, EVAL_BATCH_SIZE, score_fn=score_fn)
