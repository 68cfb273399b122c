"""`dppmg stage2` and `dppmg generate`: stage 2 end to end, resumable, with its outputs in runs/<run>/stage2/.

    warm-started generators (cached per dataset)  →  inject the stage-1 tokens into the LM and the text encoder
      → heldout.none      the same generators prompted with the target keywords only
      → grounding         supervised, on the training users' interactions        → heldout.grounded
      → RL                alternating GRPO (text) and DDPO (image) rounds          → heldout.rl
      → tokens.safetensors, export/, generations/, gallery.html, metrics.json (written last: it marks completion)

Held-out users (`stage2.generation.heldout_users`, drawn once per seed) are never seen by grounding or RL;
their (user, test item) pairs are what every `heldout.*` entry measures, with the same pairs, seeds and noise
for the three conditions, so their differences are paired comparisons.

Many processes (torchrun or `accelerate launch`, `dppmg.distributed`): every process holds the whole generators
and token state; the held-out generations, grounding's batches and RL's pairs are split across them, and rank 0
alone writes outputs and checkpoints and tracks the run (README, "Many processes and machines").

A checkpoint (stage2/checkpoint.pt) is written after every phase and RL iteration; an interrupted run resumes
from it. A finished run is not repeated, and a finished run of another config is only replaced with
`stage2.overwrite=true`.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from dppmg.bootstrap import bootstrap_mean, paired_difference
from dppmg.config import Config, load_config, to_dict
from dppmg.data.format import ProcessedDataset, load_dataset
from dppmg.device import sampling_precision
from dppmg.distributed import (
    SINGLE,
    Dist,
    barrier,
    broadcast_flag,
    check_replicas,
    gather,
    gather_rows,
    main_first,
)
from dppmg.errors import DppmgError
from dppmg.io import atomic_path, pause_after_checkpoint, write_json, write_text
from dppmg.log import logger
from dppmg.runs import begin_stage, distributed_stage, without_later_keys
from dppmg.scorer import Scorer
from dppmg.seeding import seed_everything
from dppmg.tokens import TokenCheckpoint, nearest_ids_hint
from dppmg.tracking import NoOpTracker, Tracker, build_tracker, flatten_metrics
from stage2_generation.attributes import fit_judge
from stage2_generation.code_words import code_words, item_words, level0_pieces
from stage2_generation.evaluate import Rewarder, heldout_pairs, split_users, user_histories
from stage2_generation.evaluation.methods import OracleMethod, generate_with_tokens
from stage2_generation.evaluation.metrics import Judges
from stage2_generation.generators import generate_images, image_shape
from stage2_generation.grounding import ground, training_pairs
from stage2_generation.injection import (
    export_image_tokens,
    export_text_tokens,
    load_injected,
    save_injected,
    saved_word_pieces,
)
from stage2_generation.judges import ImageJudge
from stage2_generation.policy import Pair, Policy
from stage2_generation.rewards import METRIC_NAMES, TOTAL_KEY, relative_change
from stage2_generation.rl import make_optimizers, rl_iteration
from stage2_generation.warmstart import warm_start

CONDITIONS = ("none", "grounded", "rl")  # heldout.<condition> in metrics.json
LABELS = {"none": "non-personalized", "grounded": "before RL (grounded)", "rl": "after RL"}
TOKENS_FILE = "tokens.safetensors"
GROUNDED_TOKENS_FILE = (
    "tokens_grounded.safetensors"  # the tokens after grounding, before RL (eval's dppmg_sft)
)
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class Generated:
    """One condition's generations for the held-out pairs, and their scores."""

    texts: list[str]
    images: np.ndarray  # uint8 [N, H, W, 3]
    metrics: dict[str, float]
    per_pair: dict[str, list[float]]  # component -> value per pair (NaN where not finite)
    text_seconds: float
    image_seconds: float
    tokens: int
    # With stage2.generation.images_per_pair = K > 1, the pairs' other K - 1 images (each uint8 [N, H, W, 3]);
    # `images` is the first, and every per-pair score is the mean over all K. A tuple, so that a checkpoint
    # written before the field existed reads it as empty.
    more_images: tuple[np.ndarray, ...] = ()

    @property
    def samples(self) -> int:
        return 1 + len(self.more_images)


@dataclass
class Stage2State:
    """What a resumed run needs: finished evaluations, reports, RL progress and the trainable state."""

    fingerprint: str
    evals: dict[str, Generated] = field(default_factory=dict)
    grounding: dict[str, Any] | None = None
    iteration: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    tokens: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    optimizers: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


# stage2.generation keys added after finished runs existed, with their defaults (`runs.without_later_keys`): at
# the default, those runs stay finished and eval still accepts them.
LATER_GENERATION_KEYS = {"images_per_pair": 1}
# At these values a run is what it was before the key existed.
LATER_STAGE2_KEYS = {"text_code_words": 0, "image_code_words": 0}
LATER_GROUNDING_KEYS = {"image_word_rows": False}


