"""Dataset statistics and a picture of sample items: what `dppmg data stats` prints and writes.

`dataset_stats` summarises a processed dataset in plain JSON types, `format_stats` turns that into a
terminal report, `sample_grid` draws a PNG of sampled items (image, keywords, text) so a person can see
what the models will learn from, and `write_stats` writes both next to each other.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from dppmg.data.format import SPLITS, ProcessedDataset
from dppmg.errors import DppmgError
from dppmg.io import atomic_path, write_json

# Order matters: it is the column order of the printed table.
QUANTILES = (("min", 0), ("p25", 25), ("median", 50), ("mean", None), ("p75", 75), ("p90", 90), ("max", 100))
HEAD_ITEM_SHARE = 0.01  # the "head" of the popularity curve: the most popular 1% of items
RARE_ITEM_COUNT = 5  # items with fewer interactions than this give a GNN little to learn from
TOP_CATEGORIES = 12  # categorical pref_* columns and keywords: values listed by name before "other"
REPORT_WIDTH = 100  # terminal columns the text report wraps lists at
# meta.json facts worth repeating in the report (those present are copied; the rest are skipped).
META_FACTS = (
    "source",
    "content_hash",
    "split",
    "split_rule",
    "split_ratios",
    "seed",
    "encoders",
    "format_version",
)


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


def dataset_stats(ds: ProcessedDataset) -> dict[str, Any]:
    """Counts, distributions, content coverage and ground truth of a processed dataset, as plain JSON types."""
    history = np.bincount(ds.interactions["user_idx"].to_numpy(), minlength=ds.num_users)  # [U]
    popularity = np.bincount(ds.interactions["item_idx"].to_numpy(), minlength=ds.num_items)  # [I]
    stats = {
        "counts": _counts(ds),
        "history_length": {**_distribution(history), "users_without_interactions": int((history == 0).sum())},
        "item_popularity": {**_distribution(popularity), **_popularity_shape(popularity)},
        "time": _time_range(ds.interactions["timestamp"]),
        "modalities": _modalities(ds),
        "content": _content(ds.items),
        "preferences": _preferences(ds.users),
        "meta": {k: ds.meta[k] for k in META_FACTS if k in ds.meta},
    }
    if "scorer" in ds.meta:
        stats["scorer"] = ds.meta["scorer"]
    return _plain(stats)


def _counts(ds: ProcessedDataset) -> dict[str, Any]:
    inter = ds.interactions
    n_inter = len(inter)
    cells = ds.num_users * ds.num_items
    split = inter["split"]
    return {
        "users": ds.num_users,
        "items": ds.num_items,
        "interactions": n_inter,
        "per_split": {s: int((split == s).sum()) for s in SPLITS},
        # Users with at least one interaction in each split: how many users each evaluation covers.
        "users_per_split": {s: int(inter.loc[split == s, "user_idx"].nunique()) for s in SPLITS},
        "density": n_inter / cells if cells else 0.0,
        "duplicate_pairs": int(inter.duplicated(["user_idx", "item_idx"]).sum()),
    }


def _distribution(values: np.ndarray) -> dict[str, float | int | None]:
    """min, p25, median, mean, p75, p90, max (numpy's linear interpolation); None for an empty array."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {name: None for name, _ in QUANTILES}
    out: dict[str, float | int | None] = {}
    for name, q in QUANTILES:
        x = float(values.mean()) if q is None else float(np.percentile(values, q))
        out[name] = int(x) if x.is_integer() else round(x, 4)
    return out


def _popularity_shape(popularity: np.ndarray) -> dict[str, Any]:
    """How concentrated interactions are: the head's share and the size of the long tail."""
    total = int(popularity.sum())
    n_head = max(1, math.ceil(HEAD_ITEM_SHARE * len(popularity))) if len(popularity) else 0
    head = int(np.sort(popularity)[::-1][:n_head].sum())
    rare = int((popularity < RARE_ITEM_COUNT).sum())
    return {
        "head_items": n_head,
        "head_share": head / total if total else 0.0,
        f"items_under_{RARE_ITEM_COUNT}": rare,
        f"items_under_{RARE_ITEM_COUNT}_share": rare / len(popularity) if len(popularity) else 0.0,
        "items_without_interactions": int((popularity == 0).sum()),
    }


def _time_range(timestamps: pd.Series) -> dict[str, Any]:
    """First and last interaction as ISO dates (UTC); timestamps are seconds since the epoch."""
    if timestamps.empty:
        return {"first": None, "last": None, "span_days": None}
    if timestamps.dtype.kind == "M":  # tolerate datetime columns, though the contract says int seconds
        seconds = timestamps.astype("datetime64[s]").astype("int64")
    else:
        seconds = timestamps.astype("int64")
    lo, hi = int(seconds.min()), int(seconds.max())
    return {"first": _iso_date(lo), "last": _iso_date(hi), "span_days": round((hi - lo) / 86400, 1)}


def _iso_date(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).date().isoformat()


def _modalities(ds: ProcessedDataset) -> dict[str, Any]:
    """Modalities in meta.json and each one's feature width (None when features were not loaded)."""
    encoders = ds.meta.get("encoders") or {}
    return {
        m: {
            "dim": int(ds.features[m].shape[1]) if m in ds.features else None,
            "encoder": encoders.get(m) if isinstance(encoders, dict) else None,
        }
        for m in ds.modalities or list(ds.features)
    }


def _present(column: pd.Series) -> pd.Series:
    """True where a text-like cell holds something other than null or blanks."""
    return column.notna() & (column.astype("string").str.strip().str.len() > 0).fillna(False)


def _content(items: pd.DataFrame) -> dict[str, Any]:
    n = len(items)
    has = {c: _present(items[c]) for c in ("text", "keywords", "image")}
    # Keywords are compared case-insensitively: "Red Shirt" and "red shirt" are one target.
    keywords = items.loc[has["keywords"], "keywords"].astype("string").str.strip().str.lower()
    top = keywords.value_counts().head(TOP_CATEGORIES)
    text_len = items.loc[has["text"], "text"].astype("string").str.len().to_numpy()
    return {
        "share_with": {c: float(mask.mean()) if n else 0.0 for c, mask in has.items()},
        "distinct_keywords": int(keywords.nunique()),
        "top_keywords": {str(k): int(v) for k, v in top.items()},
        "text_chars": _distribution(text_len),
    }


def _preferences(users: pd.DataFrame) -> dict[str, Any]:
    """Each pref_* column (the synthetic world's ground truth): quantiles if numeric, else value counts."""
    out: dict[str, Any] = {}
    for col in (c for c in users.columns if c.startswith("pref_")):
        values = users[col].dropna()
        if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            out[col] = {"kind": "numeric", **_distribution(values.to_numpy())}
            continue
        # Lists or arrays (several preferred values per user) are counted as one combined value.
        labels = values.map(
            lambda v: "+".join(map(str, v)) if isinstance(v, (list, tuple, np.ndarray)) else str(v)
        )
        counts = labels.value_counts()
        top = {str(k): int(v) for k, v in counts.head(TOP_CATEGORIES).items()}
        if len(counts) > TOP_CATEGORIES:
            top["other"] = int(counts.iloc[TOP_CATEGORIES:].sum())
        out[col] = {"kind": "categorical", "distinct": int(len(counts)), "counts": top}
    return out


def _plain(obj: Any) -> Any:
    """Recursively turn numpy scalars/arrays and tuples into plain JSON types; NaN becomes None."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


# --------------------------------------------------------------------------------------------------
# Text report
# --------------------------------------------------------------------------------------------------


def format_stats(stats: dict[str, Any]) -> str:
    """A multi-line report of `dataset_stats` output for the terminal."""
    sections = [_format_overview(stats), _format_distributions(stats), _format_content(stats)]
    if stats.get("preferences"):
        sections.append(_format_preferences(stats["preferences"]))
    if stats.get("scorer"):
        sections.append(_format_scorer(stats["scorer"]))
    return "\n\n".join(sections) + "\n"


def _num(x: Any, digits: int = 1) -> str:
    """Thousands separators; integers stay integers, other numbers get `digits` decimals."""
    if x is None:
        return "-"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, int) or float(x).is_integer():
        return f"{int(x):,}"
    return f"{x:,.{digits}f}"


def _plural(n: int, noun: str) -> str:
    return f"{_num(n)} {noun}{'' if n == 1 else 's'}"


def _pct(share: float) -> str:
    # Densities of real datasets are often below 0.1 %, so keep significant digits rather than decimals.
    return f"{100 * share:.3g} %"


def _rows(rows: list[tuple[str, str | list[str]]], indent: int = 2) -> list[str]:
    """`label  value` lines with the values aligned; a list value is packed onto as many lines as it needs."""
    width = max(len(k) for k, _ in rows)
    lines = []
    for label, value in rows:
        prefix = f"{' ' * indent}{label:<{width}}  "
        packed = _pack(value, REPORT_WIDTH - len(prefix)) if isinstance(value, list) else [value]
        lines.append(prefix + packed[0])
        lines.extend(" " * len(prefix) + more for more in packed[1:])
    return lines


def _pack(parts: list[str], width: int) -> list[str]:
    """Join parts with ", " into lines of at most `width` characters, never splitting a part."""
    lines: list[str] = []
    for part in parts:
        if lines and len(lines[-1]) + 2 + len(part) <= width:
            lines[-1] += f", {part}"
        else:
            lines[-1:] = [lines[-1] + ",", part] if lines else [part]
    return lines or [""]


def _format_overview(stats: dict[str, Any]) -> str:
    c, meta, t = stats["counts"], stats.get("meta", {}), stats["time"]
    title = f"Dataset: {meta.get('source', '?')}"
    if meta.get("content_hash"):
        title += f"  (hash {meta['content_hash']})"
    splits = "   ".join(f"{s} {_num(n)}" for s, n in c["per_split"].items())
    split_users = "   ".join(f"{s} {_num(n)}" for s, n in c["users_per_split"].items())
    numbers = [_num(c["users"]), _num(c["items"]), _num(c["interactions"])]
    w = max(map(len, numbers))
    rows = [
        ("users", f"{numbers[0]:>{w}}"),
        ("items", f"{numbers[1]:>{w}}"),
        ("interactions", f"{numbers[2]:>{w}}   {splits}"),
        ("users in split", split_users),
        ("density", _pct(c["density"])),
    ]
    if c.get("duplicate_pairs"):
        rows.append(("duplicate pairs", _num(c["duplicate_pairs"])))
    if t.get("first"):
        rows.append(("time span", f"{t['first']} .. {t['last']}  ({_num(t['span_days'])} days)"))
    rule = meta.get("split") or meta.get("split_rule")
    if rule:
        ratios = meta.get("split_ratios")
        rows.append(("split rule", f"{rule}" + (f"  {ratios}" if ratios else "")))
    if "seed" in meta:
        rows.append(("seed", str(meta["seed"])))
    return "\n".join([title, *_rows(rows)])


def _format_distributions(stats: dict[str, Any]) -> str:
    names = [name for name, _ in QUANTILES]
    table = [
        ("interactions per user", stats["history_length"]),
        ("interactions per item", stats["item_popularity"]),
        ("text length (chars)", stats["content"]["text_chars"]),
    ]
    cells = [[_num(d.get(n)) for n in names] for _, d in table]
    widths = [max(len(n), *(len(row[i]) for row in cells)) for i, n in enumerate(names)]
    label_w = max(len(label) for label, _ in table)
    header = " " * (label_w + 2) + "  ".join(f"{n:>{w}}" for n, w in zip(names, widths))
    lines = ["Distributions", "  " + header]
    for (label, _), row in zip(table, cells):
        lines.append(f"  {label:<{label_w}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(row, widths)))
    pop = stats["item_popularity"]
    rare_key = f"items_under_{RARE_ITEM_COUNT}"
    head = _plural(pop["head_items"], "item")
    lines.append(
        f"  the top {head} ({_pct(HEAD_ITEM_SHARE)} of items) {'holds' if pop['head_items'] == 1 else 'hold'} {_pct(pop['head_share'])} of interactions;"
        f" {_plural(pop[rare_key], 'item')} ({_pct(pop[rare_key + '_share'])}) have < {RARE_ITEM_COUNT}"
    )
    extra = []
    if stats["history_length"].get("users_without_interactions"):
        extra.append(_plural(stats["history_length"]["users_without_interactions"], "user"))
    if pop.get("items_without_interactions"):
        extra.append(_plural(pop["items_without_interactions"], "item"))
    if extra:
        lines.append(f"  without any interaction: {', '.join(extra)}")
    return "\n".join(lines)


def _format_content(stats: dict[str, Any]) -> str:
    content, mods = stats["content"], stats["modalities"]

    def describe(m: str, info: dict[str, Any]) -> str:
        dim = f"d={info['dim']}" if info.get("dim") is not None else "features not loaded"
        return f"{m} ({dim}{', ' + str(info['encoder']) if info.get('encoder') else ''})"

    share = "   ".join(f"{c} {_pct(s)}" for c, s in content["share_with"].items())
    rows = [
        ("modalities", [describe(m, info) for m, info in mods.items()] or "none"),
        ("items with", share),
        ("distinct keywords", _num(content["distinct_keywords"])),
    ]
    if content.get("top_keywords"):
        rows.append(("top keywords", [f"{k} ({_num(v)})" for k, v in content["top_keywords"].items()]))
    return "\n".join(["Content", *_rows(rows)])


def _format_preferences(prefs: dict[str, Any]) -> str:
    rows: list[tuple[str, str | list[str]]] = []
    for col, d in prefs.items():
        if d["kind"] == "numeric":
            rows.append((col, "  ".join(f"{n} {_num(d[n], 3)}" for n, _ in QUANTILES)))
        else:
            rows.append((col, [f"{k} {_num(v)}" for k, v in d["counts"].items()]))
    return "\n".join(["Ground-truth preferences (users)", *_rows(rows)])


def _format_scorer(report: Any) -> str:
    rows = [(k, _num(v, 4)) for k, v in _flatten(report).items()]
    return "\n".join(["Scorer", *_rows(rows)])


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(obj, dict):
        return {prefix or "value": obj}
    out: dict[str, Any] = {}
    for k, v in obj.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


# --------------------------------------------------------------------------------------------------
# Sample grid
# --------------------------------------------------------------------------------------------------

FONT_SIZE = 12
TEXT_LINES = 4  # caption lines under the keywords before "…"
MIN_CELL_WIDTH = 128  # below this a caption line holds only two or three words
PAD = 8  # around the grid, between columns, and between thumbnail and caption
ROW_GAP = 18  # between rows: more than PAD so a caption does not read as the next image's title
LINE_GAP = 2
BACKGROUND = (255, 255, 255)
PLACEHOLDER = (214, 214, 214)
INK = (30, 30, 30)
MUTED = (120, 120, 120)


@dataclass(frozen=True)
class GridLayout:
    """Geometry of the sample grid in pixels: `cols` × `rows` cells of `cell_w` × `cell_h`."""

    cols: int
    rows: int
    thumb: int
    cell_w: int
    cell_h: int
    line_h: int

    @property
    def width(self) -> int:
        return self.cols * self.cell_w + (self.cols + 1) * PAD

    @property
    def height(self) -> int:
        return self.rows * self.cell_h + (self.rows - 1) * ROW_GAP + 2 * PAD

    def origin(self, k: int) -> tuple[int, int]:
        """Top-left corner of the k-th cell (row-major)."""
        r, c = divmod(k, self.cols)
        return PAD + c * (self.cell_w + PAD), PAD + r * (self.cell_h + ROW_GAP)


def grid_layout(n: int, thumb: int, font: ImageFont.FreeTypeFont | None = None) -> GridLayout:
    """A near-square grid for n cells; each holds a thumbnail, an id line, a keyword line and the text."""
    font = font or _font()
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    line_h = _line_height(font)
    caption_lines = 2 + TEXT_LINES  # id line, keywords, text
    cell_h = thumb + PAD // 2 + caption_lines * line_h
    return GridLayout(cols, rows, thumb, max(thumb, MIN_CELL_WIDTH), cell_h, line_h)


def sample_grid(ds: ProcessedDataset, path: str | Path, n: int = 16, seed: int = 0, thumb: int = 96) -> Path:
    """Draw n randomly sampled items (image, keywords, text) into a PNG grid at `path`."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(ds.num_items, size=min(n, ds.num_items), replace=False))
    font = _font()
    layout = grid_layout(len(picked), thumb, font)
    canvas = Image.new("RGB", (layout.width, layout.height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for k, item in enumerate(picked.tolist()):
        _draw_cell(canvas, draw, ds, item, layout.origin(k), layout, font)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")  # the temporary name ends in .tmp, so PIL cannot infer the format
    return path


def _draw_cell(
    canvas: Image.Image,
    draw: ImageDraw.ImageDraw,
    ds: ProcessedDataset,
    item: int,
    origin: tuple[int, int],
    layout: GridLayout,
    font: ImageFont.FreeTypeFont,
) -> None:
    x0, y0 = origin
    thumb = _thumbnail(ds.image_path(item), layout.thumb, font)
    canvas.paste(thumb, (x0, y0))  # left-aligned with the caption under it
    row = ds.items.iloc[item]
    width = layout.cell_w
    y = y0 + layout.thumb + PAD // 2
    draw.text((x0, y), _fit(f"#{item}  {row['item_id']}", font.getlength, width), fill=MUTED, font=font)
    y += layout.line_h
    keywords = str(row["keywords"]) if _is_text(row["keywords"]) else "(no keywords)"
    _bold_text(draw, (x0, y), _fit(keywords, lambda t: _bold_length(t, font), width), font)
    y += layout.line_h
    text = str(row["text"]) if _is_text(row["text"]) else "(no text)"
    for line in _wrap(text, font, width, TEXT_LINES):
        draw.text((x0, y), line, fill=INK, font=font)
        y += layout.line_h


def _thumbnail(image_path: Path | None, size: int, font: ImageFont.FreeTypeFont) -> Image.Image:
    """The item's image fitted into size × size (NEAREST when enlarging), or a grey placeholder."""
    if image_path is None:
        return _placeholder(size, "no image", font)
    try:
        with Image.open(image_path) as im:
            im.load()
            image = _to_rgb(im)
    except (OSError, ValueError):
        # Missing or unreadable files: the grid is a diagnostic, so show the problem instead of failing.
        return _placeholder(size, "unreadable", font)
    scale = size / max(image.size)
    new_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # Tiny generated images (32 px) must stay crisp pixels; large photos shrink smoothly.
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    image = image.resize(new_size, resample)
    cell = Image.new("RGB", (size, size), BACKGROUND)
    cell.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return cell


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB on white, so transparent PNGs do not turn black."""
    if im.mode in ("RGBA", "LA", "P"):
        rgba = im.convert("RGBA")
        flat = Image.new("RGB", rgba.size, BACKGROUND)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return im.convert("RGB")


def _placeholder(size: int, label: str, font: ImageFont.FreeTypeFont) -> Image.Image:
    cell = Image.new("RGB", (size, size), PLACEHOLDER)
    ImageDraw.Draw(cell).text((size / 2, size / 2), label, fill=MUTED, font=font, anchor="mm")
    return cell


def _font() -> ImageFont.FreeTypeFont:
    """Pillow's bundled font (Aileron) at FONT_SIZE.

    Needs FreeType, which every Pillow wheel on PyPI includes; the bitmap fallback font is latin-1 only
    and would fail on "…" or any non-latin item text, so it is not used.
    """
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except (TypeError, ImportError, OSError) as e:
        raise DppmgError(
            f"drawing the sample grid needs Pillow >= 10.1 built with FreeType ({e}); install Pillow from PyPI"
        ) from None


def _line_height(font: ImageFont.FreeTypeFont) -> int:
    top, bottom = font.getbbox("Ag|jy…")[1::2]
    return int(math.ceil(bottom - min(top, 0))) + LINE_GAP


def _bold_text(
    draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, font: ImageFont.FreeTypeFont
) -> None:
    """Fake bold: the bundled font has no bold face, so each word is drawn twice one pixel apart.

    Words are placed one by one with a pixel more between them, because the doubled strokes would
    otherwise swallow the font's narrow spaces ("blue square" reading as "bluesquare").
    """
    x, y = xy
    gap = font.getlength(" ") + 2
    for word in text.split(" "):
        draw.text((x, y), word, fill=INK, font=font)
        draw.text((x + 1, y), word, fill=INK, font=font)
        x += font.getlength(word) + gap


def _bold_length(text: str, font: ImageFont.FreeTypeFont) -> float:
    """Width of `text` as `_bold_text` draws it."""
    return font.getlength(text) + 1 + 2 * text.count(" ")


def _is_text(value: Any) -> bool:
    return (
        value is not None
        and not (isinstance(value, float) and math.isnan(value))
        and bool(str(value).strip())
    )


def _fit(text: str, measure: Callable[[str], float], width: int) -> str:
    """`text` cut to fit `width` pixels as measured by `measure`, ending in "…" when cut."""
    return text if measure(text) <= width else _ellipsis(text, measure, width)


def _ellipsis(line: str, measure: Callable[[str], float], width: int) -> str:
    """`line` + "…", with characters cut from the end until it fits `width` pixels."""
    while line and measure(line.rstrip() + "…") > width:
        line = line[:-1]
    return line.rstrip() + "…"


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap by pixel width, at most `max_lines`; the last line ends in "…" when text was cut."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
            continue
        # A word wider than a whole line (URLs, long ids) is broken into pieces that fit.
        while font.getlength(word) > width and len(lines) <= max_lines:
            cut = _longest_prefix(word, font, width)
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
        if len(lines) > max_lines:
            return lines[: max_lines - 1] + [_ellipsis(lines[max_lines - 1], font.getlength, width)]
    return lines


def _longest_prefix(word: str, font: ImageFont.FreeTypeFont, width: int) -> int:
    """Length of the longest prefix of `word` within `width` pixels (at least one character)."""
    cut = 1
    while cut < len(word) and font.getlength(word[: cut + 1]) <= width:
        cut += 1
    return cut


# --------------------------------------------------------------------------------------------------
# Both outputs
# --------------------------------------------------------------------------------------------------


def write_stats(
    ds: ProcessedDataset, out_dir: str | Path, n_samples: int = 16, seed: int = 0
) -> dict[str, Any]:
    """Write `stats.json` and `sample_items.png` into out_dir; return the statistics."""
    out_dir = Path(out_dir)
    stats = dataset_stats(ds)
    write_json(out_dir / "stats.json", stats)
    if ds.num_items:
        sample_grid(ds, out_dir / "sample_items.png", n=n_samples, seed=seed)
    return stats
