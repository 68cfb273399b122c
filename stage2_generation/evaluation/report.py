"""eval/'s outputs: results.json, the results.md table, PNG plots, and an offline HTML page with both."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dppmg.io import atomic_path, write_json, write_text
from stage2_generation.evaluation.methods import LABELS, Generation

# Columns of the headline table (the rest are in results.json); those a dataset lacks are skipped.
HEADLINE = (
    "personalization",
    "personalization_text",
    "personalization_image",
    "consistency",
    "fidelity",
    "hit_text",
    "hit_image",
    "judge_consistency",
    "target_hit_image",
    "judge_history_last5",
    "judge_history_all",
    "judge_target",
    "ssim_history_all",
    "diversity_text",
    "diversity_image",
)


def write_outputs(
    ev: Any,
    summary: dict[str, Any],
    gens: dict[str, Generation],
    scores: dict[str, dict[str, np.ndarray]],
    tradeoff: dict[str, Any],
) -> None:
    """gens and scores: each method's first-seed generations and their per-pair scores (the page shows them)."""
    out: Path = ev.out
    summary = {**summary, "tradeoff": tradeoff}
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    figures = [bar_plot(summary, plots / "metrics.png")]
    if tradeoff:
        figures.append(tradeoff_plot(tradeoff, plots / "tradeoff.png"))
    write_text(out / "results.md", markdown(summary))
    _write_page(ev, summary, gens, scores, [f for f in figures if f is not None])
    write_json(out / "results.json", summary)  # last: a complete results.json means a complete eval


def _columns(summary: dict[str, Any]) -> list[str]:
    present = set().union(*(row.keys() for row in summary["methods"].values()))
    return [m for m in HEADLINE if m in present]


def _cell(i: Mapping[str, Any], signed: bool = False) -> str:
    if i is None or i.get("mean") is None or not math.isfinite(i["mean"]):
        return "–"
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(i['mean'])} [{f.format(i['low'])}, {f.format(i['high'])}]"


def markdown(summary: dict[str, Any]) -> str:
    cols = _columns(summary)
    lines = [
        f"# Evaluation of run `{summary['run']}` ({summary['dataset']})",
        "",
        f"{summary['pairs']} held-out (user, target) pairs, seeds {summary['seeds']}. Each cell: the mean over pairs "
        "(each pair averaged over the seeds) and its 95 % bootstrap interval. Diversity: per target shared by "
        f"several users, over the groups. Images sampled in {summary.get('precision', 'fp32')} "
        "(`stage2.generation.precision`).",
        "",
        "| method | " + " | ".join(cols) + " |",
        "| --- | " + " | ".join("---" for _ in cols) + " |",
    ]
    for name, row in summary["methods"].items():
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(_cell(row.get(m)) for m in cols) + " |")
    if summary["differences"]:
        lines += [
            "",
            "## DPPMG minus each method, paired over the same pairs",
            "",
            "† marks a difference whose 95 % interval contains 0 (not significant).",
            "",
            "| dppmg − | " + " | ".join(c for c in cols if not c.startswith("diversity")) + " |",
            "| --- | " + " | ".join("---" for c in cols if not c.startswith("diversity")) + " |",
        ]
        for key, diffs in summary["differences"].items():
            name = key.split("_minus_", 1)[1]
            cells = []
            for m in cols:
                if m.startswith("diversity"):
                    continue
                i = diffs.get(m)
                mark = "" if i is None or i.get("significant") else " †"
                cells.append(_cell(i, signed=True) + (mark if i is not None else ""))
            lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    pmg = summary.get("pmg")
    if pmg:
        lines += ["", "## PMG", "", f"Keyword extractor: {pmg['extractor']}.", ""]
        for row in pmg.get("samples", []):
            lines.append(f"- user {row['user_id']}: {', '.join(row['keywords'])}")
    for method, points in summary.get("tradeoff", {}).items():
        knob = "alpha" if method == "pmg" else "fidelity_weight"
        lines += [
            "",
            f"## Trade-off: {LABELS.get(method, method)} as {knob} varies (seed {summary['seeds'][0]})",
            "",
        ]
        lines += [
            f"| {knob} | personalization | personalization_image | fidelity |",
            "| --- | --- | --- | --- |",
        ]
        for p in points:
            lines.append(
                f"| {p[knob]:g} | {p['personalization']:.3f} | {p['personalization_image']:.3f} | {p['fidelity']:.3f} |"
            )
    lines += _downstream_lines(summary.get("downstream"))
    if summary.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {k}: {v}" for k, v in summary["notes"].items()]
    return "\n".join(lines) + "\n"


