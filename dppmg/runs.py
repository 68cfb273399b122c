"""What every stage of a run shares: one process at a time (a lock), then skip a finished stage, or open its folder,
record the config, seed."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dppmg.config import Config, to_yaml
from dppmg.distributed import Dist, init_distributed, shutdown
from dppmg.io import exclusive_lock, finished_with, write_text
from dppmg.log import logger
from dppmg.seeding import seed_everything


def without_later_keys(values: dict[str, Any], later: Mapping[str, Any]) -> dict[str, Any]:
    """A config section's values for a fingerprint, without the keys added after finished runs existed (`later`:
    key -> default) where they hold their default, so that those runs still count as finished for the config
    that made them."""
    return {k: v for k, v in values.items() if not (k in later and v == later[k])}


def begin_stage(cfg: Config, stage: str, fingerprint: str, overwrite: bool) -> Path | None:
    """Open `runs/<run_name>/<stage>/` for a run of `cfg`, or return None when it is already complete.

    Complete means its metrics.json carries `fingerprint` (the same config and inputs). A complete folder from
    another config is an error unless `overwrite` (the `<stage>.overwrite` key) allows replacing it. Otherwise
    the folder is created, the resolved config written to its config.yaml, and every RNG seeded from cfg.seed.
    """
    out = cfg.run_dir / stage
    if finished_with(
        out / "metrics.json", "fingerprint", fingerprint, overwrite, f"{stage}.overwrite", "run_name"
    ):
        logger.info("%s is complete for this config; nothing to do", out)
        return None
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", to_yaml(cfg))
    seed_everything(cfg.seed)
    return out


LOCK_FILE = ".lock"


@contextmanager
def stage_lock(cfg: Config, stage: str, main: bool = True) -> Iterator[None]:
    """Hold `runs/<run_name>/<stage>/.lock` for the block: a second process on the same run and stage is refused.

    Under a launcher only rank 0 (`main`) takes it: the other ranks write nothing of their own, and they are part
    of the same run.
    """
    if not main:
        yield
        return
    with exclusive_lock(cfg.run_dir / stage / LOCK_FILE, f"run {cfg.run_name!r}, {stage}"):
        yield


@contextmanager
def distributed_stage(cfg: Config, stage: str, device: str) -> Iterator[Dist]:
    """The process group a launcher describes (or one process), with rank 0 holding the stage's lock, for the block."""
    dist = init_distributed(device)
    try:
        with stage_lock(cfg, stage, dist.main):
            yield dist
    finally:
        shutdown(dist)
