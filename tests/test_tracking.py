import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FakeWandb, text_token_checkpoint

from dppmg.config import Config, TrackingConfig
from dppmg.errors import DppmgError
from dppmg.log import logger
from dppmg.tracking import (
    WandbTracker,
    api_key_configured,
    build_tracker,
    flatten_metrics,
    log_code_usage,
    resolve_mode,
)

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


@pytest.mark.parametrize("mode", ["disabled", "auto"])  # auto: the default, disabled by the tests' WANDB_MODE
def test_disabled_tracker_imports_no_wandb_and_writes_nothing(tmp_path, mode):
    run_dir = tmp_path / "runs" / "r"
    script = f"""
import sys
from pathlib import Path
import numpy as np
from dppmg.config import TrackingConfig
from dppmg.tracking import NoOpTracker, build_tracker
t = build_tracker(TrackingConfig(mode={mode!r}), Path({str(run_dir)!r}), {{"a": 1}}, "stage1")
assert isinstance(t, NoOpTracker)
t.log({{"loss": 1.0}}, step=0)
t.summary({{"recall@20": 0.1}})
t.images("gen", np.zeros((2, 4, 4, 3), np.uint8), ["a", "b"], step=0)
t.table("tab", ["user", "image"], [["u0", np.zeros((4, 4, 3), np.uint8)]])
t.histogram("codes", [1, 0, 2], step=0)
t.artifact("tokens", "tokens", {{".": Path({str(tmp_path)!r})}})
t.finish()
print(sorted(m for m in sys.modules if m.split(".")[0] in ("wandb", "torch")))
"""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60, env=env
    )
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
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    tracker.images("gen_marker", images, ["u0: lamp", "u1: chair"], step=1)
    tracker.table("table_marker", ["user", "text", "image"], [["u0", "a red lamp", images[0]]], step=1)
    tracker.histogram("codes_marker", [3, 0, 1, 4], step=1)
    tokens = text_token_checkpoint(
        wandb_env / "tokens", levels=2, size=4, dim=3, codes=[[0, 1], [3, 1]], content_hash="h"
    )
    tracker.artifact("myrun-stage1-tokens", "tokens", {".": tokens.path})
    tracker.finish()
    tracker.finish()  # a second finish (e.g. from a `finally`) is harmless

    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    logs = list(runs[0].glob("run-*.wandb"))
    assert len(logs) == 1
    # The transaction log is protobuf records; key names and the run name appear in it verbatim. W&B's service
    # process may still be flushing it just after finish() on a loaded machine, so wait for it (bounded).
    keys = (
        b"train/loss_marker", b"usage_marker/1", b"best_recall_marker", b"myrun-stage1", b"dppmg-test",
        b"gen_marker", b"table_marker", b"codes_marker", b"myrun-stage1-tokens",
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        data = logs[0].read_bytes()
        if all(k in data for k in keys) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for key in keys:
        assert key in data, key
    # The media are files of the offline run, uploaded with it by `wandb sync`.
    media = runs[0] / "files" / "media"
    assert len(list((media / "images").rglob("*.png"))) == 2
    (table,) = list((media / "table").rglob("*.table.json"))
    assert json.loads(table.read_text())["columns"] == ["user", "text", "image"]
    assert sorted(p.name for p in wandb_env.iterdir()) == ["runs", "tokens", "wandb-home"]


def test_unknown_mode_is_a_user_error(tmp_path):
    with pytest.raises(DppmgError, match="tracking.mode='sometimes'"):
        build_tracker(TrackingConfig(mode="sometimes"), tmp_path, {}, "stage1")


# --- which mode -------------------------------------------------------------------------------------------


@pytest.fixture
def no_netrc(tmp_path):
    """An environment with no W&B settings and a .netrc without a W&B entry."""
    netrc = tmp_path / "netrc"
    netrc.write_text("machine example.com login me password secret\n")
    return {"NETRC": str(netrc)}


def test_auto_is_offline_without_a_key_and_online_with_one(tmp_path, no_netrc):
    run = tmp_path / "runs" / "r"
    assert not api_key_configured(no_netrc)
    assert resolve_mode("auto", run, no_netrc) == "offline"
    assert resolve_mode("auto", run, {**no_netrc, "WANDB_API_KEY": "k" * 40}) == "online"
    netrc = tmp_path / "wandb-netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert resolve_mode("auto", run, {"NETRC": str(netrc)}) == "online"
    # Another server's key is not a key for this one.
    assert (
        resolve_mode("auto", run, {"NETRC": str(netrc), "WANDB_BASE_URL": "https://wandb.example.com"})
        == "offline"
    )


def test_auto_follows_wandb_mode_and_explicit_modes_are_kept(tmp_path, no_netrc):
    run = tmp_path / "runs" / "r"
    key = {**no_netrc, "WANDB_API_KEY": "k" * 40}
    assert resolve_mode("auto", run, {**key, "WANDB_MODE": "disabled"}) == "disabled"
    assert resolve_mode("auto", run, {**key, "WANDB_MODE": "dryrun"}) == "offline"
    assert resolve_mode("offline", run, key) == "offline"
    assert resolve_mode("disabled", run, key) == "disabled"
    assert resolve_mode("online", run, {**key, "WANDB_MODE": "disabled"}) == "online"
    with pytest.raises(DppmgError, match="WANDB_MODE='sometimes'"):
        resolve_mode("auto", run, {"WANDB_MODE": "sometimes"})


def test_online_without_a_key_falls_back_to_offline_saying_how_to_sync(tmp_path, no_netrc, caplog):
    run = tmp_path / "runs" / "r"
    logger.addHandler(caplog.handler)  # the command line may have stopped the project's logger propagating
    try:
        with caplog.at_level(logging.WARNING, logger="dppmg"):
            assert resolve_mode("online", run, no_netrc) == "offline"
    finally:
        logger.removeHandler(caplog.handler)
    # One warning (seen once or twice, through our handler and through propagation).
    (message,) = {r.getMessage() for r in caplog.records if r.levelno == logging.WARNING}
    assert f"wandb sync {run}/wandb/offline-run-*" in message


def test_the_default_mode_is_auto():
    assert Config().tracking.mode == "auto"


def test_key_detection_agrees_with_wandb(tmp_path):
    """wandb's own (deprecated, offline) lookup finds the key that api_key_configured says is there."""
    netrc = tmp_path / "netrc"
    key = "0123456789abcdef" * 2 + "01234567"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {key}\n")
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k not in ("NETRC", "HOME")
    }  # fmt: skip
    env |= {
        "NETRC": str(netrc),
        "HOME": str(tmp_path),
        "WANDB_CONFIG_DIR": str(tmp_path / "cfg"),
        "WANDB_SILENT": "true",
    }
    script = """
import warnings
warnings.simplefilter("ignore")
import wandb
from dppmg.tracking import api_key_configured
print(wandb.api.api_key, api_key_configured())
"""
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [key, "True"]


