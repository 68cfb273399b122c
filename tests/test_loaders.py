"""Source loaders on tiny fixture files written into tmp_path."""

from __future__ import annotations

import gzip
import json
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dppmg.config import DataConfig
from dppmg.data.loaders import load_source
from dppmg.data.raw import RawDataset
from dppmg.errors import DppmgError


def _cfg(source: str, raw_dir: Path, **kw) -> DataConfig:
    return DataConfig(source=source, raw_dir=str(raw_dir), **kw)


def _check_common(raw: RawDataset) -> None:
    """What every loader promises (dppmg/data/raw.py)."""
    for col in ("item_id", "text", "keywords", "image"):
        assert col in raw.items
    for col in ("user_id", "item_id", "timestamp"):
        assert col in raw.interactions
    assert raw.interactions["timestamp"].dtype == np.int64
    assert all(isinstance(v, str) for v in raw.items["item_id"])
    assert all(isinstance(v, str) for v in raw.interactions["user_id"])
    assert all(isinstance(v, str) for v in raw.interactions["item_id"])


# ----------------------------------------------------------------------------------------------
# MovieLens


def _write_ml_csv(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,2,3.5,964981247\n2,1,5.0,964982224\n2,3,1.0,964983815\n"
    )
    (folder / "movies.csv").write_text(
        "movieId,title,genres\n"
        "1,Toy Story (1995),Adventure|Animation|Children\n"
        '2,"American President, The (1995)",Comedy|Drama|Romance\n'
        "3,Unknown Film (2001),(no genres listed)\n"
    )
    (folder / "tags.csv").write_text(
        "userId,movieId,tag,timestamp\n"
        "1,1,Pixar,1\n2,1,pixar ,2\n3,1,fun,3\n1,1,toys,4\n4,1,Fun,5\n5,1,pixar,6\n1,2,politics,7\n"
    )


def test_movielens_csv_layout(tmp_path: Path) -> None:
    _write_ml_csv(tmp_path)
    posters = tmp_path / "posters"
    posters.mkdir()
    (posters / "1.jpg").write_bytes(b"not checked by the loader")
    (posters / "notes.txt").write_text("ignored: not an image extension")
    raw = load_source(_cfg("movielens", tmp_path, images_dir="posters", max_tags=2), seed=0)
    _check_common(raw)
    assert raw.info["layout"] == "csv"
    assert list(raw.items["item_id"]) == ["1", "2", "3"]
    # Tags: de-duplicated case-insensitively, most frequent first, at most max_tags.
    assert (
        raw.items["text"][0] == "Toy Story (1995). Genres: Adventure, Animation, Children. Tags: pixar, fun."
    )
    assert (
        raw.items["text"][1]
        == "American President, The (1995). Genres: Comedy, Drama, Romance. Tags: politics."
    )
    assert raw.items["text"][2] == "Unknown Film (2001)."
    assert list(raw.items["keywords"]) == [
        "adventure, animation, children",
        "comedy, drama, romance",
        "movie",
    ]
    assert raw.items["image"][0] == str(posters / "1.jpg")
    assert raw.items["image"][1] is None and raw.items["image"][2] is None
    assert len(raw.interactions) == 4
    assert raw.interactions["rating"].tolist() == [4.0, 3.5, 5.0, 1.0]
    assert raw.interactions["timestamp"].iloc[0] == 964982703


