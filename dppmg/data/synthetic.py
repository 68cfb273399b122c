"""The embedded synthetic world: home-decor items, users with known modal-specific tastes, and their histories.

Every item has a category (what it is, and the generation target), two *visual* attributes that only its
image shows for sure (colour, pattern) and three *textual* attributes that only its text states for sure
(style, material, room). The text names each visual attribute only sometimes, so neither modality alone
describes the item completely.

Every user has a ground-truth image taste (a favourite colour and pattern) and an independent text taste
(a favourite style, material and room). Histories come from a choice model,

    utility(u, i) = image_weight · mean_a∈visual [attr_a(i) = fav_a(u)]
                  + text_weight  · mean_a∈text   [attr_a(i) = fav_a(u)]
                  + popularity_weight · log popularity(i)
                  + temperature · Gumbel noise,

and a user's history is the top-k items by noisy utility, which is exactly sampling k items without
replacement from softmax(utility / temperature) (the Gumbel top-k trick). Popularity is Zipf's law over a
random ranking of the items, log popularity(i) = -log rank(i); popularity_weight therefore plays the role
of the Zipf exponent.

Images are drawn procedurally and vectorized over items: a silhouette per category (signed distance
functions, anti-aliased), filled with the item's colour, with the pattern painted in a contrasting shade
of that colour, plus per-item jitter (position, scale, colour, background tint) and pixel noise.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from dppmg.config import SyntheticConfig
from dppmg.data.raw import RawDataset

# ---------------------------------------------------------------------------------------------------------
# Vocabularies. Later stages train an attribute classifier against these, so their order is part of the
# world: attribute codes index these tuples.

# The category is the item's kind and the generation target; it decides the silhouette.
SILHOUETTES: dict[str, str] = {
    "lamp": "triangle",  # a lampshade
    "cushion": "square",
    "rug": "diamond",  # a rug seen at an angle
    "vase": "tall_rectangle",
    "clock": "circle",
    "mirror": "ring",  # a round frame
}
CATEGORIES: tuple[str, ...] = tuple(SILHOUETTES)

# Well separated in RGB, and all far from the light background.
COLOURS_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (235, 210, 30),
    "green": (35, 155, 60),
    "blue": (35, 75, 215),
    "purple": (125, 45, 170),
    "pink": (240, 120, 185),
    "black": (30, 30, 30),
}
VISUAL_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS_RGB),
    "pattern": ("solid", "stripes", "dots", "checks"),
}
TEXT_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "style": ("modern", "rustic", "vintage", "minimalist", "bohemian", "industrial"),
    "material": ("wood", "metal", "ceramic", "glass", "cotton", "rattan"),
    "room": ("living room", "bedroom", "kitchen", "bathroom", "home office"),
}
# Every attribute an item has, category first: attribute -> values (the item column is attr_<attribute>).
ATTRIBUTES: dict[str, tuple[str, ...]] = {"category": CATEGORIES, **VISUAL_ATTRIBUTES, **TEXT_ATTRIBUTES}

# How the text may say each value. Phrases of different values never contain one another as whole words,
# so a reader (or a test) can tell from the text which value was meant.
SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    "colour": {
        "red": ("red", "crimson", "scarlet"),
        "orange": ("orange", "tangerine", "amber"),
        "yellow": ("yellow", "mustard", "golden"),
        "green": ("green", "emerald", "forest green"),
        "blue": ("blue", "cobalt", "navy"),
        "purple": ("purple", "violet", "plum"),
        "pink": ("pink", "rose", "blush"),
        "black": ("black", "charcoal", "jet-black"),
    },
    "pattern": {
        "solid": ("plain", "solid-colour", "single-tone"),
        "stripes": ("striped", "pinstriped", "banded"),
        "dots": ("polka-dot", "dotted", "spotted"),
        "checks": ("checked", "checkered", "gingham"),
    },
    "style": {
        "modern": ("modern", "contemporary", "sleek"),
        "rustic": ("rustic", "farmhouse", "countryside"),
        "vintage": ("vintage", "retro", "antique-style"),
        "minimalist": ("minimalist", "minimal", "understated"),
        "bohemian": ("bohemian", "boho", "eclectic"),
        "industrial": ("industrial", "loft-style", "urban"),
    },
    "material": {
        "wood": ("wood", "oak", "walnut"),
        "metal": ("metal", "steel", "brass"),
        "ceramic": ("ceramic", "porcelain", "stoneware"),
        "glass": ("glass", "frosted glass", "crystal"),
        "cotton": ("cotton", "cotton twill", "soft cotton"),
        "rattan": ("rattan", "wicker", "woven cane"),
    },
    "room": {
        "living room": ("living room", "lounge", "sitting room"),
        "bedroom": ("bedroom", "guest bedroom", "sleeping area"),
        "kitchen": ("kitchen", "kitchenette", "cooking space"),
        "bathroom": ("bathroom", "washroom", "powder room"),
        "home office": ("home office", "study", "workspace"),
    },
}

# Sentence templates. {look} is the visual description ("crimson striped "), possibly empty; it always
# stands right before {category}. {a} is an article that _fix_articles turns into "an" before a vowel.
TEMPLATES: tuple[str, ...] = (
    "{a} {style} {look}{category} made of {material}, perfect for the {room}.",
    "This {style} {look}{category} in {material} brings warmth to any {room}.",
    "Add character to your {room} with {a} {style} {look}{category} crafted from {material}.",
    "{style} {material} {look}{category} for the {room}.",
    "Crafted from {material}, this {look}{category} suits {a} {style} {room}.",
    "{room} favourite: {a} {style} {look}{category} with {a} {material} finish.",
)

# Users' ground-truth columns: attribute -> column, by modality.
IMAGE_PREFERENCE_COLUMNS: dict[str, str] = {a: f"pref_image_{a}" for a in VISUAL_ATTRIBUTES}
TEXT_PREFERENCE_COLUMNS: dict[str, str] = {a: f"pref_text_{a}" for a in TEXT_ATTRIBUTES}

# ---------------------------------------------------------------------------------------------------------
# Drawing constants (image coordinates run from -1 to 1 across the picture).

_MAX_SHIFT = 0.10  # silhouette centre offset
_SCALE_RANGE = (0.64, 0.78)  # silhouette half-size; with the shift it always stays inside the frame
_BACKGROUND_RGB = (236.0, 232.0, 224.0)  # warm off-white
_BACKGROUND_TINT = 12.0  # per-item uniform ± tint per channel
_COLOUR_JITTER = 7.0  # per-item std of the fill colour per channel
_PIXEL_NOISE = 3.0  # per-pixel std
_ACCENT_MIX = 0.6  # the pattern's shade: this far from the colour toward a light or dark tone
_LIGHT_TONE, _DARK_TONE = 250.0, 20.0
_LIGHT_COLOUR_LUMA = 0.5  # colours brighter than this get a dark pattern shade, others a light one
# Pattern geometry in the silhouette's own units (it spans about -1..1), so patterns scale with the shape.
_STRIPE_PERIOD, _STRIPE_DUTY = 0.42, 0.45
_DOT_PERIOD, _DOT_RADIUS = 0.55, 0.17
_CHECK_CELL = 0.3
_RENDER_CHUNK_PIXELS = 1 << 22  # items per rendering chunk = this / pixels per image; bounds memory

# Interaction sampling.
_BLOCK_ELEMENTS = 1 << 22  # users per block = this / n_items: each float32 [U_block, I] buffer is ~16 MB
_MAX_WORKERS = 4  # default threads for sampling histories
_THRESHOLD_SAMPLE = 1024  # columns sampled per block to guess each user's top-k threshold
_THRESHOLD_SLACK = 8  # extra sampled entries above the guess, so that it rarely falls short
_MEAN_GAP_SECONDS = 2 * 86_400  # mean time between two interactions of a user


@dataclass
class RenderedItems:
    """Images and where their paint is.

    images:     uint8 [N, S, S, 3].
    silhouette: bool [N, S, S], pixels at least half covered by the item's shape.
    accent:     bool [N, S, S], silhouette pixels painted in the pattern's shade instead of the colour.
    """

    images: np.ndarray
    silhouette: np.ndarray
    accent: np.ndarray


# ---------------------------------------------------------------------------------------------------------
# The world.


def generate_world(cfg: SyntheticConfig, seed: int, workers: int | None = None) -> RawDataset:
    """Draw items, users and interactions; render every item's image. Deterministic for `seed`.

    `workers` threads sample interactions (numpy releases the GIL); the result does not depend on it.
    Returns items (item_id, text, keywords, image=None, attr_*), interactions (user_id, item_id,
    timestamp), users (user_id, pref_*) and images uint8 [n_items, image_size, image_size, 3].
    """
    # One independent stream per part, so that e.g. a change to the drawing leaves the histories alone.
    parts = ("items", "popularity", "users", "interactions", "text", "images")
    streams = dict(zip(parts, np.random.SeedSequence(seed).spawn(len(parts))))
    item_codes = draw_codes(cfg.n_items, ATTRIBUTES, np.random.default_rng(streams["items"]))
    # Zipf popularity over a random ranking of the items; ranks start at 1.
    rank = np.random.default_rng(streams["popularity"]).permutation(cfg.n_items) + 1
    log_popularity = -np.log(rank)
    user_rng = np.random.default_rng(streams["users"])
    prefs = draw_codes(cfg.n_users, {**VISUAL_ATTRIBUTES, **TEXT_ATTRIBUTES}, user_rng)
    lengths = np.clip(
        user_rng.poisson(cfg.interactions_per_user, cfg.n_users), cfg.min_interactions_per_user, cfg.n_items
    )
    user_idx, item_idx, timestamps = sample_histories(
        item_codes,
        prefs,
        log_popularity,
        lengths,
        image_weight=cfg.image_weight,
        text_weight=cfg.text_weight,
        popularity_weight=cfg.popularity_weight,
        temperature=cfg.temperature,
        start_timestamp=cfg.start_timestamp,
        seed=streams["interactions"],
        workers=workers,
    )
    texts = write_texts(item_codes, cfg.visual_mention_prob, np.random.default_rng(streams["text"]))
    images = render_items(
        item_codes["category"],
        item_codes["colour"],
        item_codes["pattern"],
        cfg.image_size,
        np.random.default_rng(streams["images"]),
    ).images

    items, users = _item_table(item_codes, texts), _user_table(prefs)
    interactions = pd.DataFrame(
        {
            "user_id": users["user_id"].to_numpy()[user_idx],
            "item_id": items["item_id"].to_numpy()[item_idx],
            "timestamp": timestamps,
        }
    )
    info = {
        "generator": "dppmg.data.synthetic",
        "seed": seed,
        "attributes": {a: list(v) for a, v in ATTRIBUTES.items()},
        "visual_attributes": list(VISUAL_ATTRIBUTES),
        "text_attributes": list(TEXT_ATTRIBUTES),
        "silhouettes": dict(SILHOUETTES),
        "image_size": cfg.image_size,
    }
    return RawDataset(
        source="synthetic", items=items, interactions=interactions, users=users, images=images, info=info
    )


def draw_codes(n: int, vocab: dict[str, tuple[str, ...]], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Independent uniform codes: attribute -> int64 [n], indices into vocab[attribute]."""
    return {a: rng.integers(0, len(values), n) for a, values in vocab.items()}


