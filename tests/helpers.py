"""Helpers several test files share (pytest puts this folder on sys.path: `from helpers import ...`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dppmg.tokens import TokenCheckpoint, save_token_checkpoint
from stage2_generation.gallery import GalleryEntry, Shown

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 600  # seconds: generous, the machine is shared


# The real command line in a subprocess, on configs/debug.yaml in a temporary folder (tests/test_resume.py,
# tests/test_faults.py); DPPMG_TEST_PAUSE_AFTER_CHECKPOINT makes the point a process is killed at deterministic.


def command(tmp: Path, stage: str, run_name: str, *overrides: str) -> list[str]:
    """`python -m dppmg STAGE configs/debug.yaml ...` for `run_name` in `tmp`; STAGE may be two words."""
    return [
        sys.executable, "-m", "dppmg", *stage.split(), str(REPO / "configs" / "debug.yaml"), f"run_name={run_name}",
        f"data.root={tmp / 'data'}", f"features.cache_dir={tmp / 'cache'}", f"runs_dir={tmp / 'runs'}",
        *overrides,
    ]  # fmt: skip


def env(pause_after: int | None = None) -> dict[str, str]:
    e = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    e.pop("DPPMG_TEST_PAUSE_AFTER_CHECKPOINT", None)
    if pause_after is not None:
        e["DPPMG_TEST_PAUSE_AFTER_CHECKPOINT"] = str(pause_after)
    return e


def run(cmd: list[str], ok: bool = True) -> subprocess.CompletedProcess:
    """Run `cmd` to its end; with `ok`, assert that it succeeded."""
    r = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
    if ok:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def start_until(cmd: list[str], pause_after: int | None, ready: Callable[[], bool]) -> subprocess.Popen:
    """Start `cmd` (pausing after its `pause_after`-th checkpoint, if given); return it once `ready()` holds."""
    proc = subprocess.Popen(
        cmd, env=env(pause_after), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + TIMEOUT
    try:
        while not ready():
            assert proc.poll() is None, f"exited before it was ready: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "not ready in time"
            time.sleep(0.05 if pause_after is None else 0.2)
    except BaseException:
        kill(proc)
        raise
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def kill_when(cmd: list[str], pause_after: int | None, ready: Callable[[], bool], done: Path) -> None:
    """Start `cmd`, SIGKILL it once `ready()` holds (after its pause, with `pause_after`); `done` must not exist."""
    proc = start_until(cmd, pause_after, ready)
    try:
        if pause_after is not None:
            time.sleep(
                0.5
            )  # the checkpoint is renamed into place before the pause: nothing is written after it
            assert proc.poll() is None
    finally:
        kill(proc)
    assert not done.exists()


def no_partial_files(folder: Path) -> None:
    """After a rerun nothing half-written is left: no temp files beside final ones, no staging folders."""
    left = [p for p in folder.rglob(".*") if p.name.endswith(".tmp") or ".partial-" in p.name]
    assert left == [], left


def without_seconds(obj):
    """`obj` without its wall-clock entries (keys named "seconds"), which differ between any two runs."""
    if isinstance(obj, dict):
        return {k: without_seconds(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [without_seconds(v) for v in obj]
    return obj


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
