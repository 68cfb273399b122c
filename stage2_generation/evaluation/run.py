"""`dppmg eval` / `make eval`: every method of `eval.methods` on stage 2's held-out pairs, with every seed of
`eval.seeds`, scored by the metric list of metrics.py, written to runs/<run>/eval/.

    eval/cache/<method>/seed<k>-<key>.npz    generations and per-pair scores (a rerun reuses them; an
                                             interrupted eval continues from the last finished (method, seed));
                                             diversity-seed<k>-*.npz: the diversity groups, at the first seed
    eval/variants/<name>/tokens.safetensors  token parameters of the variants eval trains itself
    eval/results.json, eval/results.md       one row per method; paired differences against dppmg
    eval/plots/*.png, eval/index.html        bars with intervals, the trade-off curves, the generations side by side

Statistics: each pair's value is averaged over the seeds, then the mean over pairs gets a 95 % percentile
bootstrap interval, and each method's difference to `dppmg` is bootstrapped pair by pair (dppmg/bootstrap.py);
a difference whose interval contains 0 is marked not significant. The per-seed means are reported beside them.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dppmg.bootstrap import bootstrap_mean, paired_difference
from dppmg.config import Config, to_dict, to_yaml
from dppmg.data.format import load_dataset
from dppmg.device import sampling_precision
from dppmg.errors import DppmgError
from dppmg.io import atomic_path, pause_after_checkpoint, write_json, write_text
from dppmg.log import logger
from dppmg.runs import stage_lock
from dppmg.seeding import seed_everything
from dppmg.tokens import TokenCheckpoint
from dppmg.tracking import Tracker, build_tracker
from stage2_generation.evaluate import heldout_pairs, split_users
from stage2_generation.evaluation.downstream import downstream_pairs, downstream_recall
from stage2_generation.evaluation.methods import (
    COMPOSED,
    TOKEN_METHODS,
    BestOfNMethod,
    ComposedMethod,
    Generation,
    Method,
    OracleMethod,
    TokenMethod,
    continuous_checkpoint,
    variant_weights,
)
from stage2_generation.evaluation.metrics import DIVERSITY_METRICS, Judges, diversity
from stage2_generation.generators import image_shape
from stage2_generation.grounding import ground, training_pairs
from stage2_generation.injection import load_injected, save_injected
from stage2_generation.pipeline import GROUNDED_TOKENS_FILE, TOKENS_FILE
from stage2_generation.policy import Pair
from stage2_generation.rl import make_optimizers, rl_iteration

REFERENCE = "dppmg"  # the method every difference is taken against
DIVERSITY_TARGETS = 4  # the most common target keywords among the held-out pairs...
DIVERSITY_USERS = 8  # ...each generated for this many held-out users


@dataclass
class Evaluation:
    """What the methods share: the stage-2 components, the held-out pairs and the judges."""

    cfg: Config
    out: Path
    stage2: Path
    components: Any  # pipeline.Components
    pairs: list[Pair]
    pool: list[Pair]
    judges: Judges
    key: str  # the stage-2 run's fingerprint: cached generations belong to it
    seconds: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


def run_eval(cfg: Config, progress: bool = True) -> Path:
    """Evaluate every configured method for `cfg.run_name`; returns runs/<run>/eval/."""
    start = time.perf_counter()
    with stage_lock(cfg, "eval"):
        ev = _open(cfg, progress)
        tracker = build_tracker(cfg.tracking, cfg.run_dir, to_dict(cfg), job="eval")
        try:
            return _evaluate(ev, tracker, start, progress)
        finally:
            tracker.finish()


def _evaluate(ev: Evaluation, tracker: Tracker, start: float, progress: bool) -> Path:
    cfg = ev.cfg
    methods = [m for m in cfg.eval.methods if _available(ev, m)]
    built: dict[str, Method] = {}
    results: dict[str, dict[str, np.ndarray]] = {}  # method -> metric -> [seeds, pairs]
    gens: dict[str, Generation] = {}  # method -> the first seed's generations (the page shows them)
    first_scores: dict[str, dict[str, np.ndarray]] = {}  # ... and their per-pair scores
    div: dict[str, dict[str, np.ndarray]] = {}
    for name in methods:
        method_start = time.perf_counter()
        method = built[name] = build_method(ev, name, progress)
        per_seed = []
        for k, seed in enumerate(cfg.eval.seeds):
            g, scores = _cached(ev, method, seed, progress)
            per_seed.append(scores)
            if k == 0:
                gens[name] = g
                first_scores[name] = scores
        results[name] = {m: np.stack([s[m] for s in per_seed]) for m in per_seed[0]}
        # Diversity at the first seed: 4 targets x 8 users (across users, not seeds, is what it measures).
        div[name] = _cached(ev, method, cfg.eval.seeds[0], progress, kind="diversity")[1]
        ev.seconds[f"method_{name}"] = time.perf_counter() - method_start
        logger.info("eval %s: %s", name, _line(results[name]))
    tradeoff = tradeoff_points(ev, gens, progress)
    downstream = downstream_use(ev, built, progress)
    from stage2_generation.evaluation.report import write_outputs

    ev.seconds["total"] = time.perf_counter() - start
    summary = summarise(ev, results, div)
    if downstream:
        summary["downstream"] = downstream
    if "pmg" in gens:
        from stage2_generation.evaluation.pmg_method import keyword_samples

        first = gens["pmg"]
        summary["pmg"] = {"extractor": first.info.get("extractor"), "samples": keyword_samples(ev, first)}
    write_outputs(ev, summary, gens, first_scores, tradeoff)
    track_results(tracker, ev, summary, gens)
    logger.info("eval done in %.0f s: %s", ev.seconds["total"], ev.out)
    return ev.out


def track_results(
    tracker: Tracker, ev: Evaluation, summary: dict[str, Any], gens: dict[str, Generation]
) -> None:
    """To W&B: the results table (one row per method, a column per metric's mean; the intervals are in
    results.json), the same means as the run's summary, the plots of eval/plots/, and the first seed's
    generations for the page's sample users, one row per (method, pair)."""
    from PIL import Image

    metrics = list(dict.fromkeys(m for row in summary["methods"].values() for m in row))
    means = {
        name: {m: row[m]["mean"] if m in row else None for m in metrics}
        for name, row in summary["methods"].items()
    }
    tracker.table("results", ["method", *metrics], [[name, *row.values()] for name, row in means.items()])
    tracker.summary({"methods": means})
    for png in sorted((ev.out / "plots").glob("*.png")):
        with Image.open(png) as im:
            tracker.images(f"plots/{png.stem}", np.asarray(im.convert("RGB"))[None], [png.name])
    ds = ev.components.ds
    shown = ev.pairs[: ev.cfg.eval.sample_users]
    rows = [
        [name, str(ds.users["user_id"].iat[p.user]), p.keywords, g.texts[k], g.images[k]]
        for name, g in gens.items()
        for k, p in enumerate(shown)
    ]
    tracker.table("samples", ["method", "user", "target", "text", "image"], rows)


