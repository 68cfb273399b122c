"""`dppmg eval` after the two stages: wall time, peak memory and issue #12's targets on eval/results.json.

    .venv/bin/python benchmarks/bench_eval.py [--config configs/default.yaml] [key=value ...]

Runs `dppmg stage1` and `dppmg stage2` for the config's run (each a no-op when already complete), then `dppmg eval`
in its own process (`os.wait4` gives its peak memory), and prints the results table and every target of
`targets.eval_targets` with its value and whether it was met. With `eval.overwrite=true` nothing cached is reused.
"""

from __future__ import annotations

import argparse
import json
import sys

from bench_stage2 import REPO, run  # a script has its own folder on sys.path
from targets import eval_targets

from dppmg.config import load_config

DPPMG = [sys.executable, "-m", "dppmg"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    ns = ap.parse_args()
    common = [ns.config, "-q", *ns.overrides]
    for stage in ("stage1", "stage2"):
        run([*DPPMG, stage, *common])
    seconds, gb = run([*DPPMG, "eval", *common])
    cfg = load_config(REPO / ns.config, ns.overrides)
    out = REPO / cfg.run_dir / "eval"
    results = json.loads((out / "results.json").read_text())
    print(
        f"eval: {seconds:.0f} s, peak {gb:.2f} GB, images sampled in {results.get('precision', 'fp32')}; {out}"
    )
    print((out / "results.md").read_text())
    print("targets:")
    for key, t in eval_targets(results, seconds).items():
        ci = f" [{t['ci'][0]:+.4f}, {t['ci'][1]:+.4f}]" if "ci" in t else ""
        print(f"  {key}: {t['value']:+.4f}{ci} (target {t['target']}): {'met' if t['met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
