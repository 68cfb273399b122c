"""Helpers several test files share (pytest puts this folder on sys.path: `from helpers import ...`)."""

from __future__ import annotations

from pathlib import Path

import torch

from dppmg.tokens import TokenCheckpoint, save_token_checkpoint


def text_token_checkpoint(
    folder: Path, levels: int, size: int, dim: int, codes: list[list[int]], content_hash: str, seed: int = 0
) -> TokenCheckpoint:
    """A small text-token checkpoint with random codebooks and the given codes [U, L], saved and loaded back."""
    g = torch.Generator().manual_seed(seed)
    save_token_checkpoint(
        folder,
        codebooks={"text": torch.randn(levels, size, dim, generator=g)},
        codes={"text": torch.tensor(codes)},
        user_vectors={"text": torch.randn(len(codes), dim, generator=g)},
        user_ids=[f"u{i}" for i in range(len(codes))],
        dataset={"name": "tiny", "path": str(folder / "none"), "content_hash": content_hash},
        config={},
    )
    return TokenCheckpoint.load(folder)


def assert_generate_never_emits(model, ids: torch.Tensor, new: set[int]) -> None:
    """Greedy and sampled `generate` from `ids` [1, T] write new tokens, none of them in `new`."""
    attention = torch.ones_like(ids)
    greedy = model.generate(ids, attention_mask=attention, max_new_tokens=6, do_sample=False)
    torch.manual_seed(0)
    sampled = model.generate(ids, attention_mask=attention, max_new_tokens=6, do_sample=True, top_k=0)
    for seq in (greedy, sampled):
        assert seq.shape[1] > ids.shape[1]
        assert not new & set(seq[0, ids.shape[1] :].tolist())