def downstream_use(ev: Evaluation, built: dict[str, Method], progress: bool) -> dict[str, Any]:
    """Recall@20 with and without each method's generations as ranking features (downstream.py); {} when off."""
    names = [m for m in ev.cfg.eval.downstream_methods if m in built]
    if not names or not ev.cfg.eval.downstream_weights:
        return {}
    start = time.perf_counter()
    seed = ev.cfg.eval.seeds[0]
    gens = {m: _cached(ev, built[m], seed, progress, kind="downstream")[0] for m in names}
    out = downstream_recall(ev, gens, progress)
    ev.seconds["downstream"] = time.perf_counter() - start
    return out


def _open(cfg: Config, progress: bool) -> Evaluation:
    from dppmg.data.prepare import prepare
    from stage2_generation.pipeline import build_judges, load_components, stage2_fingerprint, tokens_folder

    stage2 = cfg.run_dir / "stage2"
    metrics_path = stage2 / "metrics.json"
    if not metrics_path.is_file():
        raise DppmgError(
            f"{stage2} has no finished stage 2 (metrics.json): run `make stage2` (or `dppmg stage2 CONFIG "
            f"run_name={cfg.run_name}`) before eval"
        )
    dataset = prepare(cfg, progress=progress)
    content_hash = str(load_dataset(dataset, features=False).meta["content_hash"])
    ckpt = TokenCheckpoint.load(tokens_folder(cfg))
    expected = stage2_fingerprint(cfg, content_hash, ckpt)
    made = json.loads(metrics_path.read_text()).get("fingerprint")
    if made != expected:
        raise DppmgError(
            f"{stage2} was made by another configuration than this one (stage-2 fingerprint {made} here, "
            f"{expected} for this config): pass eval the CONFIG and overrides stage 2 ran with, or rerun stage 2"
        )
    out = cfg.run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", to_yaml(cfg))
    seed_everything(cfg.seed)
    c = load_components(cfg, progress, dataset, ckpt, trained=stage2 / TOKENS_FILE)
    ds = c.ds
    s2 = cfg.stage2
    train_users, held_users = split_users(ds, s2.generation.heldout_users, cfg.seed)
    pairs = heldout_pairs(ds, held_users)
    if cfg.eval.max_pairs:
        pairs = pairs[: cfg.eval.max_pairs]
    judges = build_judges(cfg, c, progress)
    return Evaluation(cfg, out, stage2, c, pairs, training_pairs(ds, train_users), judges, expected)


