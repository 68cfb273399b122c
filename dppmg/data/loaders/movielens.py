"""MovieLens, in any of its three file layouts, detected from the files in `data.raw_dir`.

    csv   ratings.csv + movies.csv (+ tags.csv, links.csv)   ml-latest, ml-latest-small, ml-20m, ml-25m, ml-32m
    100k  u.data + u.item (+ u.genre)                          ml-100k
    dat   ratings.dat + movies.dat                             ml-1m, ml-10m

Item text is "Title (year). Genres: A, B. Tags: x, y." (tags only in the csv layout), keywords are the
lower-case genres, and posters come from `data.images_dir` as `<movieId>.<jpg|jpeg|png|webp>`.
Ratings are read with pandas' vectorised readers (pyarrow when available): ml-25m's 25M ratings take
seconds, not minutes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from dppmg.config import DataConfig
from dppmg.data.loaders import (
    list_dir,
    match_images,
    read_csv,
    require_columns,
    require_raw_dir,
    resolve_images_dir,
    to_numbers,
    to_seconds,
)
from dppmg.data.raw import RawDataset
from dppmg.errors import DppmgError

LAYOUTS = {
    "csv": ("ratings.csv", "movies.csv"),
    "100k": ("u.data", "u.item"),
    "dat": ("ratings.dat", "movies.dat"),
}
# ml-100k's genre columns, in file order, for copies that lack u.genre.
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
NO_GENRES = ("(no genres listed)", "unknown")  # what MovieLens writes for a movie without genres
DEFAULT_KEYWORD = "movie"
RATING_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]


def detect_layout(raw_dir: Path) -> str:
    for layout, files in LAYOUTS.items():
        if all((raw_dir / f).is_file() for f in files):
            return layout
    expected = "; or ".join(" + ".join(files) for files in LAYOUTS.values())
    raise DppmgError(f"{raw_dir}: no MovieLens layout found; expected {expected}. Found: {list_dir(raw_dir)}")


def load_movielens(cfg: DataConfig) -> RawDataset:
    raw_dir = require_raw_dir(
        cfg, "MovieLens files (ratings.csv + movies.csv, u.data + u.item, or ratings.dat + movies.dat)"
    )
    layout = detect_layout(raw_dir)
    ratings_file, movies_file = (raw_dir / f for f in LAYOUTS[layout])
    if layout == "csv":
        ratings = _read_ratings_csv(ratings_file)
        movies = _read_movies_csv(movies_file)
        tags = _read_top_tags(raw_dir / "tags.csv", cfg.max_tags)
    elif layout == "100k":
        ratings = _read_ratings_100k(ratings_file)
        movies = _read_movies_100k(movies_file, raw_dir / "u.genre")
        tags = None
    else:
        ratings = _read_ratings_dat(ratings_file)
        movies = _read_movies_dat(movies_file)
        tags = None
    items = _items(movies, tags, resolve_images_dir(cfg))
    info = {
        "layout": layout,
        "interactions_file": str(ratings_file),
        "items_file": str(movies_file),
        "tags": tags is not None,
    }
    return RawDataset(source="movielens", items=items, interactions=ratings, info=info)


# ----------------------------------------------------------------------------------------------
# Ratings: one vectorised read each, ids as strings, timestamps as int64 seconds.


ML_RATINGS = "userId,movieId,rating,timestamp with a header line, a number in each of the last two"


def _read_ratings_csv(path: Path) -> pd.DataFrame:
    try:
        frame = read_csv(
            path,
            ML_RATINGS,
            engine="pyarrow",  # multi-threaded; ~10x the C engine on ml-25m
            dtype={"userId": "str", "movieId": "str", "rating": "float32", "timestamp": "int64"},
        )
    except DppmgError:
        # pyarrow does not say which row failed to convert: read the text again to name it (errors only).
        text = read_csv(path, ML_RATINGS, dtype="str")
        require_columns(text, ("userId", "movieId", "rating", "timestamp"), path)
        to_numbers(text["rating"], path, "rating")
        to_numbers(text["timestamp"], path, "timestamp")
        raise
    require_columns(frame, ("userId", "movieId", "rating", "timestamp"), path)
    frame.columns = [{"userId": "user_id", "movieId": "item_id"}.get(c, c) for c in frame.columns]
    return frame[RATING_COLUMNS]


ML100K_RATINGS = "4 tab-separated fields per line, no header: user id, item id, rating, timestamp (seconds)"
ML1M_RATINGS = "UserID::MovieID::Rating::Timestamp on every line, no header"


def _read_ratings_100k(path: Path) -> pd.DataFrame:
    # Read as text and convert after, so that a bad value is an error naming its line (100k lines: no cost).
    frame = read_csv(path, ML100K_RATINGS, sep="\t", header=None, names=RATING_COLUMNS, dtype="str")
    return _typed_ratings(frame, path, ML100K_RATINGS)


def _read_ratings_dat(path: Path) -> pd.DataFrame:
    # "1::1193::5::978300760": a two-character separator would need pandas' slow python engine, so
    # split on ":" with the C engine and keep every other field (the empty ones sit between the colons).
    read = {"sep": ":", "header": None, "usecols": [0, 2, 4, 6], "encoding": "latin-1"}
    try:
        frame = read_csv(path, ML1M_RATINGS, dtype={0: "str", 2: "str", 4: "float32", 6: "int64"}, **read)
    except DppmgError:
        # The typed read does not say which line failed (ml-10m has 10M): read the text again to name it.
        text = read_csv(path, ML1M_RATINGS, dtype="str", **read)
        text.columns = RATING_COLUMNS
        _typed_ratings(text, path, ML1M_RATINGS)
        raise
    frame.columns = RATING_COLUMNS
    return frame


def _typed_ratings(frame: pd.DataFrame, path: Path, expected: str) -> pd.DataFrame:
    """Ratings read as text (RATING_COLUMNS, no header) with float32 ratings and int64 seconds; errors name the line."""
    short = frame.isna().to_numpy().any(axis=1)
    if short.any():
        row = int(np.flatnonzero(short)[0])
        fields = int(frame.iloc[row].notna().sum())
        raise DppmgError(f"{path}: line {row + 1} has {fields} field(s); expected {expected}")
    try:
        rating = to_numbers(frame["rating"], path, "rating", row="line")
        timestamp = to_seconds(frame["timestamp"], path, row="line")
    except DppmgError as e:
        first = frame.iloc[0].tolist()
        if not any(v.replace(".", "", 1).isdigit() for v in first[2:]):  # "user_id  item_id  rating  timestamp"
            raise DppmgError(f"{path}: line 1 looks like a header line {first}; expected {expected}") from None
        raise DppmgError(f"{e}; expected {expected}") from None
    return frame.assign(rating=rating.astype(np.float32), timestamp=timestamp)


# ----------------------------------------------------------------------------------------------
# Movies: item_id, title, genres (a list of names).


def _read_movies_csv(path: Path) -> pd.DataFrame:
    frame = read_csv(
        path,
        "movieId,title,genres with a header line (titles with a comma in double quotes)",
        dtype={"movieId": "str", "title": "str", "genres": "str"},
        keep_default_na=False,
    )
    require_columns(frame, ("movieId", "title", "genres"), path)
    return pd.DataFrame(
        {"item_id": frame["movieId"], "title": frame["title"], "genres": frame["genres"].str.split("|")}
    )


def _read_movies_100k(path: Path, genre_file: Path) -> pd.DataFrame:
    genres = ML100K_GENRES
    if genre_file.is_file():
        # "Action|1": name and column number; the file ends with blank lines.
        pairs = [
            line.split("|") for line in genre_file.read_text(encoding="latin-1").splitlines() if "|" in line
        ]
        genres = tuple(name for name, _ in sorted(pairs, key=lambda p: int(p[1])))
    n_fixed = 5  # movie id | title | release date | video release date | IMDb URL
    frame = pd.read_csv(
        path, sep="|", header=None, encoding="latin-1", dtype={0: "str", 1: "str"}, keep_default_na=False
    )
    if frame.shape[1] != n_fixed + len(genres):
        raise DppmgError(
            f"{path}: expected {n_fixed + len(genres)} '|'-separated columns "
            f"(id, title, release date, video date, URL, {len(genres)} genre flags), found {frame.shape[1]}"
        )
    flags = frame.iloc[:, n_fixed:].to_numpy(dtype=bool)  # [movies, genres]
    names = np.array(genres, dtype=object)
    return pd.DataFrame(
        {"item_id": frame[0], "title": frame[1], "genres": [list(names[row]) for row in flags]}
    )


def _read_movies_dat(path: Path) -> pd.DataFrame:
    # Titles contain ":" ("Star Wars: Episode IV"), so split each line on "::" (a few thousand lines).
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="latin-1").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("::")
        if len(parts) != 3:
            raise DppmgError(f"{path}: line {line_no}: expected MovieID::Title::Genres, got {line[:80]!r}")
        rows.append((parts[0], parts[1], parts[2].split("|")))
    return pd.DataFrame(rows, columns=["item_id", "title", "genres"])


def _read_top_tags(path: Path, max_tags: int) -> pd.Series | None:
    """movieId -> "tag1, tag2": each movie's most frequent tags, lower-cased, at most `max_tags`."""
    if not path.is_file() or max_tags == 0:
        return None
    tags = pd.read_csv(path, usecols=["movieId", "tag"], dtype={"movieId": "str", "tag": "str"})
    tags["tag"] = tags["tag"].str.strip().str.lower()  # "Pixar" and "pixar " are one tag
    tags = tags[tags["tag"].notna() & (tags["tag"] != "")]
    counts = tags.groupby(["movieId", "tag"], sort=False).size().rename("n").reset_index()
    # Most frequent first; ties alphabetical so the text does not depend on the file's row order.
    counts = counts.sort_values(["movieId", "n", "tag"], ascending=[True, False, True], kind="stable")
    top = counts[counts.groupby("movieId").cumcount() < max_tags]
    return top.groupby("movieId", sort=False)["tag"].agg(", ".join)


def _items(movies: pd.DataFrame, tags: pd.Series | None, images_dir: Path | None) -> pd.DataFrame:
    genres = [[g for g in gs if g and g not in NO_GENRES] for gs in movies["genres"]]
    tag_text = movies["item_id"].map(tags) if tags is not None else pd.Series([None] * len(movies))
    texts = [
        _text(title, gs, tag)
        for title, gs, tag in zip(movies["title"], genres, tag_text.tolist(), strict=True)
    ]
    keywords = [", ".join(g.lower() for g in gs) if gs else DEFAULT_KEYWORD for gs in genres]
    return pd.DataFrame(
        {
            "item_id": movies["item_id"].astype("str"),
            "text": texts,
            "keywords": keywords,
            "image": match_images(movies["item_id"], images_dir),
        }
    )


def _text(title: str, genres: list[str], tags: str | None) -> str:
    parts = [title.strip()]
    if genres:
        parts.append("Genres: " + ", ".join(genres))
    if isinstance(tags, str) and tags:
        parts.append("Tags: " + tags)
    return ". ".join(parts) + "."