def test_movielens_100k_layout(tmp_path: Path) -> None:
    (tmp_path / "u.data").write_text(
        "196\t242\t3\t881250949\n186\t302\t3\t891717742\n196\t302\t4\t881251000\n"
    )
    flags_242 = ["0"] * 19
    flags_242[5] = "1"  # Comedy
    flags_302 = ["0"] * 19
    flags_302[6], flags_302[16] = "1", "1"  # Crime, Thriller
    lines = [
        "242|Kolya (1996)|24-Jan-1997||http://us.imdb.com/x|" + "|".join(flags_242),
        "302|L.A. Confidential (1997)|01-Jan-1997||http://us.imdb.com/y|" + "|".join(flags_302),
        "303|Café (1997)|01-Jan-1997||http://us.imdb.com/z|" + "|".join(["1"] + ["0"] * 18),  # only "unknown"
    ]
    (tmp_path / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    raw = load_source(_cfg("movielens", tmp_path), seed=0)
    _check_common(raw)
    assert raw.info["layout"] == "100k"
    assert raw.items["text"].tolist() == [
        "Kolya (1996). Genres: Comedy.",
        "L.A. Confidential (1997). Genres: Crime, Thriller.",
        "Café (1997).",
    ]
    assert raw.items["keywords"].tolist() == ["comedy", "crime, thriller", "movie"]
    assert raw.interactions["user_id"].tolist() == ["196", "186", "196"]
    # u.genre, when present, names the columns.
    genre_names = ["g" + str(k) for k in range(19)]
    (tmp_path / "u.genre").write_text("".join(f"{g}|{k}\n" for k, g in enumerate(genre_names)) + "\n")
    raw = load_source(_cfg("movielens", tmp_path), seed=0)
    assert raw.items["keywords"][1] == "g6, g16"


def test_movielens_1m_layout(tmp_path: Path) -> None:
    (tmp_path / "ratings.dat").write_text(
        "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n"
    )
    (tmp_path / "movies.dat").write_bytes(
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n661::Star Wars: Episode IV (1977)::Action|Sci-Fi\n".encode(
            "latin-1"
        )
    )
    raw = load_source(_cfg("movielens", tmp_path), seed=0)
    _check_common(raw)
    assert raw.info["layout"] == "dat"
    assert raw.items["item_id"].tolist() == ["1193", "661"]
    assert raw.items["text"][1] == "Star Wars: Episode IV (1977). Genres: Action, Sci-Fi."
    assert raw.interactions[["user_id", "item_id"]].values.tolist() == [
        ["1", "1193"],
        ["1", "661"],
        ["2", "1193"],
    ]
    assert raw.interactions["rating"].tolist() == [5.0, 3.0, 4.0]
    assert raw.interactions["timestamp"].tolist() == [978300760, 978302109, 978298413]


def test_movielens_errors(tmp_path: Path) -> None:
    with pytest.raises(DppmgError, match=r"nowhere.*does not exist.*ratings.csv"):
        load_source(_cfg("movielens", tmp_path / "nowhere"), seed=0)
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(DppmgError, match=r"no MovieLens layout.*u.data \+ u.item.*readme.txt"):
        load_source(_cfg("movielens", tmp_path), seed=0)
    _write_ml_csv(tmp_path)
    (tmp_path / "ratings.csv").write_text("userId,movieId,timestamp\n1,1,964982703\n")
    with pytest.raises(DppmgError, match=r"ratings.csv: missing column\(s\) \['rating'\]"):
        load_source(_cfg("movielens", tmp_path), seed=0)


# The real ml-latest-small, beside the repository in ../shared/data (not part of the repository).
ML_LATEST_SMALL = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small"


@pytest.mark.realdata
def test_movielens_latest_small_counts() -> None:
    if not (ML_LATEST_SMALL / "ratings.csv").is_file():
        pytest.skip(f"{ML_LATEST_SMALL} is absent")
    raw = load_source(_cfg("movielens", ML_LATEST_SMALL), seed=0)
    _check_common(raw)
    assert len(raw.items) == 9742
    assert len(raw.interactions) == 100836
    assert raw.interactions["user_id"].nunique() == 610
    assert raw.items["text"][0].startswith(
        "Toy Story (1995). Genres: Adventure, Animation, Children, Comedy, Fantasy."
    )
    assert "Tags: pixar" in raw.items["text"][0]


# ----------------------------------------------------------------------------------------------
# Amazon Reviews 2023


