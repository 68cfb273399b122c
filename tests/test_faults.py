"""Faults: a SIGKILL mid-run, a full disk, two runs or processes on one run name, read-only inputs (issue 14, item 4).

Each case runs the real command line on configs/debug.yaml in a temporary folder: in a subprocess, or in process
through `dppmg.cli.main` where a write has to fail (monkeypatch). Stage 1 and stage 2 killed mid-run are
tests/test_resume.py's; RELIABILITY.md lists every case.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from helpers import REPO, command, kill, kill_when, no_partial_files, run, start_until, without_seconds
from safetensors.torch import load_file

from dppmg.cli import main
from dppmg.io import exclusive_lock, read_json
from dppmg.log import logger

FULL_DISK = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
# Two methods and two seeds: enough for an eval to have a middle, at a third of the full list's cost.
EVAL_ARGS = ("eval.methods=[none,dppmg]", "eval.seeds=[0,1]", "eval.downstream_methods=[none,dppmg]")


def assert_all_parse(folder: Path) -> None:
    """Every output file under `folder` that exists reads back whole: nothing half-written is left in place."""
    readers = {
        ".json": lambda p: json.loads(p.read_text()),
        ".yaml": lambda p: yaml.safe_load(p.read_text()),
        ".safetensors": lambda p: load_file(str(p)),
        ".npy": np.load,
        ".npz": lambda p: [np.load(p)[k] for k in np.load(p).files],
        ".parquet": pd.read_parquet,
        ".pt": lambda p: torch.load(p, weights_only=False),
    }
    for p in folder.rglob("*"):
        if p.is_file() and p.suffix in readers:
            readers[p.suffix](p)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (but lock files, which hold their last holder's PID) and a hash of its content."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock" and not p.name.endswith(".lock")
    }


def cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """`dppmg ARGS` in this process (for monkeypatched faults): exit code and stderr."""
    capsys.readouterr()
    handlers = logger.handlers[:]
    logger.handlers.clear()  # the command line's log handler writes to this test's stderr, not an earlier one's
    try:
        code = main(args)
    finally:
        logger.handlers[:] = handlers
    return code, capsys.readouterr().err


def assert_clear_error(err: str, *expect: str) -> None:
    assert "Traceback" not in err, err
    message = err[err.index("dppmg: error:") :]
    for text in expect:
        assert text in message, f"{text!r} not in:\n{message}"


@pytest.fixture(scope="module")
def first(tmp_path_factory) -> Path:
    """A finished stage 1 of run `first` (and its prepared dataset), about 40 s."""
    tmp = tmp_path_factory.mktemp("faults")
    run(command(tmp, "stage1", "first"))
    return tmp


# --- SIGKILL, then the same command again ---------------------------------------------------------------------


def test_data_prepare_killed_mid_build_leaves_nothing_half_written_and_reruns_to_the_same_dataset(
    first, tmp_path
):
    cmd = command(tmp_path, "data prepare", "killed")
    processed = tmp_path / "data" / "processed"
    # Killed between the tables and the features: the staging folder holds the tables, the text encoder is next.
    kill_when(cmd, None, lambda: any(processed.glob(".debug.partial-*/users.parquet")), processed / "debug")
    assert_all_parse(tmp_path)
    run(cmd)
    no_partial_files(tmp_path / "data")
    assert_all_parse(tmp_path)
    a, b = first / "data" / "processed" / "debug", processed / "debug"
    for key in ("content_hash", "build_fingerprint", "counts", "features"):
        assert read_json(a / "meta.json")[key] == read_json(b / "meta.json")[key]
    for table in ("items", "interactions", "users"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(a / f"{table}.parquet"), pd.read_parquet(b / f"{table}.parquet")
        )
    for f in ("text", "image"):  # exact on CPU: the same encoder and the same scorer
        assert np.array_equal(np.load(a / "features" / f"{f}.npy"), np.load(b / "features" / f"{f}.npy"))


@pytest.fixture(scope="module")
def evaluated(first) -> Path:
    """Stage 2 and an uninterrupted eval of run `first`, about 3 minutes."""
    run(command(first, "stage2", "first"))
    run(command(first, "eval", "first", *EVAL_ARGS))
    return first


@pytest.mark.slow  # about 4 minutes with its fixtures
def test_eval_killed_mid_run_resumes_to_the_same_results(evaluated):
    tmp = evaluated
    for stage in ("stage1", "stage2"):  # the same stages as run `first`'s (same config and seed)
        shutil.copytree(tmp / "runs" / "first" / stage, tmp / "runs" / "killed" / stage)
    cmd = command(tmp, "eval", "killed", *EVAL_ARGS)
    out = tmp / "runs" / "killed" / "eval"
    # Eval's checkpoints are its cached (method, seed) generations: killed after the second.
    kill_when(cmd, 2, lambda: len(list((out / "cache").rglob("*.npz"))) >= 2, out / "results.json")
    assert_all_parse(out)
    run(cmd)
    no_partial_files(out)
    assert_all_parse(out)
    a = read_json(tmp / "runs" / "first" / "eval" / "results.json")
    b = read_json(out / "results.json")
    assert (a.pop("run"), b.pop("run")) == ("first", "killed")
    assert without_seconds(a) == without_seconds(b)  # exact on CPU: every method, metric, interval and seed


# --- a full disk ------------------------------------------------------------------------------------------------


def test_a_full_disk_while_writing_a_checkpoint_keeps_the_last_one_and_names_the_file(
    first, monkeypatch, capsys
):  # about 30 s
    """Stage 1 runs out of space half-way through its third checkpoint: the second stays, whole, in place."""
    save, calls = torch.save, []

    def save_until_full(obj, f, *args, **kwargs):
        if Path(f).name.startswith(".checkpoint.pt."):
            calls.append(f)
            if len(calls) == 3:
                Path(f).write_bytes(b"PK\x03\x04 the first bytes of a checkpoint")
                raise FULL_DISK
        return save(obj, f, *args, **kwargs)

    monkeypatch.delenv("DPPMG_TEST_PAUSE_AFTER_CHECKPOINT", raising=False)
    monkeypatch.setattr(torch, "save", save_until_full)
    code, err = cli(command(first, "stage1", "full")[3:], capsys)
    out = first / "runs" / "full" / "stage1"
    assert code == 2
    assert_clear_error(err, f"no space left on device writing {out / 'checkpoint.pt'}")
    assert torch.load(out / "checkpoint.pt", weights_only=False)["state"]["epoch"] == 2
    assert not (out / "metrics.json").exists()
    no_partial_files(first / "runs" / "full")
    assert_all_parse(out)


def test_a_full_disk_while_rebuilding_a_dataset_keeps_the_previous_one(
    first, monkeypatch, capsys
):  # about 15 s
    """`data.overwrite=true` with another config, and the disk fills while the new features are written."""
    processed = first / "data" / "processed"
    before = snapshot(processed / "debug")
    save = np.save

    def save_until_full(f, arr, *args, **kwargs):
        if ".text.npy." in getattr(f, "name", ""):
            f.write(b"\x93NUMPY half")
            raise FULL_DISK
        return save(f, arr, *args, **kwargs)

    monkeypatch.setattr(np, "save", save_until_full)
    args = command(first, "data prepare", "first", "data.overwrite=true", "data.synthetic.n_users=41")[3:]
    code, err = cli(args, capsys)
    assert code == 2
    assert_clear_error(err, "no space left on device writing", "text.npy")
    assert snapshot(processed / "debug") == before
    no_partial_files(processed)
    assert_all_parse(processed)


# --- two runs or two processes on one run -----------------------------------------------------------------------


def test_a_second_run_with_the_same_name_and_another_config_does_not_replace_the_first(first):  # about 10 s
    out = first / "runs" / "first" / "stage1"
    before = snapshot(out)
    r = run(command(first, "stage1", "first", "stage1.epochs=5"), ok=False)
    assert r.returncode == 2
    assert_clear_error(r.stderr, str(out), "different config", "stage1.overwrite=true", "run_name=<new name>")
    assert snapshot(out) == before
    r = run(command(first, "stage1", "first"))  # the same config again: nothing to do
    assert "nothing to do" in r.stderr
    assert snapshot(out) == before


@pytest.mark.parametrize("stage", ["stage1", "stage2", "eval", "data prepare"])
def test_a_locked_run_is_refused_naming_the_run_stage_and_holder(tmp_path, stage):  # about 5 s each
    if stage == "data prepare":
        lock, expect = tmp_path / "data" / "processed" / ".debug.lock", "the processed dataset"
    else:
        lock, expect = tmp_path / "runs" / "locked" / stage / ".lock", f"run 'locked', {stage}"
    with exclusive_lock(lock, "the test"):
        r = run(command(tmp_path, stage, "locked"), ok=False)
    assert r.returncode == 2
    assert_clear_error(r.stderr, expect, f"in use by another process (PID {os.getpid()}", str(lock))


def test_two_processes_on_one_run_the_second_is_refused_and_a_killed_holder_leaves_no_lock(
    first,
):  # about 20 s
    cmd = command(first, "stage1", "second")
    out = first / "runs" / "second" / "stage1"
    holder = start_until(cmd, 1, lambda: (out / "checkpoint.pt").is_file())  # paused after its first epoch
    try:
        r = run(cmd, ok=False)
        assert r.returncode == 2
        assert_clear_error(r.stderr, "run 'second', stage1", f"in use by another process (PID {holder.pid}")
    finally:
        kill(holder)
    with exclusive_lock(out / ".lock", "the test"):  # the OS released the dead holder's lock
        pass
    assert torch.load(out / "checkpoint.pt", weights_only=False)["state"]["epoch"] == 1


# --- read-only inputs -------------------------------------------------------------------------------------------


def test_data_prepare_reads_a_read_only_raw_folder_and_writes_nothing_into_it(tmp_path):  # about 10 s
    """As root chmod does not stop a write: the listing, contents and times before and after must be equal too."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "items.csv").write_text(
        "item_id,text,keywords\n" + "".join(f"i{k},a lamp {k},lamp\n" for k in range(6))
    )
    rows = "".join(f"u{u},i{(u + k) % 6},{1000 + 10 * k}\n" for u in range(4) for k in range(3))
    (raw / "interactions.csv").write_text("user_id,item_id,timestamp\n" + rows)

    def listing() -> dict[str, tuple[int, str]]:
        return {
            str(p.relative_to(raw)): (
                p.stat().st_mtime_ns,
                p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest(),
            )
            for p in [raw, *sorted(raw.rglob("*"))]
        }

    for p in [raw, *raw.iterdir()]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        before = listing()
        args = [
            sys.executable, "-m", "dppmg", "data", "prepare", str(REPO / "configs" / "custom.yaml"),
            f"data.raw_dir={raw}", f"data.root={tmp_path / 'data'}", f"features.cache_dir={tmp_path / 'cache'}",
        ]  # fmt: skip
        run(args)
        assert listing() == before
        assert (tmp_path / "data" / "processed" / "custom" / "meta.json").is_file()
    finally:
        for p in [raw, *raw.iterdir()]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