def _available(ev: Evaluation, name: str) -> bool:
    if name == "oracle" and ev.judges.attribute is None:
        ev.notes[name] = "left out: the oracle needs a world with ground-truth tastes (the synthetic one)"
        logger.info("eval: %s", ev.notes[name])
        return False
    return True


# ---------------------------------------------------------------------------------------------------------
# Methods


def build_method(ev: Evaluation, name: str, progress: bool = True) -> Method:
    """The named method, training its token parameters first when it is a variant eval trains itself."""
    c, g = ev.components, ev.cfg.stage2.generation
    if name == "oracle":
        return OracleMethod(c.ds, ev.judges.attribute, image_shape(c.policy.gen.pipe))
    if name == "pmg":
        from stage2_generation.evaluation.pmg_method import build_pmg

        return build_pmg(ev, progress)  # type: ignore[return-value]
    if name == "dppmg_best_of_n":
        pmg = ev.cfg.eval.pmg
        tokens = TokenMethod(REFERENCE, c.policy, g, ev.stage2 / TOKENS_FILE, True, True)  # dppmg itself
        return BestOfNMethod(name, tokens, c.rewarder, pmg.candidates, pmg.alpha)
    if name in COMPOSED:
        texts_from, images_from = COMPOSED[name]
        return ComposedMethod(name, build_method(ev, texts_from), build_method(ev, images_from))
    text, image = TOKEN_METHODS[name]
    if name == "none":
        return TokenMethod(name, c.policy, g, None, text, image)
    if name == "dppmg_continuous":
        policy, file = _continuous(ev, progress)
        return TokenMethod(name, policy, g, file, text, image)
    files = {
        "dppmg": ev.stage2 / TOKENS_FILE,
        "text_tokens_only": ev.stage2 / TOKENS_FILE,
        "image_tokens_only": ev.stage2 / TOKENS_FILE,
        "dppmg_sft": _grounded(ev),
    }
    if name == "dppmg_no_consistency":
        files[name] = rl_variant(
            ev, "no_consistency", variant_weights(ev.cfg, drop=["consistency"]), progress
        )
    return TokenMethod(name, c.policy, g, files[name], text, image)