def _write_jsonl_gz(path: Path, records: list[dict]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


META = [
    {
        "parent_asin": "0446310786",  # looks like a number: must stay a string with its leading zero
        "title": "To Kill a  Mockingbird",
        "features": ["Paperback", "  Classic\nnovel "],
        "description": ["A story of", "justice."],
        "categories": ["Books", "Literature & Fiction", "Classics"],
        "main_category": "Books",
        "images": [{"large": "https://example.invalid/a.jpg"}],
    },
    {"parent_asin": "B00X", "title": "Soft Baby Blanket Extra Large Fleece", "features": [], "description": [],
     "categories": [], "main_category": "Baby"},
    {"parent_asin": "B00Y", "title": "Plain Mug With Handle Large Size", "features": None, "description": None,
     "categories": [], "main_category": None},
]  # fmt: skip
REVIEWS = [
    {"rating": 5.0, "title": "great", "text": "loved it", "asin": "0446310786", "parent_asin": "0446310786",
     "user_id": "AE1", "timestamp": 1588687728923, "verified_purchase": True},
    {"rating": 2.0, "title": "meh", "text": "", "asin": "B00X1", "parent_asin": "B00X",
     "user_id": "AE2", "timestamp": 1588687729000, "verified_purchase": False},
]  # fmt: skip


def test_amazon2023_gzipped_autodetect(tmp_path: Path) -> None:
    _write_jsonl_gz(tmp_path / "meta_Books.jsonl.gz", META)
    _write_jsonl_gz(tmp_path / "Books.jsonl.gz", REVIEWS)
    images = tmp_path / "img"
    images.mkdir()
    (images / "B00X.png").write_bytes(b"x")
    raw = load_source(_cfg("amazon2023", tmp_path, images_dir=str(images)), seed=0)
    _check_common(raw)
    assert raw.items["item_id"].tolist() == ["0446310786", "B00X", "B00Y"]
    assert raw.items["text"][0] == "To Kill a Mockingbird Paperback Classic novel A story of justice."
    # keywords: most specific category, else main category, else the title's first words.
    assert raw.items["keywords"].tolist() == ["Classics", "Baby", "Plain Mug With Handle Large"]
    assert raw.items["image"].tolist() == [None, str(images / "B00X.png"), None]
    assert raw.interactions["item_id"].tolist() == ["0446310786", "B00X"]
    assert raw.interactions["timestamp"].tolist() == [1588687728, 1588687729]  # milliseconds -> seconds
    assert raw.interactions["rating"].tolist() == [5.0, 2.0]
    assert raw.info["interactions_file"].endswith("Books.jsonl.gz")


def test_amazon2023_long_text_is_truncated(tmp_path: Path) -> None:
    long = dict(META[1], description=["word " * 2000])
    (tmp_path / "meta_X.jsonl").write_text(json.dumps(long) + "\n")
    (tmp_path / "X.jsonl").write_text(json.dumps(REVIEWS[1]) + "\n")
    raw = load_source(_cfg("amazon2023", tmp_path), seed=0)
    assert 1000 < len(raw.items["text"][0]) <= 2000


def test_amazon2023_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    _write_jsonl_gz(tmp_path / "meta_Books.jsonl.gz", META)
    lines = [json.dumps(r) for r in REVIEWS] + ['{"rating": 4.0, "user_id": "AE3", ']
    (tmp_path / "Books.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DppmgError, match=r"Books.jsonl: line 3 is not valid JSON"):
        load_source(_cfg("amazon2023", tmp_path), seed=0)


def test_amazon2023_truncated_gzip(tmp_path: Path) -> None:
    _write_jsonl_gz(tmp_path / "meta_Books.jsonl.gz", META)
    _write_jsonl_gz(tmp_path / "Books.jsonl.gz", REVIEWS * 50)
    data = (tmp_path / "Books.jsonl.gz").read_bytes()
    (tmp_path / "Books.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DppmgError, match=r"Books.jsonl.gz: cannot read past line"):
        load_source(_cfg("amazon2023", tmp_path), seed=0)


def test_amazon2023_tolerates_numeric_ids(tmp_path: Path) -> None:
    # A field of an unexpected JSON type makes the fast reader give up; the line reader takes over.
    _write_jsonl_gz(tmp_path / "meta_Books.jsonl.gz", META)
    _write_jsonl_gz(tmp_path / "Books.jsonl.gz", [REVIEWS[0], dict(REVIEWS[1], user_id=12345)])
    raw = load_source(_cfg("amazon2023", tmp_path), seed=0)
    assert raw.interactions["user_id"].tolist() == ["AE1", "12345"]
    assert raw.interactions["timestamp"].tolist() == [1588687728, 1588687729]


def test_amazon2023_ambiguous_files(tmp_path: Path) -> None:
    _write_jsonl_gz(tmp_path / "meta_Books.jsonl.gz", META)
    _write_jsonl_gz(tmp_path / "Books.jsonl.gz", REVIEWS)
    _write_jsonl_gz(tmp_path / "Toys.jsonl.gz", REVIEWS)
    with pytest.raises(
        DppmgError, match=r"reviews JSONL.*Books.jsonl.gz.*Toys.jsonl.gz.*data.interactions_file"
    ):
        load_source(_cfg("amazon2023", tmp_path), seed=0)
    raw = load_source(_cfg("amazon2023", tmp_path, interactions_file="Toys.jsonl.gz"), seed=0)
    assert raw.info["interactions_file"].endswith("Toys.jsonl.gz")


# ----------------------------------------------------------------------------------------------
# MMRec


def _write_mmrec(folder: Path, n_items: int = 4, text: bool = True, image: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "baby.inter").write_text(
        "userID\titemID\trating\ttimestamp\tx_label\n0\t0\t5.0\t100\t0\n0\t3\t4.0\t200\t2\n1\t1\t3.0\t150\t1\n"
    )
    rng = np.random.default_rng(0)
    if text:
        np.save(folder / "text_feat.npy", rng.normal(size=(n_items, 6)))
    if image:
        np.save(folder / "image_feat.npy", rng.normal(size=(n_items, 5)).astype(np.float32))


def test_mmrec(tmp_path: Path) -> None:
    _write_mmrec(tmp_path)
    raw = load_source(_cfg("mmrec", tmp_path), seed=0)
    _check_common(raw)
    assert raw.items["item_id"].tolist() == ["0", "1", "2", "3"]
    assert raw.items["text"].isna().all() and raw.items["image"].isna().all()
    assert raw.interactions["split"].tolist() == ["train", "test", "valid"]
    assert raw.features["text"].shape == (4, 6) and raw.features["text"].dtype == np.float32
    assert raw.features["image"].shape == (4, 5)


def test_mmrec_errors(tmp_path: Path) -> None:
    _write_mmrec(tmp_path / "few", n_items=3)  # itemID 3 needs 4 rows
    with pytest.raises(
        DppmgError, match=r"baby.inter: the largest itemID is 3 but text_feat.npy, image_feat.npy has 3 rows"
    ):
        load_source(_cfg("mmrec", tmp_path / "few"), seed=0)
    _write_mmrec(tmp_path / "none", text=False, image=False)
    with pytest.raises(DppmgError, match=r"no item features"):
        load_source(_cfg("mmrec", tmp_path / "none"), seed=0)
    _write_mmrec(tmp_path / "image_only", text=False)
    assert set(load_source(_cfg("mmrec", tmp_path / "image_only"), seed=0).features) == {"image"}
    with pytest.raises(DppmgError, match=r"sports.inter not found"):
        load_source(_cfg("mmrec", tmp_path / "image_only", mmrec_name="sports"), seed=0)


# ----------------------------------------------------------------------------------------------
# Custom


def test_custom_csv(tmp_path: Path) -> None:
    (tmp_path / "pics").mkdir()
    (tmp_path / "items.csv").write_text(
        "item_id,text,keywords,image,brand\n"
        "007,A red mug,red mug,pics/a.png,Acme\n"
        f"8,A blue hat,blue hat,{tmp_path / 'elsewhere.png'},Zeta\n"
        "9,No picture,thing,,Acme\n"
    )
    (tmp_path / "interactions.csv").write_text(
        "user_id,item_id,timestamp,rating\nu1,007,1700000000,5\nu1,8,2024-01-02T03:04:05Z,3\nu2,9,2024-01-02,4\n"
    )
    raw = load_source(_cfg("custom", tmp_path), seed=0)
    _check_common(raw)
    assert raw.items["item_id"].tolist() == ["007", "8", "9"]
    assert raw.items["brand"].tolist() == ["Acme", "Zeta", "Acme"]  # extra columns are kept
    assert raw.items["image"].tolist() == [
        str(tmp_path / "pics/a.png"),
        str(tmp_path / "elsewhere.png"),
        None,
    ]
    assert raw.interactions["timestamp"].tolist() == [1700000000, 1704164645, 1704153600]
    assert raw.interactions["rating"].tolist() == [5.0, 3.0, 4.0]


def test_custom_jsonl_with_images_dir(tmp_path: Path) -> None:
    raw_dir, images = tmp_path / "raw", tmp_path / "images"
    raw_dir.mkdir()
    images.mkdir()
    items = [
        {"item_id": 1, "text": "t1", "keywords": "k1", "image": "1.jpg"},
        {"item_id": 2, "text": "t2", "keywords": "k2"},
    ]
    (raw_dir / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    (raw_dir / "events.jsonl").write_text(json.dumps({"user_id": 10, "item_id": 2, "timestamp": 5}) + "\n")
    raw = load_source(
        _cfg("custom", raw_dir, images_dir=str(images), interactions_file="events.jsonl"), seed=0
    )
    _check_common(raw)
    assert raw.items["item_id"].tolist() == ["1", "2"]
    assert raw.items["image"].tolist() == [str(images / "1.jpg"), None]
    assert raw.interactions[["user_id", "item_id", "timestamp"]].values.tolist() == [["10", "2", 5]]
    assert "rating" not in raw.interactions


def test_custom_errors(tmp_path: Path) -> None:
    with pytest.raises(DppmgError, match=r"no items.csv or items.jsonl"):
        load_source(_cfg("custom", tmp_path), seed=0)
    (tmp_path / "items.csv").write_text("item_id,text\n1,hello\n")
    (tmp_path / "interactions.csv").write_text("user_id,item_id,timestamp\nu1,1,5\n")
    with pytest.raises(DppmgError, match=r"items.csv: missing column\(s\) \['keywords'\]; expected columns"):
        load_source(_cfg("custom", tmp_path), seed=0)
    (tmp_path / "items.csv").write_text("item_id,text,keywords\n1,hello,hi\n")
    (tmp_path / "interactions.csv").write_text("user_id,item_id,timestamp\nu1,1,5\nu1,1,yesterday\n")
    with pytest.raises(DppmgError, match=r"interactions.csv: data row 2: timestamp 'yesterday'"):
        load_source(_cfg("custom", tmp_path), seed=0)
    (tmp_path / "interactions.csv").write_text("user,item_id,timestamp\nu1,1,5\n")
    with pytest.raises(DppmgError, match=r"interactions.csv: missing column\(s\) \['user_id'\]"):
        load_source(_cfg("custom", tmp_path), seed=0)


# ----------------------------------------------------------------------------------------------
# Registry


def test_load_source_synthetic_is_lazy_and_passes_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    fake = types.ModuleType("dppmg.data.synthetic")

    def generate_world(cfg, seed):  # noqa: ANN001, ANN202 - a stand-in for the real generator
        calls.append((cfg, seed))
        return RawDataset("synthetic", pd.DataFrame(), pd.DataFrame())

    fake.generate_world = generate_world  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dppmg.data.synthetic", fake)
    cfg = DataConfig()
    assert load_source(cfg, seed=7).source == "synthetic"
    assert calls == [(cfg.synthetic, 7)]


def test_load_source_unknown() -> None:
    with pytest.raises(DppmgError, match=r"data.source='nope' is not one of"):
        load_source(DataConfig(source="nope"), seed=0)
