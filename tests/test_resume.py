"""Hard kills: stage 1 and stage 2 are killed with SIGKILL after a mid-run checkpoint and rerun with the same
command; they end exactly where an uninterrupted run of the same config and seed ends (CPU, equal metrics and codes).

The kill point is made deterministic with DPPMG_TEST_PAUSE_AFTER_CHECKPOINT=N (dppmg.io.pause_after_checkpoint):
the process sleeps after writing its N-th checkpoint, and the test kills it there.
"""

import shutil
from pathlib import Path

import pytest
import torch
from helpers import command, kill_when, no_partial_files, run, without_seconds

from dppmg.io import read_json
from dppmg.tokens import TokenCheckpoint


def kill_after_checkpoint(cmd: list[str], n: int, ckpt: Path, done: Path) -> None:
    """Start `cmd`, wait until it pauses after its n-th checkpoint, SIGKILL it."""
    kill_when(cmd, n, lambda: _paused(ckpt, n), done)


def _paused(ckpt: Path, n: int) -> bool:
    # The env hook counts checkpoints; the file tells which one is there: stage 1's epoch, stage 2's progress.
    if not ckpt.is_file():
        return False
    sd = torch.load(ckpt, weights_only=False)
    if isinstance(sd, dict):  # stage 1: checkpoint n is written after epoch n
        return sd["state"]["epoch"] >= n
    return len(sd.evals) + sd.iteration >= n  # stage 2: none, grounded, then one per RL iteration


@pytest.fixture(scope="module")
def straight1(tmp_path_factory):
    """An uninterrupted stage 1."""
    tmp = tmp_path_factory.mktemp("resume")
    run(command(tmp, "stage1", "straight"))
    return tmp


@pytest.fixture(scope="module")
def straight(straight1):
    """And an uninterrupted stage 2 (two RL iterations, so that there is a middle to kill in)."""
    run(command(straight1, "stage2", "straight", "stage2.rl.iterations=2"))
    return straight1


def test_stage1_killed_mid_run_resumes_to_the_same_result(straight1):  # about 45 s with its fixture, idle
    tmp = straight1
    cmd = command(tmp, "stage1", "killed")
    out = tmp / "runs" / "killed" / "stage1"
    kill_after_checkpoint(cmd, 3, out / "checkpoint.pt", out / "metrics.json")
    assert torch.load(out / "checkpoint.pt", weights_only=False)["state"]["epoch"] == 3
    assert not (out / "tokens").exists()
    run(cmd)
    no_partial_files(tmp / "runs" / "killed")
    a = read_json(tmp / "runs" / "straight" / "stage1" / "metrics.json")
    b = read_json(out / "metrics.json")
    keys = ("recall@20", "ndcg@20", "recall@20_quantized", "ndcg@20_quantized", "codebook_usage",
            "unique_code_ratio", "preference_recovery", "epochs_run", "best_epoch")  # fmt: skip
    assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}  # exact on CPU
    ta = TokenCheckpoint.load(tmp / "runs" / "straight" / "stage1" / "tokens")
    tb = TokenCheckpoint.load(out / "tokens")
    for m in ta.modalities:
        assert torch.equal(ta.codes[m], tb.codes[m]) and torch.equal(ta.codebooks[m], tb.codebooks[m])


@pytest.mark.slow  # about 100 s
def test_stage2_killed_mid_rl_resumes_to_the_same_result(straight):
    tmp = straight
    # Stage 1 of the killed run is the straight one's (same config and seed: test above shows it is identical).
    shutil.copytree(tmp / "runs" / "straight" / "stage1", tmp / "runs" / "killed2" / "stage1")
    cmd = command(tmp, "stage2", "killed2", "stage2.rl.iterations=2")
    out = tmp / "runs" / "killed2" / "stage2"
    kill_after_checkpoint(cmd, 3, out / "checkpoint.pt", out / "metrics.json")  # after the first RL iteration
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state.iteration == 1 and "rl" not in state.evals
    run(cmd)
    no_partial_files(tmp / "runs" / "killed2")
    a = read_json(tmp / "runs" / "straight" / "stage2" / "metrics.json")
    b = read_json(out / "metrics.json")
    assert a["heldout"] == b["heldout"]  # exact on CPU: every condition, every metric
    assert without_seconds(a["rl_history"]) == without_seconds(b["rl_history"])
