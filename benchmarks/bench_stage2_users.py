"""Stage 2's cost as the number of users grows: the same stage-2 config on synthetic worlds of 1k and 10k users.

    .venv/bin/python benchmarks/bench_stage2_users.py [--users 1000,10000] [--config configs/debug.yaml] [key=value ...]

Each world has the default world's shape (20 interactions and 0.6 items per user). Grounding and RL take a fixed
number of steps and the held-out set is a fixed number of users (`stage2.generation.heldout_users`), so what can
grow with the catalogue is what stage 2 does per training user or per item: the histories, the typical-pair
selection over every training interaction, the reward's item embeddings, loading the tokens of every user, and
the warm-start's data (its steps are fixed too). The benchmark runs `dppmg data prepare`, `dppmg stage1` and
`dppmg stage2` per size, each in its own process (wall time and peak memory from `os.wait4`), and prints stage 2's
phases from its metrics.json, its cost per user, and the growth exponent of its wall time between sizes (1 would
be linear in users, 0 constant).

The default config is configs/debug.yaml's generators, steps and held-out size: the question is how the cost grows,
and the debug sizes answer it in minutes. Pass configs/default.yaml for the full-size generators (about 15 minutes
per size on 2 cores, most of it the warm-start).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bench_stage1 import growth_exponent  # a script has its own folder on sys.path
from bench_stage2 import run

DPPMG = [sys.executable, "-m", "dppmg"]


def world(users: int) -> list[str]:
    """Overrides for a synthetic world of `users` users shaped like the default world (1000 users, 600 items)."""
    return [
        f"data.name=users-{users}",
        f"data.synthetic.n_users={users}",
        f"data.synthetic.n_items={round(0.6 * users)}",
        "data.synthetic.interactions_per_user=20",
        "data.synthetic.min_interactions_per_user=5",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", default="1000,10000")
    ap.add_argument("--config", default="configs/debug.yaml")
    ap.add_argument("--heldout-users", type=int, default=32, help="the same at every size")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    ns = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-stage2-users-"))
    print(f"outputs in {tmp}", flush=True)
    rows = []
    for users in [int(u) for u in ns.users.split(",")]:
        common = [
            ns.config, f"data.root={tmp / 'data'}", f"runs_dir={tmp / 'runs'}", f"features.cache_dir={tmp / 'cache'}",
            f"run_name=users-{users}", f"stage2.generation.heldout_users={ns.heldout_users}", "-q",
            *world(users), *ns.overrides,
        ]  # fmt: skip
        wall = {}
        for command in (["data", "prepare"], ["stage1"], ["stage2"]):
            wall[command[0]] = run([*DPPMG, *command, *common])
        m = json.loads((tmp / "runs" / f"users-{users}" / "stage2" / "metrics.json").read_text())
        rows.append({"users": users, "wall": wall, "timing": m["timing"], "pairs": m["heldout_pairs"]})
        print(f"{users} users done: stage 2 {wall['stage2'][0]:.0f} s", flush=True)

    print(
        "\n| users | prepare s | stage 1 s | stage 2 s | stage 2 peak GB | warm-start s | grounding s | RL iteration s "
        "| held-out pairs | image generation s per pair | stage 2 ms per user |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        w, t = r["wall"], r["timing"]
        per_pair = 1 / t["images_per_second"]
        print(
            f"| {r['users']:,} | {w['data'][0]:.0f} | {w['stage1'][0]:.0f} | {w['stage2'][0]:.0f} | "
            f"{w['stage2'][1]:.2f} | {t['warmstart_seconds']:.0f} | {t['grounding_seconds']:.0f} | "
            f"{t['rl_iteration_seconds']:.1f} | {r['pairs']} | {per_pair:.3f} | {1000 * w['stage2'][0] / r['users']:.1f} |"
        )
    for a, b in zip(rows, rows[1:]):
        e = growth_exponent(a["users"], a["wall"]["stage2"][0], b["users"], b["wall"]["stage2"][0])
        mem = growth_exponent(a["users"], a["wall"]["stage2"][1], b["users"], b["wall"]["stage2"][1])
        print(
            f"{a['users']:,} -> {b['users']:,} users: stage-2 wall-time exponent {e:.3f}, peak-memory exponent {mem:.3f}"
        )


if __name__ == "__main__":
    main()
