"""Stage 1: train the modal-specific GNN with its residual-VQ quantizer, evaluate, export the tokens.

Read top to bottom: `run_stage1` loads the data and resumes or starts a run; `Stage1Trainer` holds the
phases (`train_epoch`, `validate`, `finalize`); `finalize` writes metrics.json and the token checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dppmg.config import Config, Stage1Config, to_dict
from dppmg.data.format import ProcessedDataset, load_dataset
from dppmg.device import resolve_device
from dppmg.distributed import Dist, all_agree, barrier, broadcast_flag
from dppmg.errors import DppmgError
from dppmg.io import atomic_path, pause_after_checkpoint, write_json
from dppmg.log import logger
from dppmg.runs import begin_stage, distributed_stage, without_later_keys
from dppmg.seeding import seed_everything
from dppmg.tokens import TokenCheckpoint, code_counts, save_token_checkpoint, users_sharing_tuple
from dppmg.tracking import NoOpTracker, Tracker, build_tracker, log_code_usage
from stage1_preference.evaluate import full_ranking_metrics, keyword_recovery, preference_recovery
from stage1_preference.features import residualize
from stage1_preference.graph import build_knn_graph, build_norm_adj, recency_weights
from stage1_preference.history import build_histories, pool_history, recency_kernel
from stage1_preference.model import (
    Embeddings,
    ModalGNN,
    bpr_loss,
    l2_penalty,
    pair_keys,
    sample_bpr,
    score,
    score_all,
)
from stage1_preference.quantizer import (
    PreferenceQuantizer,
    codebook_usage,
    collision_index,
    disambiguation_codebook,
    unique_code_ratio,
)


@dataclass
class TrainState:
    """Everything a resumed run needs besides the weights."""

    epoch: int = 0  # epochs completed
    best_recall: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0
    vq_initialised: bool = False
    epoch_seconds: list[float] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)


MAX_SKIPPED_IN_A_ROW = 10  # steps with a non-finite loss or gradient in a row before stage 1 gives up


class NonFiniteTraining(DppmgError):
    """Training gave non-finite losses or gradients MAX_SKIPPED_IN_A_ROW times in a row."""


class Stage1Trainer:
    """The GNN + quantizer on one processed dataset, with the phases of training as methods."""

    def __init__(self, ds: ProcessedDataset, cfg: Stage1Config, seed: int, dist: Dist | None = None):
        self.ds, self.cfg, self.seed = ds, cfg, seed
        self.dist = dist or Dist()
        self.device = resolve_device(cfg.device)
        self.modalities = [m for m in cfg.modalities if m in ds.features]
        if not self.modalities:
            raise DppmgError(
                f"stage1.modalities={cfg.modalities} but the dataset at {ds.root} has features for {ds.modalities or 'none'}"
            )
        train = ds.split("train")
        self.train_users = train["user_idx"].to_numpy(
            np.int64, copy=True
        )  # writable: torch shares the memory
        self.train_items = train["item_idx"].to_numpy(np.int64, copy=True)
        # The history encoder (stage1.user_encoder=history) trains on next-item examples, not on the edges.
        self.histories, self.user_contexts = None, None
        if cfg.user_encoder == "history":
            self.histories = build_histories(
                self.train_users, self.train_items, train["timestamp"].to_numpy(), ds.num_users,
                cfg.history_length,
            )  # fmt: skip
            self.user_contexts = torch.from_numpy(self.histories.user_contexts).to(self.device)
            self.kernel = recency_kernel(cfg.history_length, cfg.history_halflife).to(self.device)
            self.train_keys = pair_keys(self.train_users, self.train_items, ds.num_items)
        weights = None
        if cfg.recency_halflife > 0:
            weights = torch.from_numpy(
                recency_weights(self.train_users, train["timestamp"].to_numpy(), cfg.recency_halflife)
            )
        self.adj = build_norm_adj(
            ds.num_users, ds.num_items, torch.from_numpy(self.train_users), torch.from_numpy(self.train_items),
            weights,
        ).to(self.device)  # fmt: skip
        feats = {m: torch.tensor(np.asarray(ds.features[m]), dtype=torch.float32) for m in self.modalities}
        if cfg.text_specific and {"text", "image"} <= feats.keys():
            feats["text"] = residualize(feats["text"], feats["image"], seed=seed)
        knn = (
            {m: build_knn_graph(f, cfg.knn_k).to(self.device) for m, f in feats.items()}
            if cfg.knn_k > 0
            else None
        )
        self.model = ModalGNN(
            ds.num_users, ds.num_items, {m: f.to(self.device) for m, f in feats.items()}, dim=cfg.dim,
            layers=cfg.layers, item_id_embedding=cfg.item_id_embedding, id_branch=cfg.id_branch,
            knn_graphs=knn, knn_weight=cfg.knn_weight, user_embedding=cfg.user_embedding,
        ).to(self.device)  # fmt: skip
        self.quantizer = PreferenceQuantizer(
            self.modalities, cfg.dim, cfg.vq_levels, cfg.vq_codebook_size,
            commitment_weight=cfg.vq_commitment_weight, dead_code_threshold=cfg.vq_dead_code_threshold,
        ).to(self.device)  # fmt: skip
        # Many processes (torchrun): DDP averages the GNN's gradients. The quantizer's codebooks are EMA buffers
        # that every process updates from the same users (`_batch_loss`), so they stay equal without syncing.
        self.forward_model: torch.nn.Module = self.model
        if self.dist.active:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model = DistributedDataParallel(self.model, device_ids=ids)
        self._unsynced = [
            p for p in self.quantizer.parameters() if p.requires_grad
        ]  # none with EMA codebooks
        self.params = list(self.model.parameters()) + self._unsynced
        self.optimizer = torch.optim.Adam(self.params, lr=cfg.lr)
        self.skipped_in_a_row = 0  # steps with a non-finite loss or gradient since the last applied one
        self.rng = np.random.default_rng(seed)
        self.torch_rng = torch.Generator().manual_seed(seed)  # which users the VQ sees on large graphs
        self.state = TrainState()

    @property
    def batch_size(self) -> int:
        """stage1.batch_size, grown so that an epoch makes at most stage1.max_steps_per_epoch steps.

        Every step propagates the whole graph (O(E)), so with a fixed batch an epoch costs O(E²/batch); bounding
        the steps keeps it O(E) on large graphs. Small datasets never reach the bound.
        """
        n = len(self.train_users) if self.histories is None else len(self.histories.targets)
        cap = self.cfg.max_steps_per_epoch
        return max(self.cfg.batch_size, -(-n // cap)) if cap > 0 else self.cfg.batch_size

    # ---- phases -------------------------------------------------------------------------------

    @property
    def vq_active(self) -> bool:
        return self.state.epoch >= self.cfg.vq_warmup_epochs

    def _init_quantizer(self) -> None:
        """k-means initialisation sees every user's vector at once (it initialises on its first batch)."""
        self.model.eval()
        with torch.no_grad():
            emb = self._with_user_vectors(self.model(self.adj))
            self.quantizer.train()
            for m in self.modalities:
                self.quantizer(m, emb.users[m])
        self.state.vq_initialised = True

    def train_epoch(self, progress: bool) -> dict[str, float]:
        if self.vq_active and not self.state.vq_initialised:
            self._init_quantizer()
        self.model.train()
        self.quantizer.train()
        ctx = None
        if self.histories is None:  # graph encoder: every train edge is a positive
            u, pos, neg = sample_bpr(self.train_users, self.train_items, self.ds.num_items, self.rng)
        else:  # history encoder: every next-item example, with the items before it as its context
            h = self.histories
            u, pos, neg = sample_bpr(h.example_users, h.targets, self.ds.num_items, self.rng, self.train_keys)
            ctx = torch.from_numpy(h.contexts)
        order = torch.from_numpy(self.rng.permutation(len(u)))
        u, pos, neg = u[order].to(self.device), pos[order].to(self.device), neg[order].to(self.device)
        if ctx is not None:
            ctx = ctx[order].to(self.device)
        term = self.cfg.loss  # the ranking term's name in the logs: bpr or softmax
        totals = {"loss": 0.0, term: 0.0, f"{term}_quantized": 0.0, "vq": 0.0}
        batch = self.batch_size
        steps = range(0, len(u), batch)
        # Every process draws the same triples (same seed); with many, each takes every world-th row of a batch,
        # so together they cover the batch a single process would, and averaged gradients make the same step.
        rank, world = self.dist.rank, self.dist.world
        skipped = 0
        for start in tqdm(steps, desc=f"epoch {self.state.epoch + 1}", leave=False, disable=not progress):
            sl = slice(start + rank, start + batch, world)
            # A share's mean, weighted by its share of the batch (the last batch may not split evenly), so that
            # DDP's average of the gradients is the gradient of the whole batch's mean.
            share = world * len(range(*sl.indices(len(u)))) / len(range(start, min(start + batch, len(u))))
            contexts = None
            if ctx is not None:  # the whole batch's contexts, and which of its rows are this process's share
                whole = ctx[start : start + batch]
                contexts = (whole, torch.arange(rank, len(whole), world, device=whole.device))
            parts = self._batch_loss(
                u[sl], pos[sl], neg[sl], batch_users=u[start : start + batch], share=share, contexts=contexts
            )
            if not self._guarded_step(parts["loss"]):
                skipped += 1
                continue
            for k, v in parts.items():
                totals[k] += float(v.detach())
        if self.dist.active:  # each process summed its own share's means; report the whole batch's
            summed = torch.tensor(list(totals.values()), dtype=torch.float64)
            torch.distributed.all_reduce(summed)
            totals = dict(zip(totals, (summed / self.dist.world).tolist()))
        if skipped:
            logger.warning(
                "stage 1 epoch %d: skipped %d of %d steps with a non-finite loss or gradient",
                self.state.epoch + 1, skipped, len(steps),
            )  # fmt: skip
        applied = len(steps) - skipped
        logs = {f"train/{k}": v / applied if applied else float("nan") for k, v in totals.items()}
        return {**logs, "train/skipped_steps": skipped}

    def _guarded_step(self, loss: torch.Tensor) -> bool:
        """Backward and step, unless the loss or the gradient is not finite: then nothing is applied and False.

        The decision is the same on every process (a skip on one is a skip on all, before DDP's backward), so the
        replicas stay equal. MAX_SKIPPED_IN_A_ROW skips in a row stop the run: the weights are not coming back.
        """
        self.optimizer.zero_grad(set_to_none=True)
        finite = all_agree(self.dist, bool(torch.isfinite(loss.detach())))
        if finite:
            loss.backward()
            self._average_unsynced_grads()
            # The total norm, unclipped (max_norm=inf): the same on every process after DDP's averaging.
            finite = bool(torch.isfinite(torch.nn.utils.clip_grad_norm_(self.params, float("inf"))))
        if finite:
            self.optimizer.step()
            self.skipped_in_a_row = 0
            return True
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise NonFiniteTraining(
                f"stage 1 stopped in epoch {self.state.epoch + 1}: {self.skipped_in_a_row} steps in a row had a "
                "non-finite loss or gradient"
            )
        return False

    def _average_unsynced_grads(self) -> None:
        """Average the gradients DDP does not see (trainable quantizer parameters, if any) across processes."""
        if not self.dist.active:
            return
        for p in self._unsynced:
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.dist.world

    def _batch_loss(
        self,
        u: torch.Tensor,
        pos: torch.Tensor,
        neg: torch.Tensor,
        batch_users: torch.Tensor | None = None,
        share: float = 1.0,
        contexts: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The loss of the rows (u, pos, neg). Under torchrun this process holds a share of the batch:
        `batch_users` are the whole batch's users, so that every process quantizes the same users, and `share`
        (processes × share rows / batch rows) weights the terms that are means over this share's rows.

        With the history encoder, `contexts` is (the whole batch's contexts [B, L], the batch rows of this
        share): a row's user vector is pooled from its context, and every process quantizes the whole batch's."""
        emb = self.forward_model(self.adj)
        if contexts is None:
            users = {b: e[u] for b, e in emb.users.items()}
        else:  # the whole batch pooled once: this share's rows rank, and the quantizer reads the batch's
            whole, mine = contexts
            pooled = {b: pool_history(e, whole, self.kernel) for b, e in emb.items.items()}
            users = {b: p[mine] for b, p in pooled.items()}
        rank_loss = self._rank_loss(users, emb.items, pos, neg)
        loss = share * (rank_loss + self.cfg.reg_weight * l2_penalty(self.model.layer0(), u, pos, neg))
        term = self.cfg.loss
        parts = {term: share * rank_loss.detach()}
        if self.vq_active:
            # The tokens must carry the ranking signal themselves: score with quantized user vectors too.
            # Graph encoder: quantize each distinct user of the batch once (a batch repeats active users many
            # times): less work, and the codebook's EMA statistics count users, not interactions. History
            # encoder: each batch row's pooled vector (a user's taste at that point of their history). On large
            # graphs only a random subset of them (stage1.vq_users_per_step) is quantized, and the quantized term
            # is the mean over their rows: an unbiased estimate of it at a bounded cost per step.
            if contexts is None:
                keys, mine = torch.unique(u if batch_users is None else batch_users), u
            else:
                keys = torch.arange(len(whole), device=whole.device)
            cap = self.cfg.vq_users_per_step
            if 0 < cap < len(keys):
                pick = torch.randperm(len(keys), generator=self.torch_rng, device="cpu")[:cap].to(keys.device)
                keys = keys[pick].sort().values
            rows = torch.isin(mine, keys)  # (B,) this share's rows that are quantized this step
            slot = torch.searchsorted(keys, mine[rows])
            quantized, vq_loss = {b: e[rows] for b, e in users.items()}, torch.zeros((), device=self.device)
            for m in self.modalities:
                q = self.quantizer(m, (emb.users[m] if contexts is None else pooled[m])[keys])
                quantized[m] = q.quantized[slot]
                vq_loss = vq_loss + q.loss
            rank_q = self._rank_loss(quantized, emb.items, pos[rows], neg[rows])
            # vq_loss is over the batch's users, the same on every process: not weighted by the share.
            loss = loss + share * self.cfg.quantized_bpr_weight * rank_q + self.cfg.vq_loss_weight * vq_loss
            parts.update({f"{term}_quantized": share * rank_q.detach(), "vq": vq_loss.detach()})
        parts["loss"] = loss  # the caller backpropagates this one; the others are detached for logging
        return parts

    def _rank_loss(
        self,
        users: dict[str, torch.Tensor],
        items: dict[str, torch.Tensor],
        pos: torch.Tensor,
        neg: torch.Tensor,
    ) -> torch.Tensor:
        """The ranking loss of user rows [B, d] per branch against every item's vectors [I, d] per branch:
        BPR with the sampled negatives `neg`, or softmax cross-entropy of `pos` over all items."""
        if self.cfg.loss == "softmax":
            return F.cross_entropy(score_all(users, items), pos)
        return bpr_loss(
            score(users, {b: e[pos] for b, e in items.items()}),
            score(users, {b: e[neg] for b, e in items.items()}),
        )

    def _with_user_vectors(self, emb: Embeddings) -> Embeddings:
        """The model's output with the user vectors of the configured encoder: the propagated free embeddings
        (graph), or every user's latest items pooled (history)."""
        if self.user_contexts is None:
            return emb
        users = {b: pool_history(e, self.user_contexts, self.kernel) for b, e in emb.items.items()}
        return Embeddings(users=users, items=emb.items)

    @torch.no_grad()
    def embeddings(self) -> tuple[Embeddings, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Continuous embeddings, every user's codes per modality, and the vectors decoded from those codes."""
        self.model.eval()
        self.quantizer.eval()
        emb = self._with_user_vectors(self.model(self.adj))
        codes, decoded = {}, {}
        if self.state.vq_initialised:
            for m in self.modalities:
                q = self.quantizer(m, emb.users[m])
                codes[m] = q.codes
                decoded[m] = self.quantizer.decode(m, q.codes)
        return emb, codes, decoded

    @functools.cached_property
    def valid_interactions(self) -> pd.DataFrame:
        """The interactions validation ranks with: every user's, or those of `stage1.valid_users` users drawn
        once from the seed (all their splits, since the ranking masks each user's training items)."""
        inter, cap = self.ds.interactions, self.cfg.valid_users
        users = np.unique(inter.loc[inter["split"] == "valid", "user_idx"].to_numpy())
        if cap == 0 or cap >= len(users):
            return inter
        keep = np.random.default_rng([self.seed, 7]).choice(users, cap, replace=False)
        return inter[inter["user_idx"].isin(keep)]

    def validate(self) -> dict[str, float]:
        return self.validate_with_codes()[0]

    def validate_with_codes(self) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """Validation metrics, and every user's codes per modality ({} before the quantizer is trained)."""
        emb, codes, decoded = self.embeddings()
        ks, interactions = self.cfg.ks, self.valid_interactions
        out = {
            f"valid/{k}": v
            for k, v in full_ranking_metrics(emb.users, emb.items, interactions, "valid", ks).items()
        }
        if decoded:
            users_q = {**emb.users, **decoded}
            metrics_q = full_ranking_metrics(users_q, emb.items, interactions, "valid", ks)
            out.update({f"valid/{k}_quantized": v for k, v in metrics_q.items() if k != "users_evaluated"})
        return out, codes

    # ---- checkpoints ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "quantizer": self.quantizer.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "state": self.state.__dict__,
            "rng": self.rng.bit_generator.state,
            "vq_rng": self.torch_rng.get_state(),
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.model.load_state_dict(sd["model"])
        self.quantizer.load_state_dict(sd["quantizer"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.state = TrainState(**sd["state"])
        self.rng.bit_generator.state = sd["rng"]
        self.torch_rng.set_state(sd["vq_rng"])
        torch.set_rng_state(sd["torch_rng"])


# Keys added after finished runs existed, with their defaults (`runs.without_later_keys`).
LATER_KEYS = {
    "valid_users": 0,
    "user_encoder": "graph",
    "history_length": 10,
    "history_halflife": 3.0,
    "loss": "bpr",
}


def stage1_fingerprint(cfg: Config, content_hash: str) -> str:
    s1 = {
        k: v
        for k, v in without_later_keys(to_dict(cfg.stage1), LATER_KEYS).items()
        if k not in ("overwrite", "device")
    }
    blob = json.dumps(
        {"stage1": s1, "seed": cfg.stage1.resolved_seed(cfg.seed), "dataset": content_hash}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_stage1(cfg: Config, progress: bool = True) -> Path:
    """Train (or resume) stage 1 for `cfg.run_name`; returns the stage-1 folder.

    Under torchrun, every process trains on its share of each batch (`Stage1Trainer.train_epoch`) and rank 0
    alone prepares the data, writes checkpoints and outputs, shows progress and tracks the run.
    """
    with distributed_stage(cfg, "stage1", cfg.stage1.device) as dist:
        return _run_stage1(cfg, progress and dist.main, dist)


def _run_stage1(cfg: Config, progress: bool, dist: Dist) -> Path:
    from dppmg.data.prepare import prepare

    if dist.main:  # the others wait, then find it up to date
        prepare(cfg, progress=progress)
    barrier(dist)
    ds = load_dataset(prepare(cfg, progress=False))
    fingerprint = stage1_fingerprint(cfg, ds.meta["content_hash"])
    out = begin_stage(cfg, "stage1", fingerprint, cfg.stage1.overwrite) if dist.main else None
    if not broadcast_flag(dist, out is not None):  # rank 0 found it complete
        return cfg.run_dir / "stage1"
    if not dist.main:
        out = cfg.run_dir / "stage1"
        seed_everything(cfg.seed)  # as begin_stage seeded rank 0
    trainer = Stage1Trainer(ds, cfg.stage1, cfg.stage1.resolved_seed(cfg.seed), dist)
    ckpt, best = out / "checkpoint.pt", out / "best.pt"
    if ckpt.is_file():
        sd = torch.load(ckpt, weights_only=False)
        if sd.get("fingerprint") == fingerprint:
            trainer.load_state_dict(sd)
            logger.info("resuming stage 1 from epoch %d (%s)", trainer.state.epoch, ckpt)
        else:
            logger.info("ignoring %s: it was written by a different config", ckpt)
    logger.info(
        "stage 1 on %s: %s, %d users, %d items",
        ds.root,
        "+".join(trainer.modalities),
        ds.num_users,
        ds.num_items,
    )
    if not dist.main:
        _fit(trainer, NoOpTracker(), ckpt, best, fingerprint, progress=False)
        barrier(dist)  # rank 0 writes the outputs from the same weights
        return out
    tracker = build_tracker(cfg.tracking, cfg.run_dir, to_dict(cfg), job="stage1")
    try:
        _fit(trainer, tracker, ckpt, best, fingerprint, progress)
        barrier(dist)
        metrics = finalize(trainer, best, out, cfg, fingerprint)
        tracker.summary({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        _track_tokens(tracker, out / "tokens", cfg, trainer.state.epoch)
    finally:
        tracker.finish()
    return out


def _fit(
    trainer: Stage1Trainer, tracker: Tracker, ckpt: Path, best: Path, fingerprint: str, progress: bool
) -> None:
    cfg, st = trainer.cfg, trainer.state
    bar = tqdm(total=cfg.epochs, initial=st.epoch, desc="stage 1", unit="epoch", disable=not progress)
    while st.epoch < cfg.epochs:
        t0 = time.perf_counter()
        try:
            logs = trainer.train_epoch(progress)
        except NonFiniteTraining as e:
            kept = (
                f"the last good checkpoint, {ckpt} (epoch {st.epoch}), is kept and a rerun resumes from it"
                if ckpt.is_file()
                else "no checkpoint had been written yet"
            )
            raise DppmgError(
                f"{e}; {kept}. Lower stage1.lr, or check the features for extreme values"
            ) from None
        st.epoch_seconds.append(time.perf_counter() - t0)
        st.epoch += 1
        if st.epoch % cfg.eval_every == 0 or st.epoch == cfg.epochs:
            valid, codes = trainer.validate_with_codes()
            logs.update(valid)
            for m, c in codes.items():  # how the codebooks are used as training goes (W&B histograms)
                for level, counts in enumerate(code_counts(c.cpu(), cfg.vq_codebook_size)):
                    tracker.histogram(f"codes/{m}/level_{level}", counts.tolist(), step=st.epoch)
            recall = logs["valid/recall@20"]
            # Only epochs with a trained quantizer can be the best: the tokens are the product.
            if st.vq_initialised and recall > st.best_recall:
                st.best_recall, st.best_epoch, st.bad_epochs = recall, st.epoch, 0
                with _written_by_rank0(trainer.dist, best) as tmp:
                    torch.save(
                        {"model": trainer.model.state_dict(), "quantizer": trainer.quantizer.state_dict()},
                        tmp,
                    )
            elif st.vq_initialised:
                st.bad_epochs += cfg.eval_every
        st.history.append({"epoch": st.epoch, **logs})
        tracker.log(logs, step=st.epoch)
        bar.update(1)
        bar.set_postfix(
            loss=f"{logs['train/loss']:.4f}", r20=f"{logs.get('valid/recall@20', float('nan')):.4f}",
            r20q=f"{logs.get('valid/recall@20_quantized', float('nan')):.4f}",
        )  # fmt: skip
        sd = trainer.state_dict()
        sd["fingerprint"] = fingerprint
        with _written_by_rank0(trainer.dist, ckpt) as tmp:
            torch.save(sd, tmp)
        pause_after_checkpoint()
        if st.vq_initialised and st.bad_epochs >= cfg.patience:
            logger.info(
                "early stop at epoch %d: best valid recall@20 %.4f at epoch %d",
                st.epoch,
                st.best_recall,
                st.best_epoch,
            )
            break
    bar.close()


@contextmanager
def _written_by_rank0(dist: Dist, path: Path) -> Iterator[Path]:
    """`atomic_path(path)` on rank 0; elsewhere a scratch file that is thrown away (the weights are the same)."""
    if dist.main:
        with atomic_path(path) as tmp:
            yield tmp
    else:
        with tempfile.TemporaryDirectory() as scratch:
            yield Path(scratch) / path.name


def _track_tokens(tracker: Tracker, folder: Path, cfg: Config, step: int) -> None:
    """The token checkpoint's code usage (histograms "tokens/<modality>/level_<l>") and the checkpoint itself as
    a W&B artifact of type "tokens"; the NoOpTracker ignores both."""
    ckpt = TokenCheckpoint.load(folder)
    log_code_usage(tracker, ckpt, "tokens", step=step)
    meta = {
        "dataset": ckpt.manifest["dataset"].get("name"), "content_hash": ckpt.content_hash,
        "digest": ckpt.digest(), "modalities": {m: [ckpt.levels(m), ckpt.codebook_size(m)] for m in ckpt.modalities},
    }  # fmt: skip
    tracker.artifact(f"{cfg.run_name}-stage1-tokens", "tokens", {".": folder}, metadata=meta)


def _load_best(trainer: Stage1Trainer, best: Path) -> None:
    sd = torch.load(best, weights_only=False)
    trainer.model.load_state_dict(sd["model"])
    trainer.quantizer.load_state_dict(sd["quantizer"])


def load_embeddings(cfg: Config, ds: ProcessedDataset) -> Embeddings:
    """The continuous user and item embeddings of `cfg.run_name`'s trained stage-1 model (stage1/best.pt)."""
    best = cfg.run_dir / "stage1" / "best.pt"
    if not best.is_file():
        raise DppmgError(f"{best} is missing: run stage 1 for run_name={cfg.run_name} first")
    trainer = Stage1Trainer(ds, cfg.stage1, cfg.stage1.resolved_seed(cfg.seed))
    _load_best(trainer, best)
    return trainer.embeddings()[0]


def finalize(trainer: Stage1Trainer, best: Path, out: Path, cfg: Config, fingerprint: str) -> dict[str, Any]:
    """Test metrics with continuous and token vectors, codebook statistics, recovery; write the token checkpoint."""
    if not best.is_file():
        raise DppmgError(
            f"stage 1 produced no checkpoint with a trained quantizer: stage1.epochs={cfg.stage1.epochs} must exceed "
            f"stage1.vq_warmup_epochs={cfg.stage1.vq_warmup_epochs}"
        )
    _load_best(trainer, best)
    ds, s1, seed = trainer.ds, cfg.stage1, trainer.seed
    emb, codes, decoded = trainer.embeddings()
    cont = full_ranking_metrics(emb.users, emb.items, ds.interactions, "test", s1.ks)
    quant = full_ranking_metrics({**emb.users, **decoded}, emb.items, ds.interactions, "test", s1.ks)
    st = trainer.state
    metrics: dict[str, Any] = {k: v for k, v in cont.items()}
    metrics.update({f"{k}_quantized": v for k, v in quant.items() if k != "users_evaluated"})
    metrics["quantized_over_continuous_recall@20"] = quant["recall@20"] / max(cont["recall@20"], 1e-12)
    metrics["codebook_usage"] = {m: codebook_usage(codes[m], s1.vq_codebook_size) for m in trainer.modalities}
    all_codes = torch.cat([codes[m] for m in trainer.modalities], dim=1)
    metrics["unique_code_ratio"] = unique_code_ratio(all_codes)
    metrics["unique_code_ratio_per_modality"] = {m: unique_code_ratio(codes[m]) for m in trainer.modalities}
    # Users whose whole token tuple is shared with another user: stage 2 cannot tell them apart by tokens.
    metrics["users_sharing_tuple"] = {m: users_sharing_tuple(codes[m]) for m in trainer.modalities}
    metrics["epoch_seconds"] = float(np.mean(st.epoch_seconds)) if st.epoch_seconds else None
    metrics["best_epoch"], metrics["epochs_run"], metrics["best_valid_recall@20"] = (
        st.best_epoch,
        st.epoch,
        st.best_recall,
    )
    token_vecs = {m: decoded[m].cpu() for m in trainer.modalities}
    if any(c.startswith("pref_") for c in ds.users.columns):
        metrics["preference_recovery"] = preference_recovery(
            token_vecs, ds.users, s1.probe_heldout_fraction, seed
        )
    else:  # real data: no true tastes, but the items' keywords (MovieLens: genres) say what a user watches
        metrics["keyword_recovery"] = keyword_recovery(
            token_vecs, ds.items, ds.split("train"), ds.num_users, s1.probe_heldout_fraction, seed
        )
    metrics["dataset"] = {"name": ds.meta.get("name"), "content_hash": ds.meta["content_hash"]}
    metrics["fingerprint"] = fingerprint
    codebooks = {m: trainer.quantizer.codebooks(m).detach().cpu() for m in trainer.modalities}
    codes = {m: c.cpu() for m, c in codes.items()}
    if s1.collision_level:
        codebooks, codes = _add_collision_level(codebooks, codes, seed)
        metrics["token_levels"] = {m: c.shape[1] for m, c in codes.items()}
    save_token_checkpoint(
        out / "tokens",
        codebooks=codebooks,
        codes=codes,
        user_vectors={m: emb.users[m].cpu() for m in trainer.modalities},
        user_ids=ds.users["user_id"].astype(str).tolist(),
        dataset={
            "name": ds.meta.get("name"), "path": str(ds.root.resolve()), "content_hash": ds.meta["content_hash"],
            "num_users": ds.num_users, "num_items": ds.num_items,
        },
        config=to_dict(cfg),
        metrics={k: v for k, v in metrics.items() if k != "fingerprint"},
    )  # fmt: skip
    write_json(out / "history.json", st.history)
    write_json(out / "metrics.json", metrics)
    logger.info(
        "stage 1 test: recall@20 %.4f, quantized %.4f (%.2f×), ndcg@20 %.4f; unique code ratio %.3f; %s",
        cont["recall@20"], quant["recall@20"], metrics["quantized_over_continuous_recall@20"], cont["ndcg@20"],
        metrics["unique_code_ratio"], out,
    )  # fmt: skip
    return metrics


def _add_collision_level(
    codebooks: dict[str, torch.Tensor], codes: dict[str, torch.Tensor], seed: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Append the collision level: codes [U, L] -> [U, L+1], codebooks [L, K, d] -> [L+1, K, d]."""
    new_books, new_codes = {}, {}
    for m, c in codes.items():
        rank = collision_index(c)
        size = codebooks[m].shape[1]
        if int(rank.max()) >= size:
            raise DppmgError(
                f"{int(rank.max()) + 1} users share one {m} token tuple, more than the codebook size {size}: "
                "raise stage1.vq_codebook_size or stage1.vq_levels"
            )
        new_codes[m] = torch.cat([c, rank[:, None]], dim=1)
        new_books[m] = torch.cat([codebooks[m], disambiguation_codebook(codebooks[m], seed)[None]], dim=0)
    return new_books, new_codes