def _grounded(ev: Evaluation) -> Path:
    path = ev.stage2 / GROUNDED_TOKENS_FILE
    if not path.is_file():
        raise DppmgError(
            f"{path} is missing: this stage-2 run predates it (the grounded tokens before RL); rerun stage 2 with "
            "stage2.overwrite=true"
        )
    return path


def rl_variant(ev: Evaluation, name: str, weights: dict[str, float], progress: bool = True) -> Path:
    """RL from the grounded tokens with other reward weights, as stage 2 runs it; cached under eval/variants/."""
    cfg = ev.cfg
    path = ev.out / "variants" / f"{name}-{cache_key(ev.key, weights)}" / TOKENS_FILE
    if path.is_file() and not cfg.eval.overwrite:
        return path
    from tqdm.auto import tqdm

    c = ev.components
    load_injected(_grounded(ev), c.policy.injected)
    rewarder = c.rewarder
    saved = rewarder.weights
    rewarder.weights = weights
    start = time.perf_counter()
    try:
        optimizers = make_optimizers(c.policy, cfg.stage2.rl)
        for it in tqdm(range(cfg.stage2.rl.iterations), desc=f"eval RL {name}", disable=not progress):
            rl_iteration(
                c.policy, rewarder, ev.pool, cfg.stage2.rl, cfg.stage2.generation, optimizers, cfg.seed, it
            )
    finally:
        rewarder.weights = saved
    ev.seconds[f"train_{name}"] = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    save_injected(path, c.policy.injected)
    write_json(path.parent / "weights.json", weights)
    return path


def _continuous(ev: Evaluation, progress: bool) -> tuple[Any, Path]:
    """(policy, tokens file) of the no-VQ ablation: fresh generators with the continuous checkpoint injected,
    grounded and RL-trained with stage 2's settings."""
    from stage2_generation.pipeline import load_components

    cfg, c = ev.cfg, ev.components
    ckpt = continuous_checkpoint(c.ckpt)
    cont = load_components(cfg, progress, c.ds.root, ckpt, variant=True)
    path = ev.out / "variants" / f"continuous-{cache_key(ev.key)}" / TOKENS_FILE
    if path.is_file() and not cfg.eval.overwrite:
        return cont.policy, path
    start = time.perf_counter()
    s2 = cfg.stage2
    ground(
        cont.policy, c.ds, ev.pool, s2.grounding, cfg.seed, progress,
        item_text_emb=c.rewarder.item_text, item_image_emb=c.rewarder.item_image,
    )  # fmt: skip
    optimizers = make_optimizers(cont.policy, s2.rl)
    for it in range(s2.rl.iterations):
        rl_iteration(cont.policy, cont.rewarder, ev.pool, s2.rl, s2.generation, optimizers, cfg.seed, it)
    ev.seconds["train_continuous"] = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    save_injected(path, cont.policy.injected)
    return cont.policy, path


# ---------------------------------------------------------------------------------------------------------
# Generation, cached


def diversity_groups(pairs: Sequence[Pair]) -> list[list[Pair]]:
    """Pairs that share a target with different users: the most common held-out targets, a few users each."""
    counts: dict[tuple[str, int | None], int] = {}
    for p in pairs:
        counts[(p.keywords, p.item)] = counts.get((p.keywords, p.item), 0) + 1
    targets = sorted(counts, key=lambda t: -counts[t])[:DIVERSITY_TARGETS]
    users = [p.user for p in pairs[:DIVERSITY_USERS]]
    return [[Pair(u, kw, item) for u in users] for kw, item in targets]


