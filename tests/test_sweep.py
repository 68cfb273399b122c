"""Sweeps: spec validation, the offline controller with a fake trial runner, resume, one real stage-1 sweep."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("sweeps")

from dppmg.errors import DppmgError  # noqa: E402
from dppmg.sweep import SweepState, Trial, load_spec, run_offline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMMAND = ["${env}", "${interpreter}", "-m", "dppmg", "stage1", "${args_no_hyphens}"]


def _spec(method: str = "grid", goal: str = "maximize", **params) -> dict:
    params = params or {"stage1.dim": {"values": [8, 16, 32]}, "stage1.lr": {"values": [0.01, 0.001]}}
    return {
        "method": method,
        "metric": {"name": "recall@20", "goal": goal},
        "parameters": params,
        "command": COMMAND,
    }


def _write(tmp_path: Path, spec: dict) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def _fake(trial: Trial) -> float:
    return trial.params["stage1.dim"] / 100 + trial.params.get("stage1.lr", 0)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("metric"), "'metric' is missing"),
        (lambda s: s.update(method="hyperband"), "'method'='hyperband'"),
        (lambda s: s["parameters"].update({"stage1.dimm": {"values": [1]}}), "'parameters.stage1.dimm'"),
        (lambda s: s["parameters"].update({"stage1": {"values": [1]}}), "'parameters.stage1'"),
        (lambda s: s.update(command=["dppmg", "stage1"]), "'command'"),
    ],
)
def test_spec_errors_name_file_and_key(tmp_path, edit, message):
    spec = _spec()
    edit(spec)
    path = _write(tmp_path, spec)
    with pytest.raises(DppmgError, match=message) as e:
        load_spec(path)
    assert str(path) in str(e.value)


def test_free_mapping_keys_are_config_keys(tmp_path):
    spec = _spec(
        **{"stage2.rl.weights.consistency": {"values": [0.5, 1.0]}, "stage2.rl.lr_text": {"value": 1e-3}}
    )
    load_spec(_write(tmp_path, spec))


def test_shipped_specs_are_valid():
    for path in sorted((ROOT / "configs" / "sweeps").glob("*.yaml")):
        load_spec(path)


def test_count_must_be_positive(tmp_path):
    with pytest.raises(DppmgError, match="positive integer"):
        run_offline(_spec(), "s", 0, _fake, tmp_path)


def test_cli_errors_exit_2_without_traceback(tmp_path):
    spec = _spec()
    spec.pop("metric")
    r = subprocess.run(
        [sys.executable, "-m", "dppmg", "sweep", str(_write(tmp_path, spec)), "--count", "2"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 2 and r.stderr.startswith("dppmg: error:") and "Traceback" not in r.stderr


@pytest.mark.parametrize("goal", ["maximize", "minimize"])
def test_grid_runs_every_point_and_leaderboard_is_sorted(tmp_path, goal):
    state = run_offline(_spec(goal=goal), "g", 100, _fake, tmp_path, echo=lambda s: None)
    points = {(t.params["stage1.dim"], t.params["stage1.lr"]) for t in state.trials}
    assert len(state.trials) == 6 and len(points) == 6  # the grid is exhausted, no duplicate
    with open(tmp_path / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    values = [float(r["recall@20"]) for r in rows]
    assert values == sorted(values, reverse=goal == "maximize")
    assert "| 1 |" in (tmp_path / "leaderboard.md").read_text()


@pytest.mark.parametrize("method", ["random", "bayes"])
def test_random_and_bayes_propose_in_range(tmp_path, method):
    spec = _spec(method, **{"stage1.dim": {"values": [8, 16]}, "stage1.lr": {"min": 0.001, "max": 0.01}})
    state = run_offline(spec, "r", 4, _fake, tmp_path, echo=lambda s: None)
    assert len(state.trials) == 4 and all(t.state == "finished" for t in state.trials)
    assert all(
        0.001 <= t.params["stage1.lr"] <= 0.01 and t.params["stage1.dim"] in (8, 16) for t in state.trials
    )
    assert len({t.run_name for t in state.trials}) == 4


def test_resume_runs_only_the_remaining_trials(tmp_path):
    spec = _spec()
    done = [Trial(0, "s-0", {"stage1.dim": 8, "stage1.lr": 0.01}, "finished", 0.09, 1.0),
            Trial(1, "s-1", {"stage1.dim": 8, "stage1.lr": 0.001}, "running")]  # fmt: skip
    SweepState("s", spec, done).save(tmp_path / "state.json")
    ran: list[str] = []

    def runner(t: Trial) -> float:
        ran.append(t.run_name)
        return _fake(t)

    state = run_offline(spec, "s", 3, runner, tmp_path, echo=lambda s: None)
    assert ran == ["s-1", "s-2"]  # the killed trial again under its own name, then one new one
    assert [t.state for t in state.trials] == ["finished"] * 3
    assert json.loads((tmp_path / "state.json").read_text())["trials"][2]["run_name"] == "s-2"


@pytest.mark.slow  # two real stage-1 trials on the debug world: ~40 s each on 2 shared cores
def test_offline_stage1_sweep_end_to_end(tmp_path):
    spec = _spec("random", **{"stage1.dim": {"values": [16, 32]}, "stage1.layers": {"values": [1, 2]}})
    spec["name"] = "e2e"
    path = _write(tmp_path, spec)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cache").symlink_to((ROOT / "data" / "cache").resolve())  # the shared model files
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    r = subprocess.run(
        [sys.executable, "-m", "dppmg", "sweep", str(path), "--count", "2", "configs/debug.yaml", "-q",
         "tracking.mode=disabled"],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "runs" / "sweeps" / "e2e"
    with open(out / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and (out / "leaderboard.md").is_file()
    for row in rows:
        metrics = json.loads((tmp_path / "runs" / row["run_name"] / "stage1" / "metrics.json").read_text())
        assert float(row["recall@20"]) == pytest.approx(metrics["recall@20"])
    assert "trial 1" in r.stdout


@pytest.mark.slow  # stage 1 once, then two stage-2 trials on the debug world: 53 s on 2 cores
def test_offline_stage2_sweep_end_to_end_shares_one_stage1(tmp_path):
    spec = load_spec(ROOT / "configs" / "sweeps" / "stage2.yaml")
    spec.update(name="e2e2", method="random")
    path = _write(tmp_path, spec)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cache").symlink_to((ROOT / "data" / "cache").resolve())  # the shared model files
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    common = ["configs/debug.yaml", "-q", "tracking.mode=disabled"]
    dppmg = [sys.executable, "-m", "dppmg"]
    run = lambda *a: subprocess.run([*dppmg, *a], cwd=tmp_path, env=env, capture_output=True, text=True)  # noqa: E731
    assert run("stage1", *common).returncode == 0
    r = run("sweep", str(path), "--count", "2", *common)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(tmp_path / "runs" / "sweeps" / "e2e2" / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    shared = (tmp_path / "runs" / "debug" / "stage1").resolve()
    for row in rows:
        trial = tmp_path / "runs" / row["run_name"]
        assert (trial / "stage1").resolve() == shared  # no trial trained its own stage 1
        metrics = json.loads((trial / "stage2" / "metrics.json").read_text())
        metric = spec["metric"]["name"].split(".")
        assert float(row[spec["metric"]["name"]]) == pytest.approx(metrics[metric[0]][metric[1]][metric[2]])


def test_a_stage2_sweep_needs_a_finished_stage1_and_passes_it_to_every_trial(tmp_path, monkeypatch):
    from dppmg import sweep as sweep_mod

    spec = _spec("grid", **{"stage2.rl.lr_text": {"values": [0.001]}})
    spec["command"] = [c.replace("stage1", "stage2") for c in COMMAND]
    spec["metric"]["name"] = "heldout.rl.personalization_image"
    path = _write(tmp_path, spec)
    with pytest.raises(DppmgError, match="needs one finished stage 1.*run_name=base"):
        sweep_mod.run_sweep(path, 1, None, [], default_stage1_run="base", runs_dir=tmp_path / "runs")
    (tmp_path / "runs" / "base" / "stage1" / "tokens").mkdir(parents=True)
    (tmp_path / "runs" / "base" / "stage1" / "tokens" / "manifest.json").write_text("{}")
    seen = {}
    monkeypatch.setattr(
        sweep_mod, "run_online", lambda spec, name, count, config, overrides: seen.update(o=overrides)
    )
    sweep_mod.run_sweep(path, 1, None, ["seed=3"], online=True, stage1_run="base", runs_dir=tmp_path / "runs")
    assert seen["o"] == ["seed=3", "stage2.stage1_run=base"]  # online trials get it in their command too


def test_an_online_agents_trials_get_their_own_run_folders(monkeypatch):
    from dppmg.cli import _sweep_run_name

    assert _sweep_run_name(["stage1.lr=0.01"]) == ["stage1.lr=0.01"]  # not under an agent
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    monkeypatch.setenv("WANDB_RUN_ID", "r7")
    assert _sweep_run_name(["stage1.lr=0.01"]) == ["stage1.lr=0.01", "run_name=sweep-abc123-r7"]
    assert _sweep_run_name(["run_name=mine"]) == ["run_name=mine"]
