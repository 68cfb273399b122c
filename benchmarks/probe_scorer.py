"""How well does a scorer setting retrieve a dataset's held-out items? The experiment behind the scorer width of
configs/movielens-posters.yaml.

    .venv/bin/python benchmarks/probe_scorer.py [--config configs/movielens-posters.yaml] SETTING [SETTING ...]

Each SETTING is a comma-separated list of `features.scorer` fields, e.g. `hidden_size=64,epochs=80` or
`epochs=40` (the config's own scorer with fewer epochs). For each, a scorer is trained on the prepared dataset's
(text, image) pairs with `dppmg.scorer.build_scorer`, as `dppmg data prepare` trains it, and its held-out
text→image retrieval report is printed with the training time. Needs the prepared dataset (`make data CONFIG=...`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dppmg.config import ScorerConfig, load_config  # noqa: E402
from dppmg.data.format import load_dataset  # noqa: E402
from dppmg.data.imageio import load_image_array  # noqa: E402
from dppmg.scorer import build_scorer  # noqa: E402

REPORTED = ("n_heldout", "recall@1", "chance@1", "recall@5", "chance@5", "loss_final")


def parse_setting(spec: str, base: ScorerConfig) -> ScorerConfig:
    """`hidden_size=64,epochs=80` → `base` with those fields replaced, each cast to the field's type."""
    fields = {f.name: f for f in dataclasses.fields(ScorerConfig)}
    changes = {}
    for part in filter(None, spec.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key not in fields:
            raise SystemExit(
                f"setting {spec!r}: {part!r} is not key=value with a features.scorer field as key"
            )
        changes[key] = type(getattr(base, key))(value)
    return dataclasses.replace(base, **changes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "movielens-posters.yaml"))
    ap.add_argument("settings", nargs="+", help="comma-separated features.scorer fields, e.g. hidden_size=64")
    ns = ap.parse_args()
    cfg = load_config(ns.config)
    settings = {spec: parse_setting(spec, cfg.features.scorer) for spec in ns.settings}  # typos fail first
    ds = load_dataset(cfg.data.processed_dir)
    paths = [ds.image_path(i) for i in range(ds.num_items)]
    texts = ds.items["text"].fillna("").tolist()
    images = {}
    for spec, sc in settings.items():
        if sc.image_size not in images:
            images[sc.image_size] = load_image_array(paths, sc.image_size, progress=False)
        start = time.perf_counter()
        _, report = build_scorer(sc, texts, images[sc.image_size], cfg.seed, progress=False)
        shown = ", ".join(f"{k} {report[k]:.3f}" if isinstance(report[k], float) else f"{k} {report[k]}"
                          for k in REPORTED if k in report)  # fmt: skip
        print(f"{spec}: {shown}; {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