def _item_table(codes: dict[str, np.ndarray], texts: list[str]) -> pd.DataFrame:
    n = len(texts)
    return pd.DataFrame(
        {
            "item_id": _ids("item", n, min_digits=6),
            "text": texts,
            "keywords": _decode(codes["category"], CATEGORIES),
            "image": pd.Series([None] * n, dtype=object),  # the images come as an array, not files
            **{f"attr_{a}": _decode(codes[a], values) for a, values in ATTRIBUTES.items()},
        }
    )


def _user_table(prefs: dict[str, np.ndarray]) -> pd.DataFrame:
    columns = {col: _decode(prefs[a], VISUAL_ATTRIBUTES[a]) for a, col in IMAGE_PREFERENCE_COLUMNS.items()}
    columns |= {col: _decode(prefs[a], TEXT_ATTRIBUTES[a]) for a, col in TEXT_PREFERENCE_COLUMNS.items()}
    n = len(next(iter(columns.values())))
    return pd.DataFrame({"user_id": _ids("user", n, min_digits=5), **columns})


def _ids(prefix: str, n: int, min_digits: int) -> np.ndarray:
    # Zero-padded to a common width, so that ids sort like their numbers.
    width = max(min_digits, len(str(max(n - 1, 0))))
    return np.array([f"{prefix}_{i:0{width}d}" for i in range(n)], dtype=object)


