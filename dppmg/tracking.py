"""Experiment tracking: W&B when `tracking.mode` is online or offline, a no-op otherwise.

Training code calls `log`, `summary` and `finish` on whatever `build_tracker` returns and never checks
which one it got (the nanoGPT habit: W&B stays optional). wandb is imported only when it is used, so
that a run with tracking disabled neither pays its import time nor needs it installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from dppmg.errors import DppmgError

if TYPE_CHECKING:
    from dppmg.config import TrackingConfig


class Tracker(Protocol):
    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Record metrics at a step (an epoch, an iteration)."""

    def summary(self, metrics: dict[str, Any]) -> None:
        """Record the run's final numbers."""

    def finish(self) -> None:
        """Flush and close; safe to call twice."""


class NoOpTracker:
    """Accepts everything, records nothing."""

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def summary(self, metrics: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker:
    """Thin wrapper over a wandb run. Nested metrics are flattened to "a/b" keys (W&B groups its panels
    by the part before "/"), and lists to "a/0", "a/1", so per-level values become separate curves."""

    def __init__(self, run: Any) -> None:
        self.run = run
        self._finished = False

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.run.log(flatten_metrics(metrics), step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        for key, value in flatten_metrics(metrics).items():
            self.run.summary[key] = value

    def finish(self) -> None:
        if not self._finished:
            self._finished = True
            self.run.finish()


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1, "c": [2, 3]}} -> {"a/b": 1, "a/c/0": 2, "a/c/1": 3}."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten_metrics(value, prefix=f"{name}/")
        elif isinstance(value, (list, tuple)):
            flat |= flatten_metrics({str(i): v for i, v in enumerate(value)}, prefix=f"{name}/")
        else:
            flat[name] = value
    return flat


def build_tracker(cfg: TrackingConfig, run_dir: Path, config: dict[str, Any], job: str) -> Tracker:
    """A tracker for one job (e.g. "stage1") of the run in `run_dir`.

    W&B files go under `run_dir/wandb/`, so an offline run travels with its run folder and can be
    uploaded later with `wandb sync run_dir/wandb/offline-run-*`.
    """
    if cfg.mode == "disabled":
        return NoOpTracker()
    if cfg.mode not in ("offline", "online"):
        raise DppmgError(f"tracking.mode={cfg.mode!r} is not one of: disabled, offline, online")
    try:
        import wandb
    except ImportError:
        raise DppmgError(
            f"tracking.mode={cfg.mode} needs the wandb package (pip install wandb), or set tracking.mode=disabled"
        ) from None
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_name = run_dir.name
    try:
        run = wandb.init(
            mode=cfg.mode,
            dir=str(run_dir),
            project=cfg.project,
            entity=cfg.entity,
            tags=list(cfg.tags),
            config=config,
            name=f"{run_name}-{job}",
            group=run_name,  # the stages of one run side by side in the W&B UI
            job_type=job,
            reinit="finish_previous",  # several jobs in one process (tests, `make all`) each get their own run
        )
    except wandb.errors.Error as e:
        raise DppmgError(
            f"W&B could not start in mode {cfg.mode}: {e}. Log in (`wandb login`), or use tracking.mode=offline "
            "or tracking.mode=disabled"
        ) from None
    return WandbTracker(run)
