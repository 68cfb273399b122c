"""Source loaders: each reads one source format into a `RawDataset` (see dppmg/data/raw.py).

`load_source` dispatches on `cfg.source`. The helpers below are shared by the loaders: locating
files with errors that say what was expected, reading JSONL in blocks with line numbers in the
errors, matching item ids to image files, and turning timestamps into int64 seconds.
"""

from __future__ import annotations

import difflib
import gzip
import importlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.json as pa_json
from tqdm.auto import tqdm

from dppmg.config import DataConfig
from dppmg.data.raw import RawDataset
from dppmg.errors import DppmgError

# source name -> (module, function); imported on demand so that `import dppmg.data.loaders` stays cheap.
_LOADERS: dict[str, tuple[str, str]] = {
    "movielens": ("dppmg.data.loaders.movielens", "load_movielens"),
    "amazon2023": ("dppmg.data.loaders.amazon", "load_amazon2023"),
    "mmrec": ("dppmg.data.loaders.mmrec", "load_mmrec"),
    "custom": ("dppmg.data.loaders.custom", "load_custom"),
}
SOURCES = ("synthetic", *_LOADERS)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
JSONL_BLOCK_LINES = 100_000  # lines parsed per block: bounded memory on multi-GB review files


def load_source(cfg: DataConfig, seed: int) -> RawDataset:
    """Read the source named by `cfg.source` (the synthetic world is generated from `seed`)."""
    if cfg.source == "synthetic":
        from dppmg.data.synthetic import generate_world

        return generate_world(cfg.synthetic, seed)
    if cfg.source not in _LOADERS:
        raise DppmgError(f"data.source={cfg.source!r} is not one of: {', '.join(SOURCES)}")
    module, function = _LOADERS[cfg.source]
    return getattr(importlib.import_module(module), function)(cfg)


# ----------------------------------------------------------------------------------------------
# Locating files


def require_raw_dir(cfg: DataConfig, expected: str) -> Path:
    """`cfg.raw_dir` as a Path; an error naming it and `expected` (what should be inside) if absent."""
    if cfg.raw_dir is None:
        raise DppmgError(
            f"data.raw_dir is not set for data.source={cfg.source!r}; expected a folder with {expected}"
        )
    raw_dir = Path(cfg.raw_dir)
    if not raw_dir.is_dir():
        raise DppmgError(f"data.raw_dir {raw_dir} does not exist; expected a folder with {expected}")
    return raw_dir


def require_file(path: Path, expected: str) -> Path:
    if not path.is_file():
        raise DppmgError(f"{path} not found; expected {expected}")
    return path


def list_dir(folder: Path) -> str:
    """The folder's file names, for error messages."""
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names[:30]) + (f", ... ({len(names)} in all)" if len(names) > 30 else "") or "(empty)"