def _cached(
    ev: Evaluation, method: Method, seed: int, progress: bool, kind: str = "pairs"
) -> tuple[Generation, dict[str, np.ndarray]]:
    """(generations, scores) of one method and seed, from the cache when it has them.

    kind "pairs": the held-out pairs, scored per pair by the metric list; "diversity": the diversity groups,
    scored per group; "downstream": one target-free generation per held-out user (downstream.py), unscored.
    A composed ablation is composed from its sources' cached generations of the same kind.
    """
    groups = diversity_groups(ev.pairs) if kind == "diversity" else []
    if kind == "pairs":
        pairs, prefix, extra = ev.pairs, "", ()
    elif kind == "diversity":
        pairs, prefix, extra = [p for g in groups for p in g], "diversity-", (kind,)
    else:
        pairs, prefix, extra = downstream_pairs(ev.pairs), "downstream-", (kind,)
    if ev.cfg.eval.max_pairs:  # a subset of the pairs: other generations (all pairs keep the old key)
        extra = (*extra, ("max_pairs", ev.cfg.eval.max_pairs))
    key = cache_key(ev.key, method.name, seed, generation_key(ev), _method_config(ev, method.name), *extra)
    path = ev.out / "cache" / method.name / f"{prefix}seed{seed}-{key}.npz"
    if path.is_file() and not ev.cfg.eval.overwrite:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            g = Generation(meta["texts"], z["images"], meta["seconds"], meta["info"])
            scores = {k[len("score.") :]: z[k] for k in z.files if k.startswith("score.")}
        return g, scores
    if isinstance(method, ComposedMethod):
        g = method.compose(
            _cached(ev, method.texts_from, seed, progress, kind)[0],
            _cached(ev, method.images_from, seed, progress, kind)[0],
        )
    elif isinstance(method, BestOfNMethod):  # dppmg's texts, as cached, with its own images
        texts = _cached(ev, method.tokens, seed, progress, kind)[0]
        g = method.with_texts(texts, pairs, seed, progress and kind == "pairs")
    else:
        g = method.generate(pairs, seed, progress and kind == "pairs")
    start = time.perf_counter()
    scores: dict[str, np.ndarray] = {}
    if kind == "pairs":
        scores = ev.judges.score(pairs, g.texts, g.images)
    elif kind == "diversity":
        sizes = np.cumsum([0] + [len(x) for x in groups])
        bounds = [range(a, b) for a, b in zip(sizes[:-1], sizes[1:])]
        scores = diversity(ev.judges.rewarder, bounds, g.texts, g.images)
    meta = {
        "texts": g.texts,
        "seconds": g.seconds,
        "score_seconds": time.perf_counter() - start,
        "info": _jsonable(g.info),
    }
    arrays = {"images": g.images, **{f"score.{k}": v for k, v in scores.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, meta=np.asarray(json.dumps(meta)), **arrays)
    pause_after_checkpoint()  # every cached (method, seed) is a point an interrupted eval continues from
    return g, scores


def _method_config(ev: Evaluation, name: str) -> Any:
    if name == "pmg":
        return to_dict(ev.cfg.eval.pmg)
    if name == "dppmg_best_of_n":
        return {"candidates": ev.cfg.eval.pmg.candidates, "alpha": ev.cfg.eval.pmg.alpha}
    if name in ("dppmg_no_consistency", "dppmg_continuous") or name.startswith("dppmg_fidelity"):
        return to_dict(ev.cfg.stage2.rl)
    return None


def _jsonable(info: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in info.items():
        if isinstance(v, np.ndarray):
            v = v.tolist()
        try:
            json.dumps(v)
        except TypeError:
            continue  # tensors, images: kept in memory for this run's page, not in the cache
        out[k] = v
    return out


def _precision(ev: Evaluation) -> str:
    return sampling_precision(ev.cfg.stage2.generation.precision, ev.components.policy.gen.pipe.device)


def generation_key(ev: Evaluation) -> dict[str, Any]:
    """stage2.generation as the cache keys see it: the precision that sampling resolves to on this machine, left
    out when fp32 (the generations cached before the key existed were fp32)."""
    g = to_dict(ev.cfg.stage2.generation)
    del g["precision"]
    if (precision := _precision(ev)) != "fp32":
        g["precision"] = precision
    return g


def cache_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _line(scores: dict[str, np.ndarray]) -> str:
    return "  ".join(f"{m}={np.nanmean(v):.4f}" for m, v in scores.items() if np.isfinite(v).any())


# ---------------------------------------------------------------------------------------------------------
# Trade-off and statistics


def tradeoff_points(
    ev: Evaluation, gens: dict[str, Generation], progress: bool
) -> dict[str, list[dict[str, float]]]:
    """Personalization against fidelity: PMG at each alpha (re-selected among the same candidates) and DPPMG
    after RL at each fidelity weight (the first seed; the dppmg point itself is stage 2's weights)."""
    cfg = ev.cfg
    out: dict[str, list[dict[str, float]]] = {}
    seed = cfg.eval.seeds[0]
    if "pmg" in gens and cfg.eval.tradeoff_alphas:
        from stage2_generation.evaluation.pmg_method import pmg_tradeoff

        out["pmg"] = pmg_tradeoff(gens["pmg"], cfg.eval.tradeoff_alphas)
    if "dppmg" in cfg.eval.methods and cfg.eval.tradeoff_fidelity_weights:
        c, g = ev.components, cfg.stage2.generation
        points = []
        base = dict(cfg.stage2.rl.weights)
        for w in sorted({*cfg.eval.tradeoff_fidelity_weights, base.get("fidelity", 0.0)}):
            if w == base.get("fidelity", 0.0):
                file = ev.stage2 / TOKENS_FILE
            else:
                file = rl_variant(ev, f"fidelity{w:g}", variant_weights(cfg, set_={"fidelity": w}), progress)
            method = TokenMethod(f"dppmg_fidelity{w:g}", c.policy, g, file, True, True)
            _, s = _cached(ev, method, seed, progress=False)
            points.append({"fidelity_weight": w, **{m: float(np.nanmean(v)) for m, v in s.items()}})
        out["dppmg"] = points
    return out


def pool_seeds(values: np.ndarray) -> np.ndarray:
    """float [pairs]: each pair's score [seeds, pairs] averaged over the seeds (a metric never finite stays NaN)."""
    with np.errstate(all="ignore"):
        return np.nanmean(values, axis=0) if np.isfinite(values).any() else values[0]


def summarise(
    ev: Evaluation, results: dict[str, dict[str, np.ndarray]], div: dict[str, dict[str, np.ndarray]]
) -> dict[str, Any]:
    """results.json's body: per method and metric the mean, its interval and the per-seed means; differences."""
    n_boot, seed = ev.cfg.eval.bootstrap_samples, ev.cfg.seed
    methods: dict[str, Any] = {}
    per_pair: dict[str, dict[str, np.ndarray]] = {}
    for name, scores in results.items():
        per_pair[name] = {}
        row = {}
        for metric, values in scores.items():  # [seeds, pairs]
            pooled = pool_seeds(values)
            per_pair[name][metric] = pooled
            i = bootstrap_mean(pooled, n_boot=n_boot, seed=seed).as_dict()
            i["seed_means"] = [float(np.nanmean(v)) if np.isfinite(v).any() else None for v in values]
            row[metric] = i
        for metric, values in div[name].items():
            row[metric] = bootstrap_mean(values, n_boot=n_boot, seed=seed).as_dict()
        methods[name] = row
    differences: dict[str, Any] = {}
    if REFERENCE in per_pair:
        ref = per_pair[REFERENCE]
        for name, scores in per_pair.items():
            if name == REFERENCE:
                continue
            differences[f"{REFERENCE}_minus_{name}"] = {
                m: paired_difference(ref[m], v, n_boot=n_boot, seed=seed).as_dict()
                for m, v in scores.items()
                if m in ref
            }
    return {
        "run": ev.cfg.run_name,
        "dataset": ev.components.ds.meta.get("name"),
        "stage2_fingerprint": ev.key,
        "pairs": len(ev.pairs),
        "seeds": list(ev.cfg.eval.seeds),
        "precision": _precision(ev),
        "metrics": ev.judges.names() + list(DIVERSITY_METRICS),
        "methods": methods,
        "differences": differences,
        "notes": ev.notes,
        "seconds": ev.seconds,
    }
