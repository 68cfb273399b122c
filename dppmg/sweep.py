"""Hyperparameter sweeps in W&B's sweep format: online through a W&B agent, offline with W&B's `sweeps` engine.

Offline, this module is the controller: `sweeps.next_run(spec, runs)` proposes a trial's parameters from the
finished ones, the spec's `command` runs it as a subprocess, and the trial's metric is read back from its
`runs/<trial>/<stage>/metrics.json`. The sweep's state is rewritten atomically after every trial, so a rerun of
the same command continues where an interrupted one stopped.
"""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from dppmg.config import Config
from dppmg.errors import DppmgError
from dppmg.io import read_json, write_json, write_text

METHODS = ("grid", "random", "bayes")
GOALS = ("maximize", "minimize")
ARGS_MACRO = "${args_no_hyphens}"
SWEEPS_ROOT = Path("runs") / "sweeps"


@dataclass
class Trial:
    """One run of a sweep: its id, run_name, parameters (dotted config keys), state and metric."""

    id: int
    run_name: str
    params: dict[str, Any]
    state: str = "pending"  # pending | running | finished | failed
    metric: float | None = None
    seconds: float | None = None


@dataclass
class SweepState:
    name: str
    spec: dict
    trials: list[Trial] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> SweepState:
        d = read_json(path)
        return cls(d["name"], d["spec"], [Trial(**t) for t in d["trials"]])

    def save(self, path: Path) -> None:
        write_json(path, {"name": self.name, "spec": self.spec, "trials": [asdict(t) for t in self.trials]})


def load_spec(path: str | Path) -> dict:
    """Read and validate a sweep spec; every error names the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise DppmgError(f"sweep spec not found: {path}")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DppmgError(f"{path}: cannot read YAML: {e}") from None
    validate_spec(spec, str(path))
    return spec


def validate_spec(spec: Any, where: str) -> None:
    if not isinstance(spec, dict):
        raise DppmgError(f"{where}: a sweep spec is a mapping")
    if spec.get("method") not in METHODS:
        raise DppmgError(f"{where}: key 'method'={spec.get('method')!r} is not one of: {', '.join(METHODS)}")
    metric = spec.get("metric")
    if not isinstance(metric, dict) or not metric.get("name"):
        raise DppmgError(f"{where}: key 'metric' is missing (give metric.name and metric.goal)")
    if metric.get("goal", "maximize") not in GOALS:
        raise DppmgError(
            f"{where}: key 'metric.goal'={metric.get('goal')!r} is not one of: {', '.join(GOALS)}"
        )
    params = spec.get("parameters")
    if not isinstance(params, dict) or not params:
        raise DppmgError(f"{where}: key 'parameters' is missing or empty")
    schema = OmegaConf.structured(Config)
    for key in params:
        if not is_config_key(schema, key):
            raise DppmgError(f"{where}: key 'parameters.{key}' is not a config key (see dppmg/config.py)")
    command = spec.get("command")
    if not isinstance(command, list) or ARGS_MACRO not in command:
        raise DppmgError(f"{where}: key 'command' must be a list that contains {ARGS_MACRO}")


def is_config_key(schema: DictConfig, key: str) -> bool:
    """A dotted key of the schema, or a new key inside a free mapping (e.g. stage2.rl.weights.<reward>)."""
    node: Any = schema
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, DictConfig):
            return False
        if part not in node:
            # Free mappings (dict fields) take any key; a dataclass node does not.
            return i == len(parts) - 1 and OmegaConf.get_type(node) is dict
        node = node[part]
    return not isinstance(node, DictConfig) or OmegaConf.get_type(node) is dict


def metrics_file(spec: dict) -> str:
    """The metrics.json of a trial, relative to its run folder: stage2 for a stage-2 command, else stage1."""
    return "stage2/metrics.json" if "stage2" in spec["command"] else "stage1/metrics.json"


def read_metric(path: Path, name: str) -> float | None:
    """`name` (dotted for nested keys, e.g. heldout.rl.reward) from a metrics.json; None if absent."""
    if not path.is_file():
        return None
    value: Any = read_json(path)
    # Flat keys may themselves contain dots (recall@20 does not, but be safe): try the whole name first.
    if isinstance(value, dict) and name in value:
        return float(value[name])
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value)


def build_command(
    spec: dict, config: str | None, run_name: str, overrides: list[str], params: dict
) -> list[str]:
    """The spec's command with `${args_no_hyphens}` = [CONFIG] run_name=... overrides... key=value..."""
    args = [*([config] if config else []), f"run_name={run_name}", *overrides]
    args += [f"{k}={_format(v)}" for k, v in params.items()]
    out: list[str] = []
    for part in spec["command"]:
        if part == ARGS_MACRO:
            out += args
        elif part == "${interpreter}":
            out.append(sys.executable)
        elif part == "${env}":
            continue  # `/usr/bin/env` in W&B's agent; the subprocess inherits the environment anyway
        else:
            out.append(str(part))
    return out


def _format(v: Any) -> str:
    if isinstance(v, float):
        return repr(float(v))
    return str(v.item() if hasattr(v, "item") else v)


TrialRunner = Callable[[Trial], float | None]


