"""Helpers several test files share (pytest puts this folder on sys.path: `from helpers import ...`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dppmg.tokens import TokenCheckpoint, save_token_checkpoint
from stage2_generation.gallery import GalleryEntry, Shown

GALLERY_CONDITIONS = ("non-personalized", "before RL (grounded)", "after RL")


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


class FakeWandb:
    """Stands in for the wandb module (put it in sys.modules["wandb"]): records every run's calls, no files.

    `runs` holds one FakeRun per `init`; media objects keep what they were built from, so tests can assert on
    keys, shapes, table columns, histogram counts and artifact contents.
    """

    class errors:  # noqa: N801 - mirrors wandb.errors
        class Error(Exception):
            pass

    def __init__(self) -> None:
        self.runs: list[FakeRun] = []

    def init(self, **kwargs) -> FakeRun:
        run = FakeRun(kwargs)
        self.runs.append(run)
        return run

    def run(self, job: str) -> FakeRun:
        (run,) = [r for r in self.runs if r.init["job_type"] == job]
        return run

    @staticmethod
    def Settings(**kwargs) -> dict:  # noqa: N802 (wandb's name)
        return kwargs

    class Image:
        def __init__(self, data, caption=None):
            self.data, self.caption = data, caption

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    class Histogram:
        def __init__(self, np_histogram):
            self.counts, self.edges = np_histogram

    class Artifact:
        def __init__(self, name, type, metadata=None):
            self.name, self.type, self.metadata, self.entries = name, type, metadata, {}

        def add_dir(self, local, name=None):
            self.entries[name or "."] = Path(local)

        def add_file(self, local, name=None):
            self.entries[name or Path(local).name] = Path(local)


class FakeRun:
    def __init__(self, init: dict) -> None:
        self.init, self.logs, self.summary, self.artifacts, self.finished = init, [], {}, [], 0
        self.dir = str(Path(init["dir"]) / "wandb" / "offline-run-fake" / "files")

    def log(self, data: dict, step=None) -> None:
        self.logs.append((step, data))

    def logged(self, key: str) -> list:
        """Every value logged under `key`, in order."""
        return [d[key] for _, d in self.logs if key in d]

    def keys(self) -> set[str]:
        return {k for _, d in self.logs for k in d}

    def log_artifact(self, artifact) -> None:
        self.artifacts.append(artifact)

    def finish(self) -> None:
        self.finished += 1


def gallery_image(seed: int, side: int = 32) -> np.ndarray:
    """Random RGB pixels [side, side, 3] uint8."""
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


def gallery_entry(user: str, n_history: int, seed: int = 0, with_target_image: bool = True) -> GalleryEntry:
    """A gallery entry with `n_history` past items, a target and one generation per GALLERY_CONDITIONS."""
    history = [Shown(f"past item {k}", gallery_image(seed * 100 + k)) for k in range(n_history)]
    conditions = GALLERY_CONDITIONS
    generations = {
        c: Shown(f"{c} text", gallery_image(seed * 100 + 50 + j)) for j, c in enumerate(conditions)
    }
    return GalleryEntry(
        user_id=user,
        history=history,
        target="lamp",
        target_item=Shown("a red lamp", gallery_image(seed * 100 + 99)) if with_target_image else None,
        generations=generations,
        scores={c: {"personalization_image": 0.1 * j, "consistency": 0.5} for j, c in enumerate(conditions)},
    )