def open_text(path: Path, encoding: str = "utf-8") -> IO[str]:
    """Open a text file, transparently gunzipping `*.gz`."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding=encoding)
    return open(path, encoding=encoding)


# ----------------------------------------------------------------------------------------------
# JSONL


def iter_jsonl_blocks(
    path: Path, columns: list[str] | None = None, block_lines: int = JSONL_BLOCK_LINES
) -> Iterator[pd.DataFrame]:
    """Yield DataFrames of up to `block_lines` records from a JSONL file (optionally gzipped).

    `columns` keeps only those fields (absent ones become missing values); None keeps every field.
    Values are kept as JSON gives them: no type guessing, so ids like "0446310786" stay strings.
    A line that is not a JSON object is an error naming the file and its line number.
    """
    rows: list[dict[str, Any]] = []
    line_no = 0
    try:
        f = open_text(path)
        lines = enumerate(f, start=1)
    except OSError as e:
        raise DppmgError(f"{path}: cannot open: {e}") from None
    with f:
        while True:
            try:
                line_no, line = next(lines)
            except StopIteration:
                break
            except UnicodeDecodeError:
                raise DppmgError(not_utf8(path)) from None
            except (OSError, EOFError) as e:  # a truncated .gz, a binary file
                raise DppmgError(
                    f"{path}: cannot read past line {line_no}: {type(e).__name__}: {e}"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DppmgError(
                    f"{path}: line {line_no} is not valid JSON ({e.msg}): {line[:80].strip()!r}"
                ) from None
            if not isinstance(record, dict):
                raise DppmgError(f"{path}: line {line_no} is not a JSON object: {line[:80].strip()!r}")
            rows.append(record if columns is None else {c: record.get(c) for c in columns})
            if len(rows) >= block_lines:
                yield _frame(rows, columns)
                rows = []
    if rows:
        yield _frame(rows, columns)


def read_jsonl(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """A whole JSONL file as one DataFrame (see `iter_jsonl_blocks`), with a progress bar on a terminal."""
    blocks = []
    with tqdm(desc=f"reading {path.name}", unit=" lines", unit_scale=True, disable=None) as bar:
        for block in iter_jsonl_blocks(path, columns):
            blocks.append(block)
            bar.update(len(block))
    if not blocks:
        return pd.DataFrame(columns=columns or [])
    return pd.concat(blocks, ignore_index=True) if len(blocks) > 1 else blocks[0]


def read_jsonl_fields(path: Path, fields: dict[str, pa.DataType]) -> pd.DataFrame:
    """Only `fields` of a JSONL file (optionally gzipped), typed as given; absent fields are null.

    Fast path: pyarrow's multi-threaded JSON reader (~6x the line-by-line one), which materialises only
    these fields. Any problem it meets (a malformed line, a field of another type) sends the file
    through `read_jsonl` instead, which tolerates type variations and names the line of a real error.
    """
    options = pa_json.ParseOptions(
        explicit_schema=pa.schema(list(fields.items())), unexpected_field_behavior="ignore"
    )
    try:
        table = pa_json.read_json(path, parse_options=options)
    except (pa.ArrowInvalid, OSError):
        return read_jsonl(path, list(fields))
    return table.to_pandas()


def _frame(rows: list[dict[str, Any]], columns: list[str] | None) -> pd.DataFrame:
    return pd.DataFrame.from_records(rows, columns=columns)


# ----------------------------------------------------------------------------------------------
# CSV and tab-separated files


def read_csv(path: Path, expected: str, **kwargs: Any) -> pd.DataFrame:
    """`pd.read_csv(path, **kwargs)`, its failures as errors naming the file, the line and `expected` (the layout).

    pandas reports a row with too many fields as a tokenizer error and bytes that are not UTF-8 as a bare codec
    error; both become one sentence a user can act on.
    """
    try:
        return pd.read_csv(path, **kwargs)
    except pd.errors.ParserError as e:
        found = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(e))
        if found is None:
            raise DppmgError(f"{path}: not a well-formed table ({_first_line(e)}); expected {expected}") from None
        want, line, saw = found.groups()
        raise DppmgError(
            f"{path}: line {line} has {saw} fields where the first line has {want} (a stray separator, or a "
            f"value with a separator in it that is not quoted?); expected {expected}"
        ) from None
    except UnicodeDecodeError:  # before ValueError, its base class
        raise DppmgError(not_utf8(path, kwargs.get("encoding") or "utf-8")) from None
    except (pa.ArrowInvalid, ValueError) as e:  # a value that does not convert to the dtype asked for
        raise DppmgError(f"{path}: {_first_line(e)}; expected {expected}") from None


def not_utf8(path: Path, encoding: str = "utf-8") -> str:
    """The message for a file that does not decode: its first bad line and byte (read again, line by line)."""
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            try:
                line.decode(encoding)
            except UnicodeDecodeError as e:
                return (
                    f"{path}: line {line_no} is not {encoding} text (byte 0x{line[e.start]:02x} at column "
                    f"{e.start + 1}; latin-1 or cp1252, perhaps?): save the file as UTF-8"
                )
    return f"{path}: not {encoding} text: save the file as UTF-8"


def _first_line(e: BaseException) -> str:
    return str(e).strip().split("\n")[0]


# ----------------------------------------------------------------------------------------------
# Tables and values


def require_columns(
    frame: pd.DataFrame, required: tuple[str, ...], path: Path, optional: tuple[str, ...] = ()
) -> None:
    """An error naming the file, the missing columns and the expected ones."""
    missing = [c for c in required if c not in frame.columns]
    if missing:
        expected = list(required) + [f"{c} (optional)" for c in optional]
        raise DppmgError(
            f"{path}: missing column(s) {missing}{did_you_mean(missing, frame.columns)}; expected columns "
            f"{expected}, found {list(frame.columns)}"
        )


def did_you_mean(wanted: list[str], present: Any) -> str:
    """' (did you mean ...?)' naming, for each of `wanted`, the closest of `present` (difflib), or ''."""
    pairs = []
    for w in wanted:
        close = difflib.get_close_matches(w, [str(p) for p in present], n=1, cutoff=0.6)
        if close:
            pairs.append(f"{close[0]!r} for {w!r}")
    return f" (did you mean {', '.join(pairs)}?)" if pairs else ""


def to_numbers(values: pd.Series, path: Path, column: str, row: str = "data row", row_offset: int = 1) -> pd.Series:
    """`values` as float64; missing values stay NaN, anything else that is not a number names its first row."""
    numbers = pd.to_numeric(values, errors="coerce")
    bad = (numbers.isna() & values.notna()).to_numpy()
    if bad.any():
        pos = int(np.flatnonzero(bad)[0])
        raise DppmgError(f"{path}: {row} {pos + row_offset}: {column} {values.iat[pos]!r} is not a number")
    return numbers.astype(np.float64)


def ids_to_str(values: pd.Series) -> pd.Series:
    """Ids as strings; integral floats (JSON 12.0, or a CSV column with gaps) lose their '.0'."""
    if values.dtype.kind == "f" and np.all(np.isnan(values) | (values == np.round(values))):
        values = values.astype("Int64")
    return values.astype("str")


def to_seconds(
    values: pd.Series, path: Path, column: str = "timestamp", row_offset: int = 1, row: str = "data row"
) -> np.ndarray:
    """int64 seconds from integer seconds or ISO-8601 date strings; an error names the first bad row.

    `row_offset` turns a 0-based position into the row number shown to the user (1 = first data row), and `row`
    is what the file calls a row ("line", "review number").
    """
    numeric = pd.to_numeric(values, errors="coerce")
    bad = numeric.isna().to_numpy()
    seconds = np.zeros(len(values), dtype=np.int64)
    seconds[~bad] = numeric.to_numpy()[~bad].astype(np.int64)
    if bad.any():
        # Not numbers: parse as dates (ISO 8601; no zone means UTC), then count seconds since the epoch.
        dates = pd.to_datetime(values[bad], format="ISO8601", utc=True, errors="coerce")
        unparsed = dates.isna().to_numpy()
        if unparsed.any():
            pos = int(np.flatnonzero(bad)[np.flatnonzero(unparsed)[0]])
            raise DppmgError(
                f"{path}: {row} {pos + row_offset}: {column} {values.iat[pos]!r} is neither an integer "
                "(seconds since 1970) nor an ISO-8601 date"
            )
        seconds[bad] = (dates - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    return seconds


def normalise_space(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def truncate_words(text: str, max_chars: int) -> str:
    """At most `max_chars`, cut at a space where one is near the end, marked with an ellipsis."""
    if len(text) <= max_chars:
        return text
    cut = text[: max_chars - 1]
    space = cut.rfind(" ")
    return (cut[:space] if space > max_chars // 2 else cut).rstrip(" ,;.") + "\u2026"


# ----------------------------------------------------------------------------------------------
# Images


def resolve_images_dir(cfg: DataConfig) -> Path | None:
    """`cfg.images_dir` resolved against raw_dir; an error if it is set but missing."""
    folder = cfg.raw_path(cfg.images_dir)
    if folder is not None and not folder.is_dir():
        raise DppmgError(f"data.images_dir {folder} does not exist; expected a folder of item images")
    return folder


def match_images(item_ids: pd.Series, folder: Path | None) -> pd.Series:
    """Per item, the path of `<folder>/<item_id>.<ext>` for a common image extension, else None.

    The folder is listed once (no per-item stat calls, which are slow on network file systems).
    """
    if folder is None:
        return pd.Series([None] * len(item_ids), index=item_ids.index, dtype="object")
    by_stem: dict[str, str] = {}
    for entry in sorted(folder.iterdir()):
        if entry.suffix.lower() in IMAGE_EXTENSIONS and entry.stem not in by_stem:
            by_stem[entry.stem] = str(entry)
    return pd.Series([by_stem.get(i) for i in item_ids], index=item_ids.index, dtype="object")
