"""Paired differences between any two methods of a finished `dppmg eval`, from its cached per-pair scores.

    .venv/bin/python benchmarks/paired_eval.py CONFIG METHOD_A METHOD_B [key=value ...]

results.md takes every difference against `dppmg`; this prints A − B for two other methods, with eval's own
statistics: each pair's score averaged over the seeds of `eval.seeds`, then a paired 95 % bootstrap interval over
the pairs (`run.pool_seeds`, `dppmg.bootstrap.paired_difference`, `eval.bootstrap_samples`). Pass the config and overrides eval ran
with (the cache belongs to them); a method eval has not run with them is refused, nothing is generated.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from dppmg.bootstrap import paired_difference
from dppmg.config import load_config
from dppmg.errors import DppmgError
from stage2_generation.evaluation import run as run_mod


@dataclass
class Cached:
    """A method known by name only: `_cached` finds its generations, and generating is refused."""

    name: str

    def generate(self, pairs, seed, progress=True):
        raise DppmgError(
            f"{self.name} has no cached generations for this config and seed {seed}: run dppmg eval with it"
        )


def per_pair(ev: run_mod.Evaluation, name: str) -> dict[str, np.ndarray]:
    """metric -> float [pairs]: the method's per-pair scores averaged over the seeds."""
    per_seed = [run_mod._cached(ev, Cached(name), seed, progress=False)[1] for seed in ev.cfg.eval.seeds]
    return {m: run_mod.pool_seeds(np.stack([s[m] for s in per_seed])) for m in per_seed[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("overrides", nargs="*")
    ns = ap.parse_args()
    cfg = load_config(ns.config, ns.overrides)
    ev = run_mod._open(cfg, progress=False)
    a, b = per_pair(ev, ns.a), per_pair(ev, ns.b)
    print(
        f"{ns.a} − {ns.b}, {len(ev.pairs)} pairs, seeds {list(cfg.eval.seeds)} (mean [95 % interval]; † contains 0)"
    )
    for metric in (m for m in a if m in b):
        d = paired_difference(
            a[metric], b[metric], n_boot=cfg.eval.bootstrap_samples, seed=cfg.seed
        ).as_dict()
        mark = " †" if d["low"] <= 0 <= d["high"] else ""
        print(f"  {metric:24s} {d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]{mark}")


if __name__ == "__main__":
    main()
