"""Experiment tracking: W&B when `tracking.mode` resolves to online or offline, a no-op otherwise.

Training code calls the `Tracker` methods on whatever `build_tracker` returns and never checks which one it
got (the nanoGPT habit: W&B stays optional). wandb is imported only when it is used, so that a run with
tracking disabled neither pays its import time nor needs it installed.

Modes (`tracking.mode`):
    auto      the default: WANDB_MODE when it is set (the tests set it to disabled), else online when a W&B
              API key is configured and offline when not
    online    upload as the run goes; without an API key it falls back to offline, with a warning
    offline   write the run under runs/<run>/wandb/offline-run-*; `wandb sync` uploads it later
    disabled  nothing
"""

from __future__ import annotations

import netrc
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import numpy as np

from dppmg.errors import DppmgError
from dppmg.log import logger

if TYPE_CHECKING:
    from dppmg.config import TrackingConfig
    from dppmg.tokens import TokenCheckpoint

MODES = ("auto", "online", "offline", "disabled")
DEFAULT_HOST = "https://api.wandb.ai"
# WANDB_MODE values wandb itself accepts, and the mode each one means here ("dryrun" and "run" are its old names).
_ENV_MODES = {
    "disabled": "disabled",
    "offline": "offline",
    "dryrun": "offline",
    "online": "online",
    "run": "online",
}


class Tracker(Protocol):
    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Record metrics at a step (an epoch, an iteration)."""

    def summary(self, metrics: dict[str, Any]) -> None:
        """Record the run's final numbers."""

    def images(
        self, key: str, images: np.ndarray, captions: Sequence[str] | None = None, step: int | None = None
    ) -> None:
        """Record images uint8 [N, H, W, 3] under one key (W&B shows them as a grid), one caption each."""

    def table(
        self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int | None = None
    ) -> None:
        """Record a table; a cell may be a number, a string, None or an image uint8 [H, W, 3]."""

    def histogram(self, key: str, counts: Sequence[float], step: int | None = None) -> None:
        """Record a histogram whose bin i, [i, i + 1), has height counts[i] (e.g. how many users hold code i)."""

    def artifact(
        self, name: str, type: str, entries: Mapping[str, Path], metadata: dict[str, Any] | None = None
    ) -> None:
        """Record files as a versioned artifact; `entries` maps a path inside the artifact ("." for its root) to
        a local file or folder."""

    def finish(self) -> None:
        """Flush and close; safe to call twice."""


