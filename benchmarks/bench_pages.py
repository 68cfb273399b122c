"""The pages of a finished run in headless Chromium: images rendered and console errors, as a table.

    .venv/bin/python benchmarks/bench_pages.py [--run runs/<name> | --config configs/default.yaml]

Checks `stage2/gallery.html` and `eval/index.html` of the run folder (default: the run of --config, configs/default.yaml) with
`dppmg.browser_check.check_page`, prints one row per page, then every broken image and console message, and exits
non-zero when a page is missing or fails.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dppmg.browser_check import check_page, find_chromium
from dppmg.config import load_config

REPO = Path(__file__).resolve().parents[1]
PAGES = ("stage2/gallery.html", "eval/index.html")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, help="run folder (default: the run_dir of --config)")
    ap.add_argument("--config", default="configs/default.yaml")
    ns = ap.parse_args()
    run = ns.run or REPO / load_config(REPO / ns.config, []).run_dir
    if find_chromium() is None:
        sys.exit(
            "no chromium/chromedriver found: apt-get install chromium chromium-driver, or set DPPMG_CHROMIUM"
        )
    print(f"{'page':<24} {'images':>6} {'broken':>6} {'console errors':>14} {'seconds':>7}")
    failures = []
    for name in PAGES:
        page = run / name
        if not page.is_file():
            print(f"{name:<24} {'missing':>6}")
            failures.append(f"{page}: missing")
            continue
        t0 = time.perf_counter()
        r = check_page(page)
        print(
            f"{name:<24} {r.images:>6} {len(r.broken):>6} {len(r.console_errors):>14} {time.perf_counter() - t0:>7.1f}"
        )
        failures += [f"{page}: broken image {src[:80]}" for src in r.broken]
        failures += [f"{page}: console error {msg}" for msg in r.console_errors]
    for line in failures:
        print(line)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
