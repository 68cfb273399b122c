"""Residual vector quantization of the users' preference vectors: one `ResidualVQ` per modality.

A user's vector x [d] becomes L codes c_0..c_{L-1}: level l quantizes what the levels before it left over,
x ≈ Σ_l C_l[c_l], with codebooks C_l [K, d] kept as EMA cluster means (vector-quantize-pytorch 1.32, the
SoundStream recipe). The codes are the user's discrete preference tokens.

k-means initialisation happens on the FIRST batch each codebook sees, in train or eval mode alike: the caller
must pass every user's vector in its first call per modality (stage1_preference/train.py does), or the
codebooks start from whichever users happened to be in that batch. The `initted` flag is a buffer, so a
quantizer restored with `load_state_dict` does not initialise again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from vector_quantize_pytorch import ResidualVQ

from dppmg.errors import DppmgError
from dppmg.tokens import level_usage, unique_tuple_ratio

KMEANS_ITERS = 10


@dataclass
class QuantizerOutput:
    """quantized [N, d] (straight-through in training), codes [N, L], loss (scalar), metrics of this batch."""

    quantized: torch.Tensor
    codes: torch.Tensor
    loss: torch.Tensor
    metrics: dict[str, float]


class PreferenceQuantizer(nn.Module):
    """A residual VQ per modality over d-dimensional preference vectors.

    Args:
        modalities: the modalities to quantize, each gets its own codebooks.
        dim: d.
        levels: L, residual levels (codes per user per modality).
        codebook_size: K, codes per level.
        commitment_weight: weight of ‖x - sg(q)‖² per level (pulls the encoder towards its codes).
        dead_code_threshold: a code whose EMA cluster size falls below this is replaced by a batch vector.
        kmeans_init: initialise the codebooks by k-means on the first batch (see the module docstring).
    """

    def __init__(
        self,
        modalities: list[str],
        dim: int,
        levels: int,
        codebook_size: int,
        commitment_weight: float = 0.25,
        dead_code_threshold: float = 2.0,
        kmeans_init: bool = True,
    ):
        super().__init__()
        if not modalities or levels <= 0 or codebook_size <= 1:
            raise DppmgError(
                f"PreferenceQuantizer needs modalities, levels >= 1 and codebook_size >= 2; got {modalities}, "
                f"levels={levels}, codebook_size={codebook_size}"
            )
        self.modalities = list(modalities)
        self.dim, self.levels, self.codebook_size = dim, levels, codebook_size
        self.rvq = nn.ModuleDict(
            {
                m: ResidualVQ(
                    dim=dim,
                    num_quantizers=levels,
                    codebook_size=codebook_size,
                    kmeans_init=kmeans_init,
                    kmeans_iters=KMEANS_ITERS,
                    threshold_ema_dead_code=dead_code_threshold,
                    commitment_weight=commitment_weight,
                    # `forward` applies its own straight-through estimator, so the library's gradient path
                    # through the codes (by default the rotation trick) would be computed only to be dropped.
                    rotation_trick=False,
                    # Under torchrun every process quantizes the same users (Stage1Trainer._batch_loss), so
                    # identical local EMA updates keep the codebooks equal; the library's all-reduce would count
                    # each user once per process.
                    sync_codebook=False,
                    sync_kmeans=False,
                )
                for m in self.modalities
            }
        )

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(modalities={self.modalities}, dim={self.dim}, levels={self.levels}, "
            f"codebook_size={self.codebook_size})"
        )

    def _rvq(self, modality: str) -> ResidualVQ:
        if modality not in self.rvq:
            raise DppmgError(f"no quantizer for modality {modality!r}; this quantizer has {self.modalities}")
        return self.rvq[modality]

    def forward(self, modality: str, x: torch.Tensor) -> QuantizerOutput:
        """Quantize x [N, d]. In training mode this updates the codebooks (EMA, dead-code replacement)."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise DppmgError(
                f"quantizer input for {modality!r} has shape {tuple(x.shape)}, expected [N, {self.dim}]"
            )
        quantized, codes, losses = self._rvq(modality)(x)  # (N, d), (N, L), (L,)
        if x.requires_grad:
            # Straight-through with d quantized / d x = I. The library passes the gradient to every level's
            # residual input, and each residual carries x's gradient, so its output's gradient is L · I.
            quantized = x + (quantized - x).detach()
        return QuantizerOutput(quantized, codes, losses.sum(), self._batch_metrics(codes))

    def _batch_metrics(self, codes: torch.Tensor) -> dict[str, float]:
        """Per level: share of the K codes used in this batch, and perplexity exp(H) of their histogram."""
        metrics = {}
        with torch.no_grad():
            for level in range(codes.shape[1]):
                counts = torch.bincount(codes[:, level], minlength=self.codebook_size).float()
                p = counts[counts > 0] / counts.sum()
                metrics[f"usage_l{level}"] = float((counts > 0).sum()) / self.codebook_size
                metrics[f"perplexity_l{level}"] = float(torch.exp(-(p * p.log()).sum()))
        return metrics

    def decode(self, modality: str, codes: torch.Tensor) -> torch.Tensor:
        """codes [N, L] → Σ_l C_l[codes[:, l]] [N, d]; equals `forward(...).quantized` in eval mode."""
        if codes.dim() != 2 or codes.shape[1] != self.levels:
            raise DppmgError(
                f"codes for {modality!r} have shape {tuple(codes.shape)}, expected [N, {self.levels}]"
            )
        if len(codes) and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise DppmgError(
                f"codes for {modality!r} must lie in [0, {self.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]"
            )
        return self._rvq(modality).get_output_from_indices(codes.long())

    def codebooks(self, modality: str) -> torch.Tensor:
        """The codebooks of a modality, [L, K, d]."""
        return self._rvq(modality).codebooks


# The code statistics live in dppmg.tokens, so that a token checkpoint can be summarised without stage-1 code.
codebook_usage = level_usage


def unique_code_ratio(codes: torch.Tensor) -> float:
    """Distinct code tuples / N for codes [N, L]: 1.0 when no two rows share a tuple."""
    if len(codes) == 0:
        raise DppmgError("unique_code_ratio of an empty set of codes is undefined")
    return unique_tuple_ratio(codes)


def collision_index(codes: torch.Tensor) -> torch.Tensor:
    """For codes [N, L]: each row's rank among the rows with the same tuple (0 for the first, or a unique row).

    Appended as an extra level, it gives every user a distinct token tuple (as TIGER does for item semantic ids).
    """
    _, inverse = torch.unique(codes, dim=0, return_inverse=True)
    order = torch.argsort(inverse, stable=True)  # rows grouped by tuple, in row order within a group
    sorted_groups = inverse[order]
    starts = torch.ones_like(sorted_groups, dtype=torch.bool)
    starts[1:] = sorted_groups[1:] != sorted_groups[:-1]
    position = torch.arange(len(codes), device=codes.device)
    group_start = torch.cummax(torch.where(starts, position, torch.zeros_like(position)), dim=0).values
    rank = torch.empty_like(position)
    rank[order] = position - group_start
    return rank


def disambiguation_codebook(codebooks: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """[K, d] vectors for the extra collision level: fixed random directions at the last level's mean code norm.

    They carry no preference (only which of several identical users this is); small and distinct, so a projection
    in stage 2 can tell the tokens apart without disturbing what the real levels say.
    """
    last = codebooks[-1]  # (K, d)
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(last.shape, generator=g), dim=-1)
    return directions.to(last) * last.norm(dim=-1).mean()