# --- what reaches wandb (a fake module; the pipeline's jobs are checked in test_eval.py) ------------------


def test_wandb_tracker_builds_wandb_media(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    tracker = build_tracker(TrackingConfig(mode="offline"), tmp_path / "runs" / "r", {"a": 1}, "stage1")
    (run,) = fake.runs
    assert run.init["mode"] == "offline" and run.init["dir"] == str(tmp_path / "runs" / "r")
    img = np.zeros((4, 4, 3), np.uint8)
    tracker.images("gen", img[None].repeat(2, 0), ["a", "b"], step=3)
    tracker.table("tab", ["user", "score", "image"], [["u0", 0.5, img]])
    tracker.histogram("h", [2, 0, 1])
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        tracker.images("gen", img[None].repeat(2, 0), ["a"])
    (step, logged), (_, tab), (_, hist) = run.logs
    assert step == 3 and [i.caption for i in logged["gen"]] == ["a", "b"]
    assert tab["tab"].columns == ["user", "score", "image"]
    assert tab["tab"].data[0][:2] == ["u0", 0.5] and isinstance(tab["tab"].data[0][2], FakeWandb.Image)
    assert hist["h"].counts.tolist() == [2, 0, 1] and hist["h"].edges.tolist() == [0, 1, 2, 3]
    (tmp_path / "f.bin").write_bytes(b"x")
    tracker.artifact("r/stage 2", "tokens", {".": tmp_path / "runs", "f.bin": tmp_path / "f.bin"}, {"k": 1})
    (art,) = run.artifacts
    assert art.name == "r_stage_2" and art.type == "tokens" and art.metadata == {"k": 1}
    assert art.entries == {".": tmp_path / "runs", "f.bin": tmp_path / "f.bin"}
    with pytest.raises(DppmgError, match="does not exist"):
        tracker.artifact("x", "tokens", {".": tmp_path / "missing"})
    tracker.finish()
    tracker.finish()
    assert run.finished == 1


def test_code_usage_counts_every_users_code_per_level(tmp_path):
    ckpt = text_token_checkpoint(
        tmp_path, levels=2, size=4, dim=3, codes=[[0, 1], [3, 1], [0, 2]], content_hash="h"
    )
    logged = {}

    class Recorder:
        def histogram(self, key, counts, step=None):
            logged[key] = (counts, step)

    log_code_usage(Recorder(), ckpt, "tokens", step=5)
    assert logged == {"tokens/text/level_0": ([2, 0, 0, 1], 5), "tokens/text/level_1": ([0, 2, 1, 0], 5)}
    assert torch.equal(
        torch.tensor([logged[f"tokens/text/level_{i}"][0] for i in range(2)]).sum(1), torch.tensor([3, 3])
    )