def propose(spec: dict, trials: list[Trial]) -> dict | None:
    """The next parameters from W&B's engine given the trials so far; None when a grid is exhausted."""
    from sweeps import RunState, SweepRun, next_run

    states = {"finished": RunState.finished, "failed": RunState.failed, "running": RunState.running}
    runs = [
        SweepRun(
            name=t.run_name,
            state=states.get(t.state, RunState.pending),
            config={k: {"value": v} for k, v in t.params.items()},
            summary_metrics={} if t.metric is None else {spec["metric"]["name"]: t.metric},
        )
        for t in trials
    ]
    proposed = next_run(spec, runs)
    if proposed is None:
        return None
    return {k: _plain(v["value"]) for k, v in proposed.config.items()}


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def run_offline(
    spec: dict,
    name: str,
    count: int,
    runner: TrialRunner,
    out_dir: Path,
    echo: Callable[[str], None] = print,
) -> SweepState:
    """Run trials until `count` are finished (or a grid is exhausted), resuming from `out_dir/state.json`."""
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise DppmgError(f"sweep count must be a positive integer, got {count!r}")
    state_path = out_dir / "state.json"
    state = SweepState.load(state_path) if state_path.is_file() else SweepState(name, spec)
    while sum(t.state == "finished" for t in state.trials) < count:
        # A trial left running by a kill is rerun first, under its own run_name (stage 1 resumes its checkpoint).
        trial = next((t for t in state.trials if t.state in ("running", "pending")), None)
        if trial is None:
            params = propose(spec, state.trials)
            if params is None:
                echo(f"sweep {name}: the grid is exhausted")
                break
            tid = len(state.trials)
            trial = Trial(tid, f"{name}-{tid}", params)
            state.trials.append(trial)
        trial.state = "running"
        state.save(state_path)
        start = time.perf_counter()
        metric = runner(trial)
        trial.seconds = round(time.perf_counter() - start, 2)
        trial.metric = metric
        trial.state = "finished" if metric is not None else "failed"
        state.save(state_path)
        write_leaderboard(state, out_dir)
        shown = " ".join(f"{k}={_format(v)}" for k, v in trial.params.items())
        echo(
            f"trial {trial.id} [{trial.state}] {shown} {spec['metric']['name']}={metric} {trial.seconds:.1f}s"
        )
    write_leaderboard(state, out_dir)
    return state


def leaderboard(state: SweepState) -> list[Trial]:
    """Finished trials, best first by the spec's metric.goal."""
    done = [t for t in state.trials if t.state == "finished" and t.metric is not None]
    reverse = state.spec["metric"].get("goal", "maximize") == "maximize"
    return sorted(done, key=lambda t: t.metric, reverse=reverse)


def write_leaderboard(state: SweepState, out_dir: Path) -> str:
    """leaderboard.csv and leaderboard.md under out_dir; returns the Markdown."""
    rows = leaderboard(state)
    metric = state.spec["metric"]["name"]
    keys = list(state.spec["parameters"])
    header = ["rank", "trial", "run_name", metric, *keys, "seconds"]
    table = [
        [i + 1, t.id, t.run_name, t.metric, *(t.params.get(k) for k in keys), t.seconds]
        for i, t in enumerate(rows)
    ]
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *table])
    write_text(out_dir / "leaderboard.csv", buf.getvalue())
    md = [f"# Sweep {state.name}: {metric} ({state.spec['metric'].get('goal', 'maximize')})", ""]
    md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join("" if c is None else str(c) for c in r) + " |" for r in table]
    text = "\n".join(md) + "\n"
    write_text(out_dir / "leaderboard.md", text)
    return text


def subprocess_runner(
    spec: dict, config: str | None, overrides: list[str], runs_dir: Path = Path("runs")
) -> TrialRunner:
    """Run a trial's command; its metric comes from runs/<trial>/<stage>/metrics.json."""

    def run(trial: Trial) -> float | None:
        cmd = build_command(spec, config, trial.run_name, overrides, trial.params)
        rc = subprocess.run(cmd).returncode
        if rc != 0:
            return None
        return read_metric(runs_dir / trial.run_name / metrics_file(spec), spec["metric"]["name"])

    return run


def run_online(spec: dict, name: str, count: int, config: str | None, overrides: list[str]) -> None:
    """Create the sweep on the W&B server and run an agent for `count` runs."""
    import wandb

    spec = dict(spec, name=name)
    # The agent appends only the sweep's parameters: the config file and the overrides go into the command.
    extra = [*([config] if config else []), *overrides]
    spec["command"] = [p for c in spec["command"] for p in ([*extra, c] if c == ARGS_MACRO else [c])]
    sweep_id = wandb.sweep(spec)
    subprocess.run(["wandb", "agent", "--count", str(count), sweep_id], check=True)


def run_sweep(
    spec_path: str | Path,
    count: int,
    config: str | None,
    overrides: list[str],
    online: bool = False,
    stage1_run: str | None = None,
    default_stage1_run: str | None = None,
    runs_dir: Path = Path("runs"),
) -> SweepState | None:
    """Validate the spec, then run it online (W&B agent) or offline (local controller, leaderboard, resume)."""
    spec = load_spec(spec_path)
    name = str(spec.get("name") or Path(spec_path).stem)
    if not isinstance(count, int) or count < 1:
        raise DppmgError(f"sweep count must be a positive integer, got {count!r}")
    if metrics_file(spec).startswith("stage2"):
        # Every trial's stage 2 uses one finished stage 1 (default: the config's run_name), online and offline.
        shared = stage1_run or default_stage1_run
        if not (runs_dir / str(shared) / "stage1" / "tokens" / "manifest.json").is_file():
            raise DppmgError(
                f"a stage-2 sweep needs one finished stage 1 for all its trials, and {runs_dir / str(shared)}/stage1 has no "
                f"tokens: run `dppmg stage1 CONFIG run_name={shared}` first, or name another run with --stage1-run"
            )
        overrides = [*overrides, f"stage2.stage1_run={shared}"]
    if online:
        run_online(spec, name, count, config, overrides)
        return None
    out_dir = SWEEPS_ROOT / name
    runner = subprocess_runner(spec, config, overrides, runs_dir)
    state = run_offline(spec, name, count, runner, out_dir)
    print((out_dir / "leaderboard.md").read_text(encoding="utf-8"), end="")
    return state
