"""Time the synthetic world's generator (histories + texts + all images) and the split at a few scales.

The issue's target: a 1M-interaction world generates in under 60 s on a 2-core machine; the last column is
the generation time as a share of that budget.

    python benchmarks/bench_data.py                       # ~100k and ~1M interactions
    python benchmarks/bench_data.py --sizes 1000000 --workers 1

Each size runs in a fresh process, so that its peak resident memory is its own.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace

from dppmg.config import DataConfig, SyntheticConfig
from dppmg.data.processing import process
from dppmg.data.synthetic import generate_world


@dataclass
class Result:
    interactions: int
    users: int
    items: int
    seconds: float
    process_seconds: float
    peak_rss_mb: float


def world_config(
    interactions: int, per_user: float, items_per_interaction: float, image_size: int
) -> SyntheticConfig:
    """A world of about `interactions` interactions: users = interactions / per_user."""
    return replace(
        SyntheticConfig(),
        n_users=max(1, round(interactions / per_user)),
        n_items=max(100, round(interactions * items_per_interaction)),
        interactions_per_user=per_user,
        image_size=image_size,
    )


def measure(cfg: SyntheticConfig, seed: int, workers: int | None) -> Result:
    """Generate one world and report its size, wall time and this process's peak RSS."""
    start = time.perf_counter()
    world = generate_world(cfg, seed, workers=workers)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    process(world, DataConfig(), seed, progress=False)  # index + leave-last-out split, as `data prepare` does
    process_seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return Result(len(world.interactions), cfg.n_users, cfg.n_items, seconds, process_seconds, peak_kb / 1024)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated target interaction counts")
    parser.add_argument("--per-user", type=float, default=20.0, help="mean history length")
    parser.add_argument(
        "--items-per-interaction", type=float, default=0.02, help="catalog size / interactions"
    )
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="threads for histories (default: up to 4)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    header = f"{'interactions':>12} {'users':>8} {'items':>7} {'seconds':>8} {'interactions/s':>15} {'split s':>8} {'peak RSS MB':>12} {'of 60 s':>8}"
    print(header)
    print("-" * len(header))
    context = multiprocessing.get_context("spawn")  # a fresh interpreter per size: peak RSS is per size
    for size in sizes:
        cfg = world_config(size, args.per_user, args.items_per_interaction, args.image_size)
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            r = pool.submit(measure, cfg, args.seed, args.workers).result()
        print(
            f"{r.interactions:>12,} {r.users:>8,} {r.items:>7,} {r.seconds:>8.2f} "
            f"{r.interactions / r.seconds:>15,.0f} {r.process_seconds:>8.2f} {r.peak_rss_mb:>12.0f} "
            f"{r.seconds / 60:>8.2f}"
        )


if __name__ == "__main__":
    main()