def _decode(codes: np.ndarray, values: tuple[str, ...]) -> np.ndarray:
    return np.array(values, dtype=object)[codes]


# ---------------------------------------------------------------------------------------------------------
# Histories.


def sample_histories(
    item_codes: dict[str, np.ndarray],
    prefs: dict[str, np.ndarray],
    log_popularity: np.ndarray,
    lengths: np.ndarray,
    *,
    image_weight: float,
    text_weight: float,
    popularity_weight: float,
    temperature: float,
    start_timestamp: int,
    seed: np.random.SeedSequence,
    workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each user's history: the top-`lengths[u]` items by noisy utility, in random order with timestamps.

    item_codes: attribute -> int [I]; prefs: attribute -> int [U] (visual and text attributes);
    log_popularity: float [I]; lengths: int [U], each in [1, I].
    Returns (user_idx, item_idx, timestamp), int64 [N] each, sorted by user then time, no repeated pairs.
    Users are processed in blocks of fixed size (from I alone), each with its own child seed, so the
    result does not depend on `workers`, and memory stays bounded at any scale.
    """
    model = _ChoiceModel.build(
        item_codes, prefs, log_popularity, image_weight, text_weight, popularity_weight
    )
    n_users, n_items = len(lengths), len(log_popularity)
    block = max(1, _BLOCK_ELEMENTS // n_items)
    starts = range(0, n_users, block)
    jobs = [(slice(lo, min(lo + block, n_users)), s) for lo, s in zip(starts, seed.spawn(len(starts)))]

    def run(job: tuple[slice, np.random.SeedSequence]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        users, block_seed = job
        return _sample_block(model, users, lengths[users], temperature, start_timestamp, block_seed)

    workers = workers or min(_MAX_WORKERS, os.cpu_count() or 1)
    bar = dict(
        total=len(jobs), desc="synthetic histories", unit="block", leave=False, disable=len(jobs) < 2 or None
    )
    if workers > 1 and len(jobs) > 1:
        # Threads, not processes: the heavy numpy calls release the GIL and the blocks share the model.
        with ThreadPoolExecutor(workers) as pool:
            parts = list(tqdm(pool.map(run, jobs), **bar))
    else:
        parts = [run(job) for job in tqdm(jobs, **bar)]
    user_idx, item_idx, timestamps = (np.concatenate(p) for p in zip(*parts))
    return user_idx.astype(np.int64), item_idx.astype(np.int64), timestamps


@dataclass
class _ChoiceModel:
    """The deterministic part of the utility, laid out to be cheap for a block of users.

    It only depends on an item's visual cell (its colour × pattern combination), its text cell and its
    popularity, so a block's utility is two gathers from small per-user tables plus the popularity term.
    visual_cell, text_cell: int [I]; visual_prefs [U, A_visual], text_prefs [U, A_text]: favourite codes;
    popularity_term: float32 [I].
    """

    visual_cell: np.ndarray
    visual_sizes: tuple[int, ...]
    visual_prefs: np.ndarray
    text_cell: np.ndarray
    text_sizes: tuple[int, ...]
    text_prefs: np.ndarray
    popularity_term: np.ndarray
    image_weight: float
    text_weight: float

    @staticmethod
    def build(
        item_codes: dict[str, np.ndarray],
        prefs: dict[str, np.ndarray],
        log_popularity: np.ndarray,
        image_weight: float,
        text_weight: float,
        popularity_weight: float,
    ) -> _ChoiceModel:
        visual, text = list(VISUAL_ATTRIBUTES), list(TEXT_ATTRIBUTES)
        visual_sizes = tuple(len(VISUAL_ATTRIBUTES[a]) for a in visual)
        text_sizes = tuple(len(TEXT_ATTRIBUTES[a]) for a in text)
        return _ChoiceModel(
            visual_cell=np.ravel_multi_index(tuple(item_codes[a] for a in visual), visual_sizes),
            visual_sizes=visual_sizes,
            visual_prefs=np.stack([prefs[a] for a in visual], axis=1),
            text_cell=np.ravel_multi_index(tuple(item_codes[a] for a in text), text_sizes),
            text_sizes=text_sizes,
            text_prefs=np.stack([prefs[a] for a in text], axis=1),
            popularity_term=(popularity_weight * log_popularity).astype(np.float32),
            image_weight=image_weight,
            text_weight=text_weight,
        )

    def utility(self, users: slice) -> np.ndarray:
        """Deterministic utility of every item for these users: float32 [U_block, I]."""
        visual = _match_table(self.visual_prefs[users], self.visual_sizes, self.image_weight)  # [U_block, 32]
        text = _match_table(self.text_prefs[users], self.text_sizes, self.text_weight)  # [U_block, 180]
        # np.take keeps the result C-contiguous (table[:, cell] would not), which every later pass needs.
        out = np.take(visual, self.visual_cell, axis=1)
        out += np.take(text, self.text_cell, axis=1)
        out += self.popularity_term
        return out


def _sample_block(
    model: _ChoiceModel,
    users: slice,
    lengths: np.ndarray,
    temperature: float,
    start_timestamp: int,
    seed: np.random.SeedSequence,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Histories of one block of users: (user_idx, item_idx, timestamp), each [lengths.sum()]."""
    rng = np.random.default_rng(seed)
    utility = model.utility(users)  # [U_block, I]
    _add_gumbel(utility, temperature, rng)
    rows, cols = _top_k_per_row(utility, lengths, rng)
    del utility
    # A history is a set; order it at random so that the last items (held out by leave-last-out
    # splits) are as preferred as the rest, not the least preferred.
    order = np.lexsort((rng.random(len(rows)), rows))
    return rows[order] + users.start, cols[order], _timestamps(lengths, start_timestamp, rng)


def _match_table(prefs: np.ndarray, sizes: tuple[int, ...], weight: float) -> np.ndarray:
    """weight · share of attributes where a cell has the user's favourite value: float32 [U, prod(sizes)]."""
    cell_values = np.indices(sizes).reshape(len(sizes), -1)  # [A, C]
    share = (cell_values[None] == prefs[:, :, None]).mean(axis=1)  # [U, C]
    return (weight * share).astype(np.float32)


def _add_gumbel(utility: np.ndarray, temperature: float, rng: np.random.Generator) -> None:
    """utility += temperature · Gumbel(0, 1), in place, as -log(-log U) in float32 (the cheapest exact way).

    U = 0 (probability 2^-24 per draw) gives -inf: that item is simply not chosen.
    """
    noise = rng.random(utility.shape, dtype=np.float32)
    with np.errstate(divide="ignore"):
        np.log(noise, out=noise)
        np.negative(noise, out=noise)
        np.log(noise, out=noise)  # now -Gumbel
    noise *= np.float32(temperature)
    utility -= noise


def _top_k_per_row(key: np.ndarray, k: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the k[r] largest entries of each row of key [R, C]: (rows, cols), k.sum() of each,
    sorted by row, then by key from largest (ties by column).

    Exact, and cheaper than a partition of every full row: a threshold guessed from a random sample of
    columns keeps a few hundred candidates per row, and rows left with fewer than k[r] candidates get their
    exact threshold. Every entry at or above the threshold is a candidate, so the top k[r] are among them.
    """
    k_max = int(k.max())
    threshold = _guess_threshold(key, k_max, rng)
    rows, cols = _at_least(key, threshold)
    counts = np.bincount(rows, minlength=len(key))
    short = counts < k
    if short.any():
        threshold[short] = _kth_largest(key[short], k_max)
        rows, cols = _at_least(key, threshold)
        counts = np.bincount(rows, minlength=len(key))
    # Rank each row's candidates in a padded [R, max candidates] table: a row-wise argsort of a few hundred
    # entries is several times faster than a lexsort of all candidates.
    slot = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    padded_key = np.full((len(key), counts.max()), -np.inf, dtype=key.dtype)
    padded_key[rows, slot] = key[rows, cols]
    padded_col = np.zeros(padded_key.shape, dtype=np.int64)
    padded_col[rows, slot] = cols
    ranked_col = np.take_along_axis(padded_col, np.argsort(-padded_key, axis=1, kind="stable"), axis=1)
    keep = np.arange(padded_key.shape[1])[None, :] < k[:, None]  # the padding ranks last, after every k[r]
    return np.nonzero(keep)[0], ranked_col[keep]


def _guess_threshold(key: np.ndarray, k_max: int, rng: np.random.Generator) -> np.ndarray:
    """A per-row threshold [R] that about 2·k_max entries of each row of key [R, C] reach."""
    n_cols = key.shape[1]
    if k_max >= n_cols:
        return np.full(len(key), -np.inf, dtype=key.dtype)
    if n_cols <= 4 * _THRESHOLD_SAMPLE:  # small rows: the exact threshold is cheap
        return _kth_largest(key, k_max)
    sample = key[:, rng.choice(n_cols, _THRESHOLD_SAMPLE, replace=False)]  # [R, m]
    depth = int(np.ceil(2 * k_max * _THRESHOLD_SAMPLE / n_cols)) + _THRESHOLD_SLACK
    return _kth_largest(sample, min(depth, _THRESHOLD_SAMPLE))


def _at_least(key: np.ndarray, threshold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) where key [R, C] >= threshold [R]; flat indices are several times faster than np.nonzero."""
    flat = np.flatnonzero(key >= threshold[:, None])
    return np.divmod(flat, key.shape[1])


def _kth_largest(values: np.ndarray, k: int) -> np.ndarray:
    """The k-th largest entry of each row of values [R, C]: [R]."""
    n_cols = values.shape[1]
    return np.partition(values, n_cols - k, axis=1)[:, n_cols - k]


def _timestamps(lengths: np.ndarray, start: int, rng: np.random.Generator) -> np.ndarray:
    """Strictly increasing int64 times per user from `start`, for histories of these lengths laid end to end."""
    gaps = 1 + np.floor(rng.exponential(_MEAN_GAP_SECONDS, int(lengths.sum()))).astype(np.int64)
    elapsed = np.cumsum(gaps)
    first = np.cumsum(lengths) - lengths  # each user's first position
    before_user = elapsed[first] - gaps[first]
    return start + elapsed - np.repeat(before_user, lengths)


# ---------------------------------------------------------------------------------------------------------
# Text.


def write_texts(
    codes: dict[str, np.ndarray], visual_mention_prob: float, rng: np.random.Generator
) -> list[str]:
    """One product text per item from its attribute codes (attribute -> int [I]).

    Always names the category and a synonym of every text attribute; names each visual attribute with
    probability visual_mention_prob. Templates and synonyms are drawn per item.
    """
    n = len(codes["category"])
    template = rng.integers(0, len(TEMPLATES), n)
    pick = {a: rng.integers(0, 1 << 30, n) for a in SYNONYMS}  # synonym choice, reduced mod the count
    mention = {a: rng.random(n) < visual_mention_prob for a in VISUAL_ATTRIBUTES}
    texts = []
    for i in range(n):
        say = {a: _synonym(a, int(codes[a][i]), int(pick[a][i])) for a in SYNONYMS}
        look = "".join(say[a] + " " for a in VISUAL_ATTRIBUTES if mention[a][i])
        text = TEMPLATES[template[i]].format(
            a="a",
            look=look,
            category=CATEGORIES[codes["category"][i]],
            **{a: say[a] for a in TEXT_ATTRIBUTES},
        )
        texts.append(_fix_articles(text[0].upper() + text[1:]))
    return texts


def _synonym(attribute: str, code: int, pick: int) -> str:
    options = SYNONYMS[attribute][ATTRIBUTES[attribute][code]]
    return options[pick % len(options)]


_ARTICLE_BEFORE_VOWEL = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")


def _fix_articles(text: str) -> str:
    return _ARTICLE_BEFORE_VOWEL.sub(r"\1n ", text)


# ---------------------------------------------------------------------------------------------------------
# Images.


def render_items(
    category: np.ndarray, colour: np.ndarray, pattern: np.ndarray, image_size: int, rng: np.random.Generator
) -> RenderedItems:
    """Draw every item (codes into CATEGORIES, colours, patterns; int [N]) at image_size × image_size.

    Vectorized over items within chunks of bounded memory; per-item jitter is drawn up front.
    """
    n = len(category)
    jitter = _Jitter.draw(n, rng)
    base = np.array(list(COLOURS_RGB.values()), dtype=np.float32)[colour]  # [N, 3]
    base = np.clip(base + jitter.colour, 0, 255)
    accent = _accent_shade(base)
    background = np.asarray(_BACKGROUND_RGB, np.float32) + jitter.tint  # [N, 3]
    shape = (n, image_size, image_size)
    images = np.empty((*shape, 3), dtype=np.uint8)
    silhouette = np.empty(shape, dtype=bool)
    painted_accent = np.empty(shape, dtype=bool)
    chunk = max(1, _RENDER_CHUNK_PIXELS // (image_size * image_size))
    for lo in tqdm(range(0, n, chunk), desc="synthetic images", leave=False, disable=n <= chunk or None):
        s = slice(lo, min(lo + chunk, n))
        u, v = _local_coordinates(image_size, jitter.centre[s], jitter.scale[s])  # [n_c, S, S] each
        pixel = (2.0 / image_size) / jitter.scale[s]  # one pixel in silhouette units, [n_c]
        signed_distance = _silhouette_distance(category[s], u, v)
        coverage = np.clip(0.5 - signed_distance / pixel[:, None, None], 0.0, 1.0)  # anti-aliased edge
        in_pattern = _pattern_mask(pattern[s], u, v, jitter.phase[s])
        painted = _paint(coverage, in_pattern, background[s], base[s], accent[s], rng)  # [n_c, 3, S, S]
        images[s] = painted.transpose(0, 2, 3, 1)
        silhouette[s] = coverage >= 0.5
        painted_accent[s] = silhouette[s] & in_pattern
    return RenderedItems(images=images, silhouette=silhouette, accent=painted_accent)


def _paint(
    coverage: np.ndarray,
    in_pattern: np.ndarray,
    background: np.ndarray,
    base: np.ndarray,
    accent: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Blend the fill over the background by coverage [N, S, S]; uint8 [N, 3, S, S].

    Channels-first so that every per-item colour broadcasts over a contiguous S×S plane (several times
    faster than broadcasting over a trailing axis of 3). The grain is one value per pixel for all channels.
    """
    per_item = (slice(None), slice(None), None, None)  # [N, 3] -> [N, 3, 1, 1]
    to_base = (base - background)[per_item]
    to_accent = (accent - base)[per_item]
    pixels = background[per_item] + coverage[:, None] * to_base
    pixels += (coverage * in_pattern)[:, None] * to_accent
    grain = rng.standard_normal(coverage.shape, dtype=np.float32)
    grain *= _PIXEL_NOISE
    pixels += grain[:, None]
    np.rint(pixels, out=pixels)
    np.clip(pixels, 0, 255, out=pixels)
    return pixels.astype(np.uint8)


@dataclass
class _Jitter:
    """Per-item randomness of a drawing: centre [N, 2], scale [N], phase [N, 2], tint [N, 3], colour [N, 3]."""

    centre: np.ndarray
    scale: np.ndarray
    phase: np.ndarray
    tint: np.ndarray
    colour: np.ndarray

    @staticmethod
    def draw(n: int, rng: np.random.Generator) -> _Jitter:
        f32 = np.float32
        return _Jitter(
            centre=rng.uniform(-_MAX_SHIFT, _MAX_SHIFT, (n, 2)).astype(f32),
            scale=rng.uniform(*_SCALE_RANGE, n).astype(f32),
            phase=rng.random((n, 2)).astype(f32),  # pattern offset, in periods
            tint=rng.uniform(-_BACKGROUND_TINT, _BACKGROUND_TINT, (n, 3)).astype(f32),
            colour=rng.normal(0.0, _COLOUR_JITTER, (n, 3)).astype(f32),
        )


def _accent_shade(base: np.ndarray) -> np.ndarray:
    """The pattern's paint [N, 3]: the colour moved toward a dark tone if it is light, a light one if dark."""
    luma = (base @ np.array([0.299, 0.587, 0.114], np.float32)) / 255.0
    tone = np.where(luma > _LIGHT_COLOUR_LUMA, _DARK_TONE, _LIGHT_TONE).astype(np.float32)[:, None]
    return base + _ACCENT_MIX * (tone - base)


def _local_coordinates(size: int, centre: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in each item's silhouette frame (x right, y down), broadcast to [N, S, S]."""
    grid = ((np.arange(size, dtype=np.float32) + 0.5) / size) * 2.0 - 1.0
    s = scale[:, None, None]
    u = (grid[None, None, :] - centre[:, 0, None, None]) / s
    v = (grid[None, :, None] - centre[:, 1, None, None]) / s
    return np.broadcast_arrays(u, v)


def _silhouette_distance(category: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance to each item's silhouette (negative inside), in silhouette units: [N, S, S]."""
    out = np.empty(u.shape, dtype=np.float32)
    for code, name in enumerate(CATEGORIES):
        rows = category == code
        if rows.any():
            out[rows] = _SHAPES[SILHOUETTES[name]](u[rows], v[rows])
    return out


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Apex at (0, -0.9), base from (-0.9, 0.8) to (0.9, 0.8); the side's outward normal is ∝ (1.7, -0.9).
    side = (1.7 * np.abs(u) - 0.9 * (v + 0.9)) / np.hypot(1.7, 0.9)
    return np.maximum(side, v - 0.8)


_SHAPES = {
    "circle": lambda u, v: np.hypot(u, v) - 0.95,
    "ring": lambda u, v: np.abs(np.hypot(u, v) - 0.72) - 0.26,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) - 0.78,
    "diamond": lambda u, v: (np.abs(u) + np.abs(v) - 1.0) / np.sqrt(2.0),
    "tall_rectangle": lambda u, v: np.maximum(np.abs(u) - 0.42, np.abs(v) - 0.95),
    "triangle": _triangle,
}
assert set(SILHOUETTES.values()) <= set(_SHAPES), "every category needs a drawable silhouette"


def _pattern_mask(pattern: np.ndarray, u: np.ndarray, v: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Where each item's pattern paints its accent shade: bool [N, S, S] (all False for solid)."""
    out = np.zeros(u.shape, dtype=bool)
    kinds = VISUAL_ATTRIBUTES["pattern"]
    for code, name in enumerate(kinds):
        rows = pattern == code
        if name == "solid" or not rows.any():
            continue
        pu, pv = u[rows], v[rows]
        ph_u, ph_v = phase[rows, 0, None, None], phase[rows, 1, None, None]
        if name == "stripes":  # horizontal bands
            out[rows] = _fraction(pv / _STRIPE_PERIOD + ph_v) < _STRIPE_DUTY
        elif name == "dots":  # a square grid of round dots
            du = _fraction(pu / _DOT_PERIOD + ph_u) - 0.5
            dv = _fraction(pv / _DOT_PERIOD + ph_v) - 0.5
            out[rows] = du * du + dv * dv < (_DOT_RADIUS / _DOT_PERIOD) ** 2
        elif name == "checks":  # a checkerboard
            cells = np.floor(pu / _CHECK_CELL + ph_u) + np.floor(pv / _CHECK_CELL + ph_v)
            out[rows] = _fraction(cells / 2.0) < 0.25  # cells is an integer: fraction 0 (even) or 0.5 (odd)
        else:
            raise AssertionError(f"no drawing for pattern {name!r}")
    return out


def _fraction(x: np.ndarray) -> np.ndarray:
    """x mod 1 (np.mod is several times slower for floats)."""
    return x - np.floor(x)