def stage2_fingerprint(cfg: Config, content_hash: str, ckpt: TokenCheckpoint) -> str:
    s2 = to_dict(cfg.stage2)
    s2.pop("overwrite", None)
    s2.pop("stage1_run", None)  # which folder the tokens come from; their digest is what counts
    s2["generators"].pop("device", None)
    s2["generation"].pop("precision", None)  # how sampling computes, like the device: not what the run is
    s2["generation"] = without_later_keys(s2["generation"], LATER_GENERATION_KEYS)
    s2["grounding"] = without_later_keys(s2["grounding"], LATER_GROUNDING_KEYS)
    s2 = without_later_keys(s2, LATER_STAGE2_KEYS)
    digest = ckpt.digest()
    blob = json.dumps(
        {"stage2": s2, "seed": cfg.seed, "dataset": content_hash, "tokens": digest}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def link_stage1(cfg: Config) -> None:
    """With `stage2.stage1_run` set, make runs/<run_name>/stage1 a link to that run's finished stage 1, so that
    stage 2, eval and `dppmg tokens export` find the tokens where they always look."""
    other = cfg.stage2.stage1_run
    if other is None or other == cfg.run_name:
        return
    source = (cfg.run_dir.parent / other / "stage1").resolve()
    if not (source / "tokens" / "manifest.json").is_file():
        raise DppmgError(
            f"stage2.stage1_run={other}: {source} has no finished stage 1 (no tokens/manifest.json); run "
            f"`dppmg stage1 CONFIG run_name={other}` first"
        )
    link = cfg.run_dir / "stage1"
    if link.is_symlink() and link.resolve() == source:
        return
    if link.exists() or link.is_symlink():
        raise DppmgError(
            f"stage2.stage1_run={other}, but {link} already exists and is not a link to {source}: use another "
            f"run_name, or unset stage2.stage1_run to use this run's own stage 1"
        )
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(Path("..") / other / "stage1", target_is_directory=True)  # relative: runs/ may move


def tokens_folder(cfg: Config) -> Path:
    folder = cfg.run_dir / "stage1" / "tokens"
    if not (folder / "manifest.json").is_file():
        raise DppmgError(
            f"{folder} has no token checkpoint: run stage 1 for run_name={cfg.run_name} first "
            "(`make stage1`, or `dppmg stage1 CONFIG run_name=...`)"
        )
    return folder


@dataclass
class Components:
    """Everything stage 2 works with, loaded once."""

    ds: ProcessedDataset
    ckpt: TokenCheckpoint
    policy: Policy
    rewarder: Rewarder
    warmstart_seconds: float


def stage1_expectation(cfg: Config, ds: ProcessedDataset, ckpt: TokenCheckpoint) -> dict[str, Any]:
    """The stage-1 → stage-2 contract: the modalities and sizes this config's stage 1 makes, which the token
    checkpoint must have (`TokenCheckpoint.check_compatible` names every difference)."""
    st = cfg.stage1
    present = set(ds.meta.get("modalities", st.modalities))
    wanted = [m for m in st.modalities if m in present]
    return {
        "modalities": wanted,
        "levels": {m: st.vq_levels for m in wanted},
        "codebook_size": {m: st.vq_codebook_size for m in wanted},
        "dim": {m: st.dim for m in wanted},
    }


def build_judges(cfg: Config, c: Components, progress: bool = True) -> Judges:
    """The reward's encoders, the attribute judge (worlds with ground truth) and the configured image judge."""
    ds, image_judge = c.ds, None
    if cfg.stage2.generation.image_judge is not None:
        image_judge = ImageJudge.build(
            ds, cfg.stage2.generation.image_judge, image_shape(c.policy.gen.pipe), cfg.features.cache_dir,
            cfg.features.device, progress, reference=cfg.stage2.generation.image_judge_reference,
            centered=cfg.stage2.generation.image_judge_centered,
        )  # fmt: skip
    return Judges(c.rewarder, fit_judge(ds, seed=cfg.seed), image_judge)


def load_components(
    cfg: Config,
    progress: bool = True,
    dataset: Path | None = None,
    ckpt: TokenCheckpoint | None = None,
    variant: bool = False,
    trained: Path | None = None,
) -> Components:
    """Dataset, token checkpoint, warm-started generators with the tokens injected, scorer and reward.

    `dataset` is the processed dataset's folder when the caller has just prepared it (not prepared again), and
    `ckpt` the run's token checkpoint when the caller has already loaded it. The checkpoint must have the sizes
    `stage1_expectation` states, unless it is a `variant` an evaluation made from it (evaluation.methods).
    `trained` is a finished run's token-parameter file: the tokens are then spelt with the code words they were
    trained with (`injection.saved_word_pieces`), not computed again, and its parameters are loaded.
    """
    from dppmg.data.prepare import prepare
    from dppmg.text_encoder import TextEncoder

    ds = load_dataset(dataset if dataset is not None else prepare(cfg, progress=progress))
    ckpt = ckpt if ckpt is not None else TokenCheckpoint.load(tokens_folder(cfg))
    content_hash = str(ds.meta["content_hash"])
    ckpt.check_compatible(content_hash, None if variant else stage1_expectation(cfg, ds, ckpt))
    s2 = cfg.stage2
    start = time.perf_counter()
    cache = Path(cfg.features.cache_dir) / "generators"
    if not (ds.root / "scorer").is_dir():
        raise DppmgError(f"{ds.root}/scorer is missing: stage 2 scores images with the dataset's scorer")
    scorer = Scorer.load(ds.root / "scorer", s2.generators.device)
    gen = warm_start(
        ds, s2.generators, s2.warmstart, cache, cfg.seed, progress=progress, scorer=scorer,
        model_cache=Path(cfg.features.cache_dir),
    )  # fmt: skip
    warm_seconds = time.perf_counter() - start
    population = users_with_history(ds, ckpt)
    tokenizers = {"text": gen.lm_tokenizer, "image": gen.pipe.tokenizer}
    if variant:
        words = dict.fromkeys(tokenizers)
    elif trained is not None:
        words = {m: saved_word_pieces(trained, m) for m in tokenizers}
    else:
        words = {m: word_pieces(cfg, ds, ckpt, tok, m) for m, tok in tokenizers.items()}
    policy = Policy.inject(
        gen, ckpt, content_hash, s2.warmstart, seed=cfg.seed, population=population,
        text_words=words["text"], image_words=words["image"],
    )  # fmt: skip
    if trained is not None:
        load_injected(trained, policy.injected)
    encoder = TextEncoder(cfg.features.text_encoder, cfg.features.text_max_length, cfg.features.device)
    rewarder = Rewarder(ds, scorer, encoder, s2.rl.weights)
    return Components(ds, ckpt, policy, rewarder, warm_seconds)


def run_config(folder: Path, overrides: list[str] | None = None) -> Config:
    """A finished run's stage-2 config (stage2/config.yaml) with `overrides`. A key of LATER_STAGE2_KEYS that a
    run's config lacks (it was written before the key existed) reads as the value that run had, not today's
    default: a run before `stage2.text_code_words` had one token row per code."""
    path = folder / "stage2" / "config.yaml"
    saved = OmegaConf.load(path) if path.is_file() else None
    written = (saved.get("stage2") or {}) if saved is not None else None
    older = [
        f"stage2.{k}={v}" for k, v in LATER_STAGE2_KEYS.items() if written is not None and k not in written
    ]
    return load_config(path, older + list(overrides or []))


def word_pieces(
    cfg: Config, ds: ProcessedDataset, ckpt: TokenCheckpoint, tokenizer, modality: str
) -> dict[int, list[int]] | None:
    """Level-0 code of `modality` -> its code words' pieces in `tokenizer` (`stage2.text_code_words`,
    `stage2.image_code_words`), from the training users' interactions (the held-out users' are never read); None
    when off or without the modality's tokens."""
    count = getattr(cfg.stage2, f"{modality}_code_words")
    if count <= 0 or modality not in ckpt.modalities:
        return None
    train_users, _ = split_users(ds, cfg.stage2.generation.heldout_users, cfg.seed)
    codes = ckpt.codes[modality]
    named = code_words(
        training_pairs(ds, train_users),
        lambda user: codes[ckpt.user_index(user)].tolist(),
        item_words(ds.items["text"].tolist()),
    )
    pieces = level0_pieces(named, tokenizer, count)
    logger.info(
        "%s tokens: %d of %d level-0 codes spelt with their top %d code words (%d rows)",
        modality, len(pieces), ckpt.codebook_size(modality), count, sum(map(len, pieces.values())),
    )  # fmt: skip
    return pieces


# ---------------------------------------------------------------------------------------------------------
# Generation and evaluation


def generate_pairs(
    policy: Policy,
    pairs: list[Pair],
    cfg: Config,
    personalized: bool,
    progress: bool = True,
    seed: int | None = None,
    dist: Dist = SINGLE,
) -> tuple[list[str], np.ndarray, float, float, int]:
    """(texts, images, text seconds, image seconds, generated tokens) for the pairs, seeded by `seed` (cfg.seed).

    On many processes each generates its strided share of the pairs (pair k seeded by (seed, k) wherever it is
    generated, so the outputs are one process's) and every process gets all of them back; the seconds are the
    slowest process's.
    """
    seed = cfg.seed if seed is None else seed
    mine = dist.shard(len(pairs))
    texts, images, ts, is_, tokens = generate_with_tokens(
        policy, [pairs[k] for k in mine], cfg.stage2.generation, seed, personalized, personalized, progress,
        indices=mine,
    )  # fmt: skip
    if not dist.active:
        return texts, images, ts, is_, tokens
    texts = gather_rows(dist, mine, texts, len(pairs))
    images = np.stack(gather_rows(dist, mine, list(images), len(pairs)))
    parts = gather(dist, (ts, is_, tokens))
    return texts, images, max(p[0] for p in parts), max(p[1] for p in parts), sum(p[2] for p in parts)


def evaluate_condition(
    policy: Policy,
    judges: Judges,
    pairs: list[Pair],
    cfg: Config,
    personalized: bool,
    progress: bool = True,
    dist: Dist = SINGLE,
) -> Generated:
    """Generate for the pairs and score them with the evaluation package's metric list, plus the RL reward.

    With `stage2.generation.images_per_pair` K > 1, each pair gets K images (one text), and its scores are the
    means over them."""
    texts, images, ts, is_, tokens = generate_pairs(policy, pairs, cfg, personalized, progress, dist=dist)
    more, more_seconds = more_images(policy, pairs, cfg, personalized, progress, dist)
    return _scored(judges, pairs, texts, images, cfg, ts, is_ + more_seconds, tokens, more)


def more_images(
    policy: Policy, pairs: list[Pair], cfg: Config, personalized: bool, progress: bool = True,
    dist: Dist = SINGLE,
) -> tuple[tuple[np.ndarray, ...], float]:  # fmt: skip
    """The pairs' images 2..K (K = stage2.generation.images_per_pair), and the seconds they took (the slowest
    process's). Image s of pair k starts from noise seeded by (cfg.seed, s·N + k), N pairs: its own noise,
    whichever process draws it."""
    g = cfg.stage2.generation
    if g.images_per_pair <= 1:
        return (), 0.0
    n, mine = len(pairs), dist.shard(len(pairs))
    prompts = policy.image_prompts([pairs[k] for k in mine], personalized)
    start, out = time.perf_counter(), []
    for s in range(1, g.images_per_pair):
        images = generate_images(
            policy.gen.pipe, prompts, steps=g.image_steps, guidance=g.guidance, seed=cfg.seed,
            batch_size=g.batch_size, progress=progress, indices=[s * n + k for k in mine], precision=g.precision,
        )  # fmt: skip
        out.append(np.stack(gather_rows(dist, mine, list(images), n)) if dist.active else images)
    seconds = time.perf_counter() - start
    return tuple(out), max(gather(dist, seconds)) if dist.active else seconds


def _scored(
    judges: Judges, pairs: list[Pair], texts: list[str], images: np.ndarray, cfg: Config,
    ts: float = 0.0, is_: float = 0.0, tokens: int = 0, more: tuple[np.ndarray, ...] = (),
) -> Generated:  # fmt: skip
    weights = cfg.stage2.rl.weights
    runs = [judges.score(pairs, texts, x, reward_weights=weights) for x in (images, *more)]
    per_pair = {k: mean_over_samples([r[k] for r in runs]) for k in runs[0]}
    metrics = {k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for k, v in per_pair.items()}
    per_pair_lists = {k: v.tolist() for k, v in per_pair.items()}
    return Generated(texts, images, metrics, per_pair_lists, ts, is_, tokens, tuple(more))


def mean_over_samples(values: list[np.ndarray]) -> np.ndarray:
    """Per pair, the mean of a metric over a pair's images, ignoring NaN (NaN where every image's is NaN)."""
    stacked = np.stack([np.asarray(v, dtype=np.float64) for v in values])
    present = ~np.isnan(stacked)
    count = present.sum(axis=0)
    total = np.where(present, stacked, 0.0).sum(axis=0)
    return np.divide(total, count, out=np.full(count.shape, np.nan), where=count > 0)


def oracle_metrics(judges: Judges, pairs: list[Pair], side, cfg: Config) -> dict[str, float] | None:
    """The metrics of perfectly matching real items on this world (evaluation.methods.OracleMethod), or None
    without the attribute judge (datasets without ground truth).

    It calibrates the personalization metrics. It is not a strict bound: a generation can be more typical of a
    user's history than any single item (an image with the user's colour and an in-between shape, say).
    """
    if judges.attribute is None or any(p.item is None for p in pairs):
        return None
    g = OracleMethod(judges.ds, judges.attribute, side).generate(pairs, cfg.seed)
    return _scored(judges, pairs, g.texts, g.images, cfg).metrics


# ---------------------------------------------------------------------------------------------------------
# The run


def run_stage2(cfg: Config, progress: bool = True) -> Path:
    """Run (or resume) stage 2 for `cfg.run_name`; returns the stage-2 folder.

    Under torchrun or `accelerate launch`, every process works on its share of the pairs (`generate_pairs`,
    `ground`, `rl_iteration`) and rank 0 alone prepares the data, warm-starts the generators first, writes
    checkpoints and outputs, shows progress and tracks the run.
    """
    with distributed_stage(cfg, "stage2", cfg.stage2.generators.device) as dist:
        return _run_stage2(cfg, progress and dist.main, dist)


def _run_stage2(cfg: Config, progress: bool, dist: Dist) -> Path:
    from dppmg.data.prepare import prepare

    check_world(cfg, dist.world)
    with main_first(dist):  # the others find the stage-1 link rank 0 made, and the dataset up to date
        link_stage1(cfg)
        tokens_dir = tokens_folder(cfg)
        dataset = prepare(cfg, progress=progress)
    content_hash = str(load_dataset(dataset, features=False).meta["content_hash"])
    ckpt = TokenCheckpoint.load(tokens_dir)
    fingerprint = stage2_fingerprint(cfg, content_hash, ckpt)
    out = begin_stage(cfg, "stage2", fingerprint, cfg.stage2.overwrite) if dist.main else None
    if not broadcast_flag(dist, out is not None):  # rank 0 found it complete
        return cfg.run_dir / "stage2"
    if out is None:
        out = cfg.run_dir / "stage2"
        seed_everything(cfg.seed)  # as begin_stage seeded rank 0
    total_start = time.perf_counter()
    with main_first(dist):  # rank 0 warm-starts the generators (and fits the judges) into the caches
        c = load_components(cfg, progress, dataset, ckpt)
        judges = build_judges(cfg, c, progress)
    policy, rewarder, ds = c.policy, c.rewarder, c.ds
    s2 = cfg.stage2
    train_users, held_users = split_users(ds, s2.generation.heldout_users, cfg.seed)
    pairs = heldout_pairs(ds, held_users)
    pool = training_pairs(ds, train_users)

    def evaluate(personalized: bool) -> Generated:
        return evaluate_condition(policy, judges, pairs, cfg, personalized, progress, dist)

    def save() -> None:
        check_replicas(dist, policy.parameters(), "stage 2")
        if dist.main:
            _save_state(out / CHECKPOINT_FILE, state, policy, optimizers)

    logger.info(
        "stage 2 on %s: %d training users (%d interactions), %d held-out (user, target) pairs%s",
        ds.root, len(train_users), len(pool), len(pairs),
        f", split across {dist.world} processes" if dist.active else "",
    )  # fmt: skip

    # Every process reads the checkpoint before any writes it: rank 0 writes only after the first collective.
    state = _load_state(out / CHECKPOINT_FILE, fingerprint, policy)
    optimizers = make_optimizers(policy, s2.rl)
    for m, sd in state.optimizers.items():
        optimizers[m].load_state_dict(sd)
    tracker = (
        build_tracker(cfg.tracking, cfg.run_dir, to_dict(cfg), job="stage2") if dist.main else NoOpTracker()
    )
    try:
        if "none" not in state.evals:
            logger.info("generating for the held-out pairs without preference tokens (heldout.none)")
            state.evals["none"] = evaluate(personalized=False)
            save()
        if state.grounding is None:
            start = time.perf_counter()
            state.grounding = ground(
                policy, ds, pool, s2.grounding, cfg.seed, progress,
                item_text_emb=rewarder.item_text, item_image_emb=rewarder.item_image, dist=dist,
            )  # fmt: skip
            state.seconds["grounding"] = time.perf_counter() - start
            if dist.main:
                save_injected(out / GROUNDED_TOKENS_FILE, policy.injected)
            state.evals["grounded"] = evaluate(personalized=True)
            tracker.log(flatten_metrics({"grounded": state.evals["grounded"].metrics}), step=0)
            save()
        _rl(policy, rewarder, pool, cfg, state, optimizers, tracker, save, progress, dist)
        if "rl" not in state.evals:
            state.evals["rl"] = evaluate(personalized=True)
            save()
        if dist.main:
            metrics = _finish(
                out, cfg, c, state, pairs, fingerprint, judges, time.perf_counter() - total_start
            )
            tracker.summary(flatten_metrics({k: v for k, v in metrics.items() if k in ("heldout", "timing")}))
            _track_outputs(tracker, out, cfg, ds, pairs, state, fingerprint)
    finally:
        tracker.finish()
    barrier(dist)  # every process returns once rank 0 has written metrics.json
    return out


def check_world(cfg: Config, world: int) -> None:
    """Every process needs a share of every grounding batch and of every RL round's pairs."""
    g, r = cfg.stage2.grounding, cfg.stage2.rl
    sizes = {
        "stage2.grounding.batch_size": g.batch_size,
        "stage2.grounding.text_batch_size": g.text_batch_size or g.batch_size,
        "stage2.rl.pairs_per_round": r.pairs_per_round,
    }
    small = {k: v for k, v in sizes.items() if v < world}
    if small:
        raise DppmgError(
            f"stage 2 on {world} processes splits every grounding batch and every RL round's pairs across them, "
            f"but {', '.join(f'{k}={v}' for k, v in small.items())} is fewer: raise it, or use fewer processes"
        )


def _rl(
    policy, rewarder, pool, cfg: Config, state: Stage2State, optimizers, tracker, save, progress: bool,
    dist: Dist,
) -> None:  # fmt: skip
    from tqdm.auto import tqdm

    rl, gen_cfg = cfg.stage2.rl, cfg.stage2.generation
    bar = tqdm(
        total=rl.iterations, initial=state.iteration, desc="stage 2 RL", unit="iter", disable=not progress
    )
    while state.iteration < rl.iterations:
        it = state.iteration
        start = time.perf_counter()
        rounds = rl_iteration(policy, rewarder, pool, rl, gen_cfg, optimizers, cfg.seed, it, dist)
        logs: dict[str, Any] = {"iteration": it + 1, **{m: log.as_dict() for m, log in rounds.items()}}
        logs["seconds"] = time.perf_counter() - start
        state.history.append(logs)
        state.iteration += 1
        save()
        tracker.log(
            flatten_metrics({"rl": {k: v for k, v in logs.items() if k != "iteration"}}), step=state.iteration
        )
        bar.update(1)
        bar.set_postfix(
            text=f"{logs.get('text', {}).get('reward', float('nan')):.3f}",
            image=f"{logs.get('image', {}).get('reward', float('nan')):.3f}",
        )
    bar.close()


# ---------------------------------------------------------------------------------------------------------
# Checkpoint


def _save_state(
    path: Path, state: Stage2State, policy: Policy, optimizers: dict[str, torch.optim.Optimizer]
) -> None:
    state.tokens = {
        inj.modality: {k: v.detach().clone() for k, v in inj.module.state_dict().items()}
        for inj in policy.injected
    }
    state.optimizers = {m: o.state_dict() for m, o in optimizers.items()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    pause_after_checkpoint()


def _load_state(path: Path, fingerprint: str, policy: Policy) -> Stage2State:
    if path.is_file():
        try:
            state = torch.load(path, weights_only=False)
        except Exception as e:  # a truncated or foreign file: start over rather than fail
            logger.warning("ignoring %s: cannot read it (%s)", path, e)
            return Stage2State(fingerprint)
        if isinstance(state, Stage2State) and state.fingerprint == fingerprint:
            for inj in policy.injected:
                inj.module.load_state_dict(state.tokens[inj.modality])
            done = [k for k in CONDITIONS if k in state.evals]
            logger.info(
                "resuming stage 2 from %s: evaluated %s, RL iteration %d",
                path,
                done or "nothing",
                state.iteration,
            )
            return state
        logger.info("ignoring %s: it was written by a different config", path)
    return Stage2State(fingerprint)


# ---------------------------------------------------------------------------------------------------------
# Outputs


COMPARISONS = (("grounded", "none"), ("rl", "none"), ("rl", "grounded"))  # heldout_differences: a − b


def heldout_intervals(evals: dict[str, Generated], seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """95 % bootstrap intervals over the held-out pairs: of every per-pair metric's mean per condition, and of
    the paired differences between conditions ("rl_minus_none", ...), each marked significant or not."""
    ci = {
        c: {m: bootstrap_mean(v, seed=seed).as_dict() for m, v in evals[c].per_pair.items()}
        for c in CONDITIONS
    }
    diffs = {
        f"{a}_minus_{b}": {
            m: paired_difference(v, evals[b].per_pair[m], seed=seed).as_dict()
            for m, v in evals[a].per_pair.items()
            if m in evals[b].per_pair
        }
        for a, b in COMPARISONS
    }
    return ci, diffs


def _finish(
    out: Path,
    cfg: Config,
    c: Components,
    state: Stage2State,
    pairs: list[Pair],
    fingerprint: str,
    judges: Judges,
    seconds: float,
) -> dict[str, Any]:
    policy, ds = c.policy, c.ds
    save_injected(out / TOKENS_FILE, policy.injected)
    export = out / "export"
    if policy.text is not None:
        export_text_tokens(policy.text, policy.gen.lm_tokenizer, export / "text")
    if policy.image is not None:
        export_image_tokens(policy.image, export / "image")
    _write_generations(out / "generations", ds, pairs, state)
    heldout = {k: state.evals[k].metrics for k in CONDITIONS}
    oracle = oracle_metrics(judges, pairs, image_shape(policy.gen.pipe), cfg)
    rl_eval = state.evals["rl"]
    n = len(pairs)
    timing = {
        "images_per_second": n * rl_eval.samples / rl_eval.image_seconds
        if rl_eval.image_seconds
        else float("nan"),
        "tokens_per_second": rl_eval.tokens / rl_eval.text_seconds if rl_eval.text_seconds else float("nan"),
        "rl_iteration_seconds": float(np.mean([h["seconds"] for h in state.history]))
        if state.history
        else float("nan"),
        "warmstart_seconds": c.warmstart_seconds,
        "grounding_seconds": state.seconds.get("grounding", float("nan")),
        "run_seconds": seconds,
    }
    ci, diffs = heldout_intervals(state.evals, cfg.seed)
    metrics: dict[str, Any] = {
        "heldout": heldout,
        # Every heldout.* entry averages the same pairs; this is how many (and which users), and the images
        # drawn per pair (each pair's scores are the means over them).
        "heldout_pairs": n,
        "heldout_images_per_pair": rl_eval.samples,
        "heldout_precision": sampling_precision(cfg.stage2.generation.precision, policy.gen.pipe.device),
        "heldout_ci": ci,
        "heldout_differences": diffs,
        # What perfectly matching real items score on a world with ground truth (oracle_metrics), and the
        # gain over heldout.none it reaches: the yardstick for "gains" (null on real datasets).
        "heldout_oracle": oracle,
        "oracle_personalization_gain_over_none": None
        if oracle is None
        else relative_change(
            (oracle["personalization_text"] + oracle["personalization_image"]) / 2,
            (heldout["none"]["personalization_text"] + heldout["none"]["personalization_image"]) / 2,
        ),
        **{k: timing[k] for k in ("images_per_second", "tokens_per_second", "rl_iteration_seconds")},
        "timing": timing,
        "grounding": state.grounding,
        "rl_history": state.history,
        "reward_weights": dict(cfg.stage2.rl.weights),
        "attribute_judge_accuracy": None if judges.attribute is None else judges.attribute.accuracy,
        "dataset": {"name": ds.meta.get("name"), "content_hash": ds.meta["content_hash"]},
        # The stage-1 config that made the tokens (the checkpoint's manifest), and their digest.
        "stage1": {"config": c.ckpt.manifest.get("config"), "tokens_digest": c.ckpt.digest()},
        "fingerprint": fingerprint,
    }
    _write_gallery(out / "gallery.html", cfg, ds, pairs, state, heldout)
    write_json(out / "metrics.json", metrics)  # last: its fingerprint marks the run as complete
    logger.info("stage 2 done in %.0f s: %s", seconds, out)
    for k in CONDITIONS:
        logger.info(
            "  heldout.%-9s %s", k, "  ".join(f"{m}={heldout[k][m]:.4f}" for m in (*METRIC_NAMES, TOTAL_KEY))
        )
    return metrics


def _track_outputs(
    tracker: Tracker, out: Path, cfg: Config, ds: ProcessedDataset, pairs: list[Pair], state: Stage2State,
    fingerprint: str,
) -> None:  # fmt: skip
    """The gallery pairs' images per condition (before and after RL side by side), a table of every held-out
    generation, and the tuned tokens with their exports as a W&B artifact of type "tokens"."""
    shown = pairs[: cfg.stage2.generation.gallery_users]
    captions = [f"{_user_id(ds, p.user)}: {p.keywords}" for p in shown]
    for cond in CONDITIONS:
        tracker.images(
            f"generations/{cond}", state.evals[cond].images[: len(shown)], captions, step=state.iteration
        )
    scores = [m for m in (*METRIC_NAMES, TOTAL_KEY) if m in state.evals["rl"].per_pair]
    rows = [
        [_user_id(ds, p.user), p.keywords, cond, g.texts[k], g.images[k], *(g.per_pair[m][k] for m in scores)]
        for cond, g in ((c, state.evals[c]) for c in CONDITIONS)
        for k, p in enumerate(pairs)
    ]
    tracker.table("generations/table", ["user", "target", "condition", "text", "image", *scores], rows)
    entries = {name: out / name for name in (TOKENS_FILE, GROUNDED_TOKENS_FILE) if (out / name).is_file()}
    if (out / "export").is_dir():
        entries["export"] = out / "export"
    meta = {"fingerprint": fingerprint, "rl_iterations": state.iteration, "heldout_pairs": len(pairs)}
    tracker.artifact(f"{cfg.run_name}-stage2-tokens", "tokens", entries, metadata=meta)


def _user_id(ds: ProcessedDataset, user: int) -> str:
    return str(ds.users["user_id"].iat[user])


def _write_generations(folder: Path, ds: ProcessedDataset, pairs: list[Pair], state: Stage2State) -> None:
    """PNG per (condition, pair) and one JSONL row per (condition, pair) with the text and the scores."""
    rows = []
    for cond in CONDITIONS:
        g = state.evals[cond]
        (folder / cond).mkdir(parents=True, exist_ok=True)
        for k, p in enumerate(pairs):
            uid = _user_id(ds, p.user)
            # The first image is <user>.png; with images_per_pair K > 1 the others are <user>~2.png ... <user>~K.png.
            names = [f"{cond}/{_safe(uid)}{'' if s == 0 else f'~{s + 1}'}.png" for s in range(g.samples)]
            for name, images in zip(names, (g.images, *g.more_images)):
                with atomic_path(folder / name) as tmp:
                    Image.fromarray(images[k]).save(tmp, format="PNG")
            rows.append({
                "condition": cond, "user_id": uid, "user_idx": p.user, "target": p.keywords,
                "target_item_id": None if p.item is None else str(ds.items["item_id"].iat[p.item]),
                "text": g.texts[k], "image": names[0], "images": names,
                "scores": {m: v[k] for m, v in g.per_pair.items()},
            })  # fmt: skip
    write_text(folder / "generations.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def _write_gallery(
    path: Path, cfg: Config, ds: ProcessedDataset, pairs: list[Pair], state: Stage2State, heldout
) -> None:
    from dppmg.data.imageio import load_image
    from stage2_generation.gallery import GALLERY_SOURCE_PX, GalleryEntry, Shown, write_gallery

    rewarder_history = user_histories(ds)
    entries = []
    # The reward's terms, and the image judge's history and target similarities when it ran.
    judged = [m for m in ("judge_history_all", "judge_target") if m in state.evals["rl"].per_pair]
    shown = (*METRIC_NAMES, TOTAL_KEY, *judged)

    def item(i: int) -> Shown:
        p = ds.image_path(i)
        # The catalogue's own image at its own shape (a poster stays 2:3), not the generators' small copy.
        img = load_image(p, GALLERY_SOURCE_PX) if p is not None and p.is_file() else None
        text = ds.items["text"].iat[i]
        return Shown(text=text if isinstance(text, str) else None, image=img)

    for k, p in enumerate(pairs[: cfg.stage2.generation.gallery_users]):
        history = [item(int(i)) for i in rewarder_history.get(p.user, [])]
        gens = {LABELS[c]: Shown(state.evals[c].texts[k], state.evals[c].images[k]) for c in CONDITIONS}
        scores = {LABELS[c]: {m: state.evals[c].per_pair[m][k] for m in shown} for c in CONDITIONS}
        entries.append(
            GalleryEntry(
                _user_id(ds, p.user),
                history,
                p.keywords,
                None if p.item is None else item(p.item),
                gens,
                scores,
            )
        )
    summary = {LABELS[c]: {m: heldout[c][m] for m in shown} for c in CONDITIONS}
    notes = (
        f"Run {cfg.run_name}: held-out users (never used for grounding or RL), target = their test item's keywords. "
        f"Means over {len(pairs)} held-out pairs; the same pairs, seeds and noise for every condition."
    )
    write_gallery(path, entries, title=f"DPPMG stage 2 — {cfg.run_name}", summary=summary, notes=notes)


# ---------------------------------------------------------------------------------------------------------
# dppmg generate


def users_with_history(ds: ProcessedDataset, ckpt: TokenCheckpoint) -> list[int]:
    """The token rows of the users with training interactions: the population of the cold-start fallback."""
    trained = set(ds.split("train")["user_idx"].tolist())
    row_of = {uid: row for row, uid in enumerate(ckpt.user_ids)}
    rows = [row_of.get(str(uid)) for uid, u in zip(ds.users["user_id"], ds.users["user_idx"]) if u in trained]
    return sorted(r for r in rows if r is not None)


@dataclass
class Requested:
    """A user `generate` was asked for: the id, and the token row, or None and why the population stands in."""

    user_id: str
    row: int | None
    fallback: str | None = None


def resolve_users(
    users: list[str], ds: ProcessedDataset, ckpt: TokenCheckpoint, cold_start: bool = False
) -> list[Requested]:
    """Each requested id (or row index) as a token row; the population fallback where the user has no tokens of
    their own. An id the dataset does not know is an error naming the nearest ids, unless `cold_start`."""
    trained = set(users_with_history(ds, ckpt))
    in_dataset = set(ds.users["user_id"].astype(str))
    out, unknown = [], []
    for user in users:
        row = ckpt.find_user(user)
        if row is not None:
            uid = ckpt.user_ids[row]
            out.append(
                Requested(uid, row) if row in trained else Requested(uid, None, "has no training history")
            )
        elif user in in_dataset:
            out.append(Requested(user, None, "has no stage-1 tokens"))
        elif cold_start:
            out.append(Requested(user, None, "is not in the dataset"))
        else:
            unknown.append(user)
    if unknown:
        ids = ds.users["user_id"].astype(str).tolist()
        named = "; ".join(f"unknown user {u!r}: {nearest_ids_hint(u, ids)}" for u in unknown)
        raise DppmgError(
            f"{named}. The run's dataset ({ds.root}) has {len(ids)} users; check the id, or pass --cold-start to "
            "generate for a new user with the population fallback (the most common token at each level)"
        )
    return out


def resolve_run(run: str, runs_dir: str = "runs") -> Path:
    """A run folder from a path or a run name; it must hold a finished stage 2."""
    candidates = [Path(run), Path(runs_dir) / run]
    for folder in candidates:
        if (folder / "stage2" / "metrics.json").is_file():
            return folder
    raise DppmgError(
        f"no finished stage 2 for {run!r}: looked for stage2/metrics.json in "
        + " and ".join(str(c) for c in candidates)
        + "; run `make stage2` (or `dppmg stage2 CONFIG run_name=...`) first"
    )


def generate(
    run: str,
    users: list[str],
    targets: list[str],
    out: Path | None = None,
    personalized: bool = True,
    overrides: list[str] | None = None,
    progress: bool = True,
    cold_start: bool = False,
) -> list[dict[str, Any]]:
    """Generate a text and an image for every (user, target) with a finished run's tokens.

    A user without tokens of their own (no training history, or, with `cold_start`, an id the dataset does not
    know) gets the population's tokens (`TokenCheckpoint.population_codes`), with a warning and `"fallback"` in
    their rows. Writes <out>/<user>__<target>.png and appends a row per generation to <out>/generations.jsonl;
    returns the rows. `out` defaults to runs/<run>/stage2/generate/.
    """
    for t in targets:
        if not t.strip():
            raise DppmgError("--target must be non-empty keywords, e.g. --target 'lamp'")
    folder = resolve_run(run)
    cfg = run_config(folder, overrides)
    from dppmg.data.prepare import prepare

    # The contract, then the users: a mistyped id fails in a second, not after the generators' warm start.
    ds, ckpt = load_dataset(prepare(cfg, progress=progress)), TokenCheckpoint.load(tokens_folder(cfg))
    ckpt.check_compatible(str(ds.meta["content_hash"]), stage1_expectation(cfg, ds, ckpt))
    requested = resolve_users(users, ds, ckpt, cold_start)
    c = load_components(cfg, progress, dataset=ds.root, ckpt=ckpt, trained=folder / "stage2" / TOKENS_FILE)
    for r in requested:
        if r.fallback is not None and personalized:
            tokens = " ".join(c.ckpt.population_prompt(m, c.policy.population) for m in c.ckpt.modalities)
            logger.warning(
                "user %r %s: generating with the population fallback, the most common token at each level "
                "(%s)", r.user_id, r.fallback, tokens,
            )  # fmt: skip
    pairs = [(r, Pair(r.row, t)) for r in requested for t in targets]
    texts, images, *_ = generate_pairs(c.policy, [p for _, p in pairs], cfg, personalized)
    out = Path(out) if out is not None else folder / "stage2" / "generate"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for (r, p), text, img in zip(pairs, texts, images):
        name = f"{_safe(r.user_id)}__{_safe(p.keywords)}.png"
        with atomic_path(out / name) as tmp:
            Image.fromarray(img).save(tmp, format="PNG")
        rows.append(
            {
                "user_id": r.user_id,
                "target": p.keywords,
                "personalized": personalized,
                "fallback": r.fallback if personalized else None,
                "text": text,
                "image": str(out / name),
            }
        )
    with open(out / "generations.jsonl", "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return rows
