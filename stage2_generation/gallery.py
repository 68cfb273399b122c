"""A static gallery page of generations: one self-contained HTML file that opens offline in any browser.

For each user the page shows the recent history (thumbnails with their texts), the target, and one column per
generation condition (non-personalized, grounded, after RL, ...) with the generated image, text and scores,
under a header with the run's summary table. It is what a person looks at to judge whether the tokens
personalize anything, so it carries everything inline: images are PNG data URIs (upscaled for display with
`image-rendering: pixelated`, since the default images are 32×32), styles sit in one <style> block, and
there are no scripts, fonts or links to anything outside the file. Every text is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dppmg.errors import DppmgError
from dppmg.io import write_text

MAX_HISTORY = 8  # most recent history items shown per user
THUMB_PX = 72  # display side of history and target images
GENERATION_PX = 128  # display width of generated images
GALLERY_SOURCE_PX = 192  # catalogue images are embedded at most this many pixels on their longer side

STYLE = f"""
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }}
h1 {{ margin: 0 0 .3em; }}
h2 {{ margin: 0 0 .5em; font-size: 1.15em; }}
h3 {{ margin: .6em 0 .3em; font-size: .95em; color: #555; }}
.notes {{ white-space: pre-wrap; color: #444; max-width: 70em; }}
table {{ border-collapse: collapse; font-size: .85em; }}
th, td {{ border: 1px solid #ccc; padding: .2em .5em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
section.entry {{ background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 1em; margin: 1.2em 0; }}
.row {{ display: flex; flex-wrap: wrap; gap: .8em; align-items: flex-start; }}
figure {{ margin: 0; }}
figcaption, .text {{ font-size: .8em; white-space: pre-wrap; overflow-wrap: anywhere; }}
.item {{ width: {THUMB_PX + 48}px; }}
.generation {{ width: {GENERATION_PX + 112}px; border-left: 3px solid #8ab; padding-left: .6em; }}
img {{ image-rendering: pixelated; display: block; background: #eee; }}
.item img {{ width: {THUMB_PX}px; height: auto; }}
.generation img {{ width: {GENERATION_PX}px; height: auto; }}
.keywords {{ font-weight: 600; }}
.muted {{ color: #888; font-size: .8em; }}
figure.plot img {{ image-rendering: auto; max-width: 100%; margin: .8em 0; }}
"""


@dataclass
class Shown:
    """One piece of content: a text and/or an image (uint8 [H, W, 3])."""

    text: str | None = None
    image: np.ndarray | None = None


@dataclass
class GalleryEntry:
    """One user's row of the gallery.

    history: past items, most recent last (the page shows the last MAX_HISTORY); target: the target keywords;
    target_item: the held-out target item, if known; generations: condition label -> generation, shown in
    dict order; scores: optional condition label -> {metric: value}, shown under that generation.
    """

    user_id: str
    history: list[Shown]
    target: str
    target_item: Shown | None
    generations: dict[str, Shown]
    scores: dict[str, dict[str, float]] | None = None


def write_gallery(
    path: str | Path,
    entries: Sequence[GalleryEntry],
    title: str,
    summary: Mapping[str, Mapping[str, float]] | None = None,
    notes: str = "",
    figures: Sequence[str | Path] = (),
) -> Path:
    """Write the gallery page to `path` atomically and return the path.

    summary: optional condition -> {metric: value}, shown as a table (rows conditions, columns metrics).
    figures: PNG files (plots) embedded under the summary.
    Raises DppmgError naming the entry and field of any malformed image or score.
    """
    page = render_gallery(entries, title, summary, notes, figures)
    write_text(path, page)
    return Path(path)


def render_gallery(
    entries: Sequence[GalleryEntry],
    title: str,
    summary: Mapping[str, Mapping[str, float]] | None = None,
    notes: str = "",
    figures: Sequence[str | Path] = (),
) -> str:
    """The gallery page as one HTML string (see `write_gallery`)."""
    header = [f"<h1>{_esc(title)}</h1>"]
    if notes:
        header.append(f'<p class="notes">{_esc(notes)}</p>')
    if summary:
        header.append(_summary_table(summary))
    for fig in figures:
        data = base64.b64encode(Path(fig).read_bytes()).decode("ascii")
        header.append(
            f'<figure class="plot"><img src="data:image/png;base64,{data}" alt="{_esc(Path(fig).name)}"></figure>'
        )
    body = [_entry(i, e) for i, e in enumerate(entries)]
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            '<head><meta charset="utf-8">',
            f"<title>{_esc(title)}</title>",
            f"<style>{STYLE}</style>",
            "</head>",
            "<body>",
            "<header>",
            *header,
            "</header>",
            "<main>",
            *body,
            "</main>",
            "</body>",
            "</html>",
            "",
        ]
    )


def _entry(index: int, entry: GalleryEntry) -> str:
    where = f"entry {index} (user {entry.user_id!r})"
    n = len(entry.history)
    first = max(0, n - MAX_HISTORY)  # the items before it are left out
    heading = f"History: last {n - first} of {n} ({first} earlier not shown)" if first else "History"
    history = [
        _figure(entry.history[k], f"{where} history[{k}]", "item", f"history item {k}")
        for k in range(first, n)
    ]
    target = [f'<p class="keywords">{_esc(entry.target)}</p>']
    if entry.target_item is not None:
        target.append(_figure(entry.target_item, f"{where} target_item", "item", "target item"))

    generations = []
    scores = entry.scores or {}
    unknown = [label for label in scores if label not in entry.generations]
    if unknown:
        raise DppmgError(
            f"{where}: scores for {unknown}, which are not generation conditions {list(entry.generations)}"
        )
    for label, gen in entry.generations.items():
        parts = [f"<h3>{_esc(label)}</h3>"]
        parts += _content(gen, f"{where} generations[{label!r}]", f"generation: {label}")
        if label in scores:
            parts.append(_scores_table(scores[label], f"{where} scores[{label!r}]"))
        generations.append(f'<div class="generation">{"".join(parts)}</div>')

    if not history:
        history = ['<p class="muted">no history</p>']
    if not generations:
        generations = ['<p class="muted">no generations</p>']
    return "\n".join(
        [
            '<section class="entry">',
            f"<h2>{_esc(entry.user_id)}</h2>",
            f"<h3>{_esc(heading)}</h3>",
            f'<div class="row history">{"".join(history)}</div>',
            "<h3>Target</h3>",
            f'<div class="row target">{"".join(target)}</div>',
            "<h3>Generations</h3>",
            f'<div class="row generations">{"".join(generations)}</div>',
            "</section>",
        ]
    )


def _figure(item: Shown, where: str, css: str, alt: str) -> str:
    return f'<figure class="{css}">{"".join(_content(item, where, alt, caption=True))}</figure>'


def _content(item: Shown, where: str, alt: str, caption: bool = False) -> list[str]:
    """An item's <img> (when it has an image) and its text (when it has one)."""
    if not isinstance(item, Shown):
        raise DppmgError(f"{where}: expected a Shown, got {type(item).__name__}")
    out = []
    if item.image is not None:
        out.append(f'<img src="{_png_data_uri(item.image, f"{where}.image")}" alt="{_esc(alt)}">')
    if item.text is not None:
        tag = "figcaption" if caption else "p"
        out.append(f'<{tag} class="text">{_esc(item.text)}</{tag}>')
    return out


def _png_data_uri(image: np.ndarray, where: str) -> str:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {list(image.shape)}" if isinstance(image, np.ndarray) else type(image).__name__
        raise DppmgError(f"{where}: expected a uint8 [H, W, 3] array, got {got}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise DppmgError(f"{where}: empty image {list(image.shape)}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _summary_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """Rows = conditions, columns = metrics in order of first appearance; a missing value is left blank."""
    columns = list(dict.fromkeys(metric for values in rows.values() for metric in values))
    head = "".join(f"<th>{_esc(c)}</th>" for c in ["condition", *columns])
    lines = [f"<tr>{head}</tr>"]
    for label, values in rows.items():
        cells = [f"<td>{_esc(label)}</td>"]
        for c in columns:
            cells.append(
                f"<td>{_number(values[c], f'summary[{label!r}][{c!r}]') if c in values else ''}</td>"
            )
        lines.append(f"<tr>{''.join(cells)}</tr>")
    return f'<table class="summary">{"".join(lines)}</table>'


def _scores_table(values: Mapping[str, float], where: str) -> str:
    """One generation's scores, one metric per line."""
    lines = [
        f"<tr><td>{_esc(m)}</td><td>{_number(v, f'{where}[{m!r}]')}</td></tr>" for m, v in values.items()
    ]
    return f'<table class="scores">{"".join(lines)}</table>'


def _number(value: float, where: str) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise DppmgError(f"{where}: expected a number, got {value!r}") from None
    return "n/a" if not math.isfinite(v) else f"{v:.4g}"


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)
