"""Image sampling in bfloat16 against float32 (`stage2.generation.precision`): the speed, and whether eval's
numbers move.

    .venv/bin/python benchmarks/bench_precision.py RUN_DIR/stage2 [--seeds 0 1 2] [--methods dppmg none]
        [key=value ...]
    .venv/bin/python benchmarks/bench_precision.py --config CONFIG [...]      (make bench-precision)

It loads a finished run as `make eval` does (its `stage2/config.yaml`, or CONFIG's run, then the overrides, e.g.
`data.root=...` when the data lives elsewhere) and, for each method and seed, generates the held-out pairs twice in this process,
at fp32 and at bf16, alternating, from the same noise, timing each, then scores both with eval's metric list.

It prints:
  - the machine's bf16 support, the images per second at each precision and their ratio (the speed-up);
  - per method and metric: the fp32 mean, the bf16 mean, and bf16 - fp32 paired over the pairs (each pair's score
    averaged over the seeds) with its 95 % bootstrap interval: what the precision alone does to a metric;
  - the first method's difference to each other method (eval's contrast, e.g. dppmg - none) at fp32 and at bf16:
    whether the conclusions eval draws are the same at both precisions;
  - how far apart the two precisions' images are, in pixel levels of 255.
Texts do not depend on the precision (the text generator runs in fp32 either way): each (method, seed) samples its
texts once, as eval does, and both precisions' images are scored with them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

PRECISIONS = ("fp32", "bf16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "stage2", type=Path, nargs="?", help="a finished run's stage-2 folder (runs/<run>/stage2)"
    )
    ap.add_argument("--config", type=Path, help="instead of the folder: the config whose run to load")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--methods", nargs="+", default=["dppmg", "none"], help="token methods; the first is compared"
    )
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args()

    import numpy as np
    import torch

    from dppmg.bootstrap import paired_difference
    from dppmg.config import load_config
    from dppmg.errors import DppmgError
    from stage2_generation.evaluation.methods import TokenMethod, token_texts
    from stage2_generation.evaluation.run import _open, build_method, pool_seeds
    from stage2_generation.generators import generate_images
    from stage2_generation.injection import load_injected

    if (args.stage2 is None) == (args.config is None):
        ap.error("give a stage-2 folder or --config, not both")
    config = args.config or args.stage2 / "config.yaml"
    if not config.is_file():
        raise DppmgError(
            f"{config} not found" + (f": is {args.stage2} a stage-2 folder?" if args.stage2 else "")
        )
    cfg = load_config(config, ["tracking.mode=disabled", *args.overrides])
    stage2 = cfg.run_dir / "stage2"
    ev = _open(cfg, progress=False)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    print(f"== {len(ev.pairs)} held-out pairs of {stage2}, seeds {args.seeds}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, AMX tiles {amx}, AVX-512 BF16 {bf16}\n", flush=True)  # fmt: skip

    seconds = {p: 0.0 for p in PRECISIONS}
    images = 0
    pixel_diffs: list[np.ndarray] = []
    # method -> precision -> metric -> [seeds, pairs]
    scores: dict[str, dict[str, dict[str, list[np.ndarray]]]] = {}
    for name in args.methods:
        method = build_method(ev, name, progress=False)
        if not isinstance(method, TokenMethod):
            raise DppmgError(f"--methods: {name} is not a token method (one of none, dppmg_sft, dppmg, ...)")
        if method.tokens_file is not None:
            load_injected(method.tokens_file, method.policy.injected)
        policy, g = method.policy, method.generation
        prompts = policy.image_prompts(ev.pairs, method.image_tokens)
        scores[name] = {p: {} for p in PRECISIONS}
        for seed in args.seeds:
            texts, _, _ = token_texts(policy, ev.pairs, g, seed, method.text_tokens, progress=False)
            made, took = {}, {}
            for precision in PRECISIONS:  # eval's own call (methods.generate_with_tokens), at each precision
                start = time.perf_counter()
                made[precision] = generate_images(
                    policy.gen.pipe, prompts, steps=g.image_steps, guidance=g.guidance, seed=seed,
                    batch_size=g.batch_size, progress=False, precision=precision,
                )  # fmt: skip
                took[precision] = time.perf_counter() - start
                seconds[precision] += took[precision]
                for metric, values in ev.judges.score(ev.pairs, texts, made[precision]).items():
                    scores[name][precision].setdefault(metric, []).append(
                        np.asarray(values, dtype=np.float64)
                    )
            images += len(ev.pairs)
            pixel_diffs.append(np.abs(made["bf16"].astype(int) - made["fp32"].astype(int)).ravel())
            print(f"  {name} seed {seed}: fp32 {took['fp32']:.1f} s, bf16 {took['bf16']:.1f} s", flush=True)

    rate = {p: images / seconds[p] for p in PRECISIONS}
    print(f"\nimages per second: fp32 {rate['fp32']:.2f}, bf16 {rate['bf16']:.2f}, "
          f"speed-up {rate['bf16'] / rate['fp32']:.2f}x ({images} images each)")  # fmt: skip
    diffs = np.concatenate(pixel_diffs)
    print(f"pixel difference bf16 - fp32 (of 255): mean {diffs.mean():.2f}, 99th percentile "
          f"{np.percentile(diffs, 99):.0f}, max {diffs.max()}\n")  # fmt: skip

    def pooled(name: str, precision: str, metric: str) -> np.ndarray:
        return pool_seeds(np.stack(scores[name][precision][metric]))

    def cell(a: np.ndarray, b: np.ndarray) -> str:
        d = paired_difference(a, b, seed=cfg.seed)
        star = "" if d.low > 0 or d.high < 0 else " (n.s.)"
        return f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]{star}"

    metrics = [
        m for m in scores[args.methods[0]]["fp32"] if np.isfinite(pooled(args.methods[0], "fp32", m)).any()
    ]
    print("| method | metric | fp32 | bf16 | bf16 − fp32 |\n| --- | --- | --- | --- | --- |")
    for name in args.methods:
        for m in metrics:
            a, b = pooled(name, "fp32", m), pooled(name, "bf16", m)
            print(f"| {name} | {m} | {np.nanmean(a):.4f} | {np.nanmean(b):.4f} | {cell(b, a)} |")
    first = args.methods[0]
    for other in args.methods[1:]:
        print(f"\n| metric | {first} − {other} at fp32 | at bf16 |\n| --- | --- | --- |")
        for m in metrics:
            at = [cell(pooled(first, p, m), pooled(other, p, m)) for p in PRECISIONS]
            print(f"| {m} | {at[0]} | {at[1]} |")


if __name__ == "__main__":
    main()