def _downstream_lines(d: Mapping[str, Any] | None) -> list[str]:
    if not d:
        return []
    k = d["k"]
    lines = [
        "",
        f"## Downstream: generated content as recommendation features (PMG's use), Recall@{k}",
        "",
        f"Each method generated once per held-out user with no target ({d['users']} users, the first seed). "
        f"Stage 1 alone: Recall@{k} {_cell(d['stage1_only'])}. The feature weight was chosen on the validation "
        f"items among {d['weights']} (0: the features did not help there); † marks a difference whose interval "
        "contains 0.",
        "",
        f"| method | features | weight | Recall@{k} with | with − stage 1 alone |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, rows in d["methods"].items():
        for feature, r in rows.items():
            mark = "" if r["difference"].get("significant") else " †"
            lines.append(
                f"| {LABELS.get(name, name)} | {feature} | {r['weight']:g} | {_cell(r['with'])} | "
                f"{_cell(r['difference'], signed=True)}{mark} |"
            )
    return lines


def bar_plot(summary: dict[str, Any], path: Path) -> Path:
    """One panel per headline metric: a bar per method with its 95 % interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = _columns(summary)
    names = list(summary["methods"])
    ncol = 4
    nrow = math.ceil(len(cols) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 2.9 * nrow), squeeze=False)
    colours = plt.get_cmap("tab10")(np.arange(len(names)) % 10)
    for ax, metric in zip(axes.flat, cols):
        rows = [summary["methods"][n].get(metric) for n in names]
        mean = np.array([r["mean"] if r and r["mean"] is not None else np.nan for r in rows], dtype=float)
        low = np.array([r["low"] if r else np.nan for r in rows], dtype=float)
        high = np.array([r["high"] if r else np.nan for r in rows], dtype=float)
        x = np.arange(len(names))
        err = np.vstack([np.nan_to_num(mean - low), np.nan_to_num(high - mean)])
        ax.bar(x, np.nan_to_num(mean), yerr=err, color=colours, capsize=3)
        ax.set_title(metric, fontsize=9)
        ax.set_xticks(x, [LABELS.get(n, n) for n in names], rotation=60, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(cols) :]:
        ax.axis("off")
    fig.suptitle(
        f"{summary['run']}: means over {summary['pairs']} pairs with 95 % bootstrap intervals", fontsize=10
    )
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def tradeoff_plot(tradeoff: dict[str, list[dict[str, float]]], path: Path) -> Path:
    """Personalization against fidelity for PMG (alpha) and DPPMG (the reward's fidelity weight)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for method, points in tradeoff.items():
        knob = "alpha" if method == "pmg" else "fidelity_weight"
        x = [p["fidelity"] for p in points]
        y = [p["personalization"] for p in points]
        ax.plot(x, y, marker="o", label=f"{LABELS.get(method, method)} ({knob})")
        for p, xi, yi in zip(points, x, y):
            ax.annotate(f"{p[knob]:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("fidelity (scorer)")
    ax.set_ylabel("personalization (scorer, text and image)")
    ax.legend(fontsize=8)
    ax.set_title("Personalization versus fidelity", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, format="png", dpi=110)


def _write_page(
    ev: Any,
    summary: dict[str, Any],
    gens: dict[str, Generation],
    scores: dict[str, dict[str, np.ndarray]],
    figures: list[Path],
) -> None:
    from dppmg.data.imageio import load_image
    from stage2_generation.evaluate import user_histories
    from stage2_generation.gallery import GALLERY_SOURCE_PX, GalleryEntry, Shown, write_gallery

    ds = ev.components.ds
    histories = user_histories(ds)

    def item(i: int) -> Shown:
        p = ds.image_path(i)
        img = load_image(p, GALLERY_SOURCE_PX) if p is not None and p.is_file() else None
        text = ds.items["text"].iat[i]
        return Shown(text=text if isinstance(text, str) else None, image=img)

    shown = [
        m
        for m in ("personalization", "consistency", "fidelity", "hit_image", "judge_history_all")
        if m in summary["metrics"]
    ]
    entries = []
    for k, p in enumerate(ev.pairs[: ev.cfg.eval.sample_users]):
        history = [item(int(i)) for i in histories.get(p.user, [])]
        generations = {LABELS.get(n, n): Shown(g.texts[k], g.images[k]) for n, g in gens.items()}
        shown_scores = {LABELS.get(n, n): {m: float(scores[n][m][k]) for m in shown} for n in gens}
        entries.append(
            GalleryEntry(
                str(ds.users["user_id"].iat[p.user]),
                history,
                p.keywords,
                None if p.item is None else item(p.item),
                generations,
                shown_scores,
            )  # fmt: skip
        )
    table = {
        LABELS.get(n, n): {m: row[m]["mean"] for m in shown if m in row}
        for n, row in summary["methods"].items()
    }
    notes = (
        f"Run {summary['run']}: every method on the same {summary['pairs']} held-out pairs, seeds {summary['seeds']}; "
        "the table holds means, results.md their intervals and the paired differences. Generations below: the first seed."
    )
    write_gallery(
        ev.out / "index.html", entries, title=f"DPPMG evaluation — {summary['run']}", summary=table, notes=notes,
        figures=figures,
    )  # fmt: skip
