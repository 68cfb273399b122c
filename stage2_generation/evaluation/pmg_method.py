"""PMG (pmg.py) behind the evaluation's method interface, and its personalization-fidelity trade-off over alpha."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dppmg.log import logger
from stage2_generation.evaluation.methods import Generation
from stage2_generation.evaluation.metrics import Judges
from stage2_generation.pmg import PMGMethod, build_pmg_method, select_candidates
from stage2_generation.policy import Pair

# Metrics of every candidate kept for the trade-off curve (the scorer's; the candidate's text is the pair's).
CANDIDATE_METRICS = ("personalization", "personalization_image", "fidelity", "consistency")


@dataclass
class PMGEval:
    """PMG as an evaluation method; its info also holds every candidate's metrics, so alpha can be re-chosen."""

    method: PMGMethod
    judges: Judges
    name: str = "pmg"

    def generate(self, pairs: Sequence[Pair], seed: int, progress: bool = True) -> Generation:
        start = time.perf_counter()
        texts, images, info = self.method.generate(pairs, seed, progress)
        candidates = info.pop("candidates")  # uint8 [P, N, H, W, 3]
        scores = info.pop("scores")
        per_candidate = [
            self.judges.score(pairs, texts, candidates[:, n]) for n in range(candidates.shape[1])
        ]
        info["candidate_metrics"] = {
            m: np.stack([c[m] for c in per_candidate], axis=1).tolist() for m in CANDIDATE_METRICS
        }  # metric -> [P][N]
        info["candidate_personalization"] = scores.personalization.tolist()
        info["candidate_fidelity"] = scores.fidelity.tolist()
        return Generation(texts, images, time.perf_counter() - start, info)


def build_pmg(ev: Any, progress: bool = True) -> PMGEval:
    """PMG for this evaluation: its LLM (or the stand-in), keywords, and soft embeddings trained on training users
    (cached in eval/variants/pmg-<key>/, so a rerun does not train them again)."""
    from safetensors.torch import load_file, save_file

    from dppmg.config import to_dict
    from dppmg.io import atomic_path, read_json, write_json
    from stage2_generation.evaluation.run import cache_key

    cfg, c = ev.cfg, ev.components
    folder = ev.out / "variants" / f"pmg-{cache_key(ev.key, to_dict(cfg.eval.pmg))}"
    cached = folder / "soft.safetensors"
    state = load_file(str(cached)) if cached.is_file() and not cfg.eval.overwrite else None
    start = time.perf_counter()
    method, result = build_pmg_method(
        c.policy.gen, c.policy.prompts, c.rewarder, sorted({p.user for p in ev.pool}), cfg.eval.pmg,
        cfg.stage2.generation, cfg.features.cache_dir, cfg.seed, progress, soft_state=state,
    )  # fmt: skip
    if result is not None:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(cached) as tmp:
            save_file({k: v.detach().contiguous() for k, v in method.soft.state_dict().items()}, str(tmp))
        write_json(folder / "training.json", dataclasses.asdict(result))
        ev.seconds["train_pmg"] = time.perf_counter() - start
    trained = read_json(folder / "training.json")
    ev.notes["pmg"] = (
        f"keywords and soft embeddings from {method.extractor_name}; soft embeddings trained for "
        f"{trained['steps']} steps on {trained['rows']} training users' items (diffusion loss "
        f"{trained['loss_first']:.4f} → {trained['loss_last']:.4f}); best of {cfg.eval.pmg.candidates} "
        f"candidates at alpha {cfg.eval.pmg.alpha}"
    )
    logger.info("eval pmg: %s", ev.notes["pmg"])
    return PMGEval(method, ev.judges)


def pmg_tradeoff(generation: Generation, alphas: Sequence[float]) -> list[dict[str, float]]:
    """The scorer's means over the pairs when PMG keeps, at each alpha, the candidate with the highest z."""
    import torch

    info = generation.info
    personalization = torch.tensor(info["candidate_personalization"], dtype=torch.float32)
    fidelity = torch.tensor(info["candidate_fidelity"], dtype=torch.float32)
    metrics = {m: np.asarray(v, dtype=np.float64) for m, v in info["candidate_metrics"].items()}
    rows = np.arange(personalization.shape[0])
    points = []
    for alpha in alphas:
        chosen = select_candidates(personalization, fidelity, alpha).numpy()
        points.append(
            {"alpha": float(alpha), **{m: float(np.nanmean(v[rows, chosen])) for m, v in metrics.items()}}
        )
    return points


def keyword_samples(ev: Any, generation: Generation, count: int = 8) -> list[dict[str, Any]]:
    """The first held-out users' PMG keywords, for results.md."""
    ds = ev.components.ds
    words = generation.info.get("keywords", [])
    return [
        {"user_id": str(ds.users["user_id"].iat[p.user]), "target": p.keywords, "keywords": list(w)}
        for p, w in list(zip(ev.pairs, words))[:count]
    ]
