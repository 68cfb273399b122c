import subprocess
import sys
import time
from pathlib import Path

import pytest

from dppmg.config import TrackingConfig
from dppmg.errors import DppmgError
from dppmg.tracking import WandbTracker, build_tracker, flatten_metrics

REPO = Path(__file__).resolve().parents[1]


def test_flatten_metrics_nests_with_slashes():
    flat = flatten_metrics({"loss": 0.5, "valid": {"recall@20": 0.1, "usage": [0.9, 0.7]}, "name": "x"})
    assert flat == {
        "loss": 0.5,
        "valid/recall@20": 0.1,
        "valid/usage/0": 0.9,
        "valid/usage/1": 0.7,
        "name": "x",
    }


def test_disabled_tracker_imports_no_wandb_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    script = f"""
import sys
from pathlib import Path
from dppmg.config import TrackingConfig
from dppmg.tracking import NoOpTracker, build_tracker
t = build_tracker(TrackingConfig(mode="disabled"), Path({str(run_dir)!r}), {{"a": 1}}, "stage1")
assert isinstance(t, NoOpTracker)
t.log({{"loss": 1.0}}, step=0)
t.summary({{"recall@20": 0.1}})
t.finish()
print(sorted(m for m in sys.modules if m.split(".")[0] in ("wandb", "torch")))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert not run_dir.exists()


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    # Keep W&B quiet and all of its files (settings, caches) inside the test's folder.
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def test_offline_tracker_writes_its_run_inside_the_run_folder(wandb_env):
    run_dir = wandb_env / "runs" / "myrun"
    cfg = TrackingConfig(mode="offline", project="dppmg-test", tags=["unit"])
    tracker = build_tracker(cfg, run_dir, {"stage1": {"dim": 8}}, "stage1")
    assert isinstance(tracker, WandbTracker)
    tracker.log({"train": {"loss_marker": 0.5}, "usage_marker": [0.9, 0.8]}, step=0)
    tracker.log({"train": {"loss_marker": 0.25}}, step=1)
    tracker.summary({"best_recall_marker": 0.3})
    tracker.finish()
    tracker.finish()  # a second finish (e.g. from a `finally`) is harmless

    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    logs = list(runs[0].glob("run-*.wandb"))
    assert len(logs) == 1
    # The transaction log is protobuf records; key names and the run name appear in it verbatim. W&B's service
    # process may still be flushing it just after finish() on a loaded machine, so wait for it (bounded).
    keys = (b"train/loss_marker", b"usage_marker/1", b"best_recall_marker", b"myrun-stage1", b"dppmg-test")
    deadline = time.monotonic() + 30
    while True:
        data = logs[0].read_bytes()
        if all(k in data for k in keys) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for key in keys:
        assert key in data, key
    assert sorted(p.name for p in wandb_env.iterdir()) == ["runs", "wandb-home"]


def test_unknown_mode_is_a_user_error(tmp_path):
    with pytest.raises(DppmgError, match="tracking.mode='sometimes'"):
        build_tracker(TrackingConfig(mode="sometimes"), tmp_path, {}, "stage1")