class NoOpTracker:
    """Accepts everything, records nothing."""

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def summary(self, metrics: dict[str, Any]) -> None:
        pass

    def images(
        self, key: str, images: np.ndarray, captions: Sequence[str] | None = None, step: int | None = None
    ) -> None:
        pass

    def table(
        self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int | None = None
    ) -> None:
        pass

    def histogram(self, key: str, counts: Sequence[float], step: int | None = None) -> None:
        pass

    def artifact(
        self, name: str, type: str, entries: Mapping[str, Path], metadata: dict[str, Any] | None = None
    ) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker:
    """Thin wrapper over a wandb run. Nested metrics are flattened to "a/b" keys (W&B groups its panels
    by the part before "/"), and lists to "a/0", "a/1", so per-level values become separate curves.

    Args:
        run: the wandb run.
        wandb: the wandb module (its media classes), passed in so that this module never imports it itself.
        offline_dir: the offline run's folder, named at finish with the command that uploads it; None online.
    """

    def __init__(self, run: Any, wandb: Any, offline_dir: Path | None = None) -> None:
        self.run, self.wandb, self.offline_dir = run, wandb, offline_dir
        self._finished = False

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.run.log(flatten_metrics(metrics), step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        for key, value in flatten_metrics(metrics).items():
            self.run.summary[key] = value

    def images(
        self, key: str, images: np.ndarray, captions: Sequence[str] | None = None, step: int | None = None
    ) -> None:
        captions = list(captions) if captions is not None else [None] * len(images)
        if len(captions) != len(images):
            raise ValueError(f"{key}: {len(images)} images but {len(captions)} captions")
        self.run.log({key: [self.wandb.Image(img, caption=c) for img, c in zip(images, captions)]}, step=step)

    def table(
        self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int | None = None
    ) -> None:
        def cell(v: Any) -> Any:
            return self.wandb.Image(v) if isinstance(v, np.ndarray) and v.ndim == 3 else v

        data = [[cell(v) for v in row] for row in rows]
        self.run.log({key: self.wandb.Table(columns=list(columns), data=data)}, step=step)

    def histogram(self, key: str, counts: Sequence[float], step: int | None = None) -> None:
        counts = np.asarray(counts, dtype=np.float64)
        edges = np.arange(len(counts) + 1, dtype=np.float64)
        self.run.log({key: self.wandb.Histogram(np_histogram=(counts, edges))}, step=step)

    def artifact(
        self, name: str, type: str, entries: Mapping[str, Path], metadata: dict[str, Any] | None = None
    ) -> None:
        art = self.wandb.Artifact(artifact_name(name), type=type, metadata=metadata or {})
        for inside, local in entries.items():
            local = Path(local)
            if local.is_dir():
                art.add_dir(str(local), name=None if inside in (".", "") else inside)
            elif local.is_file():
                art.add_file(str(local), name=inside)
            else:
                raise DppmgError(f"artifact {name}: {local} does not exist")
        self.run.log_artifact(art)

    def finish(self) -> None:
        if not self._finished:
            self._finished = True
            self.run.finish()
            if self.offline_dir is not None:
                logger.info(
                    "W&B offline run in %s; upload it with `wandb sync %s`",
                    self.offline_dir,
                    self.offline_dir,
                )


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


def artifact_name(name: str) -> str:
    """W&B artifact names allow letters, digits, "-", "_" and "."; anything else becomes "_"."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def log_code_usage(
    tracker: Tracker, ckpt: TokenCheckpoint, prefix: str = "tokens", step: int | None = None
) -> None:
    """One histogram per modality and level of a token checkpoint: how many users hold each code."""
    from dppmg.tokens import code_counts

    for m in ckpt.modalities:
        for level, counts in enumerate(code_counts(ckpt.codes[m], ckpt.codebook_size(m))):
            tracker.histogram(f"{prefix}/{m}/level_{level}", counts.tolist(), step=step)


# ---------------------------------------------------------------------------------------------------------
# Which mode


def api_key_configured(env: Mapping[str, str] | None = None) -> bool:
    """Whether wandb would find credentials for its server, without importing wandb or using the network.

    The same sources, in the same order, as wandb 0.31's own login (`wandb.sdk.lib.wbauth`): WANDB_API_KEY,
    WANDB_IDENTITY_TOKEN_FILE, then a .netrc entry (NETRC, else ~/.netrc) for the host of WANDB_BASE_URL
    (api.wandb.ai by default). Written here rather than called there because that module is not a public API,
    and the public check (`wandb.login(prompt=False)`) may ask the server.
    """
    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(env.get("WANDB_BASE_URL") or DEFAULT_HOST).netloc
    path = Path(env["NETRC"]).expanduser() if env.get("NETRC") else Path("~/.netrc").expanduser()
    if not host or not path.is_file():
        return False
    try:
        creds = netrc.netrc(str(path)).authenticators(host)
    except (netrc.NetrcParseError, OSError):
        return False
    return bool(creds and creds[2])


def resolve_mode(mode: str, run_dir: Path, env: Mapping[str, str] | None = None) -> str:
    """The mode a run uses: "online", "offline" or "disabled" (see the module docstring)."""
    env = os.environ if env is None else env
    if mode not in MODES:
        raise DppmgError(f"tracking.mode={mode!r} is not one of: {', '.join(MODES)}")
    if mode == "auto":
        forced = env.get("WANDB_MODE")
        if forced:
            if forced not in _ENV_MODES:
                raise DppmgError(f"WANDB_MODE={forced!r} is not one of: {', '.join(_ENV_MODES)}")
            mode = _ENV_MODES[forced]
        else:
            mode = "online" if api_key_configured(env) else "offline"
    if mode == "online" and not api_key_configured(env):
        logger.warning(
            "tracking.mode=online but no W&B API key is configured (WANDB_API_KEY or `wandb login`): tracking "
            "offline; upload later with `wandb sync %s/wandb/offline-run-*`",
            run_dir,
        )
        mode = "offline"
    return mode


def build_tracker(cfg: TrackingConfig, run_dir: Path, config: dict[str, Any], job: str) -> Tracker:
    """A tracker for one job (e.g. "stage1") of the run in `run_dir`.

    W&B files go under `run_dir/wandb/`, so an offline run travels with its run folder and can be
    uploaded later with `wandb sync run_dir/wandb/offline-run-*`.
    """
    run_dir = Path(run_dir)
    mode = resolve_mode(cfg.mode, run_dir)
    if mode == "disabled":
        return NoOpTracker()
    try:
        import wandb
    except ImportError:
        raise DppmgError(
            f"tracking.mode={cfg.mode} needs the wandb package (pip install wandb), or set tracking.mode=disabled"
        ) from None
    run_dir.mkdir(parents=True, exist_ok=True)
    run_name = run_dir.name
    try:
        run = wandb.init(
            mode=mode,
            dir=str(run_dir),
            project=cfg.project,
            entity=cfg.entity,
            tags=list(cfg.tags),
            config=config,
            name=f"{run_name}-{job}",
            group=run_name,  # the stages of one run side by side in the W&B UI
            job_type=job,
            reinit="finish_previous",  # several jobs in one process (tests, `make all`) each get their own run
            # Offline, wandb's own console summary repeats what our log says; online it keeps its run URL line.
            settings=wandb.Settings(silent=mode == "offline", quiet=True),
        )
    except wandb.errors.Error as e:
        raise DppmgError(
            f"W&B could not start in mode {mode}: {e}. Log in (`wandb login`), or use tracking.mode=offline "
            "or tracking.mode=disabled"
        ) from None
    # run.dir is <run folder>/files; the run folder is what `wandb sync` takes.
    offline_dir = Path(run.dir).parent if mode == "offline" else None
    return WandbTracker(run, wandb, offline_dir)
