"""Stage 1 with two CPU processes (torchrun, gloo) ends where one process ends, on the same code path."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = (
    1e-4  # on every metric; measured: the two runs agree to ~1e-7 in the embeddings and exactly in codes
)


def stage1(tmp: Path, run: str, processes: int) -> Path:
    overrides = [
        f"data.root={tmp / 'data'}", f"features.cache_dir={tmp / 'cache'}", f"runs_dir={tmp / 'runs'}",
        f"run_name={run}",
    ]  # fmt: skip
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
    ]
    command = [*(launcher if processes > 1 else [sys.executable]), "-m", "dppmg", "stage1", "-q"]
    done = subprocess.run(
        [*command, str(REPO / "configs" / "debug.yaml"), *overrides],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "runs" / run / "stage1"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    one = stage1(tmp, "one", 1)  # prepares the dataset; the two-process run finds it up to date
    return one, stage1(tmp, "two", 2)


def test_two_processes_end_where_one_process_ends(runs):
    one, two = runs
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    for key in ("recall@20", "ndcg@20", "recall@20_quantized", "ndcg@20_quantized", "best_valid_recall@20"):
        assert abs(m1[key] - m2[key]) <= TOLERANCE, (key, m1[key], m2[key])
    assert m1["best_epoch"] == m2["best_epoch"]
    # The losses are the whole batch's, whatever the number of processes.
    h1, h2 = (json.loads((d / "history.json").read_text()) for d in (one, two))
    assert [round(e["train/loss"], 4) for e in h1] == [round(e["train/loss"], 4) for e in h2]
    t1, t2 = (load_file(d / "tokens" / "tokens.safetensors") for d in (one, two))
    for name in t1:
        if name.startswith("codes."):
            agree = (t1[name] == t2[name]).float().mean().item()
            assert agree >= 0.95, (name, agree)
        else:
            assert (t1[name] - t2[name]).abs().max() <= TOLERANCE, name


def test_only_rank_zero_writes(runs):
    _, two = runs
    assert sorted(p.name for p in two.iterdir() if not p.name.startswith("wandb")) == sorted(
        ["best.pt", "checkpoint.pt", "config.yaml", "history.json", "metrics.json", "tokens"]
    )
    assert not list(two.parent.glob(".*partial*")) and not list(two.glob(".*"))
